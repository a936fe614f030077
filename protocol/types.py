"""Small shared types: socket addresses as plain tuples, address families, transports, and
the client's 5-tuple."""

from __future__ import annotations

import enum
from typing import NamedTuple

#: A UDP socket address as Python's sockets report it for IPv4: ``(host, port)``.
#: IPv6 addresses are normalised to the same 2-tuple (flowinfo and scope id dropped),
#: with the host in the form ``socket.inet_ntop`` produces.
Addr = tuple[str, int]


class Family(enum.IntEnum):
    """IP address family, valued as in STUN address attributes."""

    V4 = 1
    V6 = 2

    @staticmethod
    def of(host: str) -> Family:
        return Family.V6 if ":" in host else Family.V4


class Transport(enum.IntEnum):
    """How a client reaches the relay (RFC 8656 §3.1). Only UDP is produced today."""

    UDP = 1
    TCP = 2
    TLS = 3

    @property
    def network(self) -> str:
        """OpenTelemetry's ``network.transport``: TLS runs over TCP."""
        return "udp" if self is Transport.UDP else "tcp"


class FiveTuple(NamedTuple):
    """Who a client is to the relay: its transport, its address and the relay address it
    reached (RFC 8656 §2, the "5-tuple"). It keys allocations, nonces and the
    retransmission cache, and names the recipient of everything sent to a client.

    A NamedTuple rather than a frozen dataclass: it is a dict key on the per-datagram
    paths, where a tuple hashes in C and a dataclass in Python."""

    transport: Transport
    #: the client's address (the source of what it sends)
    remote: Addr
    #: the relay's address it sent to (for UDP: the listen socket's bound address)
    local: Addr

    def __str__(self) -> str:
        return f"{self.transport.name.lower()} {addr_text(self.remote)} -> {addr_text(self.local)}"

    @property
    def family(self) -> Family:
        return Family.V6 if ":" in self.remote[0] else Family.V4


def udp(remote: Addr, local: Addr) -> FiveTuple:
    """The 5-tuple of a client sending UDP from ``remote`` to ``local``."""
    return FiveTuple(Transport.UDP, remote, local)


def addr_text(addr: Addr) -> str:
    """``host:port`` (``[host]:port`` for IPv6), as Rust's ``SocketAddr`` displays it: the form
    log fields carry, never the Python tuple."""
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def log_fields(**fields: object) -> dict[str, dict[str, str]]:
    """``extra=`` for a log call: the event's structured fields, which the JSON format puts
    under ``fields`` and the human one appends as ``key=value``. Values are text, as the
    Firezone relay records its fields (``%sender``: Display), addresses as ``addr_text``."""
    return {"fields": {k: _field_text(v) for k, v in fields.items()}}


def _field_text(value: object) -> str:
    """A client is its address (``sender`` in Firezone's logs), an address ``host:port``."""
    if isinstance(value, FiveTuple):
        return addr_text(value.remote)
    if isinstance(value, tuple) and len(value) == 2:
        return addr_text(value)
    return str(value)
