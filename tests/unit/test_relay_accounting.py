"""relay.packet.size agrees with the packet and byte counters on every userspace relaying path:
ChannelData both ways, Send and Data indications, and the relay loop (in place, out to a local
port, and into an allocation as a Data indication)."""

from __future__ import annotations

import pytest

from firezone_relay.protocol.stats import Stats, size_bucket
from simulations import channel_data
from tests.unit.harness import PEER, Harness, five_tuple, is_success

CLIENT_B = ("198.51.200.7", 50000)


def assert_consistent(stats: Stats, packets: int, payload_bytes: int) -> None:
    assert stats.relayed_packets_userspace == packets
    assert stats.relayed_bytes_userspace == payload_bytes
    assert sum(stats.packet_size_buckets) == packets


@pytest.mark.parametrize(
    ("length", "bucket"), [(0, 0), (99, 0), (100, 1), (1499, 14), (1500, 15), (65_000, 15)]
)
def test_size_buckets_are_100_bytes_wide_with_an_open_last_one(length: int, bucket: int) -> None:
    assert size_bucket(length) == bucket


def test_channel_data_both_ways_and_indications_are_all_counted() -> None:
    h = Harness()
    client = h.client()
    port = h.allocate(client).others[0].port  # type: ignore[union-attr]
    assert is_success(h.send(client.channel_bind(0x4000, PEER)).response)
    assert h.send(channel_data.encode(0x4000, b"a" * 150)).relay is not None
    assert h.peer(b"b" * 250, PEER, port).route is not None  # type: ignore[attr-defined]
    assert h.send(client.send_indication(PEER, b"c" * 1600)).relay is not None
    assert h.peer(b"d" * 40, ("8.8.4.4", 6000), port).messages  # a Data indication
    stats = h.server.stats
    assert_consistent(stats, 4, 150 + 250 + 1600 + 40)
    assert [stats.packet_size_buckets[i] for i in (0, 1, 2, 15)] == [1, 1, 1, 1]


def test_every_relay_loop_path_is_counted() -> None:
    h = Harness(public_ip4="127.0.0.1", public_ip6=None, allow_loopback_peers=True)
    a, b = h.client("client-a"), h.client("gateway-b")
    port_a = h.allocate(a).others[0].port  # type: ignore[union-attr]
    port_b = h.allocate(b, CLIENT_B).others[0].port  # type: ignore[union-attr]
    own = "127.0.0.1"
    assert is_success(h.send(a.channel_bind(0x4000, (own, port_b))).response)
    # B has only a permission: A's ChannelData reaches B as a Data indication
    h.send(b.create_permission((own, 1)), CLIENT_B)
    assert h.send(channel_data.encode(0x4000, b"x" * 120)).messages
    # B binds a channel back: in place, both ways
    assert is_success(h.send(b.channel_bind(0x4ABC, (own, port_a)), CLIENT_B).response)
    assert h.send(channel_data.encode(0x4000, b"y" * 220)).relay == (
        five_tuple(CLIENT_B),
        0x4ABC,
        220,
    )
    # a port of the range with no allocation may be another local socket: refused, never sent
    spare = next(p for p in (port_b + 1, port_b - 1) if p not in (port_a, port_b))
    assert not is_success(h.send(a.channel_bind(0x4001, (own, spare))).response)
    assert h.send(channel_data.encode(0x4001, b"z" * 320)).relay is None
    assert_consistent(h.server.stats, 2, 120 + 220)
