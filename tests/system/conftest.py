"""System-test fixtures: the relay daemon as a real subprocess on loopback, on free ports.

Every relay gets its own listen port, HTTP ports and a slice of 61000-65499 for allocations
(outside the kernel's ephemeral range, so client sockets never collide with relay ports).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from protocol.auth import make_credentials
from simulations.relay_process import daemon_command

ROOT = Path(__file__).resolve().parents[2]
SECRET = "system-test-secret"

pytestmark = pytest.mark.system


def free_port(kind: int = socket.SOCK_DGRAM, host: str = "127.0.0.1") -> int:
    """A port that is free for both UDP and TCP on ``host`` right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(100):
        with socket.socket(family, kind) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        other = socket.SOCK_STREAM if kind == socket.SOCK_DGRAM else socket.SOCK_DGRAM
        try:
            with socket.socket(family, other) as s:
                s.bind((host, port))
        except OSError:
            continue
        return int(port)
    raise RuntimeError("no free port")


def port_range(size: int = 400) -> tuple[int, int]:
    low = random.randrange(61000, 65500 - size, 2)
    return low, low + size - 1


@dataclass
class RelayProcess:
    proc: subprocess.Popen[bytes]
    listen_port: int
    health_port: int
    control_port: int
    lowest_port: int
    highest_port: int
    log_path: Path
    secret: str = SECRET
    scheme: str = "firezone"
    args: list[str] = field(default_factory=list)

    @property
    def health(self) -> str:
        return f"http://127.0.0.1:{self.health_port}"

    @property
    def control(self) -> str:
        return f"http://127.0.0.1:{self.control_port}"

    def credentials(self, user: str | None = None, ttl: int = 3600) -> tuple[str, str]:
        user = user or f"u{random.randrange(1 << 30)}"
        return make_credentials(self.scheme, self.secret, int(time.time()) + ttl, user)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 5.0) -> tuple[int, float]:
        """Signal the relay; returns (exit code, seconds it took to exit)."""
        start = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(5)
        return code, time.monotonic() - start


def http(method: str, url: str, timeout: float = 5.0) -> tuple[int, str]:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def start_relay(
    tmp_path: Path,
    *extra: str,
    ip4: str | None = "127.0.0.1",
    ip6: str | None = None,
    env: dict[str, str] | None = None,
    scheme: str = "firezone",
    wait_ready: bool = True,
    ports: tuple[int, int] | None = None,
) -> RelayProcess:
    listen = free_port(host=ip4 or "::1")
    health, control = free_port(socket.SOCK_STREAM), free_port(socket.SOCK_STREAM)
    low, high = ports or port_range()
    args = daemon_command(
        listen, (low, high), health, control, scheme, ip4, ip6, "--auth-secret", SECRET, *extra
    )
    log_path = tmp_path / f"relay-{listen}.log"
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("FIREZONE_TOKEN", None)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=full_env)
    relay = RelayProcess(proc, listen, health, control, low, high, log_path, SECRET, scheme, args)
    if wait_ready:
        deadline = time.monotonic() + 15
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"relay exited with {proc.returncode}:\n{relay.log()}")
            with contextlib.suppress(OSError):
                if http("GET", f"{relay.health}/readyz", 1)[0] == 200:
                    break
            if time.monotonic() > deadline:
                relay.stop(signal.SIGKILL)
                raise RuntimeError(f"relay not ready:\n{relay.log()}")
            time.sleep(0.05)
    return relay


@pytest.fixture
def relay_factory(tmp_path: Path) -> Iterator[object]:
    started: list[RelayProcess] = []

    def factory(*extra: str, **kwargs: object) -> RelayProcess:
        relay = start_relay(tmp_path, *extra, **kwargs)  # type: ignore[arg-type]
        started.append(relay)
        return relay

    yield factory
    for relay in started:
        relay.stop(signal.SIGKILL)


@pytest.fixture
def relay(relay_factory: object) -> RelayProcess:
    return relay_factory()  # type: ignore[operator,no-any-return]
