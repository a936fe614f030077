"""Dual-stack allocations (ADDITIONAL-ADDRESS-FAMILY, RFC 8656 §7.2 / Firezone's connlib): an IPv4
client relays to an IPv4 and an IPv6 peer through one allocation port, and back.

aioice has no public API for the address-family attributes, so this drives the relay with raw
STUN encoded by aioice's codec (with the two attributes registered in its table).
"""

from __future__ import annotations

import socket
import struct

import pytest
from aioice import stun

from simulations.bench.daemon_client import Client, long_term_key, request
from tests.system.conftest import RelayProcess

pytestmark = pytest.mark.system

UDP = 0x11000000
IPV6_FAMILY = 0x02000000  # family byte 0x02, then three reserved bytes


def _register(name: str, attr_type: int) -> None:
    if name not in stun.ATTRIBUTES_BY_NAME:
        entry = (attr_type, name, stun.pack_unsigned, stun.unpack_unsigned)
        stun.ATTRIBUTES_BY_TYPE[attr_type] = entry
        stun.ATTRIBUTES_BY_NAME[name] = entry


_register("REQUESTED-ADDRESS-FAMILY", 0x0017)
_register("ADDITIONAL-ADDRESS-FAMILY", 0x8000)


def _transact(
    client: Client, server: tuple[str, int], method: stun.Method, attrs: dict[str, object]
) -> tuple[stun.Message, bytes]:
    for _ in range(3):
        client.sock.sendto(request(client, method, attrs), server)
        while True:
            raw = client.sock.recv(2048)
            msg = stun.parse_message(raw)
            if msg.transaction_id == client.pending:
                break
        code = msg.attributes.get("ERROR-CODE", (0, ""))[0]
        if code in (401, 438) and "NONCE" in msg.attributes:
            client.realm, client.nonce = msg.attributes["REALM"], msg.attributes["NONCE"]
            continue
        return msg, raw
    raise AssertionError("no answer after the challenge")


def _all_relayed(raw: bytes) -> list[tuple[str, int]]:
    """Every XOR-RELAYED-ADDRESS (aioice's parser keeps only the last one)."""
    out = []
    txid, offset = raw[8:20], 20
    while offset + 4 <= len(raw):
        attr_type, length = struct.unpack_from("!HH", raw, offset)
        if attr_type == 0x0016:
            out.append(stun.unpack_xor_address(raw[offset + 4 : offset + 4 + length], txid))
        offset += 4 + length + (-length % 4)
    return out


def test_ipv4_client_relays_to_ipv4_and_ipv6_peers(relay_factory) -> None:  # type: ignore[no-untyped-def]
    relay: RelayProcess = relay_factory(ip4="127.0.0.1", ip6="::1")
    server = ("127.0.0.1", relay.listen_port)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(3)
    sock.bind(("127.0.0.1", 0))
    peer4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    for p, host in ((peer4, "127.0.0.1"), (peer6, "::1")):
        p.settimeout(3)
        p.bind((host, 0))
    try:
        client = Client(sock, *relay.credentials())
        msg, raw = _transact(
            client,
            server,
            stun.Method.ALLOCATE,
            {"REQUESTED-TRANSPORT": UDP, "ADDITIONAL-ADDRESS-FAMILY": IPV6_FAMILY},
        )
        assert msg.message_class == stun.Class.RESPONSE, msg
        assert client.key == long_term_key(client.username, client.realm or "", client.password)
        relayed = _all_relayed(raw)
        port = relayed[0][1]
        assert sorted(relayed) == sorted([("127.0.0.1", port), ("::1", port)])

        for channel, peer in ((0x4000, peer4), (0x4001, peer6)):
            peer_addr = peer.getsockname()[:2]
            msg, _ = _transact(
                client,
                server,
                stun.Method.CHANNEL_BIND,
                {"CHANNEL-NUMBER": channel, "XOR-PEER-ADDRESS": peer_addr},
            )
            assert msg.message_class == stun.Class.RESPONSE, msg
            payload = b"to %s" % peer_addr[0].encode()
            sock.sendto(struct.pack("!HH", channel, len(payload)) + payload, server)
            data, source = peer.recvfrom(2048)
            relay_host = "::1" if peer is peer6 else "127.0.0.1"
            assert (data, source[:2]) == (payload, (relay_host, port))
            peer.sendto(b"back from " + peer_addr[0].encode(), source)
            back = sock.recv(2048)
            assert (
                back
                == struct.pack("!HH", channel, len(b"back from ") + len(peer_addr[0]))
                + b"back from "
                + peer_addr[0].encode()
            )
    finally:
        for s in (sock, peer4, peer6):
            s.close()
