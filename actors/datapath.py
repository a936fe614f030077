"""One worker's data path: the core, its data plane and command pipeline, and the core's timer.

This is what each worker of a multi-worker relay would own: ``DataPath`` binds the listen
sockets, feeds their datagrams to its ``Server`` (through ``DataPlane``), carries out the
core's commands (``Pipeline``), arms the core's deadline on the loop, and handles the control
messages about its allocation ports. The process-wide parts (control actor, portal, XDP
offload, endpoints and metrics) belong to ``actors.daemon.Relay``, which hands this object the
control actor to report to, and reads it through the ``MetricsSource`` interface
(``actors.endpoints``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import time
from collections.abc import Mapping, Sequence

import pykka
from opentelemetry import trace

from firezone_relay.actors import udpio
from firezone_relay.actors.allocation import AllocationActor
from firezone_relay.actors.control import ControlActor
from firezone_relay.actors.dataplane import DataPlane
from firezone_relay.actors.messages import (
    AllocationBindFailed,
    AllocationStopped,
    PeerSocketClosed,
    PeerSocketOpened,
)
from firezone_relay.actors.pipeline import Pipeline
from firezone_relay.actors.sockets import LISTEN_BUFFER_BYTES, bind_udp
from firezone_relay.actors.startup_errors import binding
from firezone_relay.actors.stream_relay import StreamRelay
from firezone_relay.actors.streams import StreamOptions, Streams
from firezone_relay.actors.tracing import RelayTracing
from firezone_relay.protocol.config import ServerConfig
from firezone_relay.protocol.server import Server
from firezone_relay.protocol.types import Family

__all__ = ["DataPath"]

logger = logging.getLogger("relay")


class DataPath:
    """The core and everything that moves its datagrams and commands, on one event loop."""

    def __init__(
        self,
        config: ServerConfig,
        rng: random.Random,
        secret: str | None,
        bind_hosts: Mapping[Family, str],
        loop: asyncio.AbstractEventLoop,
        stream_options: StreamOptions | None = None,
        nonce_key: bytes | None = None,
    ) -> None:
        self.loop = loop
        self.server = Server(config, rng, secret, nonce_key=nonce_key)
        self.server.unix_offset = time.time() - time.monotonic()
        self.dataplane = DataPlane(self.server, self.after_input)
        self.pipeline = Pipeline(self.server, self.dataplane.send_message, self._spawn_allocation)
        if config.allocation_rate_limit is None:  # limits are enforced by the core alone
            self.pipeline.route_sinks.append(self.dataplane)
        self.bind_hosts = dict(bind_hosts)
        #: TURN over TCP/TLS: the listeners (``Streams``) and what carries their clients'
        #: messages to and from the core (``StreamRelay``)
        self.stream_relay = StreamRelay(self.server, self.dataplane, self.after_input)
        self.streams = Streams(loop, stream_options or StreamOptions(), self.stream_relay)
        self.dataplane.stream_send = self.stream_relay.send
        #: where the allocation actors report (set by the owner before any input)
        self.control: pykka.ActorRef[ControlActor] | None = None
        #: spans of what the pipeline carries out (the owner replaces it once telemetry runs)
        self.tracing = RelayTracing(trace.NoOpTracer(), self.server, enabled=False)
        self._timer: asyncio.TimerHandle | None = None
        self._armed: float | None = None

    # -- sockets --------------------------------------------------------------------------

    def bind_listen_sockets(self, given: Mapping[Family, socket.socket] | None = None) -> None:
        """Bind the UDP listen socket of each public family (or take the one ``given``: a
        worker's, bound by the supervisor) and start reading it."""
        config = self.server.config
        for family, public in ((Family.V4, config.public_ip4), (Family.V6, config.public_ip6)):
            if public is None:
                continue
            host = self.bind_hosts[family]
            if given is not None:
                sock = given[family]
            else:
                with binding("listen socket", host, config.listen_port):
                    sock = bind_udp(
                        family, host, config.listen_port, buffer_bytes=LISTEN_BUFFER_BYTES
                    )
            self.dataplane.add_listen_socket(family, sock)
            self.loop.add_reader(sock.fileno(), self.dataplane.on_listen_readable, sock)
            logger.info(
                "listening on %s:%d (%s, public %s)", host, config.listen_port, family.name, public
            )

    def stop(self) -> int:
        """Stop reading, free every allocation and stop their actors; returns how many were
        freed."""
        self.streams.close()
        for sock in self.dataplane.listen.values():
            self.loop.remove_reader(sock.fileno())
        self.dataplane.close_listen_sockets()
        if self._timer is not None:
            self._timer.cancel()
        freed = self.server.num_allocations
        self.server.free_all()
        self.pipeline.drain()
        for ref in list(self.pipeline.allocations.values()):  # anything the core forgot
            with contextlib.suppress(pykka.ActorDeadError):
                ref.stop(block=False)
        return freed

    # -- the core's outputs and timer -----------------------------------------------------

    def after_input(self) -> None:
        self.pipeline.drain()
        self.rearm()

    def rearm(self) -> None:
        deadline = self.server.poll_timeout()
        if deadline == self._armed and (deadline is None or self._timer is not None):
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._armed = deadline
        if deadline is not None:
            delay = max(0.0, deadline - time.monotonic())
            self._timer = self.loop.call_at(self.loop.time() + delay, self.on_timer)

    def on_timer(self) -> None:
        self._timer = None
        deadline = self._armed if self._armed is not None else 0.0
        self._armed = None
        self.server.handle_timeout(max(time.monotonic(), deadline))
        self.tracing.on_timers = True  # what this drain frees has expired
        try:
            self.after_input()
        finally:
            self.tracing.on_timers = False

    def fire_timer_at(self, deadline: float) -> None:
        """Run the core's timer now as if ``deadline`` had come (benchmarks of expiry)."""
        self._armed = deadline
        self.on_timer()

    def _spawn_allocation(self, port: int) -> pykka.ActorRef[AllocationActor]:
        assert self.control is not None
        return AllocationActor.start(
            port, self.control, self.bind_hosts, self.dataplane.on_peer_readable, loop=self.loop
        )

    # -- control messages about allocation ports ------------------------------------------

    def peer_socket_opened(self, message: PeerSocketOpened) -> None:
        self.dataplane.add_peer_socket(message.port, message.family, message.sock)

    def peer_socket_closed(self, message: PeerSocketClosed) -> None:
        self.dataplane.close_peer_socket(message.port, message.family, message.sock)

    def allocation_stopped(self, message: AllocationStopped) -> None:
        self.pipeline.allocation_gone(message.port, message.actor)

    def allocation_bind_failed(self, message: AllocationBindFailed) -> None:
        """The core moves the allocation to another port, or turns its queued success into
        508. Both need the Allocate's response still queued, which holds because this runs
        within the pipeline's drain that carried the ``CreateAllocation``: the pipeline tells
        the allocation actor, which tells the control actor, each loop-hosted and idle, so
        each handles the message at once in the teller's stack (``actors.loop_actor``)."""
        if not self.pipeline.draining:  # the invariant broke: the client was told success
            logger.error(
                "allocation port %d failed outside the drain that created it", message.port
            )
        self.server.handle_allocation_failed(message.port, message.at)

    # -- what the endpoints and metrics read (``actors.endpoints.MetricsSource``) ---------

    def num_allocations(self) -> int:
        return self.server.num_allocations

    def num_channels(self) -> int:
        return self.server.num_active_channels

    def responses(self) -> dict[tuple[str, str, int | None], int]:
        return self.server.stats.responses

    def relayed_bytes(self) -> int:
        return self.server.stats.relayed_bytes_userspace

    def packet_sizes(self) -> tuple[Sequence[int], float]:
        stats = self.server.stats
        return stats.packet_size_buckets, stats.relayed_bytes_userspace

    def drop_counts(self) -> dict[str, int]:
        stats = self.server.stats
        return {
            "invalid": stats.dropped_datagrams,
            "unroutable": stats.unroutable_datagrams,
            "rate_limited": stats.rate_limited + stats.allocation_rate_limited,
            "send_blocked": self.dataplane.send_drops,
            "send_failed": self.dataplane.send_errors,
            "stream_backlog": self.streams.dropped + self.stream_relay.lost,
            "kernel_rx_overflow": self.dataplane.kernel_drops,
        }

    def connection_counts(self) -> dict[str, int]:
        return self.streams.open_counts()

    def connection_events(self) -> dict[str, int]:
        return self.streams.event_counts()

    def debug_routes(self) -> dict[str, object]:
        """The C route mirror against the core's channel routes (a walk of both tables, on
        the loop: for soaks and tests, not for scraping)."""
        expected = self.dataplane.expected_routes()
        held = self.dataplane.debug_routes()
        missing = sorted(set(expected) - set(held))
        extra = sorted(set(held) - set(expected))
        return {
            "impl": udpio.IMPL,
            "core": self.server.num_active_channels,
            "expected": len(expected),
            "mirror": len(held),
            "equal": expected == held,
            "missing": [repr(r) for r in missing[:10]],
            "extra": [repr(r) for r in extra[:10]],
        }
