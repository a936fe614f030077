"""What the kernel does to the data path: datagrams it drops on a full receive queue are counted
(``SO_RXQ_OVFL``), allocation sockets get a deep receive queue, and UDP GSO on a path with a
smaller MTU than a segment falls back once per destination and size, never on every run."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
from collections.abc import Iterator

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


# -- UDP GSO on a path with a smaller MTU ----------------------------------------------------


@contextlib.contextmanager
def small_mtu_link(mtu: int) -> Iterator[tuple[str, str]]:
    """Two namespaces joined by a veth pair of ``mtu``: (relay side, client side), addressed
    10.201.0.1 / 10.201.0.2 and fd00:201::1 / fd00:201::2. Named per process, deleted after."""
    a, b = f"cpg{os.getpid()}a", f"cpg{os.getpid()}b"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    for ns in (a, b):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    try:
        ip("netns", "add", a)
        ip("netns", "add", b)
        ip("link", "add", "cpgva", "netns", a, "type", "veth", "peer", "name", "cpgvb", "netns", b)
        for ns, dev, v4, v6 in ((a, "cpgva", "10.201.0.1", "fd00:201::1"),
                                (b, "cpgvb", "10.201.0.2", "fd00:201::2")):  # fmt: skip
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "link", "set", dev, "mtu", str(mtu), "up")
            ip("-n", ns, "addr", "add", f"{v4}/24", "dev", dev)
            ip("-n", ns, "addr", "add", f"{v6}/64", "dev", dev, "nodad")
        yield a, b
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _udp(family: int, host: str) -> socket.socket:
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.bind((host, 0))
    s.setblocking(False)
    return s


def _drain(sock: socket.socket, expected: int) -> list[bytes]:
    sock.settimeout(2)
    got = []
    try:
        while len(got) < expected:
            got.append(sock.recv(70000))
    except TimeoutError:
        pass
    sock.setblocking(False)
    return got


@needs_compiled
@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_gso_refused_on_a_small_mtu_is_learned_once_per_size_and_everything_arrives(
    v6: bool,
) -> None:
    """A 1,460-MTU path (GCP's) refuses GSO segments of 1,433-1,452 bytes (peer datagrams of
    1,429-1,448 plus ChannelData's 4): the first send fails (counted), then that size leaves as
    plain datagrams (as it would without GSO), and no larger size to it is tried either; every
    datagram arrives whole, and a size that fits keeps GSO."""
    from firezone_relay.xdp.netns import netns
    from tests.system.test_udpio import Counted, _channel_data

    af = socket.AF_INET6 if v6 else socket.AF_INET
    relay_host, client_host = ("fd00:201::1", "fd00:201::2") if v6 else ("10.201.0.1", "10.201.0.2")
    local = "::1" if v6 else "127.0.0.1"
    with small_mtu_link(1460) as (a, b):
        with netns(a):
            listen, allocation, peer = _udp(af, relay_host), _udp(af, local), _udp(af, local)
        with netns(b):
            client = _udp(af, client_host)
        client.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE
        try:
            rx = COMPILED[0](64, 2052, 4)
            port = allocation.getsockname()[1]
            to = client.getsockname()[:2]
            assert rx.set_to_client(port, peer.getsockname()[:2], listen.fileno(), to, 0x4000)
            sizes = [*range(1429, 1449), 1000]
            for _ in range(3):  # runs: a refused size is never tried again
                for size in sizes:
                    payloads = [bytes([i]) * size for i in range(32)]
                    for p in payloads:
                        peer.sendto(p, allocation.getsockname())
                    assert rx.relay_peers(allocation, port, Counted()) == (32, 32)
                    assert _drain(client, 32) == [_channel_data(0x4000, p) for p in payloads]
            assert rx.gso, "GSO stays on for the sizes that fit"
            # once in all: the first size refused (1,433) covers the larger ones, in every run
            assert rx.gso_refused == 1
            assert rx.gso_sends == 3  # size 1000, every run
            assert rx.send_errors == 0 and rx.send_drops == 0
        finally:
            for s in (listen, allocation, peer, client):
                s.close()
