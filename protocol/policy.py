"""Which peers a client may relay to: the TURN server's SSRF guard.

Every IPv4-in-IPv6 form is reduced to its IPv4 address first (coturn shipped bypasses for
each form it forgot), then the address is checked against deny lists. The relay's own
public address is refused too, except on a port of the allocation range: that is another
client's relayed address (two clients of this relay talking through it).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_LOOPBACK = [ipaddress.ip_network(n) for n in ("127.0.0.0/8", "::1/128")]
_PRIVATE = [
    ipaddress.ip_network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7")
]
_ALWAYS_DENIED = [
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",  # "this network"; 0.0.0.0 reaches loopback (CVE-2020-26262)
        "169.254.0.0/16",  # link-local, cloud metadata
        "192.0.0.0/24",  # IETF protocol assignments
        "192.0.2.0/24",  # TEST-NET-1
        "192.88.99.0/24",  # 6to4 relay anycast
        "198.18.0.0/15",  # benchmarking
        "198.51.100.0/24",  # TEST-NET-2
        "203.0.113.0/24",  # TEST-NET-3
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, broadcast
        "::/128",  # unspecified
        "100::/64",  # discard-only
        "2001::/32",  # Teredo
        "2001:db8::/32",  # documentation
        "2002::/16",  # 6to4 (when it does not embed an address we can check)
        "fe80::/10",  # link-local
        "fec0::/10",  # site-local
        "ff00::/8",  # multicast
        "64:ff9b:1::/48",  # local-use NAT64
    )
]


def canonical(address: IPAddress) -> IPAddress:
    """Reduce IPv4-mapped, IPv4-compatible, NAT64 (64:ff9b::/96) and 6to4 forms to IPv4."""
    if isinstance(address, ipaddress.IPv4Address):
        return address
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    packed = address.packed
    if packed[:12] == bytes(12) and int(address) > 1:  # ::a.b.c.d (deprecated compat form)
        return ipaddress.IPv4Address(packed[12:])
    if packed[:12] == bytes.fromhex("0064ff9b0000000000000000"):
        return ipaddress.IPv4Address(packed[12:])
    if address.sixtofour is not None:
        return address.sixtofour
    return address


@dataclass(frozen=True, slots=True)
class PeerPolicy:
    allow_loopback: bool = False
    allow_private: bool = False
    own_addresses: frozenset[str] = frozenset()
    lowest_port: int = 49152
    highest_port: int = 65535
    listen_port: int = 3478

    def allows(self, host: str, port: int) -> bool:
        """True if a client may relay to ``host:port``."""
        try:
            address = canonical(ipaddress.ip_address(host.split("%")[0]))
        except ValueError:
            return False
        if port == 0:
            return False
        if str(address) in self.own_addresses:
            if self.lowest_port <= port <= self.highest_port:
                return True
            # Our listen port never; other ports only where loopback peers are allowed
            # anyway (a relay on 127.0.0.1 for tests and laptops).
            return port != self.listen_port and self.allow_loopback and address.is_loopback
        if any(address in net for net in _ALWAYS_DENIED if net.version == address.version):
            return False
        if any(address in net for net in _LOOPBACK if net.version == address.version):
            return self.allow_loopback
        if any(address in net for net in _PRIVATE if net.version == address.version):
            return self.allow_private
        return True
