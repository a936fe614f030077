"""Byte layouts shared with xdp/turn_router.c: map keys and values, config, counters.

Kept as explicit ``struct`` formats (not bcc's generated ctypes classes) because the C side
stores addresses as raw 16 bytes (IPv4 as ::ffff:a.b.c.d) and ports in network byte order.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field

from firezone_relay.protocol.types import Addr

#: Counter slots of ``struct relay_stats`` (order matters).
PATHS = ("channel_to_udp", "udp_to_channel", "channel_to_channel")
PASS_REASONS = (
    "disabled",
    "not_ip",
    "not_udp",
    "ip_options",
    "fragment",
    "malformed",
    "dns",
    "not_turn_port",
    "not_channel_data",
    "bad_length",
    "no_entry",
    "checksum",
    "no_source_addr",
    "mtu",
    "adjust_failed",
    "reserved",
)
NUM_SIZE_BUCKETS = 16
NUM_NS_BUCKETS = 16
_STATS_WORDS = 2 * len(PATHS) + len(PASS_REASONS) + NUM_SIZE_BUCKETS + 2 + NUM_NS_BUCKETS + 1
STATS_SIZE = 8 * _STATS_WORDS

KEY_SIZE = 20
#: ``port_counts``: (datagrams, payload bytes) per allocation port, client -> peer in slot
#: ``port``, peer -> client in slot ``PORT_IN + port``
PORT_IN = 65536
PORT_COUNTS_SIZE = 2 * PORT_IN * 16
CONFIG_FORMAT = "=16s16s16s16sHHHBB"
CONFIG_SIZE = struct.calcsize(CONFIG_FORMAT)


def addr16(host: str | None) -> bytes:
    """16 raw bytes of an IP address; IPv4 as IPv4-mapped IPv6; None as all zeros (unset)."""
    if not host:
        return bytes(16)
    ip = ipaddress.ip_address(host)
    if ip.version == 4:
        return b"\x00" * 10 + b"\xff\xff" + ip.packed
    return ip.packed


def chan_key(client: Addr, channel: int) -> bytes:
    """``struct chan_key``: (client address, client port, channel)."""
    return addr16(client[0]) + struct.pack("!HH", client[1], channel)


def peer_key(peer: Addr, allocation_port: int) -> bytes:
    """``struct peer_key``: (peer address, allocation port, peer port)."""
    return addr16(peer[0]) + struct.pack("!HH", allocation_port, peer[1])


def binding_entries(
    client: Addr, channel: int, peer: Addr, allocation_port: int
) -> tuple[tuple[bytes, bytes], tuple[bytes, bytes]]:
    """The two map entries of one channel binding: chan_to_peer and peer_to_chan (key, value)."""
    ck = chan_key(client, channel)
    pk = peer_key(peer, allocation_port)
    return (ck, pk), (pk, ck)


@dataclass(frozen=True, slots=True)
class RouterConfig:
    """What the program needs to know about the relay (``struct relay_config``)."""

    listen_port: int = 3478
    lowest_port: int = 49152
    highest_port: int = 65535
    public_ip4: str | None = None
    public_ip6: str | None = None
    interface_ip4: str | None = None
    interface_ip6: str | None = None
    ttl: int = 64

    def __post_init__(self) -> None:
        if not (0 < self.lowest_port <= self.highest_port <= 65535):
            raise ValueError(f"bad allocation port range {self.lowest_port}-{self.highest_port}")
        if not 0 < self.listen_port <= 65535:
            raise ValueError(f"bad listen port {self.listen_port}")
        if self.lowest_port <= self.listen_port <= self.highest_port:
            raise ValueError("the listen port lies inside the allocation port range")
        if not 1 <= self.ttl <= 255:
            raise ValueError(f"bad ttl {self.ttl}")
        for host, version in (
            (self.public_ip4, 4),
            (self.interface_ip4, 4),
            (self.public_ip6, 6),
            (self.interface_ip6, 6),
        ):
            if host is not None and ipaddress.ip_address(host).version != version:
                raise ValueError(f"{host} is not an IPv{version} address")

    def pack(self) -> bytes:
        return struct.pack(
            CONFIG_FORMAT,
            addr16(self.public_ip4),
            addr16(self.public_ip6),
            addr16(self.interface_ip4),
            addr16(self.interface_ip6),
            self.listen_port,
            self.lowest_port,
            self.highest_port,
            self.ttl,
            1,
        )


@dataclass(frozen=True, slots=True)
class XdpCounters:
    """Kernel counters summed over CPUs; plain numbers for the telemetry module.

    ``packets`` / ``payload_bytes`` are keyed by path (``PATHS``) and count relayed packets and
    their application data (ChannelData payload); ``passed`` counts XDP_PASS by reason
    (``PASS_REASONS``).
    ``packet_size_buckets`` use the userspace buckets (payload bytes, [100*i, 100*(i+1)), last
    >= 1500). Processing time is sampled (one packet in ``TIMING_SAMPLE``, default 256, of the
    candidate TURN packets: UDP to the listen port or the allocation range; recorded when the
    sample is relayed): ``processing_count`` is the number of samples,
    ``processing_ns_buckets[i]`` counts samples that took [2^(i-1), 2^i) ns (bucket 0: 0 ns;
    the last bucket is open-ended). ``packets_seen`` counts the candidate packets.
    """

    packets: dict[str, int] = field(default_factory=dict)
    payload_bytes: dict[str, int] = field(default_factory=dict)
    passed: dict[str, int] = field(default_factory=dict)
    packet_size_buckets: tuple[int, ...] = (0,) * NUM_SIZE_BUCKETS
    processing_ns_total: int = 0
    processing_count: int = 0
    processing_ns_buckets: tuple[int, ...] = (0,) * NUM_NS_BUCKETS
    packets_seen: int = 0

    @property
    def relayed_packets(self) -> int:
        return sum(self.packets.values())

    @property
    def relayed_bytes(self) -> int:
        return sum(self.payload_bytes.values())

    @staticmethod
    def from_percpu(raw: bytes, ncpus: int) -> XdpCounters:
        stride = (STATS_SIZE + 7) & ~7
        total = [0] * _STATS_WORDS
        for cpu in range(ncpus):
            words = struct.unpack_from(f"={_STATS_WORDS}Q", raw, cpu * stride)
            total = [a + b for a, b in zip(total, words, strict=True)]
        it = iter(total)
        packets = {p: next(it) for p in PATHS}
        nbytes = {p: next(it) for p in PATHS}
        passed = {r: next(it) for r in PASS_REASONS}
        sizes = tuple(next(it) for _ in range(NUM_SIZE_BUCKETS))
        ns_total = next(it)
        ns_count = next(it)
        ns_buckets = tuple(next(it) for _ in range(NUM_NS_BUCKETS))
        seen = next(it)
        return XdpCounters(packets, nbytes, passed, sizes, ns_total, ns_count, ns_buckets, seen)
