"""The operator's ``sessions`` and ``top`` figures count what the XDP program relays.

The daemon runs in the relay namespace of the topology with ``--ebpf-offloading`` (generic and
native mode); a TURN client behind the NAT allocates and binds a channel to the gateway behind
the other NAT (a cone NAT: its mapping keeps the port), and datagrams go both ways. (With a
peer socket in the router's own namespace, native mode on the veth did not deliver peer ->
client in our runs, likely because such locally made datagrams reach the program with their UDP
checksum left to the veth's offload; a NIC hands XDP received frames only. Not investigated
further: the gateway behind its NAT is the realistic peer anyway.) The first ones cross
userspace until the binding reaches the kernel's maps, the rest XDP: the allocation's row must
hold every one of them, exactly, and the relay's XDP totals must show that the kernel carried
the bulk.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from firezone_relay.actors.admin_cli import AdminClient
from simulations.frames import channel_data
from simulations.netns.relay import RelayDaemon, allocate_and_bind, attach_xdp_pass
from simulations.netns.topology import Topology
from tests.integration.conftest import require_bcc

pytestmark = pytest.mark.integration

CHANNEL = 0x4000
BULK = 40  # datagrams each way once XDP relays


@pytest.fixture
def admin_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="xdpadm"))  # short: Unix socket paths are limited
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize(("mode", "workers"), [("generic", 1), ("driver", 1), ("generic", 2)])
def test_sessions_count_the_xdp_path(
    mode: str, workers: int, topology: Topology, admin_dir: Path
) -> None:
    """With several workers, the supervisor runs the program and each worker reads the
    kernel's counts of its own allocations (the array is mapped into every worker)."""
    require_bcc()
    t = topology
    keep = attach_xdp_pass(t.rtr, "r-pub") if mode == "driver" else None
    socket_path = str(admin_dir / "admin.sock")
    extra = ("--admin-socket", socket_path, "--num-worker-threads", str(workers))
    relay = RelayDaemon(t, t.relay_dev, mode, extra_args=extra)
    try:
        client = t.cli.udp("0.0.0.0", 40000)
        peer = t.gw.udp("0.0.0.0", 50000)
        relay.wait_ready(client)
        server = (t.relay4, 3478)
        relayed = allocate_and_bind(client, server, CHANNEL, (t.gateway_public4, 50000))
        admin = AdminClient(socket_path)
        client.settimeout(2)
        peer.settimeout(2)
        sent = [0, 0, 0, 0]  # to_peer datagrams, bytes, to_client datagrams, bytes

        def to_peer(payload: bytes) -> None:
            client.sendto(channel_data(CHANNEL, payload), server)
            data, src = peer.recvfrom(2048)
            assert (data, src) == (payload, relayed)
            sent[0] += 1
            sent[1] += len(payload)

        def to_client(payload: bytes) -> None:
            peer.sendto(payload, relayed)
            assert client.recvfrom(2048)[0] == channel_data(CHANNEL, payload)
            sent[2] += 1
            sent[3] += len(payload)

        def xdp_datagrams() -> int:
            return int((admin.request("GET", "/stats")["xdp"] or {}).get("datagrams", 0))

        to_client(b"opens the gateway's NAT mapping")
        for i in range(200):  # until the binding is in the kernel's maps (bounded)
            to_peer(b"early %d" % i)
            if xdp_datagrams() > 0:
                break
        else:
            raise AssertionError(f"XDP relayed nothing:\n{relay.log_tail()}")
        before = xdp_datagrams()
        for i in range(BULK):
            to_peer(b"c" * (i + 1))
            to_client(b"p" * (2 * i + 1))
        assert xdp_datagrams() - before == 2 * BULK  # the bulk went through the kernel

        (row,) = admin.request("GET", "/sessions")["sessions"]
        assert row["id"] == relayed[1]
        assert ("worker" in row) == (workers > 1)
        counted = [row[k] for k in ("to_peer_datagrams", "to_peer_bytes",
                                    "to_client_datagrams", "to_client_bytes")]  # fmt: skip
        assert counted == sent
        stats = admin.request("GET", "/stats", top=5)
        assert list(stats["totals"].values()) == sent
        assert [r["id"] for r in stats["top"]] == [relayed[1]]
    finally:
        relay.stop()
        if keep is not None:
            keep.cleanup()
