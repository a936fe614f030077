"""The per-packet path: reader callbacks that drain sockets into the core and send the result.

Everything here runs on the event-loop thread and touches nothing but sockets, the core and plain
ints: no actor, no thread hop, no OpenTelemetry call. A ready socket is read in batches
(``recvmmsg`` through the compiled helper in ``actors/udpio.py`` when it is built) into the slots
of one buffer, at offset 4 of each slot, so a peer datagram becomes ChannelData by writing the
4-byte header in front of it without copying the payload. Each batch's output goes out in one
``send_batch`` call (``sendmmsg`` per run of datagrams leaving through the same socket) before
the next batch reuses the slots.
"""

from __future__ import annotations

import logging
import socket
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from actors.udpio import Receiver, send_batch
from protocol.commands import SendMessage
from protocol.routes import LoopToClient
from protocol.types import Addr, Family

if TYPE_CHECKING:
    from protocol.server import Server

__all__ = ["DataPlane"]

logger = logging.getLogger("relay.dataplane")

#: Datagrams read per syscall, and batches read from one ready socket per callback before
#: yielding to the loop, so one busy socket cannot starve the others (or the timers).
BATCH = 64
READ_BATCHES = 4
HEADROOM = 4  # ChannelData header
SLOT_BYTES = 65536 + HEADROOM

_pack_header = struct.Struct("!HH").pack_into
_V4, _V6 = int(Family.V4), int(Family.V6)


class DataPlane:
    """Listen sockets, the allocation-socket table, and the reader callbacks over them."""

    def __init__(self, server: Server, after_input: Callable[[], None]) -> None:
        self.server = server
        #: called after a drained socket when the core may have queued commands or timers: run
        #: them and re-arm its timer. A datagram the core routes queues neither (it only counts),
        #: so a batch of nothing but relayed data skips it.
        self.after_input = after_input
        self.listen: dict[int, socket.socket] = {}
        #: (allocation port, family) -> socket; kept by ``add_peer_socket`` / ``remove_peer_socket``
        self.allocation_sockets: dict[tuple[int, int], socket.socket] = {}
        self._rx = Receiver(BATCH, SLOT_BYTES, HEADROOM)
        rx = self._rx
        self._rx_parts = (rx.recv, rx.slots, rx.views, rx.addrs, rx.lens, rx.buffer)
        #: the batch being sent: a flat [socket or None, data, address, ...]
        self._out: list[Any] = []
        # plain counters, read by telemetry
        self.send_drops = 0  # sendto would block (socket buffer full) or no socket for the port
        self.send_errors = 0  # any other send failure (unreachable, bad address ...)
        self.input_errors = 0  # the core raised on a datagram (a bug, but never fatal)

    def listen_socket_for(self, addr: Addr) -> socket.socket | None:
        """The listen socket of ``addr``'s family: where everything to a client leaves from."""
        return self.listen.get(_V6 if ":" in addr[0] else _V4)

    def flush(self, out: list[Any]) -> int:
        """Send a batch (flat ``[socket or None, data, address, ...]``), count what was dropped
        or failed, and empty it; returns how many did not go out. Every send of the data plane
        goes through here."""
        dropped, failed = send_batch(out)
        self.send_drops += dropped
        self.send_errors += failed
        out.clear()
        return int(dropped + failed)

    # -- listen sockets -------------------------------------------------------------------

    def on_listen_readable(self, sock: socket.socket) -> None:
        """Drain a listen socket: STUN/TURN messages and ChannelData from clients."""
        recv, _, views, addrs, lens, buf = self._rx_parts
        handle = self.server.handle_client_input
        sockets = self.allocation_sockets
        to_client = self.listen_socket_for
        out = self._out
        now = time.monotonic()
        core_busy = False  # a datagram the core did not route may have queued commands
        for _ in range(READ_BATCHES):
            try:
                n = recv(sock)
            except OSError:
                continue  # e.g. a queued ICMP error; the socket stays usable
            if n < 0:
                break
            for i in range(n):
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
                    _pack_header(buf, i * SLOT_BYTES + HEADROOM, channel, length)
                    out += (to_client(client), views[i][: 4 + length], client)
                else:
                    port, peer, span = route  # span: within the datagram the core was given
                    out += (
                        sockets.get((port, _V6 if ":" in peer[0] else _V4)),
                        views[i][: lens[i]][span],
                        peer,
                    )
            if out:
                self.flush(out)
            if n < BATCH:
                break
        if core_busy:
            self.after_input()

    # -- allocation sockets ---------------------------------------------------------------

    def add_peer_socket(self, port: int, family: Family, sock: socket.socket) -> None:
        """An allocation actor bound ``sock``: what clients send to peers of ``port`` leaves
        through it."""
        self.allocation_sockets[(port, int(family))] = sock

    def remove_peer_socket(self, port: int, family: Family) -> None:
        self.allocation_sockets.pop((port, int(family)), None)

    def on_peer_readable(self, sock: socket.socket, port: int) -> None:
        """Drain an allocation socket: traffic from peers, relayed to the client as ChannelData."""
        recv, slots, views, addrs, lens, buf = self._rx_parts
        handle = self.server.handle_peer_traffic
        to_client = self.listen_socket_for
        out = self._out
        now = time.monotonic()
        core_busy = False
        last_client: Addr | None = None
        client_sock: socket.socket | None = None
        for _ in range(READ_BATCHES):
            try:
                n = recv(sock)
            except OSError:
                continue
            if n < 0:
                break
            for i in range(n):
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
                    last_client, client_sock = client, to_client(client)
                _pack_header(buf, i * SLOT_BYTES, channel, length)
                out += (client_sock, slots[i][: length + HEADROOM], client)
            if out:
                self.flush(out)
            if n < BATCH:
                break
        if core_busy:
            self.after_input()

    # -- control plane --------------------------------------------------------------------

    def send_message(self, command: SendMessage) -> None:
        """Carry out a SendMessage: from the listen socket of the recipient's family."""
        recipient: Addr = command.recipient
        if self.flush([self.listen_socket_for(recipient), command.payload, recipient]):
            logger.debug("send to %s failed", recipient)

    def _input_failed(self, sender: Addr) -> None:
        self.input_errors += 1
        if self.input_errors <= 10 or self.input_errors % 10_000 == 0:
            logger.exception(
                "core failed on a datagram from %s (%d so far)", sender, self.input_errors
            )
