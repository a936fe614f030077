"""UDP socket creation for the listen and allocation ports, and the file-descriptor limit."""

from __future__ import annotations

import logging
import resource
import socket

from firezone_relay.protocol.types import Family

__all__ = ["bind_udp", "raise_nofile_limit"]

logger = logging.getLogger("relay.sockets")

#: Listen sockets carry every client's traffic: give them deep queues (capped by
#: net.core.rmem_max / wmem_max).
LISTEN_BUFFER_BYTES = 4 * 1024 * 1024


def bind_udp(
    family: Family, host: str, port: int, *, buffer_bytes: int | None = None
) -> socket.socket:
    """A non-blocking UDP socket bound to ``(host, port)``; IPv6 sockets are IPv6-only.

    Raises OSError (e.g. EADDRINUSE) to the caller, which decides what a failure means.
    """
    af = socket.AF_INET6 if family is Family.V6 else socket.AF_INET
    sock = socket.socket(af, socket.SOCK_DGRAM)
    try:
        if af == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if buffer_bytes:
            for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, opt, buffer_bytes)
                except OSError:
                    pass
        sock.setblocking(False)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def raise_nofile_limit(wanted: int = 1 << 20) -> int:
    """Raise RLIMIT_NOFILE as far as allowed (each allocation costs one fd per family)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for target_hard in (max(hard, wanted), hard):
        target_soft = target_hard if target_hard != resource.RLIM_INFINITY else wanted
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target_soft, target_hard))
            return target_soft
        except (ValueError, OSError):
            continue
    logger.warning("could not raise RLIMIT_NOFILE above %d", soft)
    return soft


def local_addresses() -> frozenset[str]:
    """Every address on this host's interfaces (the primary IPv4 and the global IPv6 ones of
    each), so the peer filter can refuse the relay's own private addresses too."""
    from firezone_relay.xdp import interface

    found: set[str] = set()
    for _, name in socket.if_nameindex():
        address = interface.ipv4_address(name)
        if address is not None:
            found.add(address)
        found.update(interface.ipv6_addresses(name))
    return frozenset(found)
