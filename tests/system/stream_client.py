"""A blocking TURN client over one TCP or TLS connection, and helpers of the stream tests."""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from collections.abc import Iterator

from firezone_relay.protocol import stun
from firezone_relay.protocol.stream_framing import StreamFramer
from firezone_relay.protocol.stun import Attr, Class
from simulations.turn_client import TurnClient
from tests.system.conftest import RelayProcess


def metric(relay: RelayProcess, name: str) -> float:
    """The sum of a metric's series on ``/metrics`` (or the one series ``name`` names)."""
    from tests.system.test_browser import metrics

    return sum(v for k, v in metrics(relay).items() if k == name or k.startswith(name + "{"))


def wait_for(predicate: object, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return bool(predicate())  # type: ignore[operator]


class StreamClient:
    """A TURN client over one TCP or TLS connection (blocking, bounded by a timeout)."""

    def __init__(self, sock: socket.socket, relay: RelayProcess, user: str | None = None):
        self.sock = sock
        self.sock.settimeout(5)
        self.framer = StreamFramer()
        self.frames: list[bytes] = []
        username, password = relay.credentials(user)
        self.turn = TurnClient(username, password)

    @classmethod
    def connect(
        cls,
        relay: RelayProcess,
        port: int | None = None,
        *,
        prefix: bytes = b"",
        tls: ssl.SSLContext | None = None,
        bind: tuple[str, int] | None = None,
        receive_buffer: int | None = None,
    ) -> StreamClient:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(5)
        if receive_buffer is not None:  # before connecting: it sets the window
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        if bind is not None:
            sock.bind(bind)
        sock.connect(("127.0.0.1", port or relay.listen_port))
        if prefix:
            sock.sendall(prefix)
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname="localhost")
        return cls(sock, relay)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def next_frame(self) -> bytes:
        while not self.frames:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the relay closed the connection")
            self.frames += self.framer.feed(chunk)
        return self.frames.pop(0)

    def transact(self, request: bytes) -> stun.Message:
        tid = request[8:20]
        self.send(request)
        while True:
            frame = self.next_frame()
            if frame[0] < 0x40 and frame[8:20] == tid:
                return stun.parse(frame)

    def allocate(self, transport: int = 17) -> stun.Message:
        response = self.transact(self.turn.allocate(transport=transport, signed=False))
        if response.get(Attr.ERROR_CODE) is not None:
            self.turn.learn(response)
            response = self.transact(self.turn.allocate(transport=transport))
        return response

    def bind(self, channel: int, peer: tuple[str, int]) -> None:
        response = self.transact(self.turn.channel_bind(channel, peer))
        assert response.cls == Class.SUCCESS, response.get(Attr.ERROR_CODE)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def closed_by_relay(sock: socket.socket, timeout: float = 5.0) -> bool:
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, ssl.SSLError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return True


def relayed_address(response: stun.Message) -> tuple[str, int]:
    assert response.cls == Class.SUCCESS, response.get(Attr.ERROR_CODE)
    relayed = response.get(Attr.XOR_RELAYED_ADDRESS)
    return relayed if isinstance(relayed, tuple) else relayed[0]


@contextlib.contextmanager
def udp_peer() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5)
    try:
        yield sock
    finally:
        sock.close()


def mapped_address(client: StreamClient) -> tuple[str, int]:
    """The XOR-MAPPED-ADDRESS of a Binding over the connection: who the relay thinks we are."""
    response = client.transact(client.turn.binding())
    mapped = response.get(Attr.XOR_MAPPED_ADDRESS)
    assert isinstance(mapped, tuple)
    return mapped
