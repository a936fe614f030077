"""Cloud metadata discovery against a fake metadata service on loopback that speaks real HTTP
(the real GCE and EC2 services cannot run here): the headers each cloud requires, IMDSv2's
token first, and the failures when there is no metadata service."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from firezone_relay.actors.cli import build_parser, settings_from_args
from firezone_relay.actors.metadata import MetadataError, fill_public_ips, otel_resource_attributes
from firezone_relay.protocol.stun import Attr, Class, parse
from firezone_relay.protocol.types import Family
from simulations.turn_client import TurnClient
from tests.system.conftest import RelayProcess, free_port, http, start_from_env

pytestmark = pytest.mark.system

GCE = "/computeMetadata/v1/instance/"
GCE_IP4 = GCE + "network-interfaces/0/access-configs/0/external-ip"
GCE_IP6 = GCE + "network-interfaces/0/ipv6s"
AWS_TOKEN = "AQAEAHh0b2tlbi1mb3ItdGVzdHM="


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class FakeMetadata:
    """GCE's or EC2's metadata service, as far as the relay uses it."""

    kind: str  # "gce" or "aws"
    values: dict[str, str] = field(default_factory=dict)  # path -> body; absent -> 404
    seen: list[Seen] = field(default_factory=list)
    port: int = 0

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def answer(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, str, dict]:
        self.seen.append(Seen(method, path, headers))
        if self.kind == "gce":
            reply = {"Metadata-Flavor": "Google"}
            if headers.get("metadata-flavor") != "Google" or method != "GET":
                return 403, "Missing Metadata-Flavor:Google header.", reply
            if path not in self.values:
                return 404, "not found", reply
            return 200, self.values[path], reply
        # IMDSv2 only, as hardened EC2 instances run it: no token, no answer
        if path == "/latest/api/token":
            ttl = headers.get("x-aws-ec2-metadata-token-ttl-seconds", "")
            if method != "PUT" or not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
                return 400, "", {}
            return 200, AWS_TOKEN, {"X-aws-ec2-metadata-token-ttl-seconds": ttl}
        if headers.get("x-aws-ec2-metadata-token") != AWS_TOKEN:
            return 401, "", {}
        if method != "GET" or path not in self.values:
            return 404, "", {}
        return 200, self.values[path], {}


def _serve(fake: FakeMetadata) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, body, extra = fake.answer(self.command, self.path, headers)
            data = body.encode()
            self.send_response(status)
            for name, value in extra.items():
                self.send_header(name, value)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_PUT = _handle

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    fake.port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def gce() -> Iterator[FakeMetadata]:
    fake = FakeMetadata(
        "gce",
        {
            GCE_IP4: "203.0.113.10",
            GCE_IP6: "2001:db8:1::10\n",
            GCE + "id": "5832583187537235075",
            GCE + "name": "relay-m5k7",
            GCE + "zone": "projects/123456789/zones/us-east1-b",
        },
    )
    server = _serve(fake)
    yield fake
    server.shutdown()
    server.server_close()


@pytest.fixture
def aws() -> Iterator[FakeMetadata]:
    fake = FakeMetadata("aws", {"/latest/meta-data/public-ipv4": "198.51.100.20"})
    server = _serve(fake)
    yield fake
    server.shutdown()
    server.server_close()


def _closed_port() -> int:
    return free_port(socket.SOCK_STREAM)  # nothing listens there


# -- the discovery itself ------------------------------------------------------------------


def test_gce_sends_metadata_flavor_and_fills_both_families(gce: FakeMetadata) -> None:
    env = {"GCE_METADATA_HOST": gce.host}
    assert fill_public_ips("gce_metadata", None, None, env) == ("203.0.113.10", "2001:db8:1::10")
    assert [s.path for s in gce.seen] == [GCE_IP4, GCE_IP6]
    assert all(s.headers["metadata-flavor"] == "Google" for s in gce.seen)


def test_an_address_given_is_kept_and_not_asked_for(gce: FakeMetadata) -> None:
    env = {"GCE_METADATA_HOST": gce.host}
    assert fill_public_ips("gce_metadata", "192.0.2.1", None, env) == (
        "192.0.2.1",
        "2001:db8:1::10",
    )
    assert [s.path for s in gce.seen] == [GCE_IP6]
    gce.seen.clear()
    assert fill_public_ips("gce_metadata", "192.0.2.1", "2001:db8::1", env) == (
        "192.0.2.1",
        "2001:db8::1",
    )
    assert gce.seen == []


def test_a_family_the_instance_lacks_is_left_empty(gce: FakeMetadata) -> None:
    del gce.values[GCE_IP6]  # 404: no external IPv6
    env = {"GCE_METADATA_HOST": gce.host}
    assert fill_public_ips("gce_metadata", None, None, env) == ("203.0.113.10", None)
    del gce.values[GCE_IP4]
    with pytest.raises(MetadataError, match="no public IPv4 or IPv6 address"):
        fill_public_ips("gce_metadata", None, None, env)


def test_aws_asks_for_an_imdsv2_token_first(aws: FakeMetadata) -> None:
    env = {"AWS_EC2_METADATA_SERVICE_ENDPOINT": f"http://{aws.host}/"}
    assert fill_public_ips("aws_ec2_metadata", None, None, env) == ("198.51.100.20", None)
    assert [(s.method, s.path) for s in aws.seen] == [
        ("PUT", "/latest/api/token"),
        ("GET", "/latest/meta-data/public-ipv4"),
        ("GET", "/latest/meta-data/ipv6"),
    ]
    assert aws.seen[0].headers["x-aws-ec2-metadata-token-ttl-seconds"] == "60"
    assert all(s.headers["x-aws-ec2-metadata-token"] == AWS_TOKEN for s in aws.seen[1:])


def test_aws_ipv6(aws: FakeMetadata) -> None:
    aws.values["/latest/meta-data/ipv6"] = "2001:db8:2::20"
    env = {"AWS_EC2_METADATA_SERVICE_ENDPOINT": f"http://{aws.host}"}
    assert fill_public_ips("aws_ec2_metadata", "192.0.2.1", None, env) == (
        "192.0.2.1",
        "2001:db8:2::20",
    )


def test_no_metadata_service_is_an_error_naming_what_failed() -> None:
    port = _closed_port()
    with pytest.raises(MetadataError) as gce_error:
        fill_public_ips("gce_metadata", None, None, {"GCE_METADATA_HOST": f"127.0.0.1:{port}"})
    assert f"http://127.0.0.1:{port}{GCE_IP4}" in str(gce_error.value)
    assert "refused" in str(gce_error.value).lower()
    endpoint = {"AWS_EC2_METADATA_SERVICE_ENDPOINT": f"http://127.0.0.1:{port}"}
    with pytest.raises(MetadataError) as aws_error:
        fill_public_ips("aws_ec2_metadata", None, None, endpoint)
    assert f"PUT http://127.0.0.1:{port}/latest/api/token" in str(aws_error.value)


def test_a_silent_metadata_service_times_out() -> None:
    with socket.socket() as silent:  # accepts connections (the backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        env = {"GCE_METADATA_HOST": f"127.0.0.1:{silent.getsockname()[1]}"}
        with pytest.raises(MetadataError, match=r"timed out|no answer within"):
            fill_public_ips("gce_metadata", None, None, env, timeout=0.5)


def test_something_else_answering_is_not_taken_for_gce(aws: FakeMetadata) -> None:
    with pytest.raises(MetadataError):  # a 401 from EC2's IMDSv2 for a GCE request
        fill_public_ips("gce_metadata", None, None, {"GCE_METADATA_HOST": aws.host})


def test_gce_resource_attributes(gce: FakeMetadata) -> None:
    assert otel_resource_attributes("gce_metadata", {"GCE_METADATA_HOST": gce.host}) == {
        "service.instance.id": "5832583187537235075",
        "gcp.gce.instance.name": "relay-m5k7",
        "cloud.region": "us-east1-b",
    }
    assert all(s.headers["metadata-flavor"] == "Google" for s in gce.seen)


def test_a_token_naming_a_file_is_read(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("secret-relay-token\n")
    args = build_parser().parse_args(
        ["--public-ip4-addr", "192.0.2.1", "--api-url", "ws://127.0.0.1:1", str(token_file)]
    )
    portal = settings_from_args(args).portal
    assert portal is not None and portal.token == "secret-relay-token"


# -- the daemon ----------------------------------------------------------------------------


def _spawn(tmp_path: Path, env: dict[str, str]) -> RelayProcess:
    return start_from_env(tmp_path, {"BIND_IP6_ADDR": "::1", **env})


def _ready(relay: RelayProcess) -> None:
    relay.wait_ready(relay.readyz)


def _relayed_addresses(relay: RelayProcess) -> list[tuple[str, int]]:
    """Allocate (both families) and return the XOR-RELAYED-ADDRESSes the relay hands out."""
    username, password = relay.credentials()
    client = TurnClient(username, password)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(2)
        relay_addr = ("127.0.0.1", relay.listen_port)
        sock.sendto(client.allocate(additional_family=Family.V6), relay_addr)
        client.learn(parse(sock.recv(2048)))
        sock.sendto(client.allocate(additional_family=Family.V6), relay_addr)
        response = parse(sock.recv(2048))
    assert response.cls == Class.SUCCESS, response
    return list(response.get_all(Attr.XOR_RELAYED_ADDRESS))


def test_daemon_takes_its_public_addresses_from_gce(tmp_path: Path, gce: FakeMetadata) -> None:
    relay = _spawn(
        tmp_path,
        {"LISTEN_ADDRESS_DISCOVERY_METHOD": "gce_metadata", "GCE_METADATA_HOST": gce.host},
    )
    try:
        _ready(relay)
        relayed = _relayed_addresses(relay)
    finally:
        code, _ = relay.stop()
    assert code == 0
    assert [host for host, _ in relayed] == ["203.0.113.10", "2001:db8:1::10"]
    assert "discovered PUBLIC_IP4_ADDR 203.0.113.10" in relay.log()


def test_daemon_takes_its_public_address_from_aws(tmp_path: Path, aws: FakeMetadata) -> None:
    relay = _spawn(
        tmp_path,
        {
            "LISTEN_ADDRESS_DISCOVERY_METHOD": "aws_ec2_metadata",
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": f"http://{aws.host}",
        },
    )
    try:
        _ready(relay)
        relayed = _relayed_addresses(relay)  # IPv4 only: a partial dual-stack grant
    finally:
        code, _ = relay.stop()
    assert code == 0
    assert [host for host, _ in relayed] == ["198.51.100.20"]
    assert aws.seen[0].method == "PUT"


@pytest.mark.parametrize("method", ["gce_metadata", "aws_ec2_metadata"])
def test_daemon_exits_when_no_metadata_service_answers(tmp_path: Path, method: str) -> None:
    port = _closed_port()
    relay = _spawn(
        tmp_path,
        {
            "LISTEN_ADDRESS_DISCOVERY_METHOD": method,
            "GCE_METADATA_HOST": f"127.0.0.1:{port}",
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": f"http://127.0.0.1:{port}",
        },
    )
    assert relay.proc.wait(30) == 1
    log = relay.log()
    assert f"{method}: no public IPv4 or IPv6 address found" in log
    assert f"127.0.0.1:{port}" in log and "refused" in log.lower()
    assert "Traceback" not in log


def test_daemon_adds_gce_instance_to_its_otel_resource(tmp_path: Path, gce: FakeMetadata) -> None:
    relay = _spawn(
        tmp_path,
        {
            "PUBLIC_IP4_ADDR": "127.0.0.1",
            "OTEL_METADATA_DISCOVERY_METHOD": "gce_metadata",
            "GCE_METADATA_HOST": gce.host,
        },
    )
    try:
        _ready(relay)
        status, text = http("GET", f"{relay.health}/metrics")
    finally:
        relay.stop()
    assert status == 200
    target = next(line for line in text.splitlines() if line.startswith("target_info{"))
    assert 'service_instance_id="5832583187537235075"' in target
    assert 'gcp_gce_instance_name="relay-m5k7"' in target
    assert 'cloud_region="us-east1-b"' in target
    assert 'service_name="relay"' in target


def test_daemon_runs_without_otel_metadata_when_none_answers(tmp_path: Path) -> None:
    relay = _spawn(
        tmp_path,
        {
            "PUBLIC_IP4_ADDR": "127.0.0.1",
            "OTEL_METADATA_DISCOVERY_METHOD": "gce_metadata",
            "GCE_METADATA_HOST": f"127.0.0.1:{_closed_port()}",
        },
    )
    try:
        _ready(relay)
    finally:
        code, _ = relay.stop()
    assert code == 0
    assert "OpenTelemetry resource left without instance metadata" in relay.log()
