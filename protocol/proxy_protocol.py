"""The PROXY protocol header (HAProxy's spec, versions 1 and 2) in front of a stream.

A load balancer that terminates nothing but forwards TCP (HAProxy, nginx's stream module, AWS
NLB) puts one header before the client's bytes, carrying the client's address. The relay only
reads it on connections from the operator's trusted sources (``--proxy-protocol-from``), and
there it is required: ``ProxyReader.feed`` returns the header once it is complete, with the
bytes after it; anything that is not a valid header is a ``ProxyError`` (close the
connection). Bounded: a v1 line is at most 107 bytes, a v2 header at most ``MAX_V2_BYTES``;
v2 TLVs are skipped. ``LOCAL`` (v2) and ``UNKNOWN`` (v1) headers, and v2 families other than
IPv4/IPv6, carry no address: the connection's own endpoints stand.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

from firezone_relay.protocol.types import Addr

__all__ = ["MAX_V1_BYTES", "MAX_V2_BYTES", "ProxyError", "ProxyHeader", "ProxyReader"]

V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: the longest v1 line the spec allows, CRLF included
MAX_V1_BYTES = 107
#: v2 header (16 bytes) and its addresses and TLVs; real balancers send well under 512
MAX_V2_BYTES = 16 + 2048

_V2_FIXED = struct.Struct("!12sBBH")
_V4_ADDRS = struct.Struct("!4s4sHH")
_V6_ADDRS = struct.Struct("!16s16sHH")


class ProxyError(ValueError):
    """Not a valid PROXY header: close the connection."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """The client's and the balancer's addresses (None: use the connection's own)."""

    source: Addr | None
    destination: Addr | None
    version: int


class ProxyReader:
    """Collects one PROXY header from the start of a stream (sans-IO)."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes | bytearray | memoryview) -> tuple[ProxyHeader, bytes] | None:
        """``(header, rest of the bytes)`` once the header is complete, None while it is not.

        Raises ProxyError as soon as the bytes cannot start a valid header."""
        buffer = self._buffer
        buffer += data
        if buffer[:1] == b"P":
            return self._v1(buffer)
        if buffer[:1] == b"\r":
            return self._v2(buffer)
        if buffer:
            raise ProxyError("no PROXY header")
        return None

    def _v1(self, buffer: bytearray) -> tuple[ProxyHeader, bytes] | None:
        if buffer[:6] != V1_PREFIX[: len(buffer)]:
            raise ProxyError("no PROXY header")
        end = buffer.find(b"\r\n", 0, MAX_V1_BYTES)
        if end < 0:
            if len(buffer) >= MAX_V1_BYTES:
                raise ProxyError("PROXY v1 line too long")
            return None
        rest = bytes(buffer[end + 2 :])
        return _parse_v1(bytes(buffer[6:end])), rest

    def _v2(self, buffer: bytearray) -> tuple[ProxyHeader, bytes] | None:
        if buffer[:12] != V2_SIGNATURE[: len(buffer)]:
            raise ProxyError("no PROXY header")
        if len(buffer) < 16:
            return None
        _, version_command, family, length = _V2_FIXED.unpack_from(buffer)
        if version_command >> 4 != 2 or version_command & 0xF > 1:
            raise ProxyError("PROXY v2 with an unknown version or command")
        if 16 + length > MAX_V2_BYTES:
            raise ProxyError("PROXY v2 header too long")
        if len(buffer) < 16 + length:
            return None
        body = bytes(buffer[16 : 16 + length])
        rest = bytes(buffer[16 + length :])
        if version_command & 0xF == 0:  # LOCAL: the balancer's own health check
            return ProxyHeader(None, None, 2), rest
        return _parse_v2_addresses(family >> 4, body), rest


def _parse_v1(line: bytes) -> ProxyHeader:
    """``TCP4 src dst sport dport``, ``TCP6 ...`` or ``UNKNOWN[ anything]``."""
    if line == b"UNKNOWN" or line.startswith(b"UNKNOWN "):
        return ProxyHeader(None, None, 1)
    parts = line.split(b" ")
    if len(parts) != 5 or parts[0] not in (b"TCP4", b"TCP6"):
        raise ProxyError("malformed PROXY v1 line")
    version = 4 if parts[0] == b"TCP4" else 6
    try:
        source = (_v1_host(parts[1], version), _v1_port(parts[3]))
        destination = (_v1_host(parts[2], version), _v1_port(parts[4]))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProxyError("malformed PROXY v1 address") from exc
    return ProxyHeader(source, destination, 1)


def _v1_host(raw: bytes, version: int) -> str:
    address = ipaddress.ip_address(raw.decode("ascii"))
    if address.version != version:
        raise ValueError("address family does not match")
    return _normal(address.packed)


def _v1_port(raw: bytes) -> int:
    if not (raw.isdigit() and len(raw) <= 5) or (raw[:1] == b"0" and raw != b"0"):
        raise ValueError("bad port")
    port = int(raw)
    if port > 65535:
        raise ValueError("bad port")
    return port


def _parse_v2_addresses(family: int, body: bytes) -> ProxyHeader:
    if family == 1:  # AF_INET
        if len(body) < _V4_ADDRS.size:
            raise ProxyError("PROXY v2 IPv4 addresses cut short")
        src, dst, sport, dport = _V4_ADDRS.unpack_from(body)
    elif family == 2:  # AF_INET6
        if len(body) < _V6_ADDRS.size:
            raise ProxyError("PROXY v2 IPv6 addresses cut short")
        src, dst, sport, dport = _V6_ADDRS.unpack_from(body)
    else:  # UNSPEC or UNIX: nothing the relay can use, keep the connection's endpoints
        return ProxyHeader(None, None, 2)
    return ProxyHeader((_normal(src), sport), (_normal(dst), dport), 2)


def _normal(packed: bytes) -> str:
    """The host as the relay's sockets report it (``inet_ntop``)."""
    family = socket.AF_INET if len(packed) == 4 else socket.AF_INET6
    return socket.inet_ntop(family, packed)
