"""Firezone's lab topology: client and gateway each behind a masquerading router, two relays
on an "internet" of 203.0.113.0/24, and a relay-to-relay path.

The client allocates on relay A, the gateway on relay B, and each binds a channel to the
other's relayed address, so every packet of a 10 MB download crosses both relays (client ->
A -> B -> gateway and back). The relays run as an operator of that lab would run them: the
internet is a documentation range, which the relay refuses as a peer unless told otherwise,
so they get ``--allowed-peer-ip 203.0.113.0/24``. Each case runs in userspace and with XDP
offload on both relays. The same lab on a private internet (relays sharing a VPC with the
gateways, ``--allow-private-peers``) and the refusal without the allow-list run too.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from simulations.netns.signalling import Hub
from simulations.netns.topology import LAB_INTERNET, LabTopology, TopologyOptions
from tests.integration.nat_fixtures import (
    BLOB_SIZE,
    CLIENT_TUN,
    GATEWAY_TUN,
    MODES,
    NatRun,
    RelayProcess,
    datapath,
    require_nat_tools,
    shared_blob,
)

pytestmark = pytest.mark.integration

PRIVATE_INTERNET = "10.113.0"


@dataclass
class _RelayHost:
    """The view of one relay's namespace that :class:`RelayProcess` reads."""

    lab: LabTopology
    rly: str
    relay4: str
    relay6: str = ""
    relay_dev: str = "p0"
    options: TopologyOptions = field(default_factory=TopologyOptions)

    def popen(self, ns: str, args: Sequence[str], **kwargs: Any) -> Any:
        return self.lab.popen(ns, args, **kwargs)

    def entered(self, ns: str) -> contextlib.AbstractContextManager[None]:
        return self.lab.entered(ns)


class LabRelay(RelayProcess):
    """The relay daemon on the lab's internet, IPv4 only, with the operator's extra flags."""

    def __init__(self, host: _RelayHost, log_dir: Path, extra: Sequence[str], **kw: Any) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        super().__init__(host, log_dir, dual=False, **kw)  # type: ignore[arg-type]
        self.extra = list(extra)

    def args(self) -> list[str]:
        return [*super().args(), *self.extra]


@dataclass
class LabRun(NatRun):
    """:class:`NatRun` on :class:`LabTopology`: relay A for the client, relay B for the
    gateway, both allocating (so the channels point at each other's relayed addresses)."""

    internet: str = LAB_INTERNET
    relay_args: tuple[str, ...] = ()
    wait: bool = True
    relay_b: LabRelay = field(init=False)
    _agent_relay: str = field(init=False, default="")

    def _up(self) -> None:
        self.tmp.mkdir(parents=True, exist_ok=True)
        lab = self._stack.enter_context(LabTopology(self.options, internet=self.internet))
        self.topo = lab
        hub_dir = tempfile.mkdtemp(prefix="fzlab")  # short: Unix socket paths are limited
        self._stack.callback(shutil.rmtree, hub_dir, True)
        self.hub = self._stack.enter_context(
            Hub(os.path.join(hub_dir, "hub.sock"), pairs=[("client", "gateway")])
        )
        self.secret = os.urandom(32).hex()
        relays = []
        for name, ns, addr in (("a", lab.relay_a, lab.relay_a4), ("b", lab.relay_b, lab.relay_b4)):
            relay = LabRelay(
                _RelayHost(lab, ns, addr),
                self.tmp / f"relay-{name}",
                # two relays on one host: each its own admin socket (the default is per port)
                (*self.relay_args, "--admin-socket", os.path.join(hub_dir, f"admin-{name}.sock")),
                secret=self.secret,
                xdp=self.xdp,
            )
            self._stack.callback(relay.stop)
            relay.start()
            relays.append(relay)
        self.relay, self.relay_b = relays
        if self.xdp:
            for relay in relays:
                relay.wait_offload()
        self._start_web()
        self._agent_relay = lab.relay_a4
        self._start_agent("client", lab.cli, CLIENT_TUN, allocate=True)
        self._agent_relay = lab.relay_b4
        self._start_agent("gateway", lab.gw, GATEWAY_TUN, allocate=True)
        if self.wait:
            self.wait_tunnel()

    def _server(self, name: str = "gateway") -> str:
        return f"{self._agent_relay}:3478"  # both agents on UDP in the lab

    @property
    def relays(self) -> list[RelayProcess]:
        return [self.relay, self.relay_b]


@pytest.fixture
def blob(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    require_nat_tools()
    return shared_blob(tmp_path_factory)


@contextlib.contextmanager
def lab_run(tmp: Path, blob: tuple[Path, str], **kwargs: Any) -> Iterator[LabRun]:
    """A :class:`LabRun`; afterwards both relays must stop cleanly with clean logs."""
    run = LabRun(tmp, blob, **kwargs)
    with run:
        yield run
        run.assert_agents_content()
        for relay in run.relays:
            code = relay.stop()
            assert code == 0, f"a relay exited with {code} on SIGTERM"
    for relay in run.relays:
        problems = relay.problems()
        assert not problems, "relay logged problems:\n" + "\n".join(problems)


def _relay_to_relay(run: LabRun) -> None:
    """10 MB through client -> A -> B -> gateway; each relay carried the transfer, in the
    data path the run asked for; the NATs masqueraded."""
    lab = run.topo
    assert isinstance(lab, LabTopology)
    run.transfer(max_time=60)
    client, gateway = run.stats("client"), run.stats("gateway")
    assert client["target"] == gateway["relayed"]["4"]
    assert gateway["target"] == client["relayed"]["4"]
    assert client["target"][0] == lab.relay_b4 and gateway["target"][0] == lab.relay_a4
    # the relays saw the agents through the masquerade (XOR-MAPPED-ADDRESS)
    assert run.hub.wait_event("client", "srflx", 1)["addr"][0] == lab.client_public4
    assert run.hub.wait_event("gateway", "srflx", 1)["addr"][0] == lab.gateway_public4
    for relay in run.relays:
        packets = relay.relayed_packets()
        xdp, user = packets.get("xdp", 0.0), packets.get("userspace", 0.0)
        print(f"{relay.topo.rly}: relayed packets: xdp {xdp:.0f}, userspace {user:.0f}")
        if run.xdp:
            assert xdp > 4 * user, f"XDP did not carry the transfer: {packets}"
        else:
            assert xdp == 0 and user > BLOB_SIZE / 1500, packets


@pytest.mark.parametrize("mode", MODES)
def test_relay_to_relay_on_the_labs_internet(
    mode: str, tmp_path: Path, blob: tuple[Path, str]
) -> None:
    """Firezone's lab as its operator configures the relays: 203.0.113.0/24 allowed."""
    with lab_run(
        tmp_path,
        blob,
        xdp=datapath(mode),
        relay_args=("--allowed-peer-ip", f"{LAB_INTERNET}.0/24"),
    ) as run:
        _relay_to_relay(run)


@pytest.mark.parametrize("mode", MODES)
def test_relay_to_relay_on_a_private_internet(
    mode: str, tmp_path: Path, blob: tuple[Path, str]
) -> None:
    """The same lab where the internet is private (relays in the gateways' VPC)."""
    with lab_run(
        tmp_path,
        blob,
        xdp=datapath(mode),
        internet=PRIVATE_INTERNET,
        relay_args=("--allow-private-peers",),
    ) as run:
        _relay_to_relay(run)


def test_without_the_allow_list_the_labs_peers_are_refused(
    tmp_path: Path, blob: tuple[Path, str]
) -> None:
    """A documentation range is not a peer by default: both ChannelBinds get 403, so an
    operator of this lab must allow its internet."""
    with LabRun(tmp_path, blob, wait=False) as run:
        for name in ("client", "gateway"):
            run.hub.wait_event(name, "error_response", 30, method="channelbind", code=403)
        assert run.hub.count("client", "channel_bound") == 0
