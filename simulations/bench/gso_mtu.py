"""UDP GSO on a path with a smaller MTU (1,460, GCP's): the previous build beside this one.

Two network namespaces joined by a 1,460-MTU veth pair (root; named per process, deleted
after): the relay side holds a listen socket, an allocation socket and a peer on its loopback;
the client sits across the veth. For each peer datagram size from 1,429 to 1,448 bytes (their
ChannelData, 4 bytes more, is too big a GSO segment for the path) and 1,000 (fits), ``--runs``
runs of 32 datagrams are relayed by ``Receiver.relay_peers`` through the mirror. Printed per
build: datagrams delivered whole, GSO sends made, and refused GSO sends (this build counts
them; for the previous one run it under ``strace -f -c -Z -e trace=sendmsg``, which counts the
failed sendmsg calls). Run under ``flock /tmp/relay-suite.lock``:

    python -m simulations.bench.gso_mtu [--runs 3]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from firezone_relay.xdp.netns import netns
from simulations.bench.hash_flood import BEFORE, ROOT, Counted, build


@contextlib.contextmanager
def small_mtu_link(mtu: int) -> Iterator[tuple[str, str]]:
    a, b = f"cpb{os.getpid()}a", f"cpb{os.getpid()}b"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    try:
        ip("netns", "add", a)
        ip("netns", "add", b)
        ip("link", "add", "cpbva", "netns", a, "type", "veth", "peer", "name", "cpbvb", "netns", b)
        for ns, dev, v4 in ((a, "cpbva", "10.202.0.1"), (b, "cpbvb", "10.202.0.2")):
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "link", "set", dev, "mtu", str(mtu), "up")
            ip("-n", ns, "addr", "add", f"{v4}/24", "dev", dev)
        yield a, b
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def udp(host: str) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, 0))
    s.setblocking(False)
    return s


def run(receiver: Any, runs: int) -> dict[str, Any]:
    with small_mtu_link(1460) as (a, b):
        with netns(a):
            listen, allocation, peer = udp("10.202.0.1"), udp("127.0.0.1"), udp("127.0.0.1")
        with netns(b):
            client = udp("10.202.0.2")
        client.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE
        try:
            rx = receiver(64, 2052, 4)
            port = allocation.getsockname()[1]
            rx.set_to_client(
                port, peer.getsockname(), listen.fileno(), client.getsockname(), 0x4000
            )
            sent = delivered = 0
            started = time.perf_counter()
            for _ in range(runs):
                for size in [*range(1429, 1449), 1000]:
                    for i in range(32):
                        peer.sendto(bytes([i]) * size, allocation.getsockname())
                    rx.relay_peers(allocation, port, Counted())
                    sent += 32
                    client.settimeout(1)
                    with contextlib.suppress(TimeoutError):
                        for _ in range(32):
                            if len(client.recv(70000)) == size + 4:
                                delivered += 1
            return {
                "sent": sent,
                "delivered": delivered,
                "gso_sends": rx.gso_sends,
                "gso_refused": getattr(rx, "gso_refused", "n/a"),
                "gso_on": rx.gso,
                "ms": (time.perf_counter() - started) * 1000,
            }
        finally:
            for s in (listen, allocation, peer, client):
                s.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", choices=["before", "after"])
    args = parser.parse_args(argv)
    old = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{BEFORE}:actors/_udpio.c"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    new = (ROOT / "actors" / "_udpio.c").read_text()
    with tempfile.TemporaryDirectory() as tmp:
        for name, source in (("before", old), ("after", new)):
            if args.only not in (None, name):
                continue
            module = build(source, f"_udpio_gso_{name}", Path(tmp))
            print(name, run(module.Receiver, args.runs), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
