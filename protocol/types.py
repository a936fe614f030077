"""Small shared types: socket addresses as plain tuples, address families."""

from __future__ import annotations

import enum

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


def addr_text(addr: Addr) -> str:
    """``host:port`` (``[host]:port`` for IPv6), as Rust's ``SocketAddr`` displays it: the form
    log fields carry, never the Python tuple."""
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def log_fields(**fields: object) -> dict[str, dict[str, str]]:
    """``extra=`` for a log call: the event's structured fields, which the JSON format puts
    under ``fields`` and the human one appends as ``key=value``. Values are text, as the
    Firezone relay records its fields (``%sender``: Display), addresses as ``addr_text``."""
    return {
        "fields": {
            k: addr_text(v) if isinstance(v, tuple) and len(v) == 2 else str(v)
            for k, v in fields.items()
        }
    }
