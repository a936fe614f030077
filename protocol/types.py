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
