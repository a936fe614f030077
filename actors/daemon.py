"""The relay daemon: wires the sans-IO core to one uvloop event loop, the actors and the endpoints.

Threads and who owns what:

* the event-loop thread owns every socket, the core (``protocol.server.Server``), the control
  actor, the allocation actors and the portal session actor (all loop-hosted, see
  ``actors.loop_actor``);
* the XDP map manager is a pykka ``ThreadingActor`` (bcc calls block) that receives channel
  commands in batches;
* the HTTP endpoints serve on the loop (route handlers on a two-thread pool); they and the
  OpenTelemetry exporter only read plain ints and thread-safe flags.

Inputs: datagrams go from the data plane's reader callbacks straight into the core, and the
core's own timer is a loop callback (below). Everything else (the portal session's news,
signals, what became of an allocation port) is a message to the control actor, dispatched
through one table, ``CONTROL_ROUTES``. Outputs: the core's commands go through the pipeline's
table, ``actors.pipeline.ROUTES``.

Timers: after every input batch the core's earliest deadline (``poll_timeout``) is armed with
``loop.call_at``; nothing ever scans the allocations.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import os
import random
import secrets
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import pykka
from opentelemetry import trace

from firezone_relay.actors import udpio
from firezone_relay.actors.admin import (
    Admin,
    AdminConfig,
    AdminEndpoint,
    Disconnect,
    Drain,
    admin_routes,
)
from firezone_relay.actors.allocation import AllocationActor
from firezone_relay.actors.control import (
    AllocationBindFailed,
    AllocationStopped,
    ControlActor,
    PeerSocketClosed,
    PeerSocketOpened,
    PortalClosed,
    PortalConnect,
    PortalFatal,
    PortalJoined,
    Reload,
    Shutdown,
    tell,
)
from firezone_relay.actors.dataplane import DataPlane
from firezone_relay.actors.http_endpoints import HttpEndpoint, parse_host_port
from firezone_relay.actors.limits import allocation_cap, open_fds, port_range_warning
from firezone_relay.actors.logs import LogFilter
from firezone_relay.actors.pipeline import Pipeline
from firezone_relay.actors.signals import (
    DRAIN,
    FAILURE_EXIT,
    IGNORED,
    RELOAD,
    STOP_CLEAN,
    exit_code,
)
from firezone_relay.actors.sockets import LISTEN_BUFFER_BYTES, bind_udp, raise_nofile_limit
from firezone_relay.actors.startup_errors import StartupError, binding
from firezone_relay.actors.stream_relay import StreamRelay
from firezone_relay.actors.streams import StreamOptions, Streams
from firezone_relay.actors.telemetry import (
    BucketHistogram,
    BucketSource,
    HistogramBridge,
    Telemetry,
    packet_size_histogram,
)
from firezone_relay.actors.tls import TlsConfigError, TlsContexts
from firezone_relay.actors.tracing import RelayTracing
from firezone_relay.protocol.auth import secret_bits
from firezone_relay.protocol.server import Server, ServerConfig
from firezone_relay.protocol.types import Family

if TYPE_CHECKING:
    from firezone_relay.actors.portal import PortalConfig
    from firezone_relay.actors.portal_session import PortalSession
    from firezone_relay.actors.secret_files import AuthSecret
    from firezone_relay.actors.xdp_manager import XdpManager, XdpOptions

__all__ = ["CONTROL_ROUTES", "Relay", "Settings", "run"]

logger = logging.getLogger("relay")

STATS_LOG_INTERVAL = 10.0

SHUTDOWN_BUDGET = 2.0  # SIGTERM to exit, seconds


@dataclass(frozen=True)
class Settings:
    """Everything the daemon needs, validated once by ``actors.cli.settings_from_args``: the
    core's config, the portal's (None: standalone) and XDP's (None: userspace only)."""

    server: ServerConfig
    portal: PortalConfig | None = None
    xdp: XdpOptions | None = None
    bind_ip4: str = "0.0.0.0"
    bind_ip6: str = "::"
    rng_seed: int | None = None
    auth_secret: str | None = None
    #: where ``auth_secret`` came from (None: generated for this run)
    secret_origin: AuthSecret | None = None
    otlp_grpc_endpoint: str | None = None
    health_check_addr: str | None = "0.0.0.0:8080"
    control_endpoint: str | None = "127.0.0.1:9999"
    #: the operator's Unix socket (``actors.admin``); None: none. Unless ``admin_socket_required``
    #: (``--admin-socket`` given), one that cannot be made is a warning
    admin_socket: str | None = None
    admin_socket_required: bool = False
    #: every accepted secret, the first one ``auth_secret`` (``--auth-secret-file``)
    auth_secrets: tuple[str, ...] = ()
    #: what ``reload`` re-reads
    admin: AdminConfig = field(default_factory=AdminConfig)
    stats_interval: float = STATS_LOG_INTERVAL
    export_interval_ms: float | None = None
    #: OpenTelemetry resource attributes found by cloud metadata discovery
    resource_attributes: dict[str, str] = field(default_factory=dict)
    #: TURN over TCP on the listen port; over TLS on ``tls_listen_port`` with a certificate
    tcp: bool = True
    tls_listen_port: int = 5349
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    streams: StreamOptions = field(default_factory=StreamOptions)


#: The relay's control inputs: every message type its control actor receives, and the ``Relay``
#: method that handles it. Adding an input means adding a row here (and the message to
#: ``actors.control``). The core's timer stays a plain loop callback: its drain frees
#: allocations, whose actors must find the control actor idle (see
#: ``_on_allocation_bind_failed``), which they would not if the timer were a message too.
CONTROL_ROUTES: Final[Mapping[type[object], str]] = {
    PortalJoined: "_on_portal_joined",
    PortalClosed: "_on_portal_closed",
    PortalFatal: "_on_portal_fatal",
    Shutdown: "_on_shutdown",
    Reload: "_on_reload",
    PeerSocketOpened: "_on_peer_socket_opened",
    PeerSocketClosed: "_on_peer_socket_closed",
    AllocationBindFailed: "_on_allocation_bind_failed",
    AllocationStopped: "_on_allocation_stopped",
    Disconnect: "_on_disconnect",
    Drain: "_on_drain",
}


class Relay:
    """One relay process's worth of state; drive it with ``await relay.run()``."""

    def __init__(self, settings: Settings, log_filter: LogFilter | None = None) -> None:
        self.settings = settings
        self.log_filter = log_filter or LogFilter()
        self.loop = asyncio.get_running_loop()
        config = self._capped(settings.server)
        seed = settings.rng_seed
        rng = random.Random(seed) if seed is not None else random.Random(secrets.randbits(128))
        secret = settings.auth_secret
        if secret is None and seed is None:
            secret = secrets.token_hex(32)
        self.server = Server(config, rng, secret)
        if settings.auth_secrets:
            self.server.set_auth_secrets(settings.auth_secrets)
        self.server.unix_offset = time.time() - time.monotonic()
        self.dataplane = DataPlane(self.server, self._after_input)
        self.pipeline = Pipeline(self.server, self.dataplane.send_message, self._spawn_allocation)
        # Any: each handler takes the message type it is keyed by
        routes: dict[type[object], Callable[[Any], None]] = {
            message_type: getattr(self, name) for message_type, name in CONTROL_ROUTES.items()
        }
        self.control = ControlActor.start(routes, loop=self.loop)
        if config.allocation_rate_limit is None:  # limits are enforced by the core alone
            self.pipeline.mirror = self.dataplane.sync_channel
        self._bind_hosts = {Family.V4: settings.bind_ip4, Family.V6: settings.bind_ip6}
        self._timer: asyncio.TimerHandle | None = None
        self._armed: float | None = None
        self._stopping = asyncio.Event()
        self.exit_code = 0
        # read from other threads (HTTP): plain attributes, written only on the loop
        self.sockets_bound = False
        self.portal_joined = False
        self.standalone = settings.portal is None
        self.portal: pykka.ActorRef[PortalSession] | None = None
        self.fast_path: pykka.ActorRef[XdpManager] | None = None
        self._xdp_reader: Any = None
        self.endpoints: list[HttpEndpoint] = []
        self._last_stats = (time.monotonic(), 0)
        stats = self.server.stats
        self.packet_sizes = packet_size_histogram(
            [
                BucketSource(
                    {"relay.datapath": "userspace"},
                    lambda: (stats.packet_size_buckets, stats.relayed_bytes_userspace),
                )
            ]
        )
        self.bridge = HistogramBridge([self.packet_sizes])
        self.telemetry: Telemetry | None = None
        self.tracing = RelayTracing(trace.NoOpTracer(), self.server, enabled=False)
        self._stop_reason = ""
        self.tls: TlsContexts | None = None
        self.stream_relay = StreamRelay(self.server, self.dataplane, self._after_input)
        self.streams = Streams(self.loop, settings.streams, self.stream_relay)
        self.dataplane.stream_send = self.stream_relay.send
        self.admin = Admin(
            self.server,
            settings.admin,
            self._after_input,
            self.request_stop,
            self._drop_counts,
            self._xdp_totals,
        )

    @staticmethod
    def _capped(config: ServerConfig) -> ServerConfig:
        """Cap allocations by the port range and the descriptors left after the reserve, so
        the endpoints, the portal and the log never run out of them (Allocate answers 508)."""
        nofile = raise_nofile_limit()
        families = (config.public_ip4 is not None) + (config.public_ip6 is not None)
        size = config.highest_port - config.lowest_port + 1
        cap = allocation_cap(size, nofile, open_fds(), families)
        if config.max_allocations is not None and config.max_allocations <= cap:
            return config
        logger.info(
            "at most %d allocations (%d ports in the range, descriptor limit %d)", cap, size, nofile
        )
        return dataclasses.replace(config, max_allocations=cap)

    # -- readiness ------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        if not self.sockets_bound or self.server.draining:
            return False
        return self.standalone or self.portal_joined

    # -- lifecycle ------------------------------------------------------------------------

    async def run(self) -> int:
        """Start everything, serve until SIGTERM/SIGINT (or a fatal portal error), clean up."""
        self._handle_signals()
        try:
            await self.start()
        except Exception as exc:
            self.tracing.end_startup(exc)
            # a StartupError already says what and where
            logger.error("%s" if isinstance(exc, StartupError) else "failed to start: %s", exc)
            self._stop_endpoints()
            with contextlib.suppress(pykka.ActorDeadError):
                self.control.stop(block=False)
            return 1
        await self._stopping.wait()
        await self.shutdown()
        return self.exit_code

    def _handle_signals(self) -> None:
        """Every signal that would end the process is a logged Shutdown; SIGHUP a Reload,
        SIGUSR1 a Drain, SIGUSR2 nothing; each with a log line (see ``actors.signals``)."""
        messages: dict[int, tuple[object, str]] = {
            RELOAD: (Reload(signal.Signals(RELOAD).name), "reloading"),
            DRAIN: (Drain(), "draining"),
        }
        for sig in (*STOP_CLEAN, *FAILURE_EXIT):
            messages[sig] = (Shutdown(exit_code(sig), signal.Signals(sig).name), "stopping")
        for sig in IGNORED:
            messages[sig] = (None, "ignored")
        for sig, (message, what) in messages.items():
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                self.loop.add_signal_handler(sig, self._on_signal, sig, message, what)

    def _on_signal(self, sig: int, message: object, what: str) -> None:
        logger.info("%s received: %s", signal.Signals(sig).name, what)
        if message is not None:
            tell(self.control, message)

    async def start(self) -> None:
        raise_nofile_limit()
        config = self.settings.server
        self.telemetry = Telemetry(
            allocations=lambda: self.server.num_allocations,
            channels=lambda: self.server.num_active_channels,
            responses=lambda: self.server.stats.responses,
            drops=self._drop_counts,
            bridge=self.bridge,
            connections=self.streams.open_counts,
            connection_events=self.streams.event_counts,
            otlp_endpoint=self.settings.otlp_grpc_endpoint,
            export_interval_ms=self.settings.export_interval_ms,
            resource_attributes=self.settings.resource_attributes,
            datapath={"relay.userspace.impl": udpio.IMPL},
        )
        self._start_tracing()
        # which userspace data path runs: one line, a WARN when it fell back unasked
        logger.log(
            logging.WARNING if udpio.IMPL_DEGRADED else logging.INFO,
            "userspace data path: %s (%s)",
            udpio.IMPLEMENTATION,
            udpio.IMPL_REASON,
        )
        warning = port_range_warning(config.lowest_port, config.highest_port)
        if warning is not None:
            logger.warning("%s", warning)
        await self._start_endpoints()
        # XDP first, as the reference does: no channel can be bound before the maps exist.
        await self._start_fast_path()
        for family, public in ((Family.V4, config.public_ip4), (Family.V6, config.public_ip6)):
            if public is None:
                continue
            host = self._bind_hosts[family]
            with binding("listen socket", host, config.listen_port):
                sock = bind_udp(family, host, config.listen_port, buffer_bytes=LISTEN_BUFFER_BYTES)
            self.dataplane.add_listen_socket(family, sock)
            self.loop.add_reader(sock.fileno(), self.dataplane.on_listen_readable, sock)
            logger.info(
                "listening on %s:%d (%s, public %s)", host, config.listen_port, family.name, public
            )
        await self._start_streams()
        self.sockets_bound = True
        if self.settings.portal is None:
            self._announce_secret()
        else:
            self._start_portal(self.settings.portal)
        self.loop.call_later(self.settings.stats_interval, self._log_stats)
        self._rearm()
        self.tracing.end_startup(
            None, **{"relay.datapath": "xdp" if self.fast_path else "userspace"}
        )

    async def _start_streams(self) -> None:
        """TURN over TCP on the listen port and over TLS on the TLS port, on each family's bind
        address; a reload (SIGHUP, ``firezone-relay reload``) re-reads the certificate."""
        s = self.settings
        config = s.server
        if s.tls_cert_file is not None and s.tls_key_file is not None:
            try:
                self.tls = TlsContexts(s.tls_cert_file, s.tls_key_file)
            except TlsConfigError as exc:
                raise StartupError(str(exc)) from None
            self.admin.reload_hooks.append(self.tls.reload)
        ports: list[tuple[int, TlsContexts | None]] = []
        if s.tcp:
            ports.append((config.listen_port, None))
        if self.tls is not None:
            ports.append((s.tls_listen_port, self.tls))
        for family, public in ((Family.V4, config.public_ip4), (Family.V6, config.public_ip6)):
            if public is None:
                continue
            host = self._bind_hosts[family]
            for port, tls in ports:
                kind = "TLS" if tls is not None else "TCP"
                with binding(f"{kind} listen socket", host, port):
                    await self.streams.listen(host, port, tls)
                logger.info("listening on %s:%d (%s, %s)", host, port, family.name, kind)

    def _announce_secret(self) -> None:
        """Say where the standalone secret is, never what it is: a log is no place for it. A
        secret generated for this run is shown once on the terminal, if there is one."""
        scheme = self.settings.server.auth_scheme
        origin = self.settings.secret_origin
        if self.settings.auth_secret is None:
            if os.isatty(sys.stderr.fileno()):
                sys.stderr.write(
                    f"\nauth secret for this run (not logged): {self.server.auth_secret}\n"
                    "make credentials with: firezone-relay credentials --auth-secret "
                    f"{self.server.auth_secret} --auth-scheme {scheme}\n\n"
                )
                sys.stderr.flush()
                how = "shown on this terminal only"
            else:
                how = "not logged, so no credential can be made for it"
            logger.warning(
                "standalone mode, auth scheme %s: the auth secret was generated for this run "
                "(%s) and changes at every restart; keep one with --auth-secret or "
                "--auth-secret-file FILE (the systemd unit keeps one in its state directory)",
                scheme,
                how,
            )
            return
        where = origin.origin if origin is not None else "--auth-secret"
        if origin is not None and origin.path is not None:
            made = "generated now" if origin.generated else "kept across restarts"
            logger.info(
                "standalone mode, auth scheme %s: auth secret from %s (%s); make credentials "
                "with `firezone-relay credentials --auth-secret-file %s --auth-scheme %s`",
                scheme,
                where,
                made,
                origin.path,
                scheme,
            )
        else:
            logger.info("standalone mode, auth scheme %s: auth secret from %s", scheme, where)
        if secret_bits(self.settings.auth_secret) < 128:
            logger.warning(
                "the auth secret (%s) looks weaker than 128 bits: anyone holding one credential "
                "can guess it offline; use e.g. `openssl rand -hex 32`",
                where,
            )

    def request_stop(self, code: int = 0, reason: str = "") -> None:
        """Ask the daemon to shut down (loop thread only; the Shutdown and PortalFatal messages
        land here)."""
        if self._stopping.is_set():
            return
        logger.info("shutting down%s", f" ({reason})" if reason else "")
        self._stop_reason = reason
        self.exit_code = code
        self._stopping.set()

    async def shutdown(self) -> None:
        """Stop accepting, free every allocation, stop the actors. Bounded in time."""
        self.tracing.begin_shutdown(self._stop_reason)
        self.streams.close()
        for sock in self.dataplane.listen.values():
            self.loop.remove_reader(sock.fileno())
        self.dataplane.close_listen_sockets()
        if self._timer is not None:
            self._timer.cancel()
        freed = self.server.num_allocations
        self.server.free_all(time.monotonic())
        self.pipeline.drain()
        for ref in list(self.pipeline.allocations.values()):  # anything the core forgot
            with contextlib.suppress(pykka.ActorDeadError):
                ref.stop(block=False)
        logger.info("freed %d allocations", freed)
        if self.portal is not None:
            portal, self.portal = self.portal, None
            tell(portal, Shutdown(self.exit_code, self._stop_reason))
            # it cancelled the driver task; give it a moment to close the websocket
            tasks = [t for t in asyncio.all_tasks() if t.get_name() == "portal"]
            if tasks:
                await asyncio.wait(tasks, timeout=0.5)
        with contextlib.suppress(pykka.ActorDeadError):
            self.control.stop(block=False)
        self.admin.stop()
        self._stop_endpoints()
        self.log_filter.flush_suppressed()
        self.tracing.end_shutdown(**{"relay.allocations_freed": freed})

    def finish(self) -> None:
        """After the loop: stop thread-hosted actors, endpoints and exporters (bounded)."""
        deadline = time.monotonic() + 1.2
        if self.fast_path is not None:
            with contextlib.suppress(Exception):
                self.fast_path.stop(block=True, timeout=max(0.1, deadline - time.monotonic()))
        self._stop_endpoints()
        if self.telemetry is not None:
            self.telemetry.shutdown(max(0.1, min(0.5, deadline - time.monotonic())))

    # -- the core's outputs ---------------------------------------------------------------

    def _after_input(self) -> None:
        self.pipeline.drain()
        self._rearm()

    def _rearm(self) -> None:
        deadline = self.server.poll_timeout()
        if deadline == self._armed and (deadline is None or self._timer is not None):
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._armed = deadline
        if deadline is not None:
            delay = max(0.0, deadline - time.monotonic())
            self._timer = self.loop.call_at(self.loop.time() + delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        deadline = self._armed if self._armed is not None else 0.0
        self._armed = None
        self.server.handle_timeout(max(time.monotonic(), deadline))
        self.tracing.on_timers = True  # what this drain frees has expired
        try:
            self._after_input()
        finally:
            self.tracing.on_timers = False

    def _tracing_on_close(self, closing: bool) -> None:
        self.tracing.on_close = closing

    def _spawn_allocation(self, port: int) -> pykka.ActorRef[AllocationActor]:
        return AllocationActor.start(
            port, self.control, self._bind_hosts, self.dataplane.on_peer_readable, loop=self.loop
        )

    # -- control messages (see CONTROL_ROUTES) --------------------------------------------

    def _on_peer_socket_opened(self, message: PeerSocketOpened) -> None:
        self.dataplane.add_peer_socket(message.port, message.family, message.sock)

    def _on_peer_socket_closed(self, message: PeerSocketClosed) -> None:
        self.dataplane.close_peer_socket(message.port, message.family, message.sock)

    def _on_allocation_stopped(self, message: AllocationStopped) -> None:
        self.pipeline.allocation_gone(message.port, message.actor)

    def _on_allocation_bind_failed(self, message: AllocationBindFailed) -> None:
        """The core moves the allocation to another port, or turns its queued success into
        508. Both need the Allocate's response still queued, which holds because this runs
        within the pipeline's drain that carried the ``CreateAllocation``: the pipeline tells
        the allocation actor, which tells this actor, each loop-hosted and idle, so each
        handles the message at once in the teller's stack (``actors.loop_actor``)."""
        if not self.pipeline.draining:  # the invariant broke: the client was told success
            logger.error(
                "allocation port %d failed outside the drain that created it", message.port
            )
        self.server.handle_allocation_failed(message.port, message.at)

    def _on_portal_joined(self, _message: PortalJoined) -> None:
        self.portal_joined = True

    def _on_portal_closed(self, _message: PortalClosed) -> None:
        self.portal_joined = False

    def _on_portal_fatal(self, message: PortalFatal) -> None:
        self.request_stop(1, f"portal: {message.reason}")

    def _on_shutdown(self, message: Shutdown) -> None:
        self.request_stop(message.code, message.reason)

    def _on_disconnect(self, message: Disconnect) -> None:
        self.admin.disconnect(message)

    def _on_drain(self, message: Drain) -> None:
        self.admin.drain(message)

    def _on_reload(self, message: Reload) -> None:
        self.reload(message.reason)

    def reload(self, reason: str) -> None:
        """Re-read what can change without a restart (SIGHUP, ``systemctl reload``,
        ``firezone-relay reload``): the secret and peer list files, then the reload hooks."""
        logger.info("reload requested (%s)", reason)
        self.admin.reload()

    def _start_tracing(self) -> None:
        """Spans (when exported): startup now, allocations and channels from the pipeline."""
        assert self.telemetry is not None
        enabled = self.telemetry.tracer_provider is not None
        self.tracing = RelayTracing(self.telemetry.tracer(), self.server, enabled)
        if enabled:
            self.pipeline.observe(self.tracing.observe)
            self.stream_relay.on_close = self._tracing_on_close
        config = self.settings.server
        self.tracing.begin_startup(
            {
                "relay.mode": "standalone" if self.standalone else "portal",
                "relay.public_ip4": config.public_ip4 or "",
                "relay.public_ip6": config.public_ip6 or "",
                "relay.listen_port": config.listen_port,
                "relay.auth_scheme": config.auth_scheme,
            }
        )

    # -- actors beside the data plane -----------------------------------------------------

    def _start_portal(self, config: PortalConfig) -> None:
        """The session joins with the core's secret and reports back to the control actor."""
        from firezone_relay.actors.portal_session import PortalSession

        self.portal = PortalSession.start(
            config, self.control, loop=self.loop, tracer=self.tracing.tracer
        )
        self.portal.tell(PortalConnect(self.server.auth_secret))

    async def _start_fast_path(self) -> None:
        options = self.settings.xdp
        if options is None:
            return
        from firezone_relay.actors import xdp_manager

        # Loading compiles and verifies the program (seconds of blocking bcc calls): do it on a
        # worker thread while the loop stays responsive. Unavailable offload returns None (one
        # warning logged) and the relay relays in userspace; mandatory offload raises.
        ref = await self.loop.run_in_executor(None, xdp_manager.start_offload, options)
        if ref is None:
            return
        self.fast_path = ref
        self.pipeline.fast_path = ref
        reader = await self.loop.run_in_executor(
            None, lambda: ref.proxy().counter_reader().get(timeout=10)
        )
        if reader is not None:
            self._xdp_reader = reader
            self.packet_sizes.sources.append(
                BucketSource({"relay.datapath": "xdp"}, self._xdp_sizes)
            )
            self.bridge.add(
                BucketHistogram(
                    "relay.xdp.processing.duration",
                    "ns",
                    "Time the eBPF XDP program spent processing one relayed packet",
                    _xdp_ns_bounds(),
                    [BucketSource({}, self._xdp_durations)],
                )
            )
        logger.info("eBPF offloading enabled on %s", options.interface)

    def _xdp_totals(self) -> tuple[int, int] | None:
        if self._xdp_reader is None:
            return None
        counters = self._xdp_reader.read()
        return sum(counters.packet_size_buckets), int(counters.relayed_bytes)

    def _xdp_sizes(self) -> tuple[Sequence[int], float]:
        counters = self._xdp_reader.read()
        return counters.packet_size_buckets, counters.relayed_bytes

    def _xdp_durations(self) -> tuple[Sequence[int], float]:
        counters = self._xdp_reader.read()
        return counters.processing_ns_buckets, counters.processing_ns_total

    # -- endpoints, stats -----------------------------------------------------------------

    async def _start_endpoints(self) -> None:
        s = self.settings
        wanted: list[tuple[str, str, dict[tuple[str, str], Any]]] = []
        if s.health_check_addr:
            health = {
                ("GET", "/healthz"): lambda _q: (200, "text/plain", b"ok\n"),
                ("GET", "/readyz"): self._readyz,
                ("GET", "/metrics"): self._metrics,
            }
            wanted.append(("health", s.health_check_addr, health))
        if s.control_endpoint:
            wanted.append(
                (
                    "control",
                    s.control_endpoint,
                    {
                        ("POST", "/log_filter"): self._log_filter,
                        ("GET", "/debug/routes"): self._debug_routes,
                    },
                )
            )
        for name, text, routes in wanted:
            address = parse_host_port(text)
            with binding(f"{name} endpoint", *address):
                endpoint = HttpEndpoint(name, address, routes)
                await endpoint.start()
            self.endpoints.append(endpoint)
        if s.admin_socket:
            admin = AdminEndpoint(
                s.admin_socket,
                admin_routes(self.admin, lambda m: tell(self.control, m)),
                s.admin_socket_required,
            )
            await admin.start()
            self.endpoints.append(admin)

    def _stop_endpoints(self) -> None:
        endpoints, self.endpoints = self.endpoints, []
        for endpoint in endpoints:
            with contextlib.suppress(Exception):  # after the loop ended: nothing left to close
                endpoint.stop()

    def _readyz(self, _query: dict[str, list[str]]) -> tuple[int, str, bytes]:
        from firezone_relay.actors.version import relay_version

        body = f"{relay_version()}\n".encode()
        return (200 if self.ready else 503), "text/plain", body

    def _metrics(self, _query: dict[str, list[str]]) -> tuple[int, str, bytes]:
        assert self.telemetry is not None
        text = self.telemetry.prometheus_text()
        return 200, "text/plain; version=0.0.4; charset=utf-8", text.encode()

    def _log_filter(self, query: dict[str, list[str]]) -> tuple[int, str, bytes]:
        values = query.get("directives")
        if not values:
            return 400, "text/plain", b"missing directives\n"
        try:
            self.log_filter.apply(values[0])
        except ValueError as exc:
            return 400, "text/plain", f"{exc}\n".encode()
        logger.info("log filter set to %r", values[0])
        return 200, "text/plain", b"ok\n"

    def _debug_routes(self, _query: dict[str, list[str]]) -> tuple[int, str, bytes]:
        """The C route mirror against the core's channel routes. Handlers run on the HTTP
        pool, the tables change on the loop: the comparison runs on the loop, in one go (a
        walk of both tables: for soaks and tests, not for scraping)."""
        answer: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()

        def compare() -> None:
            try:
                answer.set_result(self._compare_routes())
            except Exception as exc:
                answer.set_exception(exc)

        self.loop.call_soon_threadsafe(compare)
        body = answer.result(timeout=10)
        return 200, "application/json", json.dumps(body).encode() + b"\n"

    def _compare_routes(self) -> dict[str, Any]:
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

    def _drop_counts(self) -> dict[str, int]:
        return {
            "invalid": self.server.stats.dropped_datagrams,
            "unroutable": self.server.stats.unroutable_datagrams,
            "rate_limited": self.server.stats.rate_limited
            + self.server.stats.allocation_rate_limited,
            "send_blocked": self.dataplane.send_drops,
            "send_failed": self.dataplane.send_errors,
            "stream_backlog": self.streams.dropped + self.stream_relay.lost,
            "kernel_rx_overflow": self.dataplane.kernel_drops,
        }

    def _log_stats(self) -> None:
        if self._stopping.is_set():
            return
        self.log_filter.flush_suppressed()
        now = time.monotonic()
        total = self.server.stats.relayed_bytes_userspace
        then, before = self._last_stats
        self._last_stats = (now, total)
        rate = (total - before) / max(now - then, 1e-9)
        logger.info(
            "Allocations = %d Channels = %d Throughput = %s",
            self.server.num_allocations,
            self.server.num_active_channels,
            _throughput(rate),
        )
        self.loop.call_later(self.settings.stats_interval, self._log_stats)


def _xdp_ns_bounds() -> tuple[float, ...]:
    """The XDP program's processing-time buckets: bucket 0 is 0 ns, bucket i [2^(i-1), 2^i)."""
    from firezone_relay.xdp.maps import NUM_NS_BUCKETS

    return (0.0, *(float(1 << i) for i in range(1, NUM_NS_BUCKETS - 1)))


def _throughput(bytes_per_s: float) -> str:
    for unit in ("B/s", "kB/s", "MB/s", "GB/s"):
        if bytes_per_s < 1000 or unit == "GB/s":
            return f"{bytes_per_s:.2f} {unit}"
        bytes_per_s /= 1000
    raise AssertionError


def run(settings: Settings, log_filter: LogFilter | None = None) -> int:
    """Run a relay on a fresh uvloop loop until it is told to stop; returns the exit code."""
    import uvloop

    loop = uvloop.new_event_loop()
    relay: Relay | None = None

    async def main() -> int:
        nonlocal relay
        relay = Relay(settings, log_filter)
        return await relay.run()

    try:
        code = loop.run_until_complete(main())
    finally:
        if relay is not None:
            relay.finish()
        with contextlib.suppress(Exception):
            loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
    return code
