"""The one way tests, simulations and benchmarks run the relay daemon: ``firezone-relay``
as a subprocess, its output in a log file.

:func:`spawn_daemon` starts any command line, anywhere (a wrapper such as ``prlimit`` or
``taskset``, or inside a network namespace through ``popen``) and returns a :class:`Daemon`
handle (log, readiness wait, stop). :func:`start_local` is the loopback relay of the system
and adversarial tests, on free ports (a :class:`LocalDaemon`: its addresses, endpoints and
credentials). :func:`start` is the full system of the trace simulator and the fuzzer: that
relay, with the test portal when a trace needs portal-minted credentials (else standalone
with ``--auth-secret``); it is asyncio-friendly, as the portal lives on the caller's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from firezone_relay.protocol.auth import make_credentials
from firezone_relay.protocol.stun import long_term_key
from firezone_relay.protocol.types import Addr, Family

ROOT = Path(__file__).resolve().parents[1]
#: Allocation ports of the simulator's relays: below the kernel's ephemeral range
#: (32768-60999), so the replayer's sockets never take a port the relay wants, and away from
#: the 61000+ slices the system tests give their relays (they may run at the same time).
RANGE_LOW, RANGE_HIGH = 20000, 32000
READY_TIMEOUT = 15.0
#: Settings the daemon reads from its environment: a test runner's must not leak into it.
#: (``RELAY_DATAPATH`` does, on purpose: tox runs a system suite with it set to ``python``.)
CONFIG_ENV = (
    "FIREZONE_TOKEN",
    "FIREZONE_API_URL",
    "AUTH_SECRET",
    "RNG_SEED",
    "ALLOWED_PEER_IP",
    "DENIED_PEER_IP",
)


def daemon_env(overrides: Mapping[str, str] | None = None, inherit: bool = True) -> dict[str, str]:
    """The caller's environment without the daemon's settings (or, unless ``inherit``, only
    PATH, HOME and LANG, as in a container), the repository importable, output unbuffered (so
    the log is current), then ``overrides``."""
    if inherit:
        env = {k: v for k, v in os.environ.items() if k not in CONFIG_ENV}
    else:
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(overrides or {})
    return env


@dataclass
class Daemon:
    """A running daemon process and its log."""

    proc: subprocess.Popen[bytes]
    args: list[str]  # the whole command line
    log_path: Path
    #: whether :meth:`stop` had to SIGKILL it (it outlived the signal's timeout)
    killed: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(
        self, ready: Callable[[], object], timeout: float = READY_TIMEOUT, step: float = 0.05
    ) -> float:
        """Poll ``ready()`` until it is true; the seconds it took. Raises RuntimeError, with
        the log, if the daemon exits first or ``timeout`` passes (it is killed then)."""
        start = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"relay exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError):
                if ready():
                    return time.monotonic() - start
            if time.monotonic() - start > timeout:
                self.stop(signal.SIGKILL)
                raise RuntimeError(f"relay not ready after {timeout:g} s:\n{self.log()}")
            time.sleep(step)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 5.0) -> tuple[int, float]:
        """Signal the daemon and wait, SIGKILL past ``timeout``; returns (exit code, seconds it
        took to exit)."""
        start = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.killed = True
            self.proc.kill()
            code = self.proc.wait(5)
        return code, time.monotonic() - start


def spawn_daemon(
    args: Sequence[str],
    log_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    inherit_env: bool = True,
    wrapper: Sequence[str] = (),
    popen: Callable[..., subprocess.Popen[bytes]] = subprocess.Popen,
) -> Daemon:
    """Start ``[*wrapper, python, -m, actors.cli, *args]`` from the repository, output to
    ``log_path``, environment :func:`daemon_env` (``env`` on top). ``popen`` starts it
    elsewhere, e.g. ``functools.partial(topology.popen, topology.rly)`` in a namespace."""
    command = [*wrapper, sys.executable, "-m", "firezone_relay.actors.cli", *args]
    full_env = daemon_env(env, inherit_env)
    with open(log_path, "wb") as log:
        proc = popen(command, cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    return Daemon(proc, command, log_path)


@dataclass(frozen=True, slots=True)
class Credential:
    """A live TURN credential; requests are signed with ``sign_password`` (normally the
    password), responses verify with ``key``."""

    username: str
    password: str
    sign_password: str
    realm: str = "firezone"

    @property
    def key(self) -> bytes:
        return long_term_key(self.username, self.realm, self.password)

    @property
    def sign_key(self) -> bytes:
        return long_term_key(self.username, self.realm, self.sign_password)


#: ports this process handed out lately: the kernel may offer a port again as soon as the
#: probe socket closes, so a relay's listen and control ports could come out the same
_HANDED_OUT: dict[int, float] = {}
_HANDED_OUT_S = 120.0


def free_port(hosts: tuple[str, ...] = ("127.0.0.1",), tcp_too: bool = True) -> int:
    """A port free for UDP (and TCP) on every host in ``hosts`` right now, and not handed out
    by this function in the last two minutes."""
    now = time.monotonic()
    for old in [p for p, t in _HANDED_OUT.items() if now - t > _HANDED_OUT_S]:
        del _HANDED_OUT[old]
    for _ in range(200):
        family = socket.AF_INET6 if ":" in hosts[0] else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((hosts[0], 0))
            port = int(s.getsockname()[1])
        if port in _HANDED_OUT:
            continue
        try:
            for host in hosts:
                kinds = (socket.SOCK_DGRAM, socket.SOCK_STREAM) if tcp_too else (socket.SOCK_DGRAM,)
                for kind in kinds:
                    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
                    with socket.socket(fam, kind) as s:
                        s.bind((host, port))
        except OSError:
            continue
        _HANDED_OUT[port] = now
        return port
    raise RuntimeError("no free port")


def _http_status(url: str, timeout: float = 1.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return None


def port_range(size: int = 400) -> tuple[int, int]:
    """A random slice of 61000-65499 for one relay's allocations: outside the kernel's
    ephemeral range, so client sockets never collide with relay ports."""
    low = random.randrange(61000, 65500 - size, 2)
    return low, low + size - 1


def http(method: str, url: str, timeout: float = 5.0) -> tuple[int, str]:
    """(status, body) of one request; HTTP errors are answers too."""
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@dataclass
class LocalDaemon(Daemon):
    """A daemon on loopback-style addresses of this host, with its ports and secret."""

    ip4: str | None = None
    ip6: str | None = None
    listen_port: int = 0
    health_port: int = 0
    control_port: int = 0
    lowest_port: int = 0
    highest_port: int = 0
    secret: str = ""
    scheme: str = "firezone"

    @classmethod
    def of(cls, daemon: Daemon, **fields: Any) -> LocalDaemon:
        """The handle of a daemon started otherwise, with its addresses and ports."""
        return cls(daemon.proc, daemon.args, daemon.log_path, daemon.killed, **fields)

    @property
    def address(self) -> Addr:
        """Where clients send: the listen port on the IPv4 address (else the IPv6 one)."""
        host = self.ip4 or self.ip6
        assert host is not None
        return host, self.listen_port

    def listen(self, family: Family) -> Addr:
        host = self.ip4 if family == Family.V4 else self.ip6
        if host is None:
            raise ValueError(f"the relay has no {family.name} address")
        return host, self.listen_port

    @property
    def health(self) -> str:
        return f"http://127.0.0.1:{self.health_port}"

    @property
    def control(self) -> str:
        return f"http://127.0.0.1:{self.control_port}"

    def readyz(self) -> bool:
        return http("GET", f"{self.health}/readyz", 1)[0] == 200

    def credentials(self, user: str | None = None, ttl: int = 3600) -> tuple[str, str]:
        """A username and password for this relay's secret, valid for ``ttl`` seconds."""
        user = user or f"u{random.randrange(1 << 30)}"
        return make_credentials(self.scheme, self.secret, int(time.time()) + ttl, user)

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")


def start_local(
    log_dir: Path,
    *extra: str,
    ip4: str | None = "127.0.0.1",
    ip6: str | None = None,
    ports: tuple[int, int] | None = None,
    secret: str | None = None,
    scheme: str = "firezone",
    loopback_peers: bool = True,
    env: Mapping[str, str] | None = None,
    wrapper: Sequence[str] = (),
    ready: bool = True,
) -> LocalDaemon:
    """A relay on ``ip4`` / ``ip6`` (each bound to itself) on free listen, health and control
    ports, allocating from ``ports`` (default: a :func:`port_range` slice), with
    ``--auth-secret secret`` unless None, loopback peers allowed unless ``loopback_peers`` is
    false, then ``extra``. With ``ready``, returns once ``/readyz`` says 200."""
    hosts = tuple(h for h in (ip4, ip6) if h is not None)
    listen = free_port(hosts)
    health, control = free_port(), free_port()
    low, high = ports or port_range()
    args = daemon_args(listen, (low, high), health, control, scheme, ip4, ip6)
    if not loopback_peers:
        args.remove("--allow-loopback-peers")
    if secret is not None:
        args += ["--auth-secret", secret]
    args += extra
    daemon = LocalDaemon.of(
        spawn_daemon(args, log_dir / f"relay-{listen}.log", env=env, wrapper=wrapper),
        ip4=ip4,
        ip6=ip6,
        listen_port=listen,
        health_port=health,
        control_port=control,
        lowest_port=low,
        highest_port=high,
        secret=secret or "",
        scheme=scheme,
    )
    if ready:
        daemon.wait_ready(daemon.readyz)
    return daemon


@dataclass
class RelaySystem:
    """A running daemon (and portal) for a trace. Create with :func:`start`, end with
    :meth:`stop`."""

    spec: dict[str, Any]
    daemon: LocalDaemon
    portal: Any = None
    portal_relay: Any = None
    _tmp: Any = None
    _minted: dict[str, Credential] = field(default_factory=dict)

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.daemon.proc

    @property
    def ip4(self) -> str | None:
        return self.daemon.ip4

    @property
    def ip6(self) -> str | None:
        return self.daemon.ip6

    @property
    def listen_port(self) -> int:
        return self.daemon.listen_port

    @property
    def health_port(self) -> int:
        return self.daemon.health_port

    @property
    def lowest_port(self) -> int:
        return self.daemon.lowest_port

    @property
    def highest_port(self) -> int:
        return self.daemon.highest_port

    @property
    def scheme(self) -> str:
        return self.daemon.scheme

    @property
    def secret(self) -> str | None:
        return self.daemon.secret or None

    @property
    def ips(self) -> tuple[str, ...]:
        return tuple(ip for ip in (self.ip4, self.ip6) if ip is not None)

    def listen(self, family: Family) -> Addr:
        return self.daemon.listen(family)

    def log(self) -> str:
        return self.daemon.log()

    def alive(self) -> bool:
        return self.daemon.alive()

    def credential(self, spec: dict[str, Any]) -> Credential:
        """Mint the live credential a trace's credential ``spec`` stands for (cached, so every
        request of one role signs with the same username)."""
        cache_key = repr(sorted(spec.items()))
        cached = self._minted.get(cache_key)
        if cached is not None:
            return cached
        now = int(time.time())
        expiry = now - 3600 if spec.get("expired") else now + int(spec.get("ttl", 3600))
        if "expiry" in spec:  # absolute, as the portal gives gateways (2038-01-01)
            expiry = int(spec["expiry"])
        if "literal" in spec:  # a username kept as recorded (malformed on purpose)
            username = password = spec["literal"]
        elif self.portal is not None and "public_key" in spec:
            entry = self.portal.credentials(
                spec["public_key"], expires_at=expiry, relays=[self.portal_relay]
            )[0]
            username, password = entry["username"], entry["password"]
        else:
            assert self.secret is not None, "portal credentials need a portal"
            user = spec.get("user") or spec.get("salt") or "trace-user"
            username, password = make_credentials(self.scheme, self.secret, expiry, user)
        credential = Credential(
            username, password, spec.get("sign_password", password), spec.get("realm", "firezone")
        )
        self._minted[cache_key] = credential
        return credential

    async def stop(self, timeout: float = 5.0) -> int:
        """SIGTERM the daemon (and stop the portal); returns the exit code. The wait is in a
        thread: the portal shares the caller's loop, and the daemon may talk to it on its way
        out."""
        code, _ = await asyncio.to_thread(self.daemon.stop, signal.SIGTERM, timeout)
        if self.portal is not None:
            with contextlib.suppress(Exception):
                await self.portal.stop()
        return code

    def cleanup(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def merge_specs(specs: list[dict[str, Any]]) -> dict[str, Any]:
    """One relay that satisfies several traces (a hostile trace beside a legit one)."""
    merged: dict[str, Any] = {"auth": "standalone", "scheme": "firezone", "args": [], "ports": 0}
    for spec in specs:
        if spec.get("auth") == "portal":
            merged["auth"] = "portal"
        for key in ("ip4", "ip6"):
            if spec.get(key):
                if merged.get(key) not in (None, spec[key]):
                    raise ValueError(f"traces disagree on the relay's {key}")
                merged[key] = spec[key]
        if spec.get("scheme", "firezone") != "firezone":
            merged["scheme"] = spec["scheme"]
        merged["args"] += [a for a in spec.get("args", []) if a not in merged["args"]]
        merged["ports"] = max(merged["ports"], int(spec.get("ports", 200)))
    return merged


def daemon_args(
    listen: int,
    ports: tuple[int, int],
    health: int,
    control: int,
    scheme: str,
    ip4: str | None,
    ip6: str | None,
    *extra: str,
) -> list[str]:
    """The flags of a relay daemon on loopback-style test addresses: the given listen port,
    allocation range and endpoints, loopback peers allowed, each configured family bound to
    its public address."""
    args = [
        "--listen-port",
        str(listen),
        "--lowest-port",
        str(ports[0]),
        "--highest-port",
        str(ports[1]),
        "--health-check-addr",
        f"127.0.0.1:{health}",
        "--control-endpoint",
        f"127.0.0.1:{control}",
        "--auth-scheme",
        scheme,
        "--allow-loopback-peers",
        *extra,
    ]
    if ip4:
        args += ["--public-ip4-addr", ip4, "--bind-ip4-addr", ip4]
    if ip6:
        args += ["--public-ip6-addr", ip6, "--bind-ip6-addr", ip6]
    return args


async def start(spec: dict[str, Any], log_dir: Path | None = None) -> RelaySystem:
    """Start the daemon described by a trace's ``relay`` spec and wait until it is ready
    (and, in portal mode, joined)."""
    ip4, ip6 = spec.get("ip4"), spec.get("ip6")
    if ip4 is None and ip6 is None:
        ip4 = "127.0.0.1"
    size = max(16, int(spec.get("ports", 200)))
    low = random.randrange(RANGE_LOW, RANGE_HIGH - size)
    tmp = None
    if log_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="relay-sim-")
        log_dir = Path(tmp.name)
    portal = None
    secret = None
    env: dict[str, str] = {}
    if spec.get("auth") == "portal":
        from simulations.portal import Portal

        portal = Portal(token=secrets.token_urlsafe(16))
        await portal.start()
        env = {"FIREZONE_API_URL": portal.url, "FIREZONE_TOKEN": portal.token}
    else:
        secret = secrets.token_hex(32)
    daemon = start_local(
        log_dir,
        *spec.get("args", []),
        ip4=ip4,
        ip6=ip6,
        ports=(low, low + size - 1),
        secret=secret,
        scheme=spec.get("scheme", "firezone"),
        env=env,
        ready=False,
    )
    system = RelaySystem(spec, daemon, portal, None, tmp)
    try:
        await _wait_ready(system)
    except BaseException:
        await system.stop()
        system.cleanup()
        raise
    return system


async def _wait_ready(system: RelaySystem) -> None:
    """/readyz, and in portal mode the join; polled from this loop, which the portal shares."""
    deadline = time.monotonic() + READY_TIMEOUT
    url = f"http://127.0.0.1:{system.health_port}/readyz"
    while True:
        if system.proc.poll() is not None:
            raise RuntimeError(f"relay exited with {system.proc.returncode}:\n{system.log()}")
        status = await asyncio.to_thread(_http_status, url)
        if status == 200 and (system.portal is None or system.portal.connected_relays()):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"relay not ready after {READY_TIMEOUT}s:\n{system.log()}")
        await asyncio.sleep(0.05)
    if system.portal is not None:
        system.portal_relay = system.portal.connected_relays()[-1]
