"""The relay's endpoints and metrics: HTTP health/readiness/metrics and control endpoints, the
OpenTelemetry instruments, and the periodic stats line.

They read the data path through ``MetricsSource`` (plain ints and dicts, read on collection),
so that a relay of several workers can give them one source summing its workers; the XDP
offload adds its own histogram sources (``actors.offload``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from firezone_relay.actors import udpio
from firezone_relay.actors.http_endpoints import HttpEndpoint, parse_host_port
from firezone_relay.actors.logs import LogFilter
from firezone_relay.actors.startup_errors import binding
from firezone_relay.actors.telemetry import (
    BucketSource,
    HistogramBridge,
    Telemetry,
    packet_size_histogram,
)

if TYPE_CHECKING:
    from firezone_relay.actors.daemon import Settings

__all__ = ["Endpoints", "MetricsSource"]

logger = logging.getLogger("relay")

Reply = tuple[int, str, bytes]


class MetricsSource(Protocol):
    """What the endpoints and metrics read from the data path (``actors.datapath.DataPath``)."""

    def num_allocations(self) -> int: ...
    def num_channels(self) -> int: ...
    def responses(self) -> dict[tuple[str, str, int | None], int]: ...
    def relayed_bytes(self) -> int: ...
    def packet_sizes(self) -> tuple[Sequence[int], float]: ...
    def drop_counts(self) -> dict[str, int]: ...
    def connection_counts(self) -> dict[str, int]: ...
    def connection_events(self) -> dict[str, int]: ...
    def debug_routes(self) -> dict[str, object]: ...


class Endpoints:
    """HTTP endpoints, telemetry and the stats line over one ``MetricsSource``; ``ready``
    says whether ``/readyz`` answers 200."""

    def __init__(
        self,
        settings: Settings,
        log_filter: LogFilter,
        source: MetricsSource,
        ready: Callable[[], bool],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.loop = loop
        self.settings = settings
        self.log_filter = log_filter
        self.source = source
        self.ready = ready
        self.http: list[HttpEndpoint] = []
        self.packet_sizes = packet_size_histogram(
            [BucketSource({"relay.datapath": "userspace"}, source.packet_sizes)]
        )
        self.bridge = HistogramBridge([self.packet_sizes])
        self.telemetry: Telemetry | None = None
        #: called (on an HTTP thread) before ``/metrics`` is rendered: a supervisor fetches its
        #: workers' current counts, so a scrape sees everything relayed before it
        self.before_scrape: Callable[[], None] | None = None
        self._last_stats = (time.monotonic(), 0)
        self._stats_timer: asyncio.TimerHandle | None = None

    def start_telemetry(self) -> Telemetry:
        s, source = self.settings, self.source
        self.telemetry = Telemetry(
            allocations=source.num_allocations,
            channels=source.num_channels,
            responses=source.responses,
            drops=source.drop_counts,
            bridge=self.bridge,
            connections=source.connection_counts,
            connection_events=source.connection_events,
            otlp_endpoint=s.otlp_grpc_endpoint,
            export_interval_ms=s.export_interval_ms,
            resource_attributes=s.resource_attributes,
            datapath={"relay.userspace.impl": udpio.IMPL},
            export_metrics=s.export_metrics,
        )
        return self.telemetry

    async def start(self) -> None:
        """Bind and serve the configured HTTP endpoints (a bind failure is a StartupError)."""
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
            control = {
                ("POST", "/log_filter"): self._log_filter,
                ("GET", "/debug/routes"): self._debug_routes,
            }
            wanted.append(("control", s.control_endpoint, control))
        for name, text, routes in wanted:
            address = parse_host_port(text)
            with binding(f"{name} endpoint", *address):
                endpoint = HttpEndpoint(name, address, routes)
                await endpoint.start()
            self.http.append(endpoint)

    def stop(self) -> None:
        if self._stats_timer is not None:
            self._stats_timer.cancel()
            self._stats_timer = None
        endpoints, self.http = self.http, []
        for endpoint in endpoints:
            with contextlib.suppress(Exception):  # after the loop ended: nothing left to close
                endpoint.stop()

    def shutdown_telemetry(self, timeout: float) -> None:
        if self.telemetry is not None:
            self.telemetry.shutdown(timeout)

    # -- the stats line -------------------------------------------------------------------

    def log_stats_every(self, loop: asyncio.AbstractEventLoop, interval: float) -> None:
        """Log allocations, channels and userspace throughput every ``interval`` seconds."""

        def tick() -> None:
            self.log_filter.flush_suppressed()
            now = time.monotonic()
            total = self.source.relayed_bytes()
            then, before = self._last_stats
            self._last_stats = (now, total)
            rate = (total - before) / max(now - then, 1e-9)
            logger.info(
                "Allocations = %d Channels = %d Throughput = %s",
                self.source.num_allocations(),
                self.source.num_channels(),
                _throughput(rate),
            )
            self._stats_timer = loop.call_later(interval, tick)

        self._stats_timer = loop.call_later(interval, tick)

    # -- HTTP handlers ----------------------------------------------------------------------

    def _readyz(self, _query: dict[str, list[str]]) -> Reply:
        from firezone_relay.actors.version import relay_version

        body = f"{relay_version()}\n".encode()
        return (200 if self.ready() else 503), "text/plain", body

    def _metrics(self, _query: dict[str, list[str]]) -> Reply:
        assert self.telemetry is not None
        if self.before_scrape is not None:
            self.before_scrape()
        text = self.telemetry.prometheus_text()
        return 200, "text/plain; version=0.0.4; charset=utf-8", text.encode()

    def _log_filter(self, query: dict[str, list[str]]) -> Reply:
        values = query.get("directives")
        if not values:
            return 400, "text/plain", b"missing directives\n"
        try:
            self.log_filter.apply(values[0])
        except ValueError as exc:
            return 400, "text/plain", f"{exc}\n".encode()
        logger.info("log filter set to %r", values[0])
        return 200, "text/plain", b"ok\n"

    def _debug_routes(self, _query: dict[str, list[str]]) -> Reply:
        """Handlers run on the HTTP pool, the tables change on the loop: the comparison runs
        on the loop, in one go."""
        answer: concurrent.futures.Future[dict[str, object]] = concurrent.futures.Future()

        def compare() -> None:
            try:
                answer.set_result(self.source.debug_routes())
            except Exception as exc:
                answer.set_exception(exc)

        self.loop.call_soon_threadsafe(compare)
        body = answer.result(timeout=10)
        return 200, "application/json", json.dumps(body).encode() + b"\n"


def _throughput(bytes_per_s: float) -> str:
    for unit in ("B/s", "kB/s", "MB/s", "GB/s"):
        if bytes_per_s < 1000 or unit == "GB/s":
            return f"{bytes_per_s:.2f} {unit}"
        bytes_per_s /= 1000
    raise AssertionError
