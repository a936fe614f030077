"""The STUN codec against the RFC 5769 / RFC 8489 B.1 vectors and hand-made edge cases."""

from __future__ import annotations

import configparser
import hashlib
import random
import struct
from pathlib import Path

import pytest

from firezone_relay.protocol import stun
from firezone_relay.protocol.stun import Attr, Class, Method
from simulations import channel_data

VECTORS = configparser.ConfigParser(interpolation=None)
VECTORS.read(Path(__file__).parent.parent / "data" / "rfc5769-vectors.txt")
SHORT_TERM_KEY = b"VOkJxbRl1RmTxUk/WvJxBt"


def vector(name: str) -> bytes:
    return bytes.fromhex(VECTORS[name]["hex"])


def test_sample_request_parses_and_verifies() -> None:
    msg = stun.parse(vector("sample_request"))
    assert (msg.method, msg.cls) == (Method.BINDING, Class.REQUEST)
    assert msg.transaction_id == bytes.fromhex("b7e7a701bc34d686fa87dfae")
    assert msg.get(Attr.SOFTWARE) == "STUN test client"
    assert msg.get(Attr.USERNAME) == "evtj:h6vY"
    assert msg.get(Attr.PRIORITY) == 0x6E0001FF
    assert msg.get(Attr.ICE_CONTROLLED) == 0x932FF9B151263B36
    assert stun.verify_integrity(msg, SHORT_TERM_KEY)
    assert not stun.verify_integrity(msg, b"wrong")
    assert stun.verify_fingerprint(msg)
    assert msg.unknown_comprehension_required() == []


@pytest.mark.parametrize(
    ("name", "address"),
    [
        ("sample_ipv4_response", ("192.0.2.1", 32853)),
        ("sample_ipv6_response", ("2001:db8:1234:5678:11:2233:4455:6677", 32853)),
    ],
)
def test_sample_responses(name: str, address: tuple[str, int]) -> None:
    msg = stun.parse(vector(name))
    assert (msg.method, msg.cls) == (Method.BINDING, Class.SUCCESS)
    assert msg.get(Attr.XOR_MAPPED_ADDRESS) == address
    assert msg.get(Attr.SOFTWARE) == "test vector"
    assert stun.verify_integrity(msg, SHORT_TERM_KEY)
    assert stun.verify_fingerprint(msg)


def _reencode(name: str, padding: bytes) -> bytes:
    msg = stun.parse(vector(name))
    attributes = [
        (t, msg.get(t))
        for t, _ in msg.attributes
        if t not in (Attr.MESSAGE_INTEGRITY, Attr.FINGERPRINT)
    ]
    return stun.encode(
        msg.method,
        msg.cls,
        msg.transaction_id,
        attributes,
        integrity_key=SHORT_TERM_KEY,
        fingerprint=True,
        padding=padding,
    )


@pytest.mark.parametrize("name", ["sample_request", "sample_ipv4_response", "sample_ipv6_response"])
def test_reencode_is_byte_identical(name: str) -> None:
    # The vectors pad with spaces; with the same padding the encoding is identical.
    assert _reencode(name, b" ") == vector(name)
    # With RFC 8489's zero padding, integrity and fingerprint still verify.
    zero_padded = stun.parse(_reencode(name, b"\x00"))
    assert stun.verify_integrity(zero_padded, SHORT_TERM_KEY)
    assert stun.verify_fingerprint(zero_padded)


def test_long_term_vector() -> None:
    data = vector("sample_request_long_term_auth")
    msg = stun.parse(data)
    username = msg.get(Attr.USERNAME)
    assert username == "\u30de\u30c8\u30ea\u30c3\u30af\u30b9"
    assert msg.get(Attr.REALM) == "example.org"
    assert msg.get(Attr.NONCE) == "f//499k954d6OL34oL9FSTvy64sA"
    key = stun.long_term_key(username, "example.org", "TheMatrIX")
    assert key.hex() == "e8ca7ad59d5eb0518e312911d2dab2a9"
    assert stun.verify_integrity(msg, key)
    again = stun.encode(
        msg.method,
        msg.cls,
        msg.transaction_id,
        [(Attr.USERNAME, username), (Attr.NONCE, msg.get(Attr.NONCE)), (Attr.REALM, "example.org")],
        integrity_key=key,
    )
    assert again == data


def test_rfc8489_sha256_vector() -> None:
    msg = stun.parse(vector("rfc8489_b1_sample_request_long_term_sha256"))
    userhash = msg.get(Attr.USERHASH)
    expected_hash = hashlib.sha256("\u30de\u30c8\u30ea\u30c3\u30af\u30b9:example.org".encode())
    assert userhash == expected_hash.digest()
    key = hashlib.sha256(
        "\u30de\u30c8\u30ea\u30c3\u30af\u30b9:example.org:TheMatrIX".encode()
    ).digest()
    assert stun.verify_integrity(msg, key)
    assert not stun.verify_integrity(msg, key[::-1])


def test_md5_key_example_from_rfc() -> None:
    assert stun.long_term_key("user", "realm", "pass").hex() == "8493fbc53ba582fb4c044c456bdc40eb"


def test_message_type_packing_round_trips() -> None:
    for method in range(0x1000):
        for cls in range(4):
            assert stun.unpack_type(stun.pack_type(method, cls)) == (method, cls)
    assert stun.pack_type(Method.ALLOCATE, Class.ERROR) == 0x0113
    assert stun.pack_type(Method.SEND, Class.INDICATION) == 0x0016
    assert stun.pack_type(Method.DATA, Class.INDICATION) == 0x0017


TID = bytes(range(12))


@pytest.mark.parametrize(
    ("attr", "value"),
    [
        (Attr.XOR_PEER_ADDRESS, ("192.0.2.7", 1234)),
        (Attr.XOR_RELAYED_ADDRESS, ("2001:db8::1", 65535)),
        (Attr.MAPPED_ADDRESS, ("2001:db8::2", 3478)),
        (Attr.ERROR_CODE, (438, "Stale Nonce")),
        (Attr.UNKNOWN_ATTRIBUTES, (0x0031, 0x7777)),
        (Attr.CHANNEL_NUMBER, 0x4001),
        (Attr.LIFETIME, 3600),
        (Attr.DATA, b"\x00\x01\x02"),
        (Attr.REQUESTED_TRANSPORT, 17),
        (Attr.EVEN_PORT, True),
        (Attr.DONT_FRAGMENT, True),
        (Attr.RESERVATION_TOKEN, b"12345678"),
        (Attr.ADDRESS_ERROR_CODE, (stun.Family.V6, 440, "Address Family not Supported")),
        (Attr.ICMP, (3, 4, 1400)),
    ],
)
def test_attribute_round_trip(attr: int, value: object) -> None:
    msg = stun.parse(stun.encode(Method.ALLOCATE, Class.REQUEST, TID, [(attr, value)]))
    assert msg.get(attr) == value


def _with_attribute(attr: int, raw_value: bytes) -> bytes:
    body = struct.pack("!HH", attr, len(raw_value)) + raw_value + b"\x00" * (-len(raw_value) % 4)
    return struct.pack("!HHI12s", 0x0003, len(body), stun.MAGIC_COOKIE, TID) + body


def test_xor_address_of_wrong_size_is_a_bad_attribute() -> None:
    msg = stun.parse(_with_attribute(Attr.XOR_PEER_ADDRESS, b"\x00\x01\x12\x34\x01\x02\x03"))
    with pytest.raises(stun.BadAttribute):
        msg.get(Attr.XOR_PEER_ADDRESS)
    msg = stun.parse(_with_attribute(Attr.XOR_PEER_ADDRESS, b"\x00\x02\x12\x34" + bytes(4)))
    with pytest.raises(stun.BadAttribute):
        msg.get(Attr.XOR_PEER_ADDRESS)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x01\x00\x00",  # truncated header
        struct.pack("!HHI12s", 0x0001, 4, stun.MAGIC_COOKIE, TID),  # length lies (too long)
        struct.pack("!HHI12s", 0x0001, 0, stun.MAGIC_COOKIE, TID) + b"\x00" * 4,  # trailing bytes
        struct.pack("!HHI12s", 0x0001, 0, 0xDEADBEEF, TID),  # bad cookie
        struct.pack("!HHI12s", 0xC001, 0, stun.MAGIC_COOKIE, TID),  # top bits set
        struct.pack("!HHI12s", 0x0001, 3, stun.MAGIC_COOKIE, TID) + b"abc",  # unaligned length
        # attribute length runs past the end
        struct.pack("!HHI12sHH", 0x0001, 4, stun.MAGIC_COOKIE, TID, Attr.SOFTWARE, 200),
    ],
)
def test_framing_errors_are_parse_errors(data: bytes) -> None:
    with pytest.raises(stun.ParseError):
        stun.parse(data)


def test_attributes_after_integrity_are_ignored_and_after_fingerprint_rejected() -> None:
    key = b"k"
    msg = stun.encode(Method.BINDING, Class.REQUEST, TID, [(Attr.SOFTWARE, "x")], integrity_key=key)
    extra = struct.pack("!HHI", Attr.LIFETIME, 4, 7)
    tampered = msg[:2] + struct.pack("!H", len(msg) - 20 + 8) + msg[4:] + extra
    parsed = stun.parse(tampered)
    assert parsed.get(Attr.LIFETIME) is None
    assert stun.verify_integrity(parsed, key)
    with_fp = stun.encode(Method.BINDING, Class.REQUEST, TID, [], fingerprint=True)
    after_fp = with_fp[:2] + struct.pack("!H", len(with_fp) - 20 + 8) + with_fp[4:] + extra
    with pytest.raises(stun.ParseError):
        stun.parse(after_fp)


def test_bad_fingerprint_is_a_parse_error() -> None:
    data = bytearray(stun.encode(Method.BINDING, Class.REQUEST, TID, [], fingerprint=True))
    data[-1] ^= 1
    with pytest.raises(stun.ParseError):
        stun.parse(bytes(data))


def test_oversized_text_attribute_is_bad() -> None:
    msg = stun.parse(_with_attribute(Attr.USERNAME, b"a" * 600))
    with pytest.raises(stun.BadAttribute):
        msg.get(Attr.USERNAME)


def test_unknown_comprehension_required_attributes_are_listed() -> None:
    msg = stun.parse(_with_attribute(0x0031, b"zz"))
    assert msg.unknown_comprehension_required() == [0x0031]
    msg = stun.parse(_with_attribute(0xC001, b"zz"))
    assert msg.unknown_comprehension_required() == []


def test_channel_data() -> None:
    assert channel_data.encode(0x4000, b"abc") == b"\x40\x00\x00\x03abc"
    assert channel_data.decode(b"\x40\x00\x00\x03abc\x00") == (0x4000, b"abc")  # padding
    assert channel_data.decode(b"\x4f\xff\x00\x00") == (0x4FFF, b"")
    for bad in (b"\x40\x00\x00", b"\x40\x00\x00\x05abc", b"\x50\x00\x00\x00", b"\x3f\xff\x00\x00"):
        with pytest.raises(ValueError):
            channel_data.decode(bad)


@pytest.mark.parametrize("peer", [("192.0.2.7", 5000), ("2001:db8::7", 65535)])
@pytest.mark.parametrize("size", [0, 1, 2, 3, 4, 5, 100, 1201])
def test_the_direct_data_indication_is_what_encode_makes(peer: tuple[str, int], size: int) -> None:
    tid, data = bytes(range(12)), bytes(i % 251 for i in range(size))
    expected = stun.encode(
        Method.DATA, Class.INDICATION, tid, [(Attr.XOR_PEER_ADDRESS, peer), (Attr.DATA, data)]
    )
    assert stun.data_indication(tid, peer, data) == expected


def test_indication_ids_are_cut_from_blocks_and_never_repeat_a_slice() -> None:
    calls: list[int] = []
    rng = random.Random(7)

    def token_bytes(n: int) -> bytes:
        calls.append(n)
        return rng.randbytes(n)

    ids = stun.TransactionIds(token_bytes)
    seen = [ids() for _ in range(2 * 256 + 1)]
    assert all(len(t) == 12 for t in seen)
    assert calls == [stun.TransactionIds.BLOCK] * 3  # one call per 256 IDs
    assert len(set(seen)) == len(seen)
