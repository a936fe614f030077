"""The per-datagram entry point of one listen socket: ChannelData on a bound channel.

The I/O layer holds one ``ClientInput`` per listen socket (``Server.client_input``) and
gives it each datagram with the sender's address. A 5-tuple is a nested tuple: building one
per datagram and hashing it into a channel key costs more than the rest of the routing
decision, so the bound channels of one transport and relay address are kept in a table of
their own, keyed by (client address, channel number), and the 5-tuple is built only for
what goes to the core's other paths (STUN, the relay loop, drops).
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from firezone_relay.protocol.allocations import Channel
from firezone_relay.protocol.routes import ClientRoute, ToPeer
from firezone_relay.protocol.stats import SIZE_BUCKET, Stats
from firezone_relay.protocol.types import Addr, FiveTuple, Transport

_unpack_hh = struct.Struct("!HH").unpack_from

#: the core's handling of everything else a client sends (``Server``)
SlowPath = Callable[[bytes | memoryview, FiveTuple, float], ClientRoute | None]


class ClientInput:
    """What clients send over ``transport`` to the relay's ``local`` address."""

    __slots__ = ("_routes", "_slow", "_stats", "local", "transport")

    def __init__(
        self,
        transport: Transport,
        local: Addr,
        routes: dict[tuple[Addr, int], Channel],
        stats: Stats,
        slow: SlowPath,
    ) -> None:
        self.transport = transport
        self.local = local
        #: the allocation table's bound channels of this (transport, local), never replaced
        self._routes = routes
        self._stats = stats
        self._slow = slow

    def handle(self, data: bytes | memoryview, remote: Addr, now: float) -> ClientRoute | None:
        """A datagram from ``remote``; what ``Server.handle_client_input`` returns for it."""
        size = len(data)
        if size >= 4 and 0x40 <= data[0] <= 0x4F:
            number, length = _unpack_hh(data)
            channel = self._routes.get((remote, number))
            if channel is not None and 4 + length <= size:
                limit = channel.limit_out
                if limit is not None and not limit.take(length, now):
                    self._stats.allocation_rate_limited += 1
                    return None
                channel.out_datagrams += 1  # the allocation's count (Allocation.traffic)
                channel.out_bytes += length
                stats = self._stats  # Stats.count_relayed, inlined
                stats.relayed_packets_userspace += 1
                stats.relayed_bytes_userspace += length
                stats.packet_size_buckets[SIZE_BUCKET[length]] += 1
                if 4 + length == size:
                    return channel.to_peer  # unpadded: the channel's own route
                return ToPeer(channel.to_peer.port, channel.peer, slice(4, 4 + length))
        return self._slow(data, FiveTuple(self.transport, remote, self.local), now)
