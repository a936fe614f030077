"""System-test fixtures: the relay daemon as a real subprocess on loopback, on free ports
(``simulations.relay_process.start_local``).

Every relay gets its own listen port, HTTP ports and a slice of 61000-65499 for allocations
(outside the kernel's ephemeral range, so client sockets never collide with relay ports).
"""

from __future__ import annotations

import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from simulations import relay_process
from simulations.relay_process import ROOT, http, port_range, spawn_daemon, start_local
from simulations.relay_process import LocalDaemon as RelayProcess

SECRET = "system-test-secret"

__all__ = [
    "ROOT",
    "SECRET",
    "RelayProcess",
    "free_port",
    "http",
    "port_range",
    "start_from_env",
    "start_relay",
]

pytestmark = pytest.mark.system


def free_port(kind: int = socket.SOCK_DGRAM, host: str = "127.0.0.1") -> int:
    """A port that is free for both UDP and TCP on ``host`` right now (whatever ``kind``:
    both are checked), as the daemon launcher finds them."""
    return relay_process.free_port((host,), tcp_too=True)


def start_relay(
    tmp_path: Path,
    *extra: str,
    ip4: str | None = "127.0.0.1",
    ip6: str | None = None,
    env: dict[str, str] | None = None,
    scheme: str = "firezone",
    wait_ready: bool = True,
    ports: tuple[int, int] | None = None,
) -> RelayProcess:
    """A relay with the suite's secret and loopback peers allowed."""
    return start_local(
        tmp_path, *extra, ip4=ip4, ip6=ip6, ports=ports, secret=SECRET, scheme=scheme, env=env,
        ready=wait_ready,
    )  # fmt: skip


def start_from_env(tmp_path: Path, env: dict[str, str]) -> RelayProcess:
    """The relay with no flag at all, configured only by its environment, as in a container:
    free ports, loopback binds, the suite's secret, then ``env`` on top. Not waited for."""
    listen = free_port()
    health, control = free_port(socket.SOCK_STREAM), free_port(socket.SOCK_STREAM)
    low, high = port_range()
    config = {
        "BIND_IP4_ADDR": "127.0.0.1",
        "LISTEN_PORT": str(listen),
        "LOWEST_PORT": str(low),
        "HIGHEST_PORT": str(high),
        "HEALTH_CHECK_ADDR": f"127.0.0.1:{health}",
        "CONTROL_ENDPOINT": f"127.0.0.1:{control}",
        "AUTH_SECRET": SECRET,
        **env,
    }
    return RelayProcess.of(
        spawn_daemon([], tmp_path / f"relay-env-{listen}.log", env=config, inherit_env=False),
        ip4="127.0.0.1",
        listen_port=listen,
        health_port=health,
        control_port=control,
        lowest_port=low,
        highest_port=high,
        secret=SECRET,
    )


@pytest.fixture
def relay_factory(tmp_path: Path) -> Iterator[object]:
    started: list[RelayProcess] = []

    def factory(*extra: str, **kwargs: object) -> RelayProcess:
        relay = start_relay(tmp_path, *extra, **kwargs)  # type: ignore[arg-type]
        started.append(relay)
        return relay

    yield factory
    for relay in started:
        relay.stop(signal.SIGKILL)


@pytest.fixture
def relay(relay_factory: object) -> RelayProcess:
    return relay_factory()  # type: ignore[operator,no-any-return]
