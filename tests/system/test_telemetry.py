"""Metrics reach a real OTLP/gRPC receiver, and ``/metrics`` shows the same instruments."""

from __future__ import annotations

import threading
import time
from concurrent import futures
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)

from tests.system.conftest import RelayProcess, free_port, http
from tests.system.peers import echo_peer, run, turn_client

pytestmark = pytest.mark.system


class Receiver(metrics_service_pb2_grpc.MetricsServiceServicer):
    """An OTLP metrics collector that keeps every request."""

    def __init__(self) -> None:
        self.requests: list[metrics_service_pb2.ExportMetricsServiceRequest] = []
        self.lock = threading.Lock()

    def Export(self, request: Any, context: Any) -> Any:
        with self.lock:
            self.requests.append(request)
        return metrics_service_pb2.ExportMetricsServiceResponse()

    def metrics(self) -> tuple[dict[str, Any], dict[str, list[Any]]]:
        """(resource attributes, metric name -> list of metric messages over all exports)"""
        resource: dict[str, Any] = {}
        by_name: dict[str, list[Any]] = {}
        with self.lock:
            requests = list(self.requests)
        for req in requests:
            for rm in req.resource_metrics:
                for kv in rm.resource.attributes:
                    resource[kv.key] = kv.value.string_value
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        by_name.setdefault(m.name, []).append(m)
        return resource, by_name


@pytest.fixture
def receiver():  # type: ignore[no-untyped-def]
    servicer = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(servicer, server)
    port = free_port(__import__("socket").SOCK_STREAM)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    servicer.port = port  # type: ignore[attr-defined]
    yield servicer
    server.stop(0)


def _relay_some_traffic(relay: RelayProcess, n: int = 10) -> Any:
    async def body() -> Any:
        _peer, peer_addr = await echo_peer()
        username, password = relay.credentials()
        transport, inbox = await turn_client(("127.0.0.1", relay.listen_port), username, password)
        for i in range(n):
            transport.sendto(b"x" * (150 + i), peer_addr)
            await inbox.get()
        return transport  # left open: the allocation stays active

    return run(body)


def _attrs(point: Any) -> dict[str, Any]:
    out = {}
    for kv in point.attributes:
        v = kv.value
        out[kv.key] = v.string_value if v.HasField("string_value") else v.int_value
    return out


def test_metrics_reach_an_otlp_grpc_receiver(relay_factory, receiver) -> None:  # type: ignore[no-untyped-def]
    relay = relay_factory(
        "--otlp-grpc-endpoint",
        f"127.0.0.1:{receiver.port}",
        env={
            "OTEL_METRIC_EXPORT_INTERVAL": "300",
            "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=system-test",
        },
    )
    _relay_some_traffic(relay)

    deadline = time.monotonic() + 10
    while True:
        resource, metrics = receiver.metrics()
        hist = metrics.get("relay.packet.size", [])
        total = sum(p.count for m in hist for p in m.histogram.data_points)
        if total >= 20 and "relay.responses" in metrics:
            break
        assert time.monotonic() < deadline, f"no complete export yet: {sorted(metrics)}"
        time.sleep(0.1)

    assert resource["service.name"] == "relay"
    assert resource["service.namespace"] == "firezone"
    assert resource["deployment.environment"] == "system-test"

    allocations = metrics["relay.active_allocations"][-1]
    assert allocations.unit == "{allocation}"
    assert [p.as_int for p in allocations.sum.data_points] == [1]

    responses = metrics["relay.responses"][-1]
    assert responses.unit == "{response}"
    seen = {
        (a["response_class"], a["message_type"], a.get("error_code")): p.as_int
        for p in responses.sum.data_points
        for a in [_attrs(p)]
    }
    assert seen[("success", "allocate", None)] == 1
    assert seen[("error", "allocate", 401)] >= 1
    assert seen[("success", "channelbind", None)] >= 1

    # relay.packet.size: 10 datagrams each way of 150..159 bytes, datapath userspace,
    # exported as delta histograms (the reference's LowMemory temporality)
    assert hist[-1].unit == "By"
    assert hist[-1].histogram.aggregation_temporality == 1  # DELTA
    points = [p for m in hist for p in m.histogram.data_points]
    assert {_attrs(p)["relay.datapath"] for p in points} == {"userspace"}
    assert list(points[0].explicit_bounds) == [100.0 * i for i in range(1, 16)]
    buckets = [sum(p.bucket_counts[i] for p in points) for i in range(16)]
    assert buckets[1] == 20 and sum(buckets) == 20
    assert sum(p.sum for p in points) == 2 * sum(150 + i for i in range(10))


def test_prometheus_metrics_endpoint(relay: RelayProcess) -> None:
    _relay_some_traffic(relay, 5)
    status, text = http("GET", f"{relay.health}/metrics")
    assert status == 200
    lines = text.splitlines()
    assert "relay_active_allocations 1" in lines
    assert 'relay_responses_total{response_class="success",message_type="allocate"} 1' in lines
    assert 'relay_packet_size_bytes_bucket{relay_datapath="userspace",le="200.0"} 10' in lines
    assert 'relay_packet_size_bytes_count{relay_datapath="userspace"} 10' in lines
    assert any(line.startswith("target_info{") and 'service_name="relay"' in line for line in lines)


def test_responses_are_exported_as_firezones_delta_counter(relay_factory, receiver) -> None:  # type: ignore[no-untyped-def]
    """Firezone's ``relay.responses`` is a synchronous u64 counter under the LowMemory
    temporality: a monotonic delta sum of ints, each export holding only the attribute sets
    that counted since the previous one. Summed over exports, ours gives the true counts;
    once traffic stops the metric leaves the exports, while ``relay.active_allocations`` (an
    up-down counter) stays cumulative."""
    relay = relay_factory(
        "--otlp-grpc-endpoint",
        f"127.0.0.1:{receiver.port}",
        env={"OTEL_METRIC_EXPORT_INTERVAL": "200"},
    )
    _relay_some_traffic(relay, 3)
    deadline = time.monotonic() + 10
    while True:
        with receiver.lock:
            exports = len(receiver.requests)
        _, metrics = receiver.metrics()
        if "relay.responses" in metrics and exports >= 3:
            break
        assert time.monotonic() < deadline, f"no export yet: {sorted(metrics)}"
        time.sleep(0.1)
    quiet_from = exports
    while True:  # three more exports with no new request
        with receiver.lock:
            exports = len(receiver.requests)
        if exports >= quiet_from + 3:
            break
        assert time.monotonic() < deadline + 5
        time.sleep(0.1)
    with receiver.lock:
        requests = list(receiver.requests)
    totals: dict[tuple[Any, ...], int] = {}
    per_export: list[list[Any]] = []
    for req in requests:
        points = []
        for rm in req.resource_metrics:
            for sm in rm.scope_metrics:
                assert sm.scope.name == "relay"
                for m in sm.metrics:
                    if m.name == "relay.active_allocations":
                        assert m.sum.aggregation_temporality == 2  # CUMULATIVE
                        assert not m.sum.is_monotonic
                    if m.name != "relay.responses":
                        continue
                    assert (m.unit, m.description) == ("{response}", "The number of responses")
                    assert m.sum.aggregation_temporality == 1  # DELTA
                    assert m.sum.is_monotonic
                    for p in m.sum.data_points:
                        assert p.WhichOneof("value") == "as_int" and p.as_int > 0
                        assert p.start_time_unix_nano < p.time_unix_nano
                        key = tuple(sorted(_attrs(p).items()))
                        totals[key] = totals.get(key, 0) + p.as_int
                        points.append(p)
        per_export.append(points)
    allocate_ok = (("message_type", "allocate"), ("response_class", "success"))
    assert totals[allocate_ok] == 1  # once in all the exports together, not once per export
    assert totals[(("error_code", 401), *allocate_ok[:1], ("response_class", "error"))] >= 1
    assert not any(per_export[-2:]), "no responses, no relay.responses in the export"
    last_end: dict[tuple[Any, ...], int] = {}
    for points in per_export:  # each attribute set's delta windows follow one another
        for p in points:
            key = tuple(sorted(_attrs(p).items()))
            assert p.start_time_unix_nano >= last_end.get(key, 0)
            last_end[key] = p.time_unix_nano
