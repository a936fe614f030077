"""coturn's turnutils_uclient through the relay, echoed by turnutils_peer, IPv4 and IPv6.

uclient is driven with Send indications (``-s``): in channel mode it picks channel numbers up to
0x7FFF, which RFC 8656 (and this relay) refuse with 400. All clients of one uclient process share
one username and the relay keeps one allocation per username, so several single-client processes
run side by side, each with its own TURN REST credentials (``-W secret -u userN``).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.system.conftest import RelayProcess
from tests.system.peers import (
    HAVE_TURNUTILS,
    free_udp_pair,
    parse_uclient,
    start_turnutils_peer,
)

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(not HAVE_TURNUTILS, reason="coturn's turnutils are not installed"),
]

CLIENTS = 4
MESSAGES = 400  # per client
INTERVAL_MS = 2  # per client: 500 msg/s each, 2,000 msg/s echoed in total (4,000 relayed/s)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"], ids=["ipv4", "ipv6"])
def test_uclient_send_indications_echo_without_loss(
    relay_factory,
    tmp_path: Path,
    host: str,  # type: ignore[no-untyped-def]
) -> None:
    v6 = ":" in host
    relay: RelayProcess = relay_factory(ip4="127.0.0.1", ip6="::1" if v6 else None, scheme="rest")
    peer_port = free_udp_pair(host)
    peer = start_turnutils_peer(host, peer_port, tmp_path / "peer.log")
    procs = []
    try:
        for i in range(CLIENTS):
            args = [
                "timeout",
                "45",
                "turnutils_uclient",
                "-s",
                "-c",
                "-m",
                "1",
                "-n",
                str(MESSAGES),
                "-l",
                "100",
                "-z",
                str(INTERVAL_MS),
                "-W",
                relay.secret,
                "-u",
                f"user{i}",
                "-e",
                host,
                "-r",
                str(peer_port),
                "-p",
                str(relay.listen_port),
            ]
            if v6:
                args.append("-x")  # ask for an IPv6 relayed address
            elif i % 2 == 0:
                args.append("-g")  # DONT-FRAGMENT: honoured with DF on the relayed datagrams
            args.append(host)
            procs.append(subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        results = []
        for proc in procs:
            out, _ = proc.communicate(timeout=60)
            results.append(parse_uclient(proc.returncode, out.decode(errors="replace")))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        peer.terminate()
        peer.wait(5)
    for result in results:
        assert result.returncode == 0, result.output[-2000:]
        assert "Total lost packets 0 " in result.output, result.output[-2000:]
        assert (result.sent, result.received) == (MESSAGES, MESSAGES), result.output[-2000:]
    assert relay.alive()
    log = relay.log()
    assert log.count("allocated port") >= CLIENTS
    assert (" families=V6 " in log) == v6


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
def test_uclient_over_tcp_and_tls_echo_without_loss(
    relay_factory,  # type: ignore[no-untyped-def]
    tmp_path: Path,
    tls: bool,
) -> None:
    """`turnutils_uclient -t` and `-S -t`: several sessions in one process (one username,
    so several allocations per username), every message echoed back."""
    from simulations.relay_process import free_port
    from tests.system.tls_files import make_cert

    extra = ["--no-single-allocation-per-username"]
    if tls:
        cert, key = make_cert(tmp_path)
        tls_port = free_port()
        extra += ["--tls-listen-port", str(tls_port)]
        extra += ["--tls-cert-file", str(cert), "--tls-key-file", str(key)]
    relay: RelayProcess = relay_factory(*extra, scheme="rest")
    peer_port = free_udp_pair("127.0.0.1")
    peer = start_turnutils_peer("127.0.0.1", peer_port, tmp_path / "peer.log")
    sessions, messages = 8, 200
    try:
        args = [
            "timeout", "45", "turnutils_uclient", "-t", "-s", "-c", "-m", str(sessions),
            "-n", str(messages), "-l", "171", "-z", "5", "-W", relay.secret, "-u", "streamer",
            "-e", "127.0.0.1", "-r", str(peer_port),
            "-p", str(tls_port if tls else relay.listen_port), "127.0.0.1",
        ]  # fmt: skip
        if tls:
            args.insert(args.index("-t"), "-S")
        proc = subprocess.run(args, capture_output=True, timeout=60)
        result = parse_uclient(proc.returncode, proc.stdout.decode(errors="replace"))
    finally:
        peer.terminate()
        peer.wait(5)
    assert result.returncode == 0, result.output[-2000:]
    assert "Total lost packets 0 " in result.output, result.output[-2000:]
    assert (result.sent, result.received) == (sessions * messages,) * 2, result.output[-2000:]
    assert relay.alive()
    assert "Traceback" not in relay.log()
