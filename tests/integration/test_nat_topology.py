"""The NAT test network itself: its NATs behave as advertised, and it never leaks.

These run without a relay: plain UDP sockets in the namespaces (cheap, about 0.3 s each).
"""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from simulations.netns.topology import Loss, Topology, TopologyOptions, list_netns
from tests.integration.nat_fixtures import require_nat_tools

pytestmark = pytest.mark.integration
PID = os.getpid()


@pytest.fixture(autouse=True)
def _tools() -> None:
    require_nat_tools()


def _udp(topo: Topology, ns: str, host: str, port: int = 0) -> socket.socket:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with topo.entered(ns):
        s = socket.socket(fam, socket.SOCK_DGRAM)
    if fam == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((host, port))
    s.settimeout(2.0)
    return s


def _observed_ports(topo: Topology, side_ns: str, family: int) -> tuple[str, list[int]]:
    """Send from one socket behind the NAT to two ports on the public segment; return the
    public address and the two source ports the receivers saw."""
    relay = topo.relay6 if family == 6 else topo.relay4
    any_addr = "::" if family == 6 else "0.0.0.0"
    rx = [_udp(topo, topo.rly, relay, port) for port in (40001, 40002)]
    tx = _udp(topo, side_ns, any_addr, 45000)
    seen: list[int] = []
    public = ""
    try:
        for r in rx:
            tx.sendto(b"probe", (relay, r.getsockname()[1]))
            data, sender = r.recvfrom(100)
            assert data == b"probe"
            public = sender[0]
            seen.append(sender[1])
    finally:
        for s in (*rx, tx):
            s.close()
    return public, seen


@pytest.mark.parametrize("family", [4, 6])
def test_cone_nat_keeps_one_mapping_per_socket(family: int) -> None:
    with Topology() as topo:
        public, ports = _observed_ports(topo, topo.cli, family)
        assert public == ("fd00:99::1" if family == 6 else topo.client_public4)
        assert ports[0] == ports[1]
        public, ports = _observed_ports(topo, topo.gw, family)
        assert public == ("fd00:99::2" if family == 6 else topo.gateway_public4)
        assert ports[0] == ports[1]


@pytest.mark.parametrize("family", [4, 6])
def test_symmetric_nat_maps_each_destination_to_a_new_port(family: int) -> None:
    options = TopologyOptions(client_nat="symmetric", gateway_nat="symmetric")
    with Topology(options) as topo:
        for ns in (topo.cli, topo.gw):
            _, ports = _observed_ports(topo, ns, family)
            assert ports[0] != ports[1]


def test_client_and_gateway_cannot_reach_each_other_directly() -> None:
    with Topology() as topo:
        rx = _udp(topo, topo.gw, topo.gateway4, 50000)
        tx = _udp(topo, topo.cli, "0.0.0.0")
        rx.settimeout(0.3)
        try:
            tx.sendto(b"direct", (topo.gateway4, 50000))
            with pytest.raises(TimeoutError):
                rx.recvfrom(100)
        finally:
            rx.close()
            tx.close()


def _delivered(topo: Topology, count: int = 400) -> int:
    rx = _udp(topo, topo.rly, topo.relay4, 40001)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)  # hold all of them
    tx = _udp(topo, topo.cli, "0.0.0.0")
    rx.settimeout(0.3)
    got = 0
    try:
        for _ in range(count):
            tx.sendto(b"x", (topo.relay4, 40001))
        while True:
            try:
                rx.recvfrom(10)
            except TimeoutError:
                return got
            got += 1
    finally:
        rx.close()
        tx.close()


def test_loss_drops_about_the_configured_share_and_can_change_at_run_time() -> None:
    with Topology(TopologyOptions(loss=(Loss("client", 50, "up"),))) as topo:
        assert 120 < _delivered(topo) < 280  # 400 * 50 %, bounds far outside random spread
        topo.set_options(TopologyOptions())
        assert _delivered(topo) == 400
        topo.set_options(TopologyOptions(loss=(Loss("client", 100, "down"),)))
        assert _delivered(topo) == 400  # only the way back to the client loses


def test_teardown_removes_everything_even_after_a_failure() -> None:
    topo = Topology(prefix=f"fzn{PID}leak")
    with pytest.raises(RuntimeError), topo:
        proc = topo.popen(topo.cli, ["sleep", "30"])
        raise RuntimeError("the test failed")
    assert proc.wait(5) is not None
    assert not [n for n in list_netns() if n.startswith(f"fzn{PID}leak-")]


def test_a_half_built_topology_is_purged() -> None:
    class Broken(Topology):
        def ruleset(self) -> str:
            return "table inet broken {\n  chain x { this is not nft }\n}\n"

    with pytest.raises(RuntimeError, match="nft"):
        Broken(prefix=f"fzn{PID}broken").build()
    assert not [n for n in list_netns() if n.startswith(f"fzn{PID}broken-")]


def test_leftovers_of_an_earlier_run_are_purged_first() -> None:
    prefix = f"fzn{PID}stale"
    dead = "fzn4999999dead"  # no such pid (pid_max is at most 2**22)
    for name in (f"{prefix}-cli", f"{prefix}-extra", f"{dead}-rly"):
        subprocess.run(["ip", "netns", "add", name], check=True)
    with Topology(prefix=prefix) as topo:
        names = list_netns()
        assert f"{prefix}-extra" not in names
        assert f"{dead}-rly" not in names
        assert topo.cli in names
    assert not [n for n in list_netns() if n.startswith(f"{prefix}-")]
