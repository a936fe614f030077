"""The XDP map manager's lifecycle: attach, detach (also when the process is killed), stale
programs, unavailability (warn and stay in userspace, or fail when mandatory), batches."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from firezone_relay.actors.xdp_manager import (
    XdpManager,
    XdpOffloadRequired,
    XdpOptions,
    start_offload,
)
from firezone_relay.protocol.commands import CreateChannelBinding, DeleteChannelBinding, SendMessage
from firezone_relay.protocol.types import FiveTuple, udp
from firezone_relay.xdp import bpfsys
from firezone_relay.xdp.loader import XdpUnavailable
from simulations.frames import channel_data, frame
from simulations.netns.topology import Netns
from tests.integration.conftest import require_bcc

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
RELAY = "10.9.0.1"

LISTEN_ADDR = ("0.0.0.0", 3478)


def _client(host: str) -> FiveTuple:
    return udp((host, 40000), LISTEN_ADDR)


@pytest.fixture
def solo(make_netns: Callable[[str], Netns]) -> Netns:
    """A namespace with one veth pair (p0 <-> p1), nothing else."""
    require_bcc()
    ns = make_netns("solo")
    # Quiet: IPv6 is not under test on the wire here, so no router solicitations, DAD or MLD
    # from p1 reach the program on p0 (p0 keeps its address: the manager reads it).
    ns.sysctl("net.ipv6.conf.default.accept_ra", 0)
    ns.sysctl("net.ipv6.conf.default.dad_transmits", 0)
    ns.ip("link", "add", "p0", "type", "veth", "peer", "name", "p1")
    ns.sysctl("net.ipv6.conf.p1.disable_ipv6", 1)
    ns.ip("addr", "add", f"{RELAY}/24", "dev", "p0")
    ns.ip("-6", "addr", "add", "fd00:9::1/64", "dev", "p0", "nodad")
    ns.ip("link", "set", "p0", "up")
    ns.ip("link", "set", "p1", "up")
    return ns


def opts(ns: Netns | None, **kw: object) -> XdpOptions:
    base: dict[str, object] = {
        "interface": "p0",
        "attach_mode": "generic",
        "public_ip4": RELAY,
        "netns": ns.name if ns else None,
    }
    base.update(kw)
    return XdpOptions(**base)  # type: ignore[arg-type]


def xdp_prog_id(ns: Netns, dev: str = "p0") -> int | None:
    """The id of the XDP program attached to ``dev``, from `ip -d link` (None: nothing)."""
    out = ns.ip("-d", "link", "show", "dev", dev)
    words = out.split()
    for i, w in enumerate(words):
        if w.startswith("prog/xdp") and words[i + 1] == "id":
            return int(words[i + 2])
    return None


@pytest.fixture
def manager(solo: Netns) -> Iterator[object]:
    # Time every packet: the sample counter is per CPU, so with 1 in 16 whether the test's
    # packet is the sampled one would depend on what that CPU saw before.
    ref = start_offload(opts(solo, mandatory=True, timing_sample=1))
    assert ref is not None
    try:
        yield ref
    finally:
        ref.stop(block=True, timeout=10)


def test_attaches_and_detaches_on_stop(solo: Netns) -> None:
    ref = start_offload(opts(solo, mandatory=True))
    assert ref is not None
    status = ref.proxy().status().get(timeout=5)
    assert status.active and status.interface == "p0" and status.attach_mode == "generic"
    assert status.interface_ip4 == RELAY and status.interface_ip6 == "fd00:9::1"  # read from p0
    assert xdp_prog_id(solo) == status.prog_id
    ref.stop(block=True, timeout=10)
    assert xdp_prog_id(solo) is None


CHILD = """
import sys, time
from firezone_relay.actors.xdp_manager import XdpOptions, start_offload
ref = start_offload(XdpOptions(interface="p0", attach_mode="generic", public_ip4="10.9.0.1",
                               mandatory=True, netns=sys.argv[1]))
print("attached", ref.proxy().status().get().prog_id, flush=True)
time.sleep(120)
"""


def test_detached_when_the_process_is_killed(solo: Netns) -> None:
    """No watchdog needed: the bpf_link dies with the last FD, i.e. with the process."""
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(CHILD), solo.name],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline().decode()
        assert line.startswith("attached"), line
        assert xdp_prog_id(solo) == int(line.split()[1])
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        deadline = time.monotonic() + 5
        while xdp_prog_id(solo) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert xdp_prog_id(solo) is None
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


@pytest.mark.parametrize("mode", ["generic", "driver"])
def test_replaces_a_stale_program(solo: Netns, mode: str, caplog: pytest.LogCaptureFixture) -> None:
    """A program left attached through netlink (e.g. by an older relay or `ip link`)."""
    from firezone_relay.xdp.loader import import_bcc

    bcc = import_bcc()
    stale = bcc.BPF(text=b"int stale(struct xdp_md *ctx) { return XDP_DROP; }")
    with solo.entered():
        stale.attach_xdp(b"p0", stale.load_func(b"stale", bcc.BPF.XDP), bcc.BPF.XDP_FLAGS_SKB_MODE)
    stale_id = xdp_prog_id(solo)
    assert stale_id is not None
    with caplog.at_level(logging.WARNING, logger="xdp.loader"):
        ref = start_offload(opts(solo, attach_mode=mode, mandatory=True))
    assert ref is not None
    try:
        new_id = ref.proxy().status().get(timeout=5).prog_id
        assert xdp_prog_id(solo) == new_id != stale_id
        assert any("stale XDP program" in r.getMessage() for r in caplog.records)
    finally:
        ref.stop(block=True, timeout=10)
        stale.cleanup()
    assert xdp_prog_id(solo) is None


def test_never_replaces_a_live_link(manager: object, solo: Netns) -> None:
    first = manager.proxy().status().get(timeout=5).prog_id  # type: ignore[attr-defined]
    assert start_offload(opts(solo)) is None
    with pytest.raises(XdpOffloadRequired, match="p0"):
        start_offload(opts(solo, mandatory=True))
    assert xdp_prog_id(solo) == first


def one_warning(caplog: pytest.LogCaptureFixture) -> str:
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    return warnings[0].getMessage()


def test_missing_interface(solo: Netns, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert start_offload(opts(solo, interface="nosuch0")) is None
    message = one_warning(caplog)
    assert "nosuch0" in message and "userspace" in message
    with pytest.raises(XdpOffloadRequired, match="nosuch0"):
        start_offload(opts(solo, interface="nosuch0", mandatory=True))


def test_missing_bcc(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Runs without root: the loader fails before touching the interface ("lo")."""

    def no_bcc() -> None:
        raise XdpUnavailable("bcc is not installed (Debian: apt-get install python3-bpfcc)")

    monkeypatch.setattr("firezone_relay.xdp.loader.import_bcc", no_bcc)
    with caplog.at_level(logging.WARNING):
        assert start_offload(opts(None, interface="lo")) is None
    assert "bcc is not installed" in one_warning(caplog)
    with pytest.raises(XdpOffloadRequired, match="bcc is not installed"):
        start_offload(opts(None, interface="lo", mandatory=True))


def test_kernel_refuses_the_program(
    solo: Netns, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    bad = tmp_path / "bad.c"
    bad.write_text(
        "int xdp_turn_router(struct xdp_md *ctx) {\n"
        "    unsigned char *p = (void *)(long)ctx->data;\n"
        "    return p[100];  /* no bounds check: the verifier says no */\n"
        "}\n"
    )
    monkeypatch.setattr("firezone_relay.xdp.loader.SOURCE", bad)
    with caplog.at_level(logging.WARNING, logger="relay.xdp"):
        assert start_offload(opts(solo)) is None
    assert "refused" in one_warning(caplog)
    assert xdp_prog_id(solo) is None


def test_batches_of_commands(manager: object) -> None:
    """Thousands of bindings in one told tuple, then deleted in one; other commands ignored."""
    n = 2000
    creates = tuple(
        CreateChannelBinding(
            udp((f"100.64.{i // 250}.{i % 250 + 1}", 40000), LISTEN_ADDR),
            0x4000 + i % 0x1000,
            ("8.8.4.4", 5000 + i),
            49152 + i,
        )
        for i in range(n)
    )
    manager.tell((*creates, SendMessage(b"x", udp(("1.2.3.4", 5), LISTEN_ADDR))))  # type: ignore[attr-defined]
    proxy = manager.proxy()  # type: ignore[attr-defined]
    assert proxy.status().get(timeout=10).bindings == n

    def verdict(c: CreateChannelBinding) -> int:
        raw = frame(c.client.remote, (RELAY, 3478), channel_data(c.channel, b"data"))
        return int(proxy.test_run(raw).get(timeout=5)[0])

    assert {verdict(c) for c in creates[::97]} == {bpfsys.XDP_TX}
    deletes = tuple(
        DeleteChannelBinding(c.client, c.channel, c.peer, c.allocation_port) for c in creates
    )
    manager.tell(deletes)  # type: ignore[attr-defined]
    assert proxy.status().get(timeout=10).bindings == 0
    assert {verdict(c) for c in creates[::97]} == {bpfsys.XDP_PASS}
    # a single command, and create + delete of the same binding within one batch
    c = creates[0]
    manager.tell(c)  # type: ignore[attr-defined]
    assert verdict(c) == bpfsys.XDP_TX
    assert proxy.apply((deletes[0], c, deletes[0])).get(timeout=5) == 2
    assert verdict(c) == bpfsys.XDP_PASS


def test_counters_are_plain_numbers(manager: object) -> None:
    proxy = manager.proxy()  # type: ignore[attr-defined]
    binding = CreateChannelBinding(_client("100.64.0.1"), 0x4000, ("8.8.4.4", 5000), 49152)
    proxy.apply((binding,)).get(timeout=5)
    raw = frame(binding.client.remote, (RELAY, 3478), channel_data(0x4000, b"y" * 120))
    assert proxy.test_run(raw).get(timeout=5)[0] == bpfsys.XDP_TX
    c = proxy.counters().get(timeout=5)
    assert c.packets["channel_to_udp"] == 1 and c.payload_bytes["channel_to_udp"] == 120
    assert c.packet_size_buckets[1] == 1 and c.processing_count == 1
    assert all(isinstance(v, int) for v in (*c.packets.values(), *c.passed.values()))
    reader = proxy.counter_reader().get(timeout=5)
    manager.stop(block=True, timeout=10)  # type: ignore[attr-defined]
    assert reader.read().relayed_packets == 1  # still readable after the manager stopped
    reader.close()


def test_per_allocation_counters(manager: object) -> None:
    """What the program relays is counted per allocation port and direction, in a mapped array
    read without the actor (and after it stopped); the relay loop counts both allocations, as
    userspace does. ``PortOwners`` gives each allocation its own share of a reused port."""
    from firezone_relay.actors.offload import PortOwners

    proxy = manager.proxy()  # type: ignore[attr-defined]
    a = CreateChannelBinding(_client("100.64.0.1"), 0x4000, ("8.8.4.4", 5000), 49152)
    # a relay loop: allocation 49153's client binds a channel to allocation 49154
    b = CreateChannelBinding(_client("100.64.0.2"), 0x4001, (RELAY, 49154), 49153)
    c = CreateChannelBinding(_client("100.64.0.3"), 0x4002, (RELAY, 49153), 49154)
    owners = PortOwners()
    owners.counters = proxy.port_counters().get(timeout=5)
    assert owners.counters is not None
    owners.note((a, b, c))
    proxy.apply((a, b, c)).get(timeout=5)
    runs = [
        (frame(a.client.remote, (RELAY, 3478), channel_data(0x4000, b"o" * 100)), 3),
        (frame(("8.8.4.4", 5000), (RELAY, 49152), b"i" * 30), 2),
        (frame(b.client.remote, (RELAY, 3478), channel_data(0x4001, b"l" * 7)), 1),
    ]
    for raw, times in runs:
        for _ in range(times):
            assert proxy.test_run(raw).get(timeout=5)[0] == bpfsys.XDP_TX
    assert owners.counts(49152, a.client) == (3, 300, 2, 60)
    assert owners.counts(49153, b.client) == (1, 7, 0, 0)
    assert owners.counts(49154, c.client) == (0, 0, 1, 7)
    assert owners.counts(49152, b.client) == (0, 0, 0, 0)  # not the port's client
    # port 49152 goes to another client: it starts from zero, the old one sees nothing more
    d = CreateChannelBinding(_client("100.64.0.4"), 0x4000, ("8.8.4.4", 5001), 49152)
    owners.note((d,))
    proxy.apply((d,)).get(timeout=5)
    assert owners.counts(49152, d.client) == (0, 0, 0, 0)
    assert owners.counts(49152, a.client) == (0, 0, 0, 0)
    raw = frame(d.client.remote, (RELAY, 3478), channel_data(0x4000, b"n" * 10))
    assert proxy.test_run(raw).get(timeout=5)[0] == bpfsys.XDP_TX
    assert owners.counts(49152, d.client) == (1, 10, 0, 0)
    manager.stop(block=True, timeout=10)  # type: ignore[attr-defined]
    assert owners.counters.read(49152) == (4, 310, 2, 60)  # still mapped
    owners.counters.close()
    assert owners.counters.read(49152) == (0, 0, 0, 0)


def test_options_from_the_command_line() -> None:
    from firezone_relay.actors.cli import build_parser, settings_from_args

    args = build_parser().parse_args(
        [
            "--public-ip4-addr=52.0.0.1",
            "--public-ip6-addr=2600::1",
            "--listen-port=3479",
            "--lowest-port=50000",
            "--highest-port=50100",
            "--ebpf-offloading=eth0",
            "--ebpf-attach-mode=generic",
            "--ebpf-int4-addr=10.0.0.5",
        ]
    )
    o = settings_from_args(args).xdp
    assert o is not None
    assert (o.interface, o.attach_mode, o.listen_port, o.lowest_port, o.highest_port) == (
        "eth0",
        "generic",
        3479,
        50000,
        50100,
    )
    assert (o.public_ip4, o.public_ip6, o.interface_ip4, o.interface_ip6) == (
        "52.0.0.1",
        "2600::1",
        "10.0.0.5",
        None,
    )
    assert not o.mandatory
    assert XdpManager.use_daemon_thread


# -- pure parts (no root needed) --------------------------------------------------------------


def test_binding_table_coalesces_a_batch() -> None:
    from firezone_relay.xdp.bindings import BindingTable
    from firezone_relay.xdp.maps import binding_entries

    t = BindingTable()
    a = CreateChannelBinding(_client("100.64.0.1"), 0x4000, ("8.8.4.4", 5000), 49152)
    b = CreateChannelBinding(_client("100.64.0.2"), 0x4001, ("2001:4860::1", 5000), 49153)
    del_a = DeleteChannelBinding(a.client, a.channel, a.peer, a.allocation_port)
    (ck_a, pk_a), _ = binding_entries(a.client.remote, a.channel, a.peer, a.allocation_port)
    changes = t.plan((a, b, SendMessage(b"", ("1.2.3.4", 1))))
    assert len(changes.update_c2p) == 2 and len(changes.update_p2c) == 2
    assert not changes.delete_c2p and not changes.delete_p2c
    assert not t.plan((a,)), "a refresh of an installed binding changes nothing"
    changes = t.plan((del_a, a, del_a))
    assert changes.delete_c2p == [ck_a] and changes.delete_p2c == [pk_a]
    assert not changes.update_c2p and len(t) == 1
    assert not t.plan((del_a,)), "deleting what is not installed changes nothing"
    # created and deleted within one batch: never reaches the kernel
    assert not t.plan((a, del_a))
    # a delete never removes an entry that a newer binding now owns
    t.plan((a,))
    newer = CreateChannelBinding(a.client, 0x4999, a.peer, a.allocation_port)
    changes = t.plan((newer, del_a))
    assert ck_a in changes.delete_c2p and pk_a not in changes.delete_p2c
    assert t.p2c[pk_a] != ck_a
    # nonsense addresses are skipped, not raised
    bad = CreateChannelBinding(udp(("not an ip", 1), LISTEN_ADDR), 0x4000, ("8.8.4.4", 5000), 49152)
    assert not t.plan((bad,))


def test_router_config_is_validated() -> None:
    from firezone_relay.xdp.maps import RouterConfig

    RouterConfig(public_ip4="52.0.0.1", public_ip6="2600::1").pack()
    for bad in (
        {"listen_port": 50000},  # inside the allocation range
        {"lowest_port": 60000, "highest_port": 50000},
        {"public_ip4": "2600::1"},
        {"interface_ip6": "10.0.0.1"},
        {"ttl": 0},
    ):
        with pytest.raises(ValueError):
            RouterConfig(**bad)  # type: ignore[arg-type]


def test_counters_sum_over_cpus() -> None:
    import struct

    from firezone_relay.xdp.maps import STATS_SIZE, XdpCounters

    words = STATS_SIZE // 8
    cpu0 = struct.pack(f"={words}Q", *range(words))
    cpu1 = struct.pack(f"={words}Q", *([1] * words))
    c = XdpCounters.from_percpu(cpu0 + cpu1, 2)
    assert c.packets == {"channel_to_udp": 1, "udp_to_channel": 2, "channel_to_channel": 3}
    assert c.payload_bytes["channel_to_udp"] == 4
    assert c.passed["disabled"] == 7 and len(c.packet_size_buckets) == 16
    assert c.packets_seen == words
