"""Adversarial fixtures: the daemon as a process on loopback (the system tests' launcher),
configured as a production relay would be (no lab opt-ins), and a blocking STUN client
that attacks it over real sockets."""

from __future__ import annotations

import os
import random
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from firezone_relay.protocol import stun
from firezone_relay.protocol.stun import Message
from simulations.relay_process import start_local
from simulations.turn_client import TurnClient
from tests.system.conftest import SECRET, RelayProcess

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
    return start_local(
        tmp_path, *extra, ports=ports, secret=secret, scheme=scheme,
        loopback_peers=loopback_peers, ready=ready,
    )  # fmt: skip


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
