"""Trace files: a pcap of UDP datagrams plus a JSON expectations file next to it.

The pcap is what tcpdump/tshark show (Ethernet with zero MACs, as a capture on ``lo`` looks;
IPv4 and IPv6 mixed). Writing goes through scapy (offline, speed does not matter); reading
uses ``RawPcapReader`` and slices the UDP payload by header offsets, so a replay never pays
for scapy's dissection. Reading also accepts captures made with ``tcpdump -i lo`` /
``-i any`` (Ethernet, Linux cooked v1/v2, raw IP, BSD loopback), pcap or pcapng.
"""

from __future__ import annotations

import json
import logging
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from firezone_relay.protocol.types import Addr

logging.getLogger("scapy.runtime").setLevel(logging.ERROR)
logging.getLogger("scapy.loading").setLevel(logging.ERROR)

FORMAT_VERSION = 1
TRACE_LISTEN_PORT = 3478  # the relay's listen port as it appears in trace files

# link types
_ETHERNET, _NULL, _RAW, _RAW_ALT, _LOOP, _SLL, _SLL2, _IPV4, _IPV6 = (
    1,
    0,
    101,
    12,
    108,
    113,
    276,
    228,
    229,
)


@dataclass(frozen=True, slots=True)
class Frame:
    """One UDP datagram of a trace; ``t`` is seconds since the first frame."""

    t: float
    src: Addr
    dst: Addr
    payload: bytes


def format_addr(addr: Addr) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_addr(text: str) -> Addr:
    if text.startswith("["):
        host, _, port = text[1:].partition("]:")
    else:
        host, _, port = text.rpartition(":")
    return socket.inet_ntop(*_family_and_packed(host)), int(port)


def _family_and_packed(host: str) -> tuple[int, bytes]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return family, socket.inet_pton(family, host)


# --- expectations ---------------------------------------------------------------------------


@dataclass
class Expectations:
    """What a trace needs and promises, kept in ``<trace>.json``.

    * ``relay``: how to start the daemon (``auth`` "portal" or "standalone", ``scheme``,
      ``ip4``/``ip6`` public addresses, extra ``args``, ``ports`` in its allocation range);
    * ``roles``: role name -> trace endpoints (``"127.0.0.2:41000"``); every other endpoint on
      a relay address is the relay (the listen port 3478, or a relayed address);
    * ``credentials``: recorded USERNAME -> how to mint the live one (``public_key`` for the
      portal, ``user`` for standalone, ``expired``, ``ttl`` seconds from now or an absolute
      ``expiry``, ``sign_password`` to sign wrongly);
    * ``kind``: "legit" or "hostile"; a hostile trace names the legit trace it runs
      ``beside``, and may ``allow_loss`` on its own expectations;
    * ``frames``: per-frame notes and options, keyed by tshark's 1-based frame number
      (``"note"``: shown with a mismatch; ``"verbatim": true``: send without re-binding).
    """

    description: str = ""
    scenario: str = ""
    relay: dict[str, Any] = field(default_factory=dict)
    roles: dict[str, list[str]] = field(default_factory=dict)
    credentials: dict[str, dict[str, Any]] = field(default_factory=dict)
    kind: str = "legit"
    beside: str | None = None
    allow_loss: bool = False
    frames: dict[str, dict[str, Any]] = field(default_factory=dict)
    format: int = FORMAT_VERSION

    def to_json(self) -> str:
        data = {
            "format": self.format,
            "description": self.description,
            "scenario": self.scenario,
            "kind": self.kind,
            "beside": self.beside,
            "allow_loss": self.allow_loss,
            "relay": self.relay,
            "roles": self.roles,
            "credentials": self.credentials,
            "frames": self.frames,
        }
        return json.dumps(data, indent=1, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Expectations:
        data = json.loads(text)
        if data.get("format") != FORMAT_VERSION:
            raise ValueError(f"unsupported expectations format {data.get('format')!r}")
        return cls(
            description=data.get("description", ""),
            scenario=data.get("scenario", ""),
            relay=data.get("relay", {}),
            roles=data.get("roles", {}),
            credentials=data.get("credentials", {}),
            kind=data.get("kind", "legit"),
            beside=data.get("beside"),
            allow_loss=bool(data.get("allow_loss", False)),
            frames=data.get("frames", {}),
        )

    def role_of(self) -> dict[Addr, str]:
        return {parse_addr(ep): role for role, eps in self.roles.items() for ep in eps}

    def frame_options(self, index: int) -> dict[str, Any]:
        return self.frames.get(str(index + 1), {})


def expectations_path(pcap: Path) -> Path:
    return pcap.with_suffix(".json")


@dataclass
class Trace:
    path: Path
    frames: list[Frame]
    expectations: Expectations

    @property
    def name(self) -> str:
        return self.path.stem


def load(path: Path | str) -> Trace:
    path = Path(path)
    return Trace(path, read_pcap(path), Expectations.from_json(expectations_path(path).read_text()))


def save(path: Path | str, frames: list[Frame], expectations: Expectations) -> Path:
    path = Path(path)
    write_pcap(path, frames)
    expectations_path(path).write_text(expectations.to_json())
    return path


# --- pcap -------------------------------------------------------------------------------------


def write_pcap(path: Path, frames: list[Frame], start: float = 1_700_000_000.0) -> None:
    """Ethernet (zero MACs) / IP or IPv6 / UDP frames, as a capture on ``lo`` would hold."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw
    from scapy.utils import wrpcap

    packets = []
    for frame in frames:
        v6 = ":" in frame.src[0]
        ether = Ether(
            src="00:00:00:00:00:00", dst="00:00:00:00:00:00", type=0x86DD if v6 else 0x800
        )
        ip = (
            IPv6(src=frame.src[0], dst=frame.dst[0])
            if v6
            else IP(src=frame.src[0], dst=frame.dst[0])
        )
        packet = ether / ip / UDP(sport=frame.src[1], dport=frame.dst[1]) / Raw(frame.payload)
        packet.time = start + frame.t
        packets.append(packet)
    wrpcap(str(path), packets)


def read_pcap(path: Path) -> list[Frame]:
    """UDP datagrams of a pcap/pcapng file, without dissection; non-UDP frames are skipped."""
    from scapy.utils import RawPcapReader

    frames: list[Frame] = []
    first: float | None = None
    with RawPcapReader(str(path)) as reader:
        default_linktype = getattr(reader, "linktype", _ETHERNET)
        for data, meta in reader:
            stamp, linktype = _stamp_and_linktype(meta, default_linktype)
            parsed = _udp_of(bytes(data), linktype)
            if parsed is None:
                continue
            if first is None:
                first = stamp
            src, dst, payload = parsed
            frames.append(Frame(round(stamp - first, 6), src, dst, payload))
    return frames


def _stamp_and_linktype(meta: Any, default_linktype: int) -> tuple[float, int]:
    if hasattr(meta, "sec"):  # classic pcap
        return meta.sec + meta.usec / 1_000_000, default_linktype
    resolution = getattr(meta, "tsresol", 1_000_000) or 1_000_000
    stamp = ((meta.tshigh << 32) | meta.tslow) / resolution
    return stamp, getattr(meta, "linktype", default_linktype)


def _udp_of(data: bytes, linktype: int) -> tuple[Addr, Addr, bytes] | None:
    if linktype == _ETHERNET:
        ethertype, offset = struct.unpack_from("!H", data, 12)[0], 14
        while ethertype in (0x8100, 0x88A8):  # VLAN tags
            ethertype, offset = struct.unpack_from("!H", data, offset + 2)[0], offset + 4
    elif linktype == _SLL:
        ethertype, offset = struct.unpack_from("!H", data, 14)[0], 16
    elif linktype == _SLL2:
        ethertype, offset = struct.unpack_from("!H", data, 0)[0], 20
    elif linktype in (_NULL, _LOOP):
        af = struct.unpack_from("=I", data, 0)[0]
        ethertype, offset = (0x800 if af == 2 else 0x86DD), 4
    elif linktype in (_RAW, _RAW_ALT, _IPV4, _IPV6):
        ethertype, offset = (0x800 if data[0] >> 4 == 4 else 0x86DD), 0
    else:
        raise ValueError(f"unsupported pcap link type {linktype}")
    if ethertype == 0x800:
        if len(data) < offset + 20 or data[offset + 9] != 17:
            return None
        ihl = (data[offset] & 0x0F) * 4
        total = struct.unpack_from("!H", data, offset + 2)[0]
        src = socket.inet_ntop(socket.AF_INET, data[offset + 12 : offset + 16])
        dst = socket.inet_ntop(socket.AF_INET, data[offset + 16 : offset + 20])
        udp, end = offset + ihl, offset + total
    elif ethertype == 0x86DD:
        if len(data) < offset + 40 or data[offset + 6] != 17:
            return None  # no extension headers in our traces
        payload_length = struct.unpack_from("!H", data, offset + 4)[0]
        src = socket.inet_ntop(socket.AF_INET6, data[offset + 8 : offset + 24])
        dst = socket.inet_ntop(socket.AF_INET6, data[offset + 24 : offset + 40])
        udp, end = offset + 40, offset + 40 + payload_length
    else:
        return None
    sport, dport, length = struct.unpack_from("!HHH", data, udp)
    payload = data[udp + 8 : min(end, udp + length)]
    return (src, sport), (dst, dport), payload


# --- display (scapy dissection, only for humans) -------------------------------------------


def dissect(payload: bytes) -> str:
    """scapy's ``show()`` of a datagram: STUN via scapy.contrib.stun, ChannelData via a tiny
    layer of our own, anything else as Raw."""
    from scapy.packet import Packet, Raw

    packet: Packet
    try:
        if len(payload) >= 20 and payload[0] < 0x40 and payload[4:8] == b"\x21\x12\xa4\x42":
            from scapy.contrib.stun import STUN

            packet = STUN(payload)
        elif len(payload) >= 4 and 0x40 <= payload[0] <= 0x7F:
            packet = _channel_data_layer()(payload)
        else:
            packet = Raw(payload)
        return str(packet.show(dump=True))
    except Exception as exc:  # dissection is best effort
        return f"(scapy could not dissect: {exc}) {payload[:64].hex()}"


_CHANNEL_DATA: Any = None


def _channel_data_layer() -> Any:
    global _CHANNEL_DATA
    if _CHANNEL_DATA is None:
        from scapy.fields import ShortField, StrLenField, XShortField
        from scapy.packet import Packet

        class ChannelData(Packet):
            name = "TURN ChannelData"
            fields_desc = [
                XShortField("channel", 0x4000),
                ShortField("length", None),
                StrLenField("data", b"", length_from=lambda p: p.length),
            ]

        _CHANNEL_DATA = ChannelData
    return _CHANNEL_DATA
