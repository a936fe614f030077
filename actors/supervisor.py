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

from firezone_relay.actors.control import (
    ControlActor,
    PortalClosed,
    PortalConnect,
    PortalFatal,
    PortalJoined,
    Reload,
    Shutdown,
    tell,
)
from firezone_relay.actors.endpoints import Endpoints
from firezone_relay.actors.logs import LogFilter
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
from firezone_relay.actors.worker_channel import WorkerChannel, WorkerReady, WorkerStats
from firezone_relay.protocol.types import Family

if TYPE_CHECKING:
    from firezone_relay.actors.daemon import Settings
    from firezone_relay.actors.portal_session import PortalSession

__all__ = ["SUPERVISOR_ROUTES", "Supervisor", "WorkerTotals", "run_supervised"]

logger = logging.getLogger("relay")

SHUTDOWN_BUDGET: Final = 2.0  # SIGTERM to exit, seconds
#: a worker still running this long after its SIGTERM is killed
WORKER_STOP_GRACE: Final = 1.4
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
        #: every worker signs and checks with this one
        self.secret = settings.auth_secret or secrets.token_hex(32)
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

    def _handlers(self) -> dict[type[object], Callable[[Any], None]]:
        return {kind: functools.partial(handle, self) for kind, handle in SUPERVISOR_ROUTES.items()}

    # -- readiness ------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        if not all(w.ready for w in self.workers) or self.totals.draining():
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
        if self.settings.xdp is not None:
            if self.settings.xdp.mandatory:
                raise StartupError(
                    "--ebpf-mandatory: XDP with several workers is not available yet; "
                    "run --num-worker-threads 1"
                )
            logger.warning("XDP offload is off with several workers (not available yet)")
        self.endpoints.start_telemetry()
        await self.endpoints.start()
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
            settings=worker_settings(self.settings, worker.index, self.count, self.secret),
            supervisor_pid=os.getpid(),
            channel_fd=child.fileno(),
            udp_fds=udp_fds,
            stream_fds=stream_fds,
            log_format=self.log_format,
            log_directives=self.log_filter.current or "info",
        )
        fds = (child.fileno(), *udp_fds.values(), *stream_fds.values())
        proc = subprocess.Popen(
            [sys.executable, "-m", "firezone_relay.actors.worker"],
            stdin=subprocess.PIPE,
            pass_fds=fds,
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
        elif isinstance(message, WorkerReady) and message.index == worker.index:
            worker.ready = worker.ever_ready = True
            worker.quick_failures = 0
            logger.info("worker %d ready (pid %d)", worker.index, message.pid)

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
        if self._stopping.is_set() or not self._started:
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
        self._signal_workers(sig)

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
