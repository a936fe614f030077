"""OpenTelemetry metrics over plain-int counters, OTLP/gRPC export and Prometheus text; and
the tracer provider for the relay's spans (made by ``actors.tracing`` and ``actors.portal``).

The per-packet path only bumps ints (``server.stats``, the data plane's counters). Here they are
published at collection time:

* observable instruments read the ints in their callbacks (``relay.active_allocations``,
  ``relay.responses`` and a few relay-specific extras);
* ``relay.packet.size`` is a histogram the core already keeps as an int bucket array (and the XDP
  program as a per-CPU one; likewise ``relay.xdp.processing.duration``). The Python SDK (1.45)
  has no MetricProducer hook, and feeding the arrays through ``Histogram.record`` would cost one
  SDK call per packet, so :class:`HistogramBridge` turns each array into a histogram data point
  when metrics are collected; :class:`BridgingExporter` adds them to every export (OTLP) and
  :func:`render_prometheus` to ``/metrics``. Temporality follows the exporter's preference
  (delta for histograms by default, as the reference's LowMemory setting).

Resource: ``service.name=relay`` (unless OTEL_SERVICE_NAME says otherwise),
``service.namespace=firezone``, plus OTEL_RESOURCE_ATTRIBUTES. Exporter settings come from the
usual OTEL_EXPORTER_OTLP_* variables; ``--otlp-grpc-endpoint host:port`` sets the endpoint, for
spans too (as Firezone's relay sends both there). Cloud metadata discovery may add resource
attributes (``actors.metadata``).
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import Counter as SdkCounter
from opentelemetry.sdk.metrics import Histogram as SdkHistogram
from opentelemetry.sdk.metrics import (
    MeterProvider,
    ObservableCounter,
    ObservableGauge,
    ObservableUpDownCounter,
)
from opentelemetry.sdk.metrics import UpDownCounter as SdkUpDownCounter
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Gauge,
    Histogram,
    HistogramDataPoint,
    InMemoryMetricReader,
    Metric,
    MetricExporter,
    MetricExportResult,
    MetricReader,
    MetricsData,
    PeriodicExportingMetricReader,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.util.types import Attributes, AttributeValue

__all__ = [
    "BridgingExporter",
    "BucketHistogram",
    "BucketSource",
    "HistogramBridge",
    "Telemetry",
    "make_resource",
    "render_prometheus",
]

METER_NAME = "relay"
TRACER_NAME = "relay"
#: upper bounds of relay.packet.size buckets (the core's 16 buckets: 15 bounds + overflow)
PACKET_SIZE_BOUNDS: tuple[float, ...] = tuple(float(100 * i) for i in range(1, 16))

#: Firezone's exporter (``Temporality::LowMemory`` of opentelemetry_sdk 0.32): synchronous
#: counters and histograms delta, everything else cumulative. Firezone's ``relay.responses`` is
#: a synchronous counter; ours is observable (the data path only bumps ints), so observable
#: counters take the synchronous counter's delta here, and the exporter drops the zero
#: increments a synchronous counter would not have recorded.
LOW_MEMORY: dict[type, AggregationTemporality] = {
    SdkCounter: AggregationTemporality.DELTA,
    SdkUpDownCounter: AggregationTemporality.CUMULATIVE,
    SdkHistogram: AggregationTemporality.DELTA,
    ObservableCounter: AggregationTemporality.DELTA,
    ObservableUpDownCounter: AggregationTemporality.CUMULATIVE,
    ObservableGauge: AggregationTemporality.CUMULATIVE,
}


def make_resource(extra: Mapping[str, str] | None = None) -> Resource:
    """The relay's resource; ``extra`` (cloud metadata discovery) adds to
    OTEL_RESOURCE_ATTRIBUTES and wins over it, as Firezone's init script's export does."""
    attrs: dict[str, AttributeValue] = {**(extra or {}), "service.namespace": "firezone"}
    if not os.environ.get("OTEL_SERVICE_NAME"):
        attrs["service.name"] = "relay"
    return Resource.create(attrs)


@dataclass(frozen=True, slots=True)
class BucketSource:
    """One attribute set of a bridged histogram: a reader of its cumulative int buckets."""

    attributes: dict[str, str]
    #: () -> (bucket counts since start, sum of the recorded values)
    read: Callable[[], tuple[Sequence[int], float]]


Snapshot = dict[tuple[str, tuple[tuple[str, str], ...]], tuple[list[int], float]]


@dataclass
class BucketHistogram:
    """A histogram whose buckets are counted elsewhere as plain ints."""

    name: str
    unit: str
    description: str
    bounds: tuple[float, ...]
    sources: list[BucketSource]


class HistogramBridge:
    """Turns int bucket arrays into OpenTelemetry histogram metrics at collection time."""

    def __init__(self, histograms: Iterable[BucketHistogram] = ()) -> None:
        self.histograms = list(histograms)
        self._start_ns = time.time_ns()

    def add(self, histogram: BucketHistogram) -> None:
        self.histograms.append(histogram)

    def snapshot(self) -> Snapshot:
        snap: Snapshot = {}
        for h in self.histograms:
            for src in h.sources:
                buckets, total = src.read()
                snap[(h.name, tuple(sorted(src.attributes.items())))] = (list(buckets), total)
        return snap

    def metrics(
        self,
        temporality: AggregationTemporality,
        previous: Snapshot | None = None,
        previous_ns: int | None = None,
        snapshot: Snapshot | None = None,
    ) -> list[Metric]:
        now_ns = time.time_ns()
        snap = snapshot if snapshot is not None else self.snapshot()
        out = []
        for h in self.histograms:
            points = []
            for src in h.sources:
                key = (h.name, tuple(sorted(src.attributes.items())))
                buckets, total = snap[key]
                start_ns = self._start_ns
                if temporality is AggregationTemporality.DELTA and previous is not None:
                    prev_buckets, prev_total = previous.get(key, ([0] * len(buckets), 0))
                    buckets = [a - b for a, b in zip(buckets, prev_buckets, strict=True)]
                    total -= prev_total
                    start_ns = previous_ns or start_ns
                lo, hi = _bounds_of(buckets, h.bounds)
                points.append(
                    HistogramDataPoint(
                        attributes=dict(src.attributes),
                        start_time_unix_nano=start_ns,
                        time_unix_nano=now_ns,
                        count=sum(buckets),
                        sum=total,
                        bucket_counts=buckets,
                        explicit_bounds=list(h.bounds),
                        min=lo,
                        max=hi,
                    )
                )
            out.append(
                Metric(
                    name=h.name,
                    description=h.description,
                    unit=h.unit,
                    data=Histogram(data_points=points, aggregation_temporality=temporality),
                )
            )
        return out


def packet_size_histogram(sources: Iterable[BucketSource]) -> BucketHistogram:
    return BucketHistogram(
        "relay.packet.size", "By", "Size of relayed packets", PACKET_SIZE_BOUNDS, list(sources)
    )


def _bounds_of(buckets: Sequence[int], bounds: Sequence[float]) -> tuple[float, float]:
    """Bucket-resolution min and max (exact values are not tracked per packet); the open top
    bucket reports its lower bound."""
    used = [i for i, c in enumerate(buckets) if c]
    if not used:
        return 0.0, 0.0
    lo = bounds[used[0] - 1] if used[0] > 0 else 0.0
    hi = bounds[used[-1]] if used[-1] < len(bounds) else bounds[-1]
    return lo, hi


def add_metrics(data: MetricsData | None, metrics: list[Metric], resource: Resource) -> MetricsData:
    """``data`` with ``metrics`` appended to the relay meter's scope (created if absent)."""
    resource_metrics = list(data.resource_metrics) if data is not None else []
    if not resource_metrics:
        resource_metrics = [ResourceMetrics(resource=resource, scope_metrics=[], schema_url="")]
    first = resource_metrics[0]
    scopes = list(first.scope_metrics)
    for i, scope in enumerate(scopes):
        if scope.scope.name == METER_NAME:
            scopes[i] = ScopeMetrics(scope.scope, [*scope.metrics, *metrics], scope.schema_url)
            break
    else:
        scopes.append(ScopeMetrics(InstrumentationScope(METER_NAME), list(metrics), ""))
    resource_metrics[0] = ResourceMetrics(first.resource, scopes, first.schema_url)
    return MetricsData(resource_metrics=resource_metrics)


def _without_empty_deltas(data: MetricsData) -> MetricsData:
    """Delta sums as a synchronous counter exports them: only the attribute sets that counted
    something since the last export (an observable counter's delta has a 0 for each of the
    others), and no metric without points."""
    out = []
    for rm in data.resource_metrics:
        scopes = []
        for sm in rm.scope_metrics:
            metrics = []
            for m in sm.metrics:
                d = m.data
                if isinstance(d, Sum) and d.aggregation_temporality is AggregationTemporality.DELTA:
                    points = [p for p in d.data_points if p.value != 0]
                    if not points:
                        continue
                    d = Sum(points, d.aggregation_temporality, d.is_monotonic)
                    m = Metric(m.name, m.description, m.unit, d)
                metrics.append(m)
            scopes.append(ScopeMetrics(sm.scope, metrics, sm.schema_url))
        out.append(ResourceMetrics(rm.resource, scopes, rm.schema_url))
    return MetricsData(resource_metrics=out)


class BridgingExporter(MetricExporter):
    """Wraps an exporter and adds the bridged histograms to every export."""

    def __init__(self, inner: MetricExporter, bridge: HistogramBridge, resource: Resource):
        preferred = getattr(inner, "_preferred_temporality", None)
        super().__init__(
            preferred_temporality=preferred,
            preferred_aggregation=getattr(inner, "_preferred_aggregation", None),
        )
        self.inner = inner
        self.bridge = bridge
        self.resource = resource
        self.temporality = (preferred or {}).get(SdkHistogram, AggregationTemporality.CUMULATIVE)
        self._previous: Snapshot | None = None
        self._previous_ns: int | None = None

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: object
    ) -> MetricExportResult:
        snapshot = self.bridge.snapshot()
        metrics = self.bridge.metrics(self.temporality, self._previous, self._previous_ns, snapshot)
        self._previous, self._previous_ns = snapshot, time.time_ns()
        merged = add_metrics(_without_empty_deltas(metrics_data), metrics, self.resource)
        return self.inner.export(merged, timeout_millis=timeout_millis, **kwargs)

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self.inner.force_flush(timeout_millis=timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: object) -> None:
        self.inner.shutdown(timeout_millis=timeout_millis, **kwargs)


# -- Prometheus text ----------------------------------------------------------------------------


def _prom_name(name: str, unit: str | None) -> str:
    base = "".join(c if c.isalnum() else "_" for c in name)
    if unit == "By":
        base += "_bytes"
    elif unit == "s":
        base += "_seconds"
    return base


def _labels(attributes: Attributes, extra: str = "") -> str:
    items = []
    for key, value in (attributes or {}).items():
        k = "".join(c if c.isalnum() else "_" for c in str(key))
        v = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        items.append(f'{k}="{v}"')
    if extra:
        items.append(extra)
    return "{" + ",".join(items) + "}" if items else ""


def _num(value: float) -> str:
    if isinstance(value, float) and math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value) if isinstance(value, float) else str(value)


def render_prometheus(data: MetricsData | None) -> str:
    """Prometheus text exposition (format 0.0.4) of cumulative MetricsData."""
    lines: list[str] = []
    for rm in data.resource_metrics if data is not None else []:
        lines.append("# TYPE target_info gauge")
        lines.append(f"target_info{_labels(rm.resource.attributes)} 1")
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                d = m.data
                name = _prom_name(m.name, m.unit)
                if m.description:
                    lines.append(f"# HELP {name} {m.description}")
                if isinstance(d, Sum) and d.is_monotonic:
                    lines.append(f"# TYPE {name}_total counter")
                    lines += [
                        f"{name}_total{_labels(p.attributes)} {_num(p.value)}"
                        for p in d.data_points
                    ]
                elif isinstance(d, Sum | Gauge):
                    lines.append(f"# TYPE {name} gauge")
                    lines += [
                        f"{name}{_labels(p.attributes)} {_num(p.value)}" for p in d.data_points
                    ]
                elif isinstance(d, Histogram):
                    lines.append(f"# TYPE {name} histogram")
                    for p in d.data_points:
                        running = 0
                        for bound, c in zip(
                            [*p.explicit_bounds, math.inf], p.bucket_counts, strict=False
                        ):
                            running += c
                            le = 'le="' + _num(float(bound)) + '"'
                            lines.append(f"{name}_bucket{_labels(p.attributes, le)} {running}")
                        lines.append(f"{name}_sum{_labels(p.attributes)} {_num(p.sum)}")
                        lines.append(f"{name}_count{_labels(p.attributes)} {p.count}")
    return "\n".join(lines) + "\n"


# -- wiring -------------------------------------------------------------------------------------


class Telemetry:
    """The meter provider, its instruments and readers for one relay process, and the tracer
    provider when spans are exported (OTLP/gRPC, batched off the event loop)."""

    def __init__(
        self,
        *,
        allocations: Callable[[], int],
        channels: Callable[[], int],
        responses: Callable[[], dict[tuple[str, str, int | None], int]],
        drops: Callable[[], dict[str, int]],
        bridge: HistogramBridge,
        connections: Callable[[], dict[str, int]] | None = None,
        connection_events: Callable[[], dict[str, int]] | None = None,
        otlp_endpoint: str | None = None,
        export_interval_ms: float | None = None,
        resource_attributes: Mapping[str, str] | None = None,
        datapath: Mapping[str, str] | None = None,
        export_metrics: bool = True,
    ) -> None:
        self.resource = make_resource(resource_attributes)
        self.tracer_provider = _tracer_provider(otlp_endpoint, self.resource)
        self.bridge = bridge
        self._pull = InMemoryMetricReader()
        self._pull_lock = threading.Lock()
        readers: list[MetricReader] = [self._pull]
        self.exporter: BridgingExporter | None = None
        # a relay's worker exports spans only: its supervisor exports the relay's metrics
        endpoint = _otlp_endpoint(otlp_endpoint) if export_metrics else None
        if endpoint is not None:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
                OTLPMetricExporter,
            )

            env_pref = os.environ.get("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE")
            inner = OTLPMetricExporter(
                endpoint=endpoint or None,
                insecure=True if endpoint.startswith("http://") else None,
                preferred_temporality=None if env_pref else dict(LOW_MEMORY),
            )
            self.exporter = BridgingExporter(inner, bridge, self.resource)
            readers.append(
                PeriodicExportingMetricReader(
                    self.exporter, export_interval_millis=export_interval_ms
                )
            )
        self.provider = MeterProvider(resource=self.resource, metric_readers=readers)
        meter = self.provider.get_meter(METER_NAME)

        def active_allocations(_: CallbackOptions) -> Iterable[Observation]:
            yield Observation(allocations())

        def active_channels(_: CallbackOptions) -> Iterable[Observation]:
            yield Observation(channels())

        def response_counts(_: CallbackOptions) -> Iterable[Observation]:
            for (klass, message_type, code), n in list(responses().items()):
                attrs: dict[str, AttributeValue] = {
                    "response_class": klass,
                    "message_type": message_type,
                }
                if code is not None:
                    attrs["error_code"] = code
                yield Observation(n, attrs)

        def drop_counts(_: CallbackOptions) -> Iterable[Observation]:
            for reason, n in drops().items():
                yield Observation(n, {"reason": reason})

        info: dict[str, AttributeValue] = dict(datapath or {})

        def datapath_info(_: CallbackOptions) -> Iterable[Observation]:
            yield Observation(1, info)

        meter.create_observable_up_down_counter(
            "relay.active_allocations",
            [active_allocations],
            unit="{allocation}",
            description="The number of active allocations",
        )
        meter.create_observable_up_down_counter(
            "relay.active_channels",
            [active_channels],
            unit="{channel}",
            description="Channel bindings currently relaying",
        )
        meter.create_observable_counter(
            "relay.responses",
            [response_counts],
            unit="{response}",
            description="The number of responses",
        )
        meter.create_observable_counter(
            "relay.datagrams.dropped",
            [drop_counts],
            unit="{datagram}",
            description="Datagrams the relay could not send or process",
        )
        if datapath:
            meter.create_observable_gauge(
                "relay.datapath.info",
                [datapath_info],
                unit="1",
                description="Always 1; its attributes say which userspace data path runs",
            )

        if connections is not None:
            open_now = connections

            def open_connections(_: CallbackOptions) -> Iterable[Observation]:
                for transport, n in open_now().items():
                    yield Observation(
                        n,
                        {"network.transport": "tcp", "relay.tls": str(transport == "tls").lower()},
                    )

            meter.create_observable_up_down_counter(
                "relay.stream.connections",
                [open_connections],
                unit="{connection}",
                description="TURN connections open over TCP and TLS",
            )
        if connection_events is not None:
            events = connection_events

            def event_counts(_: CallbackOptions) -> Iterable[Observation]:
                for event, n in events().items():
                    yield Observation(n, {"event": event})

            meter.create_observable_counter(
                "relay.stream.events",
                [event_counts],
                unit="{connection}",
                description="TCP/TLS connections accepted, refused at a cap, closed for a "
                "protocol error or a timeout",
            )

    def prometheus_text(self) -> str:
        """Collect now (any thread) and render ``/metrics``."""
        with self._pull_lock:
            data = self._pull.get_metrics_data()
            metrics = self.bridge.metrics(AggregationTemporality.CUMULATIVE)
        return render_prometheus(add_metrics(data, metrics, self.resource))

    def tracer(self) -> trace.Tracer:
        """The relay's tracer; a no-op one when spans are not exported."""
        if self.tracer_provider is None:
            return trace.NoOpTracer()
        return self.tracer_provider.get_tracer(TRACER_NAME)

    def shutdown(self, timeout_s: float = 0.5) -> None:
        """Flush and stop the exporters (spans and metrics side by side), giving up after
        ``timeout_s`` (shutdown must be quick)."""
        millis = timeout_s * 1000
        jobs: list[Callable[[], object]] = [lambda: self.provider.shutdown(timeout_millis=millis)]
        if self.tracer_provider is not None:
            tracer_provider = self.tracer_provider

            def spans() -> None:
                tracer_provider.force_flush(timeout_millis=int(millis))
                tracer_provider.shutdown()

            jobs.append(spans)
        threads = [threading.Thread(target=job, name="otel-shutdown", daemon=True) for job in jobs]
        deadline = time.monotonic() + timeout_s + 0.1
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))


def _tracer_provider(flag: str | None, resource: Resource) -> TracerProvider | None:
    """Spans go where metrics go: ``--otlp-grpc-endpoint`` (as Firezone's relay), else the
    OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT variables; OTEL_TRACES_EXPORTER=none turns them off."""
    if os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return None
    if flag:
        endpoint: str | None = flag if "://" in flag else f"http://{flag}"
    elif os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    ):
        endpoint = None  # the exporter reads it from the environment
    else:
        return None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    exporter = OTLPSpanExporter(
        endpoint=endpoint,
        insecure=True if endpoint is not None and endpoint.startswith("http://") else None,
    )
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def _otlp_endpoint(flag: str | None) -> str | None:
    """``host:port`` -> ``http://host:port``; None when metrics should not be exported."""
    if flag:
        return flag if "://" in flag else f"http://{flag}"
    if os.environ.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    ):
        return ""  # the exporter reads the endpoint from the environment
    return None
