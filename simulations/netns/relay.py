"""The real relay daemon inside a namespace topology, for benchmarks and tests (root).

Plumbing for :mod:`simulations.bench.xdp` and the integration tests: ``firezone-relay``
started in the relay namespace of a :class:`~simulations.netns.topology.Topology`, a TURN
client that allocates and binds a channel through the NAT with a socket living in the client
namespace, a bounded UDP generator run inside a namespace (paced or flat out), and readers for
the relay's CPU time and its ``/metrics``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import re
import socket
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from firezone_relay.protocol import stun
from firezone_relay.protocol.auth import make_credentials
from firezone_relay.protocol.stun import Attr, Class
from firezone_relay.protocol.types import Addr
from simulations.netns.topology import Netns, Topology
from simulations.relay_process import spawn_daemon
from simulations.turn_client import TurnClient

SECRET = "bench-xdp-secret"
HEALTH_PORT = 8080  # inside the relay namespace, so no clash with anything else


def attach_xdp_pass(ns: Netns, dev: str) -> Any:
    """An XDP_PASS program on ``dev`` in ``ns``, native mode: a veth can only carry XDP_TX in
    native (driver) mode when its peer runs an XDP program too (without one the frames are
    dropped as xdp_tx_errors). Keep the returned bcc object; ``.cleanup()`` releases it, and
    deleting the namespace detaches the program."""
    from firezone_relay.xdp.loader import import_bcc

    bcc = import_bcc()
    prog = bcc.BPF(text=b"int xdp_pass(struct xdp_md *ctx) { return XDP_PASS; }")
    with ns.entered():
        fn = prog.load_func(b"xdp_pass", bcc.BPF.XDP)
        prog.attach_xdp(dev.encode(), fn, bcc.BPF.XDP_FLAGS_DRV_MODE)
    return prog


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all threads), from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def udp_receive_drops(ns: Netns) -> int:
    """UDP datagrams the namespace's sockets dropped for a full receive buffer (/proc/net/snmp)."""
    lines = [
        line.split()
        for line in ns.run("cat", "/proc/net/snmp").splitlines()
        if line.startswith("Udp:")
    ]
    if len(lines) < 2 or "RcvbufErrors" not in lines[0]:
        return 0
    return int(lines[1][lines[0].index("RcvbufErrors")])


# -- the generator ---------------------------------------------------------------------------

GENERATOR = """
import os, socket, sys, time
host, port, sport, seconds, limit, rate, payload = sys.argv[1:8]
family = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(family, socket.SOCK_DGRAM)
s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", int(sport)))
s.connect((host, int(port)))
try:
    os.sched_setaffinity(0, {0})
except OSError:
    pass
msg, send, n, errors = bytes.fromhex(payload), s.send, 0, 0
limit, rate, sleep = int(limit), float(rate), time.sleep
t0 = os.times()
start = time.monotonic(); end = start + float(seconds)
while n < limit:
    now = time.monotonic()
    if now >= end:
        break
    batch = 256 if rate <= 0 else max(0, min(int((now - start) * rate) - n, 256))
    batch = min(batch, limit - n)
    for _ in range(batch):
        try:
            send(msg)
        except OSError:
            errors += 1
    n += batch
    if 0 < rate and batch < 32:
        sleep(0.0002)
elapsed = time.monotonic() - start
t1 = os.times()
print(n - errors, elapsed, (t1.user - t0.user) + (t1.system - t0.system), errors, flush=True)
"""


@dataclass(frozen=True, slots=True)
class Sent:
    packets: int
    seconds: float
    cpu: float  # the generator's own CPU seconds (its softirq work included)
    errors: int

    @property
    def pps(self) -> float:
        return self.packets / self.seconds if self.seconds > 0 else 0.0


def generate(
    ns: Netns, dst: Addr, sport: int, payload: bytes, seconds: float, limit: int, rate: float
) -> Sent:
    """Send ``payload`` from ``ns`` (pinned to CPU0) to ``dst``; ``rate`` 0 means flat out."""
    out = ns.run(
        sys.executable,
        "-c",
        textwrap.dedent(GENERATOR),
        dst[0],
        str(dst[1]),
        str(sport),
        str(seconds),
        str(limit),
        str(rate),
        payload.hex(),
    )
    packets, elapsed, cpu, errors = out.split()
    return Sent(int(packets), float(elapsed), float(cpu), int(errors))


# -- the daemon --------------------------------------------------------------------------------


class RelayDaemon:
    """``firezone-relay`` in the relay namespace, standalone, with a known secret."""

    def __init__(
        self,
        topo: Topology,
        offload: str | None,
        mode: str = "generic",
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.topo = topo
        self.offload = offload
        self._logdir = tempfile.TemporaryDirectory(prefix="bench-xdp-relay-")
        args = [
            "--public-ip4-addr",
            topo.relay4,
            "--listen-port",
            "3478",
            "--lowest-port",
            "49152",
            "--highest-port",
            "49407",
            "--auth-secret",
            SECRET,
            "--allow-private-peers",  # the topology's addresses are private
            "--health-check-addr",
            f"127.0.0.1:{HEALTH_PORT}",
            "--control-endpoint",
            "127.0.0.1:9999",
            "--log-filter",
            "warn",
        ]
        if offload:
            args += ["--ebpf-offloading", offload, "--ebpf-attach-mode", mode, "--ebpf-mandatory"]
        args += extra_args
        log_path = Path(self._logdir.name) / "relay.log"
        popen = functools.partial(topo.popen, topo.rly)
        self.daemon = spawn_daemon(args, log_path, popen=popen)
        self.proc = self.daemon.proc

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 8) -> str:
        return "\n".join(self.daemon.log().strip().splitlines()[-lines:])

    def wait_ready(self, probe: socket.socket, timeout: float = 40.0) -> float:
        """Wait until a STUN Binding from ``probe`` is answered; returns the seconds taken."""
        request = TurnClient("", "").binding()
        probe.settimeout(0.2)
        server = (self.topo.relay4, 3478)

        def answered() -> bool:
            probe.sendto(request, server)
            try:
                probe.recv(2048)
            except TimeoutError:
                return False
            return True

        return self.daemon.wait_ready(answered, timeout, step=0)

    def metrics(self) -> dict[str, float]:
        """The relay's /metrics, flattened to ``name{labels}`` -> value (empty on error)."""
        try:
            s = self.topo.rly.socket(socket.AF_INET, socket.SOCK_STREAM)
            with s:
                s.settimeout(3)
                s.connect(("127.0.0.1", HEALTH_PORT))
                s.sendall(b"GET /metrics HTTP/1.0\r\nHost: relay\r\nConnection: close\r\n\r\n")
                chunks = []
                while chunk := s.recv(65536):
                    chunks.append(chunk)
        except OSError:
            return {}
        body = b"".join(chunks).decode(errors="replace").split("\r\n\r\n", 1)[-1]
        out: dict[str, float] = {}
        for line in body.splitlines():
            m = re.match(r"^([a-zA-Z_:][\w:]*(?:\{[^}]*\})?)\s+(\S+)$", line)
            if m:
                with contextlib.suppress(ValueError):
                    out[m.group(1)] = float(m.group(2))
        return out

    def stop(self) -> None:
        self.daemon.stop(timeout=8)
        self._logdir.cleanup()


@dataclass(frozen=True, slots=True)
class RelayCounters:
    """What the relay itself says it relayed (from /metrics)."""

    userspace: float = 0.0
    xdp: float = 0.0
    xdp_ns_sum: float = 0.0  # the program's own sampled timing
    xdp_ns_count: float = 0.0
    dropped: float = 0.0

    @staticmethod
    def read(relay: RelayDaemon) -> RelayCounters:
        m = relay.metrics()
        return RelayCounters(
            userspace=m.get('relay_packet_size_bytes_count{relay_datapath="userspace"}', 0.0),
            xdp=m.get('relay_packet_size_bytes_count{relay_datapath="xdp"}', 0.0),
            xdp_ns_sum=m.get("relay_xdp_processing_duration_sum", 0.0),
            xdp_ns_count=m.get("relay_xdp_processing_duration_count", 0.0),
            dropped=sum(v for k, v in m.items() if k.startswith("relay_datagrams_dropped_total")),
        )

    def __sub__(self, other: RelayCounters) -> RelayCounters:
        return RelayCounters(
            self.userspace - other.userspace,
            self.xdp - other.xdp,
            self.xdp_ns_sum - other.xdp_ns_sum,
            self.xdp_ns_count - other.xdp_ns_count,
            self.dropped - other.dropped,
        )


# -- the TURN client ---------------------------------------------------------------------------


class TurnError(RuntimeError):
    pass


def _transact(sock: socket.socket, server: Addr, request: bytes, tries: int = 4) -> stun.Message:
    tid = request[8:20]
    for _ in range(tries):
        sock.sendto(request, server)
        deadline = time.monotonic() + 1.0
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data = sock.recv(2048)
            except OSError:
                break
            with contextlib.suppress(stun.ParseError, ValueError):
                msg = stun.parse(data)
                if msg.transaction_id == tid:
                    return msg
    raise TurnError("no response from the relay")


def _check(msg: stun.Message, what: str) -> None:
    if msg.cls != Class.SUCCESS:
        raise TurnError(f"{what} failed: {msg.get(Attr.ERROR_CODE)}")


def allocate_and_bind(sock: socket.socket, server: Addr, channel: int, peer: Addr) -> Addr:
    """Allocate (401, then with credentials) and ChannelBind ``channel`` to ``peer``; returns
    the relayed address."""
    username, password = make_credentials("firezone", SECRET, int(time.time()) + 3600, "bench")
    client = TurnClient(username, password, rng=random.Random(7))
    first = _transact(sock, server, client.allocate())
    client.learn(first)
    if first.cls == Class.SUCCESS:
        raise TurnError("unauthenticated Allocate succeeded")
    response = _transact(sock, server, client.allocate())
    _check(response, "Allocate")
    relayed: Addr = response.get(Attr.XOR_RELAYED_ADDRESS)
    _check(_transact(sock, server, client.channel_bind(channel, peer)), "ChannelBind")
    return relayed
