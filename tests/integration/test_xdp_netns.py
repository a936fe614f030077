"""The XDP router on a real veth, fed by the map manager, with traffic across a NAT.

Topology (simulations/netns/topology.py): client and gateway namespaces behind a NAT router,
the relay namespace on the router's public segment with the program attached to ``p0``.
Userspace sockets in the relay namespace stand in for the relay's listen and allocation
sockets: they learn the clients' public addresses from the slow path, and must see none of
the packets the fast path relays. (Full-daemon tests live with the integration suite.)
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from firezone_relay.actors.xdp_manager import XdpManager, XdpOptions, start_offload
from firezone_relay.protocol.commands import CreateChannelBinding, DeleteChannelBinding
from firezone_relay.protocol.types import Addr, udp
from simulations.frames import channel_data
from simulations.netns.relay import attach_xdp_pass
from simulations.netns.topology import Topology
from tests.integration.conftest import require_bcc

pytestmark = pytest.mark.integration

LISTEN = 3478
PAYLOADS = [b"x", b"hello from the client", bytes(range(256)) * 5]
QUIET = 0.3  # seconds a socket must stay silent to count as "saw nothing"


def silent(*socks: socket.socket) -> bool:
    """True if none of ``socks`` receives anything within QUIET seconds."""
    for s in socks:
        s.settimeout(QUIET)
        try:
            data, src = s.recvfrom(65535)
        except TimeoutError:
            continue
        finally:
            s.settimeout(2.0)
        pytest.fail(f"{s.getsockname()} received {data[:40]!r} from {src}")
    return True


class Relay:
    """The relay side: slow-path sockets in the relay namespace and the map manager."""

    def __init__(self, t: Topology, ref: object) -> None:
        self.t = t
        self.ref = ref
        self.socks: dict[tuple[int, int], socket.socket] = {}

    def sock(self, family: int, port: int) -> socket.socket:
        key = (family, port)
        if key not in self.socks:
            host = "::" if family == socket.AF_INET6 else "0.0.0.0"
            self.socks[key] = self.t.rly.udp(host, port)
        return self.socks[key]

    def learn(self, sender: socket.socket, relay_host: str, port: int) -> Addr:
        """Send from ``sender`` to the relay; return the public address the relay sees."""
        family = socket.AF_INET6 if ":" in relay_host else socket.AF_INET
        s = self.sock(family, port)
        sender.sendto(b"slow path", (relay_host, port))
        data, src = s.recvfrom(2048)
        assert data == b"slow path"
        return (src[0], src[1])

    def apply(self, *commands: object) -> None:
        self.ref.proxy().apply(commands).get(timeout=10)  # type: ignore[attr-defined]

    def counters(self) -> object:
        return self.ref.proxy().counters().get(timeout=10)  # type: ignore[attr-defined]

    def all_silent(self) -> bool:
        return silent(*self.socks.values())

    def close(self) -> None:
        for s in self.socks.values():
            s.close()


@pytest.fixture(params=["generic", "driver"])
def relay(request: pytest.FixtureRequest, topology: Topology) -> Iterator[Relay]:
    """The map manager with the program attached to the relay veth, in generic (skb) mode and
    in native (driver) mode; native XDP_TX on a veth needs a program on its peer too."""
    require_bcc()
    t = topology
    mode = request.param
    keep = attach_xdp_pass(t.rtr, "r-pub") if mode == "driver" else None
    options = XdpOptions(
        interface=t.relay_dev,
        attach_mode=mode,
        public_ip4=t.relay4,
        public_ip6=t.relay6,
        listen_port=LISTEN,
        mandatory=True,
        netns=t.rly.name,
    )
    ref = start_offload(options)
    assert ref is not None
    r = Relay(t, ref)
    try:
        yield r
    finally:
        r.close()
        ref.stop(block=True, timeout=10)
        if keep is not None:
            keep.cleanup()


def recv(s: socket.socket) -> tuple[bytes, Addr]:
    data, src = s.recvfrom(65535)
    return data, (src[0], src[1])


def exchange(
    client: socket.socket, peer: socket.socket, relay_client: Addr, relay_peer: Addr, channel: int
) -> None:
    """ChannelData client -> UDP at peer, and UDP peer -> ChannelData at client."""
    for p in PAYLOADS:
        client.sendto(channel_data(channel, p), relay_client)
        assert recv(peer) == (p, relay_peer)
        peer.sendto(p[::-1], relay_peer)
        assert recv(client) == (channel_data(channel, p[::-1]), relay_client)
    # padded ChannelData arrives without its padding
    client.sendto(channel_data(channel, b"pad", b"\0"), relay_client)
    assert recv(peer) == (b"pad", relay_peer)


def test_ipv4_both_ways_and_unbinding(relay: Relay) -> None:
    t = relay.t
    cli = t.cli.udp("0.0.0.0", 40000)
    gw = t.gw.udp("0.0.0.0", 50000)
    cli_pub = relay.learn(cli, t.relay4, LISTEN)
    gw_pub = relay.learn(gw, t.relay4, 49152)  # also opens gw's NAT mapping
    assert cli_pub[0] == t.client_public4 and gw_pub[0] == t.gateway_public4
    binding = (udp(cli_pub, (t.relay4, LISTEN)), 0x4000, gw_pub, 49152)
    relay.apply(CreateChannelBinding(*binding))
    exchange(cli, gw, (t.relay4, LISTEN), (t.relay4, 49152), 0x4000)
    assert relay.all_silent()
    c = relay.counters()
    n = len(PAYLOADS)
    assert c.packets["channel_to_udp"] == n + 1 and c.packets["udp_to_channel"] == n  # type: ignore[attr-defined]

    relay.apply(DeleteChannelBinding(*binding))
    cli.sendto(channel_data(0x4000, b"slow again"), (t.relay4, LISTEN))
    data, src = recv(relay.sock(socket.AF_INET, LISTEN))
    assert data == channel_data(0x4000, b"slow again") and src == cli_pub
    gw.sendto(b"peer slow again", (t.relay4, 49152))
    assert recv(relay.sock(socket.AF_INET, 49152)) == (b"peer slow again", gw_pub)
    assert silent(gw, cli)


def test_ipv6_both_ways(relay: Relay) -> None:
    t = relay.t
    cli = t.cli.udp("::", 40000)
    gw = t.gw.udp("::", 50000)
    cli_pub = relay.learn(cli, t.relay6, LISTEN)
    gw_pub = relay.learn(gw, t.relay6, 49152)
    assert cli_pub == (t.client_public6, 40000) and gw_pub == (t.gateway_public6, 50000)
    relay.apply(CreateChannelBinding(udp(cli_pub, ("::", LISTEN)), 0x4123, gw_pub, 49152))
    exchange(cli, gw, (t.relay6, LISTEN), (t.relay6, 49152), 0x4123)
    assert relay.all_silent()


@pytest.mark.parametrize("client_v6", [False, True], ids=["v4-client-v6-peer", "v6-client-v4-peer"])
def test_across_families(relay: Relay, client_v6: bool) -> None:
    t = relay.t
    if client_v6:
        cli, relay_c = t.cli.udp("::", 40000), t.relay6
        gw, relay_p = t.gw.udp("0.0.0.0", 50000), t.relay4
    else:
        cli, relay_c = t.cli.udp("0.0.0.0", 40000), t.relay4
        gw, relay_p = t.gw.udp("::", 50000), t.relay6
    cli_pub = relay.learn(cli, relay_c, LISTEN)
    gw_pub = relay.learn(gw, relay_p, 49152)
    relay.apply(CreateChannelBinding(udp(cli_pub, ("0.0.0.0", LISTEN)), 0x4001, gw_pub, 49152))
    exchange(cli, gw, (relay_c, LISTEN), (relay_p, 49152), 0x4001)
    assert relay.all_silent()


@pytest.mark.parametrize(
    ("a_v6", "b_v6", "via_v6"),
    [(False, False, False), (True, True, True), (False, True, True), (True, False, False)],
    ids=["v4-v4", "v6-v6", "v4-v6", "v6-v4"],
)
def test_relay_loop(relay: Relay, a_v6: bool, b_v6: bool, via_v6: bool) -> None:
    """Client and gateway both hold allocations here and talk through them."""
    t = relay.t
    a = t.cli.udp("::" if a_v6 else "0.0.0.0", 40000)
    b = t.gw.udp("::" if b_v6 else "0.0.0.0", 50000)
    relay_a = t.relay6 if a_v6 else t.relay4
    relay_b = t.relay6 if b_v6 else t.relay4
    via = t.relay6 if via_v6 else t.relay4
    a_pub = relay.learn(a, relay_a, LISTEN)
    b_pub = relay.learn(b, relay_b, LISTEN)
    port_a, port_b = 49152, 49153
    relay.apply(
        CreateChannelBinding(udp(a_pub, ("0.0.0.0", LISTEN)), 0x4001, (via, port_b), port_a),
        CreateChannelBinding(udp(b_pub, ("0.0.0.0", LISTEN)), 0x4FFE, (via, port_a), port_b),
    )
    for p in PAYLOADS:
        a.sendto(channel_data(0x4001, p), (relay_a, LISTEN))
        assert recv(b) == (channel_data(0x4FFE, p), (relay_b, LISTEN))
        b.sendto(channel_data(0x4FFE, p[::-1]), (relay_b, LISTEN))
        assert recv(a) == (channel_data(0x4001, p[::-1]), (relay_a, LISTEN))
    for port in (port_a, port_b):
        relay.sock(socket.AF_INET6 if via_v6 else socket.AF_INET, port)
    assert relay.all_silent()
    c = relay.counters()
    assert c.packets["channel_to_channel"] == 2 * len(PAYLOADS)  # type: ignore[attr-defined]


@pytest.mark.parametrize("relay", ["generic"], indirect=True)  # the mode does not matter here
def test_manager_is_a_pykka_actor(relay: Relay) -> None:
    assert isinstance(relay.ref.proxy().status().get(timeout=5).active, bool)  # type: ignore[attr-defined]
    assert relay.ref.actor_class is XdpManager  # type: ignore[attr-defined]
