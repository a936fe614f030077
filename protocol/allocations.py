"""The allocation table: every live allocation, its channels and permissions, and the
indexes and fast-path routes over them, kept in step in one place.

Invariants (checked by ``check_invariants``, which the unit tests call after every step):

1. ``by_client`` and ``by_port`` hold the same live allocations, each under its current
   client 5-tuple and port; a deleted allocation is in neither and has no channels or
   permissions left.
2. ``by_username[u]`` is a live allocation with username ``u`` (the latest one made with it);
   ``by_ticket`` holds every live allocation under its registry ticket.
3. ``per_user[user]`` counts the live allocations of ``user``; no zero entries.
4. In an allocation, ``channels`` and ``channel_by_peer`` are inverse maps (number <-> peer),
   every channel's peer is of one of the allocation's families, and there are at most
   ``max_channels`` channels (bound or waiting out the rebind timeout).
5. Routes exist for bound channels only, and for all of them: ``to_client[(port, peer)]``,
   and exactly one of ``to_peer`` (a real peer) or ``looped`` (the peer is another
   allocation of this relay) under ``(client, number)``, each holding the channel itself,
   whose prebuilt routes name the allocation's current client and port. Unbound channels
   have counted nothing that is not in their allocation's ``counters``.
6. Every change of a channel's routes emits ``CreateChannelBinding`` /
   ``DeleteChannelBinding``; every deletion of an allocation emits one ``FreeAllocation``
   per family, after the channel deletions, and one release of its ticket to the allocation
   registry (``protocol.reservations``).
"""

from __future__ import annotations

from array import array
from collections.abc import Callable
from dataclasses import dataclass, field

from firezone_relay.protocol.commands import (
    Command,
    DeleteChannelBinding,
    FreeAllocation,
    SendMessage,
)
from firezone_relay.protocol.rate_limit import ByteBucket
from firezone_relay.protocol.routes import AFTER_HEADER, ToClient, ToPeer
from firezone_relay.protocol.types import Addr, Family, FiveTuple, Transport

#: indexes into ``Allocation.counters``
OUT_PACKETS, OUT_BYTES, IN_PACKETS, IN_BYTES = range(4)
COUNTERS = ("to_peer_datagrams", "to_peer_bytes", "to_client_datagrams", "to_client_bytes")


@dataclass(slots=True, eq=False)
class Channel:
    """A channel of an allocation. While it is bound the route indexes hold the channel
    itself, so that one lookup per datagram finds its prebuilt route, its allocation's rate
    limit and its counts: an attribute increment costs a third of an ``array`` item's."""

    number: int
    peer: Addr
    expires_at: float
    #: the routes handed out for every datagram (port and client never change under a
    #: channel: an allocation with channels is never moved)
    to_peer: ToPeer
    to_client: ToClient
    bound: bool = True
    #: what the core relayed over it since it was last bound (``COUNTERS`` order); ``unbind``
    #: moves them into the allocation's ``counters``
    out_datagrams: int = 0
    out_bytes: int = 0
    in_datagrams: int = 0
    in_bytes: int = 0
    #: the allocation's ``--allocation-rate-limit`` buckets
    limit_out: ByteBucket | None = None
    limit_in: ByteBucket | None = None


@dataclass(slots=True, eq=False)
class Allocation:
    client: FiveTuple
    port: int
    families: tuple[Family, ...]
    username: str
    user: str
    key: bytes
    expires_at: float
    transaction_id: bytes
    channels: dict[int, Channel] = field(default_factory=dict)
    channel_by_peer: dict[Addr, int] = field(default_factory=dict)
    permissions: dict[str, float] = field(default_factory=dict)
    pending_response: SendMessage | None = None
    dont_fragment: bool = False
    #: the deadline of the expiry timer in the heap (refreshes only push an earlier one)
    timer_at: float = 0.0
    #: ports tried so far; None = no retry on a failed bind (EVEN-PORT, RESERVATION-TOKEN)
    bind_attempts: int | None = 1
    #: monotonic time it was made (``sessions`` shows its age)
    created_at: float = 0.0
    #: relayed traffic, plain unsigned integers (see ``COUNTERS``): client -> peer datagrams
    #: and payload bytes, then peer -> client; the core's ChannelData paths count in the
    #: bound channel instead (``traffic`` adds both). An ``array`` so that the data plane's
    #: C route mirror can count into the same memory.
    counters: array[int] = field(default_factory=lambda: array("Q", bytes(32)))
    #: ``--allocation-rate-limit`` buckets (None: no limit): client -> peer, peer -> client
    limit_out: ByteBucket | None = None
    limit_in: ByteBucket | None = None
    #: its name in the allocation registry (``ReserveAllocation.ticket``)
    ticket: int = 0
    #: freed because its username allocated again (on this worker or another)
    replaced: bool = False

    def traffic(self) -> tuple[int, int, int, int]:
        """Everything relayed for this allocation (``COUNTERS`` order): its ``counters`` plus
        what its bound channels counted (for ``sessions`` and ``top``)."""
        out_datagrams, out_bytes, in_datagrams, in_bytes = self.counters
        for channel in self.channels.values():
            out_datagrams += channel.out_datagrams
            out_bytes += channel.out_bytes
            in_datagrams += channel.in_datagrams
            in_bytes += channel.in_bytes
        return out_datagrams, out_bytes, in_datagrams, in_bytes


class AllocationTable:
    def __init__(
        self,
        emit: Callable[[Command], None],
        max_channels: int = 1024,
        release: Callable[[int], None] = lambda ticket: None,
    ) -> None:
        self._emit = emit
        #: tells the allocation registry that an allocation's ticket is free
        self._release = release
        self.max_channels = max_channels
        self.by_client: dict[FiveTuple, Allocation] = {}
        self.by_port: dict[int, Allocation] = {}
        self.by_ticket: dict[int, Allocation] = {}
        self.by_username: dict[str, Allocation] = {}
        self.per_user: dict[str, int] = {}
        # The fast paths, holding bound channels only.
        #: to real peers, per (transport, relay address) by (client address, number): the
        #: tables ``ClientInput`` holds (made on first use, never dropped: their number is
        #: bounded by the relay's own addresses)
        self.to_peer: dict[tuple[Transport, Addr], dict[tuple[Addr, int], Channel]] = {}
        self.to_client: dict[tuple[int, Addr], Channel] = {}
        #: bound channels whose peer is another allocation on this relay (the relay loop)
        self.looped: dict[tuple[FiveTuple, int], Channel] = {}

    def __len__(self) -> int:
        return len(self.by_client)

    def peer_routes(self, transport: Transport, local: Addr) -> dict[tuple[Addr, int], Channel]:
        """The ``to_peer`` table of the clients of ``transport`` at ``local``."""
        routes = self.to_peer.get((transport, local))
        if routes is None:
            routes = self.to_peer[(transport, local)] = {}
        return routes

    def peer_route(self, client: FiveTuple, number: int) -> Channel | None:
        """The bound channel ``number`` of ``client`` to a real peer, if any."""
        return self.peer_routes(client.transport, client.local).get((client.remote, number))

    def allocations_of(self, user: str) -> int:
        return self.per_user.get(user, 0)

    # --- allocations ---------------------------------------------------------------------

    def add(self, allocation: Allocation) -> None:
        self.by_client[allocation.client] = allocation
        self.by_port[allocation.port] = allocation
        self.by_ticket[allocation.ticket] = allocation
        self.by_username[allocation.username] = allocation
        self.per_user[allocation.user] = self.per_user.get(allocation.user, 0) + 1

    def remove(self, allocation: Allocation) -> None:
        """Delete an allocation: unbind its channels, then free its sockets (commands)."""
        for channel in allocation.channels.values():
            self.unbind(allocation, channel)  # unbound ones too, as the Firezone relay does
        allocation.channels.clear()
        allocation.channel_by_peer.clear()
        allocation.permissions.clear()
        for family in allocation.families:
            self._emit(FreeAllocation(allocation.port, family))
        self.by_client.pop(allocation.client, None)
        self.by_port.pop(allocation.port, None)
        if self.by_ticket.get(allocation.ticket) is allocation:
            del self.by_ticket[allocation.ticket]
            self._release(allocation.ticket)
        if self.by_username.get(allocation.username) is allocation:
            del self.by_username[allocation.username]
        remaining = self.per_user.get(allocation.user, 1) - 1
        if remaining > 0:
            self.per_user[allocation.user] = remaining
        else:
            self.per_user.pop(allocation.user, None)

    def move(self, allocation: Allocation, port: int) -> None:
        """Re-home an allocation that has no channels yet (its port could not be bound)."""
        assert not allocation.channels
        del self.by_port[allocation.port]
        allocation.port = port
        self.by_port[port] = allocation

    def drop_family(self, allocation: Allocation, family: Family) -> None:
        """Refresh deleting one family of a dual-stack allocation."""
        allocation.families = tuple(f for f in allocation.families if f != family)
        self._emit(FreeAllocation(allocation.port, family))
        for channel in list(allocation.channels.values()):
            if Family.of(channel.peer[0]) == family:
                if channel.bound:
                    self.unbind(allocation, channel)
                self.forget(allocation, channel)

    # --- permissions ---------------------------------------------------------------------

    def permit(self, allocation: Allocation, host: str, until: float) -> bool:
        """Install or refresh the permission for ``host``; True when it is new."""
        fresh = host not in allocation.permissions
        allocation.permissions[host] = until
        return fresh

    def revoke(self, allocation: Allocation, host: str) -> None:
        """The permission for ``host`` expired."""
        allocation.permissions.pop(host, None)

    # --- channels ------------------------------------------------------------------------

    def add_channel(
        self, allocation: Allocation, number: int, peer: Addr, expires_at: float
    ) -> Channel:
        channel = Channel(
            number,
            peer,
            expires_at,
            ToPeer(allocation.port, peer, AFTER_HEADER),
            ToClient(allocation.client, number),
            limit_out=allocation.limit_out,
            limit_in=allocation.limit_in,
        )
        allocation.channels[number] = channel
        allocation.channel_by_peer[peer] = number
        return channel

    def renew_channel(self, channel: Channel, expires_at: float) -> None:
        """A ChannelBind refreshed ``channel`` (bound, or within its rebind timeout): it
        relays until ``expires_at`` once ``route`` has installed its routes."""
        channel.expires_at = expires_at
        channel.bound = True

    def route(self, allocation: Allocation, channel: Channel, loop: bool) -> None:
        """Install the fast-path routes of a (re)bound channel."""
        client = allocation.client
        key = (client, channel.number)
        to_peer = self.peer_routes(client.transport, client.local)
        if loop:
            to_peer.pop((client.remote, channel.number), None)
            self.looped[key] = channel
        else:
            self.looped.pop(key, None)
            to_peer[(client.remote, channel.number)] = channel
        self.to_client[(allocation.port, channel.peer)] = channel

    def unbind(self, allocation: Allocation, channel: Channel) -> None:
        """The channel stops relaying (it keeps its number and peer until ``forget``)."""
        channel.bound = False
        client = allocation.client
        self.peer_routes(client.transport, client.local).pop((client.remote, channel.number), None)
        self.looped.pop((client, channel.number), None)
        self.to_client.pop((allocation.port, channel.peer), None)
        counters = allocation.counters
        counters[OUT_PACKETS] += channel.out_datagrams
        counters[OUT_BYTES] += channel.out_bytes
        counters[IN_PACKETS] += channel.in_datagrams
        counters[IN_BYTES] += channel.in_bytes
        channel.out_datagrams = channel.out_bytes = channel.in_datagrams = channel.in_bytes = 0
        self._emit(
            DeleteChannelBinding(allocation.client, channel.number, channel.peer, allocation.port)
        )

    def forget(self, allocation: Allocation, channel: Channel) -> None:
        """An unbound channel's number and peer become free for other bindings."""
        del allocation.channels[channel.number]
        allocation.channel_by_peer.pop(channel.peer, None)

    # --- invariants ----------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Assert the invariants of the module docstring (tests; O(size of the table))."""
        assert len(self.by_client) == len(self.by_port) == len(self.by_ticket)
        for ticket, allocation in self.by_ticket.items():
            assert allocation.ticket == ticket
            assert self.by_client.get(allocation.client) is allocation
        routes = 0
        for client, allocation in self.by_client.items():
            assert allocation.client == client
            assert self.by_port.get(allocation.port) is allocation
            assert len(allocation.channels) <= self.max_channels
            assert len(allocation.channel_by_peer) == len(allocation.channels)
            for number, channel in allocation.channels.items():
                assert channel.number == number
                assert allocation.channel_by_peer[channel.peer] == number
                assert Family.of(channel.peer[0]) in allocation.families
                key = (client, number)
                to_client = self.to_client.get((allocation.port, channel.peer))
                routed = self.peer_route(client, number)
                if channel.bound:
                    routes += 1
                    assert (routed is None) != (key not in self.looped)
                    assert (routed or self.looped[key]) is channel
                    assert to_client is channel
                else:
                    assert routed is None and key not in self.looped
                    assert to_client is None
                    assert not (channel.out_datagrams or channel.in_datagrams)
                assert channel.to_peer == (allocation.port, channel.peer, AFTER_HEADER)
                assert channel.to_client == (client, number)
        to_peer = sum(len(routes) for routes in self.to_peer.values())
        assert routes == len(self.to_client) == to_peer + len(self.looped)
        for username, allocation in self.by_username.items():
            assert allocation.username == username
            assert self.by_client.get(allocation.client) is allocation
        users: dict[str, int] = {}
        for allocation in self.by_client.values():
            users[allocation.user] = users.get(allocation.user, 0) + 1
        assert users == self.per_user
