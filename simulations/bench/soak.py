"""A long soak with churn: ``python -m simulations.bench.soak --minutes N``.

Two relays run side by side on loopback, one on each userspace data path (the compiled helper
and ``RELAY_DATAPATH=python``), with every duration scaled by ``--time-scale`` (0.05: an
allocation lives 30 s, a channel 30 s) so allocations expire within the run. Against each:

* **churn**: a population of allocations (``--allocations`` per relay) created, given one to
  three channels, sent a few datagrams, then refreshed, deleted (Refresh 0) or left to expire,
  and replaced, continually;
* **traffic**: ``--rate`` datagrams/s in all (split between the relays and both directions)
  through a set of stable allocations, each of which moves to a new channel and a new peer
  every ``REBIND_S`` seconds (the old channel is left to expire);
* **an attacker**: one allocation that binds up to ``--attack-channels`` channels to peers of
  consecutive ports that nobody listens on (a pattern that packs a naive route hash), keeps
  them refreshed, sends ChannelData and garbage on them, and deletes and recreates itself.

Every minute traffic pauses for a moment and it checks each relay: the C route mirror equals
the core's routes (``GET /debug/routes`` on the control endpoint, a read of both tables, not
a log scrape), descriptors and RSS, datagrams lost (sent by the soak and not received, at a
rate the relay keeps up with), no traceback in the log. It prints one row per relay and
minute, then a verdict (exit 0 on PASS, 1 on FAIL). ``tests/system/test_soak.py`` runs a short
one.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import random
import resource
import select
import signal
import socket
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from firezone_relay.actors.udpio import IMPLEMENTATION, Receiver, send_batch
from firezone_relay.protocol import stun
from firezone_relay.protocol.stun import Attr, Class
from simulations.relay_process import LocalDaemon, http, start_local
from simulations.turn_client import TurnClient

__all__ = ["Row", "Soak", "main", "run"]

SECRET = "soak-secret-0123456789abcdef0123456789abcdef"
HOST = "127.0.0.1"
PAYLOAD = 120  # bytes of each traffic datagram
TAG = 8  # ... the first of which tag it, so a duplicate or a stranger is told from a datagram
ZEROS = bytes(PAYLOAD - TAG)
REBIND_S = 12.0  # a traffic allocation moves to a new channel and peer this often (real s)
RETRY_S = 1.0  # a request unanswered this long is sent again ...
RETRIES = 5  # ... this many times, then the allocation is given up (and counted)
PAUSE_S = 0.5  # traffic pauses this long before each minute's check, so nothing is in flight
DRAIN_S = 3.0  # ... and the check waits up to this much longer for datagrams still on the way
TRAFFIC_ALLOCATIONS = 32  # per relay
PEERS = 8  # peer sockets per relay
BUFFER = 4 << 20  # the soak's own receive buffers: its sockets must not be what drops
FIRST_CHANNEL = 0x4000
ATTACK_REFRESH_EVERY = 100  # the attacker refreshes its allocation every this many binds
REALTIME_PRIORITY = 10  # --relay-priority realtime: SCHED_RR at this priority
ERROR_DETAILS = 20  # the first this many failed requests are described in the summary
SO_RCVBUFFORCE = 33  # Linux


@dataclass
class Alloc:
    """One client socket and its allocation on one relay."""

    side: Side
    sock: socket.socket
    client: TurnClient
    kind: str  # "churn", "traffic" or "attack"
    relayed: tuple[str, int] | None = None
    plan: list[tuple[str, Any]] = field(default_factory=list)  # ops still to do
    pending: bytes | None = None  # transaction id in flight
    request: bytes = b""
    op: tuple[str, Any] = ("", None)
    sent_at: float = 0.0
    tries: int = 0
    channels: dict[int, tuple[str, int]] = field(default_factory=dict)  # bound: channel -> peer
    peer_used: dict[tuple[str, int], float] = field(default_factory=dict)  # peer -> last bound
    channel: int = 0  # traffic: the channel it sends on now
    peer: tuple[str, int] | None = None  # traffic: the peer it talks to now
    closed: bool = False
    created: float = field(default_factory=time.monotonic)
    last_ok: float = field(default_factory=time.monotonic)  # when a request last succeeded


@dataclass
class Side:
    """One relay and everything the soak does against it."""

    name: str  # "compiled" or "python"
    relay: LocalDaemon
    peers: list[socket.socket]
    allocs: dict[int, Alloc] = field(default_factory=dict)  # fd -> allocation
    traffic: list[Alloc] = field(default_factory=list)
    attacker: Alloc | None = None
    items: list[Any] = field(default_factory=list)  # flat [sock, data, addr, ...] of traffic
    pos: int = 0
    sent: int = 0  # datagrams the soak sent that the relay must deliver
    received: int = 0  # of those, what arrived
    next_tag: int = 0  # every datagram that must arrive carries a tag of its own ...
    in_flight: set[int] = field(default_factory=set)  # ... kept here until it arrives
    surplus: int = 0  # datagrams that arrived with a tag already seen or never sent
    counts: dict[str, int] = field(default_factory=dict)
    kernel_drops: dict[str, int] = field(default_factory=dict)  # relay socket inode -> drops
    rows: list[Row] = field(default_factory=list)

    def count(self, what: str, n: int = 1) -> None:
        self.counts[what] = self.counts.get(what, 0) + n

    def payload(self) -> bytes:
        """A datagram's payload with a new tag in its first 8 bytes."""
        tag = self.next_tag
        self.next_tag += 1
        self.in_flight.add(tag)
        return tag.to_bytes(TAG, "big") + ZEROS


@dataclass(frozen=True, slots=True)
class Row:
    minute: int
    side: str
    allocations: int  # the relay's, from its metrics
    channels: int  # the core's bound channels
    mirror: int  # routes in the C mirror (0 on the pure-Python path, which mirrors nothing)
    equal: bool  # the mirror holds exactly what the core's routes say it should
    fds: int
    rss_mb: float
    sent: int  # cumulative datagrams that had to arrive
    lost: int  # cumulative: sent and not received after the pause
    surplus: int  # cumulative: arrived twice, or never sent (a duplicating relay)
    kdrops: int  # cumulative: datagrams the kernel dropped on the relay's full sockets
    created: int
    deleted: int
    expired: int  # left to expire
    binds: int
    errors: int  # requests answered with an error the soak did not expect, or given up
    tracebacks: int

    HEADER = (
        f"{'min':>4} {'path':>8} {'allocs':>6} {'chans':>6} {'mirror':>6} {'equal':>5} "
        f"{'fds':>5} {'rss MB':>7} {'sent':>10} {'lost':>5} {'dup':>3} {'kdrop':>5} {'created':>7} "
        f"{'deleted':>7} "
        f"{'expired':>7} {'binds':>7} {'errors':>6} {'tb':>3}"
    )

    def line(self) -> str:
        return (
            f"{self.minute:>4} {self.side:>8} {self.allocations:>6} {self.channels:>6} "
            f"{self.mirror:>6} {self.equal!s:>5} {self.fds:>5} {self.rss_mb:>7.1f} "
            f"{self.sent:>10} {self.lost:>5} {self.surplus:>3} {self.kdrops:>5} {self.created:>7} "
            f"{self.deleted:>7} "
            f"{self.expired:>7} {self.binds:>7} {self.errors:>6} {self.tracebacks:>3}"
        )


def _udp(host: str = HOST) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:  # past net.core.rmem_max where allowed (root); Python does not name the option
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, BUFFER)
    except OSError:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER)
    s.setblocking(False)
    s.bind((host, 0))
    return s


class Soak:
    """The driver: one thread, one epoll, batch I/O through ``actors/udpio``."""

    def __init__(self, args: argparse.Namespace, log_dir: Path) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.scale: float = args.time_scale
        self.lifetime = 600 * self.scale  # the relay's allocation and channel lifetime, real s
        self.poller = select.epoll()
        self.sides: list[Side] = []
        self.timers: list[tuple[float, int, Alloc]] = []
        self._seq = 0
        self.to_close: list[tuple[float, socket.socket]] = []
        self.failures: list[str] = []
        self.rx = Receiver(64, 2048, 0)
        base = args.port_base
        # allocations left to expire hold their port for a lifetime beyond the population
        span = 4 * args.allocations + 2 * TRAFFIC_ALLOCATIONS + 200
        try:
            for i, name in enumerate(args.paths):
                low = base + i * span
                peers = [_udp() for _ in range(PEERS)]
                relay = start_local(
                    log_dir,
                    "--time-scale",
                    str(self.scale),
                    "--max-channels-per-allocation",
                    str(max(1024, args.attack_channels)),
                    ports=(low, low + span - 1),
                    secret=SECRET,
                    env={"RELAY_DATAPATH": "python" if name == "python" else "auto"},
                )
                self.sides.append(Side(name, relay, peers))
                if args.relay_priority == "realtime":
                    realtime(relay.pid)
                for p in peers:
                    self.poller.register(p.fileno(), select.EPOLLIN)
        except BaseException:
            self.stop()  # the relays started so far
            raise
        self.peer_fds = {p.fileno(): (s, p) for s in self.sides for p in s.peers}
        self.paused = False

    # -- allocations and their requests ---------------------------------------------------

    def new_alloc(self, side: Side, kind: str, plan: list[tuple[str, Any]]) -> Alloc:
        sock = _udp()
        username, password = side.relay.credentials(f"{kind}{self.rng.randrange(1 << 40)}")
        client = TurnClient(username, password, rng=self.rng)
        a = Alloc(side, sock, client, kind, plan=[("allocate", None), *plan])
        side.allocs[sock.fileno()] = a
        self.poller.register(sock.fileno(), select.EPOLLIN)
        self.next_op(a, time.monotonic())
        return a

    def at(self, when: float, a: Alloc) -> None:
        self._seq += 1
        heapq.heappush(self.timers, (when, self._seq, a))

    def next_op(self, a: Alloc, now: float) -> None:
        """Start the next op of ``a``'s plan (a ("wait", s) op schedules the rest)."""
        while a.plan and not a.closed:
            op = a.plan.pop(0)
            if op[0] == "wait":
                self.at(now + op[1], a)
                return
            if op[0] == "close":
                self.close(a, now, expired=op[1])
                return
            if op[0] == "send":
                self.send_on_channels(a, op[1])
                continue
            if op[0] == "traffic":
                self.start_traffic(a, *op[1])
                continue
            a.op, a.tries = op, 0
            self.send_request(a, now, fresh=True)
            return

    def send_request(self, a: Alloc, now: float, fresh: bool) -> None:
        what, arg = a.op
        c = a.client
        if fresh or a.pending is None:
            tid = c.new_tid()
            if what == "allocate":
                a.request = c.allocate(signed=c.nonce is not None, tid=tid)
            elif what == "refresh":
                a.request = c.refresh(lifetime=arg, tid=tid)
            elif what == "bind":
                a.request = c.channel_bind(arg[0], arg[1], tid=tid)
            else:
                raise AssertionError(what)
            a.pending = tid
        a.sent_at = now
        try:
            a.sock.sendto(a.request, a.side.relay.address)
        except OSError:
            a.side.count("send failed")

    def on_response(self, a: Alloc, data: bytes, now: float) -> None:
        try:
            msg = stun.parse(data)
        except ValueError as exc:
            a.side.count("bad response")
            if len(self.failures) < ERROR_DETAILS:  # kept for the summary, not a failure
                self.failures.append(
                    f"{a.side.name}: an unparsable datagram at a {a.kind} client ({exc}; "
                    f"{len(data)} bytes: {data[:24].hex()})"
                )
            return
        if msg.transaction_id != a.pending:
            return  # a retransmission's second answer
        what, arg = a.op
        a.pending = None
        if msg.cls != Class.ERROR:
            a.last_ok = now
        if msg.cls == Class.ERROR:
            code = (msg.get(Attr.ERROR_CODE) or (0, ""))[0]
            if code in (401, 438) and msg.get(Attr.NONCE) is not None:
                if code == 401 and a.client.nonce is not None:
                    a.side.count(f"error {code}")
                    self.describe_failure(a, f"error {code}", now)
                    self.close(a, now)
                    return
                a.client.learn(msg)
                self.send_request(a, now, fresh=True)
                return
            a.side.count(f"error {code}")
            self.describe_failure(a, f"error {code}", now)
            self.close(a, now)
            return
        if what == "allocate":
            a.relayed = msg.get(Attr.XOR_RELAYED_ADDRESS)
            a.side.count("created")
        elif what == "refresh" and arg == 0:
            a.side.count("deleted")
            a.channels.clear()
            self.close(a, now, after=0.0)
            return
        elif what == "bind":
            channel, peer = arg
            a.side.count("channel refreshes" if channel in a.channels else "binds")
            a.channels[channel] = peer
            a.peer_used[peer] = now
        self.next_op(a, now)

    def describe_failure(self, a: Alloc, what: str, now: float) -> None:
        """Keep the first few failed requests with what the allocation had been doing, so a
        FAIL says which request failed and when, not only how many."""
        if len(self.failures) < ERROR_DETAILS:
            self.failures.append(
                f"{a.side.name}: {what} for {a.op[0]} {a.op[1]!r} of a {a.kind} allocation "
                f"{now - a.created:.1f} s old (last request {now - a.last_ok:.1f} s after the "
                f"previous success, {a.tries} retransmissions, {len(a.channels)} channels)"
            )

    def close(
        self, a: Alloc, now: float, expired: bool = False, after: float | None = None
    ) -> None:
        """Forget ``a``; its socket stays open until the relay has surely let the allocation go
        (so the kernel cannot hand its port to a new client of the same relay meanwhile)."""
        if a.closed:
            return
        a.closed = True
        side = a.side
        fd = a.sock.fileno()
        side.allocs.pop(fd, None)
        self.poller.unregister(fd)
        if expired:
            side.count("expired")
        if a in side.traffic:
            side.traffic.remove(a)
            self.rebuild_items(side)
        if a is side.attacker:
            side.attacker = None
        wait = self.lifetime * 1.5 if after is None else after
        self.to_close.append((now + wait, a.sock))

    # -- what each kind of allocation does --------------------------------------------------

    def churn_plan(self, side: Side) -> list[tuple[str, Any]]:
        rng = self.rng
        plan: list[tuple[str, Any]] = []
        peers = rng.sample(side.peers, rng.randint(1, 3))
        for i, peer in enumerate(peers):
            plan.append(("bind", (FIRST_CHANNEL + i, peer.getsockname())))
        plan.append(("send", 3))
        fate = rng.random()
        life = self.lifetime
        if fate < 0.4:  # deleted after a while, maybe refreshed first
            if rng.random() < 0.5:
                plan += [("wait", rng.uniform(0.1, 0.5) * life), ("refresh", 600)]
            plan += [("wait", rng.uniform(0.1, 0.6) * life), ("refresh", 0)]
        elif fate < 0.7:  # refreshed (and its channels rebound) once, then left to expire
            plan += [("wait", rng.uniform(0.3, 0.6) * life), ("refresh", 600)]
            plan += [("bind", (FIRST_CHANNEL, plan[0][1][1])), ("send", 1)]
            plan += [("close", True)]
        else:  # left to expire
            plan += [("close", True)]
        return plan

    def send_on_channels(self, a: Alloc, n: int) -> None:
        if self.paused:  # nothing may be in flight at the check
            return
        items: list[Any] = []
        for channel in a.channels:
            header = struct.pack("!HH", channel, PAYLOAD)
            for _ in range(n):
                items += (a.sock, header + a.side.payload(), a.side.relay.address)
        dropped, failed = send_batch(items)
        a.side.sent += len(items) // 3 - dropped - failed

    def traffic_plan(self, a: Alloc) -> list[tuple[str, Any]]:
        """Bind the next channel number to a peer this allocation has not bound for a channel
        lifetime and its rebind timeout, switch traffic to it, hold, refresh, repeat (the old
        channel is left to expire; :meth:`start_traffic` refills the plan)."""
        side, now = a.side, time.monotonic()
        channel = FIRST_CHANNEL + (a.channel + 1 - FIRST_CHANNEL) % 0x4000 if a.channel else 0x4000
        quiet = 900 * self.scale * 1.1  # channel lifetime 600 s + rebind timeout 300 s
        free = [
            p.getsockname()
            for p in side.peers
            if now - a.peer_used.get(p.getsockname(), -1e9) > quiet
        ]
        peer = self.rng.choice(free)
        hold = min(REBIND_S, self.lifetime / 3)
        return [("bind", (channel, peer)), ("traffic", (channel, peer)), ("wait", hold),
                ("refresh", 600)]  # fmt: skip

    def start_traffic(self, a: Alloc, channel: int, peer: tuple[str, int]) -> None:
        a.channel, a.peer = channel, peer
        a.plan = [*a.plan, *self.traffic_plan(a)]
        self.rebuild_items(a.side)

    def rebuild_items(self, side: Side) -> None:
        items: list[Any] = []
        peer_socks = {p.getsockname(): p for p in side.peers}
        for a in side.traffic:
            if a.peer is None or a.relayed is None:
                continue
            # the data is a ChannelData header (or none) that each send completes with a tag
            items += (a.sock, struct.pack("!HH", a.channel, PAYLOAD), side.relay.address)
            items += (peer_socks[a.peer], b"", a.relayed)
        side.items = items
        side.pos = 0

    def attack_plan(self, side: Side) -> list[tuple[str, Any]]:
        """Bind channels to consecutive ports nobody listens on, refresh them (and the
        allocation, which a ChannelBind does not refresh) once, delete."""
        n = self.args.attack_channels
        keep = ("refresh", 600)
        binds: list[tuple[str, Any]] = []
        for i in range(n):
            # a ChannelBind refreshes its channel, not the allocation: a round of a thousand
            # binds on a busy machine can outlast the allocation, so refresh it as it goes
            if i and i % ATTACK_REFRESH_EVERY == 0:
                binds.append(keep)
            binds.append(("bind", (FIRST_CHANNEL + i, (HOST, 2000 + i))))
        hold = self.lifetime * 0.5
        return [*binds, keep, ("wait", hold), *binds, keep, ("wait", hold), ("refresh", 0)]

    def attack_noise(self, side: Side) -> None:
        """A few datagrams of the attacker's: ChannelData to its dead peers, on unbound
        channels, with lying lengths, and garbage. None of it is counted as traffic."""
        a = side.attacker
        if a is None or a.closed:
            return
        rng = self.rng
        items: list[Any] = []
        for _ in range(8):
            kind = rng.randrange(4)
            if kind == 0 and a.channels:
                channel = rng.choice(list(a.channels))
                data = struct.pack("!HH", channel, 40) + bytes(40)
            elif kind == 1:
                data = struct.pack("!HH", rng.randrange(0x4000, 0x8000), 40) + bytes(40)
            elif kind == 2:
                data = struct.pack("!HH", FIRST_CHANNEL, 0xFFFF) + bytes(rng.randrange(64))
            else:
                data = rng.randbytes(rng.randrange(1, 200))
            items += (a.sock, data, side.relay.address)
        send_batch(items)

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> list[Row]:
        args = self.args
        t0 = time.monotonic()
        end = t0 + args.minutes * 60
        check_every = min(60.0, args.minutes * 60 / 2) if args.minutes < 2 else 60.0
        next_check = t0 + check_every
        per_side_rate = args.rate / len(self.sides)
        creates_per_s = args.allocations / (self.lifetime * 0.75)
        created_budget = 0.0
        for side in self.sides:
            for _ in range(TRAFFIC_ALLOCATIONS):
                side.traffic.append(self.new_alloc(side, "traffic", []))
            for a in side.traffic:
                a.plan = self.traffic_plan(a)
        minute = 0
        last = t0
        traffic_from = t0
        paused_until = 0.0
        tick_sent = {s.name: 0 for s in self.sides}
        next_retry = t0
        while True:
            now = time.monotonic()
            if now >= next_check:
                minute += 1
                # what is still in flight gets up to DRAIN_S more (a relay may be descheduled
                # on a busy machine); what has not arrived then is lost
                drain_end = now + DRAIN_S
                while any(s.received < s.sent for s in self.sides) and now < drain_end:
                    self.poll(now)
                    now = time.monotonic()
                for side in self.sides:
                    if args.relay_priority == "realtime" and side.relay.alive():
                        realtime(side.relay.pid)  # threads started since
                    side.rows.append(self.check(side, minute))
                    print(side.rows[-1].line(), flush=True)
                # the check took the driver's time, not the relays': no retransmission for it
                took = time.monotonic() - now
                for side in self.sides:
                    for a in side.allocs.values():
                        a.sent_at += took
                next_check += check_every
                traffic_from = time.monotonic()
                tick_sent = {s.name: 0 for s in self.sides}
                if now >= end:
                    break
            pause = self.paused = now >= next_check - PAUSE_S
            # churn: keep the population by creating allocations at its turnover rate
            created_budget += (now - last) * creates_per_s
            last = now
            while created_budget >= 1 and not pause:
                created_budget -= 1
                for side in self.sides:
                    churn = sum(1 for a in side.allocs.values() if a.kind == "churn")
                    if churn < args.allocations:
                        self.new_alloc(side, "churn", self.churn_plan(side))
            for side in self.sides:
                if side.attacker is None and args.attack_channels and not pause:
                    side.attacker = self.new_alloc(side, "attack", self.attack_plan(side))
            # traffic, paced
            if not pause and now > paused_until:
                for side in self.sides:
                    if not side.items:
                        continue
                    due = int((now - traffic_from) * per_side_rate) - tick_sent[side.name]
                    total = len(side.items) // 3
                    while due > 0:
                        take = min(due, total - side.pos, 128)
                        batch = side.items[3 * side.pos : 3 * (side.pos + take)]
                        for k in range(1, len(batch), 3):
                            batch[k] += side.payload()
                        dropped, failed = send_batch(batch)
                        side.sent += take - dropped - failed
                        side.count("traffic send failed", dropped + failed)
                        tick_sent[side.name] += take
                        due -= take
                        side.pos = (side.pos + take) % total
                    if self.rng.random() < 0.02:
                        self.attack_noise(side)
            # timers: plans, retransmissions, delayed closes
            while self.timers and self.timers[0][0] <= now:
                _, _, a = heapq.heappop(self.timers)
                if not a.closed:
                    self.next_op(a, now)
            for side in self.sides if now >= next_retry else ():
                next_retry = now + 0.1
                for a in list(side.allocs.values()):
                    if a.pending is not None and now - a.sent_at > RETRY_S:
                        a.tries += 1
                        if a.tries > RETRIES:
                            side.count("given up")
                            self.describe_failure(a, "given up", now)
                            a.pending = None
                            self.close(a, now)
                        else:
                            self.send_request(a, now, fresh=False)
            if self.to_close and self.to_close[0][0] <= now:
                self.to_close.sort(key=lambda t: t[0])
                while self.to_close and self.to_close[0][0] <= now:
                    self.to_close.pop(0)[1].close()
            self.poll(now)
        return [r for s in self.sides for r in s.rows]

    def poll(self, now: float) -> None:
        rx = self.rx
        for fd, _ in self.poller.poll(0.001):
            a = None
            if fd in self.peer_fds:
                side, sock = self.peer_fds[fd]
            else:
                for side in self.sides:
                    a = side.allocs.get(fd)
                    if a is not None:
                        break
                if a is None:
                    continue
                sock = a.sock
            for _ in range(16):
                try:
                    n = rx.recv(sock)
                except OSError:
                    side.count("recv error")
                    continue
                if n < 0:
                    break
                if a is None:  # a peer socket: traffic towards peers
                    for i in range(n):
                        self.arrived(side, rx.views[i][: rx.lens[i]], 0, "at a peer")
                    continue
                for i in range(n):
                    view = rx.views[i][: rx.lens[i]]
                    if view and 0x40 <= view[0] < 0x80:
                        # what comes back to the attacker (a "dead" port that answered) was
                        # never counted as sent
                        if a.kind != "attack":
                            self.arrived(side, view, 4, f"at a {a.kind} client")
                    elif a.kind != "attack" or stun.is_stun(view):
                        self.on_response(a, bytes(view), now)
                if a.closed:
                    break

    def arrived(self, side: Side, data: memoryview, at: int, where: str) -> None:
        """Count a datagram by its tag: once, and only if the soak sent it."""
        tag = int.from_bytes(data[at : at + TAG], "big")
        if len(data) == at + PAYLOAD and tag in side.in_flight:
            side.in_flight.remove(tag)
            side.received += 1
            return
        side.surplus += 1
        if len(self.failures) < ERROR_DETAILS:
            what = "again" if tag < side.next_tag and len(data) == at + PAYLOAD else "unsent"
            self.failures.append(
                f"{side.name}: a datagram {where} arrived {what} ({len(data)} bytes, tag {tag} "
                f"of {side.next_tag} sent)"
            )

    # -- the minute's check -----------------------------------------------------------------

    def check(self, side: Side, minute: int) -> Row:
        relay = side.relay
        status, body = http("GET", f"{relay.control}/debug/routes", 30)
        routes = json.loads(body) if status == 200 else {}
        if routes and not routes["equal"]:
            print(f"{side.name}: mirror differs: {routes}", file=sys.stderr)
        status, text = http("GET", f"{relay.health}/metrics", 10)
        allocations = _metric(text, "relay_active_allocations") if status == 200 else -1
        log = relay.log()
        c = side.counts
        errors = sum(v for k, v in c.items() if k.startswith("error") or k == "given up")
        return Row(
            minute=minute,
            side=side.name,
            allocations=allocations,
            channels=int(routes.get("core", -1)),
            mirror=int(routes.get("mirror", -1)),
            equal=bool(routes.get("equal", False)) and relay.alive(),
            fds=_fds(relay.pid) if relay.alive() else -1,
            rss_mb=relay.rss_kb() / 1024 if relay.alive() else -1.0,
            sent=side.sent,
            lost=side.sent - side.received,
            surplus=side.surplus,
            kdrops=self.kernel_drops(side),
            created=c.get("created", 0),
            deleted=c.get("deleted", 0),
            expired=c.get("expired", 0),
            binds=c.get("binds", 0),
            errors=errors,
            tracebacks=log.count("Traceback"),
        )

    def kernel_drops(self, side: Side) -> int:
        """Datagrams the kernel dropped on the relay's sockets (a full receive queue: the
        relay fell behind), summed over every socket it has had (``/proc/net/udp*`` drops)."""
        pid = side.relay.pid
        mine = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                mine.add(link[8:-1])
        for table in ("/proc/net/udp", "/proc/net/udp6"):
            with open(table) as f:
                for line in f.read().splitlines()[1:]:
                    parts = line.split()
                    if parts[9] in mine:
                        side.kernel_drops[parts[9]] = int(parts[-1])
        return sum(side.kernel_drops.values())

    def stop(self) -> None:
        for side in self.sides:
            side.relay.stop()
            for a in list(side.allocs.values()):
                a.sock.close()
            for p in side.peers:
                p.close()
        for _, s in self.to_close:
            s.close()
        self.poller.close()


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _metric(text: str, name: str) -> int:
    total = 0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


def verdict(rows: list[Row]) -> tuple[bool, list[str]]:
    """PASS when every check held: mirror equal, nothing lost, no traceback or error, and
    (over three minutes or more) descriptors and RSS flat: the last third of the run at most
    15% (+64 fds, +16 MB) above the first third after the first minute."""
    problems: list[str] = []
    for r in rows:
        if not r.equal:
            problems.append(f"minute {r.minute} {r.side}: route mirror differs from the core")
        if r.tracebacks:
            problems.append(f"minute {r.minute} {r.side}: {r.tracebacks} tracebacks in the log")
    for side in sorted({r.side for r in rows}):
        mine = [r for r in rows if r.side == side]
        final = mine[-1]
        if final.lost:
            why = f" ({final.kdrops} dropped by the kernel on the relay's full sockets)"
            problems.append(
                f"{side}: {final.lost} of {final.sent} datagrams lost{why if final.kdrops else ''}"
            )
        if final.surplus:
            problems.append(f"{side}: {final.surplus} datagrams arrived twice or unsent")
        if final.errors:
            problems.append(f"{side}: {final.errors} requests failed or unanswered")
        steady = mine[1:]
        if len(steady) >= 3:
            third = max(1, len(steady) // 3)
            first, last = steady[:third], steady[-third:]
            fd0, fd1 = max(r.fds for r in first), max(r.fds for r in last)
            rss0, rss1 = max(r.rss_mb for r in first), max(r.rss_mb for r in last)
            if fd1 > fd0 * 1.15 + 64:
                problems.append(f"{side}: descriptors grew {fd0} -> {fd1}")
            if rss1 > rss0 * 1.15 + 16:
                problems.append(f"{side}: RSS grew {rss0:.1f} -> {rss1:.1f} MB")
    return not problems, problems


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m simulations.bench.soak", description=__doc__)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument(
        "--rate", type=int, default=20000, help="traffic datagrams/s in all (default 20000)"
    )
    p.add_argument("--allocations", type=int, default=1000, help="churn population per relay")
    p.add_argument("--attack-channels", type=int, default=1000)
    p.add_argument("--time-scale", type=float, default=0.05)
    p.add_argument("--port-base", type=int, default=10000, help="allocation ports from here")
    p.add_argument(
        "--paths", default="compiled,python", type=lambda s: s.split(","), help="relays to run"
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--relay-priority",
        choices=("normal", "realtime"),
        default="normal",
        help="realtime: run the relays under SCHED_RR (root), for a machine shared with other "
        "work, so that their losses are their own",
    )
    return p.parse_args(argv)


@dataclass
class Result:
    rows: list[Row]
    ok: bool
    problems: list[str]
    counts: dict[str, dict[str, int]]
    failures: list[str] = field(default_factory=list)


def realtime(pid: int) -> None:
    """Every thread of ``pid`` under SCHED_RR: on a machine shared with other work, the relay
    then gets a core when it needs one, so its losses are its own, not the neighbours'. (At
    the soak's rates a relay uses a fraction of a core, so it cannot starve anything.)"""
    param = os.sched_param(REALTIME_PRIORITY)
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setscheduler(int(task), os.SCHED_RR, param)
        except ProcessLookupError:
            pass  # a thread that just ended


def run(args: argparse.Namespace, log_dir: Path) -> Result:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    soak = Soak(args, log_dir)
    try:
        print(
            f"soak: {args.minutes:g} min, {args.rate} datagrams/s of traffic, "
            f"{args.allocations} churning allocations and {args.attack_channels} attacker "
            f"channels per relay, time scale {args.time_scale:g}; driver I/O {IMPLEMENTATION}; "
            f"relays at {args.relay_priority} priority",
            flush=True,
        )
        print(Row.HEADER, flush=True)
        rows = soak.run()
        counts = {s.name: dict(sorted(s.counts.items())) for s in soak.sides}
    finally:
        soak.stop()
    ok, problems = verdict(rows)
    return Result(rows, ok, problems, counts, soak.failures)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like ^C, so the relays are stopped and the sockets closed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    log_dir = Path(tempfile.mkdtemp(prefix="soak-"))
    result = run(args, log_dir)
    for name, counts in result.counts.items():
        print(f"{name}: {counts}")
    for failure in result.failures:
        print(f"failed: {failure}")
    print(f"relay logs in {log_dir}")
    if result.ok:
        print("verdict: PASS")
        return 0
    print("verdict: FAIL")
    for p in result.problems:
        print(f"  {p}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
