"""The data path's batch I/O (actors/udpio.py): the compiled helper and the pure-Python fallback
behave the same on real sockets, and the installed package carries the compiled one."""

from __future__ import annotations

import importlib.util
import random
import socket
import time
import types
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from firezone_relay.actors import udpio

pytestmark = pytest.mark.system

IMPLEMENTATIONS: list[tuple[str, Any, Callable[[list[Any]], tuple[int, int]]]] = [
    ("python", udpio.PyReceiver, udpio.py_send_batch)
]
if importlib.util.find_spec("firezone_relay.actors._udpio") is not None:
    from firezone_relay.actors import _udpio as compiled

    IMPLEMENTATIONS.append(("compiled", compiled.Receiver, compiled.send_batch))


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    socks = []
    for _ in range(2):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        s.setblocking(False)
        socks.append(s)
    yield socks[0], socks[1]
    for s in socks:
        s.close()


def test_the_compiled_helper_is_built_where_a_compiler_is() -> None:
    """CI installs with `pip install .` on a machine with gcc: the fast path must be there."""
    assert udpio.IMPLEMENTATION.startswith("recvmmsg"), udpio.IMPLEMENTATION


@pytest.mark.parametrize(("name", "receiver", "send_batch"), IMPLEMENTATIONS)
def test_batches_arrive_in_order_with_sender_and_headroom(
    name: str, receiver: Any, send_batch: Any, pair: tuple[socket.socket, socket.socket]
) -> None:
    a, b = pair
    rx = receiver(8, 2048, 4)
    assert rx.recv(a) == -1  # nothing ready
    items: list[Any] = []
    for i in range(10):
        items += [b, bytes([i]) * (i + 1), a.getsockname()]
    assert send_batch(items) == (0, 0)
    assert rx.recv(a) == 8
    assert rx.lens[:8] == list(range(1, 9))
    assert rx.addrs[:8] == [b.getsockname()] * 8
    assert bytes(rx.views[2][: rx.lens[2]]) == b"\x02\x02\x02"
    assert bytes(rx.slots[2][:7]) == b"\x00\x00\x00\x00\x02\x02\x02"  # the headroom in front
    assert rx.recv(a) == 2
    assert rx.lens[:2] == [9, 10]
    assert rx.recv(a) == -1


@pytest.mark.parametrize(("name", "receiver", "send_batch"), IMPLEMENTATIONS)
def test_sends_that_cannot_go_are_counted_not_raised(
    name: str, receiver: Any, send_batch: Any, pair: tuple[socket.socket, socket.socket]
) -> None:
    a, b = pair
    items = [
        b, b"ok", a.getsockname(),
        None, b"no socket", a.getsockname(),
        b, b"bad host", ("not-an-address", 5),
        b, b"port 0", ("127.0.0.1", 0),
        b, b"ok too", a.getsockname(),
    ]  # fmt: skip
    assert send_batch(items) == (1, 2)
    rx = receiver(8, 2048, 0)
    assert rx.recv(a) == 2
    assert [bytes(rx.views[i][: rx.lens[i]]) for i in range(2)] == [b"ok", b"ok too"]


@pytest.mark.parametrize(("name", "receiver", "send_batch"), IMPLEMENTATIONS)
def test_ipv6_senders_are_host_port_pairs(name: str, receiver: Any, send_batch: Any) -> None:
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        s.bind(("::1", 0))
        s.setblocking(False)
        here = s.getsockname()[:2]
        assert send_batch([s, b"six", here]) == (0, 0)
        rx = receiver(4, 2048, 4)
        assert rx.recv(s) == 1
        assert rx.addrs[0] == here
        assert bytes(rx.views[0][: rx.lens[0]]) == b"six"


@pytest.mark.parametrize(("name", "receiver", "send_batch"), IMPLEMENTATIONS)
def test_a_datagram_fills_its_slot_without_touching_the_next(
    name: str, receiver: Any, send_batch: Any, pair: tuple[socket.socket, socket.socket]
) -> None:
    a, b = pair
    rx = receiver(2, 1028, 4)
    send_batch([b, b"x" * 1024, a.getsockname(), b, b"y", a.getsockname()])
    assert rx.recv(a) == 2
    assert rx.lens[:2] == [1024, 1]
    assert bytes(rx.views[0][:1024]) == b"x" * 1024
    assert bytes(rx.slots[1][:5]) == b"\x00\x00\x00\x00y"


@pytest.mark.parametrize(("name", "receiver", "send_batch"), IMPLEMENTATIONS)
def test_a_closed_socket_is_a_counted_failure_or_an_oserror(
    name: str, receiver: Any, send_batch: Any, pair: tuple[socket.socket, socket.socket]
) -> None:
    a, b = pair
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.close()
    assert send_batch([closed, b"x", a.getsockname(), b, b"y", a.getsockname()]) == (0, 1)
    with pytest.raises(OSError):
        receiver(2, 64, 0).recv(closed)


# -- the route mirror ------------------------------------------------------------------------

COMPILED = [r for name, r, _ in IMPLEMENTATIONS if name == "compiled"]
needs_compiled = pytest.mark.skipif(not COMPILED, reason="the compiled helper is not built")


class Counted:
    """The counters of ``protocol.server.Stats`` that the relaying calls bump."""

    def __init__(self) -> None:
        self.relayed_packets_userspace = 0
        self.relayed_bytes_userspace = 0
        self.packet_size_buckets = [0] * 16


@pytest.fixture
def sockets() -> Iterator[dict[str, socket.socket]]:
    """A relay's listen and allocation sockets, a client and a peer, all on loopback."""
    socks = {}
    for name in ("listen", "allocation", "client", "peer"):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        s.setblocking(False)
        socks[name] = s
    yield socks
    for s in socks.values():
        s.close()


def _arrived(sock: socket.socket) -> list[tuple[bytes, Any]]:
    """What is queued on ``sock`` now (everything sent on loopback is queued on return)."""
    out = []
    while True:
        try:
            out.append(sock.recvfrom(70000))
        except BlockingIOError:
            return out


def _channel_data(channel: int, payload: bytes, padding: int = 0) -> bytes:
    return channel.to_bytes(2, "big") + len(payload).to_bytes(2, "big") + payload + b"\0" * padding


@needs_compiled
def test_a_mirrored_channel_is_relayed_both_ways_and_counted(
    sockets: dict[str, socket.socket],
) -> None:
    listen, allocation, client, peer = (
        sockets[n] for n in ("listen", "allocation", "client", "peer")
    )
    rx = COMPILED[0](8, 65540, 4)
    port = allocation.getsockname()[1]
    assert rx.set_to_peer(client.getsockname(), 0x4000, allocation.fileno(), peer.getsockname())
    assert rx.set_to_client(port, peer.getsockname(), listen.fileno(), client.getsockname(), 0x4000)
    assert rx.routes == (1, 1)
    stats = Counted()

    client.sendto(_channel_data(0x4000, b"hello"), listen.getsockname())
    client.sendto(_channel_data(0x4000, b"padded", padding=2), listen.getsockname())
    client.sendto(_channel_data(0x4000, b"x" * 1600), listen.getsockname())
    assert rx.relay_clients(listen, stats) == (3, 3)
    assert _arrived(peer) == [
        (b"hello", allocation.getsockname()),
        (b"padded", allocation.getsockname()),
        (b"x" * 1600, allocation.getsockname()),
    ]
    assert stats.relayed_packets_userspace == 3
    assert stats.relayed_bytes_userspace == 5 + 6 + 1600
    assert stats.packet_size_buckets[0] == 2 and stats.packet_size_buckets[15] == 1

    peer.sendto(b"back", allocation.getsockname())
    assert rx.relay_peers(allocation, port, stats) == (1, 1)
    assert _arrived(client) == [(_channel_data(0x4000, b"back"), listen.getsockname())]
    assert stats.relayed_packets_userspace == 4 and stats.packet_size_buckets[0] == 3
    assert rx.relay_clients(listen, stats) == (-1, 0)  # nothing ready


@pytest.mark.parametrize("receiver", [r for _, r, _ in IMPLEMENTATIONS])
def test_what_the_mirror_does_not_know_is_left_for_the_core_in_order(
    receiver: Any, sockets: dict[str, socket.socket]
) -> None:
    """From the first datagram the mirror cannot route, the rest of the batch is the core's:
    it may change the routes (a Refresh to 0), so nothing after it is relayed ahead of it."""
    listen, allocation, client, peer = (
        sockets[n] for n in ("listen", "allocation", "client", "peer")
    )
    rx = receiver(8, 2052, 4)
    rx.set_to_peer(client.getsockname(), 0x4000, allocation.fileno(), peer.getsockname())
    stats = Counted()
    stun_like = b"\x00\x01\x00\x00" + b"\0" * 16
    for data in (
        _channel_data(0x4000, b"first"),
        stun_like,
        _channel_data(0x4000, b"after the STUN message"),
        _channel_data(0x4001, b"unknown channel"),
    ):
        client.sendto(data, listen.getsockname())
    n, k = rx.relay_clients(listen, stats)
    assert n == 4
    routed = 1 if receiver in COMPILED else 0  # the fallback routes nothing
    assert k == routed
    assert [p for p, _ in _arrived(peer)] == [b"first"][:routed]
    assert stats.relayed_packets_userspace == routed
    assert [rx.lens[i] for i in range(k, n)] == [5 + 4, 20, 22 + 4, 15 + 4][k:]
    assert rx.addrs[k:n] == [client.getsockname()] * (n - k)
    assert bytes(rx.views[1][: rx.lens[1]]) == stun_like

    peer.sendto(b"no channel", allocation.getsockname())
    port = allocation.getsockname()[1]
    assert rx.relay_peers(allocation, port, stats) == (1, 0)
    assert bytes(rx.views[0][: rx.lens[0]]) == b"no channel"
    assert rx.addrs[0] == peer.getsockname()


@needs_compiled
def test_dropped_routes_go_to_the_core(sockets: dict[str, socket.socket]) -> None:
    listen, allocation, client, peer = (
        sockets[n] for n in ("listen", "allocation", "client", "peer")
    )
    rx = COMPILED[0](8, 2052, 4)
    port = allocation.getsockname()[1]
    stats = Counted()
    for channel in range(0x4000, 0x4100):  # enough entries to grow and shift the table
        rx.set_to_peer(client.getsockname(), channel, allocation.fileno(), peer.getsockname())
    assert rx.set_to_client(port, peer.getsockname(), listen.fileno(), client.getsockname(), 1)
    assert rx.routes == (256, 1)
    rx.drop_to_peer(client.getsockname(), 0x4000)
    rx.drop_to_peer(client.getsockname(), 0x4000)  # twice: nothing to drop the second time
    client.sendto(_channel_data(0x4000, b"deleted"), listen.getsockname())
    client.sendto(_channel_data(0x40FF, b"still bound"), listen.getsockname())
    assert rx.relay_clients(listen, stats) == (2, 0)
    assert _arrived(peer) == []
    client.sendto(_channel_data(0x40FF, b"still bound"), listen.getsockname())
    assert rx.relay_clients(listen, stats) == (1, 1)
    assert [p for p, _ in _arrived(peer)] == [b"still bound"]

    # the allocation socket is closing: every route through it goes
    assert rx.drop_fd(allocation.fileno()) == 255
    assert rx.routes == (0, 1)
    rx.drop_to_client(port, peer.getsockname())
    assert rx.routes == (0, 0)
    peer.sendto(b"x", allocation.getsockname())
    assert rx.relay_peers(allocation, port, stats) == (1, 0)
    # an address no socket can send to is not installed
    assert not rx.set_to_peer(client.getsockname(), 0x4000, allocation.fileno(), ("nowhere", 1))
    assert rx.routes == (0, 0)


# -- the mirror behind the data plane, with the real core --------------------------------------


class InProcessRelay:
    """The data plane and the core over real loopback sockets, with a plain command drain in
    place of the actors (what the daemon's pipeline does, on one thread)."""

    def __init__(self) -> None:
        from firezone_relay.actors.dataplane import DataPlane
        from firezone_relay.actors.sockets import bind_udp
        from firezone_relay.protocol.server import Server, ServerConfig
        from firezone_relay.protocol.types import Family
        from tests.system.conftest import port_range

        self._bind = bind_udp
        self.listen = bind_udp(Family.V4, "127.0.0.1", 0)
        low, high = port_range(40)
        config = ServerConfig(
            public_ip4="127.0.0.1",
            listen_port=self.listen.getsockname()[1],
            lowest_port=low,
            highest_port=high,
            allow_loopback_peers=True,
        )
        self.server = Server(config, random.Random(7), "secret")
        self.dataplane = DataPlane(self.server, self.drain)
        self.dataplane.add_listen_socket(Family.V4, self.listen)
        self.core_calls = 0
        client_input = self.server.client_input

        def counted(*entry: Any) -> Any:  # the data plane's entry into the core, counted
            handle = client_input(*entry).handle

            def count(*args: Any) -> Any:
                self.core_calls += 1
                return handle(*args)

            return types.SimpleNamespace(handle=count)

        self.server.client_input = counted  # type: ignore[method-assign]

    def drain(self) -> None:
        from firezone_relay.protocol.commands import CreateAllocation, FreeAllocation, SendMessage

        dataplane = self.dataplane
        sockets = dataplane.allocation_sockets
        while (command := self.server.next_command()) is not None:
            if isinstance(command, SendMessage):
                self.dataplane.send_message(command)
            elif isinstance(command, CreateAllocation):
                sock = self._bind(command.family, "127.0.0.1", command.port)
                dataplane.add_peer_socket(command.port, command.family, sock)
            elif isinstance(command, FreeAllocation):
                sock = sockets[(command.port, int(command.family))]
                dataplane.close_peer_socket(command.port, command.family, sock)
            else:
                self.dataplane.sync_channel(command)

    def from_client(self, client: socket.socket, data: bytes) -> None:
        client.sendto(data, self.listen.getsockname())
        self.dataplane.on_listen_readable(self.listen)

    def close(self) -> None:
        for sock in [self.listen, *self.dataplane.allocation_sockets.values()]:
            sock.close()


def test_the_data_plane_mirrors_the_cores_channels_until_they_expire(
    sockets: dict[str, socket.socket],
) -> None:
    from firezone_relay.protocol.auth import firezone_password
    from firezone_relay.protocol.stun import Attr, Class, parse
    from firezone_relay.protocol.types import Family
    from simulations.turn_client import TurnClient

    client, peer = sockets["client"], sockets["peer"]
    client.settimeout(2)
    relay = InProcessRelay()
    try:
        expiry = int(time.time()) + 3600
        turn = TurnClient(f"{expiry}:alice", firezone_password("secret", expiry, "alice"))

        def request(data: bytes) -> Any:
            relay.from_client(client, data)
            return parse(client.recv(2048))

        turn.learn(request(turn.allocate()))
        allocated = request(turn.allocate())
        assert allocated.cls == Class.SUCCESS
        port = allocated.get(Attr.XOR_RELAYED_ADDRESS)[1]
        assert relay.dataplane.mirrored_routes == (0, 0)
        bound = request(turn.channel_bind(0x4000, peer.getsockname()))
        assert bound.cls == Class.SUCCESS
        assert relay.dataplane.mirrored_routes == (1, 1)

        # bound: relayed by the mirror, counted as the core counts, without entering the core
        stats = relay.server.stats
        calls = relay.core_calls
        relay.from_client(client, _channel_data(0x4000, b"to the peer"))
        assert relay.core_calls == calls
        assert [p for p, _ in _arrived(peer)] == [b"to the peer"]
        assert (stats.relayed_packets_userspace, stats.relayed_bytes_userspace) == (1, 11)
        assert stats.packet_size_buckets[0] == 1

        allocation = relay.dataplane.allocation_sockets[(port, int(Family.V4))]
        peer.sendto(b"to the client", allocation.getsockname())
        relay.dataplane.on_peer_readable(allocation, port)
        assert client.recv(2048) == _channel_data(0x4000, b"to the client")
        assert (stats.relayed_packets_userspace, stats.relayed_bytes_userspace) == (2, 24)

        # an unknown channel goes to the core, which finds no route
        relay.from_client(client, _channel_data(0x4001, b"unbound"))
        assert relay.core_calls == calls + 1 and stats.unroutable_datagrams == 1

        # the channel expires on the core's timer: the mirror lets go, the core drops
        relay.server.handle_timeout(time.monotonic() + 700)
        relay.drain()
        assert relay.dataplane.mirrored_routes == (0, 0)
        relay.from_client(client, _channel_data(0x4000, b"late"))
        assert relay.core_calls == calls + 2 and stats.unroutable_datagrams == 2
        assert _arrived(peer) == []
        assert stats.relayed_packets_userspace == 2
    finally:
        relay.close()


@needs_compiled
def test_the_mirror_table_agrees_with_a_dict_through_adds_drops_and_closes(
    sockets: dict[str, socket.socket],
) -> None:
    """The mirror's open addressing (growth, backward-shift deletion, removal by socket) against
    a plain dict: after a seeded mix of operations, exactly the dict's channels are relayed."""
    listen, allocation, client, peer = (
        sockets[n] for n in ("listen", "allocation", "client", "peer")
    )
    other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    other.bind(("127.0.0.1", 0))
    rx = COMPILED[0](8, 2052, 4)
    rng = random.Random(5769)
    model: dict[int, socket.socket] = {}
    me = client.getsockname()
    try:
        for _ in range(3000):
            channel = 0x4000 + rng.randrange(600)
            action = rng.random()
            if action < 0.55:
                out = allocation if rng.random() < 0.5 else other
                assert rx.set_to_peer(me, channel, out.fileno(), peer.getsockname())
                model[channel] = out
            elif action < 0.995:
                rx.drop_to_peer(me, channel)
                model.pop(channel, None)
            else:
                gone = other if rng.random() < 0.5 else allocation
                removed = rx.drop_fd(gone.fileno())
                assert removed == sum(1 for s in model.values() if s is gone)
                model = {c: s for c, s in model.items() if s is not gone}
            assert rx.routes == (len(model), 0)
        stats = Counted()
        for channel in range(0x4000, 0x4000 + 600):
            client.sendto(_channel_data(channel, b"x"), listen.getsockname())
            n, k = rx.relay_clients(listen, stats)
            assert (n, k) == (1, 1 if channel in model else 0), hex(channel)
        assert stats.relayed_packets_userspace == len(model)
    finally:
        other.close()


@needs_compiled
@pytest.mark.parametrize("gso", [True, False])
def test_a_run_to_one_client_arrives_as_separate_datagrams_in_order(
    gso: bool, sockets: dict[str, socket.socket]
) -> None:
    """Peer traffic for one client leaves as one UDP GSO send where the kernel takes it; the
    client sees the same datagrams either way, then a datagram of another size after them."""
    listen, allocation, client, peer = (
        sockets[n] for n in ("listen", "allocation", "client", "peer")
    )
    rx = COMPILED[0](64, 2052, 4)
    rx.gso = gso
    port = allocation.getsockname()[1]
    rx.set_to_client(port, peer.getsockname(), listen.fileno(), client.getsockname(), 0x4002)
    payloads = [bytes([i]) * 100 for i in range(40)] + [b"short"]
    for payload in payloads:
        peer.sendto(payload, allocation.getsockname())
    stats = Counted()
    assert rx.relay_peers(allocation, port, stats) == (41, 41)
    assert _arrived(client) == [(_channel_data(0x4002, p), listen.getsockname()) for p in payloads]
    assert (stats.relayed_packets_userspace, stats.relayed_bytes_userspace) == (41, 4005)
    if gso:
        assert rx.gso_sends == 1 or not rx.gso  # off only where the kernel refused it
    else:
        assert rx.gso_sends == 0


@needs_compiled
def test_debug_routes_lists_every_mirrored_route_as_plain_tuples(
    sockets: dict[str, socket.socket],
) -> None:
    """The soak's debug read: exactly the routes installed, sorted, as plain tuples."""
    listen, allocation, client, peer = (
        sockets[n] for n in ("listen", "allocation", "client", "peer")
    )
    rx = COMPILED[0](8, 2052, 4)
    assert rx.debug_routes() == []
    port = allocation.getsockname()[1]
    me, them = client.getsockname(), peer.getsockname()
    assert rx.set_to_peer(me, 0x4001, allocation.fileno(), them)
    assert rx.set_to_peer(me, 0x4000, allocation.fileno(), them)
    assert rx.set_to_client(port, ("::1", 7), listen.fileno(), me, 0x4000)
    assert rx.debug_routes() == [
        ("to_client", port, ("::1", 7), listen.fileno(), me, 0x4000),
        ("to_peer", me, 0x4000, allocation.fileno(), them),
        ("to_peer", me, 0x4001, allocation.fileno(), them),
    ]
    rx.drop_to_peer(me, 0x4001)
    rx.drop_to_client(port, ("::1", 7))
    assert rx.debug_routes() == [("to_peer", me, 0x4000, allocation.fileno(), them)]


@needs_compiled
def test_each_route_counts_into_its_allocations_counters_and_lets_go_of_them(
    sockets: dict[str, socket.socket],
) -> None:
    from array import array

    listen, allocation, client, peer = (
        sockets[n] for n in ("listen", "allocation", "client", "peer")
    )
    rx = COMPILED[0](8, 65540, 4)
    port = allocation.getsockname()[1]
    counters = array("Q", bytes(32))
    view = memoryview(counters)
    assert rx.set_to_peer(client.getsockname(), 0x4000, allocation.fileno(), peer.getsockname(),
                          -1, view[0:2])  # fmt: skip
    assert rx.set_to_client(port, peer.getsockname(), listen.fileno(), client.getsockname(),
                            0x4000, -1, view[2:4])  # fmt: skip
    del view
    client.sendto(_channel_data(0x4000, b"a" * 10), listen.getsockname())
    client.sendto(_channel_data(0x4000, b"b" * 20, padding=3), listen.getsockname())
    assert rx.relay_clients(listen, Counted()) == (2, 2)
    peer.sendto(b"c" * 7, allocation.getsockname())
    assert rx.relay_peers(allocation, port, Counted()) == (1, 1)
    assert list(counters) == [2, 30, 1, 7]
    with pytest.raises(BufferError):  # the mirror holds the counters: they cannot move
        counters.append(0)
    for bad in (bytearray(16), array("q", bytes(16)), array("Q", bytes(8)), b"\0" * 16):
        with pytest.raises((TypeError, BufferError)):
            rx.set_to_peer(client.getsockname(), 0x4001, allocation.fileno(), peer.getsockname(),
                           -1, memoryview(bad))  # fmt: skip
    rx.drop_to_peer(client.getsockname(), 0x4000)
    rx.drop_fd(listen.fileno())  # the peer -> client route leaves with its socket
    assert rx.routes == (0, 0)
    counters.append(0)  # let go of
    assert len(counters) == 5
