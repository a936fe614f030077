"""The full system under test: the relay daemon as a subprocess, with the test portal when a
trace needs portal-minted credentials (else standalone with ``--auth-secret``).

Used by the replayer and the recorder. Everything here is asyncio-friendly: the portal lives
on the caller's event loop, so nothing may block it for long.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocol.auth import make_credentials
from protocol.stun import long_term_key
from protocol.types import Addr, Family

ROOT = Path(__file__).resolve().parents[1]
#: Allocation ports come from here: below the kernel's ephemeral range (32768-60999), so the
#: replayer's sockets never take a port the relay wants, and away from the 61000+ slices the
#: system tests give their relays (they may run at the same time).
RANGE_LOW, RANGE_HIGH = 20000, 32000
READY_TIMEOUT = 15.0


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


def free_port(hosts: tuple[str, ...] = ("127.0.0.1",), tcp_too: bool = True) -> int:
    """A port free for UDP (and TCP) on every host in ``hosts`` right now."""
    for _ in range(200):
        family = socket.AF_INET6 if ":" in hosts[0] else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((hosts[0], 0))
            port = int(s.getsockname()[1])
        try:
            for host in hosts:
                kinds = (socket.SOCK_DGRAM, socket.SOCK_STREAM) if tcp_too else (socket.SOCK_DGRAM,)
                for kind in kinds:
                    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
                    with socket.socket(fam, kind) as s:
                        s.bind((host, port))
        except OSError:
            continue
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


@dataclass
class RelaySystem:
    """A running daemon (and portal). Create with :func:`start`, end with :meth:`stop`."""

    spec: dict[str, Any]
    proc: subprocess.Popen[bytes]
    ip4: str | None
    ip6: str | None
    listen_port: int
    health_port: int
    lowest_port: int
    highest_port: int
    log_path: Path
    scheme: str
    secret: str | None = None
    portal: Any = None
    portal_relay: Any = None
    _tmp: Any = None
    _minted: dict[str, Credential] = field(default_factory=dict)

    @property
    def ips(self) -> tuple[str, ...]:
        return tuple(ip for ip in (self.ip4, self.ip6) if ip is not None)

    def listen(self, family: Family) -> Addr:
        host = self.ip4 if family == Family.V4 else self.ip6
        if host is None:
            raise ValueError(f"the relay has no {family.name} address")
        return host, self.listen_port

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def credential(self, spec: dict[str, Any]) -> Credential:
        """Mint the live credential a trace's credential ``spec`` stands for (cached, so every
        request of one role signs with the same username)."""
        cache_key = repr(sorted(spec.items()))
        cached = self._minted.get(cache_key)
        if cached is not None:
            return cached
        now = int(time.time())
        expiry = now - 3600 if spec.get("expired") else now + int(spec.get("ttl", 3600))
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
        """SIGTERM the daemon (and stop the portal); returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        if self.portal is not None:
            with contextlib.suppress(Exception):
                await self.portal.stop()
        return int(self.proc.returncode)

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


def daemon_command(
    listen: int,
    ports: tuple[int, int],
    health: int,
    control: int,
    scheme: str,
    ip4: str | None,
    ip6: str | None,
    *extra: str,
) -> list[str]:
    """The command line of a relay daemon on loopback-style test addresses: the given
    listen port, allocation range and endpoints, loopback peers allowed, each configured
    family bound to its public address. Shared by the simulator and the system tests."""
    args = [
        sys.executable,
        "-m",
        "actors.cli",
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
    hosts = tuple(h for h in (ip4, ip6) if h is not None)
    listen = free_port(hosts)
    health = free_port(("127.0.0.1",))
    control = free_port(("127.0.0.1",))
    size = max(16, int(spec.get("ports", 200)))
    low = random.randrange(RANGE_LOW, RANGE_HIGH - size)
    high = low + size - 1
    scheme = spec.get("scheme", "firezone")
    tmp = None
    if log_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="relay-sim-")
        log_dir = Path(tmp.name)
    args = daemon_command(
        listen, (low, high), health, control, scheme, ip4, ip6, *spec.get("args", [])
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    for name in ("FIREZONE_TOKEN", "FIREZONE_API_URL", "AUTH_SECRET", "RNG_SEED"):
        env.pop(name, None)
    portal = None
    secret = None
    if spec.get("auth") == "portal":
        from simulations.portal import Portal

        portal = Portal(token=secrets.token_urlsafe(16))
        await portal.start()
        env["FIREZONE_API_URL"] = portal.url
        env["FIREZONE_TOKEN"] = portal.token
    else:
        secret = secrets.token_hex(32)
        args += ["--auth-secret", secret]
    log_path = log_dir / f"relay-{listen}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    system = RelaySystem(
        spec, proc, ip4, ip6, listen, health, low, high, log_path, scheme, secret, portal, None, tmp
    )
    try:
        await _wait_ready(system)
    except BaseException:
        await system.stop()
        system.cleanup()
        raise
    return system


async def _wait_ready(system: RelaySystem) -> None:
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
