"""Hostile TCP/TLS streams against the running daemon: thousands of idle connections, half
frames, a ChannelData length of 65535 that never arrives, slowloris, stalled TLS handshakes,
garbage, too many connections, and a client that does not read. None of it may delay anyone
else, grow the relay without bound, or print a traceback.

The daemon runs with the hidden ``--time-scale 0.05``: its stream timeouts (10 s for the PROXY
header and the TLS handshake, 30 s idle without an allocation) become 0.5 s and 1.5 s."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from firezone_relay.protocol import stun
from firezone_relay.protocol.stun import Class, Method
from simulations.relay_process import free_port
from tests.system.conftest import RelayProcess
from tests.system.stream_client import (
    StreamClient,
    closed_by_relay,
    metric,
    relayed_address,
    udp_peer,
    wait_for,
)
from tests.system.tls_files import make_cert

pytestmark = pytest.mark.system

SCALE = ("--time-scale", "0.05")
HOSTILE = 600  # connections at once, from one address (the cap is raised for it)


def _open(relay: RelayProcess, first: bytes = b"", port: int | None = None) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port or relay.listen_port), timeout=5)
    if first:
        sock.sendall(first)
    return sock


def test_idle_half_frames_and_slowloris_delay_no_one_and_are_closed(relays) -> None:  # type: ignore[no-untyped-def]
    relay: RelayProcess = relays(*SCALE, "--max-stream-connections-per-source", str(HOSTILE + 10))
    binding = stun.encode(Method.BINDING, Class.REQUEST, bytes(12), [])
    hostile: list[socket.socket] = []
    try:
        for i in range(HOSTILE):
            kind = i % 4
            if kind == 0:
                hostile.append(_open(relay))  # silent
            elif kind == 1:  # a ChannelData of 65535 bytes, 1000 of which ever arrive
                hostile.append(_open(relay, b"\x40\x00\xff\xff" + b"x" * 1000))
            elif kind == 2:  # half a STUN header
                hostile.append(_open(relay, binding[:11]))
            else:  # slowloris: a byte now and then, never a whole frame
                hostile.append(_open(relay, binding[:1]))
        assert wait_for(lambda: metric(relay, "relay_stream_connections") >= HOSTILE)
        for _ in range(3):  # meanwhile others are served
            client = StreamClient.connect(relay)
            relayed_address(client.allocate())
            client.close()
        slow = hostile[3::4]
        for step in range(1, 10):  # 2.7 s of slowloris, past the 1.5 s idle timeout
            for sock in slow:
                try:
                    sock.send(binding[step : step + 1])
                except OSError:
                    pass
            time.sleep(0.3)
        # every hostile connection is gone: none ever sent a whole frame
        assert wait_for(lambda: metric(relay, "relay_stream_connections") == 0, 10)
        assert all(closed_by_relay(sock, 1) for sock in hostile)
        events = 'relay_stream_events_total{event="timeout"}'
        assert metric(relay, events) >= HOSTILE
    finally:
        for sock in hostile:
            sock.close()
    assert relay.alive()
    assert "Traceback" not in relay.log()


def test_a_connection_with_an_allocation_outlives_the_idle_timeout(relays) -> None:  # type: ignore[no-untyped-def]
    relay: RelayProcess = relays(*SCALE)
    client = StreamClient.connect(relay)
    try:
        relayed_address(client.allocate())
        time.sleep(2.0)  # past the 1.5 s idle timeout, well within the allocation's 30 s
        assert client.transact(client.turn.binding()).cls == Class.SUCCESS
    finally:
        client.close()


def test_stalled_tls_handshakes_are_closed(relays, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cert, key = make_cert(tmp_path)
    tls_port = free_port()
    relay: RelayProcess = relays(
        *SCALE, "--tls-listen-port", str(tls_port), "--tls-cert-file", str(cert),
        "--tls-key-file", str(key),
    )  # fmt: skip
    stalled = [_open(relay, b"\x16\x03\x01\x02\x00\x01", tls_port) for _ in range(20)]
    stalled += [_open(relay, b"", tls_port) for _ in range(20)]
    try:
        assert all(closed_by_relay(sock, 5) for sock in stalled)
        assert metric(relay, 'relay_stream_events_total{event="timeout"}') >= 40
    finally:
        for sock in stalled:
            sock.close()
    assert relay.alive()


@pytest.mark.parametrize(
    "junk",
    [
        b"\xff" * 64,
        b"POST / HTTP/1.1\r\n\r\n",
        b"\x00\x01\x00\x03" + bytes(16),
        b"\x16\x03\x01\x02\x00",
    ],
    ids=["ff", "http", "stun-length", "tls-on-tcp"],
)
def test_garbage_closes_the_connection_at_once(relays, junk: bytes) -> None:  # type: ignore[no-untyped-def]
    relay: RelayProcess = relays()
    sock = _open(relay, junk)
    try:
        assert closed_by_relay(sock, 3)
    finally:
        sock.close()
    assert metric(relay, 'relay_stream_events_total{event="protocol_error"}') >= 1
    assert "Traceback" not in relay.log()


def test_connection_caps(relays) -> None:  # type: ignore[no-untyped-def]
    relay: RelayProcess = relays(
        "--max-stream-connections-per-source", "4", "--max-stream-connections", "6"
    )
    held = [_open(relay) for _ in range(4)]
    try:
        assert wait_for(lambda: metric(relay, "relay_stream_connections") == 4)
        assert closed_by_relay(_open(relay), 3)  # a fifth from 127.0.0.1
        held.append(socket.create_connection(relay.address, source_address=("127.0.0.2", 0)))
        held.append(socket.create_connection(relay.address, source_address=("127.0.0.3", 0)))
        assert wait_for(lambda: metric(relay, "relay_stream_connections") == 6)
        other = socket.create_connection(relay.address, source_address=("127.0.0.4", 0))
        assert closed_by_relay(other, 3)  # the total cap
        held.pop(0).close()
        assert wait_for(lambda: metric(relay, "relay_stream_connections") == 5)
        client = StreamClient.connect(relay)  # room again
        relayed_address(client.allocate())
        client.close()
        assert metric(relay, 'relay_stream_events_total{event="refused"}') == 2
    finally:
        for sock in held:
            sock.close()


def test_a_client_that_does_not_read_loses_datagrams_not_memory(relays) -> None:  # type: ignore[no-untyped-def]
    relay: RelayProcess = relays(loopback_peers=True)
    client = StreamClient.connect(relay, receive_buffer=4096)
    relayed = relayed_address(client.allocate())
    dropped = 'relay_datagrams_dropped_total{reason="stream_backlog"}'
    rss_before = relay.rss_kb()
    with udp_peer() as peer:
        client.bind(0x4000, peer.getsockname())
        payload = b"z" * 1200
        for _ in range(100):  # at most 120 MB, until the relay's socket buffer is full too
            for _ in range(1000):
                peer.sendto(payload, relayed)
            if metric(relay, dropped) > 0:
                break
        assert metric(relay, dropped) > 0
        # another client is served meanwhile
        other = StreamClient.connect(relay)
        relayed_address(other.allocate())
        other.close()
    assert relay.rss_kb() - rss_before < 64 * 1024  # the backlog is bounded (64 KiB)
    client.close()
