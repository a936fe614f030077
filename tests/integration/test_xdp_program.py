"""The XDP TURN router, run through the kernel with BPF_PROG_TEST_RUN on crafted frames.

Every relayed frame is compared byte for byte with what the userspace relay would send for the
same input: a real ``protocol.server.Server`` with real allocations and channel bindings decides
where the data goes and which bytes are relayed; scapy builds that datagram with freshly
computed checksums. The map entries come from the same Server's CreateChannelBinding commands,
through the map manager's ``BindingTable``.

Header policy of the fast path (checked here): TTL / hop limit 64 like a userspace sender,
DSCP/ECN copied (RFC 8656 §14 SHOULD), IPv4 ID and DF copied from an IPv4 input, ID 0 and DF set
from an IPv6 input, flow label 0, MAC addresses swapped.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from firezone_relay.protocol.auth import firezone_password
from firezone_relay.protocol.commands import Command, CreateAllocation
from firezone_relay.protocol.routes import LoopToClient
from firezone_relay.protocol.server import Server, ServerConfig
from firezone_relay.protocol.types import Addr, Family, FiveTuple, udp
from firezone_relay.xdp import bpfsys
from firezone_relay.xdp.bindings import BindingTable
from firezone_relay.xdp.maps import RouterConfig
from simulations.frames import MAC_RELAY, MAC_ROUTER, channel_data, describe, frame
from simulations.netns.topology import Netns
from simulations.turn_client import TurnClient
from tests.integration.conftest import require_bcc

pytestmark = pytest.mark.integration

PUBLIC4 = "52.0.0.1"  # behind a 1:1 NAT: packets arrive for IFACE4
IFACE4 = "10.0.0.5"
PUBLIC6 = "2600:1f00::1"  # no NAT for IPv6
IFACE6 = PUBLIC6
LISTEN = 3478
C4: Addr = ("93.184.216.34", 40000)
C6: Addr = ("2606:2800:220:1::7", 40001)
C4B: Addr = ("198.41.0.4", 41000)
C6B: Addr = ("2001:500:2::c", 41001)
P4: Addr = ("8.8.4.4", 5000)
P6: Addr = ("2001:4860:4860::8844", 5001)
NOW = 1_800_000_000.0

DEFAULT_CONFIG = RouterConfig(
    listen_port=LISTEN,
    public_ip4=PUBLIC4,
    public_ip6=PUBLIC6,
    interface_ip4=IFACE4,
    interface_ip6=IFACE6,
)


def _udp(client: tuple[str, int]) -> FiveTuple:
    """A UDP client's 5-tuple on the listen socket of its family."""
    return udp(client, ("::" if ":" in client[0] else "0.0.0.0", LISTEN))


def is6(addr: Addr | str) -> bool:
    host = addr if isinstance(addr, str) else addr[0]
    return ":" in host


def relay_ip(v6: bool) -> str:
    return IFACE6 if v6 else IFACE4


@pytest.fixture(scope="module")
def router() -> Iterator[object]:
    require_bcc()
    from firezone_relay.xdp.loader import TurnRouter

    r = TurnRouter(max_bindings=4096, timing_sample=1)
    try:
        yield r
    finally:
        r.close()


@dataclass
class Parsed:
    src: Addr
    dst: Addr
    payload: bytes
    tos: int
    ip_id: int
    df: bool
    checksum: int


def parse(raw: bytes) -> Parsed:
    from scapy.layers.inet import IP, UDP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether

    pkt = Ether(raw)
    udp = pkt[UDP]
    if IP in pkt:
        ip = pkt[IP]
        tos, ip_id, df = ip.tos, ip.id, bool(ip.flags.DF)
    else:
        ip = pkt[IPv6]
        tos, ip_id, df = ip.tc, 0, True
    payload = bytes(udp.payload)[: udp.len - 8]
    return Parsed((ip.src, udp.sport), (ip.dst, udp.dport), payload, tos, ip_id, df, udp.chksum)


@dataclass
class Relay:
    """The userspace relay (real Server) and the XDP router fed from its commands."""

    router: object
    server: Server = field(
        default_factory=lambda: Server(
            ServerConfig(public_ip4=PUBLIC4, public_ip6=PUBLIC6), random.Random(5)
        )
    )
    table: BindingTable = field(default_factory=BindingTable)
    ports: dict[Addr, int] = field(default_factory=dict)
    clients: dict[Addr, TurnClient] = field(default_factory=dict)

    # -- control plane through the real server --------------------------------------------

    def _drain(self) -> list[Command]:
        out = []
        while (c := self.server.next_command()) is not None:
            out.append(c)
        self._apply(out)
        return out

    def _apply(self, commands: list[Command]) -> None:
        changes = self.table.plan(commands)
        r = self.router
        r.delete(changes.delete_c2p, changes.delete_p2c)  # type: ignore[attr-defined]
        r.update(changes.update_c2p, changes.update_p2c)  # type: ignore[attr-defined]

    def allocate(self, client: Addr) -> int:
        salt = f"salt{len(self.clients)}"
        expiry = int(NOW) + 3600
        tc = TurnClient(
            f"{expiry}:{salt}",
            firezone_password(self.server.auth_secret, expiry, salt),
            rng=random.Random(salt),
        )
        from firezone_relay.protocol import stun

        self.server.handle_client_input(tc.allocate(transport=0), _udp(client), 0.0)
        for c in self._drain():
            tc.learn(stun.parse(c.payload))  # type: ignore[union-attr]
        self.server.handle_client_input(tc.allocate(additional_family=Family.V6), _udp(client), 0.0)
        ports = {c.port for c in self._drain() if isinstance(c, CreateAllocation)}
        assert len(ports) == 1, f"allocation for {client} failed"
        self.clients[client] = tc
        self.ports[client] = ports.pop()
        return self.ports[client]

    def bind(self, client: Addr, channel: int, peer: Addr) -> None:
        self.server.handle_client_input(
            self.clients[client].channel_bind(channel, peer), _udp(client), 0.0
        )
        assert any(type(c).__name__ == "CreateChannelBinding" for c in self._drain())

    def release(self, client: Addr) -> None:
        """Refresh with lifetime 0: the server deletes the allocation and its channels."""
        self.server.handle_client_input(self.clients[client].refresh(lifetime=0), _udp(client), 0.0)
        self._drain()

    def relayed(self, client: Addr) -> Addr:
        return (PUBLIC4, self.ports[client])

    # -- data plane -------------------------------------------------------------------------

    def userspace(self, raw: bytes) -> bytes | None:
        """The frame the userspace relay sends for input ``raw`` (None: it sends nothing)."""
        p = parse(raw)
        if p.dst[1] == LISTEN:
            route = self.server.handle_client_input(p.payload, _udp(p.src), 0.0)
            if route is None:
                return None
            if isinstance(route, LoopToClient):
                # relay loop: the core hands the data to the other allocation's client
                client, channel, length = route
                return self._expect(
                    p, client.remote, LISTEN, channel_data(channel, p.payload[4 : 4 + length])
                )
            port, peer, span = route
            return self._expect(p, peer, port, p.payload[span])
        back = self.server.handle_peer_traffic(p.payload, p.src, p.dst[1], 0.0)
        if back is None:
            return None
        client, channel = back
        return self._expect(p, client.remote, LISTEN, channel_data(channel, p.payload))

    @staticmethod
    def _expect(p: Parsed, dst: Addr, sport: int, payload: bytes) -> bytes:
        out6 = is6(dst)
        src = p.dst[0] if out6 == is6(p.src) else relay_ip(out6)
        from_v4 = not is6(p.src)
        return frame(
            (src, sport),
            dst,
            payload,
            tos=p.tos,
            ttl=64,
            ip_id=p.ip_id if from_v4 else 0,
            df=p.df if from_v4 else True,
            checksum=0 if p.checksum == 0 else None,
            mac_src=MAC_RELAY,
            mac_dst=MAC_ROUTER,
        )

    def xdp(self, raw: bytes) -> tuple[int, bytes]:
        res = self.router.test_run(raw)  # type: ignore[attr-defined]
        return res.retval, res.data

    def check_relayed(self, raw: bytes) -> bytes:
        """Assert XDP relays ``raw`` exactly as userspace would; return the frame."""
        want = self.userspace(raw)
        assert want is not None, f"userspace would not relay {describe(raw)}"
        verdict, got = self.xdp(raw)
        assert verdict == bpfsys.XDP_TX, f"verdict {verdict} for {describe(raw)}"
        assert got == want, f"\n got {describe(got)}\nwant {describe(want)}"
        return got

    def check_passed(self, raw: bytes, reason: str) -> None:
        before = self.router.counters().passed[reason]  # type: ignore[attr-defined]
        verdict, got = self.xdp(raw)
        assert verdict == bpfsys.XDP_PASS, f"verdict {verdict} for {describe(raw)}"
        assert got == raw, "a passed frame must be left untouched"
        after = self.router.counters().passed[reason]  # type: ignore[attr-defined]
        assert after == before + 1, f"expected pass reason {reason!r}"


@pytest.fixture
def relay(router: object) -> Iterator[Relay]:
    router.configure(DEFAULT_CONFIG)  # type: ignore[attr-defined]
    router.reset_counters()  # type: ignore[attr-defined]
    r = Relay(router)
    try:
        yield r
    finally:
        router.delete(list(r.table.c2p), list(r.table.p2c))  # type: ignore[attr-defined]


def to_relay(src: Addr, port: int, payload: bytes, **kw: object) -> bytes:
    return frame(src, (relay_ip(is6(src)), port), payload, **kw)  # type: ignore[arg-type]


PAYLOADS = [b"x", b"ab", b"abc", b"abcd", bytes(range(256)) * 4 + b"odd", random.randbytes(1200)]
PADS = [b"", b"\x01", b"\xfe\xff", b"\xaa\xbb\xcc"]
FAMILIES = [("4", "4"), ("6", "6"), ("4", "6"), ("6", "4")]


def pick(fam: str, a4: Addr, a6: Addr) -> Addr:
    return a6 if fam == "6" else a4


@pytest.mark.parametrize(("cfam", "pfam"), FAMILIES, ids=lambda f: f"v{f}")
def test_client_to_peer(relay: Relay, cfam: str, pfam: str) -> None:
    client, peer = pick(cfam, C4, C6), pick(pfam, P4, P6)
    relay.allocate(client)
    relay.bind(client, 0x4000, peer)
    for data in PAYLOADS:
        for pad in PADS:
            for tos, df in ((0, True), (0xB9, False)):
                raw = to_relay(
                    client, LISTEN, channel_data(0x4000, data, pad), tos=tos, df=df, ip_id=4242
                )
                relay.check_relayed(raw)


@pytest.mark.parametrize(("cfam", "pfam"), FAMILIES, ids=lambda f: f"v{f}")
def test_peer_to_client(relay: Relay, cfam: str, pfam: str) -> None:
    client, peer = pick(cfam, C4, C6), pick(pfam, P4, P6)
    port = relay.allocate(client)
    relay.bind(client, 0x4FFF, peer)
    for data in [b"", *PAYLOADS]:
        for tos, df in ((0, True), (0x2E, False)):
            relay.check_relayed(to_relay(peer, port, data, tos=tos, df=df, ip_id=7))


@pytest.mark.parametrize("via", ["4", "6"], ids=lambda v: f"via-v{v}")
@pytest.mark.parametrize(("afam", "bfam"), FAMILIES, ids=lambda f: f"v{f}")
def test_relay_loop(relay: Relay, afam: str, bfam: str, via: str) -> None:
    """Both ends are allocations here: ChannelData in, ChannelData out, channel rewritten."""
    a, b = pick(afam, C4, C6), pick(bfam, C4B, C6B)
    port_a, port_b = relay.allocate(a), relay.allocate(b)
    public = PUBLIC6 if via == "6" else PUBLIC4
    relay.bind(a, 0x4001, (public, port_b))
    relay.bind(b, 0x4ABC, (public, port_a))
    for data in PAYLOADS:
        for pad in (b"", b"\x07\x07"):
            out = relay.check_relayed(to_relay(a, LISTEN, channel_data(0x4001, data, pad)))
            assert parse(out).payload[:2] == b"\x4a\xbc"
            out = relay.check_relayed(to_relay(b, LISTEN, channel_data(0x4ABC, data, pad)))
            assert parse(out).payload[:2] == b"\x40\x01"
    c = relay.router.counters()  # type: ignore[attr-defined]
    assert c.packets["channel_to_channel"] == 2 * 2 * len(PAYLOADS)
    assert c.packets["channel_to_udp"] == 0


def test_udp_checksum_zero(relay: Relay) -> None:
    """IPv4 without UDP checksum keeps none towards IPv4; IPv6 needs one: userspace adds it."""
    relay.allocate(C4)
    relay.allocate(C6)
    port4b = relay.allocate(C4B)
    relay.bind(C4, 0x4000, P4)
    relay.bind(C4, 0x4001, P6)
    relay.bind(C6, 0x4000, P4)
    relay.bind(C4B, 0x4002, (PUBLIC4, relay.ports[C4]))
    relay.bind(C4, 0x4003, (PUBLIC4, port4b))
    port_c4 = relay.ports[C4]
    port_c6 = relay.ports[C6]
    # relayed, checksum stays 0
    for raw in (
        to_relay(C4, LISTEN, channel_data(0x4000, b"no checksum"), checksum=0),
        to_relay(P4, port_c4, b"no checksum back", checksum=0),
        to_relay(C4, LISTEN, channel_data(0x4003, b"loop without checksum"), checksum=0),
    ):
        out = relay.check_relayed(raw)
        assert parse(out).checksum == 0
    # IPv4 without checksum towards IPv6: passed (userspace would relay it, with a checksum)
    for raw in (
        to_relay(C4, LISTEN, channel_data(0x4001, b"to v6"), checksum=0),
        to_relay(P4, port_c6, b"to v6 client", checksum=0),
    ):
        assert relay.userspace(raw) is not None
        relay.check_passed(raw, "checksum")
    # a zero checksum is invalid for IPv6 input
    relay.check_passed(to_relay(C6, LISTEN, channel_data(0x4000, b"bad"), checksum=0), "checksum")


def test_computed_checksum_zero_is_sent_as_ffff(relay: Relay) -> None:
    client, peer = C4, P4
    relay.allocate(client)
    relay.bind(client, 0x4000, peer)
    port = relay.ports[client]
    for _ in range(3):
        base = bytearray(random.randbytes(64))
        base[-2:] = b"\0\0"
        out = relay.userspace(to_relay(client, LISTEN, channel_data(0x4000, bytes(base))))
        assert out is not None
        # Solve for the last payload word that makes the outgoing one's complement sum 0xffff.
        from scapy.layers.inet import UDP
        from scapy.layers.l2 import Ether

        pkt = Ether(out)
        pkt[UDP].chksum = None
        pkt = Ether(bytes(pkt))
        s = (~pkt[UDP].chksum) & 0xFFFF  # sum with the last word zero
        base[-2:] = struct.pack("!H", (~s) & 0xFFFF)
        raw = to_relay(client, LISTEN, channel_data(0x4000, bytes(base)))
        out = relay.check_relayed(raw)
        assert parse(out).checksum == 0xFFFF
    del port


def test_link_layer_trailer_is_cut(relay: Relay) -> None:
    relay.allocate(C4)
    relay.bind(C4, 0x4000, P4)
    trailer = b"\0" * 12  # Ethernet minimum-frame padding
    for raw in (
        to_relay(C4, LISTEN, channel_data(0x4000, b"x"), trailer=trailer),
        to_relay(P4, relay.ports[C4], b"y", trailer=trailer),
    ):
        want = relay.userspace(raw)
        verdict, got = relay.xdp(raw)
        assert verdict == bpfsys.XDP_TX and got == want


def _tcp(src: Addr, dst: Addr) -> bytes:
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    return bytes(
        Ether(src=MAC_ROUTER, dst=MAC_RELAY)
        / IP(src=src[0], dst=dst[0])
        / TCP(sport=src[1], dport=dst[1])
    )


def pass_cases(relay: Relay) -> list[tuple[str, str, bytes]]:
    from scapy.layers.inet import ICMP, IP, UDP, IPOption_RR
    from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop
    from scapy.layers.l2 import ARP, Dot1Q, Ether
    from scapy.packet import Raw

    from firezone_relay.protocol import stun

    port = relay.ports[C4]
    relay.bind(C4, 0x4000, P4)
    relay.bind(C6, 0x4000, P6)
    relay.bind(C4, 0x4001, ("8.8.8.8", 53))  # a peer on port 53: its replies are DNS-like
    cd = channel_data(0x4000, b"data")
    eth = Ether(src=MAC_ROUTER, dst=MAC_RELAY)
    v4 = IP(src=C4[0], dst=IFACE4)
    udp = UDP(sport=C4[1], dport=LISTEN)
    stun_request = stun.encode(stun.Method.BINDING, stun.Class.REQUEST, b"t" * 12, [])
    return [
        ("stun binding request", "not_channel_data", to_relay(C4, LISTEN, stun_request)),
        (
            "reserved channel 0x5000",
            "not_channel_data",
            to_relay(C4, LISTEN, channel_data(0x5000, b"data")),
        ),
        ("channel 0x7fff", "not_channel_data", to_relay(C4, LISTEN, channel_data(0x7FFF, b"d"))),
        ("unbound channel", "no_entry", to_relay(C4, LISTEN, channel_data(0x4ABC, b"data"))),
        ("unknown client", "no_entry", to_relay(C4B, LISTEN, cd)),
        ("unknown peer", "no_entry", to_relay(("8.8.8.8", 5000), port, b"data")),
        ("unknown peer port", "no_entry", to_relay((P4[0], P4[1] + 1), port, b"data")),
        ("dns reply", "dns", to_relay(("8.8.8.8", 53), port, b"dns answer")),
        (
            "length beyond datagram",
            "bad_length",
            to_relay(C4, LISTEN, struct.pack("!HH", 0x4000, 10) + b"short"),
        ),
        (
            "4 bytes of padding",
            "bad_length",
            to_relay(C4, LISTEN, channel_data(0x4000, b"d", b"pppp")),
        ),
        ("3-byte datagram", "malformed", to_relay(C4, LISTEN, b"\x40\x00\x00")),
        (
            "ipv4 options",
            "ip_options",
            bytes(eth / IP(src=C4[0], dst=IFACE4, options=[IPOption_RR()]) / udp / Raw(cd)),
        ),
        (
            "ipv4 more fragments",
            "fragment",
            bytes(eth / IP(src=C4[0], dst=IFACE4, flags="MF") / udp / Raw(cd)),
        ),
        (
            "ipv4 fragment offset",
            "fragment",
            bytes(eth / IP(src=C4[0], dst=IFACE4, frag=100) / Raw(cd * 3)),
        ),
        (
            "ipv6 hop-by-hop",
            "ip_options",
            bytes(
                eth
                / IPv6(src=C6[0], dst=IFACE6)
                / IPv6ExtHdrHopByHop()
                / UDP(sport=C6[1], dport=LISTEN)
                / Raw(cd)
            ),
        ),
        (
            "ipv6 fragment",
            "fragment",
            bytes(
                eth
                / IPv6(src=C6[0], dst=IFACE6)
                / IPv6ExtHdrFragment()
                / UDP(sport=C6[1], dport=LISTEN)
                / Raw(cd)
            ),
        ),
        ("tcp", "not_udp", _tcp(C4, (IFACE4, LISTEN))),
        ("icmp", "not_udp", bytes(eth / v4 / ICMP())),
        ("arp", "not_ip", bytes(Ether(src=MAC_ROUTER, dst="ff:ff:ff:ff:ff:ff") / ARP())),
        ("vlan", "not_ip", bytes(eth / Dot1Q(vlan=7) / v4 / udp / Raw(cd))),
        ("port below range", "not_turn_port", to_relay(C4, 49151, b"data")),
        ("port 53", "not_turn_port", to_relay(C4, 53, b"data")),
        ("truncated ip", "malformed", bytes(eth / v4 / udp / Raw(cd))[:30]),
        (
            "udp length lies",
            "malformed",
            bytes(
                eth / IP(src=C4[0], dst=IFACE4) / UDP(sport=C4[1], dport=LISTEN, len=200) / Raw(cd)
            ),
        ),
    ]


def test_everything_else_is_passed(relay: Relay) -> None:
    relay.allocate(C4)
    relay.allocate(C6)
    for name, reason, raw in pass_cases(relay):
        try:
            relay.check_passed(raw, reason)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None


def test_frames_beyond_the_linear_buffer_go_to_userspace(relay: Relay) -> None:
    """A frame whose datagram is not all in the linear XDP buffer (here: a 16 KiB ChannelData
    with padding) is passed, untouched."""
    relay.allocate(C4)
    relay.bind(C4, 0x4000, P4)
    raw = to_relay(C4, LISTEN, channel_data(0x4000, b"z" * 0x4000, b"p"))
    verdict, got = relay.xdp(raw)
    assert verdict == bpfsys.XDP_PASS and got == raw


def test_deleted_binding_goes_to_userspace(relay: Relay) -> None:
    port = relay.allocate(C4)
    relay.bind(C4, 0x4000, P4)
    relay.check_relayed(to_relay(C4, LISTEN, channel_data(0x4000, b"on")))
    relay.release(C4)
    assert not relay.table.c2p and not relay.table.p2c
    relay.check_passed(to_relay(C4, LISTEN, channel_data(0x4000, b"off")), "no_entry")
    relay.check_passed(to_relay(P4, port, b"off"), "no_entry")


def test_configured_ports(relay: Relay, router: object) -> None:
    """Listen port and allocation range come from the configuration, not from constants."""
    relay.allocate(C4)
    relay.bind(C4, 0x4000, P4)
    port = relay.ports[C4]
    cfg = RouterConfig(
        listen_port=3479,
        lowest_port=port,
        highest_port=port,
        public_ip4=PUBLIC4,
        interface_ip4=IFACE4,
    )
    router.configure(cfg)  # type: ignore[attr-defined]
    relay.check_passed(to_relay(C4, LISTEN, channel_data(0x4000, b"d")), "not_turn_port")
    verdict, _ = relay.xdp(to_relay(C4, 3479, channel_data(0x4000, b"d")))
    assert verdict == bpfsys.XDP_TX
    verdict, _ = relay.xdp(to_relay(P4, port, b"d"))
    assert verdict == bpfsys.XDP_TX
    cfg = RouterConfig(
        listen_port=3479,
        lowest_port=port + 1,
        highest_port=port + 5,
        public_ip4=PUBLIC4,
        interface_ip4=IFACE4,
    )
    router.configure(cfg)  # type: ignore[attr-defined]
    relay.check_passed(to_relay(P4, port, b"d"), "not_turn_port")


def test_single_stack_relay(relay: Relay, router: object) -> None:
    """IPv4 only: relaying and the relay loop work; cross-family output has no source address."""
    a, b = C4, C4B
    port_a, port_b = relay.allocate(a), relay.allocate(b)
    relay.bind(a, 0x4000, P4)
    relay.bind(a, 0x4001, (PUBLIC4, port_b))
    relay.bind(b, 0x4002, (PUBLIC4, port_a))
    relay.bind(a, 0x4003, P6)
    router.configure(RouterConfig(public_ip4=PUBLIC4, interface_ip4=IFACE4))  # type: ignore[attr-defined]
    relay.check_relayed(to_relay(a, LISTEN, channel_data(0x4000, b"plain")))
    relay.check_relayed(to_relay(a, LISTEN, channel_data(0x4001, b"loop")))
    relay.check_relayed(to_relay(P4, port_a, b"back"))
    relay.check_passed(to_relay(a, LISTEN, channel_data(0x4003, b"to v6")), "no_source_addr")
    # IPv6 only: mirrored
    c, d = C6, C6B
    port_c, port_d = relay.allocate(c), relay.allocate(d)
    relay.bind(c, 0x4000, P6)
    relay.bind(c, 0x4001, (PUBLIC6, port_d))
    relay.bind(d, 0x4002, (PUBLIC6, port_c))
    relay.bind(c, 0x4003, P4)
    router.configure(RouterConfig(public_ip6=PUBLIC6, interface_ip6=IFACE6))  # type: ignore[attr-defined]
    relay.check_relayed(to_relay(c, LISTEN, channel_data(0x4000, b"plain")))
    relay.check_relayed(to_relay(c, LISTEN, channel_data(0x4001, b"loop")))
    relay.check_relayed(to_relay(P6, port_c, b"back"))
    relay.check_passed(to_relay(c, LISTEN, channel_data(0x4003, b"to v4")), "no_source_addr")


def test_unconfigured_router_passes_everything(relay: Relay, router: object) -> None:
    relay.allocate(C4)
    relay.bind(C4, 0x4000, P4)
    router.disable()  # type: ignore[attr-defined]
    relay.check_passed(to_relay(C4, LISTEN, channel_data(0x4000, b"d")), "disabled")


def test_never_grows_beyond_mtu(relay: Relay, make_netns: Callable[[str], Netns]) -> None:
    """BPF_PROG_TEST_RUN runs on the loopback device of the caller's namespace: give it a
    1280-byte MTU and relay frames that would, or would not, outgrow it."""
    ns = make_netns("mtu")
    ns.ip("link", "set", "lo", "mtu", "1280")
    port4 = relay.allocate(C4)
    relay.bind(C4, 0x4000, P4)
    relay.bind(C4, 0x4001, P6)
    with ns.entered():
        # peer -> client grows by 4: a 1280-byte IPv4 datagram cannot take the header
        relay.check_passed(to_relay(P4, port4, b"m" * (1280 - 28)), "mtu")
        relay.check_relayed(to_relay(P4, port4, b"m" * (1280 - 32)))
        # IPv4 client -> IPv6 peer grows by 16
        relay.check_passed(to_relay(C4, LISTEN, channel_data(0x4001, b"m" * (1280 - 32))), "mtu")
        relay.check_relayed(to_relay(C4, LISTEN, channel_data(0x4001, b"m" * (1280 - 48))))
        # shrinking is never refused
        relay.check_relayed(to_relay(C4, LISTEN, channel_data(0x4000, b"m" * (1280 - 32))))


def test_counters(relay: Relay) -> None:
    port = relay.allocate(C4)
    port_b = relay.allocate(C4B)
    relay.bind(C4, 0x4000, P4)
    relay.bind(C4, 0x4001, (PUBLIC4, port_b))
    relay.bind(C4B, 0x4002, (PUBLIC4, port))
    sizes = [10, 150, 1499, 1500, 3000]
    for n in sizes:
        relay.check_relayed(to_relay(C4, LISTEN, channel_data(0x4000, b"c" * n)))
    for n in sizes[:2]:
        relay.check_relayed(to_relay(P4, port, b"p" * n))
    relay.check_relayed(to_relay(C4, LISTEN, channel_data(0x4001, b"l" * 250)))
    relay.check_passed(to_relay(C4, LISTEN, channel_data(0x4ABC, b"x")), "no_entry")
    c = relay.router.counters()  # type: ignore[attr-defined]
    assert c.packets == {"channel_to_udp": 5, "udp_to_channel": 2, "channel_to_channel": 1}
    assert c.payload_bytes == {
        "channel_to_udp": sum(sizes),
        "udp_to_channel": 160,
        "channel_to_channel": 250,
    }
    assert c.relayed_packets == 8 and c.relayed_bytes == sum(sizes) + 410
    expected_buckets = [0] * 16
    for n in [*sizes, *sizes[:2], 250]:
        expected_buckets[min(n // 100, 15)] += 1
    assert list(c.packet_size_buckets) == expected_buckets
    assert c.processing_count == 8 and sum(c.processing_ns_buckets) == 8
    assert c.processing_ns_total > 0
    assert c.passed["no_entry"] == 1 and sum(c.passed.values()) == 1
