"""Fuzz soak: a million hostile datagrams at a live relay, then check it is still well.

``python -m simulations.bench.fuzz`` starts the daemon (as the simulator does), makes a few real
allocations (with a permission and a channel to a peer socket of ours), then sends mutated and
random datagrams, bounded in count and time, at the listen port and at the allocation ports:

* valid-looking STUN built from real requests (Binding, Allocate, Refresh, CreatePermission,
  ChannelBind, Send), then bit-flipped, truncated, attribute-shuffled, attribute-duplicated,
  attribute-rewritten or given a lying length, sent from fresh sockets and from the allocated
  clients' own 5-tuples;
* ChannelData with random channel numbers and lying lengths; STUN with many unknown attributes;
* garbage of random length, to the listen port and to the allocation ports (from the permitted
  peer and from strangers).

It ends by checking the relay: alive, no traceback or ERROR line in its log, RSS growth below
16 MB, a Binding answered in under 50 ms, and a fresh Allocate still succeeding; and prints the
figures. ``tests/adversarial`` runs a short version of it (``soak``) and asserts the behaviour.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import socket
import statistics
import struct
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from firezone_relay.protocol import stun
from firezone_relay.protocol.auth import make_credentials
from firezone_relay.protocol.stun import Attr, Class
from simulations.turn_client import TurnClient

__all__ = ["Report", "Target", "allocate", "binding_rtt", "exchange", "main", "soak"]

RSS_BUDGET_KB = 16 * 1024
BINDING_BUDGET_S = 0.050
REPLY_TIMEOUT = 2.0


@dataclass
class Target:
    """A running relay as the fuzzer sees it."""

    host: str
    listen_port: int
    health_port: int
    secret: str
    scheme: str
    pid: int
    log: Callable[[], str]


@dataclass
class Report:
    sent: int = 0
    seconds: float = 0.0
    to_listen: int = 0
    to_allocations: int = 0
    rss_before_kb: int = 0
    rss_after_kb: int = 0
    binding_ms: list[float] = field(default_factory=list)
    alive: bool = False
    problems: list[str] = field(default_factory=list)
    relay_counted_drops: int = 0
    kernel_drops: int = 0  # at the relay's sockets: it was busy, the queue overflowed
    fresh_allocate_ok: bool = False

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds else 0.0

    @property
    def ok(self) -> bool:
        return (
            self.alive
            and not self.problems
            and self.rss_after_kb - self.rss_before_kb < RSS_BUDGET_KB
            and bool(self.binding_ms)
            and self.fresh_allocate_ok
        )

    def lines(self) -> list[str]:
        p50 = statistics.median(self.binding_ms) if self.binding_ms else float("nan")
        worst = max(self.binding_ms) if self.binding_ms else float("nan")
        return [
            f"datagrams sent        {self.sent} in {self.seconds:.1f} s ({self.rate:,.0f}/s)",
            f"  to the listen port  {self.to_listen}",
            f"  to allocation ports {self.to_allocations}",
            f"kernel queue drops    {self.kernel_drops} (so {self.sent - self.kernel_drops} "
            "reached the relay)",
            f"relay-counted drops   {self.relay_counted_drops} (invalid + unroutable + limited)",
            f"RSS                   {self.rss_before_kb} kB -> {self.rss_after_kb} kB "
            f"({(self.rss_after_kb - self.rss_before_kb) / 1024:+.1f} MB, budget 16 MB)",
            f"Binding after soak    p50 {p50:.2f} ms, max {worst:.2f} ms "
            f"(budget {BINDING_BUDGET_S * 1000:.0f} ms)",
            f"alive                 {self.alive}; fresh Allocate ok {self.fresh_allocate_ok}",
            f"log problems          {self.problems or 'none'}",
        ]


# -- a TURN client over a plain blocking socket ---------------------------------------------------


def exchange(sock: socket.socket, server: tuple[str, int], data: bytes) -> stun.Message:
    """Send a request and wait for the response with its transaction id (others skipped)."""
    tid = data[8:20]
    sock.settimeout(REPLY_TIMEOUT)
    sock.sendto(data, server)
    deadline = time.monotonic() + REPLY_TIMEOUT
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        reply = sock.recv(65536)
        if stun.is_stun(reply) and reply[8:20] == tid:
            return stun.parse(reply)


def error_code(msg: stun.Message) -> int | None:
    value = msg.get(Attr.ERROR_CODE)
    return None if value is None else int(value[0])


def allocate(
    server: tuple[str, int], username: str, password: str, sock: socket.socket | None = None
) -> tuple[socket.socket, TurnClient, stun.Message]:
    """Allocate (401 challenge, then signed); returns the socket, the client and the final
    response, which may be an error."""
    sock = sock or socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if sock.getsockname()[1] == 0:
        sock.bind(("127.0.0.1", 0))
    client = TurnClient(username, password, rng=random.Random())
    challenge = exchange(sock, server, client.allocate(signed=False))
    client.learn(challenge)
    return sock, client, exchange(sock, server, client.allocate())


def binding_rtt(server: tuple[str, int], count: int = 20) -> list[float]:
    """Round-trip times (ms) of ``count`` Bindings from a fresh socket; raises on a lost one."""
    rtts = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        client = TurnClient("x", "y", rng=random.Random())
        for _ in range(count):
            start = time.perf_counter()
            reply = exchange(sock, server, client.binding())
            rtts.append((time.perf_counter() - start) * 1000)
            assert reply.cls == Class.SUCCESS
    return rtts


def settle(server: tuple[str, int], attempts: int = 30) -> None:
    """Wait until the relay has worked through its queue: a Binding is answered again
    (one sent while the socket buffer was full may have been dropped by the kernel)."""
    for _ in range(attempts):
        try:
            binding_rtt(server, 1)
            return
        except TimeoutError:
            continue
    raise TimeoutError("the relay no longer answers Bindings")


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _drops(health_port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{health_port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return -1
    values = re.findall(r"^relay_datagrams_dropped\S*\s+(\S+)", text, re.M)
    return sum(int(float(v)) for v in values)


def kernel_drops(ports: set[int]) -> int:
    """Datagrams the kernel dropped at full receive queues of UDP sockets on ``ports``."""
    total = 0
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 12 and int(fields[1].rsplit(":", 1)[1], 16) in ports:
                total += int(fields[-1])
    return total


def log_problems(log: str) -> list[str]:
    """Lines that mean the relay failed on input: tracebacks, ERROR/CRITICAL lines."""
    found = [
        line[:200]
        for line in log.splitlines()
        if line.startswith("Traceback") or re.search(r"Z\s+(ERROR|CRITICAL)\s", line)
    ]
    return found[:10]


# -- mutations ------------------------------------------------------------------------------------


def _attrs(data: bytes) -> list[tuple[int, bytes]]:
    out = []
    offset = 20
    while offset + 4 <= len(data):
        attr_type, length = struct.unpack_from("!HH", data, offset)
        out.append((attr_type, data[offset + 4 : offset + 4 + length]))
        offset += 4 + length + (-length % 4)
    return out


def _assemble(head: bytes, attrs: list[tuple[int, bytes]]) -> bytes:
    body = b"".join(struct.pack("!HH", t, len(v)) + v + b"\x00" * (-len(v) % 4) for t, v in attrs)
    return head[:2] + struct.pack("!H", len(body)) + head[4:20] + body


class Mutator:
    """Fresh hostile datagrams from seeds, with a seeded RNG (reproducible runs)."""

    def __init__(self, seeds: list[bytes], rng: random.Random) -> None:
        self.seeds = seeds
        self.rng = rng

    def next(self) -> bytes:
        rng = self.rng
        kind = rng.randrange(100)
        seed = rng.choice(self.seeds)
        if kind < 30:  # bit flips
            data = bytearray(seed)
            for _ in range(rng.randrange(1, 9)):
                i = rng.randrange(len(data))
                data[i] ^= 1 << rng.randrange(8)
            return bytes(data)
        if kind < 42:  # truncation
            return seed[: rng.randrange(len(seed))]
        if kind < 60 and len(seed) >= 20:  # attribute shuffle / duplicate / drop
            attrs = _attrs(seed)
            op = rng.randrange(3)
            if op == 0:
                rng.shuffle(attrs)
            elif op == 1 and attrs:
                attrs += [rng.choice(attrs)] * rng.randrange(1, 8)
            elif attrs:
                del attrs[rng.randrange(len(attrs))]
            return _assemble(seed, attrs)
        if kind < 72 and len(seed) >= 20:  # an attribute's value rewritten
            attrs = _attrs(seed)
            if attrs:
                i = rng.randrange(len(attrs))
                size = rng.choice((0, 1, 2, 3, 4, 7, 8, 16, 20, 32, rng.randrange(600)))
                attrs[i] = (attrs[i][0], rng.randbytes(size))
            if rng.randrange(4) == 0:
                attrs.insert(rng.randrange(len(attrs) + 1), (rng.randrange(65536), b"\x01" * 4))
            return _assemble(seed, attrs)
        if kind < 78 and len(seed) >= 20:  # lying STUN length
            return seed[:2] + struct.pack("!H", rng.randrange(65536)) + seed[4:]
        if kind < 86:  # ChannelData
            channel = rng.choice((0x4000, 0x4001, rng.randrange(0x4000, 0x8000)))
            payload = rng.randbytes(rng.randrange(200))
            length = rng.choice((len(payload), rng.randrange(65536)))
            return struct.pack("!HH", channel, length) + payload
        if kind < 87:  # many unknown comprehension-required attributes
            count = rng.randrange(1, 1000)
            attrs = [(rng.randrange(0x0030, 0x7FFF), b"") for _ in range(count)]
            return _assemble(self.seeds[0], attrs)
        return rng.randbytes(rng.choice((0, 1, 3, 4, 19, 20, 21, rng.randrange(1500))))


# -- the soak -------------------------------------------------------------------------------------


def soak(
    target: Target,
    count: int,
    seconds: float,
    *,
    allocations: int = 4,
    seed: int = 1,
    rate: float | None = None,
) -> Report:
    """Set up allocations, send ``count`` hostile datagrams (at most ``seconds``, at most
    ``rate`` per second if given), check."""
    rng = random.Random(seed)
    server = (target.host, target.listen_port)
    report = Report()
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    peer.setblocking(False)
    peer_addr = peer.getsockname()
    clients: list[tuple[socket.socket, TurnClient]] = []
    seeds: list[bytes] = [TurnClient("x", "y", rng=rng).binding()]
    relayed: list[tuple[str, int]] = []
    for i in range(allocations):
        username, password = make_credentials(
            target.scheme, target.secret, int(time.time()) + 3600, f"fuzz{i}-{rng.random()}"
        )
        sock, client, reply = allocate(server, username, password)
        if reply.cls != Class.SUCCESS:
            raise RuntimeError(f"setup Allocate failed: {error_code(reply)}")
        relayed.append((target.host, reply.get(Attr.XOR_RELAYED_ADDRESS)[1]))
        setup = (client.create_permission(peer_addr), client.channel_bind(0x4000, peer_addr))
        for request in setup:
            answer = exchange(sock, server, request)
            if answer.cls != Class.SUCCESS:
                raise RuntimeError(f"setup {request[:2].hex()} failed: {error_code(answer)}")
        clients.append((sock, client))
        seeds += [
            client.allocate(),
            client.refresh(600),
            client.create_permission(peer_addr, ("198.51.100.1", 9)),
            client.channel_bind(0x4001, peer_addr),
            client.send_indication(peer_addr, b"hello"),
            client.allocate(signed=False),
            struct.pack("!HH", 0x4000, 8) + b"chandata",
        ]
    for sock, _ in clients:
        sock.setblocking(False)
    strangers = []
    for _ in range(16):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        s.setblocking(False)
        strangers.append(s)
    senders = [s for s, _ in clients] + strangers
    mutator = Mutator(seeds, rng)
    binding_rtt(server, 5)  # warm up, then the baseline
    report.rss_before_kb = rss_kb(target.pid)
    relay_ports = {target.listen_port, *(port for _, port in relayed)}
    drops_before = kernel_drops(relay_ports)
    start = time.monotonic()
    deadline = start + seconds
    sent = 0
    try:
        while sent < count and time.monotonic() < deadline:
            if rate:
                time.sleep(max(0.0, start + sent / rate - time.monotonic()))
            for _ in range(512):
                data = mutator.next()
                roll = rng.randrange(10)
                if roll < 8:
                    sender = rng.choice(senders)
                    dest = server
                    report.to_listen += 1
                else:  # allocation ports: from the permitted peer, or from a stranger
                    sender = peer if roll == 8 else rng.choice(strangers)
                    dest = rng.choice(relayed)
                    report.to_allocations += 1
                try:
                    sender.sendto(data, dest)
                except (BlockingIOError, ConnectionRefusedError):
                    pass
                except OSError:  # e.g. EMSGSIZE for a lying giant: counts as not sent
                    continue
                sent += 1
            for sock in [peer, *senders]:  # keep our receive queues from filling
                for _ in range(256):
                    try:
                        sock.recv(65536)
                    except (BlockingIOError, ConnectionRefusedError):
                        break
    finally:
        report.sent = sent
        report.seconds = time.monotonic() - start
        for sock in [peer, *senders]:
            sock.close()
    report.kernel_drops = kernel_drops(relay_ports) - drops_before
    report.alive = alive(target.pid)
    if report.alive:
        settle(server)
        report.binding_ms = binding_rtt(server)
        report.rss_after_kb = rss_kb(target.pid)
        username, password = make_credentials(
            target.scheme, target.secret, int(time.time()) + 3600, f"after-{rng.random()}"
        )
        sock, _, reply = allocate(server, username, password)
        sock.close()
        report.fresh_allocate_ok = reply.cls == Class.SUCCESS
        report.relay_counted_drops = _drops(target.health_port)
    report.problems = log_problems(target.log())
    return report


# -- the command ----------------------------------------------------------------------------------


async def _run(count: int, seconds: float, rate: float | None) -> Report:
    from simulations.relay_process import start

    system = await start({"ports": 64})
    try:
        assert system.secret is not None and system.ip4 is not None
        target = Target(
            system.ip4,
            system.listen_port,
            system.health_port,
            system.secret,
            system.scheme,
            system.proc.pid,
            system.log,
        )
        return await asyncio.to_thread(soak, target, count, seconds, rate=rate)
    finally:
        await system.stop()
        system.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.bench.fuzz", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--count", type=int, default=1_000_000, help="datagrams to send")
    parser.add_argument("--seconds", type=float, default=600.0, help="time bound of the soak")
    parser.add_argument("--rate", type=float, default=None, help="datagrams/s (default: flat out)")
    args = parser.parse_args(argv)
    report = asyncio.run(_run(args.count, args.seconds, args.rate))
    for line in report.lines():
        print(line)
    p50 = statistics.median(report.binding_ms) if report.binding_ms else float("inf")
    verdict = report.ok and p50 < BINDING_BUDGET_S * 1000
    print("verdict               " + ("PASS" if verdict else "FAIL"))
    return 0 if verdict else 1


if __name__ == "__main__":
    sys.exit(main())
