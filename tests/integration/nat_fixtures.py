"""The pieces of the masquerading-NAT suite: a relay daemon, a test portal, two TURN agents
with a TUN tunnel, an HTTP server and curl, all in a ``simulations.netns.topology`` network.

:class:`NatRun` is a context manager that brings one scenario up (topology, signalling hub,
relay, agents, web server), lets the test download a 10 MB blob through the tunnel (so through
the relay) and disturb things meanwhile (the web server can hold the transfer at an exact byte,
:meth:`NatRun.hold_web_at`, so "meanwhile" never depends on timing), and tears everything
down, whatever happens. Every wait is bounded; nothing outlives the ``with`` block.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.client
import os
import random
import re
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from firezone_relay.protocol.auth import make_credentials, portal_salt
from simulations.netns.relay import attach_xdp_pass
from simulations.netns.signalling import Hub
from simulations.netns.topology import Topology, TopologyOptions
from simulations.portal_thread import PortalThread
from simulations.relay_process import Daemon, spawn_daemon
from tests.required import REQUIRE_ALL

REPO = Path(__file__).resolve().parents[2]
BLOB_SIZE = 10_000_000
CLIENT_KEY = "nat-client-public-key"
GATEWAY_KEY = "nat-gateway-public-key"
CLIENT_TUN = ["100.64.0.1/24", "fd00:64::1/64"]
GATEWAY_TUN = ["100.64.0.2/24", "fd00:64::2/64"]
WEB_PORT = 8080
HEALTH = ("127.0.0.1", 8080)  # inside the relay namespace
#: a relay log line at WARN or ERROR level, a traceback, or a Python warning on stderr; not the
#: start-up warning that a lab's public address is not a public one (these labs mean it)
PROBLEM = re.compile(
    r"^\S+Z\s+(WARN|ERROR|CRITICAL)\s(?!relay: --public-ip[46]-addr \S+ is a )"
    r"|^Traceback|\w+Warning: "
)


#: the relay's verdict on XDP offload: enabled, or unavailable with a reason
OFFLOAD = re.compile(
    r"eBPF offloading enabled on \S+|(?:XDP|eBPF) offload\w* on \S+ unavailable\S*:? (?P<reason>.*)"
)


def require_nat_tools() -> None:
    """Skip, with the reason, when this cannot run at all (not root, no ``ip`` or ``nft``);
    fail loudly when a lesser tool is missing, so CI never skips the suite by accident."""
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, nftables, TUN)")
    missing = [t for t in ("ip", "nft") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"missing tools: {', '.join(missing)} (apt-get install iproute2 nftables)")
    missing = [t for t in ("ethtool", "curl") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing tools: {', '.join(missing)} (.ci/run installs them)")
    if not os.path.exists("/dev/net/tun"):
        pytest.fail("no /dev/net/tun: the agents' tunnels need the TUN driver")


def xdp_unavailable() -> str | None:
    """Why the relay cannot offload to XDP here, or None if it should be able to."""
    try:
        from firezone_relay.xdp.loader import XdpUnavailable, import_bcc
    except ImportError as exc:
        return f"XDP loader not importable: {exc}"
    try:
        import_bcc()
    except XdpUnavailable as exc:
        return str(exc)
    try:
        from firezone_relay.actors import xdp_manager
    except ImportError as exc:
        return f"actors.xdp_manager not importable: {exc}"
    if not hasattr(xdp_manager, "start_offload"):
        return "actors.xdp_manager has no start_offload yet"
    return None


def datapath(mode: str) -> bool:
    """``"userspace"``, ``"xdp"`` or ``"xdp-driver"`` -> whether to offload; skips the XDP
    variants (with the reason) where bcc cannot run."""
    if mode == "userspace":
        return False
    reason = xdp_unavailable()
    if reason is not None:
        pytest.skip(f"XDP variant: {reason}")
    return True


def attach_mode(mode: str) -> str:
    """The ``--ebpf-attach-mode`` of a test mode: ``xdp-driver`` is native mode on the veth."""
    return "driver" if mode == "xdp-driver" else "generic"


MODES = ["userspace", "xdp"]
#: Native (driver) mode beside them, for the tests that also run it (one scenario suffices:
#: the program is the same; test_xdp_netns runs every path in both modes).
MODES_WITH_DRIVER = [*MODES, "xdp-driver"]
_BLOB: tuple[Path, str] | None = None


def shared_blob(factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One blob per test session, whichever module asks first."""
    global _BLOB
    if _BLOB is None or not _BLOB[0].exists():
        _BLOB = make_blob(factory.mktemp("www"))
    return _BLOB


def make_blob(directory: Path) -> tuple[Path, str]:
    """A 10 MB file of seeded random bytes and its SHA-256."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "blob"
    data = random.Random(20240610).randbytes(BLOB_SIZE)
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.pop("FIREZONE_TOKEN", None)
    env.pop("FIREZONE_API_URL", None)
    return env


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, step: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(step)


# -- the relay daemon -------------------------------------------------------------------------


class RelayProcess:
    """``firezone-relay`` in the relay namespace, its log in a file."""

    def __init__(
        self,
        topo: Topology,
        log_dir: Path,
        *,
        secret: str | None,
        portal_url: str | None = None,
        token: str | None = None,
        dual: bool = True,
        allow_private: bool = False,
        xdp: bool = False,
        xdp_mode: str = "generic",
        tls: tuple[Path, Path] | None = None,
        workers: int = 1,
    ) -> None:
        self.topo = topo
        self.workers = workers
        self.tls = tls
        self.log_dir = log_dir
        self.secret = secret
        self.portal_url = portal_url
        self.token = token
        self.dual = dual
        self.allow_private = allow_private
        self.xdp = xdp
        self.xdp_mode = xdp_mode
        self.daemon: Daemon | None = None
        self.logs: list[Path] = []

    def args(self) -> list[str]:
        """The daemon's flags."""
        a = [
            "--public-ip4-addr",
            self.topo.relay4,
            "--health-check-addr",
            f"{HEALTH[0]}:{HEALTH[1]}",
            "--control-endpoint",
            "127.0.0.1:9999",
            "--log-format",
            "human",
            "--log-filter",
            "info",
        ]
        if self.dual:
            a += ["--public-ip6-addr", self.topo.relay6]
        if self.secret is not None:
            a += ["--auth-secret", self.secret]
        if self.allow_private:
            a.append("--allow-private-peers")
        if self.xdp:
            a += ["--ebpf-offloading", self.topo.relay_dev, "--ebpf-attach-mode", self.xdp_mode]
            if REQUIRE_ALL:  # CI: a machine that can run XDP must, or the relay exits
                a.append("--ebpf-mandatory")
        if self.tls is not None:  # TURN over TLS on the default port, 5349
            a += ["--tls-cert-file", str(self.tls[0]), "--tls-key-file", str(self.tls[1])]
        if self.workers != 1:
            a += ["--num-worker-threads", str(self.workers)]
        options = self.topo.options
        if options.relay_behind_nat:  # allocate only where the router forwards
            low, high = options.relay_ports
            a += ["--lowest-port", str(low), "--highest-port", str(high)]
        return a

    def start(self, timeout: float = 30.0) -> None:
        env = {}
        if self.token is not None:
            assert self.portal_url is not None
            env = {"FIREZONE_TOKEN": self.token, "FIREZONE_API_URL": self.portal_url}
        path = self.log_dir / f"relay-{len(self.logs)}.log"
        self.logs.append(path)
        popen = functools.partial(self.topo.popen, self.topo.rly)
        self.daemon = spawn_daemon(self.args(), path, env=env, popen=popen)
        self.daemon.wait_ready(lambda: self.http("GET", "/readyz")[0] == 200, timeout, step=0.1)

    def wait_offload(self, timeout: float = 60.0) -> None:
        """Wait until the relay says whether XDP offload runs; xfail the test if it cannot
        (the XDP fast path is an accelerator: its absence is not a relay failure), but fail it
        under ``REQUIRE_ALL`` (CI), where the machine supports XDP."""

        def decided() -> re.Match[str] | None:
            return OFFLOAD.search(self.logs[-1].read_text(errors="replace"))

        found = wait_until(decided, timeout, "the relay's XDP offload decision", step=0.1)
        if found.group("reason") is not None:
            if REQUIRE_ALL:
                pytest.fail(f"XDP offload failed where it must work: {found.group('reason')}")
            pytest.xfail(f"XDP offload unavailable on this machine/build: {found.group('reason')}")

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM and wait; SIGKILL past ``timeout``. Returns the exit code."""
        daemon, self.daemon = self.daemon, None
        if daemon is None:
            return None
        code, _ = daemon.stop(timeout=timeout)
        if daemon.killed:
            raise AssertionError(f"relay ignored SIGTERM for {timeout} s")
        return code

    def http(self, method: str, path: str) -> tuple[int, str]:
        conn = http.client.HTTPConnection(*HEALTH, timeout=2.0)
        with self.topo.entered(self.topo.rly):
            conn.connect()  # the socket is created, and stays, in the relay namespace
        try:
            conn.request(method, path)
            response = conn.getresponse()
            return response.status, response.read().decode(errors="replace")
        finally:
            conn.close()

    def metrics(self) -> dict[str, float]:
        """``/metrics`` as ``{"name{labels}": value}``."""
        status, text = self.http("GET", "/metrics")
        assert status == 200, text
        out: dict[str, float] = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            key, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[key] = float(value)
        return out

    def metric(self, prefix: str) -> float:
        """Sum of every series whose name starts with ``prefix``."""
        return sum(v for k, v in self.metrics().items() if k.startswith(prefix))

    def relayed_packets(self) -> dict[str, float]:
        """Packets relayed so far per data path (``userspace``, ``xdp``)."""
        out: dict[str, float] = {}
        for key, value in self.metrics().items():
            m = re.fullmatch(r'relay_packet_size_bytes_count\{relay_datapath="(\w+)"\}', key)
            if m:
                out[m.group(1)] = value
        return out

    def log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    def problems(self) -> list[str]:
        return [line for line in self.log().splitlines() if PROBLEM.search(line)]


# -- one scenario -------------------------------------------------------------------------------


@dataclass
class Download:
    proc: subprocess.Popen[bytes]
    out: Path
    started: float
    log: Path

    def received(self) -> int:
        try:
            return self.out.stat().st_size
        except FileNotFoundError:
            return 0

    def wait_for_bytes(self, count: int, timeout: float) -> None:
        """Until ``count`` bytes are in the file; curl having ended only counts as a failure
        if they are not (it writes everything before it exits)."""

        def enough() -> bool:
            ended = self.proc.poll() is not None
            if self.received() >= count:
                return True
            if ended:
                raise AssertionError(
                    f"curl ended ({self.proc.returncode}) after {self.received()} of "
                    f"{count} bytes: {self.log.read_text(errors='replace')}"
                )
            return False

        wait_until(enough, timeout, f"{count} bytes of the download", step=0.02)


@dataclass
class NatRun:
    """Bring a scenario up; see the module docstring. Parameters:

    * ``options``: the NAT kinds and loss (``TopologyOptions``);
    * ``relay_family`` / ``peer_family``: how the agents reach the relay, and which relayed
      (or server-reflexive) family the channels point at;
    * ``gateway_allocates``: False = the gateway only opens its NAT towards the client's
      relayed address (client -> relay -> gateway's public address);
    * ``xdp``: ``--ebpf-offloading p0 --ebpf-attach-mode <xdp_mode>`` (``generic``, or
      ``driver``: native mode, with an XDP_PASS program on the router's end of the veth);
    * ``relay_dual``: False = the relay has no public IPv6 address (IPv4 only);
    * ``portal``: the relay joins a test portal, which mints the agents' credentials;
    * ``client_transport``: ``udp``, ``tcp`` or ``tls``: how the client reaches the relay
      (the gateway stays on UDP);
    * ``workers``: the relay's ``--num-worker-threads``.
    """

    tmp: Path
    blob: tuple[Path, str]
    options: TopologyOptions = field(default_factory=TopologyOptions)
    relay_family: int = 4
    peer_family: int = 4
    inner_family: int = 4
    gateway_allocates: bool = True
    xdp: bool = False
    relay_dual: bool = True
    xdp_mode: str = "generic"
    portal: bool = False
    client_transport: str = "udp"
    workers: int = 1
    refresh_scale: float = 0.01
    probe_after: float = 1.5
    topo: Topology = field(init=False)
    hub: Hub = field(init=False)
    relay: RelayProcess = field(init=False)
    portal_thread: PortalThread | None = field(init=False, default=None)
    secret: str = field(init=False, default="")
    _stack: contextlib.ExitStack = field(init=False, default_factory=contextlib.ExitStack)
    _agents: dict[str, subprocess.Popen[bytes]] = field(init=False, default_factory=dict)
    _web: subprocess.Popen[bytes] = field(init=False)

    # -- bring up --------------------------------------------------------------------------

    def __enter__(self) -> NatRun:
        try:
            self._up()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _up(self) -> None:
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.topo = self._stack.enter_context(Topology(self.options))
        if self.xdp and self.xdp_mode == "driver":
            self._stack.callback(attach_xdp_pass(self.topo.rtr, "r-pub").cleanup)
        hub_dir = tempfile.mkdtemp(prefix="fznhub")  # short: Unix socket paths are limited
        self._stack.callback(shutil.rmtree, hub_dir, True)
        self.hub = self._stack.enter_context(
            Hub(os.path.join(hub_dir, "hub.sock"), pairs=[("client", "gateway")])
        )
        if self.portal:
            self.portal_thread = PortalThread("nat-relay-token", netns=self.topo.rly).start()
            self._stack.callback(self.portal_thread.close)
            self.relay = RelayProcess(
                self.topo,
                self.tmp,
                secret=None,
                portal_url=self.portal_thread.url,
                token=self.portal_thread.token,
                allow_private=not self.gateway_allocates,
                xdp=self.xdp,
                dual=self.relay_dual,
                xdp_mode=self.xdp_mode,
                workers=self.workers,
            )
        else:
            self.secret = os.urandom(32).hex()
            self.relay = RelayProcess(
                self.topo,
                self.tmp,
                secret=self.secret,
                allow_private=not self.gateway_allocates,
                xdp=self.xdp,
                dual=self.relay_dual,
                xdp_mode=self.xdp_mode,
                tls=self._tls_files() if self.client_transport == "tls" else None,
                workers=self.workers,
            )
        self._stack.callback(self.relay.stop)
        self.relay.start()
        if self.xdp:
            self.relay.wait_offload()
        if self.portal_thread is not None:
            wait_until(self.portal_thread.joined_relays, 10, "the relay to join the portal")
        self._start_web()
        self._start_agent("client", self.topo.cli, CLIENT_TUN, allocate=True)
        self._start_agent("gateway", self.topo.gw, GATEWAY_TUN, allocate=self.gateway_allocates)
        self.wait_tunnel()

    def credentials(self, public_key: str, secret: str | None = None) -> tuple[str, str]:
        """Credentials as the portal hands them out: from the portal, or minted from the
        standalone relay's secret."""
        if self.portal_thread is not None and secret is None:
            return self.portal_thread.credentials(public_key)
        expiry = int(time.time()) + 3600
        return make_credentials("firezone", secret or self.secret, expiry, portal_salt(public_key))

    def _tls_files(self) -> tuple[Path, Path]:
        cert, key = self.tmp / "relay-cert.pem", self.tmp / "relay-key.pem"
        subprocess.run(
            [
                "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                "ec_paramgen_curve:P-256", "-nodes", "-days", "1", "-subj", "/CN=relay",
                "-keyout", str(key), "-out", str(cert),
            ],
            check=True,
            capture_output=True,
        )  # fmt: skip
        return cert, key

    def _server(self, name: str = "gateway") -> str:
        port = 5349 if name == "client" and self.client_transport == "tls" else 3478
        if self.relay_family == 6:
            return f"[{self.topo.relay6}]:{port}"
        return f"{self.topo.relay4}:{port}"

    def _start_agent(self, name: str, ns: str, tun_addrs: list[str], allocate: bool) -> None:
        key = CLIENT_KEY if name == "client" else GATEWAY_KEY
        username, password = self.credentials(key)
        args = [
            sys.executable,
            "-m",
            "simulations.netns.agent",
            "--name",
            name,
            "--server",
            self._server(name),
            "--signal",
            self.hub.path,
            "--tun",
            "fzt0",
            "--username",
            username,
            "--password",
            password,
            "--dual",
            "--peer-family",
            str(self.peer_family),
            "--refresh-scale",
            str(self.refresh_scale),
            "--probe-after",
            str(self.probe_after),
        ]
        for cidr in tun_addrs:
            args += ["--tun-addr", cidr]
        if not allocate:
            args.append("--no-allocate")
        if name == "client":
            args += ["--transport", self.client_transport]
        log = (self.tmp / f"{name}.log").open("wb")
        self._stack.callback(log.close)
        proc = self.topo.popen(ns, args, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT)
        self._agents[name] = proc
        self._stack.callback(self._stop_process, proc)
        try:
            self.hub.wait_event(name, "ready", 15)
        except TimeoutError:
            text = (self.tmp / f"{name}.log").read_text(errors="replace")
            raise RuntimeError(
                f"agent {name} did not start (exit {proc.poll()}):\n{text}"
            ) from None

    def _start_web(self) -> None:
        """The gated file server (:mod:`tests.integration.gated_web`) in the gateway's
        namespace; its stdin/stdout are the control channel of :meth:`hold_web_at`."""
        log = (self.tmp / "web.log").open("wb")
        self._stack.callback(log.close)
        proc = self.topo.popen(
            self.topo.gw,
            [sys.executable, "-m", "tests.integration.gated_web", str(WEB_PORT), str(self.blob[0])],
            cwd=REPO,
            env=_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            bufsize=0,
        )
        self._web = proc
        assert proc.stdin is not None and proc.stdout is not None
        self._stack.callback(proc.stdin.close)
        self._stack.callback(proc.stdout.close)
        self._stack.callback(self._stop_process, proc)
        wait_until(lambda: self._connects(self.topo.gw, "::1", 0.2), 15, "the web server")

    def hold_web_at(self, offset: int) -> None:
        """From now on the web server sends at most ``offset`` bytes of a body, then waits
        (until :meth:`release_web`, or a later hold further on). Given before the download
        starts, the transfer stops at exactly that byte, however fast it runs."""
        self._web_command(f"hold {offset}")

    def release_web(self) -> None:
        """Let held responses run to the end."""
        self._web_command("release")

    def _web_command(self, line: str, timeout: float = 10.0) -> None:
        """Send one command and wait for the server's ``ok`` (the command is in force)."""
        proc = self._web
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(line.encode() + b"\n")
        fd = proc.stdout.fileno()
        reply = b""
        deadline = time.monotonic() + timeout
        while not reply.endswith(b"\n"):
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError(f"the web server did not acknowledge {line!r} in {timeout} s")
            chunk = os.read(fd, 256)
            if not chunk:
                raise AssertionError(f"the web server exited ({proc.poll()}) on {line!r}")
            reply += chunk
        assert reply == b"ok\n", f"the web server answered {line!r} with {reply!r}"

    def _connects(self, ns: str, host: str, timeout: float) -> bool:
        with self.topo.entered(ns):
            s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        try:
            s.settimeout(timeout)
            s.connect((host, WEB_PORT))
            return True
        except OSError:
            return False
        finally:
            s.close()

    @staticmethod
    def _stop_process(proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    # -- the tunnel ------------------------------------------------------------------------

    @property
    def web_host(self) -> str:
        return "fd00:64::2" if self.inner_family == 6 else "100.64.0.2"

    def wait_tunnel(self, timeout: float = 45.0, since: int = 0) -> None:
        """Both channels bound (after event index ``since``), then a TCP connect through the
        tunnel succeeds."""
        self.hub.wait_event("client", "channel_bound", timeout, since=since)
        if self.gateway_allocates:
            self.hub.wait_event("gateway", "channel_bound", timeout, since=since)
        else:  # the gateway has opened its NAT towards the client's relayed address
            self.hub.wait_event("gateway", "target", timeout, since=since)
        wait_until(
            lambda: self._connects(self.topo.cli, self.web_host, 1.0),
            timeout,
            "a TCP connection through the tunnel",
            step=0.2,
        )

    def download(self, *, max_time: float = 60.0, limit_rate: str | None = None) -> Download:
        """Start curl in the client namespace fetching the blob from the gateway's web
        server, through the tunnel; bounded by ``--max-time``."""
        out = self.tmp / f"download-{time.monotonic_ns()}"
        log = self.tmp / f"{out.name}.curl.log"
        host = f"[{self.web_host}]" if ":" in self.web_host else self.web_host
        args = [
            "curl",
            "--silent",
            "--show-error",
            "--fail",
            "--no-buffer",  # every received byte is in the file at once: received() is exact
            "--max-time",
            f"{max_time:g}",
            "--output",
            str(out),
            f"http://{host}:{WEB_PORT}/{self.blob[0].name}",
        ]
        if limit_rate:
            args[1:1] = ["--limit-rate", limit_rate]
        with log.open("wb") as f:
            proc = self.topo.popen(self.topo.cli, args, stdout=f, stderr=subprocess.STDOUT)
        self._stack.callback(self._stop_process, proc)
        return Download(proc, out, time.monotonic(), log)

    def finish(self, download: Download, timeout: float = 90.0) -> float:
        """Wait for curl, check the SHA-256; returns the transfer time in seconds."""
        try:
            rc = download.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            download.proc.kill()
            raise AssertionError(f"download still running after {timeout} s") from None
        elapsed = time.monotonic() - download.started
        detail = download.log.read_text(errors="replace")
        assert rc == 0, (
            f"curl failed ({rc}) after {elapsed:.1f} s, "
            f"{download.received()} bytes: {detail}\n{self.diagnostics()}"
        )
        digest = hashlib.sha256(download.out.read_bytes()).hexdigest()
        assert download.received() == BLOB_SIZE
        assert digest == self.blob[1], "downloaded bytes differ from the blob"
        download.out.unlink()
        return elapsed

    def transfer(self, **kwargs: Any) -> float:
        return self.finish(self.download(**kwargs))

    def assert_datapath(self) -> None:
        """With XDP, the kernel relayed most of the packets (userspace handles only what
        arrives before a binding reaches the maps), unless the client is on TCP/TLS; without,
        userspace relayed them all."""
        packets = self.relay.relayed_packets()
        xdp, user = packets.get("xdp", 0.0), packets.get("userspace", 0.0)
        print(f"relayed packets: xdp {xdp:.0f}, userspace {user:.0f}")
        if self.xdp and self.client_transport != "udp":
            # the client is on a stream: XDP never takes its channel, userspace relays it all
            assert xdp == 0 and user > BLOB_SIZE / 1500, packets
        elif self.xdp:
            assert xdp > 4 * user, f"XDP did not carry the transfer: {packets}"
        else:
            assert xdp == 0 and user > BLOB_SIZE / 1500, packets

    # -- observing -------------------------------------------------------------------------

    def stats(self, name: str) -> dict[str, Any]:
        return self.hub.request(name, {"type": "stats"}, "stats")

    def diagnostics(self) -> str:
        parts = []
        for name in self._agents:
            with contextlib.suppress(Exception):
                parts.append(f"{name}: {self.stats(name)}")
        tail = self.relay.log().splitlines()[-20:]
        return "\n".join([*parts, "relay log tail:", *tail])

    def assert_agents_content(self) -> None:
        """No response failed its integrity check, no command was refused (the agents'
        equivalent of Firezone's "no WARN in the client and gateway logs")."""
        bad = [
            e
            for e in self.hub.events
            if e.get("event") in ("bad_integrity", "command_failed", "unknown_command")
        ]
        assert not bad, f"agents reported problems: {bad}"

    def assert_relay_log_clean(self) -> None:
        """No WARN/ERROR line and no traceback in any of the relay's logs."""
        problems = self.relay.problems()
        assert not problems, "relay logged problems:\n" + "\n".join(problems)


@contextlib.contextmanager
def nat_run(tmp: Path, blob: tuple[Path, str], **kwargs: Any) -> Iterator[NatRun]:
    """``with nat_run(...) as run``: a :class:`NatRun` whose relay log is checked at the end
    (after the relay has shut down, so shutdown problems count too)."""
    run = NatRun(tmp, blob, **kwargs)
    with run:
        yield run
        run.assert_datapath()
        run.assert_agents_content()
        code = run.relay.stop()
        assert code == 0, f"the relay exited with {code} on SIGTERM"
    run.assert_relay_log_clean()
