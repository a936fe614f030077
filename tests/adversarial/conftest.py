"""Adversarial fixtures: the daemon as a process on loopback (the system tests' launcher),
configured as a production relay would be (no lab opt-ins), and a blocking STUN client
that attacks it over real sockets."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from protocol import stun
from protocol.stun import Message
from simulations.relay_process import daemon_command
from simulations.turn_client import TurnClient
from tests.system.conftest import ROOT, SECRET, RelayProcess, free_port, http, port_range

__all__ = ["Attacker", "start"]


def start(
    tmp_path: Path,
    *extra: str,
    loopback_peers: bool = False,
    secret: str | None = SECRET,
    scheme: str = "firezone",
    ports: tuple[int, int] | None = None,
    ready: bool = True,
) -> RelayProcess:
    """A relay on 127.0.0.1; unlike the system tests' relays, loopback peers are refused
    unless asked for, and ``secret=None`` lets the relay generate its own."""
    listen = free_port()
    health, control = free_port(socket.SOCK_STREAM), free_port(socket.SOCK_STREAM)
    low, high = ports or port_range()
    args = daemon_command(listen, (low, high), health, control, scheme, "127.0.0.1", None)
    if not loopback_peers:
        args.remove("--allow-loopback-peers")
    if secret is not None:
        args += ["--auth-secret", secret]
    args += list(extra)
    log_path = tmp_path / f"relay-{listen}.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    for name in ("FIREZONE_TOKEN", "AUTH_SECRET", "RNG_SEED", "ALLOWED_PEER_IP", "DENIED_PEER_IP"):
        env.pop(name, None)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    relay = RelayProcess(
        proc, listen, health, control, low, high, log_path, secret or "", scheme, args
    )
    deadline = time.monotonic() + 15
    while ready:
        if proc.poll() is not None:
            raise RuntimeError(f"relay exited with {proc.returncode}:\n{relay.log()}")
        with contextlib.suppress(OSError):
            if http("GET", f"{relay.health}/readyz", 1)[0] == 200:
                break
        if time.monotonic() > deadline:
            relay.stop(signal.SIGKILL)
            raise RuntimeError(f"relay not ready:\n{relay.log()}")
        time.sleep(0.05)
    return relay


@pytest.fixture
def relays(tmp_path: Path) -> Iterator[object]:
    started: list[RelayProcess] = []

    def factory(*extra: str, **kwargs: object) -> RelayProcess:
        relay = start(tmp_path, *extra, **kwargs)  # type: ignore[arg-type]
        started.append(relay)
        return relay

    yield factory
    for relay in started:
        relay.stop(signal.SIGKILL)


class Attacker:
    """A blocking UDP socket speaking STUN to one relay; ``turn`` signs the requests."""

    def __init__(
        self, relay: RelayProcess, username: str, password: str, host: str = "127.0.0.1"
    ) -> None:
        self.server = ("127.0.0.1", relay.listen_port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(5.0)
        self.turn = TurnClient(username, password, rng=random.Random(os.urandom(8)))

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()
        return host, port

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendto(data, self.server)

    def receive(self, timeout: float = 5.0) -> bytes:
        self.sock.settimeout(timeout)
        return self.sock.recv(65535)

    def ask(self, data: bytes, timeout: float = 5.0) -> Message:
        """Send a request; the response with its transaction id (others are skipped)."""
        tid = data[8:20]
        self.send(data)
        deadline = time.monotonic() + timeout
        while True:
            packet = self.receive(max(0.01, deadline - time.monotonic()))
            if stun.is_stun(packet) and packet[8:20] == tid:
                return stun.parse(packet)

    def authenticate(self) -> None:
        """connlib's first step: a signed request without NONCE, to learn REALM and NONCE."""
        self.turn.learn(self.ask(self.turn.allocate(transport=0)))

    def allocate(self, **kwargs: object) -> Message:
        if self.turn.nonce is None:
            self.authenticate()
        return self.ask(self.turn.allocate(**kwargs))  # type: ignore[arg-type]

    def barrier(self) -> None:
        """Wait until the relay has handled everything this socket sent before: it reads
        its listen socket in order, so a Binding answered means all earlier datagrams are
        done (and anything they made the relay send is already sent)."""
        self.ask(self.turn.binding())

    def drain(self) -> list[bytes]:
        got = []
        self.sock.setblocking(False)
        try:
            while True:
                got.append(self.sock.recv(65535))
        except (BlockingIOError, ConnectionRefusedError):
            return got
        finally:
            self.sock.setblocking(True)


def error_code(message: Message) -> int | None:
    value = message.get(stun.Attr.ERROR_CODE)
    return None if value is None else int(value[0])
