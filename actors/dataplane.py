"""The per-packet path: reader callbacks that drain sockets into the core and send the result.

Everything here runs on the event-loop thread and touches nothing but sockets, the core and plain
ints: no actor, no thread hop, no OpenTelemetry call. A ready socket is read in batches
(``recvmmsg`` through the compiled helper in ``actors/udpio.py`` when it is built) into the slots
of one buffer, at offset 4 of each slot, so a peer datagram becomes ChannelData by writing the
4-byte header in front of it without copying the payload. Each batch's output goes out in one
``send_batch`` call (``sendmmsg`` per run of datagrams leaving through the same socket) before
the next batch reuses the slots.

Bound-channel traffic does not even enter this loop when the compiled helper is there: its
``Receiver`` keeps a mirror of the core's channel routes (``sync_channel``, fed by the pipeline
on every ``CreateChannelBinding`` / ``DeleteChannelBinding``), relays what the mirror routes in
C, and hands the rest of a batch, from the first datagram it does not route, to the loops below
and so to the core. The core stays the source of truth: every change of its routes comes with
one of those commands (the allocation table's invariant 6), the pipeline drains them before the
next batch is read. A route can never outlive its socket: the mirror records each route's file
descriptors when it is set, and the data plane, which owns the socket tables, drops every route
recorded with a socket (``Receiver.drop_fd`` with the fd recorded when the socket came in, never
a ``fileno()`` of a socket that may be closed) before it closes that socket itself
(``close_peer_socket``, ``close_listen_sockets``), or when another socket replaces it.
"""

from __future__ import annotations

import functools
import logging
import socket
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from firezone_relay.actors.udpio import PyReceiver, Receiver, send_batch
from firezone_relay.protocol.commands import CreateChannelBinding, DeleteChannelBinding, SendMessage
from firezone_relay.protocol.routes import LoopToClient
from firezone_relay.protocol.stream_framing import channel_data_frame, for_stream
from firezone_relay.protocol.types import Addr, Family, FiveTuple, Transport, log_fields

if TYPE_CHECKING:
    from firezone_relay.protocol.server import Server

__all__ = ["DataPlane"]

logger = logging.getLogger("relay.dataplane")

#: Datagrams read per syscall (batches per ready socket and callback: ``udpio.READ_BATCHES``)
BATCH = 64
HEADROOM = 4  # ChannelData header
SLOT_BYTES = 65536 + HEADROOM

_HEADER = struct.Struct("!HH")
_pack_header = _HEADER.pack_into
_V4, _V6 = int(Family.V4), int(Family.V6)
_UDP = Transport.UDP


class DataPlane:
    """Listen sockets, the allocation-socket table, and the reader callbacks over them."""

    def __init__(self, server: Server, after_input: Callable[[], None]) -> None:
        self.server = server
        #: called after a batch when the core may have queued commands or timers: run them
        #: (mirror updates among them, before the next batch is read) and re-arm its timer. A
        #: datagram the core routes queues neither (it only counts), so a batch of nothing but
        #: relayed data skips it.
        self.after_input = after_input
        #: family -> listen socket; kept by ``add_listen_socket`` / ``close_listen_sockets``
        self.listen: dict[int, socket.socket] = {}
        #: listen socket -> its bound address, the local half of its clients' 5-tuples
        self._local: dict[socket.socket, Addr] = {}
        self._rx = Receiver(BATCH, SLOT_BYTES, HEADROOM)
        rx = self._rx
        stats = server.stats
        #: the reader callbacks, (sock) and (sock, port): C when compiled, so a
        #: batch the mirror routes whole runs no Python frame; the rest goes to _from_*
        self.on_listen_readable: Callable[[socket.socket], None] = functools.partial(
            rx.drain_clients, stats, self._from_clients
        )
        self.on_peer_readable: Callable[[socket.socket, int], None] = functools.partial(
            rx.drain_peers, stats, self._from_peers
        )
        self._rx_parts = (rx.views, rx.addrs, rx.lens, rx.buffer)
        #: (allocation port, family) -> socket; kept by ``add_peer_socket`` / ``close_peer_socket``
        self.allocation_sockets: dict[tuple[int, int], socket.socket] = {}
        #: every socket above -> its fd, recorded when it came in (what its routes recorded)
        self._fds: dict[socket.socket, int] = {}
        #: the batch being sent: a flat [socket or None, data, address, ...]
        self._out: list[Any] = []
        # plain counters, read by telemetry (with the mirror's, see send_drops/send_errors)
        self._send_drops = 0  # sendto would block (socket buffer full) or no socket for the port
        self._send_errors = 0  # any other send failure (unreachable, bad address ...)
        self.input_errors = 0  # the core raised on a datagram (a bug, but never fatal)
        #: sends a whole frame to a TCP/TLS client (``StreamRelay.send``, when streams are on)
        self.stream_send: Callable[[FiveTuple, bytes], bool] = _no_streams

    def listen_socket_for(self, client: FiveTuple) -> socket.socket | None:
        """The listen socket ``client`` sent to: where everything to it leaves from (UDP:
        the one of its family)."""
        return self.listen.get(_V6 if ":" in client.remote[0] else _V4)

    def _local_of(self, sock: socket.socket) -> Addr:
        local = self._local.get(sock)
        if local is None:
            name = sock.getsockname()
            local = self._local[sock] = (name[0], name[1])
        return local

    def flush(self, out: list[Any]) -> int:
        """Send a batch (flat ``[socket or None, data, address, ...]``), count what was dropped
        or failed, and empty it; returns how many did not go out. Every send of the data plane
        goes through here."""
        dropped, failed = send_batch(out)
        self._send_drops += dropped
        self._send_errors += failed
        out.clear()
        return int(dropped + failed)

    @property
    def send_drops(self) -> int:
        """Sends that would block (socket buffer full) or had no socket for the port."""
        return self._send_drops + int(self._rx.send_drops)

    @property
    def kernel_drops(self) -> int:
        """Datagrams the kernel dropped on a full receive queue of a listen or allocation socket
        (``SO_RXQ_OVFL``, counted by the compiled helper; the Python fallback cannot see them)."""
        return int(self._rx.kernel_drops)

    @property
    def send_errors(self) -> int:
        """Any other send failure (unreachable, bad address ...)."""
        return self._send_errors + int(self._rx.send_errors)

    # -- the route mirror -----------------------------------------------------------------

    def sync_routes(
        self, commands: tuple[CreateChannelBinding | DeleteChannelBinding, ...]
    ) -> None:
        """The pipeline's ``RouteSink``: one drain's channel commands, in order."""
        for command in commands:
            self.sync_channel(command)

    def sync_channel(self, command: CreateChannelBinding | DeleteChannelBinding) -> None:
        """Make the mirror's two routes of the channel in ``command`` what the core's are now
        (none where the core has none, or where the socket to send from is not there: those
        datagrams go to the core). Re-reading the core, rather than replaying the command,
        keeps the mirror right whatever order the commands of one drain come in."""
        if command.client.transport is not _UDP:
            return  # the mirror relays UDP clients only
        rx = self._rx
        client, channel, peer, port = (
            command.client,
            command.channel,
            command.peer,
            command.allocation_port,
        )
        to_peer, to_client = self.server.channel_routes(client, channel, port, peer)
        # the allocation's counters (``Allocation.counters``), which the mirror bumps in place
        allocation = self.server.allocation_on(port)
        counts = None if allocation is None else memoryview(allocation.counters)
        fds = self._fds
        out = listen = None
        if to_peer is not None:
            family = _V6 if ":" in to_peer.peer[0] else _V4
            out = self.allocation_sockets.get((to_peer.port, family))
            listen = self.listen_socket_for(client)
        if (
            to_peer is None
            or out is None
            or listen is None
            or counts is None
            or not rx.set_to_peer(
                client.remote, channel, fds[out], to_peer.peer, fds[listen], counts[0:2]
            )
        ):
            rx.drop_to_peer(client.remote, channel)
        inbound = listen = None
        if to_client is not None:
            listen = self.listen_socket_for(to_client.client)
            inbound = self.allocation_sockets.get((port, _V6 if ":" in peer[0] else _V4))
        if (
            to_client is None
            or listen is None
            or inbound is None
            or counts is None
            or not rx.set_to_client(
                port,
                peer,
                fds[listen],
                to_client.client.remote,
                to_client.channel,
                fds[inbound],
                counts[2:4],
            )
        ):
            rx.drop_to_client(port, peer)

    def debug_routes(self) -> list[tuple[Any, ...]]:
        """Every route the C mirror holds, sorted, as plain tuples (``Receiver.debug_routes``):
        for soaks and tests that check the mirror against the core."""
        routes: list[tuple[Any, ...]] = self._rx.debug_routes()
        return routes

    def expected_routes(self) -> list[tuple[Any, ...]]:
        """What ``debug_routes`` must hold now: every core channel route that ``sync_channel``
        would mirror, in its shapes, sorted (none where the receiver mirrors nothing)."""
        if isinstance(self._rx, PyReceiver):
            return []
        to_peer, to_client = self.server.all_channel_routes()
        sockets = self.allocation_sockets
        routes: list[tuple[Any, ...]] = []
        for (client, channel), bound in to_peer.items():
            route = bound.to_peer
            out = sockets.get((route.port, _V6 if ":" in route.peer[0] else _V4))
            if out is not None and client.transport is _UDP:
                routes.append(("to_peer", client.remote, channel, out.fileno(), route.peer))
        for (port, peer), bound in to_client.items():
            back = bound.to_client
            listen = self.listen_socket_for(back.client)
            if listen is not None and back.client.transport is _UDP:
                routes.append(
                    ("to_client", port, peer, listen.fileno(), back.client.remote, back.channel)
                )
        routes.sort()
        return routes

    @property
    def mirrored_routes(self) -> tuple[int, int]:
        """How many (client -> peer, peer -> client) routes the C mirror holds."""
        routes: tuple[int, int] = self._rx.routes
        return routes

    # -- the sockets and their routes -----------------------------------------------------

    def _forget(self, sock: socket.socket) -> None:
        """Drop every mirrored route recorded with ``sock``'s fd (as recorded when it came in);
        before it is closed or replaced."""
        fd = self._fds.pop(sock, None)
        if fd is not None:
            self._rx.drop_fd(fd)

    def add_listen_socket(self, family: Family, sock: socket.socket) -> None:
        """A listen socket: what clients send arrives on it and what goes to them leaves it."""
        old = self.listen.get(int(family))
        if old is not None and old is not sock:
            self._forget(old)
        self.listen[int(family)] = sock
        self._fds[sock] = sock.fileno()

    def close_listen_sockets(self) -> None:
        """Drop the listen sockets' routes, then close them (their readers are removed)."""
        for family, sock in list(self.listen.items()):
            self._forget(sock)
            del self.listen[family]
            sock.close()

    def add_peer_socket(self, port: int, family: Family, sock: socket.socket) -> None:
        """An allocation actor bound ``sock``: what clients send to peers of ``port`` leaves
        through it, and peers' datagrams to ``port`` arrive on it. It is the data plane's to
        close (``close_peer_socket``); a socket it replaces loses its routes now."""
        key = (port, int(family))
        old = self.allocation_sockets.get(key)
        if old is not None and old is not sock:
            self._forget(old)
        self.allocation_sockets[key] = sock
        self._fds[sock] = sock.fileno()

    def close_peer_socket(self, port: int, family: Family, sock: socket.socket) -> None:
        """The allocation is done with ``sock`` (its reader is removed): drop its routes, then
        close it. Until then it stays open, so however late this comes, no other socket can
        hold its fd while a route still names it."""
        key = (port, int(family))
        if self.allocation_sockets.get(key) is sock:
            del self.allocation_sockets[key]
        if sock in self._fds:
            self._forget(sock)
        elif sock.fileno() >= 0:  # never added: nothing can have recorded another fd
            self._rx.drop_fd(sock.fileno())
        sock.close()

    # -- listen sockets -------------------------------------------------------------------

    def _from_clients(self, sock: socket.socket, n: int, k: int) -> None:
        """Datagrams ``[k, n)`` of a listen socket's batch, which the mirror did not route:
        STUN/TURN messages and ChannelData, through the core."""
        views, addrs, lens, buf = self._rx_parts
        handle = self.server.client_input(_UDP, self._local_of(sock)).handle
        sockets = self.allocation_sockets
        to_client = self.listen_socket_for
        out = self._out
        now = time.monotonic()
        core_busy = False  # a datagram the core did not route may have queued commands
        for i in range(k, n):
            addr = addrs[i]
            try:
                route = handle(views[i][: lens[i]], addr, now)
            except Exception:
                self._input_failed(addr)
                continue
            if route is None:
                core_busy = True
                continue
            if type(route) is LoopToClient:  # ChannelData for another client here
                client, channel, length = route
                if client.transport is not _UDP:  # on a TCP/TLS connection
                    self.stream_send(client, channel_data_frame(channel, views[i][4 : 4 + length]))
                    continue
                _pack_header(buf, i * SLOT_BYTES + HEADROOM, channel, length)
                out += (to_client(client), views[i][: 4 + length], client.remote)
            else:
                port, peer, span = route  # span: within the datagram the core was given
                out += (
                    sockets.get((port, _V6 if ":" in peer[0] else _V4)),
                    views[i][: lens[i]][span],
                    peer,
                )
        if out:
            self.flush(out)
        if core_busy:  # carried out before the next batch is read (and mirrored)
            self.after_input()

    # -- allocation sockets ---------------------------------------------------------------

    def _from_peers(self, sock: socket.socket, port: int, n: int, k: int) -> None:
        """Datagrams ``[k, n)`` of an allocation socket's batch, which the mirror did not
        route, through the core: relayed to the client as ChannelData, or Data indications."""
        views, addrs, lens, buf = self._rx_parts
        slots = self._rx.slots
        handle = self.server.handle_peer_traffic
        to_client = self.listen_socket_for
        out = self._out
        now = time.monotonic()
        core_busy = False
        last_client: FiveTuple | None = None
        client_sock: socket.socket | None = None
        stream = False
        for i in range(k, n):
            addr = addrs[i]
            length = lens[i]
            try:
                route = handle(views[i][:length], addr, port, now)
            except Exception:
                self._input_failed(addr)
                continue
            if route is None:
                core_busy = True
                continue
            client, channel = route
            if client is not last_client:  # one allocation socket: almost always one client
                last_client = client
                stream = client.transport is not _UDP
                client_sock = None if stream else to_client(client)
            if stream:  # through the client's TCP/TLS connection
                self.stream_send(client, channel_data_frame(channel, views[i][:length]))
                continue
            _pack_header(buf, i * SLOT_BYTES, channel, length)
            out += (client_sock, slots[i][: length + HEADROOM], client.remote)
        if out:
            self.flush(out)
        if core_busy:
            self.after_input()

    # -- control plane --------------------------------------------------------------------

    def send_message(self, command: SendMessage) -> None:
        """Carry out a SendMessage: from the listen socket of the recipient's family, or
        through the recipient's TCP/TLS connection."""
        recipient = command.recipient
        if recipient.transport is not _UDP:  # ChannelData (the relay loop) padded for it
            self.stream_send(recipient, for_stream(command.payload))
            return
        if self.flush([self.listen_socket_for(recipient), command.payload, recipient.remote]):
            logger.debug("send failed", extra=log_fields(recipient=recipient))

    def send_channel_data(self, client: FiveTuple, channel: int, data: bytes | memoryview) -> None:
        """ChannelData to ``client`` (the relay loop from a stream client): padded through
        its connection, or from the listen socket of its family."""
        if client.transport is not _UDP:
            self.stream_send(client, channel_data_frame(channel, data))
            return
        frame = _HEADER.pack(channel, len(data)) + bytes(data)
        self.flush([self.listen_socket_for(client), frame, client.remote])

    def input_failed(self, sender: Addr) -> None:
        """The core raised on input from ``sender`` (a bug, never fatal): count, log a few."""
        self._input_failed(sender)

    def _input_failed(self, sender: Addr) -> None:
        self.input_errors += 1
        if self.input_errors <= 10 or self.input_errors % 10_000 == 0:
            logger.exception(
                "core failed on a datagram (%d so far)",
                self.input_errors,
                extra=log_fields(sender=sender, errors=self.input_errors),
            )


def _no_streams(client: FiveTuple, frame: bytes) -> bool:
    return False  # no stream listener: nothing can be addressed to a stream client
