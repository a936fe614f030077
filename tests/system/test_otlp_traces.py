"""Spans reach a real OTLP/gRPC receiver: startup and shutdown, allocation lifecycle, channel
binds, and the portal connection; none per relayed datagram; shutdown flushes them."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from firezone_relay.protocol.stun import Attr, Class, parse
from simulations.portal_thread import PortalThread
from simulations.turn_client import TurnClient
from tests.system.conftest import RelayProcess, free_port, http
from tests.system.peers import echo_peer, run, turn_client
from tests.system.test_daemon_portal import _wait_status

pytestmark = pytest.mark.system

STATUS_UNSET, STATUS_OK, STATUS_ERROR = 0, 1, 2


@dataclass(frozen=True)
class Span:
    name: str
    attributes: dict[str, Any]
    resource: dict[str, Any]
    trace_id: bytes
    span_id: bytes
    parent_span_id: bytes
    status: int
    status_message: str
    scope: str


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


class Collector(
    trace_service_pb2_grpc.TraceServiceServicer, metrics_service_pb2_grpc.MetricsServiceServicer
):
    """An OTLP collector that keeps every span (and accepts metrics, which the relay sends to
    the same endpoint)."""

    def __init__(self) -> None:
        self._spans: list[Span] = []
        self.lock = threading.Lock()
        self.port = 0

    def Export(self, request: Any, context: Any) -> Any:
        if isinstance(request, metrics_service_pb2.ExportMetricsServiceRequest):
            return metrics_service_pb2.ExportMetricsServiceResponse()
        with self.lock:
            for rs in request.resource_spans:
                resource = {kv.key: _value(kv.value) for kv in rs.resource.attributes}
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        self._spans.append(
                            Span(
                                s.name,
                                {kv.key: _value(kv.value) for kv in s.attributes},
                                resource,
                                s.trace_id,
                                s.span_id,
                                s.parent_span_id,
                                s.status.code,
                                s.status.message,
                                ss.scope.name,
                            )
                        )
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self, name: str | None = None) -> list[Span]:
        with self.lock:
            return [s for s in self._spans if name is None or s.name == name]

    def one(self, name: str, **attributes: Any) -> Span:
        found = [
            s
            for s in self.spans(name)
            if all(s.attributes.get(k) == v for k, v in attributes.items())
        ]
        assert len(found) == 1, f"{name} {attributes}: {found} among {self.names()}"
        return found[0]

    def names(self) -> list[str]:
        return [s.name for s in self.spans()]

    def wait_for(self, name: str, timeout: float = 15.0, **attributes: Any) -> Span:
        deadline = time.monotonic() + timeout
        while True:
            for s in self.spans(name):
                if all(s.attributes.get(k) == v for k, v in attributes.items()):
                    return s
            assert time.monotonic() < deadline, f"no {name} {attributes}: {self.names()}"
            time.sleep(0.05)


@pytest.fixture
def collector() -> Iterator[Collector]:
    servicer = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(servicer, server)
    servicer.port = free_port(socket.SOCK_STREAM)
    server.add_insecure_port(f"127.0.0.1:{servicer.port}")
    server.start()
    yield servicer
    server.stop(0)


def _child_of(span: Span, parent: Span) -> None:
    assert span.trace_id == parent.trace_id and span.parent_span_id == parent.span_id


def test_allocation_and_channel_spans_are_flushed_at_shutdown(relay_factory, collector) -> None:  # type: ignore[no-untyped-def]
    # A minute's batch delay: nothing leaves before SIGTERM, so what arrives was flushed.
    relay: RelayProcess = relay_factory(
        "--otlp-grpc-endpoint",
        f"127.0.0.1:{collector.port}",
        env={"OTEL_BSP_SCHEDULE_DELAY": "60000"},
    )
    username, password = relay.credentials()

    async def body() -> tuple[tuple[str, int], tuple[str, int], tuple[str, int]]:
        _peer, peer_addr = await echo_peer()
        transport, inbox = await turn_client(("127.0.0.1", relay.listen_port), username, password)
        for i in range(50):  # 100 relayed datagrams, one channel
            transport.sendto(b"datagram %d" % i, peer_addr)
            assert (await inbox.get())[0] == b"datagram %d" % i
        mapped = transport.get_extra_info("related_address")
        relayed = transport.get_extra_info("sockname")
        transport.close()  # aioice deletes its allocation: Refresh LIFETIME 0
        deadline = time.monotonic() + 10
        while "relay_active_allocations 0" not in http("GET", f"{relay.health}/metrics")[1]:
            assert time.monotonic() < deadline, "the allocation was never deleted"
            await asyncio.sleep(0.05)
        return mapped, relayed, peer_addr

    mapped, relayed, peer_addr = run(body)
    assert collector.spans() == []  # still batched in the relay
    code, _ = relay.stop()
    assert code == 0

    startup = collector.one("relay.startup")
    assert startup.scope == "relay"
    assert startup.resource["service.name"] == "relay"
    assert startup.resource["service.namespace"] == "firezone"
    assert startup.attributes["relay.mode"] == "standalone"
    assert startup.attributes["relay.listen_port"] == relay.listen_port
    assert startup.attributes["relay.datapath"] == "userspace"
    assert startup.status != STATUS_ERROR

    create = collector.one("allocation.create")
    five_tuple = {
        "client.address": mapped[0],
        "client.port": mapped[1],
        "server.address": "127.0.0.1",
        "server.port": relay.listen_port,
        "network.transport": "udp",
        "relay.username": username,
        "relay.allocation.port": relayed[1],
    }
    assert five_tuple.items() <= create.attributes.items()
    assert create.attributes["relay.five_tuple"] == (
        f"udp {mapped[0]}:{mapped[1]} 127.0.0.1:{relay.listen_port}"
    )
    assert create.attributes["relay.allocation.families"] == "ipv4"
    assert create.attributes["relay.allocation.lifetime_s"] == 600
    assert create.parent_span_id == b""  # each allocation is a trace of its own

    bind = collector.one("channel.bind")
    _child_of(bind, create)
    assert five_tuple.items() <= bind.attributes.items()
    assert 0x4000 <= bind.attributes["relay.channel.number"] <= 0x4FFF
    assert bind.attributes["relay.peer.address"] == peer_addr[0]
    assert bind.attributes["relay.peer.port"] == peer_addr[1]
    assert bind.attributes["relay.channel.refresh"] is False

    free = collector.one("allocation.free")
    _child_of(free, create)
    assert five_tuple.items() <= free.attributes.items()
    assert free.attributes["relay.allocation.end_reason"] == "deleted"
    unbind = collector.one("channel.unbind")
    assert unbind.attributes["relay.channel.end_reason"] == "allocation_freed"

    shutdown = collector.one("relay.shutdown")
    assert shutdown.attributes["relay.shutdown.reason"] == "SIGTERM"
    assert shutdown.attributes["relay.allocations_freed"] == 0

    # 100 relayed datagrams made no span: only the lifecycle above
    assert sorted(collector.names()) == sorted(
        [
            "relay.startup",
            "allocation.create",
            "channel.bind",
            "channel.unbind",
            "allocation.free",
            "relay.shutdown",
        ]
    )


class RawClient:
    """A TURN client on a plain socket, built with the relay's own request builder."""

    def __init__(self, relay: RelayProcess, username: str, password: str, seed: int) -> None:
        import random

        self.relay = relay
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(2.0)
        self.turn = TurnClient(username, password, rng=random.Random(seed))

    @property
    def addr(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()
        return host, port

    def request(self, data: bytes) -> Any:
        self.sock.sendto(data, ("127.0.0.1", self.relay.listen_port))
        return parse(self.sock.recv(2048))

    def allocate(self, lifetime: int) -> int:
        self.turn.learn(self.request(self.turn.allocate()))
        response = self.request(self.turn.allocate(lifetime=lifetime))
        assert response.cls == Class.SUCCESS, response
        return int(response.get(Attr.XOR_RELAYED_ADDRESS)[1])


def test_refresh_replacement_and_expiry_spans(relay_factory, collector) -> None:  # type: ignore[no-untyped-def]
    # --time-scale: the 600 s lifetime passes in 3 s of real time
    relay: RelayProcess = relay_factory(
        "--otlp-grpc-endpoint",
        f"127.0.0.1:{collector.port}",
        "--time-scale",
        "0.005",
        env={"OTEL_BSP_SCHEDULE_DELAY": "100"},
    )
    username, password = relay.credentials()
    first = RawClient(relay, username, password, seed=1)
    port_a = first.allocate(600)
    refreshed = first.request(first.turn.refresh(1200))
    assert refreshed.cls == Class.SUCCESS and refreshed.get(Attr.LIFETIME) == 1200
    peer = ("127.0.0.1", free_port())
    assert first.request(first.turn.channel_bind(0x4001, peer)).cls == Class.SUCCESS
    assert first.request(first.turn.channel_bind(0x4001, peer)).cls == Class.SUCCESS  # refresh

    # connlib's NAT flip: the same username allocates from another socket
    second = RawClient(relay, username, password, seed=2)
    port_b = second.allocate(600)

    replaced = collector.wait_for("allocation.free", **{"relay.allocation.port": port_a})
    assert replaced.attributes["relay.allocation.end_reason"] == "replaced"
    assert replaced.attributes["client.port"] == first.addr[1]
    create_a = collector.one("allocation.create", **{"relay.allocation.port": port_a})
    _child_of(replaced, create_a)
    refresh = collector.one("allocation.refresh")
    _child_of(refresh, create_a)
    assert refresh.attributes["relay.allocation.lifetime_s"] == 1200
    assert refresh.attributes["client.port"] == first.addr[1]
    assert refresh.status != STATUS_ERROR
    binds = collector.spans("channel.bind")
    assert [b.attributes["relay.channel.refresh"] for b in binds] == [False, True]
    assert all(b.attributes["relay.channel.number"] == 0x4001 for b in binds)

    expired = collector.wait_for("allocation.free", **{"relay.allocation.port": port_b})
    assert expired.attributes["relay.allocation.end_reason"] == "expired"
    assert expired.attributes["client.port"] == second.addr[1]
    assert expired.attributes["relay.username"] == username

    # a Refresh the relay refuses is an error span of that allocation's trace
    third = RawClient(relay, username, password, seed=3)
    third.allocate(600)
    third.turn.nonce = "not-a-nonce"
    third.turn.learn(third.request(third.turn.refresh(600)))
    accepted = third.request(third.turn.refresh(600, tid=b"\x07" * 12))
    assert accepted.cls == Class.SUCCESS
    code, _ = relay.stop()
    assert code == 0
    create_c = collector.one("allocation.create", **{"client.port": third.addr[1]})
    refreshes = [
        s for s in collector.spans("allocation.refresh") if s.trace_id == create_c.trace_id
    ]
    assert [s.status for s in refreshes] == [STATUS_ERROR, STATUS_UNSET]
    assert refreshes[0].attributes["error.type"] in ("401", "438")
    shutdown_free = collector.one("allocation.free", **{"client.port": third.addr[1]})
    assert shutdown_free.attributes["relay.allocation.end_reason"] == "shutdown"
    assert collector.one("relay.shutdown").attributes["relay.allocations_freed"] == 1


def test_portal_connection_spans(relay_factory, collector) -> None:  # type: ignore[no-untyped-def]
    with PortalThread("relay-token") as portal:
        portal.call(lambda: portal.portal.refuse(503, times=1))  # deploying: one refusal
        relay: RelayProcess = relay_factory(
            "--otlp-grpc-endpoint",
            f"127.0.0.1:{collector.port}",
            "--api-url",
            portal.portal.url,
            "relay-token",
            "relay-1",
            env={"OTEL_BSP_SCHEDULE_DELAY": "100"},
            wait_ready=False,
        )
        _wait_status(relay, "/readyz", 200)
        collector.wait_for("portal.join")
        # the token is revoked while the relay is connected: it reconnects, gets 401, exits 1
        portal.call(lambda: portal.portal.refuse(401, body="invalid token"))
        portal.call(portal.portal.drop)
        assert relay.proc.wait(20) == 1

    first = collector.one("portal.connect", **{"portal.attempt": 1})
    assert first.status == STATUS_ERROR and "HTTP 503" in first.status_message
    assert first.attributes["url.full"].startswith(portal.portal.url)
    assert "relay-token" not in first.attributes["url.full"]
    reconnects = collector.spans("portal.reconnect")
    assert len(reconnects) == 2
    _child_of(reconnects[0], first)
    assert "HTTP 503" in reconnects[0].attributes["portal.reconnect.reason"]
    assert reconnects[0].attributes["portal.reconnect.backoff_s"] > 0

    second = collector.one("portal.connect", **{"portal.attempt": 2})
    assert second.status != STATUS_ERROR
    join = collector.one("portal.join")
    _child_of(join, second)
    assert join.status != STATUS_ERROR
    _child_of(reconnects[1], second)
    assert "websocket closed" in reconnects[1].attributes["portal.reconnect.reason"]

    third = collector.one("portal.connect", **{"portal.attempt": 3})
    assert third.status == STATUS_ERROR and "HTTP 401" in third.status_message
    fatal = collector.one("portal.fatal")
    _child_of(fatal, third)
    assert fatal.status == STATUS_ERROR
    assert "401" in fatal.attributes["portal.fatal.reason"]
    shutdown = collector.one("relay.shutdown")
    assert shutdown.attributes["relay.shutdown.reason"].startswith("portal:")
    assert collector.one("relay.startup").attributes["relay.mode"] == "portal"


def test_a_failed_startup_is_an_error_span(relay_factory, collector) -> None:  # type: ignore[no-untyped-def]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        relay: RelayProcess = relay_factory(
            "--otlp-grpc-endpoint",
            f"127.0.0.1:{collector.port}",
            "--listen-port",  # the last --listen-port wins: one that is taken
            str(port),
            wait_ready=False,
        )
        assert relay.proc.wait(20) == 1
    startup = collector.one("relay.startup")
    assert startup.status == STATUS_ERROR
    assert "listen socket" in startup.status_message.lower()
    assert startup.attributes["relay.listen_port"] == port


def test_otel_traces_exporter_none_turns_spans_off(monkeypatch: pytest.MonkeyPatch) -> None:
    from firezone_relay.actors.telemetry import HistogramBridge, Telemetry

    def make() -> Telemetry:
        return Telemetry(
            allocations=lambda: 0,
            channels=lambda: 0,
            responses=dict,
            drops=dict,
            bridge=HistogramBridge(),
        )

    # the standard variable alone exports spans (metrics stay off: no metrics endpoint)
    endpoint = f"http://127.0.0.1:{free_port(socket.SOCK_STREAM)}"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", endpoint)
    exporting = make()
    assert exporting.exporter is None
    assert exporting.tracer_provider is not None
    exporting.shutdown(0.1)
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    quiet = make()
    assert quiet.tracer_provider is None
    assert not quiet.tracer().start_span("x").get_span_context().is_valid
    quiet.shutdown(0.1)
