"""The relay daemon: wires the sans-IO core to one uvloop event loop, the actors and the endpoints.

Threads and who owns what:

* the event-loop thread owns every socket, the core (``protocol.server.Server``), the control
  actor, the allocation actors and the portal session actor (all loop-hosted, see
  ``actors.loop_actor``);
* the XDP map manager is a pykka ``ThreadingActor`` (bcc calls block) that receives channel
  commands in batches;
* the HTTP endpoints serve on the loop (route handlers on a two-thread pool); they and the
  OpenTelemetry exporter only read plain ints and thread-safe flags.

``Relay`` is the process: the control actor, the portal session, and the parts one process
has once whatever number of workers it runs (``actors.endpoints.Endpoints``: HTTP endpoints
and metrics; ``actors.offload.Offload``: XDP). One worker's share, the core with its sockets,
pipeline and timer, is ``actors.datapath.DataPath``.

Inputs: datagrams go from the data plane's reader callbacks straight into the core, and the
core's own timer is a loop callback (``DataPath.rearm``). Everything else (the portal
session's news, signals, what became of an allocation port) is a message to the control actor,
dispatched through one table, ``CONTROL_ROUTES``. Outputs: the core's commands go through the
pipeline's table, ``actors.pipeline.ROUTES``.

Timers: after every input batch the core's earliest deadline (``poll_timeout``) is armed with
``loop.call_at``; nothing ever scans the allocations.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import random
import secrets
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping
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
from firezone_relay.actors.control import ControlActor
from firezone_relay.actors.datapath import DataPath
from firezone_relay.actors.dataplane import DataPlane
from firezone_relay.actors.endpoints import Endpoints
from firezone_relay.actors.limits import allocation_cap, open_fds, port_range_warning
from firezone_relay.actors.logs import LogFilter
from firezone_relay.actors.messages import (
    AllocationBindFailed,
    AllocationStopped,
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
from firezone_relay.actors.offload import Offload
from firezone_relay.actors.pipeline import Pipeline
from firezone_relay.actors.signals import (
    DRAIN,
    FAILURE_EXIT,
    IGNORED,
    RELOAD,
    STOP_CLEAN,
    exit_code,
)
from firezone_relay.actors.sockets import raise_nofile_limit
from firezone_relay.actors.startup_errors import StartupError, binding
from firezone_relay.actors.streams import StreamOptions
from firezone_relay.actors.tls import TlsConfigError, TlsContexts
from firezone_relay.actors.tracing import RelayTracing
from firezone_relay.protocol.auth import secret_bits
from firezone_relay.protocol.config import ServerConfig
from firezone_relay.protocol.server import Server
from firezone_relay.protocol.types import Family

if TYPE_CHECKING:
    from firezone_relay.actors.portal import PortalConfig
    from firezone_relay.actors.portal_session import PortalSession
    from firezone_relay.actors.secret_files import AuthSecret
    from firezone_relay.actors.xdp_manager import XdpManager, XdpOptions

__all__ = ["CONTROL_ROUTES", "GivenSockets", "Relay", "Settings", "run"]

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
    #: whether metrics go to the OTLP endpoint too (a worker of several sends spans only)
    export_metrics: bool = True
    #: the stateless nonces' key, the same for every worker of one relay (None: drawn here)
    nonce_key: bytes | None = None
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


@dataclass(frozen=True)
class GivenSockets:
    """A worker's listen sockets, bound by the supervisor (``actors.supervisor``): its UDP
    socket of each family and its TCP/TLS listeners, each keyed by (family, port)."""

    udp: Mapping[Family, socket.socket]
    streams: Mapping[tuple[Family, int], socket.socket]


class Relay:
    """One relay process: the control actor, the portal session and the process-wide parts
    (``Endpoints``: HTTP endpoints and metrics; ``Offload``: XDP) around one worker's
    ``DataPath`` (the core, its sockets, pipeline and timer). Drive it with
    ``await relay.run()``."""

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
        bind_hosts = {Family.V4: settings.bind_ip4, Family.V6: settings.bind_ip6}
        self.datapath = DataPath(
            config, rng, secret, bind_hosts, self.loop, settings.streams, settings.nonce_key
        )
        if settings.auth_secrets:
            self.server.set_auth_secrets(settings.auth_secrets)
        self.control = ControlActor.start(self.control_handlers(), loop=self.loop)
        self.datapath.control = self.control
        self.endpoints = Endpoints(
            settings, self.log_filter, self.datapath, lambda: self.ready, self.loop
        )
        self.offload = Offload(settings.xdp)
        self._stopping = asyncio.Event()
        self.exit_code = 0
        #: a worker's sockets (``actors.worker``); None: this process binds its own
        self.given: GivenSockets | None = None
        # read from other threads (HTTP): plain attributes, written only on the loop
        self.sockets_bound = False
        self.portal_joined = False
        self.standalone = settings.portal is None
        self.portal: pykka.ActorRef[PortalSession] | None = None
        self.tracing = RelayTracing(trace.NoOpTracer(), self.server, enabled=False)
        self._stop_reason = ""
        self.tls: TlsContexts | None = None
        self.admin = Admin(
            self.server,
            settings.admin,
            self.datapath.after_input,
            self.request_stop,
            self.datapath.drop_counts,
            self.offload.totals,
            self.offload.allocation_counts,
        )

    # the worker's parts, under the names tools and tests read
    @property
    def server(self) -> Server:
        return self.datapath.server

    @property
    def dataplane(self) -> DataPlane:
        return self.datapath.dataplane

    @property
    def pipeline(self) -> Pipeline:
        return self.datapath.pipeline

    @property
    def fast_path(self) -> pykka.ActorRef[XdpManager] | None:
        return self.offload.ref

    def control_handlers(self) -> dict[type[object], Callable[[Any], None]]:
        """``CONTROL_ROUTES`` bound to this relay: what its control actor dispatches to."""
        return {kind: functools.partial(handle, self) for kind, handle in CONTROL_ROUTES.items()}

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
            self.endpoints.stop()
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
        self.endpoints.start_telemetry()
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
        await self.endpoints.start()
        await self._start_admin()
        # XDP first, as the reference does: no channel can be bound before the maps exist.
        await self.offload.start(self.loop, [self.pipeline], self.endpoints)
        self.datapath.bind_listen_sockets(self.given.udp if self.given is not None else None)
        await self._start_streams()
        self.sockets_bound = True
        if self.settings.portal is None:
            self._announce_secret()
        else:
            self._start_portal(self.settings.portal)
        self.endpoints.log_stats_every(self.loop, self.settings.stats_interval)
        self.datapath.rearm()
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
            host = self.datapath.bind_hosts[family]
            for port, tls in ports:
                kind = "TLS" if tls is not None else "TCP"
                sock = self.given.streams[family, port] if self.given is not None else None
                with binding(f"{kind} listen socket", host, port):
                    await self.datapath.streams.listen(host, port, tls, sock)
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
        freed = self.datapath.stop()
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
        self.endpoints.stop()
        self.log_filter.flush_suppressed()
        self.tracing.end_shutdown(**{"relay.allocations_freed": freed})

    def finish(self) -> None:
        """After the loop: stop thread-hosted actors, endpoints and exporters (bounded)."""
        deadline = time.monotonic() + 1.2
        self.offload.stop(max(0.1, deadline - time.monotonic()))
        self.endpoints.stop()
        self.endpoints.shutdown_telemetry(max(0.1, min(0.5, deadline - time.monotonic())))

    # -- control messages (see CONTROL_ROUTES) --------------------------------------------

    def _on_peer_socket_opened(self, message: PeerSocketOpened) -> None:
        self.datapath.peer_socket_opened(message)

    def _on_peer_socket_closed(self, message: PeerSocketClosed) -> None:
        self.datapath.peer_socket_closed(message)

    def _on_allocation_stopped(self, message: AllocationStopped) -> None:
        self.datapath.allocation_stopped(message)

    def _on_allocation_bind_failed(self, message: AllocationBindFailed) -> None:
        self.datapath.allocation_bind_failed(message)

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

    # -- actors beside the data path ------------------------------------------------------

    def _start_tracing(self) -> None:
        """Spans (when exported): startup now, allocations and channels from the pipeline."""
        telemetry = self.endpoints.telemetry
        assert telemetry is not None
        enabled = telemetry.tracer_provider is not None
        self.tracing = RelayTracing(telemetry.tracer(), self.server, enabled)
        self.datapath.tracing = self.tracing
        if enabled:
            self.pipeline.observe(self.tracing.observe)
            self.datapath.stream_relay.on_close = self._tracing_on_close
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

    async def _start_admin(self) -> None:
        """The operator's Unix socket (``actors.admin``), served beside the HTTP endpoints."""
        s = self.settings
        if s.admin_socket:
            admin = AdminEndpoint(
                s.admin_socket,
                admin_routes(self.admin, lambda m: tell(self.control, m)),
                s.admin_socket_required,
            )
            await admin.start()
            self.endpoints.http.append(admin)

    def _tracing_on_close(self, closing: bool) -> None:
        self.tracing.on_close = closing

    def _start_portal(self, config: PortalConfig) -> None:
        """The session joins with the core's secret and reports back to the control actor."""
        from firezone_relay.actors.portal_session import PortalSession

        self.portal = PortalSession.start(
            config, self.control, loop=self.loop, tracer=self.tracing.tracer
        )
        self.portal.tell(PortalConnect(self.server.auth_secret))


#: The relay's control inputs: every message type its control actor receives, and the ``Relay``
#: method that handles it. Adding an input means adding a row here (and the message to
#: ``actors.control``). The core's timer stays a plain loop callback: its drain frees
#: allocations, whose actors must find the control actor idle (see
#: ``_on_allocation_bind_failed``), which they would not if the timer were a message too.
# Any: each handler takes the message type it is keyed by
CONTROL_ROUTES: Final[Mapping[type[object], Callable[[Relay, Any], None]]] = {
    PortalJoined: Relay._on_portal_joined,
    PortalClosed: Relay._on_portal_closed,
    PortalFatal: Relay._on_portal_fatal,
    Shutdown: Relay._on_shutdown,
    PeerSocketOpened: Relay._on_peer_socket_opened,
    PeerSocketClosed: Relay._on_peer_socket_closed,
    AllocationBindFailed: Relay._on_allocation_bind_failed,
    AllocationStopped: Relay._on_allocation_stopped,
    Disconnect: Relay._on_disconnect,
    Drain: Relay._on_drain,
    Reload: Relay._on_reload,
}


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
