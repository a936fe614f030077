"""Ethernet frames for exercising the XDP router (tests and simulations; needs scapy).

Frames are built with scapy so that lengths and checksums are computed independently of the
program under test.
"""

from __future__ import annotations

import struct

from firezone_relay.protocol.types import Addr

MAC_ROUTER = "02:00:00:00:00:01"
MAC_RELAY = "02:00:00:00:00:10"


def channel_data(channel: int, data: bytes, pad: bytes = b"") -> bytes:
    """A ChannelData message (RFC 8656 §12.4), optionally followed by padding bytes."""
    return struct.pack("!HH", channel, len(data)) + data + pad


def frame(
    src: Addr,
    dst: Addr,
    payload: bytes,
    *,
    tos: int = 0,
    ttl: int = 64,
    ip_id: int = 0,
    df: bool = True,
    flow: int = 0,
    checksum: int | None = None,
    mac_src: str = MAC_ROUTER,
    mac_dst: str = MAC_RELAY,
    trailer: bytes = b"",
) -> bytes:
    """An Ethernet/IP/UDP frame; ``checksum=None`` lets scapy compute the UDP checksum."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw

    ip: IP | IPv6
    if ":" in src[0]:
        ip = IPv6(src=src[0], dst=dst[0], tc=tos, fl=flow, hlim=ttl)
    else:
        ip = IP(src=src[0], dst=dst[0], tos=tos, ttl=ttl, id=ip_id, flags="DF" if df else 0)
    udp = UDP(sport=src[1], dport=dst[1])
    if checksum is not None:
        udp.chksum = checksum
    return bytes(Ether(src=mac_src, dst=mac_dst) / ip / udp / Raw(payload)) + trailer


def describe(raw: bytes) -> str:
    """One line about a frame, for assertion messages."""
    from scapy.layers.l2 import Ether

    return repr(Ether(raw))
