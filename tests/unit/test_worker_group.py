"""Cores of one relay's workers, side by side in one test: nonces valid on every worker, the
unauthenticated rate limit held by the relay as a whole, and the relay loop between
allocations of different workers (``ForwardToWorker`` / ``Server.handle_forwarded``)."""

from __future__ import annotations

import itertools
import random

import pytest

from firezone_relay.protocol.commands import ForwardToWorker, SendMessage
from firezone_relay.protocol.ports import PortShares
from firezone_relay.protocol.ratelimit import RateLimiter
from firezone_relay.protocol.routes import ToClient
from firezone_relay.protocol.server import Server, ServerConfig
from firezone_relay.protocol.stun import Attr, Method
from firezone_relay.protocol.types import Addr
from simulations import channel_data
from simulations.turn_client import TurnClient
from tests.unit.harness import CLIENT, NOW, PEER, PUBLIC4, error_code, five_tuple, is_success
from tests.unit.relay_group import NONCE_KEY, SECRET, Forwarded, Group

CLIENT_B = ("198.51.200.7", 50000)


# --- port shares ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lowest", "highest", "workers"),
    [(49152, 65535, 1), (49152, 65535, 2), (49152, 65535, 3), (10, 20, 11), (1024, 1030, 4)],
)
def test_port_shares_are_contiguous_disjoint_and_cover_the_range(
    lowest: int, highest: int, workers: int
) -> None:
    shares = PortShares(lowest, highest, workers)
    slices = [shares.of(i) for i in range(workers)]
    assert slices[0][0] == lowest and slices[-1][1] == highest
    assert all(a[1] + 1 == b[0] for a, b in itertools.pairwise(slices))
    sizes = {last - first + 1 for first, last in slices}
    assert max(sizes) - min(sizes) <= 1
    for port in range(lowest - 1, highest + 2, max(1, (highest - lowest) // 500)):
        owner = shares.owner(port)
        if lowest <= port <= highest:
            assert owner is not None and slices[owner][0] <= port <= slices[owner][1]
        else:
            assert owner is None


def test_more_workers_than_ports_is_refused() -> None:
    with pytest.raises(ValueError, match="3 workers cannot share 2 ports"):
        ServerConfig(public_ip4=PUBLIC4, lowest_port=5000, highest_port=5001, workers=3)
    with pytest.raises(ValueError, match="worker 2 of 2"):
        ServerConfig(public_ip4=PUBLIC4, workers=2, worker=2)


# --- 2. nonces valid on every worker ----------------------------------------------------------


def test_a_nonce_from_one_worker_is_valid_on_another_with_the_same_key() -> None:
    group = Group()
    client = group.client()
    challenge = group.send(0, client.allocate(transport=0), CLIENT).response
    client.learn(challenge)
    # the same 5-tuple reaches worker 1 now (a restart moved it): the nonce still holds
    out = group.allocate(1, client, CLIENT)
    assert is_success(out.response) and client.verify(out.response)
    assert group.servers[1].num_allocations == 1


def test_a_nonce_under_another_key_is_stale() -> None:
    config = ServerConfig(public_ip4=PUBLIC4)
    one = Server(config, random.Random(1), SECRET, nonce_key=NONCE_KEY)
    two = Server(config, random.Random(2), SECRET, nonce_key=bytes(32))
    client = five_tuple(CLIENT)
    nonce = one._auth.nonces.issue(client, NOW)
    assert two._auth.nonces.validate(nonce, client, NOW) == "stale"
    same = Server(config, random.Random(3), SECRET, nonce_key=NONCE_KEY)
    assert same._auth.nonces.validate(nonce, client, NOW) == "ok"


# --- 3. the unauthenticated rate limit across workers -----------------------------------------


def test_each_worker_answers_its_share_of_the_unauthenticated_rate() -> None:
    limiter = RateLimiter.for_workers(10.0, 4)
    assert (limiter.rate, limiter.burst) == (2.5, 5.0)
    assert RateLimiter.for_workers(1.0, 4).burst == 1.0  # at least one token each


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_a_spoofed_source_gets_the_relay_wide_rate_whatever_worker_it_reaches(
    workers: int,
) -> None:
    """A reflection attack from one source address over many ports: the kernel spreads its
    5-tuples over the workers; the relay as a whole answers at most ``rate`` a second plus
    a burst of ``max(2 * rate, workers)``, and no fewer than ``rate`` a second."""
    rate, seconds, per_second = 10.0, 20, 400
    group = Group(workers=workers, unauthenticated_rate_limit=rate)
    binding = group.client().binding()
    answered = 0
    rng = random.Random(7)
    for tick in range(seconds * per_second):
        group.now = NOW + tick / per_second
        port = rng.randrange(1024, 65536)
        worker = hash((port, 17)) % workers  # any spread the steering makes
        answered += len(group.send(worker, binding, ("203.0.113.9", port)).events)
    assert rate * seconds <= answered <= rate * seconds + max(2 * rate, workers)


def test_a_source_pinned_to_one_worker_gets_that_workers_share() -> None:
    rate, seconds = 10.0, 20
    group = Group(workers=2, unauthenticated_rate_limit=rate)
    binding = group.client().binding()
    answered = 0
    for tick in range(seconds * 100):
        group.now = NOW + tick / 100
        answered += len(group.send(0, binding, ("203.0.113.9", 5000)).events)
    assert answered == pytest.approx(rate / 2 * seconds + rate, abs=2)


# --- 4. the relay loop across workers ---------------------------------------------------------


def _across(group: Group) -> tuple[TurnClient, TurnClient, int, int]:
    """Client A on worker 0 and client B on worker 1, each with an allocation."""
    a, b = group.client("client-a"), group.client("gateway-b")
    port_a = group.port_of(group.allocate(0, a, CLIENT))
    port_b = group.port_of(group.allocate(1, b, CLIENT_B))
    shares = group.servers[0].config.port_shares
    assert (shares.owner(port_a), shares.owner(port_b)) == (0, 1)
    return a, b, port_a, port_b


def _forwards(group: Group, worker: int, data: bytes, sender: Addr) -> list[ForwardToWorker]:
    """What ``worker``'s core emits for ``data``, without delivering it."""
    group.servers[worker].handle_client_input(data, five_tuple(sender), group.now)
    commands = list(iter(group.servers[worker].next_command, None))
    assert all(isinstance(c, ForwardToWorker) for c in commands)
    return commands  # type: ignore[return-value]


def test_channel_to_channel_across_workers_both_ways() -> None:
    group = Group()
    a, b, port_a, port_b = _across(group)
    assert is_success(group.send(0, a.channel_bind(0x4000, (PUBLIC4, port_b)), CLIENT).response)
    assert is_success(group.send(1, b.channel_bind(0x4ABC, (PUBLIC4, port_a)), CLIENT_B).response)
    (forward,) = _forwards(group, 0, channel_data.encode(0x4000, b"through the loop"), CLIENT)
    assert forward == ForwardToWorker(1, (PUBLIC4, port_a), (PUBLIC4, port_b), b"through the loop")
    out = group.send(0, channel_data.encode(0x4000, b"through the loop"), CLIENT)
    assert out.relay is None
    assert out.events == [
        (1, Forwarded(ToClient(five_tuple(CLIENT_B), 0x4ABC), b"through the loop"))
    ]
    back = group.send(1, channel_data.encode(0x4ABC, b"and back"), CLIENT_B)
    assert back.events == [(0, Forwarded(ToClient(five_tuple(CLIENT), 0x4000), b"and back"))]
    # counted once, by the worker that delivers
    assert [s.stats.relayed_packets_userspace for s in group.servers] == [1, 1]
    # A's counters: two datagrams out (one of them never delivered above), one in
    allocation = group.servers[0].allocation_on(port_a)
    assert allocation is not None and allocation.traffic() == (2, 32, 1, 8)
    group.check_invariants()


def test_padded_channel_data_across_workers_forwards_the_payload_only() -> None:
    group = Group()
    a, b, port_a, port_b = _across(group)
    group.send(0, a.channel_bind(0x4000, (PUBLIC4, port_b)), CLIENT)
    group.send(1, b.channel_bind(0x4001, (PUBLIC4, port_a)), CLIENT_B)
    padded = channel_data.encode(0x4000, b"abc") + b"\x00"
    (forward,) = _forwards(group, 0, padded, CLIENT)
    assert forward.payload == b"abc"


def test_channel_to_permission_across_workers_becomes_a_data_indication() -> None:
    group = Group()
    a, b, port_a, port_b = _across(group)
    group.send(0, a.channel_bind(0x4000, (PUBLIC4, port_b)), CLIENT)
    # no permission on B for A's relayed address yet: dropped by worker 1
    assert group.send(0, channel_data.encode(0x4000, b"x"), CLIENT).events == []
    assert group.servers[1].stats.unroutable_datagrams == 1
    group.send(1, b.create_permission((PUBLIC4, 1)), CLIENT_B)
    out = group.send(0, channel_data.encode(0x4000, b"hello b"), CLIENT)
    ((worker, indication),) = out.events
    assert worker == 1 and isinstance(indication, SendMessage)
    assert indication.recipient == five_tuple(CLIENT_B)
    (message,) = out.messages(1)
    assert message.method == Method.DATA
    assert message.get(Attr.XOR_PEER_ADDRESS) == (PUBLIC4, port_a)
    assert message.get(Attr.DATA) == b"hello b"


def test_send_indications_across_workers_both_ways() -> None:
    group = Group()
    a, b, port_a, port_b = _across(group)
    group.send(0, a.create_permission((PUBLIC4, 1)), CLIENT)
    group.send(1, b.create_permission((PUBLIC4, 1)), CLIENT_B)
    (forward,) = _forwards(group, 1, b.send_indication((PUBLIC4, port_a), b"hi a"), CLIENT_B)
    assert forward == ForwardToWorker(0, (PUBLIC4, port_b), (PUBLIC4, port_a), b"hi a")
    out = group.send(1, b.send_indication((PUBLIC4, port_a), b"hi a"), CLIENT_B)
    (message,) = out.messages(0)
    assert message.method == Method.DATA and message.get(Attr.DATA) == b"hi a"
    assert message.get(Attr.XOR_PEER_ADDRESS) == (PUBLIC4, port_b)
    out = group.send(0, a.send_indication((PUBLIC4, port_b), b"hi b"), CLIENT)
    (message,) = out.messages(1)
    assert message.get(Attr.DATA) == b"hi b"
    assert message.get(Attr.XOR_PEER_ADDRESS) == (PUBLIC4, port_a)
    # and to a channel: B binds A's relayed address, A's Send arrives as ChannelData
    group.send(1, b.channel_bind(0x4002, (PUBLIC4, port_a)), CLIENT_B)
    out = group.send(0, a.send_indication((PUBLIC4, port_b), b"to the channel"), CLIENT)
    assert out.events == [(1, Forwarded(ToClient(five_tuple(CLIENT_B), 0x4002), b"to the channel"))]
    group.check_invariants()


def test_another_workers_port_without_an_allocation_is_dropped_there() -> None:
    group = Group()
    a = group.client("client-a")
    group.allocate(0, a, CLIENT)
    first, _ = group.servers[1].config.port_share
    empty = (PUBLIC4, first + 5)
    # the bind is accepted (the port is worker 1's to judge) ...
    assert is_success(group.send(0, a.channel_bind(0x4000, empty), CLIENT).response)
    # ... and worker 1 drops what comes: no allocation there, never a local socket
    assert group.send(0, channel_data.encode(0x4000, b"x"), CLIENT).events == []
    assert group.servers[1].stats.unroutable_datagrams == 1
    group.send(0, a.create_permission(empty), CLIENT)
    assert group.send(0, a.send_indication(empty, b"y"), CLIENT).events == []
    assert group.servers[1].stats.unroutable_datagrams == 2
    # this worker's own empty port is still refused at once
    own_first, _ = group.servers[0].config.port_share
    out = group.send(0, a.channel_bind(0x4001, (PUBLIC4, own_first + 5)), CLIENT)
    assert error_code(out.response) == 403


def test_a_single_worker_never_forwards() -> None:
    group = Group(workers=1)
    a, b = group.client("client-a"), group.client("gateway-b")
    port_a = group.port_of(group.allocate(0, a, CLIENT))
    port_b = group.port_of(group.allocate(0, b, CLIENT_B))
    group.send(0, a.channel_bind(0x4000, (PUBLIC4, port_b)), CLIENT)
    group.send(0, b.create_permission((PUBLIC4, 1)), CLIENT_B)
    out = group.send(0, channel_data.encode(0x4000, b"x"), CLIENT)
    assert not any(isinstance(e, Forwarded) for _, e in out.events)
    assert group.servers[0].handle_forwarded((PUBLIC4, port_a), port_b, b"x", NOW) is None
    assert not group.requests  # and asks no registry


@pytest.mark.parametrize(
    ("source", "to_port"),
    [
        (("52.0.0.2", 50000), None),  # not our address
        ((PUBLIC4, 60000), None),  # our own share: never forwarded to us
        ((PUBLIC4, 1000), None),  # outside the range
        ((PUBLIC4, 50000), 50001),  # to another worker's share
    ],
)
def test_forwarded_datagrams_are_checked_like_any_input(source: Addr, to_port: int | None) -> None:
    group = Group()
    b = group.client("gateway-b")
    port_b = group.port_of(group.allocate(1, b, CLIENT_B))
    group.send(1, b.create_permission((source[0], 1)), CLIENT_B)
    server = group.servers[1]
    target = port_b if to_port is None else to_port
    assert server.handle_forwarded(source, target, b"x", group.now) is None
    assert server.next_command() is None
    assert server.stats.unroutable_datagrams == 1
    assert server.handle_forwarded((PUBLIC4, 50000), port_b, bytes(70_000), group.now) is None


def test_forwarding_respects_the_allocation_rate_limit() -> None:
    group = Group(allocation_rate_limit=100_000.0)
    a, b, port_a, port_b = _across(group)
    group.send(0, a.channel_bind(0x4000, (PUBLIC4, port_b)), CLIENT)
    group.send(1, b.channel_bind(0x4001, (PUBLIC4, port_a)), CLIENT_B)
    big = channel_data.encode(0x4000, bytes(60_000))
    sent = sum(len(_forwards(group, 0, big, CLIENT)) for _ in range(4))
    assert sent == 1  # the bucket holds 65,535 bytes
    assert group.servers[0].stats.allocation_rate_limited == 3


def test_peer_data_on_a_worker_is_unchanged() -> None:
    group = Group()
    b = group.client("gateway-b")
    port_b = group.port_of(group.allocate(1, b, CLIENT_B))
    group.send(1, b.channel_bind(0x4000, PEER), CLIENT_B)
    out = group.peer(1, b"from the peer", PEER, port_b)
    assert out.relay == ToClient(five_tuple(CLIENT_B), 0x4000)
