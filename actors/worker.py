"""One worker process of a relay of several (``--num-worker-threads N``, N > 1): a ``Relay``
with its own uvloop loop, core, actors and data plane, on listen sockets the supervisor bound
(``actors.steering``) and a share of the allocation ports (``ServerConfig.port_share``),
reporting to the supervisor over its channel (``actors.worker_channel``).

What there is one of per host (portal session, HTTP endpoints, admin socket, XDP, the secret's
announcement) is the supervisor's: the worker's settings have those turned off. It dies with
the supervisor: ``PR_SET_PDEATHSIG`` asks the kernel for SIGTERM when the parent goes, and the
channel's end closing stops it too.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import pickle
import signal
import socket
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from firezone_relay.actors.admin import admin_routes
from firezone_relay.actors.daemon import GivenSockets, Relay, Settings
from firezone_relay.actors.logs import LogFilter, configure
from firezone_relay.actors.messages import tell
from firezone_relay.actors.offload import PortOwners
from firezone_relay.actors.pipeline import ChannelCommand
from firezone_relay.actors.worker_channel import (
    AdminAnswer,
    AdminRequest,
    Forward,
    RegistryAsk,
    RegistryTell,
    WorkerChannel,
    WorkerReady,
    WorkerStats,
    XdpRoutes,
    five_tuple,
    five_tuple_row,
    route_row,
)
from firezone_relay.protocol.commands import ForwardToWorker, RegistryRequest, ReserveAllocation
from firezone_relay.protocol.config import ServerConfig
from firezone_relay.protocol.errors import ErrorCode
from firezone_relay.protocol.reservations import (
    EvictAllocation,
    RegistryMessage,
    ReservationAnswer,
)
from firezone_relay.protocol.types import Family

__all__ = ["WorkerSpec", "snapshot", "worker_settings"]

if TYPE_CHECKING:
    from firezone_relay.actors.xdp_manager import PortCounters

logger = logging.getLogger("relay")

#: how often a worker sends its counts to the supervisor (``/metrics`` is this fresh)
STATS_INTERVAL = 0.25
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class WorkerSpec:
    """What the supervisor hands a worker at start, on its standard input (pickled: it comes
    from the worker's own parent, never from the network). The descriptors are inherited."""

    index: int
    count: int
    settings: Settings
    supervisor_pid: int
    channel_fd: int
    #: the UDP listen socket of each family
    udp_fds: dict[Family, int]
    #: the TCP/TLS listeners, keyed by (family, port)
    stream_fds: dict[tuple[Family, int], int]
    log_format: str = "human"
    log_directives: str = "info"
    #: the supervisor runs the XDP map manager: send it this worker's channel commands
    xdp_routes: bool = False
    #: the XDP program's per-allocation counts array (``actors.xdp_manager.PortCounters``),
    #: which this worker reads for its own allocations' ``sessions`` rows and ``top``
    port_counts_fd: int | None = None


def worker_settings(
    settings: Settings, index: int, count: int, secret: str, nonce_key: bytes
) -> Settings:
    """The settings of worker ``index`` of ``count``: its core knows which worker it is (its
    port share, its part of the rate limit, the registry to ask), signs with the supervisor's
    secret and nonce key, and runs none of the per-host parts."""
    server: ServerConfig = dataclasses.replace(settings.server, workers=count, worker=index)
    return dataclasses.replace(
        settings,
        server=server,
        portal=None,
        xdp=None,
        auth_secret=secret,
        nonce_key=nonce_key,
        health_check_addr=None,
        control_endpoint=None,
        admin_socket=None,
        admin_socket_required=False,
        export_metrics=False,
        resource_attributes={**settings.resource_attributes, "relay.worker": str(index)},
        stats_interval=3600.0,
    )


def snapshot(relay: Relay) -> dict[str, Any]:
    """The worker's ``MetricsSource`` readings in JSON form (``WorkerStats.counts``)."""
    source = relay.datapath
    buckets, size_sum = source.packet_sizes()
    return {
        "allocations": source.num_allocations(),
        "channels": source.num_channels(),
        "responses": [[m, c, code, n] for (m, c, code), n in source.responses().items()],
        "relayed_bytes": source.relayed_bytes(),
        "packet_sizes": [list(buckets), size_sum],
        "drops": source.drop_counts(),
        "connections": source.connection_counts(),
        "connection_events": source.connection_events(),
        "draining": relay.server.draining,
    }


class WorkerRelay(Relay):
    """A ``Relay`` on the supervisor's sockets that reports to it over the channel."""

    def __init__(self, spec: WorkerSpec, log_filter: LogFilter) -> None:
        super().__init__(spec.settings, log_filter)
        self.spec = spec
        self.given = GivenSockets(
            udp={f: _adopt(fd, socket.SOCK_DGRAM) for f, fd in spec.udp_fds.items()},
            streams={k: _adopt(fd, socket.SOCK_STREAM) for k, fd in spec.stream_fds.items()},
        )
        self.channel: WorkerChannel | None = None
        self.admin_routes = admin_routes(self.admin, lambda m: tell(self.control, m))
        self._stats_timer: asyncio.TimerHandle | None = None

    async def start(self) -> None:
        sock = socket.socket(fileno=self.spec.channel_fd)
        self.channel = await WorkerChannel.open(
            self.loop, sock, self._on_message, self._on_supervisor_gone
        )
        if self.spec.xdp_routes:
            owners = self.offload.owners
            if self.spec.port_counts_fd is not None:
                owners.counters = _map_counts(self.spec.port_counts_fd)
            sink = ChannelRouteSink(self.spec.index, self.channel, owners)
            self.pipeline.route_sinks.append(sink)
        self.pipeline.to_registry = self._to_registry
        self.pipeline.to_worker = self._to_worker
        await super().start()
        self.channel.send(WorkerReady(self.spec.index, os.getpid()))
        self._send_stats()

    def _announce_secret(self) -> None:
        """The supervisor says where the secret is, once for the relay."""

    def _send_stats(self) -> None:
        if self.channel is not None:
            self.channel.send(WorkerStats(self.spec.index, snapshot(self)))
        self.log_filter.flush_suppressed()
        self._stats_timer = self.loop.call_later(STATS_INTERVAL, self._send_stats)

    # -- the core's messages to the rest of the relay, and theirs to it ------------------

    def _to_registry(self, request: RegistryRequest) -> None:
        if self.channel is None:
            return
        if isinstance(request, ReserveAllocation):
            ask = RegistryAsk(
                request.ticket, True, five_tuple_row(request.client), request.username, request.user
            )
        else:
            ask = RegistryAsk(request.ticket, False, [], "", "")
        self.channel.send(ask)

    def _to_worker(self, command: ForwardToWorker) -> None:
        if self.channel is not None:
            (from_host, from_port), (to_host, to_port) = (
                command.from_relayed_addr,
                command.to_relayed_addr,
            )
            payload = base64.b64encode(command.payload).decode()
            self.channel.send(
                Forward(command.worker, from_host, from_port, to_host, to_port, payload)
            )

    def _registry_told(self, message: RegistryTell) -> None:
        index = self.spec.index
        told: RegistryMessage
        if message.evict:
            told = EvictAllocation(index, message.ticket, five_tuple(message.by))
        else:
            refusal = None if message.refusal is None else ErrorCode(message.refusal)
            told = ReservationAnswer(index, message.ticket, refusal)
        self.server.handle_registry_message(told, time.monotonic())
        self.datapath.after_input()

    def _forwarded(self, message: Forward) -> None:
        """Another worker's allocation sent to one of ours (the relay loop)."""
        try:
            payload = base64.b64decode(message.payload, validate=True)
        except ValueError:
            return
        route = self.server.handle_forwarded(
            (message.from_host, message.from_port), message.to_port, payload, time.monotonic()
        )
        if route is not None:
            self.dataplane.send_channel_data(route.client, route.channel, payload)
        else:
            self.datapath.after_input()  # a Data indication, if any, is a command

    def _on_message(self, message: object) -> None:
        if isinstance(message, Forward):
            self._forwarded(message)
        elif isinstance(message, RegistryTell):
            try:
                self._registry_told(message)
            except ValueError as exc:
                logger.error("bad registry message from the supervisor: %s", exc)
        elif isinstance(message, AdminRequest):
            status, body = self.answer(message)
            if self.channel is not None:
                self.channel.send(AdminAnswer(message.request, status, body))

    def answer(self, request: AdminRequest) -> tuple[int, dict[str, Any]]:
        """One operator verb (``"METHOD /path"`` with its query), answered by this worker's
        own admin routes; ``POST /log_filter`` sets its log levels."""
        query = {
            str(k): [str(x) for x in v] for k, v in request.arguments.items() if isinstance(v, list)
        }
        if request.verb == "GET /snapshot":  # the supervisor's /metrics, fresh
            return 200, snapshot(self)
        if request.verb == "POST /log_filter":
            try:
                self.log_filter.apply((query.get("directives") or [""])[0])
            except ValueError as exc:
                return 400, {"error": str(exc)}
            return 200, {"ok": True}
        method, _, path = request.verb.partition(" ")
        route = self.admin_routes.get((method, path))
        if route is None:
            return 404, {"error": f"unknown verb {request.verb[:40]!r}"}
        status, _, body = route(query)
        try:
            answer = json.loads(body)
        except ValueError:
            answer = {"error": body.decode(errors="replace")[:200]}
        return status, answer if isinstance(answer, dict) else {"answer": answer}

    def _on_supervisor_gone(self) -> None:
        self.request_stop(0, "the supervisor is gone")

    async def shutdown(self) -> None:
        if self._stats_timer is not None:
            self._stats_timer.cancel()
        await super().shutdown()
        if self.channel is not None:
            self.channel.close()


class ChannelRouteSink:
    """The supervisor's XDP map manager as this worker's ``RouteSink``: each drain's channel
    commands go to it over the channel, in the order the core emitted them."""

    def __init__(self, index: int, channel: WorkerChannel, owners: PortOwners) -> None:
        self.index = index
        self.channel = channel
        self.owners = owners

    def sync_routes(self, commands: tuple[ChannelCommand, ...]) -> None:
        self.owners.note(commands)  # each new owner's baseline, before the kernel has the route
        self.channel.send(XdpRoutes(self.index, [route_row(c) for c in commands]))


def _map_counts(fd: int) -> PortCounters | None:
    """The supervisor's counts array mapped here (the mapping keeps it; the fd is closed)."""
    from firezone_relay.actors.xdp_manager import PortCounters

    try:
        return PortCounters(fd)
    except (OSError, ValueError) as exc:
        logger.warning("XDP per-allocation counters unavailable in this worker: %s", exc)
        return None
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


def _adopt(fd: int, kind: int) -> socket.socket:
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    assert sock.type == kind
    return sock


def die_with_parent(parent: int) -> None:
    """SIGTERM from the kernel when the supervisor exits; gone already: exit now."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


class _WorkerField(logging.Filter):
    """Every log line says which worker wrote it (``worker=N``)."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        fields = getattr(record, "fields", None)
        merged = dict(fields) if isinstance(fields, dict) else {}
        merged.setdefault("worker", self.index)
        record.fields = merged
        return True


def main() -> None:
    spec = pickle.load(sys.stdin.buffer)
    assert isinstance(spec, WorkerSpec)
    die_with_parent(spec.supervisor_pid)
    log_filter = configure(spec.log_format, spec.log_directives)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_WorkerField(spec.index))
    import uvloop

    loop = uvloop.new_event_loop()
    relay: WorkerRelay | None = None

    async def run() -> int:
        nonlocal relay
        relay = WorkerRelay(spec, log_filter)
        return await relay.run()

    try:
        code = loop.run_until_complete(run())
    finally:
        if relay is not None:
            relay.finish()
        loop.close()
    logging.shutdown()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    # run under the module's own name, so the pickled spec's class is this one
    from firezone_relay.actors import worker

    worker.main()
