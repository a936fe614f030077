"""The relay behind a 1:1 NAT, as deployed in clouds (and in Firezone's docker test topology):
the relay holds only a private address, the router owns its public address and DNATs UDP 3478
and the allocation range to it, and does not hairpin.

With both agents behind symmetric NATs and a single relay, the only path between them is the
relay loop: each binds a channel to the other's relayed address, which is the relay's public
address, not local to the relay. The relay must hand each datagram from one allocation to the
other inside (userspace or XDP); sending it out to its own public address would be dropped by
the router (and is counted there, so the tests can tell).
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from simulations.netns.topology import (
    CLIENT_PUBLIC4,
    GATEWAY_PUBLIC4,
    RELAY_PRIVATE4,
    Topology,
    TopologyOptions,
)
from tests.integration.nat_fixtures import (
    MODES,
    datapath,
    nat_run,
    require_nat_tools,
    shared_blob,
)

pytestmark = pytest.mark.integration

BEHIND_NAT = TopologyOptions(relay_behind_nat=True)
#: a narrow allocation range: the relay is started with it and the router forwards only it
NARROW = (50000, 50999)
DOUBLE_SYMMETRIC = TopologyOptions(
    client_nat="symmetric", gateway_nat="symmetric", relay_behind_nat=True
)


@pytest.fixture
def blob(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    require_nat_tools()
    return shared_blob(tmp_path_factory)


def _udp(topo: Topology, ns: str, host: str, port: int = 0) -> socket.socket:
    with topo.entered(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, port))
    s.settimeout(2.0)
    return s


def test_the_router_forwards_the_relays_public_ports_and_never_hairpins() -> None:
    """The NAT in front of the relay, without a relay (plain sockets, well under a second):
    3478 and the allocation range reach the relay's private address, answers leave from the
    public one, and what the relay sends to its own public address never comes back."""
    require_nat_tools()
    with Topology(BEHIND_NAT) as topo:
        assert topo.relay_local4 == RELAY_PRIVATE4
        assert RELAY_PRIVATE4 in topo.ip(topo.rly, "-4", "addr", "show", topo.relay_dev)
        assert topo.relay4 not in topo.ip(topo.rly, "-4", "addr", "show")
        listen = _udp(topo, topo.rly, "0.0.0.0", 3478)
        allocation = _udp(topo, topo.rly, "0.0.0.0", 50000)
        client = _udp(topo, topo.cli, "0.0.0.0")
        gateway = _udp(topo, topo.gw, "0.0.0.0")
        try:
            for sender, server, public in (
                (client, listen, CLIENT_PUBLIC4),
                (gateway, allocation, GATEWAY_PUBLIC4),
            ):
                port = server.getsockname()[1]
                sender.sendto(b"hello", (topo.relay4, port))
                data, seen = server.recvfrom(100)
                assert (data, seen[0]) == (b"hello", public)
                server.sendto(b"answer", seen)
                data, source = sender.recvfrom(100)
                assert (data, source) == (b"answer", (topo.relay4, port))

            assert topo.hairpin_drops() == 0
            allocation.sendto(b"loop", (topo.relay4, 3478))
            listen.settimeout(0.3)
            with pytest.raises(TimeoutError):
                listen.recvfrom(100)
            assert topo.hairpin_drops() == 1
        finally:
            for s in (listen, allocation, client, gateway):
                s.close()


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("mode", MODES)
def test_double_symmetric_nat_through_the_loop_of_a_relay_behind_nat(
    mode: str, family: int, tmp_path: Path, blob: tuple[Path, str]
) -> None:
    """10 MB between two agents behind symmetric NATs through one relay behind DNAT: both
    allocate and bind channels to each other's relayed address (the relay's public address).
    In userspace the relay handles each client datagram once and hands it to the other
    allocation's client; nothing is ever sent to its own public address. With ``family`` 6
    everything is IPv6: the agents reach the relay through the router's IPv6 DNAT, the
    channels point at the IPv6 relayed addresses, and the tunnelled TCP is IPv6."""
    with nat_run(
        tmp_path,
        blob,
        options=DOUBLE_SYMMETRIC,
        xdp=datapath(mode),
        relay_family=family,
        peer_family=family,
        inner_family=family,
    ) as run:
        run.transfer(max_time=60)
        client, gateway = run.stats("client"), run.stats("gateway")
        key = str(family)
        assert client["target"] == gateway["relayed"][key]
        assert gateway["target"] == client["relayed"][key]
        public = run.topo.relay6 if family == 6 else run.topo.relay4
        assert client["target"][0] == gateway["target"][0] == public
        assert run.topo.hairpin_drops() == 0
        if mode == "userspace":
            relayed = run.relay.relayed_packets().get("userspace", 0.0)
            delivered = client["tun_tx"] + gateway["tun_tx"]
            sent = client["udp_tx"] + gateway["udp_tx"]
            print(f"relayed {relayed:.0f}, agents delivered {delivered}, sent {sent}")
            # once per datagram: at least everything delivered, at most everything sent
            # (a trip out and back in through the network would count each one twice)
            assert delivered <= relayed <= sent


@pytest.mark.parametrize("mode", MODES)
def test_cone_nat_peer_reaches_an_allocation_of_a_relay_behind_nat(
    mode: str, tmp_path: Path, blob: tuple[Path, str]
) -> None:
    """Not the loop: the client allocates, the gateway (cone NAT, no allocation) sends plain
    UDP to the client's relayed address. That traffic enters through the router's DNAT of
    the allocation range (a narrow one here, given to the relay too), and the relay's answers
    from the allocation port leave through the same NAT from the public address."""
    options = TopologyOptions(relay_behind_nat=True, relay_ports=NARROW)
    with nat_run(
        tmp_path, blob, options=options, xdp=datapath(mode), gateway_allocates=False
    ) as run:
        run.transfer(max_time=60)
        client = run.stats("client")
        (channel,) = client["channels"].values()
        assert channel == [[GATEWAY_PUBLIC4, channel[0][1]], True]
        host, port = client["relayed"]["4"]
        assert host == run.topo.relay4 and NARROW[0] <= port <= NARROW[1]
        assert run.topo.hairpin_drops() == 0
