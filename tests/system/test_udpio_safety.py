"""The compiled route mirror under attack: keyed hashing with bounded runs (crafted keys cost
what random ones do), routes that cannot outlive their sockets, and a Python surface that raises
instead of crashing."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from simulations.bench.hash_flood import collide_unkeyed, unkeyed_hash
from tests.system.test_udpio import (
    COMPILED,
    Counted,
    InProcessRelay,
    _arrived,
    _channel_data,
    needs_compiled,
    sockets,  # noqa: F401  (a fixture)
)

pytestmark = [pytest.mark.system, needs_compiled]

CLUSTER_MAX = 128  # actors/_udpio.c


def test_the_crafted_keys_do_collide_under_the_old_hash() -> None:
    """The bench's attack is real: every crafted key has the target's unkeyed hash."""
    target = ("::1", 5000)
    peers = collide_unkeyed(target, 50000, 100)
    assert len(set(peers)) == 100
    assert {unkeyed_hash(h, p, 50000) for h, p in peers} == {unkeyed_hash(*target, 50000)}


def test_keys_crafted_against_the_old_hash_spread_within_the_bound(
    sockets: dict[str, socket.socket],  # noqa: F811
) -> None:
    listen, allocation, client, peer = (
        sockets[n] for n in ("listen", "allocation", "client", "peer")
    )
    rx = COMPILED[0](8, 2052, 4)
    port = allocation.getsockname()[1]
    me, to = peer.getsockname(), client.getsockname()
    crafted = collide_unkeyed(me, port, 20000)
    for i, other in enumerate(crafted):
        assert rx.set_to_client(port, other, listen.fileno(), to, 0x4000 + i % 1024)
    assert rx.set_to_client(port, me, listen.fileno(), to, 0x4001)  # the deepest, before
    assert rx.routes == (0, 20001)
    assert rx.refused == 0
    assert rx.longest_run <= CLUSTER_MAX
    peer.sendto(b"deep", allocation.getsockname())
    assert rx.relay_peers(allocation, port, Counted()) == (1, 1)
    assert _arrived(client) == [(_channel_data(0x4001, b"deep"), listen.getsockname())]
    for other in crafted:  # each deletion a bounded probe and shift
        rx.drop_to_client(port, other)
    assert rx.routes == (0, 1)


def test_dropping_an_fd_takes_the_routes_leaving_through_it_and_arriving_on_it(
    sockets: dict[str, socket.socket],  # noqa: F811
) -> None:
    listen, allocation, client, peer = (
        sockets[n] for n in ("listen", "allocation", "client", "peer")
    )
    rx = COMPILED[0](8, 2052, 4)
    port = allocation.getsockname()[1]
    me, them = client.getsockname(), peer.getsockname()
    for channel in range(0x4000, 0x4100):
        assert rx.set_to_peer(me, channel, allocation.fileno(), them, listen.fileno())
    for i in range(256):
        assert rx.set_to_client(port, ("127.0.0.1", 1000 + i), listen.fileno(), me, 0x4000,
                                allocation.fileno())  # fmt: skip
    assert rx.routes == (256, 256)
    assert rx.drop_fd(allocation.fileno()) == 512  # out of it, and in on it
    assert rx.routes == (0, 0) and rx.debug_routes() == []


def test_a_route_is_only_taken_from_the_socket_it_was_recorded_with(
    sockets: dict[str, socket.socket],  # noqa: F811
) -> None:
    listen, allocation, client, peer = (
        sockets[n] for n in ("listen", "allocation", "client", "peer")
    )
    rx = COMPILED[0](8, 2052, 4)
    port = allocation.getsockname()[1]
    assert rx.set_to_client(port, peer.getsockname(), listen.fileno(), client.getsockname(),
                            0x4000, allocation.fileno())  # fmt: skip
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
        other.bind(("127.0.0.1", 0))
        other.setblocking(False)
        peer.sendto(b"x", other.getsockname())
        assert rx.relay_peers(other, port, Counted()) == (1, 0)  # left for the core


def test_routes_to_a_closed_or_unusable_fd_are_refused(
    sockets: dict[str, socket.socket],  # noqa: F811
) -> None:
    listen, client, peer = (sockets[n] for n in ("listen", "client", "peer"))
    rx = COMPILED[0](8, 2052, 4)
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    fd = closed.fileno()
    closed.close()
    me, them = client.getsockname(), peer.getsockname()
    for bad in (fd, -1, 1 << 30):
        assert not rx.set_to_peer(me, 0x4000, bad, them)
        assert not rx.set_to_peer(me, 0x4000, listen.fileno(), them, bad if bad != -1 else -2)
    assert rx.routes == (0, 0)


# -- route lifetime through the data plane, with the real core ------------------------------


def _bound_relay(client: socket.socket, peer: socket.socket) -> tuple[InProcessRelay, int]:
    """An in-process relay with one allocation and channel 0x4000 bound to ``peer``."""
    from firezone_relay.protocol.auth import firezone_password
    from firezone_relay.protocol.stun import Attr, Class, parse
    from simulations.turn_client import TurnClient

    client.settimeout(2)
    relay = InProcessRelay()
    expiry = 2**31 - 1
    turn = TurnClient(f"{expiry}:alice", firezone_password("secret", expiry, "alice"))

    def request(data: bytes) -> Any:
        relay.from_client(client, data)
        return parse(client.recv(2048))

    turn.learn(request(turn.allocate()))
    allocated = request(turn.allocate())
    assert allocated.cls == Class.SUCCESS
    port = allocated.get(Attr.XOR_RELAYED_ADDRESS)[1]
    assert request(turn.channel_bind(0x4000, peer.getsockname())).cls == Class.SUCCESS
    assert relay.dataplane.mirrored_routes == (1, 1)
    return relay, port


def _fds_in(routes: list[tuple[Any, ...]]) -> set[int]:
    return {r[3] for r in routes}


@pytest.fixture
def bound(sockets: dict[str, socket.socket]) -> Iterator[tuple[InProcessRelay, int]]:  # noqa: F811
    relay, port = _bound_relay(sockets["client"], sockets["peer"])
    yield relay, port
    relay.close()


def test_a_replaced_peer_socket_takes_its_routes_along(
    bound: tuple[InProcessRelay, int],
) -> None:
    from firezone_relay.protocol.types import Family

    relay, port = bound
    dataplane = relay.dataplane
    old = dataplane.allocation_sockets[(port, int(Family.V4))]
    old_fd = old.fileno()
    assert old_fd in _fds_in(dataplane.debug_routes())
    new = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dataplane.add_peer_socket(port, Family.V4, new)
    assert dataplane.mirrored_routes == (0, 0)  # the new socket has none until the core says
    old.close()  # its owner closes it: the number is free for anyone
    reused = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        assert reused.fileno() == old_fd  # the lowest free number
        assert dataplane.debug_routes() == []
    finally:
        reused.close()


def test_a_late_peer_socket_closed_leaves_no_route_to_a_reused_fd(
    bound: tuple[InProcessRelay, int],
) -> None:
    """The allocation actor hands its socket over instead of closing it: while the message
    waits, the socket stays open and its fd taken; handling it drops the routes, then closes."""
    from firezone_relay.protocol.types import Family

    relay, port = bound
    dataplane = relay.dataplane
    sock = dataplane.allocation_sockets[(port, int(Family.V4))]
    fd = sock.fileno()
    opened = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(20)]
    try:
        assert fd not in {s.fileno() for s in opened}  # queued: nobody can get its number
        dataplane.close_peer_socket(port, Family.V4, sock)  # handled, late
        assert sock.fileno() == -1
        assert fd not in _fds_in(dataplane.debug_routes())
        assert dataplane.mirrored_routes == (0, 0)  # both: out through it and in on it
        reused = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        opened.append(reused)
        assert reused.fileno() == fd
        assert fd not in _fds_in(dataplane.debug_routes())
    finally:
        for s in opened:
            s.close()


def test_closing_the_listen_sockets_drops_their_routes(bound: tuple[InProcessRelay, int]) -> None:
    relay, _ = bound
    relay.dataplane.close_listen_sockets()
    assert relay.dataplane.mirrored_routes == (0, 0)
    assert relay.listen.fileno() == -1


# -- the module's Python surface -------------------------------------------------------------

ATTACKS = r"""
import socket, sys
from firezone_relay.actors._udpio import Receiver, send_batch

def sock():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.setblocking(False)
    return s

a, b = sock(), sock()

class Stats:
    relayed_packets_userspace = 0
    relayed_bytes_userspace = 0
    packet_size_buckets = [0] * 16

def attack(name, f):
    try:
        f()
    except Exception as exc:
        print(name, type(exc).__name__, flush=True)
    else:
        print(name, "ok", flush=True)

def lens_cleared():
    rx = Receiver(4, 64, 4)
    rx.lens.clear()
    b.sendto(b"x", a.getsockname())
    rx.recv(a)

def addrs_shrunk_then_relay():
    rx = Receiver(4, 64, 4)
    del rx.addrs[1:]
    for _ in range(3):
        b.sendto(b"y", a.getsockname())
    rx.relay_clients(a, Stats())

def buffer_cleared():
    rx = Receiver(4, 64, 4)
    rx.views.clear()
    rx.slots.clear()
    import gc; gc.collect()
    try:
        rx.buffer.clear()
    finally:
        b.sendto(b"z" * 60, a.getsockname())
        assert rx.recv(a) == 1

def huge_count():
    Receiver(10**20, 64, 4)

def huge_slot():
    Receiver(1024, 2**60, 4)

def bad_fd():
    Receiver(4, 64, 4).recv(123456)

def negative_fd():
    Receiver(4, 64, 4).recv(-1)

def huge_fd():
    Receiver(4, 64, 4).recv(2**70)

def wrong_type():
    Receiver(4, 64, 4).recv("socket")

def drop_huge_fd():
    assert Receiver(4, 64, 4).drop_fd(2**70) == 0

def drop_wrong_type():
    Receiver(4, 64, 4).drop_fd("3")

def route_to_huge_fd():
    Receiver(4, 64, 4).set_to_peer(("127.0.0.1", 1), 0x4000, 2**40, ("127.0.0.1", 2))

def route_bad_addresses():
    rx = Receiver(4, 64, 4)
    assert not rx.set_to_peer(("no", 1), 0x4000, a.fileno(), ("127.0.0.1", 2))
    rx.set_to_peer((1, 2, 3), 0x4000, a.fileno(), ("127.0.0.1", 2))

def relay_port_out_of_range():
    Receiver(4, 64, 4).relay_peers(a, 70000, Stats())

def stats_without_buckets():
    rx = Receiver(4, 64, 4)
    assert rx.set_to_peer(b.getsockname(), 0x4000, a.fileno(), b.getsockname())
    b.sendto(b"\x40\x00\x00\x01x", a.getsockname())
    rx.relay_clients(a, object())

def buckets_shrunk():
    rx = Receiver(4, 64, 4)
    assert rx.set_to_peer(b.getsockname(), 0x4000, a.fileno(), b.getsockname())
    b.sendto(b"\x40\x00\x00\x01x", a.getsockname())
    s = Stats(); s.packet_size_buckets = []
    rx.relay_clients(a, s)

def handoff_not_callable():
    rx = Receiver(4, 64, 4)
    b.sendto(b"not channel data", a.getsockname())
    rx.drain_clients(Stats(), 5, a)

def handoff_clears_everything():
    rx = Receiver(4, 64, 4)
    def handoff(*args):
        rx.drop_fd(a.fileno()); rx.addrs.clear(); rx.recv(a)
    b.sendto(b"not channel data", a.getsockname())
    b.sendto(b"again", a.getsockname())
    rx.drain_clients(Stats(), handoff, a)

def send_batch_short():
    send_batch([a, b"x"])

def send_batch_not_bytes():
    send_batch([a, 5, b.getsockname()])

class Evil(int):
    def __index__(self):
        items.clear()
        return 5000

items = []
def send_batch_mutated():
    items[:] = [a, b"x", ("127.0.0.1", Evil(5000))] * 10
    send_batch(items)

def stream_socket():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    rx = Receiver(4, 64, 4)
    rx.set_to_peer(("127.0.0.1", 1), 0x4000, a.fileno(), ("127.0.0.1", 2))
    rx.relay_clients(s, Stats())

for name, f in list(globals().items()):
    if type(f) is type(sock) and name not in ("sock", "attack"):  # the functions above
        attack(name, f)
print("alive")
"""


def test_what_the_red_team_tried_raises_instead_of_crashing() -> None:
    run = subprocess.run(
        [sys.executable, "-c", ATTACKS], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr[-2000:]
    results = dict(line.split(" ", 1) for line in run.stdout.splitlines() if " " in line)
    assert run.stdout.splitlines()[-1] == "alive"
    assert results == {
        "lens_cleared": "RuntimeError",
        "addrs_shrunk_then_relay": "RuntimeError",
        "buffer_cleared": "BufferError",
        "huge_count": "OverflowError",
        "huge_slot": "ValueError",
        "bad_fd": "OSError",
        "negative_fd": "OSError",
        "huge_fd": "OverflowError",
        "wrong_type": "TypeError",
        "drop_huge_fd": "ok",
        "drop_wrong_type": "TypeError",
        "route_to_huge_fd": "OverflowError",
        "route_bad_addresses": "TypeError",
        "relay_port_out_of_range": "ValueError",
        "stats_without_buckets": "AttributeError",
        "buckets_shrunk": "TypeError",
        "handoff_not_callable": "TypeError",
        "handoff_clears_everything": "ok",
        "send_batch_short": "TypeError",
        "send_batch_not_bytes": "TypeError",
        "send_batch_mutated": "ok",
        "stream_socket": "OSError",
    }, run.stdout
