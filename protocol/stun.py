"""STUN message codec (RFC 8489), with the TURN attributes of RFC 8656.

Table-driven: every known attribute has one row in ``ATTRIBUTES`` with a decoder and an
encoder, so adding an attribute is adding a row. Parsing is split in two steps:
``parse`` checks framing and collects raw attributes (cheap, never decodes values), and
``Message.get`` decodes a value on demand. Any malformed input raises ``ParseError`` (the
datagram is dropped) or ``BadAttribute`` (the server answers 400).
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import socket
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from firezone_relay.protocol.errors import ErrorCode
from firezone_relay.protocol.types import Addr, Family

MAGIC_COOKIE = 0x2112A442
COOKIE_BYTES = struct.pack("!I", MAGIC_COOKIE)
HEADER = struct.Struct("!HHI12s")
FINGERPRINT_XOR = 0x5354554E
#: Attributes one message may carry, counted on the wire (ignored ones included). Real
#: clients send about ten; past this the datagram is dropped unparsed, so the work per
#: datagram is bounded whatever its size (RFC 8489 sets no limit; dropping answers nothing
#: to a source that may be spoofed).
MAX_ATTRIBUTES = 64


class Method:
    BINDING = 0x001
    ALLOCATE = 0x003
    REFRESH = 0x004
    SEND = 0x006
    DATA = 0x007
    CREATE_PERMISSION = 0x008
    CHANNEL_BIND = 0x009


class Class:
    REQUEST = 0b00
    INDICATION = 0b01
    SUCCESS = 0b10
    ERROR = 0b11


class Attr:
    MAPPED_ADDRESS = 0x0001
    USERNAME = 0x0006
    MESSAGE_INTEGRITY = 0x0008
    ERROR_CODE = 0x0009
    UNKNOWN_ATTRIBUTES = 0x000A
    CHANNEL_NUMBER = 0x000C
    LIFETIME = 0x000D
    XOR_PEER_ADDRESS = 0x0012
    DATA = 0x0013
    REALM = 0x0014
    NONCE = 0x0015
    XOR_RELAYED_ADDRESS = 0x0016
    REQUESTED_ADDRESS_FAMILY = 0x0017
    EVEN_PORT = 0x0018
    REQUESTED_TRANSPORT = 0x0019
    DONT_FRAGMENT = 0x001A
    MESSAGE_INTEGRITY_SHA256 = 0x001C
    PASSWORD_ALGORITHM = 0x001D
    USERHASH = 0x001E
    XOR_MAPPED_ADDRESS = 0x0020
    RESERVATION_TOKEN = 0x0022
    PRIORITY = 0x0024
    USE_CANDIDATE = 0x0025
    ADDITIONAL_ADDRESS_FAMILY = 0x8000
    ADDRESS_ERROR_CODE = 0x8001
    PASSWORD_ALGORITHMS = 0x8002
    ICMP = 0x8004
    SOFTWARE = 0x8022
    ALTERNATE_SERVER = 0x8023
    FINGERPRINT = 0x8028
    ICE_CONTROLLED = 0x8029
    ICE_CONTROLLING = 0x802A


#: the reason phrase of each error code we send (defined once, by ``errors.ErrorCode``)
REASONS = {int(code): code.reason for code in ErrorCode}


class ParseError(ValueError):
    """The datagram is not a well-framed STUN message: drop it without answering."""


class BadAttribute(ValueError):
    """A known attribute has a malformed value: answer a request with 400."""


# --- message type packing (RFC 8489 §5) -------------------------------------------------


def pack_type(method: int, cls: int) -> int:
    return (
        (method & 0x000F)
        | ((method & 0x0070) << 1)
        | ((method & 0x0F80) << 2)
        | ((cls & 0b01) << 4)
        | ((cls & 0b10) << 7)
    )


def unpack_type(msg_type: int) -> tuple[int, int]:
    method = (msg_type & 0x000F) | ((msg_type & 0x00E0) >> 1) | ((msg_type & 0x3E00) >> 2)
    cls = ((msg_type & 0x0010) >> 4) | ((msg_type & 0x0100) >> 7)
    return method, cls


# --- value codecs ------------------------------------------------------------------------


def _need(value: bytes, size: int) -> None:
    if len(value) != size:
        raise BadAttribute(f"expected {size} bytes, got {len(value)}")


def _dec_u32(value: bytes, tid: bytes) -> int:
    _need(value, 4)
    result: int = struct.unpack("!I", value)[0]
    return result


def _enc_u32(value: int, tid: bytes) -> bytes:
    return struct.pack("!I", value)


def _dec_u64(value: bytes, tid: bytes) -> int:
    _need(value, 8)
    result: int = struct.unpack("!Q", value)[0]
    return result


def _enc_u64(value: int, tid: bytes) -> bytes:
    return struct.pack("!Q", value)


def _dec_text(limit: int) -> Callable[[bytes, bytes], str]:
    def decode(value: bytes, tid: bytes) -> str:
        if len(value) > limit:
            raise BadAttribute("text attribute too long")
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadAttribute("text attribute is not UTF-8") from exc

    return decode


def _enc_text(value: str, tid: bytes) -> bytes:
    return value.encode("utf-8")


def _dec_raw(value: bytes, tid: bytes) -> bytes:
    return value


def _enc_raw(value: bytes, tid: bytes) -> bytes:
    return bytes(value)


def _dec_empty(value: bytes, tid: bytes) -> bool:
    _need(value, 0)
    return True


def _enc_empty(value: bool, tid: bytes) -> bytes:
    return b""


def _dec_address(value: bytes, tid: bytes) -> Addr:
    if len(value) < 4:
        raise BadAttribute("address too short")
    family, port = value[1], struct.unpack_from("!H", value, 2)[0]
    if family == 1 and len(value) == 8:
        return socket.inet_ntop(socket.AF_INET, value[4:8]), port
    if family == 2 and len(value) == 20:
        return socket.inet_ntop(socket.AF_INET6, value[4:20]), port
    raise BadAttribute("bad address family or length")


def _enc_address(value: Addr, tid: bytes) -> bytes:
    host, port = value
    if ":" in host:
        return struct.pack("!BBH", 0, 2, port) + socket.inet_pton(socket.AF_INET6, host)
    return struct.pack("!BBH", 0, 1, port) + socket.inet_pton(socket.AF_INET, host)


def _xor(data: bytes, pad: bytes) -> bytes:
    """``data`` XOR the start of ``pad`` (as long as ``data``), as one integer operation."""
    size = len(data)
    return (int.from_bytes(data) ^ int.from_bytes(pad[:size])).to_bytes(size)


def _dec_xor_address(value: bytes, tid: bytes) -> Addr:
    if len(value) not in (8, 20):
        raise BadAttribute("XOR address of the wrong size")
    raw = value[:2] + _xor(value[2:4], COOKIE_BYTES) + _xor(value[4:], COOKIE_BYTES + tid)
    return _dec_address(raw, tid)


def _enc_xor_address(value: Addr, tid: bytes) -> bytes:
    raw = _enc_address(value, tid)
    return raw[:2] + _xor(raw[2:4], COOKIE_BYTES) + _xor(raw[4:], COOKIE_BYTES + tid)


def _dec_error_code(value: bytes, tid: bytes) -> tuple[int, str]:
    if len(value) < 4 or len(value) > 4 + 763:
        raise BadAttribute("bad ERROR-CODE length")
    klass, number = value[2] & 0x07, value[3]
    if not 3 <= klass <= 6 or number > 99:
        raise BadAttribute("bad error code")
    return klass * 100 + number, _dec_text(763)(value[4:], tid)


def _enc_error_code(value: tuple[int, str], tid: bytes) -> bytes:
    code, reason = value
    return struct.pack("!HBB", 0, code // 100, code % 100) + reason.encode("utf-8")


def _dec_unknown(value: bytes, tid: bytes) -> tuple[int, ...]:
    if len(value) % 2:
        raise BadAttribute("odd UNKNOWN-ATTRIBUTES length")
    return struct.unpack(f"!{len(value) // 2}H", value)


def _enc_unknown(value: Sequence[int], tid: bytes) -> bytes:
    return struct.pack(f"!{len(value)}H", *value)


def _dec_channel(value: bytes, tid: bytes) -> int:
    _need(value, 4)
    result: int = struct.unpack_from("!H", value)[0]
    return result


def _enc_channel(value: int, tid: bytes) -> bytes:
    return struct.pack("!HH", value, 0)


def _dec_family(value: bytes, tid: bytes) -> Family:
    _need(value, 4)
    if value[0] not in (1, 2):
        raise BadAttribute("bad address family")
    return Family(value[0])


def _enc_family(value: Family, tid: bytes) -> bytes:
    return bytes((int(value), 0, 0, 0))


def _dec_transport(value: bytes, tid: bytes) -> int:
    _need(value, 4)
    return value[0]


def _enc_transport(value: int, tid: bytes) -> bytes:
    return bytes((value, 0, 0, 0))


def _dec_even_port(value: bytes, tid: bytes) -> bool:
    _need(value, 1)
    return bool(value[0] & 0x80)


def _enc_even_port(value: bool, tid: bytes) -> bytes:
    return b"\x80" if value else b"\x00"


def _dec_address_error(value: bytes, tid: bytes) -> tuple[Family, int, str]:
    if len(value) < 4 or value[0] not in (1, 2):
        raise BadAttribute("bad ADDRESS-ERROR-CODE")
    code, reason = _dec_error_code(b"\x00\x00" + value[2:], tid)
    return Family(value[0]), code, reason


def _enc_address_error(value: tuple[Family, int, str], tid: bytes) -> bytes:
    family, code, reason = value
    return bytes((int(family), 0)) + _enc_error_code((code, reason), tid)[2:]


def _dec_icmp(value: bytes, tid: bytes) -> tuple[int, int, int]:
    _need(value, 8)
    _, icmp_type, code, data = struct.unpack("!HBBI", value)
    return icmp_type, code, data


def _enc_icmp(value: tuple[int, int, int], tid: bytes) -> bytes:
    return struct.pack("!HBBI", 0, *value)


def _dec_integrity(size: int) -> Callable[[bytes, bytes], bytes]:
    def decode(value: bytes, tid: bytes) -> bytes:
        _need(value, size)
        return value

    return decode


def _dec_integrity_sha256(value: bytes, tid: bytes) -> bytes:
    if not 16 <= len(value) <= 32 or len(value) % 4:
        raise BadAttribute("bad MESSAGE-INTEGRITY-SHA256 length")
    return value


def _dec_token(value: bytes, tid: bytes) -> bytes:
    _need(value, 8)
    return value


@dataclass(frozen=True, slots=True)
class AttrSpec:
    name: str
    decode: Callable[[bytes, bytes], Any]
    encode: Callable[[Any, bytes], bytes]


ATTRIBUTES: dict[int, AttrSpec] = {
    Attr.MAPPED_ADDRESS: AttrSpec("MAPPED-ADDRESS", _dec_address, _enc_address),
    Attr.USERNAME: AttrSpec("USERNAME", _dec_text(513), _enc_text),
    Attr.MESSAGE_INTEGRITY: AttrSpec("MESSAGE-INTEGRITY", _dec_integrity(20), _enc_raw),
    Attr.ERROR_CODE: AttrSpec("ERROR-CODE", _dec_error_code, _enc_error_code),
    Attr.UNKNOWN_ATTRIBUTES: AttrSpec("UNKNOWN-ATTRIBUTES", _dec_unknown, _enc_unknown),
    Attr.CHANNEL_NUMBER: AttrSpec("CHANNEL-NUMBER", _dec_channel, _enc_channel),
    Attr.LIFETIME: AttrSpec("LIFETIME", _dec_u32, _enc_u32),
    Attr.XOR_PEER_ADDRESS: AttrSpec("XOR-PEER-ADDRESS", _dec_xor_address, _enc_xor_address),
    Attr.DATA: AttrSpec("DATA", _dec_raw, _enc_raw),
    Attr.REALM: AttrSpec("REALM", _dec_text(763), _enc_text),
    Attr.NONCE: AttrSpec("NONCE", _dec_text(763), _enc_text),
    Attr.XOR_RELAYED_ADDRESS: AttrSpec("XOR-RELAYED-ADDRESS", _dec_xor_address, _enc_xor_address),
    Attr.REQUESTED_ADDRESS_FAMILY: AttrSpec("REQUESTED-ADDRESS-FAMILY", _dec_family, _enc_family),
    Attr.EVEN_PORT: AttrSpec("EVEN-PORT", _dec_even_port, _enc_even_port),
    Attr.REQUESTED_TRANSPORT: AttrSpec("REQUESTED-TRANSPORT", _dec_transport, _enc_transport),
    Attr.DONT_FRAGMENT: AttrSpec("DONT-FRAGMENT", _dec_empty, _enc_empty),
    Attr.MESSAGE_INTEGRITY_SHA256: AttrSpec(
        "MESSAGE-INTEGRITY-SHA256", _dec_integrity_sha256, _enc_raw
    ),
    Attr.PASSWORD_ALGORITHM: AttrSpec("PASSWORD-ALGORITHM", _dec_raw, _enc_raw),
    Attr.USERHASH: AttrSpec("USERHASH", _dec_integrity(32), _enc_raw),
    Attr.XOR_MAPPED_ADDRESS: AttrSpec("XOR-MAPPED-ADDRESS", _dec_xor_address, _enc_xor_address),
    Attr.RESERVATION_TOKEN: AttrSpec("RESERVATION-TOKEN", _dec_token, _enc_raw),
    Attr.PRIORITY: AttrSpec("PRIORITY", _dec_u32, _enc_u32),
    Attr.USE_CANDIDATE: AttrSpec("USE-CANDIDATE", _dec_empty, _enc_empty),
    Attr.ADDITIONAL_ADDRESS_FAMILY: AttrSpec("ADDITIONAL-ADDRESS-FAMILY", _dec_family, _enc_family),
    Attr.ADDRESS_ERROR_CODE: AttrSpec("ADDRESS-ERROR-CODE", _dec_address_error, _enc_address_error),
    Attr.PASSWORD_ALGORITHMS: AttrSpec("PASSWORD-ALGORITHMS", _dec_raw, _enc_raw),
    Attr.ICMP: AttrSpec("ICMP", _dec_icmp, _enc_icmp),
    Attr.SOFTWARE: AttrSpec("SOFTWARE", _dec_text(763), _enc_text),
    Attr.ALTERNATE_SERVER: AttrSpec("ALTERNATE-SERVER", _dec_address, _enc_address),
    Attr.FINGERPRINT: AttrSpec("FINGERPRINT", _dec_u32, _enc_u32),
    Attr.ICE_CONTROLLED: AttrSpec("ICE-CONTROLLED", _dec_u64, _enc_u64),
    Attr.ICE_CONTROLLING: AttrSpec("ICE-CONTROLLING", _dec_u64, _enc_u64),
}


# --- messages ----------------------------------------------------------------------------


@dataclass(slots=True)
class Message:
    """A parsed STUN message.

    ``attributes`` holds raw ``(type, value)`` pairs in wire order; attributes after
    MESSAGE-INTEGRITY other than MESSAGE-INTEGRITY-SHA256 and FINGERPRINT are dropped, as
    RFC 8489 §14.5 requires. ``raw`` and the ``*_offset`` fields are kept so integrity can
    be verified over the bytes as received.
    """

    method: int
    cls: int
    transaction_id: bytes
    attributes: list[tuple[int, bytes]] = field(default_factory=list)
    raw: bytes = b""
    integrity_offset: int | None = None
    integrity_sha256_offset: int | None = None
    fingerprint_offset: int | None = None

    def has(self, attr_type: int) -> bool:
        return any(t == attr_type for t, _ in self.attributes)

    def get_raw(self, attr_type: int) -> bytes | None:
        """The first occurrence's value (RFC 8489 §14: later duplicates are ignored)."""
        for t, v in self.attributes:
            if t == attr_type:
                return v
        return None

    def get(self, attr_type: int) -> Any:
        """Decode the first occurrence of ``attr_type``; None if absent.

        Raises BadAttribute if the value is malformed.
        """
        value = self.get_raw(attr_type)
        if value is None:
            return None
        return ATTRIBUTES[attr_type].decode(value, self.transaction_id)

    def get_all(self, attr_type: int) -> list[Any]:
        spec = ATTRIBUTES[attr_type]
        return [spec.decode(v, self.transaction_id) for t, v in self.attributes if t == attr_type]

    def unknown_comprehension_required(self) -> list[int]:
        """Distinct unknown types below 0x8000, in wire order (a dict: linear, not a list scan)."""
        return list(
            dict.fromkeys(t for t, _ in self.attributes if t < 0x8000 and t not in ATTRIBUTES)
        )


def is_stun(data: bytes | memoryview) -> bool:
    """Cheap demultiplexing check: first two bits zero and the magic cookie."""
    return len(data) >= 20 and data[0] < 0x40 and bytes(data[4:8]) == COOKIE_BYTES


def parse(data: bytes | memoryview) -> Message:
    """Parse a STUN message, checking framing and FINGERPRINT placement.

    Raises ParseError for anything that must be dropped silently (RFC 8489 §6.3).
    Integrity is not checked here: see ``verify_integrity``.
    """
    data = bytes(data)
    if len(data) < 20:
        raise ParseError("shorter than a STUN header")
    msg_type, length, cookie, tid = HEADER.unpack_from(data)
    if msg_type & 0xC000:
        raise ParseError("first two bits are not zero")
    if cookie != MAGIC_COOKIE:
        raise ParseError("bad magic cookie")
    if length % 4 or 20 + length != len(data):
        raise ParseError("length does not match the datagram")
    method, cls = unpack_type(msg_type)
    msg = Message(method, cls, tid, raw=data)
    offset = 20
    end = len(data)
    after_integrity = False
    count = 0
    while offset < end:
        count += 1
        if count > MAX_ATTRIBUTES:
            raise ParseError("too many attributes")
        if end - offset < 4:
            raise ParseError("truncated attribute header")
        attr_type, attr_len = struct.unpack_from("!HH", data, offset)
        value_start = offset + 4
        value_end = value_start + attr_len
        if value_end > end:
            raise ParseError("attribute runs past the end")
        if msg.fingerprint_offset is not None:
            raise ParseError("attribute after FINGERPRINT")
        value = data[value_start:value_end]
        if attr_type == Attr.FINGERPRINT:
            msg.fingerprint_offset = offset
            msg.attributes.append((attr_type, value))
        elif attr_type == Attr.MESSAGE_INTEGRITY and not after_integrity:
            msg.integrity_offset = offset
            after_integrity = True
            msg.attributes.append((attr_type, value))
        elif attr_type == Attr.MESSAGE_INTEGRITY_SHA256 and msg.integrity_sha256_offset is None:
            msg.integrity_sha256_offset = offset
            after_integrity = True
            msg.attributes.append((attr_type, value))
        elif not after_integrity:
            msg.attributes.append((attr_type, value))
        offset = value_end + (-attr_len % 4)
    if offset != end:
        raise ParseError("padding runs past the end")
    if msg.fingerprint_offset is not None and not verify_fingerprint(msg):
        raise ParseError("bad FINGERPRINT")
    return msg


def fingerprint_of(prefix: bytes) -> int:
    return (binascii.crc32(prefix) ^ FINGERPRINT_XOR) & 0xFFFFFFFF


def verify_fingerprint(msg: Message) -> bool:
    offset = msg.fingerprint_offset
    if offset is None:
        return False
    value = msg.raw[offset + 4 : offset + 8]
    if len(value) != 4:
        return False
    return fingerprint_of(msg.raw[:offset]) == int.from_bytes(value, "big")


def verify_integrity(msg: Message, key: bytes) -> bool:
    """Check MESSAGE-INTEGRITY-SHA256 if present, else MESSAGE-INTEGRITY, with ``key``."""
    raw = msg.raw
    if msg.integrity_sha256_offset is not None and msg.integrity_offset is None:
        offset = msg.integrity_sha256_offset
        size = struct.unpack_from("!H", raw, offset + 2)[0]
        if not 16 <= size <= 32 or size % 4:
            return False
        expected = raw[offset + 4 : offset + 4 + size]
        head = raw[:2] + struct.pack("!H", offset - 20 + 4 + size) + raw[4:offset]
        mac = hmac.new(key, head, hashlib.sha256).digest()[:size]
        return hmac.compare_digest(mac, expected)
    if msg.integrity_offset is None:
        return False
    offset = msg.integrity_offset
    expected = raw[offset + 4 : offset + 24]
    if len(expected) != 20:
        return False
    head = raw[:2] + struct.pack("!H", offset - 20 + 24) + raw[4:offset]
    return hmac.compare_digest(hmac.new(key, head, hashlib.sha1).digest(), expected)


def long_term_key(username: str, realm: str, password: str) -> bytes:
    """RFC 8489 §9.2.2 MD5 key. (OpaqueString is the identity for the ASCII credentials
    both supported schemes produce.)"""
    return hashlib.md5(f"{username}:{realm}:{password}".encode(), usedforsecurity=False).digest()


def encode(
    method: int,
    cls: int,
    transaction_id: bytes,
    attributes: Iterable[tuple[int, Any]] = (),
    *,
    integrity_key: bytes | None = None,
    integrity_sha256: bool = False,
    fingerprint: bool = False,
    padding: bytes = b"\x00",
) -> bytes:
    """Encode a message: attributes are ``(type, python value)`` pairs, encoded through the
    table (unknown types take raw bytes). MESSAGE-INTEGRITY(-SHA256) and FINGERPRINT are
    appended last when asked for. ``padding`` exists only to reproduce test vectors."""
    if len(transaction_id) != 12:
        raise ValueError("transaction id must be 12 bytes")
    body = bytearray()
    for attr_type, value in attributes:
        spec = ATTRIBUTES.get(attr_type)
        encoded = spec.encode(value, transaction_id) if spec else bytes(value)
        body += struct.pack("!HH", attr_type, len(encoded))
        body += encoded
        body += padding * (-len(encoded) % 4)
    msg_type = pack_type(method, cls)
    if integrity_key is not None:
        if integrity_sha256:
            attr_type, digest = Attr.MESSAGE_INTEGRITY_SHA256, hashlib.sha256
            size = 32
        else:
            attr_type, digest = Attr.MESSAGE_INTEGRITY, hashlib.sha1
            size = 20
        head = HEADER.pack(msg_type, len(body) + 4 + size, MAGIC_COOKIE, transaction_id)
        mac = hmac.new(integrity_key, head + body, digest).digest()
        body += struct.pack("!HH", attr_type, size) + mac
    if fingerprint:
        head = HEADER.pack(msg_type, len(body) + 8, MAGIC_COOKIE, transaction_id)
        crc = fingerprint_of(head + body)
        body += struct.pack("!HHI", Attr.FINGERPRINT, 4, crc)
    return HEADER.pack(msg_type, len(body), MAGIC_COOKIE, transaction_id) + bytes(body)


_DATA_INDICATION_TYPE = pack_type(Method.DATA, Class.INDICATION)
_DATA_INDICATION_HEAD = struct.Struct("!HHI12sHH")  # header, XOR-PEER-ADDRESS's type and length
_ATTR_HEAD = struct.Struct("!HH")
_ZEROS = (b"", b"\0\0\0", b"\0\0", b"\0")


def data_indication(transaction_id: bytes, peer: Addr, data: bytes) -> bytes:
    """A Data indication (XOR-PEER-ADDRESS, DATA): what ``encode`` makes of them, built
    directly, as the relay sends one per datagram from a peer without a channel."""
    peer_value = _enc_xor_address(peer, transaction_id)
    size = len(data)
    return b"".join(
        (
            _DATA_INDICATION_HEAD.pack(
                _DATA_INDICATION_TYPE,
                4 + len(peer_value) + 4 + size + (-size & 3),
                MAGIC_COOKIE,
                transaction_id,
                Attr.XOR_PEER_ADDRESS,
                len(peer_value),
            ),
            peer_value,
            _ATTR_HEAD.pack(Attr.DATA, size),
            data,
            _ZEROS[size & 3],
        )
    )


class TransactionIds:
    """12-byte transaction IDs for the relay's own indications, cut from blocks of
    ``token_bytes`` (the OS's CSPRNG in the daemon): one system call per 256 IDs, not per
    datagram."""

    __slots__ = ("_at", "_block", "_token_bytes")

    BLOCK = 12 * 256

    def __init__(self, token_bytes: Callable[[int], bytes]) -> None:
        self._token_bytes = token_bytes
        self._block = b""
        self._at = 0

    def __call__(self) -> bytes:
        at = self._at
        if at >= len(self._block):
            self._block = self._token_bytes(self.BLOCK)
            at = 0
        self._at = at + 12
        return self._block[at : at + 12]


__all__ = [
    "ATTRIBUTES",
    "MAX_ATTRIBUTES",
    "Attr",
    "BadAttribute",
    "Class",
    "Message",
    "Method",
    "ParseError",
    "TransactionIds",
    "data_indication",
    "encode",
    "fingerprint_of",
    "is_stun",
    "long_term_key",
    "pack_type",
    "parse",
    "unpack_type",
    "verify_fingerprint",
    "verify_integrity",
]
