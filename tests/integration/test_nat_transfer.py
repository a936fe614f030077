"""10 MB over TURN between a client and a gateway behind masquerading NATs.

Each test runs the real relay daemon in its namespace, two TURN agents with TUN tunnels, and
curl fetching a blob from a small HTTP server (``gated_web``) on the gateway side, through the
tunnel, so through the relay; the kernel's TCP handles loss. Userspace relaying and XDP offload
(generic mode on the relay's veth) each run every scenario; the plain download also runs with
XDP in native (driver) mode. Afterwards the relay's log must hold no warning and no error
(Firezone's integration tests check the same).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from firezone_relay.protocol.ports import PortShares
from simulations.netns.topology import RELAY_PORTS, Loss, TopologyOptions
from tests.integration.nat_fixtures import (
    MODES,
    MODES_WITH_DRIVER,
    attach_mode,
    datapath,
    nat_run,
    require_nat_tools,
    shared_blob,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def blob(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    require_nat_tools()
    return shared_blob(tmp_path_factory)


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("mode", MODES_WITH_DRIVER)
def test_relayed_download(mode: str, family: int, tmp_path: Path, blob: tuple[Path, str]) -> None:
    """Client relayed, gateway reached at its NAT's public address (client -> relay ->
    gateway), over IPv4 or IPv6 end to end."""
    with nat_run(
        tmp_path,
        blob,
        xdp=datapath(mode),
        xdp_mode=attach_mode(mode),
        gateway_allocates=False,
        relay_family=family,
        peer_family=family,
        inner_family=family,
    ) as run:
        run.transfer(max_time=60)
        client = run.stats("client")
        (channel,) = client["channels"].values()
        assert channel[1] is True
        public = "fd00:99::2" if family == 6 else run.topo.gateway_public4
        assert channel[0][0] == public  # the peer is the gateway's NAT, not the relay


@pytest.mark.parametrize("mode", MODES)
def test_relayed_download_with_two_workers(
    mode: str, tmp_path: Path, blob: tuple[Path, str]
) -> None:
    """The download through a relay of two workers (``--num-worker-threads 2``) joined to the
    portal, in userspace and with XDP (one program for the host, fed by the worker that holds
    the channel, over its channel to the supervisor)."""
    with nat_run(
        tmp_path, blob, xdp=datapath(mode), gateway_allocates=False, portal=True, workers=2
    ) as run:
        run.transfer(max_time=60)
        (channel,) = run.stats("client")["channels"].values()
        assert channel[1] is True  # (nat_run checks that XDP carried it, in XDP mode)


@pytest.mark.parametrize("mode", MODES)
def test_ipv4_only_relay(mode: str, tmp_path: Path, blob: tuple[Path, str]) -> None:
    """A single-stack relay (no public IPv6 address) relays both ways, with XDP in the
    kernel: Firezone's XDP program looks up both public addresses for every client->peer
    ChannelData (``is_own_public_ip``) and drops the packet when one is unset (IpAddrUnset is
    XDP_DROP), so there the client's half of the transfer would never leave. Here the
    download completes and ``assert_datapath`` (at the end of ``nat_run``) holds the kernel
    to carrying at least four fifths of the packets, the client's ACKs included."""
    with nat_run(
        tmp_path,
        blob,
        xdp=datapath(mode),
        relay_dual=False,
        gateway_allocates=False,
    ) as run:
        assert "--public-ip6-addr" not in run.relay.args()
        run.transfer(max_time=60)


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("mode", MODES)
def test_double_symmetric_nat_through_the_relay_loop(
    mode: str, family: int, tmp_path: Path, blob: tuple[Path, str]
) -> None:
    """Both sides behind symmetric NATs with a single relay: their server-reflexive addresses
    are useless, so both allocate and each binds a channel to the other's relayed address.
    The relay relays to itself. The agents reach the relay over IPv4; with ``family`` 6 the
    channels point at the IPv6 relayed addresses (ADDITIONAL-ADDRESS-FAMILY), so the loop
    runs over IPv6, and so does the tunnelled TCP."""
    options = TopologyOptions(client_nat="symmetric", gateway_nat="symmetric")
    with nat_run(
        tmp_path,
        blob,
        options=options,
        xdp=datapath(mode),
        relay_family=4,
        peer_family=family,
        inner_family=family,
    ) as run:
        run.transfer(max_time=60)
        client, gateway = run.stats("client"), run.stats("gateway")
        key = str(family)
        assert client["target"] == gateway["relayed"][key]
        assert gateway["target"] == client["relayed"][key]
        relay = run.topo.relay6 if family == 6 else run.topo.relay4
        assert client["target"][0] == gateway["target"][0] == relay


@pytest.mark.parametrize("mode", MODES)
def test_relay_loop_with_two_workers(mode: str, tmp_path: Path, blob: tuple[Path, str]) -> None:
    """The double symmetric NAT through a relay of two workers: both agents allocate and
    relay to each other's relayed address, in userspace and with XDP, whether their
    allocations share a worker or not (printed)."""
    options = TopologyOptions(client_nat="symmetric", gateway_nat="symmetric")
    with nat_run(tmp_path, blob, options=options, xdp=datapath(mode), workers=2) as run:
        run.transfer(max_time=60)
        client, gateway = run.stats("client"), run.stats("gateway")
        assert client["target"] == gateway["relayed"]["4"]
        assert gateway["target"] == client["relayed"]["4"]
        shares = PortShares(*RELAY_PORTS, 2)  # the relay's default range
        owners = [shares.owner(side["relayed"]["4"][1]) for side in (client, gateway)]
        print(f"the agents' allocations are on workers {owners}")


@pytest.mark.parametrize("mode", MODES)
def test_download_with_20_percent_loss(mode: str, tmp_path: Path, blob: tuple[Path, str]) -> None:
    """20 % of the client's packets are dropped in the router, both ways (Firezone's
    ``download-packet-loss`` drops 20 % of the client's egress with netem): TURN requests and
    responses are lost and retransmitted, and TCP recovers the data."""
    options = TopologyOptions(loss=(Loss("client", 20, "both"),))
    with nat_run(
        tmp_path, blob, options=options, xdp=datapath(mode), gateway_allocates=False
    ) as run:
        run.transfer(max_time=90)


@pytest.mark.parametrize("transport", ["tcp", "tls"])
@pytest.mark.parametrize("mode", MODES)
def test_download_with_the_client_on_tcp_or_tls(
    mode: str, transport: str, tmp_path: Path, blob: tuple[Path, str]
) -> None:
    """The client reaches the relay over TCP (or TLS on 5349), as a browser behind a UDP-
    blocking firewall does; the gateway stays on UDP (reached at its NAT's public address).
    With XDP on, the client's channel stays in userspace: the program never sends UDP to a
    stream client."""
    with nat_run(
        tmp_path, blob, xdp=datapath(mode), client_transport=transport, gateway_allocates=False
    ) as run:
        run.transfer(max_time=60)
        client = run.stats("client")
        (channel,) = client["channels"].values()
        assert channel[1] is True
        assert run.relay.metric("relay_stream_connections") == 1
