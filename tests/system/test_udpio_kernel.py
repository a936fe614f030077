"""What the kernel does to the data path: datagrams it drops on a full receive queue are counted
(``SO_RXQ_OVFL``), allocation sockets get a deep receive queue, and UDP GSO on a path with a
smaller MTU than a segment falls back once per destination and size, never on every run."""

from __future__ import annotations

import socket

import pytest

from firezone_relay.actors.sockets import ALLOCATION_RECEIVE_BYTES, bind_udp
from firezone_relay.protocol.types import Family
from tests.system.test_udpio import COMPILED, needs_compiled

pytestmark = pytest.mark.system


@needs_compiled
@pytest.mark.parametrize("family", [Family.V4, Family.V6])
def test_kernel_receive_queue_drops_are_counted(family: Family) -> None:
    host = "::1" if family is Family.V6 else "127.0.0.1"
    sock = bind_udp(family, host, 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # the kernel's minimum
    af = socket.AF_INET6 if family is Family.V6 else socket.AF_INET
    with sock, socket.socket(af, socket.SOCK_DGRAM) as peer:
        rx = COMPILED[0](64, 2052, 4)
        for _ in range(50):
            peer.sendto(b"x" * 1000, sock.getsockname())
        queued = rx.recv(sock)
        assert 0 < queued < 50
        assert rx.recv(sock) == -1
        peer.sendto(b"after", sock.getsockname())  # carries the count of those before it
        assert rx.recv(sock) == 1
        assert rx.kernel_drops == 50 - queued
        assert rx.drop_fd(sock.fileno()) == 0  # forgets the count: a new socket starts at 0


def test_allocation_sockets_get_a_deep_receive_queue() -> None:
    sock = bind_udp(Family.V4, "127.0.0.1", 0, receive_bytes=ALLOCATION_RECEIVE_BYTES)
    with sock:
        booked = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    with open("/proc/sys/net/core/rmem_max") as f:
        cap = int(f.read())
    # forced past rmem_max as root, capped by it otherwise; the kernel books twice the size
    assert booked >= 2 * min(ALLOCATION_RECEIVE_BYTES, cap)
