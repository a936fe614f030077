"""Spans for what an operator debugs: startup and shutdown, allocation lifecycle, channel binds.
(The portal connection's spans are made by its driver, ``actors.portal``.)

Never per relayed datagram. Allocation and channel spans come from the command pipeline
(:meth:`actors.pipeline.Pipeline.observe`), which shows this module each command the core
emits; the observer is installed only when traces are exported, so without them the pipeline
is untouched. Relayed data never becomes a command; the few ``SendMessage`` commands that carry
data (Data indications, the relay loop's fallback) cost two byte comparisons here.

Each allocation is one trace: ``allocation.create`` is its root, and ``allocation.refresh``,
``allocation.free`` and the channel spans of that allocation are its children, so a backend
shows an allocation's whole life together. Spans are instants (they end when started): the
attributes say what happened, the timestamps when.

Attributes: the client's 5-tuple (``client.address``, ``client.port``, ``server.address``,
``server.port``, ``network.transport`` and the string ``relay.five_tuple``), ``relay.username``,
``relay.allocation.*`` and ``relay.channel.*``, ``relay.peer.address``/``relay.peer.port``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from opentelemetry import trace
from opentelemetry.trace import SpanContext, Status, StatusCode
from opentelemetry.util.types import AttributeValue

from firezone_relay.protocol import stun
from firezone_relay.protocol.commands import (
    Command,
    CreateAllocation,
    CreateChannelBinding,
    DeleteChannelBinding,
    FreeAllocation,
    SendMessage,
)
from firezone_relay.protocol.stun import Attr
from firezone_relay.protocol.types import Addr, Family, FiveTuple, Transport

if TYPE_CHECKING:
    from firezone_relay.protocol.allocations import Allocation
    from firezone_relay.protocol.server import Server

__all__ = ["RelayTracing"]

log = logging.getLogger("relay.tracing")

Attributes = dict[str, AttributeValue]


@dataclass(slots=True)
class _Tracked:
    """What the spans of one live allocation need after the core has forgotten it."""

    allocation: Allocation  # its expires_at moves on refresh
    context: SpanContext
    attributes: Attributes
    created: float
    channels: set[int] = field(default_factory=set)


class RelayTracing:
    """Makes the relay's spans. Lives on the event-loop thread."""

    def __init__(self, tracer: trace.Tracer, server: Server, enabled: bool) -> None:
        self.tracer = tracer
        self.enabled = enabled
        self._server = server
        self._by_port: dict[int, _Tracked] = {}
        self._by_client: dict[FiveTuple, _Tracked] = {}
        self._shutting_down = False
        #: set by the daemon while it carries out what the core's timers produced
        self.on_timers = False
        #: set while a TCP/TLS client's closed connection frees its allocation
        self.on_close = False
        self._startup: trace.Span | None = None
        self._shutdown: trace.Span | None = None
        self.errors = 0

    # -- startup and shutdown -------------------------------------------------------------

    def begin_startup(self, attributes: Mapping[str, AttributeValue]) -> None:
        self._startup = self.tracer.start_span("relay.startup", attributes=dict(attributes))

    def end_startup(
        self, error: BaseException | None = None, /, **attributes: AttributeValue
    ) -> None:
        span, self._startup = self._startup, None
        if span is None:
            return
        span.set_attributes(attributes)
        if error is not None:
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, str(error)))
        span.end()

    def begin_shutdown(self, reason: str) -> None:
        """The ``relay.shutdown`` span, around freeing everything: the allocations freed
        meanwhile end with ``relay.allocation.end_reason=shutdown``."""
        self._shutting_down = True
        self._shutdown = self.tracer.start_span(
            "relay.shutdown", attributes={"relay.shutdown.reason": reason or "signal"}
        )

    def end_shutdown(self, **attributes: AttributeValue) -> None:
        span, self._shutdown = self._shutdown, None
        if span is not None:
            span.set_attributes(attributes)
            span.end()

    # -- the command pipeline -------------------------------------------------------------

    def observe(self, command: Command) -> None:
        """Called with every command after its target ran (see ``Pipeline.observe``)."""
        try:
            if type(command) is SendMessage:
                payload = command.payload
                # a Refresh success (0x0104) or error (0x0114) response
                if len(payload) > 1 and payload[0] == 0x01 and payload[1] in (0x04, 0x14):
                    self._refresh_response(command)
            elif type(command) is CreateAllocation:
                self._created(command)
            elif type(command) is FreeAllocation:
                self._freed(command)
            elif type(command) is CreateChannelBinding:
                self._channel_bound(command)
            elif type(command) is DeleteChannelBinding:
                self._channel_unbound(command)
        except Exception:
            self.errors += 1
            if self.errors == 1:
                log.exception("making a span for %s failed (logged once)", type(command).__name__)

    def _created(self, command: CreateAllocation) -> None:
        if command.port in self._by_port:
            return  # the second family of a dual-stack allocation
        allocation = _allocation_on(self._server, command.port)
        if allocation is None:
            return
        client = allocation.client
        now = time.monotonic()
        attributes = self._client_attributes(client)
        attributes["relay.username"] = allocation.username
        attributes["relay.allocation.port"] = command.port
        span_attributes = dict(attributes)
        span_attributes["relay.allocation.families"] = ",".join(
            "ipv4" if f == Family.V4 else "ipv6" for f in allocation.families
        )
        span_attributes["relay.allocation.lifetime_s"] = self._seconds(allocation.expires_at - now)
        span = self.tracer.start_span("allocation.create", attributes=span_attributes)
        span.end()
        tracked = _Tracked(allocation, span.get_span_context(), attributes, now)
        self._by_port[command.port] = tracked
        self._by_client[client] = tracked

    def _freed(self, command: FreeAllocation) -> None:
        tracked = self._by_port.get(command.port)
        if tracked is None:
            return
        now = time.monotonic()
        attributes: Attributes = {
            "relay.allocation.family": "ipv4" if command.family == Family.V4 else "ipv6",
            "relay.allocation.age_s": round(now - tracked.created, 3),
        }
        if _allocation_on(self._server, command.port) is tracked.allocation:
            attributes["relay.allocation.end_reason"] = "family_deleted"
        else:
            attributes["relay.allocation.end_reason"] = self._end_reason(tracked, now)
            del self._by_port[command.port]
            if self._by_client.get(tracked.allocation.client) is tracked:
                del self._by_client[tracked.allocation.client]
        self._child(tracked, "allocation.free", attributes)

    def _end_reason(self, tracked: _Tracked, now: float) -> str:
        if self._shutting_down:
            return "shutdown"
        if self.on_close:
            return "closed"  # the client's TCP/TLS connection closed
        if self.on_timers or tracked.allocation.expires_at <= now:
            return "expired"
        if tracked.allocation.replaced:
            return "replaced"  # the registry freed it: the username allocated again
        current = _allocation_of_user(self._server, tracked.allocation.username)
        single = self._server.single_allocation_per_username
        if single and current is not None and current is not tracked.allocation:
            return "replaced"  # the same username allocated from another 5-tuple
        return "deleted"

    def _refresh_response(self, command: SendMessage) -> None:
        tracked = self._by_client.get(command.recipient)
        if tracked is None:
            return
        message = stun.parse(command.payload)
        attributes: Attributes = {}
        if message.get(Attr.ERROR_CODE) is not None:
            code, reason = message.get(Attr.ERROR_CODE)
            attributes["error.type"] = str(code)
            self._child(tracked, "allocation.refresh", attributes, (code, reason))
            return
        lifetime = message.get(Attr.LIFETIME)
        if lifetime == 0:
            return  # a delete: allocation.free said it
        attributes["relay.allocation.lifetime_s"] = lifetime
        self._child(tracked, "allocation.refresh", attributes)

    def _channel_bound(self, command: CreateChannelBinding) -> None:
        tracked = self._by_port.get(command.allocation_port)
        if tracked is None:
            return
        attributes = _channel_attributes(command)
        attributes["relay.channel.refresh"] = command.channel in tracked.channels
        tracked.channels.add(command.channel)
        self._child(tracked, "channel.bind", attributes)

    def _channel_unbound(self, command: DeleteChannelBinding) -> None:
        tracked = self._by_port.get(command.allocation_port)
        if tracked is None:
            return
        tracked.channels.discard(command.channel)
        attributes = _channel_attributes(command)
        alive = _allocation_on(self._server, command.allocation_port) is tracked.allocation
        attributes["relay.channel.end_reason"] = "expired" if alive else "allocation_freed"
        self._child(tracked, "channel.unbind", attributes)

    # -- helpers --------------------------------------------------------------------------

    def _child(
        self,
        tracked: _Tracked,
        name: str,
        attributes: Attributes,
        error: tuple[int, str] | None = None,
    ) -> None:
        parent = trace.set_span_in_context(trace.NonRecordingSpan(tracked.context))
        span = self.tracer.start_span(
            name, context=parent, attributes={**tracked.attributes, **attributes}
        )
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, f"{error[0]} {error[1]}"))
        span.end()

    def _client_attributes(self, five_tuple: FiveTuple) -> Attributes:
        config = self._server.config
        client, family, transport = (
            five_tuple.remote,
            five_tuple.family,
            five_tuple.transport.network,
        )
        server_ip = config.public_ip6 if family == Family.V6 else config.public_ip4
        server_port = config.listen_port
        if five_tuple.transport is not Transport.UDP:  # the port the connection reached
            server_port = five_tuple.local[1]
        return {
            "client.address": client[0],
            "client.port": client[1],
            "server.address": server_ip or "",
            "server.port": server_port,
            "network.transport": transport,
            "relay.tls": five_tuple.transport is Transport.TLS,
            "relay.five_tuple": (
                f"{transport} {_fmt(client)} {_fmt((server_ip or '', server_port))}"
            ),
        }

    def _seconds(self, duration: float) -> int:
        return max(0, round(duration / self._server.config.time_scale))


def _fmt(addr: Addr) -> str:
    return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"


def _channel_attributes(command: CreateChannelBinding | DeleteChannelBinding) -> Attributes:
    return {
        "relay.channel.number": command.channel,
        "relay.peer.address": command.peer[0],
        "relay.peer.port": command.peer[1],
    }


# Tracing reads the core's lookups on the loop thread, after the command that concerns them.
def _allocation_on(server: Server, port: int) -> Allocation | None:
    return server.allocation_on(port)


def _allocation_of_user(server: Server, username: str) -> Allocation | None:
    return server.allocation_of_username(username)
