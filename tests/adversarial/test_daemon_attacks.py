"""Attacks on the running daemon over real sockets (issue 9, the daemon's side).

Each test attacks the relay process the way an attacker on the network would and checks it
holds: the HTTP endpoints stay bounded, descriptors are never exhausted, bad input cannot flood
the log or print a traceback, the operator is told when the kernel may take allocation ports,
and a fuzz soak leaves the relay alive with flat memory.
"""

from __future__ import annotations

import random
import re
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from firezone_relay.actors.http_endpoints import Limits
from firezone_relay.actors.logs import FLOOD_BURST
from firezone_relay.protocol import stun
from firezone_relay.protocol.stun import Attr, Class, Method
from simulations.bench import fuzz
from tests.adversarial import daemon_fixtures
from tests.adversarial.daemon_fixtures import RelayProcess, http

# the fixtures these attacks use (pytest finds them as attributes of this module)
relay = daemon_fixtures.relay
relay_factory = daemon_fixtures.relay_factory
limited_relay = daemon_fixtures.limited_relay

pytestmark = pytest.mark.system

READ_TIMEOUT = 30.0  # a bound on waiting for the relay, far above its request timeout


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise RuntimeError("no Threads line")


def _fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def _raw_http(port: int, request: bytes) -> bytes:
    """Send raw bytes and read the whole answer (the server closes after one request)."""
    with socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _status(answer: bytes) -> int:
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", answer)
    assert match, answer[:200]
    return int(match.group(1))


def _target(relay: RelayProcess) -> fuzz.Target:
    return fuzz.Target(
        "127.0.0.1",
        relay.listen_port,
        relay.health_port,
        relay.secret,
        relay.scheme,
        relay.proc.pid,
        relay.log,
    )


# -- 9.2 the health and control endpoints ---------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "expected"),
    [("-1", 400), ("abc", 400), ("+5", 400), ("1e3", 400), ("0x10", 400), ("99999999999", 413)],
)
def test_bad_content_length_is_refused_without_a_traceback(
    relay: RelayProcess, length: str, expected: int
) -> None:
    targets = ((relay.control_port, "/log_filter?directives=info"), (relay.health_port, "/healthz"))
    for port, path in targets:
        request = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n"
        assert _status(_raw_http(port, request.encode())) == expected
    assert "Traceback" not in relay.log()
    assert http("GET", f"{relay.health}/healthz")[0] == 200


def test_oversized_body_and_head_are_refused_unread(relay: RelayProcess) -> None:
    big = Limits.MAX_BODY_BYTES + 1
    request = f"POST /log_filter?directives=info HTTP/1.1\r\nContent-Length: {big}\r\n\r\n"
    assert _status(_raw_http(relay.control_port, request.encode())) == 413
    head = b"GET /healthz HTTP/1.1\r\nX-Filler: " + b"a" * (2 * Limits.MAX_HEAD_BYTES) + b"\r\n\r\n"
    assert _status(_raw_http(relay.health_port, head)) == 431
    for bad in (b"GET /healthz HTTP/1.1\r\n folded\r\n\r\n", b"BREW /healthz HTCPCP/1.0\r\n\r\n"):
        assert _status(_raw_http(relay.health_port, bad)) in (400, 404, 405)
    chunked = b"POST /log_filter?directives=info HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert _status(_raw_http(relay.control_port, chunked)) == 501
    assert "Traceback" not in relay.log()


def test_half_sent_requests_neither_grow_threads_nor_lock_out_health_checks(
    relay: RelayProcess,
) -> None:
    assert http("GET", f"{relay.health}/healthz")[0] == 200
    pid = relay.proc.pid
    threads_before, fds_before = _threads(pid), _fds(pid)
    attackers = []
    for _ in range(150):
        sock = socket.create_connection(("127.0.0.1", relay.health_port), timeout=READ_TIMEOUT)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finished
        attackers.append(sock)
    try:
        # a health checker still gets through, and the relay grew no thread per connection
        assert http("GET", f"{relay.health}/healthz", READ_TIMEOUT)[0] == 200
        assert http("GET", f"{relay.health}/metrics", READ_TIMEOUT)[0] == 200
        assert _threads(pid) <= threads_before + Limits.HANDLER_THREADS
        assert _fds(pid) <= fds_before + Limits.MAX_CONNECTIONS + 2
        # every half-sent request is dropped: evicted at once, or at the request timeout
        for sock in attackers:
            try:
                assert sock.recv(1024) == b""
            except ConnectionResetError:
                pass
    finally:
        for sock in attackers:
            sock.close()
    assert relay.alive()


# -- 9.5 descriptor reserve -----------------------------------------------------------------------


def test_descriptor_limit_refuses_allocations_and_keeps_health_answering(
    limited_relay: Callable[..., RelayProcess],
) -> None:
    relay = limited_relay(400)  # the port range (400) needs more descriptors than there are
    server = ("127.0.0.1", relay.listen_port)
    sockets: list[socket.socket] = []
    clients: list[fuzz.TurnClient] = []
    codes: list[int | None] = []
    try:
        for i in range(relay.highest_port - relay.lowest_port + 1):
            username, password = relay.credentials(f"fd{i}")
            sock, client, reply = fuzz.allocate(server, username, password)
            sockets.append(sock)
            clients.append(client)
            codes.append(None if reply.cls == Class.SUCCESS else fuzz.error_code(reply))
            if codes[-1] == 508:
                break
        assert codes[-1] == 508, codes[-5:]
        assert set(codes[:-1]) == {None}
        # the endpoints still have descriptors, for a crowd of connections too
        crowd = [
            socket.create_connection(("127.0.0.1", relay.health_port), timeout=READ_TIMEOUT)
            for _ in range(Limits.MAX_CONNECTIONS)
        ]
        try:
            assert http("GET", f"{relay.health}/healthz", READ_TIMEOUT)[0] == 200
            assert http("GET", f"{relay.health}/metrics", READ_TIMEOUT)[0] == 200
            assert http("POST", f"{relay.control}/log_filter?directives=info")[0] == 200
        finally:
            for sock in crowd:
                sock.close()
        assert fuzz.binding_rtt(server, 3)
        # freeing one makes room for one
        gone = fuzz.exchange(sockets[0], server, clients[0].refresh(0))
        assert gone.cls == Class.SUCCESS
        username, password = relay.credentials("fd-again")
        extra, _, reply = fuzz.allocate(server, username, password)
        sockets.append(extra)
        assert reply.cls == Class.SUCCESS
    finally:
        for sock in sockets:
            sock.close()
    assert relay.alive()
    assert "Too many open files" not in relay.log()
    assert "Traceback" not in relay.log()


# -- 9.6 log flood ---------------------------------------------------------------------------------


def _weird_allocate(nonce: str, realm: str, username: str) -> bytes:
    key = stun.long_term_key(username, realm, "x")
    return stun.encode(
        Method.ALLOCATE,
        Class.REQUEST,
        random.randbytes(12),
        [
            (Attr.REQUESTED_TRANSPORT, 17),
            (Attr.USERNAME, username),
            (Attr.REALM, realm),
            (Attr.NONCE, nonce),
        ],
        integrity_key=key,
    )


def test_weird_usernames_cannot_flood_the_log(relay: RelayProcess) -> None:
    server = ("127.0.0.1", relay.listen_port)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(READ_TIMEOUT)
        client = fuzz.TurnClient("x", "y")
        challenge = fuzz.exchange(sock, server, client.allocate(signed=False))
        nonce, realm = challenge.get(Attr.NONCE), challenge.get(Attr.REALM)
        before = len(relay.log().encode())
        for i in range(100):
            name = ("²:x", "١٢٣:x", "0" * 300 + ":x", "\U0001f600:" + "x" * i)[i % 4]
            sock.sendto(_weird_allocate(nonce, realm, name), server)
        fuzz.exchange(sock, server, client.binding())  # processed in order: all 100 are done
    log = relay.log()
    grown = len(log.encode()) - before
    assert "Traceback" not in log
    assert grown < 4096, log[-4096:]


def _hold_ports(count: int) -> tuple[int, list[socket.socket]]:
    """Bind ``count`` consecutive UDP ports above the ephemeral range (other tests' relays
    use ports there too: try windows until one is wholly free)."""
    for _ in range(50):
        low = random.randrange(61000, 65400 - count, 2)
        held: list[socket.socket] = []
        try:
            for port in range(low, low + count):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                held.append(sock)
                sock.bind(("127.0.0.1", port))
        except OSError:
            for sock in held:
                sock.close()
            continue
        return low, held
    raise RuntimeError("no free window of ports")


def test_repeated_failures_are_rate_limited_with_a_summary(
    relay_factory: Callable[..., RelayProcess], tmp_path: Path
) -> None:
    """Every Allocate that lands on a port someone else holds logs a warning: the guard lets a
    burst through, then counts, and says how many it held back."""
    low, blockers = _hold_ports(40)
    try:
        relay = relay_factory(ports=(low, low + 39))
        server = ("127.0.0.1", relay.listen_port)
        for i in range(60):
            username, password = relay.credentials(f"taken{i}")
            sock, _, reply = fuzz.allocate(server, username, password)
            sock.close()
            assert reply.cls == Class.ERROR
    finally:
        for sock in blockers:
            sock.close()
    failures = relay.log().count("bind failed")
    assert 0 < failures <= FLOOD_BURST
    assert relay.stop()[0] == 0
    assert re.search(r"suppressed \d+ log lines like .*bind failed", relay.log())


# -- 9.11 the ephemeral port range ----------------------------------------------------------------


def _ephemeral() -> tuple[int, int]:
    low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    return int(low), int(high)


def test_warns_when_allocation_ports_are_ephemeral(
    relay_factory: Callable[..., RelayProcess],
) -> None:
    reserved = Path("/proc/sys/net/ipv4/ip_local_reserved_ports").read_text().strip()
    low, high = _ephemeral()
    assert high - low > 2000 and not reserved, "this test expects the kernel's default sysctls"
    start = random.randrange(low, high - 1000, 2)
    exposed = relay_factory(ports=(start, start + 99))
    assert re.search(
        rf"WARN .*100 ports of the allocation range {start}-{start + 99} .*"
        rf"sysctl -w net\.ipv4\.ip_local_reserved_ports={start}-{start + 99}",
        exposed.log(),
    ), exposed.log()
    safe = relay_factory()  # the system tests' slices sit above the ephemeral range
    assert "ip_local_reserved_ports" not in safe.log()


# -- fuzz soak, CI-sized ---------------------------------------------------------------------------


def test_fuzz_soak_leaves_the_relay_alive_with_flat_memory(relay: RelayProcess) -> None:
    report = fuzz.soak(_target(relay), count=20_000, seconds=120.0)
    assert report.sent >= 20_000 or report.seconds >= 120.0
    assert report.alive, relay.log()[-2000:]
    assert report.problems == []
    assert report.rss_after_kb - report.rss_before_kb < fuzz.RSS_BUDGET_KB
    assert report.binding_ms  # Bindings are answered again
    assert report.fresh_allocate_ok
