"""TURN over TCP and TLS against the daemon: aioice as the client over both, our own stream
client for what aioice cannot show (PROXY headers, a TCP and a UDP client on one address and
port, the relay loop between them, REQUESTED-TRANSPORT, a dropped connection, certificate
reload under an open connection; the hostile cases are in tests/adversarial)."""

from __future__ import annotations

import signal
import socket
import ssl
import struct
from pathlib import Path

import pytest

from firezone_relay.protocol import stun
from firezone_relay.protocol.proxy_protocol import V2_SIGNATURE
from firezone_relay.protocol.stream_framing import channel_data_frame
from firezone_relay.protocol.stun import Class
from simulations.channel_data import encode as channel_data
from simulations.relay_process import free_port
from simulations.turn_client import TurnClient
from tests.system.conftest import RelayProcess
from tests.system.peers import echo_peer, run
from tests.system.stream_client import (
    StreamClient,
    closed_by_relay,
    mapped_address,
    metric,
    relayed_address,
    udp_peer,
    wait_for,
)
from tests.system.tls_files import make_cert

pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_cert(tmp_path_factory.mktemp("turn-tls"))


# -- aioice, a real TURN client over TCP and TLS ---------------------------------------------------


async def _aioice_echo(relay: RelayProcess, port: int, tls: ssl.SSLContext | None) -> None:
    import aioice.turn

    from tests.system.peers import Inbox

    peer, peer_addr = await echo_peer()
    username, password = relay.credentials()
    transport, inbox = await aioice.turn.create_turn_endpoint(
        Inbox,
        ("127.0.0.1", port),
        username,
        password,
        ssl=tls if tls is not None else False,
        transport="tcp",
    )
    try:
        relayed = transport.get_extra_info("sockname")
        assert relay.lowest_port <= relayed[1] <= relay.highest_port
        for i in range(50):
            payload = b"ping %d " % i + bytes(range(i % 7 + 100))  # lengths not a multiple of 4
            transport.sendto(payload, peer_addr)
            assert await inbox.get() == (payload, peer_addr)
        assert peer.transport is not None
        peer.transport.sendto(b"unsolicited", (relayed[0], relayed[1]))
        assert await inbox.get() == (b"unsolicited", peer_addr)
    finally:
        transport.close()
        assert peer.transport is not None
        peer.transport.close()


def test_aioice_over_tcp(relay: RelayProcess) -> None:
    run(lambda: _aioice_echo(relay, relay.listen_port, None))
    assert wait_for(lambda: metric(relay, "relay_active_allocations") == 0)


def test_aioice_over_tls(relay_factory, cert: tuple[Path, Path]) -> None:  # type: ignore[no-untyped-def]
    tls_port = free_port()
    relay = relay_factory(
        "--tls-listen-port", str(tls_port), "--tls-cert-file", str(cert[0]),
        "--tls-key-file", str(cert[1]),
    )  # fmt: skip
    context = ssl.create_default_context(cafile=str(cert[0]))
    run(lambda: _aioice_echo(relay, tls_port, context))
    assert "TLS" in relay.log()


# -- the 5-tuple: transport matters ----------------------------------------------------------------


def test_tcp_and_udp_clients_on_one_address_and_port_are_two_clients(relay: RelayProcess) -> None:
    port = free_port()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", port))
    udp.settimeout(5)
    tcp = StreamClient.connect(relay, bind=("127.0.0.1", port))
    try:
        relayed_tcp = relayed_address(tcp.allocate())
        turn = TurnClient(*relay.credentials())
        udp.sendto(turn.allocate(signed=False), relay.address)
        turn.learn(stun.parse(udp.recv(2048)))
        udp.sendto(turn.allocate(), relay.address)
        relayed_udp = relayed_address(stun.parse(udp.recv(2048)))
        assert relayed_tcp != relayed_udp
        assert metric(relay, "relay_active_allocations") == 2
        # the relay loop between the two: channel 0x4000 of each points at the other
        tcp.bind(0x4000, relayed_udp)
        udp.sendto(turn.channel_bind(0x4001, relayed_tcp), relay.address)
        assert stun.parse(udp.recv(2048)).cls == Class.SUCCESS
        tcp.send(channel_data_frame(0x4000, b"tcp to udp"))
        assert udp.recv(2048) == channel_data(0x4001, b"tcp to udp")
        udp.sendto(channel_data(0x4001, b"udp to tcp!"), relay.address)
        assert tcp.next_frame() == channel_data(0x4000, b"udp to tcp!")
    finally:
        tcp.close()
        udp.close()


def test_requested_transport_other_than_udp_is_442_over_tcp(relay: RelayProcess) -> None:
    client = StreamClient.connect(relay)
    try:
        response = client.allocate(transport=6)
        assert response.get(stun.Attr.ERROR_CODE)[0] == 442
    finally:
        client.close()


def test_a_dropped_connection_frees_its_allocation(relay: RelayProcess) -> None:
    client = StreamClient.connect(relay)
    relayed = relayed_address(client.allocate())
    with udp_peer() as peer:
        client.bind(0x4000, peer.getsockname())
        client.send(channel_data_frame(0x4000, b"hello"))
        assert peer.recv(100) == b"hello"
        assert metric(relay, "relay_active_allocations") == 1
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # a reset, as when a NAT or the client's host drops it
        assert wait_for(lambda: metric(relay, "relay_active_allocations") == 0)
        assert metric(relay, "relay_active_channels") == 0
        peer.sendto(b"too late", relayed)
    assert relay.alive()


def test_peer_filter_applies_to_stream_clients(relay_factory) -> None:  # type: ignore[no-untyped-def]
    relay = relay_factory("--denied-peer-ip", "127.0.0.2/32")
    client = StreamClient.connect(relay)
    try:
        relayed_address(client.allocate())
        response = client.transact(client.turn.channel_bind(0x4000, ("127.0.0.2", 9)))
        assert response.get(stun.Attr.ERROR_CODE)[0] == 403
        response = client.transact(client.turn.create_permission(("169.254.169.254", 80)))
        assert response.get(stun.Attr.ERROR_CODE)[0] == 403
    finally:
        client.close()


# -- PROXY protocol --------------------------------------------------------------------------------


def _v1(host: str, port: int) -> bytes:
    return f"PROXY TCP4 {host} 127.0.0.1 {port} 3478\r\n".encode()


def _v2(host: str, port: int) -> bytes:
    body = socket.inet_aton(host) + socket.inet_aton("127.0.0.1") + struct.pack("!HH", port, 443)
    return V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, len(body)) + body


@pytest.mark.parametrize("header", [_v1, _v2], ids=["v1", "v2"])
def test_proxy_header_gives_the_client_address(relay_factory, header) -> None:  # type: ignore[no-untyped-def]
    relay = relay_factory("--proxy-protocol-from", "127.0.0.0/8")
    client = StreamClient.connect(relay, prefix=header("198.51.100.20", 40001))
    try:
        assert mapped_address(client) == ("198.51.100.20", 40001)
        relayed_address(client.allocate())
    finally:
        client.close()
    bare = StreamClient.connect(relay)  # a trusted source must send a header
    bare.send(bare.turn.binding())
    assert closed_by_relay(bare.sock)


def test_tls_after_proxy_v2(relay_factory, cert: tuple[Path, Path]) -> None:  # type: ignore[no-untyped-def]
    tls_port = free_port()
    relay = relay_factory(
        "--tls-listen-port", str(tls_port), "--tls-cert-file", str(cert[0]),
        "--tls-key-file", str(cert[1]), "--proxy-protocol-from", "127.0.0.1/32",
    )  # fmt: skip
    context = ssl.create_default_context(cafile=str(cert[0]))
    client = StreamClient.connect(relay, tls_port, prefix=_v2("203.0.113.44", 5000), tls=context)
    try:
        assert mapped_address(client) == ("203.0.113.44", 5000)
    finally:
        client.close()


def test_a_header_from_an_untrusted_source_is_not_believed(relay_factory) -> None:  # type: ignore[no-untyped-def]
    relay = relay_factory("--proxy-protocol-from", "192.0.2.0/24")
    for header in (_v1("198.51.100.20", 1), _v2("198.51.100.20", 1)):
        client = StreamClient.connect(relay, prefix=header)
        assert closed_by_relay(client.sock)
    client = StreamClient.connect(relay)  # without a header, the TCP peer is the client
    try:
        assert mapped_address(client)[0] == "127.0.0.1"
    finally:
        client.close()


# -- TLS certificate reload ------------------------------------------------------------------------


def test_sighup_reloads_the_certificate_under_open_connections(
    relay_factory,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    a_cert, a_key = make_cert(tmp_path, "a", "relay-a")
    b_cert, b_key = make_cert(tmp_path, "b", "relay-b")
    cert, key = tmp_path / "live-cert.pem", tmp_path / "live-key.pem"
    cert.write_bytes(a_cert.read_bytes())
    key.write_bytes(a_key.read_bytes())
    tls_port = free_port()
    relay = relay_factory(
        "--tls-listen-port", str(tls_port), "--tls-cert-file", str(cert),
        "--tls-key-file", str(key),
    )  # fmt: skip
    trust_a = ssl.create_default_context(cafile=str(a_cert))
    trust_b = ssl.create_default_context(cafile=str(b_cert))
    old = StreamClient.connect(relay, tls_port, tls=trust_a)
    try:
        relayed_address(old.allocate())
        cert.write_bytes(b_cert.read_bytes())
        key.write_bytes(b_key.read_bytes())
        relay.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "TLS certificate reloaded" in relay.log())
        assert mapped_address(old)[0] == "127.0.0.1"  # the open connection stays
        with pytest.raises(ssl.SSLError):
            StreamClient.connect(relay, tls_port, tls=trust_a)
        StreamClient.connect(relay, tls_port, tls=trust_b).close()
        key.write_text("broken\n")
        relay.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "TLS reload failed" in relay.log())
        StreamClient.connect(relay, tls_port, tls=trust_b).close()  # the old one kept
        assert relay.log().count("TLS reload failed") == 1
        assert metric(relay, "relay_active_allocations") == 1
    finally:
        old.close()
    assert relay.alive()


def test_no_tcp_turns_the_listener_off(relay_factory) -> None:  # type: ignore[no-untyped-def]
    relay = relay_factory("--no-tcp")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(relay.address, timeout=5)
