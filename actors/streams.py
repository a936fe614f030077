"""TURN over TCP and TLS: the stream listeners and their connections, on the event loop.

Each accepted connection goes through up to three stages before its frames reach the relay:
the PROXY protocol header (only, and then always, from ``--proxy-protocol-from`` sources;
``protocol.proxy_protocol``), the TLS handshake (on the TLS port; through memory BIOs, so the
bytes that follow a PROXY header are the start of the handshake and a reloaded certificate
applies to the next connection), then STUN/ChannelData framing (``protocol.stream_framing``).
Frames go to a ``StreamSink`` (the relay) in order, one call per read; what the relay sends
back goes through ``StreamConnection.send``.

Everything a connection can make the relay hold is bounded (``StreamOptions``): connections
in total and per client address (the PROXY header's, when there is one), the time to finish
the PROXY header and the TLS handshake, the time a connection without an allocation may go
without sending a whole frame, one unfinished frame of read buffer, and the write buffer (past
it, what the relay would send is dropped and counted, as a full UDP socket buffer would drop
it). No error from the network logs more than a debug line.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, cast

from firezone_relay.protocol.proxy_protocol import ProxyError, ProxyReader
from firezone_relay.protocol.stream_framing import FramingError, StreamFramer
from firezone_relay.protocol.types import Addr

if TYPE_CHECKING:
    from firezone_relay.actors.tls import TlsContexts

__all__ = ["StreamConnection", "StreamListener", "StreamOptions", "StreamSink", "Streams"]

logger = logging.getLogger("relay.streams")

#: bytes asked of the TLS object per read (its records are at most 16 KiB)
_TLS_READ = 65536


@dataclass(frozen=True, slots=True)
class StreamOptions:
    """The bounds of the stream listeners (see the README's "TURN over TCP and TLS")."""

    #: connections open at once, TCP and TLS together: 8192 connections each holding at most
    #: one unfinished 64 KiB frame is 512 MiB at worst, with descriptors to spare
    max_connections: int = 8192
    #: per client address (after PROXY): a NAT of many browsers fits, one host cannot take all
    max_per_source: int = 64
    #: seconds to finish the PROXY header and the TLS handshake
    handshake_timeout: float = 10.0
    #: seconds a connection without an allocation may go without sending a whole frame
    idle_timeout: float = 30.0
    #: bytes queued for a client that does not read, beyond the kernel's socket buffer
    max_write_buffer: int = 65536
    #: sources whose connections start with a PROXY header (CIDRs); no one else's do
    proxy_from: tuple[str, ...] = ()


class StreamSink(Protocol):
    """What the relay does with a connection's frames (called on the loop)."""

    def stream_frames(self, conn: StreamConnection, frames: list[bytes]) -> None: ...

    def stream_closed(self, conn: StreamConnection) -> None: ...

    def stream_has_allocation(self, conn: StreamConnection) -> bool: ...


class _NoSink:
    def stream_frames(self, conn: StreamConnection, frames: list[bytes]) -> None:
        pass

    def stream_closed(self, conn: StreamConnection) -> None:
        pass

    def stream_has_allocation(self, conn: StreamConnection) -> bool:
        return False


class Streams:
    """The connections of every stream listener, their caps and their plain-int counters."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, options: StreamOptions, sink: StreamSink | None
    ) -> None:
        self.loop = loop
        self.options = options
        self.sink: StreamSink = sink or _NoSink()
        self._proxy_nets = tuple(ipaddress.ip_network(c, strict=False) for c in options.proxy_from)
        self.connections: set[StreamConnection] = set()
        self._per_source: Counter[str] = Counter()
        self.listeners: list[StreamListener] = []
        # plain counters (telemetry reads them)
        self.accepted = 0
        self.refused = 0  # over a cap
        self.protocol_errors = 0  # bad PROXY header, TLS failure, bad framing
        self.timeouts = 0  # handshake or idle
        self.dropped = 0  # writes dropped: the client's write buffer was full
        #: open connections by transport, kept on the loop; read from the metrics thread
        self.open_by_transport = {"tcp": 0, "tls": 0}

    def open_counts(self) -> dict[str, int]:
        """Open connections by transport (``tcp``, ``tls``); any thread may call it."""
        return dict(self.open_by_transport)

    def event_counts(self) -> dict[str, int]:
        return {
            "accepted": self.accepted,
            "refused": self.refused,
            "protocol_error": self.protocol_errors,
            "timeout": self.timeouts,
        }

    def trusted_proxy(self, host: str) -> bool:
        if not self._proxy_nets:
            return False
        address = ipaddress.ip_address(host)
        mapped = getattr(address, "ipv4_mapped", None)
        if mapped is not None:
            address = mapped
        return any(address in net for net in self._proxy_nets)

    def admit_source(self, host: str) -> bool:
        """Count a connection of ``host``; False (not counted) past the per-source cap."""
        if self._per_source[host] >= self.options.max_per_source:
            self.refused += 1
            return False
        self._per_source[host] += 1
        return True

    def release_source(self, host: str) -> None:
        left = self._per_source[host] - 1
        if left > 0:
            self._per_source[host] = left
        else:
            del self._per_source[host]

    async def listen(
        self,
        host: str,
        port: int,
        tls: TlsContexts | None = None,
        sock: socket.socket | None = None,
    ) -> StreamListener:
        """Accept TCP (or, with ``tls``, TLS) connections on ``host:port``, or on ``sock``
        when given (a worker's share of a ``SO_REUSEPORT`` group, bound by the supervisor)."""
        listener = StreamListener(self, tls)
        if sock is not None:
            listener.server = await self.loop.create_server(
                lambda: StreamConnection(self, tls), sock=sock, backlog=1024
            )
        else:
            listener.server = await self.loop.create_server(
                lambda: StreamConnection(self, tls), host, port, reuse_address=True, backlog=1024
            )
        self.listeners.append(listener)
        return listener

    def close(self) -> None:
        """Stop accepting and drop every connection (shutdown)."""
        for listener in self.listeners:
            if listener.server is not None:
                listener.server.close()
        self.listeners.clear()
        for conn in list(self.connections):
            conn.abort()


class StreamListener:
    """One listening socket (TCP or TLS)."""

    def __init__(self, streams: Streams, tls: TlsContexts | None) -> None:
        self.streams = streams
        self.tls = tls
        self.server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        port: int = self.server.sockets[0].getsockname()[1]
        return port


# the stages of a connection
_PROXY, _HANDSHAKE, _OPEN, _CLOSED = range(4)


class StreamConnection(asyncio.Protocol):
    """One TCP or TLS connection of a TURN client."""

    def __init__(self, streams: Streams, tls: TlsContexts | None) -> None:
        self.streams = streams
        self._tls_contexts = tls
        self.transport_name = "tls" if tls is not None else "tcp"
        self.transport: asyncio.Transport | None = None
        #: the TCP peer, and the client's address (the PROXY header's, if any)
        self.peer: Addr = ("", 0)
        self.client: Addr = ("", 0)
        #: the relay's end of the connection
        self.local: Addr = ("", 0)
        self.alpn: str | None = None
        self._stage = _CLOSED
        self._counted_source: str | None = None
        self._proxy: ProxyReader | None = None
        self._ssl: ssl.SSLObject | None = None
        self._tls_in = ssl.MemoryBIO()
        self._tls_out = ssl.MemoryBIO()
        self._framer = StreamFramer()
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._last_frame = 0.0
        self._sink_knows = False

    def __repr__(self) -> str:
        return f"<{self.transport_name} {self.client[0]}:{self.client[1]}>"

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports have the methods without subclassing asyncio.Transport
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        streams = self.streams
        self.peer = _addr(transport.get_extra_info("peername"))
        self.local = _addr(transport.get_extra_info("sockname"))
        self.client = self.peer
        if len(streams.connections) >= streams.options.max_connections:
            streams.refused += 1
            transport.abort()
            return
        proxied = streams.trusted_proxy(self.peer[0])
        if not proxied:
            if not streams.admit_source(self.peer[0]):
                transport.abort()
                return
            self._counted_source = self.peer[0]
        streams.connections.add(self)
        streams.open_by_transport[self.transport_name] += 1
        streams.accepted += 1
        transport.set_write_buffer_limits(high=streams.options.max_write_buffer)
        loop = streams.loop
        self._last_frame = loop.time()
        if proxied:
            self._proxy = ProxyReader()
            self._stage = _PROXY
        elif self._tls_contexts is not None:
            self._start_tls()
        else:
            self._open()
        if self._stage != _OPEN:
            self._handshake_timer = loop.call_later(
                streams.options.handshake_timeout, self._handshake_expired
            )
        self._idle_timer = loop.call_later(streams.options.idle_timeout, self._idle_check)

    def data_received(self, data: bytes) -> None:
        try:
            stage = self._stage
            if stage == _OPEN and self._ssl is None:  # plain TCP: _frames_in, inlined
                frames = self._framer.feed(data)
                if frames:
                    streams = self.streams
                    self._last_frame = streams.loop.time()
                    streams.sink.stream_frames(self, frames)
            elif stage == _PROXY:
                self._proxy_in(data)
            elif stage != _CLOSED:
                self._tls_received(data)
        except (FramingError, ProxyError, ssl.SSLError) as exc:
            self.streams.protocol_errors += 1
            logger.debug("closing %r: %s", self, exc)
            self.abort()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed()

    def pause_writing(self) -> None:
        pass  # ``send`` looks at the buffer itself

    def resume_writing(self) -> None:
        pass

    # -- sending --------------------------------------------------------------------------

    def send(self, data: bytes) -> bool:
        """Queue ``data`` (a whole frame) for the client; False, counted, when the write
        buffer is full or the connection is gone."""
        transport = self.transport
        if self._stage != _OPEN or transport is None or transport.is_closing():
            self.streams.dropped += 1
            return False
        if transport.get_write_buffer_size() + len(data) > self.streams.options.max_write_buffer:
            self.streams.dropped += 1
            return False
        if self._ssl is None:
            transport.write(data)
        else:
            self._ssl.write(data)
            transport.write(self._tls_out.read())
        return True

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        self._closed()

    # -- stages ---------------------------------------------------------------------------

    def _proxy_in(self, data: bytes) -> None:
        assert self._proxy is not None
        result = self._proxy.feed(data)
        if result is None:
            return
        header, rest = result
        self._proxy = None
        if header.source is not None:
            self.client = header.source
        if not self.streams.admit_source(self.client[0]):
            self.abort()
            return
        self._counted_source = self.client[0]
        if self._tls_contexts is not None:
            self._start_tls()
            if rest:
                self._tls_received(rest)
        else:
            self._open()
            if rest:
                self._frames_in(rest)

    def _start_tls(self) -> None:
        assert self._tls_contexts is not None
        self._ssl = self._tls_contexts.context.wrap_bio(
            self._tls_in, self._tls_out, server_side=True
        )
        self._stage = _HANDSHAKE

    def _tls_received(self, data: bytes) -> None:
        tls = self._ssl
        assert tls is not None
        self._tls_in.write(data)
        if self._stage == _HANDSHAKE:
            try:
                tls.do_handshake()
            except ssl.SSLWantReadError:
                self._flush_tls()
                return
            except ssl.SSLError:
                self._flush_tls()  # the alert, if any
                raise
            self.alpn = tls.selected_alpn_protocol()
            self._open()
        tls_in = self._tls_in
        # Read while the TLS object holds bytes or a record may be complete: asking once more
        # after the last record would cost an SSLWantReadError per read.
        while self._stage == _OPEN and (tls_in.pending or tls.pending()):
            try:
                chunk = tls.read(_TLS_READ)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:  # close_notify
                self._flush_tls()
                self.close()
                return
            if not chunk:
                break
            self._frames_in(chunk)
        if self._tls_out.pending:  # _flush_tls, inlined: rarely anything (a key update)
            self._flush_tls()

    def _flush_tls(self) -> None:
        if self._tls_out.pending and self.transport is not None:
            self.transport.write(self._tls_out.read())

    def _open(self) -> None:
        self._stage = _OPEN
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        self._sink_knows = True

    def _frames_in(self, data: bytes) -> None:
        frames = self._framer.feed(data)
        if frames:
            self._last_frame = self.streams.loop.time()
            self.streams.sink.stream_frames(self, frames)

    # -- timers ---------------------------------------------------------------------------

    def _handshake_expired(self) -> None:
        self._handshake_timer = None
        if self._stage in (_PROXY, _HANDSHAKE):
            self.streams.timeouts += 1
            logger.debug("closing %r: handshake timeout", self)
            self.abort()

    def _idle_check(self) -> None:
        """Close a connection that has sent no whole frame for ``idle_timeout`` and holds no
        allocation; one timer per connection, re-armed from the last frame."""
        self._idle_timer = None
        if self._stage == _CLOSED:
            return
        loop = self.streams.loop
        idle = self.streams.options.idle_timeout
        due = self._last_frame + idle
        now = loop.time()
        if now >= due:
            if self._stage == _OPEN and self.streams.sink.stream_has_allocation(self):
                due = now + idle
            else:
                self.streams.timeouts += 1
                logger.debug("closing %r: idle without an allocation", self)
                self.abort()
                return
        self._idle_timer = loop.call_at(due, self._idle_check)

    def _closed(self) -> None:
        if self._stage == _CLOSED and self not in self.streams.connections:
            return
        self._stage = _CLOSED
        streams = self.streams
        if self in streams.connections:
            streams.connections.discard(self)
            streams.open_by_transport[self.transport_name] -= 1
        if self._counted_source is not None:
            streams.release_source(self._counted_source)
            self._counted_source = None
        for timer in (self._handshake_timer, self._idle_timer):
            if timer is not None:
                timer.cancel()
        self._handshake_timer = self._idle_timer = None
        if self._sink_knows:
            self._sink_knows = False
            streams.sink.stream_closed(self)


def _addr(name: Sequence[object] | None) -> Addr:
    """A socket name as the relay's UDP side has it: ``(host, port)``."""
    if not name or len(name) < 2:
        return ("", 0)
    host, port = name[0], name[1]
    assert isinstance(host, str) and isinstance(port, int)
    return (host, port)
