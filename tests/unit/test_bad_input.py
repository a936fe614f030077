"""Any byte string into the core ends in a response or a silent drop, never an exception."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from firezone_relay.protocol import stun
from firezone_relay.protocol.stun import Attr, Class, Method
from tests.unit.harness import CLIENT, PEER, Harness, five_tuple

settings.register_profile(
    "relay", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("relay")

addresses = st.one_of(
    st.tuples(st.ip_addresses(v=4).map(str), st.integers(1, 65535)),
    st.tuples(st.ip_addresses(v=6).map(str), st.integers(1, 65535)),
)
known_values = st.sampled_from(
    [
        (Attr.XOR_PEER_ADDRESS, ("8.8.8.8", 9)),
        (Attr.XOR_PEER_ADDRESS, ("2001:4860::1", 9)),
        (Attr.LIFETIME, 600),
        (Attr.CHANNEL_NUMBER, 0x4000),
        (Attr.REQUESTED_TRANSPORT, 17),
        (Attr.DATA, b"payload"),
        (Attr.SOFTWARE, "x"),
        (Attr.ERROR_CODE, (400, "Bad")),
        (Attr.UNKNOWN_ATTRIBUTES, (1, 2)),
        (Attr.EVEN_PORT, True),
        (Attr.REQUESTED_ADDRESS_FAMILY, stun.Family.V6),
    ]
)


@given(
    method=st.integers(0, 0xFFF),
    cls=st.integers(0, 3),
    tid=st.binary(min_size=12, max_size=12),
    attrs=st.lists(known_values, max_size=6),
    integrity=st.booleans(),
    fingerprint=st.booleans(),
)
def test_codec_round_trip(method, cls, tid, attrs, integrity, fingerprint) -> None:  # type: ignore[no-untyped-def]
    key = b"key" if integrity else None
    data = stun.encode(method, cls, tid, attrs, integrity_key=key, fingerprint=fingerprint)
    msg = stun.parse(data)
    assert (msg.method, msg.cls, msg.transaction_id) == (method, cls, tid)
    decoded = [(t, stun.ATTRIBUTES[t].decode(v, tid)) for t, v in msg.attributes]
    assert decoded[: len(attrs)] == attrs
    if integrity:
        assert stun.verify_integrity(msg, key)  # type: ignore[arg-type]
    if fingerprint:
        assert stun.verify_fingerprint(msg)


def _drain(h: Harness) -> None:
    while (command := h.server.next_command()) is not None:
        assert command is not None


@given(st.binary(max_size=600), addresses)
def test_random_bytes_never_raise(data: bytes, sender: tuple[str, int]) -> None:
    h = Harness()
    h.server.handle_client_input(data, five_tuple(sender), h.now)
    h.server.handle_peer_traffic(data, sender, 50000, h.now)
    _drain(h)
    assert h.server.stats.internal_errors == 0


def _live_server() -> tuple[Harness, list[bytes]]:
    """A server with an allocation and a channel, and the valid datagrams that built it."""
    h = Harness()
    client = h.client()
    sent = [client.allocate()]
    h.send(sent[0])
    client.learn(h.send(sent[0]).response)
    sent += [
        client.allocate(),
        client.channel_bind(0x4000, PEER),
        client.create_permission(PEER),
        client.refresh(600),
        client.send_indication(PEER, b"abc"),
        b"\x40\x00\x00\x03abc",
    ]
    for datagram in sent[1:]:
        h.send(datagram)
    return h, sent


@given(
    st.integers(0, 6),
    st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), min_size=1, max_size=8),
    st.integers(0, 3),
)
def test_mutated_valid_datagrams_never_raise(which: int, flips, cut: int) -> None:  # type: ignore[no-untyped-def]
    h, sent = _live_server()
    data = bytearray(sent[which])
    for position, value in flips:
        if data:
            data[position % len(data)] = value
    if cut:
        del data[len(data) - cut :]
    h.server.handle_client_input(bytes(data), five_tuple(CLIENT), h.now)
    h.server.handle_timeout(h.now + 10_000)
    _drain(h)
    assert h.server.stats.internal_errors == 0


def test_lying_lengths_and_oversized_attributes() -> None:
    h, _ = _live_server()
    tid = bytes(12)
    body = b"\x00\x06\xff\xff" + b"a" * 64  # USERNAME claiming 65535 bytes
    header = stun.HEADER.pack(
        stun.pack_type(Method.ALLOCATE, Class.REQUEST), len(body), stun.MAGIC_COOKIE, tid
    )
    assert h.send(header + body).commands == []
    huge = stun.encode(Method.ALLOCATE, Class.REQUEST, tid, [(Attr.USERNAME, "u" * 2000)])
    response = h.send(huge).response
    assert response.get(Attr.ERROR_CODE)[0] == 400
    body = b"\x00\x12\x00\x03\x00\x01\x00\x00" + b"\x00\x0c\x00\x04\x40\x00\x00\x00"
    method = stun.pack_type(Method.CHANNEL_BIND, Class.REQUEST)
    short_xor = stun.HEADER.pack(method, len(body), stun.MAGIC_COOKIE, tid) + body
    assert h.send(short_xor).response.get(Attr.ERROR_CODE)[0] == 400
    assert h.server.stats.internal_errors == 0


def test_random_floods_keep_the_server_consistent() -> None:
    h, _ = _live_server()
    rng = random.Random(7)
    for i in range(5000):
        data = rng.randbytes(rng.randrange(0, 200))
        if i % 3 == 0 and data:
            data = b"\x00\x03" + data[2:]
        h.server.handle_client_input(data, five_tuple(("198.51.100.7", 1 + i % 60000)), h.now)
    _drain(h)
    assert h.server.num_allocations == 1 and h.server.stats.internal_errors == 0
    assert h.send(b"\x40\x00\x00\x03abc").relay is not None
