"""The supervisor of a relay of several workers (``--num-worker-threads N``, N > 1).

It owns what there is one of per host: the listen sockets (N per family and port, in a fixed
order, steered by ``actors.steering``), the portal session, the HTTP endpoints (``/metrics``
sums the workers' counts, ``/readyz`` is 200 only when every worker is up), the signals, and
the secret every worker signs with. Each worker (``actors.worker``) is a process with its own
loop, core and data plane, on its share of the listen sockets and of the allocation ports,
talking to the supervisor over a channel of typed messages (``actors.worker_channel``).

A worker that exits is started again at once on the same sockets (the supervisor keeps them
open, so the reuseport group never changes and its clients' datagrams wait in its socket);
only its own allocations are lost. SIGTERM stops every worker within the shutdown budget;
workers die with the supervisor (``PR_SET_PDEATHSIG``, and their channel's end closing).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import pickle
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import pykka

from firezone_relay.actors.admin import AdminEndpoint
from firezone_relay.actors.control import ControlActor
from firezone_relay.actors.endpoints import Endpoints
from firezone_relay.actors.logs import LogFilter
from firezone_relay.actors.messages import (
    PortalClosed,
    PortalConnect,
    PortalFatal,
    PortalJoined,
    Reload,
    Shutdown,
    tell,
)
from firezone_relay.actors.offload import Offload, XdpRouteSink
from firezone_relay.actors.pipeline import ChannelCommand
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
from firezone_relay.actors.steering import attach_steering, reuseport_socket
from firezone_relay.actors.worker import WorkerSpec, worker_settings
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
    route_commands,
)
from firezone_relay.protocol.commands import (
    CreateChannelBinding,
    DeleteChannelBinding,
    RegistryRequest,
    ReleaseAllocation,
    ReserveAllocation,
)
from firezone_relay.protocol.reservations import EvictAllocation, Reservations
from firezone_relay.protocol.types import Family

if TYPE_CHECKING:
    from firezone_relay.actors.daemon import Settings
    from firezone_relay.actors.portal_session import PortalSession

__all__ = ["SUPERVISOR_ROUTES", "Supervisor", "WorkerTotals", "run_supervised"]

logger = logging.getLogger("relay")

SHUTDOWN_BUDGET: Final = 2.0  # SIGTERM to exit, seconds
#: a worker still running this long after its SIGTERM is killed
WORKER_STOP_GRACE: Final = 1.4
#: how long the admin socket waits for the workers' answers
ADMIN_ANSWER_TIMEOUT: Final = 5.0
#: pause before restarting a worker that keeps failing at once (never more than this)
MAX_RESTART_DELAY: Final = 0.5

#: the counters among a worker's counts: summed over its past lives too, so that the relay's
#: totals never go backwards when a worker restarts
_COUNTERS: Final = ("responses", "relayed_bytes", "packet_sizes", "drops", "connection_events")


def _empty() -> dict[str, Any]:
    return {
        "allocations": 0,
        "channels": 0,
        "responses": [],
        "relayed_bytes": 0,
        "packet_sizes": [[], 0],
        "drops": {},
        "connections": {},
        "connection_events": {},
        "draining": False,
    }


class WorkerTotals:
    """The relay's ``MetricsSource``: the sum of the workers' latest ``WorkerStats`` (plus,
    for counters, what their earlier lives counted). Written on the loop, read by the HTTP
    threads: each reading works on a snapshot of immutable values."""

    def __init__(self, count: int) -> None:
        self.latest: list[dict[str, Any]] = [_empty() for _ in range(count)]
        self.retired: list[dict[str, Any]] = []

    def update(self, stats: WorkerStats) -> None:
        if 0 <= stats.index < len(self.latest):
            self.latest[stats.index] = {**_empty(), **stats.counts}

    def retire(self, index: int) -> None:
        """Worker ``index`` exited: keep its counters, forget its gauges."""
        last = self.latest[index]
        self.retired.append({**_empty(), **{k: last[k] for k in _COUNTERS}})
        self.latest[index] = _empty()

    def _all(self) -> list[dict[str, Any]]:
        return [*self.latest, *self.retired]

    def _int(self, key: str, rows: Sequence[dict[str, Any]] | None = None) -> int:
        return sum(int(r.get(key) or 0) for r in (rows if rows is not None else self._all()))

    def _dict(self, key: str, rows: Sequence[dict[str, Any]]) -> dict[str, int]:
        total: Counter[str] = Counter()
        for row in rows:
            value = row.get(key)
            if isinstance(value, dict):
                total.update({str(k): int(v) for k, v in value.items()})
        return dict(total)

    def num_allocations(self) -> int:
        return self._int("allocations", self.latest)

    def num_channels(self) -> int:
        return self._int("channels", self.latest)

    def responses(self) -> dict[tuple[str, str, int | None], int]:
        total: Counter[tuple[str, str, int | None]] = Counter()
        for row in self._all():
            for method, kind, code, n in row.get("responses") or ():
                total[str(method), str(kind), None if code is None else int(code)] += int(n)
        return dict(total)

    def relayed_bytes(self) -> int:
        return self._int("relayed_bytes")

    def packet_sizes(self) -> tuple[Sequence[int], float]:
        buckets: list[int] = []
        size_sum = 0.0
        for row in self._all():
            counts, part = row.get("packet_sizes") or ([], 0)
            if len(counts) > len(buckets):
                buckets += [0] * (len(counts) - len(buckets))
            for i, n in enumerate(counts):
                buckets[i] += int(n)
            size_sum += float(part)
        return buckets, size_sum

    def drop_counts(self) -> dict[str, int]:
        return self._dict("drops", self._all())

    def connection_counts(self) -> dict[str, int]:
        return self._dict("connections", self.latest)

    def connection_events(self) -> dict[str, int]:
        return self._dict("connection_events", self._all())

    def debug_routes(self) -> dict[str, object]:
        return {"workers": len(self.latest), "note": "ask each worker (not yet fanned out)"}

    def draining(self) -> bool:
        return any(bool(r.get("draining")) for r in self.latest)


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    channel: WorkerChannel | None = None
    pidfd: int = -1
    ready: bool = False
    started: float = 0.0
    #: restarts in a row of a worker that died within a second of starting
    quick_failures: int = 0
    ever_ready: bool = False


@dataclass
class _Sockets:
    """The supervisor's copies of every worker's listen sockets (kept open for the relay's
    life: the reuseport groups never change)."""

    udp: list[dict[Family, socket.socket]] = field(default_factory=list)
    streams: list[dict[tuple[Family, int], socket.socket]] = field(default_factory=list)

    def fds(self, index: int) -> tuple[dict[Family, int], dict[tuple[Family, int], int]]:
        return (
            {f: s.fileno() for f, s in self.udp[index].items()},
            {k: s.fileno() for k, s in self.streams[index].items()},
        )

    def close(self) -> None:
        for udp in self.udp:
            for sock in udp.values():
                sock.close()
        for streams in self.streams:
            for sock in streams.values():
                sock.close()


class Supervisor:
    """The relay of ``count`` workers: sockets, workers, portal, endpoints and signals."""

    def __init__(
        self, settings: Settings, log_filter: LogFilter, count: int, log_format: str = "human"
    ) -> None:
        self.settings = settings
        self.log_filter = log_filter
        self.count = count
        self.log_format = log_format
        self.loop = asyncio.get_running_loop()
        #: every worker signs and checks with this one, and issues nonces with this key
        self.secret = settings.auth_secret or secrets.token_hex(32)
        self.nonce_key = secrets.token_bytes(32)
        #: the relay-wide allocation registry the workers' cores ask before an Allocate
        self.reservations = Reservations.from_config(settings.server)
        self.totals = WorkerTotals(count)
        self.workers = [_Worker(i) for i in range(count)]
        self.sockets = _Sockets()
        self.control = ControlActor.start(self._handlers(), loop=self.loop)
        self.endpoints = Endpoints(settings, log_filter, self.totals, lambda: self.ready, self.loop)
        self.portal: pykka.ActorRef[PortalSession] | None = None
        self.portal_joined = False
        self.standalone = settings.portal is None
        self.exit_code = 0
        self._stopping = asyncio.Event()
        self._started = False
        #: drain: a worker that exits is not restarted; the relay stops when none is left
        self.draining = False
        self.offload = Offload(settings.xdp)
        #: the XDP map manager as a route sink (None: userspace only)
        self.xdp: XdpRouteSink | None = None
        #: each worker's channel routes in the XDP maps, removed when the worker exits
        self.xdp_routes: list[dict[tuple[object, int], ChannelCommand]] = [{} for _ in range(count)]
        self._requests = 0
        self._pending: dict[int, asyncio.Future[tuple[int, dict[str, Any]]]] = {}
        log_filter.on_change.append(self._log_filter_changed)
        self.endpoints.before_scrape = self._fresh_totals

    def _handlers(self) -> dict[type[object], Callable[[Any], None]]:
        return {kind: functools.partial(handle, self) for kind, handle in SUPERVISOR_ROUTES.items()}

    # -- readiness ------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        if self.draining or self.totals.draining() or not all(w.ready for w in self.workers):
            return False
        return self.standalone or self.portal_joined

    # -- lifecycle ------------------------------------------------------------------------

    async def run(self) -> int:
        self._handle_signals()
        try:
            await self.start()
        except Exception as exc:
            logger.error("%s" if isinstance(exc, StartupError) else "failed to start: %s", exc)
            await self._stop_workers()
            self.endpoints.stop()
            self.sockets.close()
            with contextlib.suppress(pykka.ActorDeadError):
                self.control.stop(block=False)
            return 1
        await self._stopping.wait()
        await self.shutdown()
        return self.exit_code

    async def start(self) -> None:
        raise_nofile_limit()
        self.endpoints.start_telemetry()
        await self.endpoints.start()
        # XDP once for the host, before any worker can bind a channel
        await self.offload.start(self.loop, [], self.endpoints)
        if self.offload.ref is not None:
            self.xdp = XdpRouteSink(self.offload.ref)
        if self.settings.admin_socket:
            admin = WorkersAdminEndpoint(
                self.settings.admin_socket, self, self.settings.admin_socket_required
            )
            await admin.start()
            self.endpoints.http.append(admin)
        self._bind_sockets()
        for worker in self.workers:
            self._spawn(worker)
        await self._wait_started()
        self._started = True
        if self.settings.portal is None:
            self._announce_secret()
        else:
            self._start_portal()
        self.endpoints.log_stats_every(self.loop, self.settings.stats_interval)
        logger.info("%d workers running", self.count)

    async def _wait_started(self) -> None:
        """Every worker up, or the start failed (a worker that exits before it was ever
        ready is a configuration or bind problem, which it has logged)."""
        while not all(w.ever_ready for w in self.workers):
            if self._stopping.is_set():
                raise StartupError("stopped while starting")
            failed = [w for w in self.workers if w.proc is not None and w.proc.poll() is not None]
            failed += [w for w in self.workers if w.proc is None]
            if failed and not all(w.ever_ready for w in failed):
                raise StartupError(f"worker {failed[0].index} failed to start")
            await asyncio.sleep(0.02)

    def _bind_sockets(self) -> None:
        """N UDP sockets per family on the listen port, steered by source; N TCP/TLS listeners
        per family and stream port (a connection stays with the worker that accepted it)."""
        s, config = self.settings, self.settings.server
        hosts = {Family.V4: s.bind_ip4, Family.V6: s.bind_ip6}
        stream_ports = ([config.listen_port] if s.tcp else []) + (
            [s.tls_listen_port] if s.tls_cert_file is not None else []
        )
        self.sockets.udp = [{} for _ in range(self.count)]
        self.sockets.streams = [{} for _ in range(self.count)]
        for family, public in ((Family.V4, config.public_ip4), (Family.V6, config.public_ip6)):
            if public is None:
                continue
            host = hosts[family]
            with binding("listen socket", host, config.listen_port):
                for i in range(self.count):
                    self.sockets.udp[i][family] = bind_udp(
                        family,
                        host,
                        config.listen_port,
                        buffer_bytes=LISTEN_BUFFER_BYTES,
                        reuse_port=True,
                    )
            try:
                attach_steering(self.sockets.udp[0][family], family, self.count)
            except OSError as exc:
                logger.warning(
                    "steering program refused (%s): the kernel's hash spreads clients, and a "
                    "worker's restart may move some",
                    exc,
                )
            logger.info(
                "listening on %s:%d (%s, public %s, %d workers)",
                host,
                config.listen_port,
                family.name,
                public,
                self.count,
            )
            for port in stream_ports:
                with binding("TCP/TLS listen socket", host, port):
                    for i in range(self.count):
                        sock = reuseport_socket(family, socket.SOCK_STREAM)
                        self.sockets.streams[i][family, port] = sock
                        sock.bind((host, port))
                        sock.listen(1024)

    def _spawn(self, worker: _Worker) -> None:
        """Start worker ``worker.index`` on its sockets (again, after it exited)."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        udp_fds, stream_fds = self.sockets.fds(worker.index)
        spec = WorkerSpec(
            index=worker.index,
            count=self.count,
            settings=worker_settings(
                self.settings, worker.index, self.count, self.secret, self.nonce_key
            ),
            supervisor_pid=os.getpid(),
            channel_fd=child.fileno(),
            udp_fds=udp_fds,
            stream_fds=stream_fds,
            log_format=self.log_format,
            log_directives=self.log_filter.current or "info",
            xdp_routes=self.xdp is not None,
            port_counts_fd=self.offload.port_counts_fd,
        )
        counts = () if spec.port_counts_fd is None else (spec.port_counts_fd,)
        fds = (child.fileno(), *udp_fds.values(), *stream_fds.values(), *counts)
        proc = subprocess.Popen(
            [sys.executable, "-m", "firezone_relay.actors.worker"],
            stdin=subprocess.PIPE,
            pass_fds=fds,
            # a terminal's Ctrl-C is the supervisor's to act on (it stops the workers)
            process_group=0,
        )
        child.close()
        assert proc.stdin is not None
        with contextlib.suppress(OSError):
            proc.stdin.write(pickle.dumps(spec))
            proc.stdin.close()
        worker.proc = proc
        worker.ready = False
        worker.started = time.monotonic()
        worker.pidfd = os.pidfd_open(proc.pid)
        self.loop.add_reader(worker.pidfd, self._on_exit, worker)
        channel = WorkerChannel(
            functools.partial(self._on_message, worker), functools.partial(self._on_lost, worker)
        )
        worker.channel = channel
        parent.setblocking(False)
        self.loop.create_task(self._connect(channel, parent))
        logger.info("worker %d started (pid %d)", worker.index, proc.pid)

    async def _connect(self, channel: WorkerChannel, sock: socket.socket) -> None:
        await self.loop.connect_accepted_socket(lambda: channel, sock)

    def _on_message(self, worker: _Worker, message: object) -> None:
        if worker.channel is None:
            return
        if isinstance(message, WorkerStats) and message.index == worker.index:
            self.totals.update(message)
        elif isinstance(message, Forward):
            self._forward(worker, message)
        elif isinstance(message, RegistryAsk):
            self._registry(worker, message)
        elif isinstance(message, XdpRoutes) and message.index == worker.index:
            self._xdp_routes(worker, message)
        elif isinstance(message, AdminAnswer):
            future = self._pending.get(message.request)
            if future is not None and not future.done():
                future.set_result((message.status, message.body))
        elif isinstance(message, WorkerReady) and message.index == worker.index:
            worker.ready = worker.ever_ready = True
            worker.quick_failures = 0
            logger.info("worker %d ready (pid %d)", worker.index, message.pid)

    def _forward(self, worker: _Worker, message: Forward) -> None:
        """The relay loop between two workers' allocations: passed on as it is, to the worker
        it names (which judges it as a peer datagram)."""
        if 0 <= message.worker < self.count and message.worker != worker.index:
            target = self.workers[message.worker].channel
            if target is not None:
                target.send(message)

    def _registry(self, worker: _Worker, ask: RegistryAsk) -> None:
        """A worker's core asks the registry (as the worker this channel belongs to); each
        answer goes to the worker it names: an eviction to the owner first, then the grant."""
        request: RegistryRequest
        if ask.reserve:
            try:
                client = five_tuple(ask.client)
            except ValueError as exc:
                logger.error("worker %d sent a bad reservation: %s", worker.index, exc)
                return
            request = ReserveAllocation(ask.ticket, client, ask.username, ask.user)
        else:
            request = ReleaseAllocation(ask.ticket)
        for told in self.reservations.handle(worker.index, request):
            channel = self.workers[told.worker].channel
            if channel is None:
                continue
            if isinstance(told, EvictAllocation):
                channel.send(RegistryTell(told.ticket, True, None, five_tuple_row(told.by)))
            else:
                refusal = None if told.refusal is None else int(told.refusal)
                channel.send(RegistryTell(told.ticket, False, refusal, []))

    def _xdp_routes(self, worker: _Worker, message: XdpRoutes) -> None:
        """A worker's channel commands, to the map manager; what it created is remembered,
        so that its routes leave the maps with it."""
        if self.xdp is None:
            return
        try:
            commands = route_commands(message.commands)
        except ValueError as exc:
            logger.error("worker %d sent bad routes: %s", worker.index, exc)
            return
        live = self.xdp_routes[worker.index]
        for command in commands:
            key = (command.client, command.channel)
            if isinstance(command, CreateChannelBinding):
                live[key] = command
            else:
                live.pop(key, None)
        self.xdp.sync_routes(commands)

    def _forget_xdp_routes(self, worker: _Worker) -> None:
        live, self.xdp_routes[worker.index] = self.xdp_routes[worker.index], {}
        if self.xdp is not None and live:
            self.xdp.sync_routes(
                tuple(
                    DeleteChannelBinding(c.client, c.channel, c.peer, c.allocation_port)
                    for c in live.values()
                )
            )
            logger.info("worker %d: %d channel routes left the XDP maps", worker.index, len(live))

    def _on_lost(self, worker: _Worker) -> None:
        worker.ready = False

    def _on_exit(self, worker: _Worker) -> None:
        """A worker's process ended: reap it and, unless the relay is stopping, start it again
        on the same sockets."""
        self.loop.remove_reader(worker.pidfd)
        os.close(worker.pidfd)
        worker.pidfd = -1
        assert worker.proc is not None
        code = worker.proc.wait()
        worker.ready = False
        if worker.channel is not None:
            worker.channel.close()
            worker.channel = None
        self.totals.retire(worker.index)
        self._forget_xdp_routes(worker)
        self.reservations.worker_gone(worker.index)
        if self._stopping.is_set() or not self._started:
            return
        if self.draining:
            logger.info("worker %d drained (%s)", worker.index, _describe(code))
            if all(w.proc is None or w.proc.poll() is not None for w in self.workers):
                self.request_stop(0, "drained: no allocation left")
            return
        lived = time.monotonic() - worker.started
        worker.quick_failures = worker.quick_failures + 1 if lived < 1.0 else 0
        delay = min(MAX_RESTART_DELAY, 0.1 * max(0, worker.quick_failures - 1))
        logger.warning(
            "worker %d (pid %d) exited with %s after %.1f s: restarting it%s",
            worker.index,
            worker.proc.pid,
            _describe(code),
            lived,
            f" in {delay:.1f} s" if delay else "",
        )
        self.loop.call_later(delay, self._respawn, worker)

    def _respawn(self, worker: _Worker) -> None:
        if not self._stopping.is_set():
            self._spawn(worker)

    def _handle_signals(self) -> None:
        for sig in (*STOP_CLEAN, *FAILURE_EXIT):
            message = Shutdown(exit_code(sig), signal.Signals(sig).name)
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                self.loop.add_signal_handler(sig, self._on_stop_signal, sig, message)
        for sig in (RELOAD, DRAIN):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                self.loop.add_signal_handler(sig, self._forward_signal, sig)
        for sig in IGNORED:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                self.loop.add_signal_handler(sig, logger.info, "%s received: ignored", sig)

    def _on_stop_signal(self, sig: int, message: Shutdown) -> None:
        logger.info("%s received: stopping", signal.Signals(sig).name)
        tell(self.control, message)

    def _forward_signal(self, sig: int) -> None:
        """SIGHUP (reload) and SIGUSR1 (drain) are each worker's to act on."""
        logger.info("%s received: passed to the workers", signal.Signals(sig).name)
        if sig == DRAIN:
            self.draining = True
        self._signal_workers(sig)

    # -- the operator's verbs, asked of every worker --------------------------------------

    async def ask_workers(
        self, verb: str, arguments: dict[str, Any]
    ) -> list[tuple[int, dict[str, Any]] | None]:
        """Each worker's answer to one verb (None: down, or no answer in time)."""
        asked: list[tuple[int, asyncio.Future[tuple[int, dict[str, Any]]]] | None] = []
        for worker in self.workers:
            if worker.channel is None or not worker.ready:
                asked.append(None)
                continue
            self._requests += 1
            future = self.loop.create_future()
            self._pending[self._requests] = future
            worker.channel.send(AdminRequest(self._requests, verb, arguments))
            asked.append((self._requests, future))
        deadline = self.loop.time() + ADMIN_ANSWER_TIMEOUT
        answers: list[tuple[int, dict[str, Any]] | None] = []
        for item in asked:
            if item is None:
                answers.append(None)
                continue
            request, future = item
            try:
                answers.append(
                    await asyncio.wait_for(future, max(0.0, deadline - self.loop.time()))
                )
            except TimeoutError:
                answers.append(None)
            finally:
                self._pending.pop(request, None)
        return answers

    async def admin(
        self, method: str, path: str, query: dict[str, list[str]]
    ) -> tuple[int, dict[str, Any]]:
        """The admin socket's verbs for the relay as a whole: asked of each worker, the
        answers merged (``sessions`` rows say their ``worker``)."""
        if (method, path) == ("POST", "/drain"):
            self.draining = True
        answers = await self.ask_workers(f"{method} {path}", dict(query))
        missing = [i for i, a in enumerate(answers) if a is None]
        got = [(i, a[0], a[1]) for i, a in enumerate(answers) if a is not None]
        for _, status, body in got:
            if status == 400:
                return 400, body
        merged = _MERGES[path](got)
        if path == "/stats":  # the XDP program is the supervisor's
            xdp = self.offload.totals()
            merged[1]["xdp"] = None if xdp is None else {"datagrams": xdp[0], "bytes": xdp[1]}
        if missing:
            merged[1]["missing_workers"] = missing
        return merged

    def _fresh_totals(self) -> None:
        """From an HTTP thread, before ``/metrics``: every live worker's counts as of now (it
        answers after everything it has read), so a scrape never lags the traffic."""
        if self._stopping.is_set():
            return
        future = asyncio.run_coroutine_threadsafe(self._refresh_totals(), self.loop)
        with contextlib.suppress(Exception):
            future.result(ADMIN_ANSWER_TIMEOUT + 1)

    async def _refresh_totals(self) -> None:
        answers = await self.ask_workers("GET /snapshot", {})
        for index, answer in enumerate(answers):
            if answer is not None and answer[0] == 200:
                self.totals.update(WorkerStats(index, answer[1]))

    def _log_filter_changed(self, directives: str) -> None:
        """``POST /log_filter`` on the supervisor: every worker takes the same directives."""
        self.loop.call_soon_threadsafe(self._send_log_filter, directives)

    def _send_log_filter(self, directives: str) -> None:
        self.loop.create_task(self.ask_workers("POST /log_filter", {"directives": [directives]}))

    def _signal_workers(self, sig: int) -> None:
        for worker in self.workers:
            if worker.proc is not None and worker.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.send_signal(sig)

    def _announce_secret(self) -> None:
        origin = self.settings.secret_origin
        if self.settings.auth_secret is None:
            logger.warning(
                "standalone mode: the auth secret was generated for this run (not logged); keep "
                "one with --auth-secret or --auth-secret-file FILE"
            )
        else:
            where = origin.origin if origin is not None else "--auth-secret"
            logger.info(
                "standalone mode, auth scheme %s: auth secret from %s",
                self.settings.server.auth_scheme,
                where,
            )

    def _start_portal(self) -> None:
        from firezone_relay.actors.portal_session import PortalSession

        assert self.settings.portal is not None
        self.portal = PortalSession.start(self.settings.portal, self.control, loop=self.loop)
        self.portal.tell(PortalConnect(self.secret))

    def request_stop(self, code: int = 0, reason: str = "") -> None:
        if self._stopping.is_set():
            return
        logger.info("shutting down%s", f" ({reason})" if reason else "")
        self.exit_code = code
        self._stopping.set()

    async def _stop_workers(self) -> None:
        """SIGTERM every worker; SIGKILL what still runs after the grace."""
        self._stopping.set()
        self._signal_workers(signal.SIGTERM)
        deadline = time.monotonic() + WORKER_STOP_GRACE
        while time.monotonic() < deadline:
            if all(w.proc is None or w.proc.poll() is not None for w in self.workers):
                break
            await asyncio.sleep(0.02)
        for worker in self.workers:
            if worker.proc is not None and worker.proc.poll() is None:
                logger.warning("worker %d did not stop in time: killed", worker.index)
                worker.proc.kill()
                worker.proc.wait()
            if worker.pidfd >= 0:
                self.loop.remove_reader(worker.pidfd)
                os.close(worker.pidfd)
                worker.pidfd = -1

    async def shutdown(self) -> None:
        await self._stop_workers()
        if self.portal is not None:
            portal, self.portal = self.portal, None
            tell(portal, Shutdown(self.exit_code, "stopping"))
            tasks = [t for t in asyncio.all_tasks() if t.get_name() == "portal"]
            if tasks:
                await asyncio.wait(tasks, timeout=0.3)
        with contextlib.suppress(pykka.ActorDeadError):
            self.control.stop(block=False)
        self.endpoints.stop()
        self.sockets.close()
        self.log_filter.flush_suppressed()

    def finish(self) -> None:
        self.offload.stop(0.8)
        self.endpoints.stop()
        self.endpoints.shutdown_telemetry(0.3)

    # -- control messages (see SUPERVISOR_ROUTES) -----------------------------------------

    def _on_portal_joined(self, _message: PortalJoined) -> None:
        self.portal_joined = True

    def _on_portal_closed(self, _message: PortalClosed) -> None:
        self.portal_joined = False

    def _on_portal_fatal(self, message: PortalFatal) -> None:
        self.request_stop(1, f"portal: {message.reason}")

    def _on_shutdown(self, message: Shutdown) -> None:
        self.request_stop(message.code, message.reason)

    def _on_reload(self, _message: Reload) -> None:
        self._signal_workers(RELOAD)


Answers = list[tuple[int, int, dict[str, Any]]]  # (worker, status, body)


def _merge_sessions(got: Answers) -> tuple[int, dict[str, Any]]:
    rows = [
        {"worker": i, **row}
        for i, _, body in got
        for row in body.get("sessions") or ()
        if isinstance(row, dict)
    ]
    rows.sort(key=lambda r: (str(r.get("user")), int(r.get("id") or 0)))
    return 200, {"sessions": rows}


def _sum_into(total: dict[str, Any], part: object) -> None:
    if not isinstance(part, dict):
        return
    for key, value in part.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            total[key] = total.get(key, 0) + value


def _merge_stats(got: Answers) -> tuple[int, dict[str, Any]]:
    body: dict[str, Any] = {
        "time": time.time(),
        "allocations": 0,
        "channels": 0,
        "draining": False,
        "totals": {},
        "userspace": {},
        "xdp": None,
        "connections": {},
        "drops": {},
        "top": [],
        "workers": len(got),
    }
    for i, _, part in got:
        body["allocations"] += int(part.get("allocations") or 0)
        body["channels"] += int(part.get("channels") or 0)
        body["draining"] = body["draining"] or bool(part.get("draining"))
        for key in ("totals", "userspace", "connections", "drops"):
            _sum_into(body[key], part.get(key))
        body["top"] += [{"worker": i, **r} for r in part.get("top") or () if isinstance(r, dict)]
    body["top"].sort(key=lambda r: float(r.get("bytes_per_s") or 0), reverse=True)
    limit = max((len(p.get("top") or ()) for _, _, p in got), default=0)
    body["top"] = body["top"][:limit]
    return 200, body


def _merge_disconnect(got: Answers) -> tuple[int, dict[str, Any]]:
    ids = [port for _, _, body in got for port in body.get("ids") or ()]
    if not ids:
        return 404, {"error": "no such allocation", "disconnected": 0}
    return 200, {"disconnected": len(ids), "ids": sorted(ids)}


def _merge_drain(got: Answers) -> tuple[int, dict[str, Any]]:
    allocations = sum(int(body.get("allocations") or 0) for _, _, body in got)
    deadline = next((body.get("deadline_s") for _, _, body in got), None)
    return 200, {"draining": True, "allocations": allocations, "deadline_s": deadline}


def _merge_reload(got: Answers) -> tuple[int, dict[str, Any]]:
    ok = bool(got) and all(status == 200 and body.get("ok") for _, status, body in got)
    body: dict[str, Any] = dict(got[0][2]) if got else {}
    body["ok"] = ok
    body["workers"] = [{"worker": i, **part} for i, _, part in got]
    return (200 if ok else 409), body


_MERGES: Final[Mapping[str, Callable[[Answers], tuple[int, dict[str, Any]]]]] = {
    "/sessions": _merge_sessions,
    "/stats": _merge_stats,
    "/disconnect": _merge_disconnect,
    "/drain": _merge_drain,
    "/reload": _merge_reload,
}
_VERBS: Final = {
    ("GET", "/sessions"),
    ("GET", "/stats"),
    ("POST", "/disconnect"),
    ("POST", "/drain"),
    ("POST", "/reload"),
}


def _unused(_query: dict[str, list[str]]) -> tuple[int, str, bytes]:
    raise AssertionError("answered by WorkersAdminEndpoint._dispatch")


class WorkersAdminEndpoint(AdminEndpoint):
    """The admin socket of a relay of several workers: the same verbs, same checks on who
    may ask, each answered by the workers together (``Supervisor.admin``)."""

    def __init__(self, path: str, supervisor: Supervisor, required: bool) -> None:
        super().__init__(path, dict.fromkeys(_VERBS, _unused), required)
        self.supervisor = supervisor

    async def _dispatch(self, method: str, target: str) -> tuple[int, str, bytes]:
        from urllib.parse import parse_qs, urlsplit

        try:
            url = urlsplit(target)
            query = parse_qs(url.query, keep_blank_values=True, max_num_fields=32)
        except ValueError:
            return 400, "text/plain", b"Bad Request"
        if (method, url.path) not in _VERBS:
            known = any(path == url.path for _, path in _VERBS)
            return (405, "text/plain", b"Method Not Allowed") if known else (
                404, "text/plain", b"Not Found")  # fmt: skip
        try:
            status, body = await self.supervisor.admin(method, url.path, query)
        except Exception as exc:
            logger.error("admin socket: %s %s failed: %r", method, url.path, exc)
            return 500, "text/plain", b"internal error"
        return status, "application/json", (json.dumps(body) + "\n").encode()


def _describe(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return signal.Signals(-code).name
    return f"code {code}"


#: The supervisor's control inputs, as ``actors.daemon.CONTROL_ROUTES`` is the relay's.
SUPERVISOR_ROUTES: Final[Mapping[type[object], Callable[[Supervisor, Any], None]]] = {
    PortalJoined: Supervisor._on_portal_joined,
    PortalClosed: Supervisor._on_portal_closed,
    PortalFatal: Supervisor._on_portal_fatal,
    Shutdown: Supervisor._on_shutdown,
    Reload: Supervisor._on_reload,
}


def run_supervised(
    settings: Settings, log_filter: LogFilter, count: int, log_format: str = "human"
) -> int:
    """Run a relay of ``count`` workers until it is told to stop; returns the exit code."""
    import uvloop

    loop = uvloop.new_event_loop()
    supervisor: Supervisor | None = None

    async def main() -> int:
        nonlocal supervisor
        supervisor = Supervisor(settings, log_filter, count, log_format)
        return await supervisor.run()

    try:
        code = loop.run_until_complete(main())
    finally:
        if supervisor is not None:
            supervisor.finish()
        with contextlib.suppress(Exception):
            loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
    return code
