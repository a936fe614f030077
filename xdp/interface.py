"""Facts about a network interface, read in the calling thread's network namespace.

Uses ioctls on a socket and /proc/thread-self (not /sys or /proc/self, which show the namespace
of whoever mounted them or of the main thread).
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct

SIOCGIFADDR = 0x8915
SIOCGIFMTU = 0x8921
IFA_F_TEMPORARY = 0x01
IFA_F_DEPRECATED = 0x20
IFA_F_TENTATIVE = 0x40


def ifindex(name: str) -> int:
    """Interface index; OSError(ENODEV) if there is no such interface here."""
    return socket.if_nametoindex(name)


def _ifreq(name: str) -> bytes:
    return struct.pack("16s16x", name.encode()[:15])


def mtu(name: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        res = fcntl.ioctl(s.fileno(), SIOCGIFMTU, _ifreq(name))
    return int(struct.unpack_from("=i", res, 16)[0])


def ipv4_address(name: str) -> str | None:
    """The interface's primary IPv4 address, or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            res = fcntl.ioctl(s.fileno(), SIOCGIFADDR, _ifreq(name))
        except OSError:
            return None
    return socket.inet_ntoa(res[20:24])


def ipv6_addresses(name: str) -> list[str]:
    """The interface's global-scope IPv6 addresses, stable ones (not temporary, not
    deprecated, not tentative) first."""
    try:
        with open("/proc/thread-self/net/if_inet6") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    found: list[tuple[bool, str]] = []
    for line in lines:
        parts = line.split()
        # address, ifindex, prefix length, scope, flags, name
        if len(parts) >= 6 and parts[5] == name and int(parts[3], 16) == 0:
            unstable = bool(
                int(parts[4], 16) & (IFA_F_TEMPORARY | IFA_F_DEPRECATED | IFA_F_TENTATIVE)
            )
            found.append((unstable, str(ipaddress.IPv6Address(bytes.fromhex(parts[0])))))
    return [a for _, a in sorted(found, key=lambda f: f[0])]


def ipv6_address(name: str, prefer: str | None = None) -> str | None:
    """``prefer`` if the interface has it, else its first stable global IPv6 address."""
    addresses = ipv6_addresses(name)
    if prefer is not None:
        p = ipaddress.IPv6Address(prefer)
        for a in addresses:
            if ipaddress.IPv6Address(a) == p:
                return a
    return addresses[0] if addresses else None
