"""Between the TCP/TLS connections and the core: a stream client is one more 5-tuple.

Frames of a connection go to the core as datagrams of the connection's 5-tuple (transport TCP
or TLS, the client's address, the relay's end), exactly as the UDP reader callbacks hand
datagrams over, so every check of the core (authentication, the peer filter, quotas, rate
limits) applies unchanged; what the core relays to peers leaves through the allocation
sockets, as for UDP clients. Everything the core or the data plane sends to a stream client
(responses, Data indications, ChannelData from peers and the relay loop) comes to ``send``,
which finds the connection by 5-tuple and frames it (ChannelData padded to 4 bytes). When a
connection closes, the core frees its allocation at once (RFC 8656 §3.1).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from firezone_relay.protocol.routes import ClientRoute, LoopToClient
from firezone_relay.protocol.types import Addr, Family, FiveTuple, Transport

if TYPE_CHECKING:
    from firezone_relay.actors.dataplane import DataPlane
    from firezone_relay.actors.streams import StreamConnection
    from firezone_relay.protocol.server import Server

__all__ = ["StreamRelay"]

logger = logging.getLogger("relay.streams")

_V4, _V6 = int(Family.V4), int(Family.V6)

#: ``ClientInput.handle``: (frame, client address, now) -> where to relay it, or None
ClientHandle = Callable[[bytes | memoryview, Addr, float], ClientRoute | None]


class StreamRelay:
    """The ``StreamSink`` of the daemon's stream listeners (loop thread only)."""

    def __init__(self, server: Server, dataplane: DataPlane, after_input: Callable[[], None]):
        self.server = server
        self.dataplane = dataplane
        #: carries out what the core queued (and re-arms its timer), as after a UDP batch
        self.after_input = after_input
        self._by_client: dict[FiveTuple, StreamConnection] = {}
        self._clients: dict[StreamConnection, FiveTuple] = {}
        self._entries: dict[StreamConnection, tuple[ClientHandle, Addr]] = {}
        self._out: list[Any] = []
        #: told True around freeing a closed connection's allocation (tracing's end reason)
        self.on_close: Callable[[bool], None] = _ignore
        #: frames for a stream client whose connection was gone (plain counter)
        self.lost = 0

    def client_of(self, conn: StreamConnection) -> FiveTuple:
        client = self._clients.get(conn)
        if client is None:
            transport = Transport.TLS if conn.transport_name == "tls" else Transport.TCP
            client = FiveTuple(transport, conn.client, conn.local)
            self._clients[conn] = client
            self._by_client[client] = conn
        return client

    # -- StreamSink -----------------------------------------------------------------------

    def stream_frames(self, conn: StreamConnection, frames: list[bytes]) -> None:
        entry = self._entries.get(conn)
        if entry is None:
            entry = self._entry(conn)
        handle, remote = entry
        sockets = self.dataplane.allocation_sockets
        out = self._out
        now = time.monotonic()
        core_busy = False
        for frame in frames:
            try:
                # ChannelData on a bound channel is routed there and then (``ClientInput``);
                # everything else goes to the core as from the connection's 5-tuple
                route = handle(frame, remote, now)
            except Exception:
                self.dataplane.input_failed(remote)
                continue
            if route is None:
                core_busy = True
                continue
            if type(route) is LoopToClient:  # ChannelData for another client here
                target, channel, length = route
                self.dataplane.send_channel_data(target, channel, memoryview(frame)[4 : 4 + length])
            else:
                port, peer, span = route
                out += (sockets.get((port, _V6 if ":" in peer[0] else _V4)), frame[span], peer)
        if out:
            self.dataplane.flush(out)
        if core_busy:
            self.after_input()

    def _entry(self, conn: StreamConnection) -> tuple[ClientHandle, Addr]:
        """The core's entry point for the connection's transport and relay address, and the
        client's address, looked up once per connection."""
        client = self.client_of(conn)
        entry = (self.server.client_input(client.transport, client.local).handle, client.remote)
        self._entries[conn] = entry
        return entry

    def stream_closed(self, conn: StreamConnection) -> None:
        self._entries.pop(conn, None)
        client = self._clients.pop(conn, None)
        if client is None:
            return
        self._by_client.pop(client, None)
        if self.server.allocation_of(client) is None:
            return
        self.server.handle_client_closed(client, time.monotonic())
        self.on_close(True)
        try:
            self.after_input()
        finally:
            self.on_close(False)

    def stream_has_allocation(self, conn: StreamConnection) -> bool:
        client = self._clients.get(conn)
        return client is not None and self.server.allocation_of(client) is not None

    # -- to stream clients ----------------------------------------------------------------

    def send(self, client: FiveTuple, frame: bytes) -> bool:
        """A whole frame (STUN, or padded ChannelData) to a stream client; False, counted,
        when it cannot go out (the connection is gone, or its write buffer is full)."""
        conn = self._by_client.get(client)
        if conn is None:
            self.lost += 1
            return False
        return conn.send(frame)

    @property
    def connections(self) -> int:
        return len(self._by_client)


def _ignore(closing: bool) -> None:
    pass
