"""Benchmark of the XDP TURN router (root; bcc).

1. Program cost per path: BPF_PROG_TEST_RUN with a repeat count, reporting the kernel's mean
   ns per run (median of three runs). test_run does not reset the frame between repetitions,
   so the map entries are arranged so that each output is again a valid input: a relaying path
   alternates with its reverse (channel->udp, udp->channel, ...) or is a fixed point (relay
   loop), and the figure is the mean of the two directions.
2. Packets per second through the namespace topology (tests/integration/conftest.py), program
   attached in generic mode on the relay veth, the relay side idle (no userspace relay): a
   Python sender floods one direction for a bounded time and count; delivered = rx_packets
   delta at the receiving veth.

Run: ``python -m simulations.bench_xdp [--repeat N] [--seconds S] [--mode generic|driver]``.
Numbers on a shared 2-vCPU machine are noisy; compare them with each other.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

from protocol import stun
from protocol.commands import CreateChannelBinding
from protocol.types import Addr
from xdp import bpfsys
from xdp.maps import RouterConfig, chan_key, peer_key
from xdp.packets import channel_data, frame

REPO = Path(__file__).resolve().parents[1]
R4, R6 = "10.0.0.5", "fd00::5"  # interface addresses
PUB4, PUB6 = "52.0.0.1", "2600:1f00::1"  # public addresses (relay-loop detection)
LISTEN, A, B, PP = 3478, 49152, 49153, 50000
CH = 0x4000
PAYLOAD = bytes(100)


def _r(v6: bool) -> str:
    return R6 if v6 else R4


def _pub(v6: bool) -> str:
    return PUB6 if v6 else PUB4


def bench_program(repeat: int) -> list[tuple[str, float, int]]:
    """(path, ns per packet, verdict) for every path of the program."""
    from xdp.loader import TurnRouter, import_bcc

    router = TurnRouter(max_bindings=1024)
    router.configure(
        RouterConfig(public_ip4=PUB4, public_ip6=PUB6, interface_ip4=R4, interface_ip6=R6)
    )
    results: list[tuple[str, float, int]] = []

    def measure(name: str, raw: bytes, setup: Callable[[], None]) -> None:
        setup()
        router.test_run(raw)  # warm up
        runs = sorted(
            (router.test_run(raw, repeat=repeat) for _ in range(3)), key=lambda r: r.duration_ns
        )
        results.append((name, float(runs[1].duration_ns), runs[1].retval))
        router.delete(router_keys_c2p(), router_keys_p2c())

    installed: dict[str, list[bytes]] = {"c2p": [], "p2c": []}

    def put(c2p: list[tuple[bytes, bytes]], p2c: list[tuple[bytes, bytes]]) -> None:
        router.update(c2p, p2c)
        installed["c2p"] = [k for k, _ in c2p]
        installed["p2c"] = [k for k, _ in p2c]

    def router_keys_c2p() -> list[bytes]:
        return installed["c2p"]

    def router_keys_p2c() -> list[bytes]:
        return installed["p2c"]

    for cf, pf in ((False, False), (True, True), (False, True), (True, False)):
        rc, rp = _r(cf), _r(pf)
        name = f"v{6 if cf else 4}->v{6 if pf else 4} channel->udp + udp->channel"
        measure(
            name,
            frame((rc, LISTEN), (rc, LISTEN), channel_data(CH, PAYLOAD)),
            lambda rc=rc, rp=rp: put(  # type: ignore[misc]
                [(chan_key((rc, LISTEN), CH), peer_key((rp, PP), A))],
                [(peer_key((rp, A), PP), chan_key((rc, LISTEN), CH))],
            ),
        )
    for af, bf, via in ((False, False, False), (True, True, True), (False, True, False)):
        ra, rb, pub = _r(af), _r(bf), _pub(via)
        name = f"relay loop v{6 if af else 4}->v{6 if bf else 4} channel->channel"
        measure(
            name,
            frame((ra, LISTEN), (ra, LISTEN), channel_data(CH, PAYLOAD)),
            lambda ra=ra, rb=rb, pub=pub: put(  # type: ignore[misc]
                [
                    (chan_key((ra, LISTEN), CH), peer_key((pub, B), A)),
                    (chan_key((rb, LISTEN), CH), peer_key((pub, A), B)),
                ],
                [
                    (peer_key((pub, A), B), chan_key((rb, LISTEN), CH)),
                    (peer_key((pub, B), A), chan_key((ra, LISTEN), CH)),
                ],
            ),
        )
    nothing: Callable[[], None] = lambda: put([], [])  # noqa: E731
    binding_request = stun.encode(stun.Method.BINDING, stun.Class.REQUEST, b"t" * 12, [])
    measure("pass: STUN request", frame(("8.8.8.8", 4000), (R4, LISTEN), binding_request), nothing)
    measure(
        "pass: ChannelData without binding",
        frame(("8.8.8.8", 4000), (R4, LISTEN), channel_data(CH, PAYLOAD)),
        nothing,
    )
    measure("pass: peer UDP without binding", frame(("8.8.8.8", 4000), (R4, A), PAYLOAD), nothing)
    measure("pass: other UDP port", frame(("8.8.8.8", 4000), (R4, 53), PAYLOAD), nothing)
    router.close()

    bcc = import_bcc()
    empty = bcc.BPF(text=b"int xdp_nop(struct xdp_md *ctx) { return XDP_PASS; }")
    fd = empty.load_func(b"xdp_nop", bcc.BPF.XDP).fd
    raw = frame(("8.8.8.8", 4000), (R4, LISTEN), channel_data(CH, PAYLOAD))
    res = bpfsys.prog_test_run(fd, raw, repeat=repeat)
    results.append(("baseline: empty XDP program", float(res.duration_ns), res.retval))
    empty.cleanup()
    return results


GENERATOR = """
import os, socket, sys, time
host, port, sport, seconds, limit, payload = sys.argv[1:7]
family = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(family, socket.SOCK_DGRAM)
s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", int(sport)))
s.connect((host, int(port)))
try:
    os.sched_setaffinity(0, {0})
except OSError:
    pass
msg, send, n = bytes.fromhex(payload), s.send, 0
start = time.monotonic(); end = start + float(seconds); limit = int(limit)
while n < limit and time.monotonic() < end:
    for _ in range(256):
        try:
            send(msg)
        except OSError:
            pass
    n += 256
print(n, time.monotonic() - start, flush=True)
"""


def bench_topology(seconds: float, limit: int, mode: str) -> list[tuple[str, float, float, int]]:
    """(direction, offered pps, delivered pps, packets the program relayed)."""
    from actors.xdp_manager import XdpOptions, start_offload
    from tests.integration.conftest import Netns, build_topology

    created: list[Netns] = []

    class Owned(Netns):
        def __init__(self, role: str) -> None:
            super().__init__(role)
            created.append(self)

    results: list[tuple[str, float, float, int]] = []
    ref = None
    peer_prog = None
    try:
        t = build_topology(Owned)
        if mode == "driver":  # native XDP on veth needs a program on the peer veth too
            from xdp.loader import import_bcc

            bcc = import_bcc()
            peer_prog = bcc.BPF(text=b"int xdp_pass(struct xdp_md *ctx) { return XDP_PASS; }")
            with t.rtr.entered():
                fn = peer_prog.load_func(b"xdp_pass", bcc.BPF.XDP)
                peer_prog.attach_xdp(b"r-pub", fn, bcc.BPF.XDP_FLAGS_DRV_MODE)
        ref = start_offload(
            XdpOptions(
                interface="p0",
                attach_mode=mode,
                public_ip4=t.relay4,
                public_ip6=t.relay6,
                mandatory=True,
                netns=t.rly.name,
            )
        )
        assert ref is not None
        proxy = ref.proxy()

        def learn(ns: Netns, sport: int, port: int) -> Addr:
            relay_sock = t.rly.udp("0.0.0.0", port)
            s = ns.udp("0.0.0.0", sport)
            s.sendto(b"hi", (t.relay4, port))
            _, src = relay_sock.recvfrom(100)
            relay_sock.close()
            s.close()
            return (src[0], src[1])

        cli_pub = learn(t.cli, 40000, LISTEN)
        gw_pub = learn(t.gw, 50000, A)  # also opens gw's NAT mapping for A
        gw_listen_pub = learn(t.gw, 50001, LISTEN)
        proxy.apply(
            (
                CreateChannelBinding(cli_pub, CH, gw_pub, A),
                CreateChannelBinding(cli_pub, CH + 1, (t.relay4, B), A + 10),
                CreateChannelBinding(gw_listen_pub, CH + 2, (t.relay4, A + 10), B),
            )
        ).get(timeout=10)

        def flood(
            name: str, ns: Netns, sport: int, port: int, msg: bytes, rx: tuple[Netns, str]
        ) -> None:
            before = rx[0].link_stats(rx[1])["rx_packets"]
            relayed_before = proxy.counters().get(timeout=5).relayed_packets
            out = ns.run(
                sys.executable,
                "-c",
                textwrap.dedent(GENERATOR),
                t.relay4,
                str(port),
                str(sport),
                str(seconds),
                str(limit),
                msg.hex(),
            )
            sent, elapsed = out.split()
            after = rx[0].link_stats(rx[1])["rx_packets"]
            relayed = proxy.counters().get(timeout=5).relayed_packets - relayed_before
            results.append(
                (name, int(sent) / float(elapsed), (after - before) / float(elapsed), relayed)
            )

        flood(
            "client ChannelData -> peer UDP",
            t.cli,
            40000,
            LISTEN,
            channel_data(CH, PAYLOAD),
            (t.gw, "g0"),
        )
        flood("peer UDP -> client ChannelData", t.gw, 50000, A, PAYLOAD, (t.cli, "c0"))
        flood(
            "relay loop ChannelData -> ChannelData",
            t.cli,
            40000,
            LISTEN,
            channel_data(CH + 1, PAYLOAD),
            (t.gw, "g0"),
        )
    finally:
        if ref is not None:
            ref.stop(block=True, timeout=10)
        for ns in created:
            ns.delete()
        if peer_prog is not None:
            peer_prog.cleanup()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=1_000_000, help="test_run repetitions")
    parser.add_argument("--seconds", type=float, default=4.0, help="per flood (max 5)")
    parser.add_argument("--limit", type=int, default=2_000_000, help="max packets per flood")
    parser.add_argument("--mode", choices=("generic", "driver"), default="generic")
    parser.add_argument("--skip-topology", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_xdp needs root (BPF, network namespaces)")
    seconds = min(args.seconds, 5.0)  # three floods stay within 20 s with setup
    sys.path.insert(0, str(REPO))

    print(f"XDP TURN router, BPF_PROG_TEST_RUN, repeat={args.repeat}, 100-byte payload")
    for name, ns, verdict in bench_program(args.repeat):
        v = {bpfsys.XDP_TX: "TX", bpfsys.XDP_PASS: "PASS"}.get(verdict, str(verdict))
        print(f"  {name:<52} {ns:7.1f} ns/packet  ({v})")
    if args.skip_topology:
        return
    started = time.monotonic()
    print(
        f"\nnamespace topology, XDP {args.mode} mode on the relay veth, relay side idle, "
        f"{seconds:g} s per direction, Python sender on CPU0"
    )
    for name, offered, delivered, relayed in bench_topology(seconds, args.limit, args.mode):
        print(
            f"  {name:<40} offered {offered / 1e3:6.1f} kpps  delivered "
            f"{delivered / 1e3:6.1f} kpps  (XDP relayed {relayed})"
        )
    print(f"  ({time.monotonic() - started:.1f} s)")


if __name__ == "__main__":
    main()
