"""Which peers a client may relay to: the TURN server's SSRF guard.

Every IPv4-in-IPv6 form is reduced to its IPv4 address first (coturn shipped bypasses for
each form it forgot), then judged in this order:

1. never: port 0, the unspecified, "this network", broadcast and multicast addresses;
2. the relay's public address on a port of the allocation range: ``Verdict.LOOP``, another
   allocation of this relay, handed over inside the relay and never sent to a socket (the
   server also requires the port to hold a live allocation);
3. the operator's allow-list (``--allowed-peer-ip``), which overrides everything below;
4. the relay's listen port on its own addresses, and the host's own interface addresses
   (public address on other ports included): refused, except loopback ones with
   ``allow_loopback``;
5. the operator's deny-list (``--denied-peer-ip``);
6. the built-in defaults: loopback (``allow_loopback``), private and CGNAT
   (``allow_private``), link-local/metadata, documentation and reserved ranges refused.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_LOOPBACK = [ipaddress.ip_network(n) for n in ("127.0.0.0/8", "::1/128")]
_PRIVATE = [
    ipaddress.ip_network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7")
]
_NEVER = [
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",  # "this network"; 0.0.0.0 reaches loopback (CVE-2020-26262)
        "224.0.0.0/4",  # multicast
        "255.255.255.255/32",  # broadcast
        "::/128",  # unspecified
        "ff00::/8",  # multicast
    )
]
_DEFAULT_DENIED = [
    ipaddress.ip_network(n)
    for n in (
        "169.254.0.0/16",  # link-local, cloud metadata
        "192.0.0.0/24",  # IETF protocol assignments
        "192.0.2.0/24",  # TEST-NET-1
        "192.88.99.0/24",  # 6to4 relay anycast
        "198.18.0.0/15",  # benchmarking
        "198.51.100.0/24",  # TEST-NET-2
        "203.0.113.0/24",  # TEST-NET-3
        "240.0.0.0/4",  # reserved
        "100::/64",  # discard-only
        "2001::/32",  # Teredo
        "2001:db8::/32",  # documentation
        "2002::/16",  # 6to4 (when it does not embed an address we can check)
        "fe80::/10",  # link-local
        "fec0::/10",  # site-local
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


class Verdict(enum.Enum):
    REFUSE = "refuse"
    RELAY = "relay"  # send to the peer from the allocation socket
    LOOP = "loop"  # another allocation of this relay: hand over inside the relay


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def networks(cidrs: Iterable[str]) -> tuple[Network, ...]:
    """Parse CIDRs (host bits may be set); raises ValueError on a bad one."""
    return tuple(ipaddress.ip_network(c.strip(), strict=False) for c in cidrs if c.strip())


#: verdicts remembered per policy (``PeerPolicy.classify``); past it the memo starts over, so a
#: client spraying peers costs a re-classification each, never memory
VERDICT_MEMO = 4096


def _within(address: IPAddress, nets: Iterable[Network]) -> bool:
    return any(address in net for net in nets if net.version == address.version)


@dataclass(frozen=True, slots=True)
class PeerPolicy:
    allow_loopback: bool = False
    allow_private: bool = False
    #: the relay's public addresses: peers there are other allocations of this relay
    own_addresses: frozenset[str] = frozenset()
    #: the host's interface addresses (loopback, private, public): never peers by default
    host_addresses: frozenset[str] = frozenset()
    lowest_port: int = 49152
    highest_port: int = 65535
    listen_port: int = 3478
    allowed: tuple[Network, ...] = field(default=())
    denied: tuple[Network, ...] = field(default=())
    #: (host, port) -> verdict: a Send indication classifies its peer on every datagram, and
    #: parsing the address is most of the cost; a verdict depends on nothing else, and a new
    #: policy (a reload) starts with an empty memo
    _memo: dict[tuple[str, int], Verdict] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def allows(self, host: str, port: int) -> bool:
        """True if a client may relay to ``host:port`` (directly or inside the relay)."""
        return self.classify(host, port) is not Verdict.REFUSE

    def classify(self, host: str, port: int) -> Verdict:
        key = (host, port)
        memo = self._memo
        verdict = memo.get(key)
        if verdict is None:
            if len(memo) >= VERDICT_MEMO:
                memo.clear()
            verdict = memo[key] = self._classify(host, port)
        return verdict

    def _classify(self, host: str, port: int) -> Verdict:
        try:
            address = canonical(ipaddress.ip_address(host.split("%")[0]))
        except ValueError:
            return Verdict.REFUSE
        if port == 0 or _within(address, _NEVER):
            return Verdict.REFUSE
        text = str(address)
        own = text in self.own_addresses
        if own and self.lowest_port <= port <= self.highest_port:
            return Verdict.LOOP
        local = own or text in self.host_addresses
        if (local or address.is_loopback) and port == self.listen_port:
            return Verdict.REFUSE  # never our own listen socket
        if _within(address, self.allowed):
            return Verdict.RELAY
        if local:
            # Other local sockets only where loopback peers are allowed anyway (a relay on
            # 127.0.0.1 for tests and laptops).
            allowed = self.allow_loopback and address.is_loopback
            return Verdict.RELAY if allowed else Verdict.REFUSE
        if _within(address, self.denied) or _within(address, _DEFAULT_DENIED):
            return Verdict.REFUSE
        if _within(address, _LOOPBACK):
            return Verdict.RELAY if self.allow_loopback else Verdict.REFUSE
        if _within(address, _PRIVATE):
            return Verdict.RELAY if self.allow_private else Verdict.REFUSE
        return Verdict.RELAY
