"""A burst from one peer at one allocation socket: how many datagrams the kernel drops.

A peer process sends ``--burst`` datagrams (2,000 by default, 100 bytes) to an allocation
socket as fast as loopback takes them (sendmmsg, 64 at a time), while this process reads the
socket as the relay does (``Receiver.relay_peers``: read a batch, relay it to the client
through the mirror, wait for the next readiness). Before: the socket as allocations had it (the
kernel's default receive queue); after: ``bind_udp(..., receive_bytes=ALLOCATION_RECEIVE_BYTES)``.
The kernel's own count (``SO_RXQ_OVFL``, what ``relay.datagrams.dropped{reason=
kernel_rx_overflow}`` shows; drops after the last datagram read are only seen with the next one)
and what the reader got are printed for IPv4 and IPv6, for several runs each. Run under
``flock /tmp/relay-suite.lock``:

    python -m simulations.bench.rx_burst [--burst 2000] [--runs 5]
"""

from __future__ import annotations

import argparse
import select
import socket
import subprocess
import sys
import time

from firezone_relay.actors.sockets import ALLOCATION_RECEIVE_BYTES, SO_RXQ_OVFL, bind_udp
from firezone_relay.actors.udpio import Receiver
from firezone_relay.protocol.types import Family

# sendmmsg in runs of 64 (the compiled send_batch): a peer's burst, not a Python loop's trickle
SENDER = """
import socket, sys
from firezone_relay.actors.udpio import send_batch
family, host, port, count, size = sys.argv[1:]
s = socket.socket(int(family), socket.SOCK_DGRAM)
s.bind((host, 0))
print(s.getsockname()[1], flush=True)
sys.stdin.readline()
items = [s, b"p" * int(size), (host, int(port))] * 64
for _ in range(int(count) // 64):
    send_batch(items)
send_batch(items[: 3 * (int(count) % 64)])
"""


class Counted:
    def __init__(self) -> None:
        self.relayed_packets_userspace = 0
        self.relayed_bytes_userspace = 0
        self.packet_size_buckets = [0] * 16


def burst(family: Family, receive_bytes: int | None, count: int, size: int) -> tuple[int, int]:
    """(datagrams read, kernel drops) for one burst."""
    host = "::1" if family is Family.V6 else "127.0.0.1"
    af = socket.AF_INET6 if family is Family.V6 else socket.AF_INET
    sock = bind_udp(family, host, 0, receive_bytes=receive_bytes)
    sock.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
    client = socket.socket(af, socket.SOCK_DGRAM)
    client.bind((host, 0))
    listen = socket.socket(af, socket.SOCK_DGRAM)
    listen.bind((host, 0))
    port = sock.getsockname()[1]
    sender = subprocess.Popen(
        [sys.executable, "-c", SENDER, str(int(af)), host, str(port), str(count), str(size)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert sender.stdout is not None and sender.stdin is not None
        peer = (host, int(sender.stdout.readline()))
        rx = Receiver(64, 65540, 4)
        rx.set_to_client(port, peer, listen.fileno(), client.getsockname()[:2], 0x4000)
        stats = Counted()
        got = 0
        sender.stdin.write("go\n")
        sender.stdin.flush()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            ready, _, _ = select.select([sock], [], [], 0.3)
            if not ready:
                if sender.poll() is not None:
                    break
                continue
            for _ in range(4):  # READ_BATCHES
                n, _k = rx.relay_peers(sock, port, stats)
                if n < 0:
                    break
                got += n
        sender.wait(5)
        return got, int(rx.kernel_drops)
    finally:
        for s in (sock, client, listen):
            s.close()
        if sender.poll() is None:
            sender.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burst", type=int, default=2000)
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    print(f"{args.burst} datagrams of {args.size} bytes from one peer, {args.runs} runs each")
    print(f"{'family':>6} {'socket':>22} {'read':>18} {'kernel drops':>24}")
    for family in (Family.V6, Family.V4):
        for name, size in (
            ("default", None),
            (f"{ALLOCATION_RECEIVE_BYTES} B", ALLOCATION_RECEIVE_BYTES),
        ):
            results = [burst(family, size, args.burst, args.size) for _ in range(args.runs)]
            read = [r[0] for r in results]
            drops = [r[1] for r in results]
            print(f"{family.name:>6} {name:>22} {read!s:>18} {drops!s:>24}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
