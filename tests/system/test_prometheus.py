"""A real scraper: Debian's Prometheus server scrapes the relay's /metrics, and its HTTP API
shows the target up, the allocation gauge and the packet-size histogram after relaying."""

from __future__ import annotations

import json
import random
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from firezone_relay.protocol import stun
from firezone_relay.protocol.stun import Attr, Class
from simulations.turn_client import TurnClient
from tests.system.conftest import RelayProcess, free_port

pytestmark = pytest.mark.system

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PACKETS = 25
PAYLOAD = 150  # bytes: the [100, 200) bucket


class Prometheus:
    """``prometheus`` on a free loopback port with its own storage, scraping one target."""

    def __init__(self, tmp: Path, target: str) -> None:
        self.port = free_port(socket.SOCK_STREAM)
        config = tmp / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 500ms\n  scrape_timeout: 400ms\n"
            "scrape_configs:\n  - job_name: relay\n"
            f"    static_configs:\n      - targets: ['{target}']\n"
        )
        self.log = (tmp / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=5) as resp:
            body = json.load(resp)
        assert body["status"] == "success", body
        return body["data"]

    def value(self, query: str) -> float | None:
        """The instant value of a query with one series, or None (no series yet)."""
        result = self.api("query", query=query)["result"]
        return float(result[0]["value"][1]) if len(result) == 1 else None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll until ``predicate`` holds (API errors count as not yet), bounded."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except OSError as exc:  # the API not listening yet
            value, last = None, exc
        if value:
            return value
        time.sleep(0.1)  # polling step
    raise AssertionError(f"timed out waiting for {what} (last: {last})")


@pytest.fixture
def prometheus(relay: RelayProcess, tmp_path: Path) -> Iterator[Prometheus]:
    if not Path(PROMETHEUS).exists():
        pytest.skip("no prometheus server (apt-get install prometheus)")
    p = Prometheus(tmp_path, f"127.0.0.1:{relay.health_port}")
    try:
        yield p
    finally:
        p.stop()


def transact(sock: socket.socket, request: bytes) -> stun.Message:
    sock.sendto(request, sock.getpeername())
    while True:
        msg = stun.parse(sock.recv(2048))
        if msg.transaction_id == request[8:20]:
            return msg


def test_prometheus_scrapes_allocations_and_packet_sizes(
    relay: RelayProcess, prometheus: Prometheus
) -> None:
    def target_up() -> bool:
        targets = prometheus.api("targets")["activeTargets"]
        return any(t["health"] == "up" for t in targets)

    wait_until(target_up, 60, "the relay target to be up")
    assert prometheus.value("up") == 1.0
    assert wait_until(lambda: prometheus.value("relay_active_allocations") == 0.0, 30, "0 allocs")

    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer,
    ):
        client.settimeout(5)
        peer.settimeout(5)
        client.connect(("127.0.0.1", relay.listen_port))
        peer.bind(("127.0.0.1", 0))
        turn = TurnClient(*relay.credentials(), rng=random.Random(1))
        turn.learn(transact(client, turn.allocate()))
        allocated = transact(client, turn.allocate())
        assert allocated.cls == Class.SUCCESS, allocated.get(Attr.ERROR_CODE)
        relayed = allocated.get(Attr.XOR_RELAYED_ADDRESS)
        peer_addr = peer.getsockname()
        bound = transact(client, turn.channel_bind(0x4000, peer_addr))
        assert bound.cls == Class.SUCCESS
        payload = bytes(PAYLOAD)
        for _ in range(PACKETS):
            client.send(b"\x40\x00" + PAYLOAD.to_bytes(2, "big") + payload)
            assert peer.recvfrom(2048) == (payload, relayed)

        assert wait_until(
            lambda: prometheus.value("relay_active_allocations") == 1.0, 30, "1 allocation"
        )

        def buckets() -> dict[float, float]:
            """Cumulative buckets by upper bound (the exposition writes ``le="200.0"``)."""
            result = prometheus.api(
                "query", query='relay_packet_size_bytes_bucket{relay_datapath="userspace"}'
            )["result"]
            return {float(r["metric"]["le"]): float(r["value"][1]) for r in result}

        assert wait_until(
            lambda: buckets().get(200.0) == PACKETS, 30, "the packets in the histogram"
        )
        b = buckets()
        assert b[100.0] == 0.0 and b[200.0] == b[1500.0] == b[float("inf")] == PACKETS
        count = 'relay_packet_size_bytes_count{relay_datapath="userspace"}'
        assert prometheus.value(count) == PACKETS
        total = 'relay_packet_size_bytes_sum{relay_datapath="userspace"}'
        assert prometheus.value(total) == PACKETS * PAYLOAD
