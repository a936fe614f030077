"""A real browser WebRTC stack as the TURN client: headless Chromium, two RTCPeerConnections
in one page, relay-only ICE through the daemon, a data channel echoing both ways.

Both ends are allocations on this relay, so every packet goes through the relay loop. The
page (webrtc_loop.html) is served by a thread here and POSTs its outcome back; no browser
driver is needed. Skipped when no Chromium is installed (Debian: `apt-get install chromium`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.system.conftest import RelayProcess, http

pytestmark = pytest.mark.system

PAGE = Path(__file__).with_name("webrtc_loop.html").read_bytes()
MESSAGES = 10
PAGE_TIMEOUT_MS = 12_000
RESULT_TIMEOUT = 18.0

# What Chromium needs to run headless as root on a machine with a closed network. Nothing
# WebRTC-specific: relay-only ICE to a TURN server on 127.0.0.1 works with stock settings.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--mute-audio",
]


def find_chromium() -> str | None:
    override = os.environ.get("CHROMIUM")
    if override:
        return override
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


CHROMIUM = find_chromium()
requires_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium)"
)


class PageServer:
    """Serves the page and collects what it POSTs. The /result POST is held open until
    ``release()`` so the test can inspect the relay while both connections are still up."""

    def __init__(self) -> None:
        self.result: dict[str, Any] | None = None
        self.got_result = threading.Event()
        self.closed = threading.Event()
        self._released = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(PAGE)))
                self.end_headers()
                self.wfile.write(PAGE)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path == "/result" and not outer.got_result.is_set():
                    outer.result = json.loads(body or b"{}")
                    outer.got_result.set()
                    outer._released.wait(10)
                elif self.path == "/closed":
                    outer.closed.set()
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def release(self) -> None:
        self._released.set()

    def close(self) -> None:
        self.release()
        self._httpd.shutdown()
        self._httpd.server_close()


@contextlib.contextmanager
def chromium(
    url: str, log_path: Path, flags: tuple[str, ...] = ()
) -> Iterator[subprocess.Popen[bytes]]:
    """Headless Chromium on ``url`` in its own session (so its helper processes end with it)
    and a throwaway profile."""
    assert CHROMIUM is not None
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile, open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [CHROMIUM, *CHROMIUM_FLAGS, *flags, f"--user-data-dir={profile}", url],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            yield proc
        finally:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                try:
                    proc.wait(3)
                    break
                except subprocess.TimeoutExpired:
                    continue


def metrics(relay: RelayProcess) -> dict[str, float]:
    """``/metrics`` as ``{"name{labels}": value}``."""
    status, text = http("GET", f"{relay.health}/metrics")
    assert status == 200, text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[key] = float(value)
    return out


def wait_for(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return bool(predicate())


def run_page(
    relay: RelayProcess,
    creds_a: tuple[str, str],
    creds_b: tuple[str, str],
    tmp_path: Path,
    *,
    url: str | None = None,
    relay_protocol: str = "udp",
    messages: int = MESSAGES,
    flags: tuple[str, ...] = (),
) -> None:
    """Drive the page against ``relay`` and assert on the page, the relay's metrics and log.
    ``url``: the TURN server's URL (default UDP on the listen port), whose transport
    ``relay_protocol`` the selected candidates must show."""
    url = url or f"turn:127.0.0.1:{relay.listen_port}?transport=udp"
    server = PageServer()
    query = urllib.parse.urlencode(
        {
            "url": url,
            "a_user": creds_a[0],
            "a_pass": creds_a[1],
            "b_user": creds_b[0],
            "b_pass": creds_b[1],
            "count": messages,
            "timeout_ms": PAGE_TIMEOUT_MS,
        }
    )
    browser_log = tmp_path / "chromium.log"
    try:
        with chromium(f"http://127.0.0.1:{server.port}/?{query}", browser_log, flags) as proc:
            deadline = time.monotonic() + RESULT_TIMEOUT
            while not server.got_result.wait(0.2):
                assert proc.poll() is None, f"chromium exited early:\n{browser_log.read_text()}"
                assert time.monotonic() < deadline, (
                    f"no result from the page\nchromium:\n{browser_log.read_text()[-3000:]}"
                    f"\nrelay:\n{relay.log()}"
                )
            result = server.result
            assert result is not None
            context = f"page log: {json.dumps(result.get('log'), indent=1)}\nrelay:\n{relay.log()}"
            assert result.get("error") is None, context

            # Both ways, in order, nothing lost.
            assert result["seenByB"] == [f"ping {i}" for i in range(messages)], context
            assert result["echoed"] == [f"pong ping {i}" for i in range(messages)], context

            # ICE settled on relay/relay: each side's local candidate is an allocation on our
            # relay and its remote candidate is the other side's allocation (the relay loop).
            pair_a, pair_b = result["pairA"], result["pairB"]
            for pair in (pair_a, pair_b):
                assert pair is not None and pair["state"] == "succeeded", context
                for end in (pair["local"], pair["remote"]):
                    assert end["type"] == "relay", context
                    assert end["address"] == "127.0.0.1", context
                    assert relay.lowest_port <= end["port"] <= relay.highest_port, context
                assert pair["local"]["relayProtocol"] == relay_protocol, context
                assert pair["local"]["url"] == url, context
            assert pair_a["local"]["port"] == pair_b["remote"]["port"]
            assert pair_b["local"]["port"] == pair_a["remote"]["port"]
            port_a, port_b = pair_a["local"]["port"], pair_b["local"]["port"]
            assert port_a != port_b

            # The relay, while both connections are still open: two allocations, a channel
            # on each pointing at the other, packets relayed.
            seen = metrics(relay)
            assert seen["relay_active_allocations"] == 2, seen
            assert seen["relay_active_channels"] == 2, seen
            assert seen['relay_packet_size_bytes_count{relay_datapath="userspace"}'] > 0, seen
            log = relay.log()
            assert f"allocation={port_a} peer=127.0.0.1:{port_b} " in log, log
            assert f"allocation={port_b} peer=127.0.0.1:{port_a} " in log, log

            # Closing the connections deallocates (Refresh with LIFETIME 0).
            server.release()
            assert server.closed.wait(5), "page did not close its connections"
            assert wait_for(lambda: metrics(relay)["relay_active_allocations"] == 0, 5), relay.log()
    finally:
        server.close()

    assert relay.alive()
    log = relay.log()
    assert not re.search(r"\b(ERROR|CRITICAL)\b|Traceback", log), log


@requires_chromium
@pytest.mark.parametrize("scheme", ["rest", "firezone"])
def test_browser_data_channel_through_the_relay_loop(
    relay_factory: Any, scheme: str, tmp_path: Path
) -> None:
    """One credential per peer connection, as a Firezone-style deployment hands them out."""
    extra = ["--realm", "example.org"] if scheme == "rest" else []
    relay = relay_factory(*extra, "--log-filter", "debug", scheme=scheme)
    run_page(relay, relay.credentials("alice"), relay.credentials("bob"), tmp_path)


@requires_chromium
def test_browser_shared_credential_needs_several_allocations_per_username(
    relay_factory: Any, tmp_path: Path
) -> None:
    """A typical WebRTC app gives one TURN credential to every peer connection of a user.
    The Firezone default (one allocation per username) would free the first connection's
    allocation when the second allocates; `--no-single-allocation-per-username` is the
    setting for that deployment."""
    relay = relay_factory(
        "--realm", "example.org", "--no-single-allocation-per-username", scheme="rest"
    )
    shared = relay.credentials("carol")
    run_page(relay, shared, shared, tmp_path)


@requires_chromium
def test_browser_over_tcp(relay_factory: Any, tmp_path: Path) -> None:
    """A browser whose network allows only TCP: `turn:...?transport=tcp`, 100 messages."""
    relay = relay_factory("--log-filter", "debug", scheme="rest")
    run_page(
        relay, relay.credentials("alice"), relay.credentials("bob"), tmp_path,
        url=f"turn:127.0.0.1:{relay.listen_port}?transport=tcp", relay_protocol="tcp",
        messages=100,
    )  # fmt: skip


@requires_chromium
def test_browser_over_tls(relay_factory: Any, tmp_path: Path) -> None:
    """`turns:` with a self-signed certificate the browser is told to accept."""
    from simulations.relay_process import free_port
    from tests.system.tls_files import make_cert

    cert, key = make_cert(tmp_path)
    tls_port = free_port()
    relay = relay_factory(
        "--log-filter", "debug", "--tls-listen-port", str(tls_port), "--tls-cert-file",
        str(cert), "--tls-key-file", str(key), scheme="rest",
    )  # fmt: skip
    run_page(
        relay, relay.credentials("alice"), relay.credentials("bob"), tmp_path,
        url=f"turns:127.0.0.1:{tls_port}?transport=tcp", relay_protocol="tls", messages=100,
        flags=("--ignore-certificate-errors",),
    )  # fmt: skip
