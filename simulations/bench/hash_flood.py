"""Hash flooding the C route mirror: what one user's crafted routes cost, before and after.

The mirror (``actors/_udpio.c``) keys its table by (peer address, allocation port); a user
picks its peers' addresses. Before, the table's hash was unkeyed, so these keys could be chosen
to share one hash (``collide_unkeyed`` solves for them: with the address's middle eight bytes
free, each one is a multiplication by a modular inverse) and every lookup of the deepest route
scanned all of them. Now the hash is SipHash-1-3 under a per-process secret, and no run of
slots is longer than a fixed bound.

For 65,536 routes and for the quota (256 allocations x 1,024 channels = 262,144), it installs
crafted keys and random ones in the previous build (compiled from git, ``BEFORE``) and in the
current one, relays datagrams from a real peer socket whose route was added last (the deepest),
and prints the cost per relayed datagram, the time to delete one allocation's 1,024 peer ->
client routes (one by one, as its channel unbinds do) and its 1,024 client -> peer routes
(``drop_fd``, as closing its socket does), and the ratios.
Run under ``flock /tmp/relay-suite.lock``:

    python -m simulations.bench.hash_flood [--routes 65536 262144] [--rounds 20]
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import ipaddress
import random
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

#: the last commit with the unkeyed hash and unbounded probes
BEFORE = "c1a18f6"
ROOT = Path(__file__).resolve().parents[2]

_M = 1 << 64
_A, _B, _C = 0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9


def _key_words(host: str, port: int, number: int) -> tuple[int, int, int]:
    """The route key of the previous build, as its three little-endian 64-bit words."""
    b = bytearray(24)
    b[0] = 6
    b[1:3] = port.to_bytes(2, "big")
    b[3:19] = ipaddress.IPv6Address(host).packed
    b[19:21] = number.to_bytes(2, "big")
    return tuple(int.from_bytes(b[i : i + 8], "little") for i in (0, 8, 16))  # type: ignore[return-value]


def unkeyed_hash(host: str, port: int, number: int) -> int:
    """The previous build's ``hash_key``."""
    w0, w1, w2 = _key_words(host, port, number)
    h = (w0 * _A) % _M ^ (w1 * _B) % _M ^ (w2 * _C) % _M
    h ^= h >> 32
    h = (h * 0xD6E8FEB86659FD93) % _M
    return (h ^ (h >> 32)) & 0xFFFFFFFF


def collide_unkeyed(target: tuple[str, int], number: int, count: int) -> list[tuple[str, int]]:
    """``count`` IPv6 peers (host, port) whose keys with ``number`` (the allocation port) have
    the very hash of ``target``'s under the previous build: same pre-mix value, so same hash.
    The key's second word (address bytes 5-12) is free: for each choice of the third word's free
    bytes (address bytes 13-15), solve w1 = (h ^ w0*A ^ w2*C) * B^-1 mod 2^64."""
    host, port = target
    if ":" not in host:
        host = "::ffff:" + host
    w0, w1, w2 = _key_words(host, port, number)
    pre = (w0 * _A) % _M ^ (w1 * _B) % _M ^ (w2 * _C) % _M
    b_inv = pow(_B, -1, _M)
    base = bytearray(ipaddress.IPv6Address("2001:db8::").packed)
    peers = []
    for i in range(1, count + 1):
        addr = bytearray(base)
        addr[13:16] = i.to_bytes(3, "big")  # the free bytes of the third word
        key = bytearray(24)
        key[0] = 6
        key[1:3] = port.to_bytes(2, "big")
        key[3:19] = addr
        key[19:21] = number.to_bytes(2, "big")
        c0 = int.from_bytes(key[0:8], "little")
        c2 = int.from_bytes(key[16:24], "little")
        c1 = ((pre ^ (c0 * _A) % _M ^ (c2 * _C) % _M) * b_inv) % _M
        addr[5:13] = c1.to_bytes(8, "little")
        peers.append((str(ipaddress.IPv6Address(bytes(addr))), port))
    return peers


def random_peers(count: int, rng: random.Random) -> list[tuple[str, int]]:
    return [
        (str(ipaddress.IPv6Address(rng.getrandbits(128))), rng.randrange(1, 65536))
        for _ in range(count)
    ]


def build(source: str, name: str, out: Path) -> ModuleType:
    """Compile ``source`` (C text) as a module importable as ``name``."""
    c = out / f"{name}.c"
    c.write_text(source)
    so = out / f"{name}{sysconfig.get_config_var('EXT_SUFFIX')}"
    subprocess.run(
        [
            "gcc", "-shared", "-fPIC", "-O2", f"-I{sysconfig.get_paths()['include']}",
            f"-DPyInit__udpio=PyInit_{name}", "-o", str(so), str(c),
        ],
        check=True,
    )  # fmt: skip
    loader = importlib.machinery.ExtensionFileLoader(name, str(so))
    spec = importlib.util.spec_from_file_location(name, so, loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


class Counted:
    def __init__(self) -> None:
        self.relayed_packets_userspace = 0
        self.relayed_bytes_userspace = 0
        self.packet_size_buckets = [0] * 16


def measure(
    receiver: Any, routes: int, crafted: bool, rounds: int, rng: random.Random
) -> dict[str, float]:
    """Per-datagram cost (µs) of the deepest route with ``routes`` installed, and the time (ms)
    to delete the last allocation's 1,024 routes."""
    listen = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    allocation = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    peer = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    client = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    for s in (listen, allocation, peer, client):
        s.bind(("::1", 0))
        s.setblocking(False)
    try:
        rx = receiver(64, 2052, 4)
        port = allocation.getsockname()[1]
        me = peer.getsockname()[:2]
        to = client.getsockname()[:2]
        others = collide_unkeyed(me, port, routes - 1) if crafted else random_peers(routes - 1, rng)
        started = time.perf_counter()
        for i, other in enumerate(others):
            rx.set_to_client(port, other, listen.fileno(), to, 0x4000 + i % 1024)
        rx.set_to_client(port, me, listen.fileno(), to, 0x4000)
        bind_s = time.perf_counter() - started
        # the allocation's own 1,024 client -> peer routes leave through its socket: closing
        # it drops them by fd (the previous build scanned both whole tables for them)
        for channel in range(0x4000, 0x4400):
            rx.set_to_peer(to, channel, allocation.fileno(), me)
        t0 = time.perf_counter()
        rx.drop_fd(allocation.fileno())
        drop_fd_ms = (time.perf_counter() - t0) * 1000
        stats = Counted()
        spent = 0.0
        relayed = 0
        for _ in range(rounds):
            for _ in range(64):
                peer.sendto(b"x" * 100, allocation.getsockname())
            t0 = time.perf_counter()
            _, k = rx.relay_peers(allocation, port, stats)
            spent += time.perf_counter() - t0
            relayed += k
            while True:
                try:
                    client.recv(2048)
                except BlockingIOError:
                    break
        last = [*others[-1023:], me]  # the allocation added last: its 1,024 routes
        t0 = time.perf_counter()
        for other in last:
            rx.drop_to_client(port, other)
        delete_ms = (time.perf_counter() - t0) * 1000
        refused = getattr(rx, "refused", 0)
        return {
            "us_per_datagram": spent / max(relayed, 1) * 1e6,
            "relayed": relayed,
            "bind_s": bind_s,
            "delete_ms": delete_ms,
            "drop_fd_ms": drop_fd_ms,
            "refused": refused,
        }
    finally:
        for s in (listen, allocation, peer, client):
            s.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--routes", type=int, nargs="+", default=[65536, 262144])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args(argv)
    try:
        old = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{BEFORE}:actors/_udpio.c"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"hash_flood: needs a git clone with {BEFORE} for the before build: {exc}")
        return 2
    new = (ROOT / "actors" / "_udpio.c").read_text()
    with tempfile.TemporaryDirectory() as tmp:
        builds = {
            "before": build(old, "_udpio_before", Path(tmp)),
            "after": build(new, "_udpio_after", Path(tmp)),
        }
        rng = random.Random(1)
        print(f"{'routes':>7} {'build':>6} {'keys':>7} {'us/dgram':>9} {'relayed':>7} "
              f"{'bind s':>7} {'delete ms':>9} {'drop_fd ms':>10} {'refused':>7}")  # fmt: skip
        for routes in args.routes:
            results = {}
            for name, module in builds.items():
                for crafted in (False, True):
                    r = measure(module.Receiver, routes, crafted, args.rounds, rng)
                    results[(name, crafted)] = r
                    print(
                        f"{routes:>7} {name:>6} {'crafted' if crafted else 'random':>7} "
                        f"{r['us_per_datagram']:>9.2f} {r['relayed']:>7} {r['bind_s']:>7.2f} "
                        f"{r['delete_ms']:>9.2f} {r['drop_fd_ms']:>10.2f} {r['refused']:>7}"
                    )
            for name in builds:
                ratio = (
                    results[(name, True)]["us_per_datagram"]
                    / results[(name, False)]["us_per_datagram"]
                )
                print(f"{routes:>7} {name:>6} crafted/random per datagram: {ratio:.1f}x")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
