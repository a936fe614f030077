"""Fixtures of the daemon attacks: the system tests' daemon fixtures, plus a daemon under a
small descriptor limit (``prlimit --nofile=N``). Imported by the test module (not a conftest,
so the suite's other adversarial modules keep their own fixtures)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from simulations.relay_process import daemon_command
from tests.system.conftest import (
    ROOT,
    SECRET,
    RelayProcess,
    free_port,
    http,
    port_range,
    relay,
    relay_factory,
)

__all__ = ["http", "limited_relay", "relay", "relay_factory", "start_limited_relay"]


def start_limited_relay(tmp_path: Path, nofile: int, *extra: str) -> RelayProcess:
    """A relay whose RLIMIT_NOFILE (soft and hard) is ``nofile``, started through prlimit."""
    prlimit = shutil.which("prlimit")
    if prlimit is None:
        raise RuntimeError("prlimit (util-linux) is needed")
    listen = free_port()
    health, control = free_port(socket.SOCK_STREAM), free_port(socket.SOCK_STREAM)
    low, high = port_range()
    args = daemon_command(
        listen, (low, high), health, control, "firezone", "127.0.0.1", None,
        "--auth-secret", SECRET, *extra,
    )  # fmt: skip
    args = [prlimit, f"--nofile={nofile}", *args]
    log_path = tmp_path / f"relay-{listen}.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    env.pop("FIREZONE_TOKEN", None)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    daemon = RelayProcess(proc, listen, health, control, low, high, log_path, args=args)
    deadline = time.monotonic() + 15
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"relay exited with {proc.returncode}:\n{daemon.log()}")
        with contextlib.suppress(OSError):
            if http("GET", f"{daemon.health}/readyz", 1)[0] == 200:
                return daemon
        if time.monotonic() > deadline:
            daemon.stop(signal.SIGKILL)
            raise RuntimeError(f"relay not ready:\n{daemon.log()}")
        time.sleep(0.05)


@pytest.fixture
def limited_relay(tmp_path: Path) -> Iterator[Callable[..., RelayProcess]]:
    started: list[RelayProcess] = []

    def factory(nofile: int, *extra: str) -> RelayProcess:
        daemon = start_limited_relay(tmp_path, nofile, *extra)
        started.append(daemon)
        return daemon

    yield factory
    for daemon in started:
        daemon.stop(signal.SIGKILL)
