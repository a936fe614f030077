"""A masquerading-NAT test network built from network namespaces (root only).

::

  cli  c0 192.168.10.2  fd00:10::2 ─ r-cli ┐
                                           │ rtr: forwards, nftables NAT
  gw   g0 192.168.20.2  fd00:20::2 ─ r-gw  ┤   cli -> masquerade (10.99.0.1, fd00:99::1)
                                           │   gw  -> snat to    (10.99.0.2, fd00:99::2)
  rly  p0 10.99.0.10    fd00:99::10 ─ r-pub┘   roaming cli 192.168.10.3 -> 10.99.0.3

The relay sits on the "public" segment 10.99.0.0/24 (fd00:99::/64) with no default route; the
client and the gateway sit behind the router's NAT and cannot reach each other directly (the
forward chain drops it), so everything they exchange goes through the relay. Each NAT is
``cone`` (Linux keeps the source port: endpoint-independent mapping) or ``symmetric``
(``fully-random`` source ports: a new mapping per destination). Loss is an nftables
``numgen random`` drop in the router, per side and direction (this kernel has no netem).

With ``relay_behind_nat`` the relay is deployed as in a cloud behind a 1:1 NAT (and as in
Firezone's docker test topology): it keeps only a private address on its link to the router
(``p0 172.31.0.10 fd00:31::10``, default route via the router), and the router owns the
relay's public addresses 10.99.0.10 / fd00:99::10, DNATs UDP 3478 and the allocation range to
the relay and SNATs the relay's own flows back to the public address. The public address is
not local to the relay, and the router does not hairpin: what the relay sends to its own
public address is dropped and counted (:meth:`Topology.hairpin_drops`), so the relay loop
(both peers allocations on this relay) only works if the relay handles it inside.

Nothing is created in, or connected to, the root namespace, so no packet can leave: every
address here exists only inside these namespaces. Namespaces are named ``<prefix>-<role>``
with a per-process prefix (``fzn<pid>...``); building first purges leftovers of the same prefix
and of any ``fzn<pid>`` whose process is gone (a run that was SIGKILLed), and the topology is
torn down on context exit, at interpreter exit, and on SIGTERM/SIGHUP. Processes
started with :meth:`Topology.popen` are killed by pid before the namespaces go, and get
SIGKILL from the kernel if the starting thread dies (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import re
import signal
import socket
import socket as _socket  # the name ``socket`` is also a method of Netns
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Literal, Protocol

from firezone_relay.xdp.netns import netns as _enter_netns

NatKind = Literal["cone", "symmetric"]
Side = Literal["client", "gateway"]
Direction = Literal["up", "down", "both"]

#: ``fzn<pid><worker>``: unique per process, so concurrent runs (other engineers, CI, xdist
#: workers) never touch each other's namespaces, and leftovers of dead runs are recognisable.
DEFAULT_PREFIX = f"fzn{os.getpid()}{os.environ.get('PYTEST_XDIST_WORKER', 'm')}"
_OURS = re.compile(r"^fzn(\d+)[a-z0-9]*-")

# Addresses (private, namespace-only).
CLIENT4, CLIENT6 = "192.168.10.2", "fd00:10::2"
CLIENT_ROAM4 = "192.168.10.3"
GATEWAY4, GATEWAY6 = "192.168.20.2", "fd00:20::2"
RELAY4, RELAY6 = "10.99.0.10", "fd00:99::10"
CLIENT_PUBLIC4, CLIENT_PUBLIC6 = "10.99.0.1", "fd00:99::1"
GATEWAY_PUBLIC4, GATEWAY_PUBLIC6 = "10.99.0.2", "fd00:99::2"
CLIENT_ROAM_PUBLIC4 = "10.99.0.3"
# relay_behind_nat: the relay's private link (the router owns RELAY4 / RELAY6)
RELAY_PRIVATE4, RELAY_PRIVATE6 = "172.31.0.10", "fd00:31::10"
RELAY_LINK_ROUTER4, RELAY_LINK_ROUTER6 = "172.31.0.1", "fd00:31::1"
#: the relay daemon's default allocation range (``--lowest-port`` / ``--highest-port``)
RELAY_PORTS = (49152, 65535)
RELAY_LISTEN_PORT = 3478

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:  # runs in the child between fork and exec
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def run(args: Sequence[str], *, input: str | None = None, check: bool = True) -> str:
    """Run a command (a list, never a shell); RuntimeError with its stderr if it fails."""
    res = subprocess.run(list(args), capture_output=True, text=True, input=input, timeout=30)
    if check and res.returncode != 0:
        detail = res.stderr.strip() or res.stdout.strip()
        raise RuntimeError(f"{' '.join(args)} failed ({res.returncode}): {detail}")
    return res.stdout


def list_netns() -> list[str]:
    out = run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


class _Sysctl(Protocol):
    def sysctl(self, ns: str, key: str, value: object) -> None: ...


def reserve_allocation_ports(topology: _Sysctl, ns: str) -> None:
    """What the README asks of a relay's host: keep the kernel's ephemeral ports out of the
    allocation range (per namespace), so no local socket takes a port the relay hands out and
    the relay has nothing to warn about."""
    topology.sysctl(ns, "net.ipv4.ip_local_reserved_ports", "49152-65535")


def delete_netns(name: str) -> None:
    """Kill what runs inside ``name`` (by pid) and delete it; errors ignored."""
    for pid in run(["ip", "netns", "pids", name], check=False).split():
        with contextlib.suppress(ProcessLookupError, ValueError, PermissionError):
            os.kill(int(pid), signal.SIGKILL)
    run(["ip", "netns", "del", name], check=False)


def purge(prefix: str) -> None:
    """Delete every namespace named ``<prefix>-*`` after killing what runs in it (by pid)."""
    for name in list_netns():
        if name.startswith(prefix + "-"):
            delete_netns(name)


def purge_stale() -> None:
    """Delete namespaces that processes which no longer exist left behind (a SIGKILLed run)."""
    for name in list_netns():
        m = _OURS.match(name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            purge(name.rsplit("-", 1)[0])


class Netns(str):
    """A namespace by name (what ``ip netns`` takes, so it goes wherever a name does), with
    the means to run commands and open sockets inside it."""

    __slots__ = ()

    @classmethod
    def create(cls, name: str) -> Netns:
        """Add the namespace, loopback up, and quiet: no router solicitations, RA
        autoconfiguration or DAD on links created inside, so only a test's own packets are on
        the wire. Delete it with :meth:`delete`."""
        ns = cls(name)
        run(["ip", "netns", "add", name])
        ns.ip("link", "set", "lo", "up")
        ns.run(
            "sysctl",
            "-qw",
            "net.ipv6.conf.default.router_solicitations=0",
            "net.ipv6.conf.default.accept_ra=0",
            "net.ipv6.conf.default.accept_dad=0",
        )
        return ns

    @property
    def name(self) -> str:
        return str(self)

    def ip(self, *args: str, check: bool = True) -> str:
        return run(["ip", "-n", self, *args], check=check)

    def run(self, *args: str, check: bool = True, input: str | None = None) -> str:
        return run(["ip", "netns", "exec", self, *args], check=check, input=input)

    def sysctl(self, key: str, value: object) -> None:
        self.run("sysctl", "-qw", f"{key}={value}")

    def popen(self, *args: str, **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a process inside (argument list, never a shell); it dies with the namespace
        (killed by pid on delete), and with the calling thread (``PR_SET_PDEATHSIG``)."""
        proc: subprocess.Popen[Any] = subprocess.Popen(
            ["ip", "netns", "exec", self, *args], preexec_fn=_die_with_parent, **kwargs
        )
        return proc

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Run the block with the calling thread inside (sockets created there stay)."""
        with _enter_netns(self):
            yield

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_DGRAM) -> _socket.socket:
        """A socket living in this namespace (it stays there after we switch back); IPv6
        sockets are IPv6-only."""
        with self.entered():
            s = socket.socket(family, type)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        return s

    def udp(self, host: str, port: int, timeout: float = 2.0) -> _socket.socket:
        """A UDP socket bound to ``host:port`` in this namespace."""
        s = self.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        s.bind((host, port))
        s.settimeout(timeout)
        return s

    def link_stats(self, dev: str) -> dict[str, int]:
        """The kernel's counters of ``dev`` (``rx_packets``, ...)."""
        base = f"/sys/class/net/{dev}/statistics"
        out = self.run("sh", "-c", f"cd {base} && grep . *")
        return {k: int(v) for k, v in (line.split(":", 1) for line in out.split())}

    def delete(self) -> None:
        delete_netns(self)


@dataclass(frozen=True)
class Loss:
    """Drop ``percent`` of one side's packets in the router, in one or both directions."""

    side: Side
    percent: int
    direction: Direction = "both"


@dataclass(frozen=True)
class TopologyOptions:
    client_nat: NatKind = "cone"
    gateway_nat: NatKind = "cone"
    loss: tuple[Loss, ...] = ()
    ipv6: bool = True
    #: UDP checksum offload on the endpoint veths; off, so that frames carry full checksums
    #: when the relay rewrites them in XDP (xdp-on-this-machine.md §5.2).
    tx_checksum_offload: bool = False
    #: the relay behind a 1:1 NAT in the router (see the module docstring)
    relay_behind_nat: bool = False
    #: allocation range the router forwards to the relay when it is behind NAT
    relay_ports: tuple[int, int] = RELAY_PORTS


_LIVE: set[Topology] = set()
_LIVE_LOCK = threading.Lock()
_HOOKED = False


def _cleanup_all() -> None:
    with _LIVE_LOCK:
        live = list(_LIVE)
    for topo in live:
        with contextlib.suppress(Exception):
            topo.destroy()


def _on_signal(signum: int, frame: FrameType | None, previous: Any) -> None:
    _cleanup_all()
    if callable(previous):
        previous(signum, frame)
    else:
        signal.signal(signum, signal.SIG_DFL if previous is None else previous)
        os.kill(os.getpid(), signum)


def _install_hooks() -> None:
    """atexit + SIGTERM/SIGHUP handlers (once, main thread only); SIGINT raises
    KeyboardInterrupt, which the context manager already handles."""
    global _HOOKED
    if _HOOKED:
        return
    _HOOKED = True
    atexit.register(_cleanup_all)
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        previous = signal.getsignal(sig)

        def handler(signum: int, frame: FrameType | None, previous: Any = previous) -> None:
            _on_signal(signum, frame, previous)

        signal.signal(sig, handler)


@dataclass(eq=False)
class Topology:
    """The four-namespace NAT network; use as a context manager (``with Topology() as t``)."""

    options: TopologyOptions = field(default_factory=TopologyOptions)
    prefix: str = DEFAULT_PREFIX
    relay_dev: str = "p0"
    client_dev: str = "c0"
    gateway_dev: str = "g0"
    _procs: list[subprocess.Popen[Any]] = field(default_factory=list, repr=False)
    _built: bool = False

    # -- names -----------------------------------------------------------------------------

    @property
    def cli(self) -> Netns:
        return Netns(f"{self.prefix}-cli")

    @property
    def gw(self) -> Netns:
        return Netns(f"{self.prefix}-gw")

    @property
    def rly(self) -> Netns:
        return Netns(f"{self.prefix}-rly")

    @property
    def rtr(self) -> Netns:
        return Netns(f"{self.prefix}-rtr")

    @property
    def namespaces(self) -> list[Netns]:
        return [self.cli, self.gw, self.rly, self.rtr]

    relay4 = RELAY4
    relay6 = RELAY6
    client4 = CLIENT4
    client6 = CLIENT6
    gateway4 = GATEWAY4
    gateway6 = GATEWAY6
    client_public4 = CLIENT_PUBLIC4
    gateway_public4 = GATEWAY_PUBLIC4
    client_public6 = CLIENT_PUBLIC6
    gateway_public6 = GATEWAY_PUBLIC6
    client_roam4 = CLIENT_ROAM4
    client_roam_public4 = CLIENT_ROAM_PUBLIC4

    @property
    def relay_local4(self) -> str:
        """The relay's own IPv4 address on ``p0``: the public one, or the private one when
        the relay is behind NAT (``relay4`` stays the public address clients talk to)."""
        return RELAY_PRIVATE4 if self.options.relay_behind_nat else RELAY4

    @property
    def relay_local6(self) -> str:
        return RELAY_PRIVATE6 if self.options.relay_behind_nat else RELAY6

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> Topology:
        self.build()
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def build(self) -> None:
        """Purge leftovers, then build step by step; on any failure purge and re-raise."""
        _install_hooks()
        purge_stale()
        purge(self.prefix)
        with _LIVE_LOCK:
            _LIVE.add(self)
        try:
            self._build()
        except BaseException:
            self.destroy()
            raise
        self._built = True

    def destroy(self) -> None:
        """Kill our processes by pid, then delete the namespaces (which removes veths, routes,
        nft tables, conntrack state and XDP programs). Safe to call more than once."""
        procs, self._procs = self._procs, []
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
        deadline = time.monotonic() + 2.0
        for proc in procs:
            try:
                proc.wait(max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(2.0)
        purge(self.prefix)
        with _LIVE_LOCK:
            _LIVE.discard(self)
        self._built = False

    def _build(self) -> None:
        o = self.options
        for ns in self.namespaces:
            run(["ip", "netns", "add", ns])
            self.ip(ns, "link", "set", "lo", "up")
            reserve_allocation_ports(self, ns)
            if not o.ipv6:
                # quiet: no IPv6 at all on the links created next (``all`` misses new links)
                self.sysctl(ns, "net.ipv6.conf.all.disable_ipv6", 1)
                self.sysctl(ns, "net.ipv6.conf.default.disable_ipv6", 1)
            else:
                # no router solicitations, RA autoconfiguration or DAD delays: addresses are
                # usable at once and nothing but the test's own traffic is on the wire
                self.sysctl(ns, "net.ipv6.conf.all.accept_dad", 0)
                self.sysctl(ns, "net.ipv6.conf.default.accept_dad", 0)
                self.sysctl(ns, "net.ipv6.conf.default.router_solicitations", 0)
                self.sysctl(ns, "net.ipv6.conf.default.accept_ra", 0)
        links = (
            (self.cli, self.client_dev, "r-cli"),
            (self.gw, self.gateway_dev, "r-gw"),
            (self.rly, self.relay_dev, "r-pub"),
        )
        for ns, dev, peer in links:
            run(
                [
                    "ip",
                    "link",
                    "add",
                    dev,
                    "netns",
                    ns,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    peer,
                    "netns",
                    self.rtr,
                ]
            )
        plan: list[tuple[Netns, str, list[str], list[str]]] = [
            (self.cli, self.client_dev, [f"{CLIENT4}/24"], [f"{CLIENT6}/64"]),
            (self.gw, self.gateway_dev, [f"{GATEWAY4}/24"], [f"{GATEWAY6}/64"]),
            (self.rly, self.relay_dev, [f"{self.relay_local4}/24"], [f"{self.relay_local6}/64"]),
            (self.rtr, "r-cli", ["192.168.10.1/24"], ["fd00:10::1/64"]),
            (self.rtr, "r-gw", ["192.168.20.1/24"], ["fd00:20::1/64"]),
            (
                self.rtr,
                "r-pub",
                [f"{CLIENT_PUBLIC4}/24", f"{GATEWAY_PUBLIC4}/24", f"{CLIENT_ROAM_PUBLIC4}/24"],
                [f"{CLIENT_PUBLIC6}/64", f"{GATEWAY_PUBLIC6}/64"],
            ),
        ]
        if o.relay_behind_nat:  # the router holds the relay's link and its public addresses
            plan.append(
                (
                    self.rtr,
                    "r-pub",
                    [f"{RELAY_LINK_ROUTER4}/24", f"{RELAY4}/24"],
                    [f"{RELAY_LINK_ROUTER6}/64", f"{RELAY6}/64"],
                )
            )
        for ns, dev, v4s, v6s in plan:
            for addr in v4s:
                self.ip(ns, "addr", "add", addr, "dev", dev)
            if o.ipv6:
                for addr in v6s:
                    self.ip(ns, "-6", "addr", "add", addr, "dev", dev, "nodad")
            self.ip(ns, "link", "set", dev, "up")
        self.ip(self.cli, "route", "add", "default", "via", "192.168.10.1")
        self.ip(self.gw, "route", "add", "default", "via", "192.168.20.1")
        if o.relay_behind_nat:
            self.ip(self.rly, "route", "add", "default", "via", RELAY_LINK_ROUTER4)
        if o.ipv6:
            self.ip(self.cli, "-6", "route", "add", "default", "via", "fd00:10::1")
            self.ip(self.gw, "-6", "route", "add", "default", "via", "fd00:20::1")
            if o.relay_behind_nat:
                self.ip(self.rly, "-6", "route", "add", "default", "via", RELAY_LINK_ROUTER6)
        self.sysctl(self.rtr, "net.ipv4.ip_forward", 1)
        if o.ipv6:
            self.sysctl(self.rtr, "net.ipv6.conf.all.forwarding", 1)
        self.exec(self.rtr, "nft", "-f", "-", input=self.ruleset())
        self._wait_links_up()
        if not o.tx_checksum_offload:
            for ns, dev in (
                (self.cli, self.client_dev),
                (self.gw, self.gateway_dev),
                (self.rly, self.relay_dev),
            ):
                self.exec(ns, "ethtool", "-K", dev, "tx", "off")

    def _wait_links_up(self, timeout: float = 5.0) -> None:
        """Link state reaches IPv6 routing through linkwatch, up to a second after ``set up``;
        until then IPv6 packets meet "no route". Wait for every veth to be operationally up."""
        ends = [
            (self.cli, self.client_dev),
            (self.gw, self.gateway_dev),
            (self.rly, self.relay_dev),
            (self.rtr, "r-cli"),
            (self.rtr, "r-gw"),
            (self.rtr, "r-pub"),
        ]
        deadline = time.monotonic() + timeout
        while True:
            down = [
                f"{ns}/{dev}"
                for ns, dev in ends
                if "state UP" not in self.ip(ns, "-o", "link", "show", dev)
            ]
            if not down:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"links not up after {timeout} s: {', '.join(down)}")
            time.sleep(0.05)

    # -- the router's ruleset --------------------------------------------------------------

    def ruleset(self) -> str:
        """The router's nftables rules (NAT and loss) for the current options."""
        o = self.options

        def nat(kind: NatKind, action: str) -> str:
            return f"{action} fully-random" if kind == "symmetric" else action

        cli_nat = nat(o.client_nat, "masquerade")
        if o.relay_behind_nat:
            # masquerade would take r-pub's address on the relay's private link
            cli_nat = nat(o.client_nat, f"snat ip to {CLIENT_PUBLIC4}")
        gw_nat4 = nat(o.gateway_nat, f"snat ip to {GATEWAY_PUBLIC4}")
        lines = ["table inet fznat {"]
        if o.relay_behind_nat:
            lines += self._relay_nat_rules()
        lines += [
            "  chain postrouting {",
            "    type nat hook postrouting priority srcnat; policy accept;",
            # the roaming client address leaves through another public address
            f'    oifname "r-pub" ip saddr {CLIENT_ROAM4} '
            + nat(o.client_nat, f"snat ip to {CLIENT_ROAM_PUBLIC4}"),
            f'    oifname "r-pub" ip saddr 192.168.10.0/24 {cli_nat}',
            f'    oifname "r-pub" ip saddr 192.168.20.0/24 {gw_nat4}',
        ]
        if o.ipv6:
            gw_nat6 = nat(o.gateway_nat, f"snat ip6 to {GATEWAY_PUBLIC6}")
            lines += [
                # IPv6 masquerade would pick either of r-pub's addresses; name the client's
                '    oifname "r-pub" ip6 saddr fd00:10::/64 '
                + nat(o.client_nat, f"snat ip6 to {CLIENT_PUBLIC6}"),
                f'    oifname "r-pub" ip6 saddr fd00:20::/64 {gw_nat6}',
            ]
        if o.relay_behind_nat:
            # the relay's own flows (allocation sockets to peers) leave from its public
            # address, keeping the port; replies to DNATed flows are conntrack's business
            lines.append(f"    ip saddr {RELAY_PRIVATE4} snat ip to {RELAY4}")
            if o.ipv6:
                lines.append(f"    ip6 saddr {RELAY_PRIVATE6} snat ip6 to {RELAY6}")
        lines += [
            "  }",
            "  chain forward {",
            "    type filter hook forward priority filter; policy accept;",
            '    iifname "r-cli" oifname "r-gw" drop',
            '    iifname "r-gw" oifname "r-cli" drop',
            # nothing from the public side opens a connection inward (a real NAT)
            '    iifname "r-pub" ct state new drop',
        ]
        for loss in o.loss:
            dev = "r-cli" if loss.side == "client" else "r-gw"
            if loss.percent <= 0:
                continue
            drop = "counter drop"
            if loss.percent < 100:
                drop = f"numgen random mod 100 < {loss.percent} {drop}"
            if loss.direction in ("up", "both"):
                lines.append(f'    iifname "{dev}" {drop}')
            if loss.direction in ("down", "both"):
                lines.append(f'    oifname "{dev}" {drop}')
        lines += ["  }", "}", ""]
        return "\n".join(lines)

    def _relay_nat_rules(self) -> list[str]:
        """The 1:1 NAT in front of a relay behind NAT: no hairpin, then DNAT of the TURN
        ports to the relay's private address."""
        o = self.options
        low, high = o.relay_ports
        ports = f"{{ {RELAY_LISTEN_PORT}, {low}-{high} }}"
        lines = [
            "  counter relay_hairpin { }",
            "  chain relay_hairpin {",
            # before conntrack and DNAT: the relay sending to its own public address
            "    type filter hook prerouting priority raw; policy accept;",
            f'    iifname "r-pub" ip daddr {RELAY4} counter name "relay_hairpin" drop',
        ]
        if o.ipv6:
            lines.append(
                f'    iifname "r-pub" ip6 daddr {RELAY6} counter name "relay_hairpin" drop'
            )
        lines += [
            "  }",
            "  chain prerouting {",
            "    type nat hook prerouting priority dstnat; policy accept;",
            f"    ip daddr {RELAY4} udp dport {ports} dnat ip to {RELAY_PRIVATE4}",
        ]
        if o.ipv6:
            lines.append(f"    ip6 daddr {RELAY6} udp dport {ports} dnat ip6 to {RELAY_PRIVATE6}")
        lines.append("  }")
        return lines

    def hairpin_drops(self) -> int:
        """Packets the relay (behind NAT) sent to its own public address, which the router
        dropped; 0 when the relay is not behind NAT."""
        if not self.options.relay_behind_nat:
            return 0
        out = self.exec(self.rtr, "nft", "list", "counter", "inet", "fznat", "relay_hairpin")
        m = re.search(r"packets (\d+)", out)
        return int(m.group(1)) if m else 0

    def set_options(self, options: TopologyOptions) -> None:
        """Swap the router's ruleset at run time (e.g. start or stop losing packets).
        Existing NAT mappings (conntrack) survive; only new flows see a new NAT kind."""
        self.options = options
        self.exec(self.rtr, "nft", "-f", "-", input="flush ruleset\n" + self.ruleset())

    def move_client(self) -> str:
        """The client "changes networks": its address becomes 192.168.10.3, which the router
        maps to another public address. Returns the new local address to bind to."""
        # old address first (deleting a primary also deletes its secondaries), then the new
        # one; the default route went with the old address
        self.ip(self.cli, "addr", "del", f"{CLIENT4}/24", "dev", self.client_dev)
        self.ip(self.cli, "addr", "add", f"{CLIENT_ROAM4}/24", "dev", self.client_dev)
        self.ip(self.cli, "route", "replace", "default", "via", "192.168.10.1")
        return CLIENT_ROAM4

    # -- running things inside -------------------------------------------------------------

    def ip(self, ns: str, *args: str) -> str:
        return run(["ip", "-n", ns, *args])

    def sysctl(self, ns: str, key: str, value: object) -> None:
        self.exec(ns, "sysctl", "-qw", f"{key}={value}")

    def exec(self, ns: str, *args: str, input: str | None = None, check: bool = True) -> str:
        return run(["ip", "netns", "exec", ns, *args], input=input, check=check)

    def popen(self, ns: str, args: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``args`` inside ``ns``; it is killed (by pid) when the topology goes, and by
        the kernel if the calling thread dies first."""
        proc: subprocess.Popen[Any] = subprocess.Popen(
            ["ip", "netns", "exec", ns, *args], preexec_fn=_die_with_parent, **kwargs
        )
        self._procs.append(proc)
        return proc

    @contextlib.contextmanager
    def entered(self, ns: str) -> Iterator[None]:
        """Run the block with the calling thread inside ``ns`` (sockets created there stay)."""
        with _enter_netns(ns):
            yield


# -- Firezone's lab: two masquerading routers, two relays, one "internet" -------------------

#: the lab's internet: TEST-NET-3, as in Firezone's docker-compose lab
LAB_INTERNET = "203.0.113"


@dataclass(eq=False)
class LabTopology(Topology):
    """Firezone's compose lab, IPv4::

      lcli c0 172.30.1.2 ─ lrc (masquerade) 203.0.113.10 ┐
      lgw  g0 172.30.2.2 ─ lrg (masquerade) 203.0.113.20 ┤ lnet: the internet, a router
      lra  p0 203.0.113.101  relay A ────────────────────┤
      lrb  p0 203.0.113.102  relay B ────────────────────┘

    The client and the gateway each sit behind their own router, which masquerades
    (nftables ``masquerade``) and admits nothing new from outside. The routers and both relays
    hold addresses of ``internet``.0/24 and reach each other through ``lnet``, which routes
    between point-to-point links (each host sees one next hop, so XDP's MAC swap is right).
    ``internet`` is 203.0.113 (documentation range) by default; a private prefix models relays
    sharing a VPC with gateways. Namespace lifecycle as :class:`Topology` (same prefix rules).
    """

    internet: str = LAB_INTERNET
    prefix: str = DEFAULT_PREFIX + "l"

    @property
    def cli(self) -> Netns:
        return Netns(f"{self.prefix}-lcli")

    @property
    def gw(self) -> Netns:
        return Netns(f"{self.prefix}-lgw")

    @property
    def net(self) -> Netns:
        return Netns(f"{self.prefix}-lnet")

    @property
    def relay_a(self) -> Netns:
        return Netns(f"{self.prefix}-lra")

    @property
    def relay_b(self) -> Netns:
        return Netns(f"{self.prefix}-lrb")

    @property
    def rly(self) -> Netns:
        return self.relay_a

    @property
    def rtr(self) -> Netns:
        return Netns(f"{self.prefix}-lrc")

    @property
    def rtr_gw(self) -> Netns:
        return Netns(f"{self.prefix}-lrg")

    @property
    def namespaces(self) -> list[Netns]:
        return [self.cli, self.gw, self.rtr, self.rtr_gw, self.relay_a, self.relay_b, self.net]

    def public(self, host: int) -> str:
        return f"{self.internet}.{host}"

    @property
    def relay_a4(self) -> str:
        return self.public(101)

    @property
    def relay_b4(self) -> str:
        return self.public(102)

    @property
    def client_public4(self) -> str:  # type: ignore[override]
        return self.public(10)

    @property
    def gateway_public4(self) -> str:  # type: ignore[override]
        return self.public(20)

    client4 = "172.30.1.2"
    gateway4 = "172.30.2.2"

    def _build(self) -> None:
        for ns in self.namespaces:
            run(["ip", "netns", "add", ns])
            self.ip(ns, "link", "set", "lo", "up")
            reserve_allocation_ports(self, ns)
            if ns in (self.cli, self.gw):
                # IPv6 only inside (::1 for the web server, the tunnel's addresses); quiet
                self.sysctl(ns, "net.ipv6.conf.all.accept_dad", 0)
                self.sysctl(ns, "net.ipv6.conf.default.accept_dad", 0)
                self.sysctl(ns, "net.ipv6.conf.default.router_solicitations", 0)
            else:
                self.sysctl(ns, "net.ipv6.conf.all.disable_ipv6", 1)
        # (namespace, device, address, the internet's side)
        uplinks = [
            (self.rtr, "wan", self.client_public4, "n-rc"),
            (self.rtr_gw, "wan", self.gateway_public4, "n-rg"),
            (self.relay_a, self.relay_dev, self.relay_a4, "n-ra"),
            (self.relay_b, self.relay_dev, self.relay_b4, "n-rb"),
        ]
        for ns, dev, addr, peer in uplinks:
            self._veth(ns, dev, self.net, peer)
            self.ip(ns, "addr", "add", f"{addr}/32", "peer", self.public(1), "dev", dev)
            self.ip(self.net, "addr", "add", f"{self.public(1)}/32", "peer", addr, "dev", peer)
            self.ip(ns, "link", "set", dev, "up")
            self.ip(self.net, "link", "set", peer, "up")
            self.ip(ns, "route", "add", "default", "via", self.public(1), "dev", dev)
        lans = [
            (self.cli, self.client_dev, self.client4, self.rtr, "172.30.1.1"),
            (self.gw, self.gateway_dev, self.gateway4, self.rtr_gw, "172.30.2.1"),
        ]
        for ns, dev, addr, router, router_addr in lans:
            self._veth(ns, dev, router, "lan")
            self.ip(ns, "addr", "add", f"{addr}/24", "dev", dev)
            self.ip(router, "addr", "add", f"{router_addr}/24", "dev", "lan")
            self.ip(ns, "link", "set", dev, "up")
            self.ip(router, "link", "set", "lan", "up")
            self.ip(ns, "route", "add", "default", "via", router_addr)
        for ns in (self.rtr, self.rtr_gw, self.net):
            self.sysctl(ns, "net.ipv4.ip_forward", 1)
        for router in (self.rtr, self.rtr_gw):
            self.exec(router, "nft", "-f", "-", input=self.lab_ruleset())
        if not self.options.tx_checksum_offload:
            for ns, dev in (
                (self.cli, self.client_dev),
                (self.gw, self.gateway_dev),
                (self.relay_a, self.relay_dev),
                (self.relay_b, self.relay_dev),
            ):
                self.exec(ns, "ethtool", "-K", dev, "tx", "off")

    def _veth(self, ns: str, dev: str, other_ns: str, other_dev: str) -> None:
        run(
            [
                "ip",
                "link",
                "add",
                dev,
                "netns",
                ns,
                "type",
                "veth",
                "peer",
                "name",
                other_dev,
                "netns",
                other_ns,
            ]
        )

    def lab_ruleset(self) -> str:
        """A home router: masquerade on the way out, nothing new admitted from outside."""
        return "\n".join(
            [
                "table inet fzlab {",
                "  chain postrouting {",
                "    type nat hook postrouting priority srcnat; policy accept;",
                '    oifname "wan" masquerade',
                "  }",
                "  chain forward {",
                "    type filter hook forward priority filter; policy accept;",
                '    iifname "wan" ct state new drop',
                "  }",
                "}",
                "",
            ]
        )
