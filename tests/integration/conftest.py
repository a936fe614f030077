"""Network-namespace fixtures for integration tests (root only).

Rules that keep these from leaking (see ../shared/reference/xdp-on-this-machine.md §8):

* every namespace is named ``xt<pid><worker>-<role><n>``: unique per test process, so parallel
  runs (other engineers, xdist workers) never touch each other's namespaces;
* at session start, namespaces left by a *dead* process (SIGKILLed run) are purged;
* topologies are built step by step with ``check=True`` and purged on any exception;
* teardown deletes the namespaces, which removes veths, routes, nft tables and any attached
  XDP program; processes started inside are killed by pid (``ip netns pids``).

Nothing is created in the root namespace and nothing is connected to it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import socket
import socket as _socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from xdp import netns as _netns

WORKER = os.environ.get("PYTEST_XDIST_WORKER", "m")
PREFIX = f"xt{os.getpid()}{WORKER}"
_STALE = re.compile(r"^xt(\d+)[a-z0-9]*-")
_counter = itertools.count(1)


def _run(*args: str, check: bool = True, input: str | None = None) -> str:
    res = subprocess.run(list(args), capture_output=True, text=True, input=input, timeout=30)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {res.stderr.strip() or res.stdout.strip()}")
    return res.stdout


def list_netns() -> list[str]:
    out = _run("ip", "netns", "list", check=False)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def delete_netns(name: str) -> None:
    """Kill what runs inside ``name`` (by pid) and delete it; errors ignored."""
    for pid in _run("ip", "netns", "pids", name, check=False).split():
        with contextlib.suppress(ProcessLookupError, ValueError, PermissionError):
            os.kill(int(pid), signal.SIGKILL)
    _run("ip", "netns", "del", name, check=False)


def purge(prefix: str = PREFIX) -> None:
    for name in list_netns():
        if name.startswith(prefix + "-"):
            delete_netns(name)


def purge_stale() -> None:
    """Delete namespaces of test processes that no longer exist."""
    for name in list_netns():
        m = _STALE.match(name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            delete_netns(name)


def pytest_sessionstart(session: pytest.Session) -> None:
    if os.geteuid() == 0 and shutil.which("ip"):
        purge_stale()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.geteuid() == 0 and shutil.which("ip"):
        purge()


class Netns:
    """A network namespace this test process owns: run commands in it, open sockets in it."""

    def __init__(self, role: str) -> None:
        self.name = f"{PREFIX}-{role}{next(_counter)}"
        _run("ip", "netns", "add", self.name)
        self.ip("link", "set", "lo", "up")
        # Quiet links: no router solicitations, RA autoconfiguration or DAD on what is created
        # in here, so only a test's own packets reach the programs and sockets under test.
        self.run(
            "sysctl",
            "-qw",
            "net.ipv6.conf.default.router_solicitations=0",
            "net.ipv6.conf.default.accept_ra=0",
            "net.ipv6.conf.default.accept_dad=0",
        )

    def __repr__(self) -> str:
        return f"Netns({self.name!r})"

    def ip(self, *args: str, check: bool = True) -> str:
        return _run("ip", "-n", self.name, *args, check=check)

    def run(self, *args: str, check: bool = True, input: str | None = None) -> str:
        return _run("ip", "netns", "exec", self.name, *args, check=check, input=input)

    def sysctl(self, key: str, value: str | int) -> None:
        self.run("sysctl", "-qw", f"{key}={value}")

    def popen(self, *args: str, **kwargs: object) -> subprocess.Popen[bytes]:
        """Start a process inside (argument list, never a shell); it dies with the netns."""
        return subprocess.Popen(["ip", "netns", "exec", self.name, *args], **kwargs)  # type: ignore[call-overload,no-any-return]

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Switch the calling thread into this namespace for the block."""
        with _netns.netns(self.name):
            yield

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_DGRAM) -> socket.socket:
        """A socket living in this namespace (it stays there after we switch back)."""
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
        base = f"/sys/class/net/{dev}/statistics"
        out = self.run("sh", "-c", f"cd {base} && grep . *")
        return {k: int(v) for k, v in (line.split(":", 1) for line in out.split())}

    def delete(self) -> None:
        delete_netns(self.name)


def require_root_tools(*tools: str) -> None:
    """Skip (with the reason) unless we are root and have the tools and bcc."""
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, XDP)")
    missing = [t for t in ("ip", *tools) if shutil.which(t) is None]
    if missing:
        pytest.skip(f"missing tools: {', '.join(missing)} (see .ci/install-bcc.sh)")


def require_bcc() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (loading BPF programs)")
    from xdp.loader import XdpUnavailable, import_bcc

    try:
        import_bcc()
    except XdpUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture
def make_netns() -> Iterator[type[Netns]]:
    """Factory for namespaces that are deleted after the test, whatever happens."""
    require_root_tools()
    created: list[Netns] = []

    class _Owned(Netns):
        def __init__(self, role: str) -> None:
            super().__init__(role)
            created.append(self)

    try:
        yield _Owned
    finally:
        for ns in created:
            ns.delete()


# -- the client / gateway / relay / router topology ------------------------------------------

NFT_RULES = """
table ip xtnat {
  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    oifname "r-pub" ip saddr 192.168.10.0/24 masquerade
    oifname "r-pub" ip saddr 192.168.20.0/24 snat to 172.31.113.2
  }
}
table inet xtfilter {
  chain forward {
    type filter hook forward priority filter; policy accept;
    iifname "r-cli" oifname "r-gw" drop
    iifname "r-gw" oifname "r-cli" drop
  }
}
"""


@dataclass
class Topology:
    """Client and gateway behind a NAT router, relay on the router's public segment.

    ::

      cli  c0 192.168.10.2 fd00:10::2 ─ r-cli ┐
                                              ├ rtr: IPv4 NAT (cli -> 172.31.113.1,
      gw   g0 192.168.20.2 fd00:20::2 ─ r-gw  ┤       gw -> 172.31.113.2), IPv6 routed
      rly  p0 172.31.113.10 fd00:113::10 ─ r-pub ┘

    cli and gw cannot reach each other directly (forward drop); the relay can reach only the
    public segment (IPv4) and the two IPv6 prefixes through the router. UDP checksum offload
    is off on c0 and g0 so forwarded frames carry full checksums (§5.2 of the recipe). These
    addresses are private: a relay under test needs ``allow_private_peers``.
    """

    cli: Netns
    gw: Netns
    rly: Netns
    rtr: Netns
    relay4: str = "172.31.113.10"
    relay6: str = "fd00:113::10"
    cli_public4: str = "172.31.113.1"
    gw_public4: str = "172.31.113.2"
    cli6: str = "fd00:10::2"
    gw6: str = "fd00:20::2"
    relay_dev: str = "p0"

    def all(self) -> list[Netns]:
        return [self.cli, self.gw, self.rly, self.rtr]


def build_topology(ns_factory: type[Netns]) -> Topology:
    t = Topology(
        cli=ns_factory("cli"), gw=ns_factory("gw"), rly=ns_factory("rly"), rtr=ns_factory("rtr")
    )
    rtr = t.rtr.name
    for ns, dev, peer in ((t.cli, "c0", "r-cli"), (t.gw, "g0", "r-gw"), (t.rly, "p0", "r-pub")):
        _run(
            "ip",
            "link",
            "add",
            dev,
            "netns",
            ns.name,
            "type",
            "veth",
            "peer",
            "name",
            peer,
            "netns",
            rtr,
        )
    plan = [
        (t.cli, "c0", ["192.168.10.2/24"], ["fd00:10::2/64"]),
        (t.gw, "g0", ["192.168.20.2/24"], ["fd00:20::2/64"]),
        (t.rly, "p0", ["172.31.113.10/24"], ["fd00:113::10/64"]),
        (t.rtr, "r-cli", ["192.168.10.1/24"], ["fd00:10::1/64"]),
        (t.rtr, "r-gw", ["192.168.20.1/24"], ["fd00:20::1/64"]),
        (t.rtr, "r-pub", ["172.31.113.1/24", "172.31.113.2/24"], ["fd00:113::1/64"]),
    ]
    for ns, dev, v4s, v6s in plan:
        for a in v4s:
            ns.ip("addr", "add", a, "dev", dev)
        for a in v6s:
            ns.ip("-6", "addr", "add", a, "dev", dev, "nodad")
        ns.ip("link", "set", dev, "up")
    t.cli.ip("route", "add", "default", "via", "192.168.10.1")
    t.cli.ip("-6", "route", "add", "default", "via", "fd00:10::1")
    t.gw.ip("route", "add", "default", "via", "192.168.20.1")
    t.gw.ip("-6", "route", "add", "default", "via", "fd00:20::1")
    t.rly.ip("-6", "route", "add", "fd00::/16", "via", "fd00:113::1")
    t.rtr.sysctl("net.ipv4.ip_forward", 1)
    t.rtr.sysctl("net.ipv6.conf.all.forwarding", 1)
    t.rtr.run("nft", "-f", "-", input=NFT_RULES)
    t.cli.run("ethtool", "-K", "c0", "tx", "off")
    t.gw.run("ethtool", "-K", "g0", "tx", "off")
    return t


@pytest.fixture
def topology(make_netns: type[Netns]) -> Topology:
    """A fresh four-namespace topology per test (about 0.2 s), deleted afterwards."""
    require_root_tools("nft", "ethtool")
    return build_topology(make_netns)
