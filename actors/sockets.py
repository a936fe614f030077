"""UDP socket creation for the listen and allocation ports, and the file-descriptor limit."""

from __future__ import annotations

import logging
import resource
import socket

from firezone_relay.protocol.types import Family

__all__ = ["bind_udp", "raise_nofile_limit"]

logger = logging.getLogger("relay.sockets")

#: Listen sockets carry every client's traffic: give them deep queues.
LISTEN_BUFFER_BYTES = 4 * 1024 * 1024

#: An allocation socket's receive queue: what one peer can burst at it before the loop reads
#: it. The kernel's default (net.core.rmem_default, 208 KiB here) holds about 280 small
#: datagrams (each costs its buffer's true size, ~768 bytes for a 100-byte datagram on this
#: kernel) and a burst of 2,000 lost a third of them. 1 MiB (the kernel books twice what is
#: set, 2 MiB) holds such a burst while the loop reads 256 datagrams per turn. It is a cap, not
#: an allocation: memory is only taken while datagrams wait, and all UDP queues together are
#: held to net.ipv4.udp_mem, so thousands of allocations cost nothing while they are read
#: (10,000 full queues at once would be bounded by udp_mem, not 20 GiB).
ALLOCATION_RECEIVE_BYTES = 1024 * 1024

# not in every Python's socket module
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
SO_RXQ_OVFL = getattr(socket, "SO_RXQ_OVFL", 40)


def _set_buffer(sock: socket.socket, force: int, opt: int, size: int) -> None:
    """``size`` bytes: forced past net.core.rmem_max / wmem_max where the process may (root or
    CAP_NET_ADMIN, as the relay usually runs; Debian's default cap is 208 KiB, which would make
    the setting moot), else as far as the cap allows."""
    for option in (force, opt):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, size)
            return
        except OSError:
            continue


def bind_udp(
    family: Family,
    host: str,
    port: int,
    *,
    buffer_bytes: int | None = None,
    receive_bytes: int | None = None,
    reuse_port: bool = False,
) -> socket.socket:
    """A non-blocking UDP socket bound to ``(host, port)``; IPv6 sockets are IPv6-only.
    ``buffer_bytes`` sizes both queues, ``receive_bytes`` the receive queue; ``reuse_port``
    joins the port's ``SO_REUSEPORT`` group (the workers' listen sockets). Datagrams the
    kernel drops on a full receive queue are reported to the reader (``SO_RXQ_OVFL``: the
    compiled helper counts them as ``relay.datagrams.dropped{reason=kernel_rx_overflow}``).

    Raises OSError (e.g. EADDRINUSE) to the caller, which decides what a failure means.
    """
    af = socket.AF_INET6 if family is Family.V6 else socket.AF_INET
    sock = socket.socket(af, socket.SOCK_DGRAM)
    try:
        if af == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if buffer_bytes:
            _set_buffer(sock, SO_RCVBUFFORCE, socket.SO_RCVBUF, buffer_bytes)
            _set_buffer(sock, SO_SNDBUFFORCE, socket.SO_SNDBUF, buffer_bytes)
        if receive_bytes:
            _set_buffer(sock, SO_RCVBUFFORCE, socket.SO_RCVBUF, receive_bytes)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
        except OSError:
            pass  # an old kernel: drops go uncounted
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
