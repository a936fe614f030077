"""The per-packet path: reader callbacks that drain sockets into the core and send the result.

Everything here runs on the event-loop thread and touches nothing but sockets, the core and plain
ints: no actor, no thread hop, no OpenTelemetry call. Datagrams are received at offset 4 of one
shared buffer so a peer datagram can become ChannelData by writing the 4-byte header in front of it,
without copying the payload.
"""

from __future__ import annotations

import logging
import socket
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from protocol.commands import SendMessage
from protocol.routes import LoopToClient
from protocol.types import Addr, Family

if TYPE_CHECKING:
    from protocol.server import Server

__all__ = ["DataPlane"]

logger = logging.getLogger("relay.dataplane")

#: Datagrams read from one ready socket per callback before yielding to the loop, so one busy
#: socket cannot starve the others (or the timers).
READ_BUDGET = 256
HEADROOM = 4  # ChannelData header
BUFFER_BYTES = 65536 + HEADROOM

_pack_header = struct.Struct("!HH").pack_into
_V4, _V6 = int(Family.V4), int(Family.V6)


class DataPlane:
    """Listen sockets, the allocation-socket table, and the reader callbacks over them."""

    def __init__(self, server: Server, after_input: Callable[[], None]) -> None:
        self.server = server
        #: called after every drained batch: run the core's commands and re-arm its timer
        self.after_input = after_input
        self.listen: dict[int, socket.socket] = {}
        #: (allocation port, family) -> socket; maintained by the allocation actors
        self.allocation_sockets: dict[tuple[int, int], socket.socket] = {}
        self._buf = bytearray(BUFFER_BYTES)
        self._full = memoryview(self._buf)
        self._payload = self._full[HEADROOM:]
        # plain counters, read by telemetry
        self.send_drops = 0  # sendto would block (socket buffer full) or no socket for the port
        self.send_errors = 0  # any other send failure (unreachable, bad address ...)
        self.input_errors = 0  # the core raised on a datagram (a bug, but never fatal)
        self.datagrams_in = 0

    # -- listen sockets -------------------------------------------------------------------

    def on_listen_readable(self, sock: socket.socket) -> None:
        """Drain a listen socket: STUN/TURN messages and ChannelData from clients."""
        recv = sock.recvfrom_into
        payload = self._payload
        handle = self.server.handle_client_input
        sockets = self.allocation_sockets
        listen = self.listen
        buf = self._buf
        now = time.monotonic()
        count = 0
        for _ in range(READ_BUDGET):
            try:
                n, addr = recv(payload)
            except BlockingIOError:
                break
            except OSError:
                continue  # e.g. a queued ICMP error; the socket stays usable
            count += 1
            if len(addr) != 2:
                addr = (addr[0], addr[1])
            data = payload[:n]
            try:
                out = handle(data, addr, now)
            except Exception:
                self._input_failed(addr)
                continue
            if out is None:
                continue
            if type(out) is LoopToClient:  # relay loop: ChannelData for another client here
                client, channel, length = out
                _pack_header(buf, HEADROOM, channel, length)
                self._send_to_client(listen, payload[: 4 + length], client)
                continue
            port, peer, span = out
            out_sock = sockets.get((port, _V6 if ":" in peer[0] else _V4))
            if out_sock is None:
                self.send_drops += 1
                continue
            try:
                out_sock.sendto(data[span], peer)
            except BlockingIOError:
                self.send_drops += 1
            except OSError:
                self.send_errors += 1
        self.datagrams_in += count
        self.after_input()

    # -- allocation sockets ---------------------------------------------------------------

    def on_peer_readable(self, sock: socket.socket, port: int, counters: list[int]) -> None:
        """Drain an allocation socket: traffic from peers, relayed to the client as ChannelData."""
        recv = sock.recvfrom_into
        payload = self._payload
        full = self._full
        buf = self._buf
        handle = self.server.handle_peer_traffic
        listen = self.listen
        now = time.monotonic()
        count = 0
        for _ in range(READ_BUDGET):
            try:
                n, addr = recv(payload)
            except BlockingIOError:
                break
            except OSError:
                continue
            count += 1
            if len(addr) != 2:
                addr = (addr[0], addr[1])
            try:
                out = handle(payload[:n], addr, port, now)
            except Exception:
                self._input_failed(addr)
                continue
            if out is None:
                continue
            client, channel = out
            _pack_header(buf, 0, channel, n)
            out_sock = listen.get(_V6 if ":" in client[0] else _V4)
            if out_sock is None:
                self.send_drops += 1
                continue
            try:
                out_sock.sendto(full[: n + HEADROOM], client)
            except BlockingIOError:
                self.send_drops += 1
                continue
            except OSError:
                self.send_errors += 1
                continue
            counters[0] += 1
            counters[1] += n
        self.datagrams_in += count
        self.after_input()

    def _send_to_client(
        self, listen: dict[int, socket.socket], data: memoryview, client: Addr
    ) -> None:
        out_sock = listen.get(_V6 if ":" in client[0] else _V4)
        if out_sock is None:
            self.send_drops += 1
            return
        try:
            out_sock.sendto(data, client)
        except BlockingIOError:
            self.send_drops += 1
        except OSError:
            self.send_errors += 1

    # -- control plane --------------------------------------------------------------------

    def send_message(self, command: SendMessage) -> None:
        """Carry out a SendMessage: from the listen socket of the recipient's family."""
        recipient: Addr = command.recipient
        out_sock = self.listen.get(_V6 if ":" in recipient[0] else _V4)
        if out_sock is None:
            self.send_drops += 1
            return
        try:
            out_sock.sendto(command.payload, recipient)
        except BlockingIOError:
            self.send_drops += 1
        except OSError as exc:
            self.send_errors += 1
            logger.debug("send to %s failed: %s", recipient, exc)

    def _input_failed(self, sender: Addr) -> None:
        self.input_errors += 1
        if self.input_errors <= 10 or self.input_errors % 10_000 == 0:
            logger.exception(
                "core failed on a datagram from %s (%d so far)", sender, self.input_errors
            )
