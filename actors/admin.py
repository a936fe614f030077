"""The operator's side of the running relay: ``sessions``, ``disconnect``, ``drain``, ``reload``
and the figures ``top`` shows, served on a Unix socket only root and the relay's user can use.

Who may use it: the socket file is created mode 0600 (owned by the relay's user) in a directory
of its own (``/run/firezone-relay`` by default, systemd's ``RuntimeDirectory``), and every
connection's peer credentials (``SO_PEERCRED``) are checked as well: uid 0 or the relay's own,
else 403. Nothing of this is on the health port nor on the TCP control endpoint, where Firezone's
``POST /log_filter`` stays as it was.

The endpoint is the strict HTTP/1.1 server of ``actors.http_endpoints`` (same bounds), but its
handlers run on the event loop, because they read the core. What changes the relay (free
allocations, drain, reload) is told to the control actor as a frozen message (``Disconnect``,
``Drain``, and ``actors.control.Reload``, routed by ``actors.daemon.CONTROL_ROUTES`` to this
module's :class:`Admin`); the control actor is loop-hosted and idle here, so the message is handled
before the answer is written. SIGHUP tells ``Reload`` and SIGUSR1 tells ``Drain`` (no deadline).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any

from firezone_relay.actors.http_endpoints import HttpEndpoint, Routes, parse_host_port
from firezone_relay.actors.startup_errors import StartupError
from firezone_relay.protocol.allocations import COUNTERS, IN_BYTES, OUT_BYTES
from firezone_relay.protocol.types import Family, FiveTuple

if TYPE_CHECKING:
    from firezone_relay.protocol.allocations import Allocation
    from firezone_relay.protocol.server import Server

__all__ = [
    "RUNTIME_DIR",
    "Admin",
    "AdminEndpoint",
    "Disconnect",
    "Drain",
    "admin_socket_path",
    "read_peer_list_file",
    "read_secret_file",
]

logger = logging.getLogger("relay.admin")

#: where the admin socket lives unless ``--admin-socket`` says otherwise
RUNTIME_DIR = "/run/firezone-relay"
#: bounds on the files ``reload`` reads
MAX_FILE_BYTES = 64 * 1024
MAX_SECRETS = 16
#: the shortest credential secret accepted, at start and at reload (``actors.secret_files``)
MIN_SECRET_CHARS = 16
#: allocations ``/stats`` names at most (``top``)
MAX_TOP = 100
DRAIN_CHECK_INTERVAL = 0.2  # seconds between "is the last allocation gone?" checks

_PEERCRED = struct.Struct("3i")  # pid, uid, gid


def admin_socket_path(control_endpoint: str | None, explicit: str | None = None) -> str | None:
    """``--admin-socket``, else ``control-<port>.sock`` with the port of ``--control-endpoint``
    (so several relays on one host have one each, and the verbs find the relay's from the same
    flag) in systemd's ``RUNTIME_DIRECTORY`` or ``/run/firezone-relay``; None when the control
    endpoint is turned off."""
    if explicit:
        return explicit
    if not control_endpoint:
        return None
    _, port = parse_host_port(control_endpoint)
    directory = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0] or RUNTIME_DIR
    return f"{directory}/control-{port}.sock"


# -- the messages (to the control actor) ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Disconnect:
    """Free the allocations on these ports at once."""

    ports: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Drain:
    """Refuse new allocations, go unready, exit 0 when the last allocation ends or
    ``deadline`` seconds from now (None: no deadline)."""

    deadline: float | None = None


# -- the files reload reads ----------------------------------------------------------------


def _read_bounded(path: str, what: str) -> list[str]:
    """The lines of a small text file, without blanks and ``#`` comments; ValueError naming
    the file when it cannot be read or is too big."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        reason = (os.strerror(exc.errno) if exc.errno else str(exc)).lower()
        raise ValueError(f"cannot read the {what} {path}: {reason}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ValueError(f"the {what} {path} is larger than {MAX_FILE_BYTES} bytes")
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise ValueError(f"the {what} {path} is not UTF-8 text") from None
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def read_secret_file(path: str) -> tuple[str, ...]:
    """``--auth-secret-file``: one secret per line, all accepted, the first signs what
    ``credentials`` mints. ValueError (naming the file) when there is none or too many."""
    secrets_ = tuple(dict.fromkeys(_read_bounded(path, "secret file")))
    if not secrets_:
        raise ValueError(f"the secret file {path} holds no secret")
    if len(secrets_) > MAX_SECRETS:
        raise ValueError(f"the secret file {path} holds more than {MAX_SECRETS} secrets")
    for secret in secrets_:
        if len(secret) < MIN_SECRET_CHARS:
            raise ValueError(
                f"the auth secret in {path} is too short ({len(secret)} characters): anyone "
                f"could mint credentials; use at least {MIN_SECRET_CHARS}, e.g. "
                "`openssl rand -hex 32`"
            )
    return secrets_


def read_peer_list_file(path: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``--peer-list-file``: lines ``allow CIDR`` or ``deny CIDR`` -> (allowed, denied).
    ValueError naming the file and the line on anything else."""
    allowed: list[str] = []
    denied: list[str] = []
    for line in _read_bounded(path, "peer list file"):
        verb, _, cidr = line.partition(" ")
        try:
            network = str(ipaddress.ip_network(cidr.strip(), strict=False))
        except ValueError:
            network = ""
        if verb not in ("allow", "deny") or not network:
            raise ValueError(f"the peer list file {path}: expected 'allow CIDR' or 'deny CIDR', "
                             f"got {line[:80]!r}")  # fmt: skip
        (allowed if verb == "allow" else denied).append(network)
    return tuple(allowed), tuple(denied)


# -- the relay's side ----------------------------------------------------------------------


@dataclass
class AdminConfig:
    """What ``reload`` re-reads, from the flags (``actors.cli.settings_from_args``)."""

    auth_secret_file: str | None = None
    peer_list_file: str | None = None
    #: the flags' own peer lists; the file's are added to them
    allowed_peer_ips: tuple[str, ...] = ()
    denied_peer_ips: tuple[str, ...] = ()


@dataclass
class Admin:
    """The handlers behind the admin socket and the ``Disconnect``/``Drain``/``Reload``
    messages; runs on the loop thread only."""

    server: Server
    config: AdminConfig
    #: carry out what the core queued (the pipeline's drain) and re-arm its timer
    after_input: Callable[[], None]
    #: stop the relay with an exit code and a reason
    request_stop: Callable[[int, str], None]
    #: drop counts by reason, as ``relay.datagrams.dropped`` reports them
    drops: Callable[[], Mapping[str, int]]
    #: (datagrams, bytes) the XDP program relayed, when it runs
    xdp_totals: Callable[[], tuple[int, int] | None] = lambda: None
    #: what the XDP program relayed for the allocation on a port of a client, in the order of
    #: ``COUNTERS`` (``actors.offload.Offload.allocation_counts``; zeros without offload)
    xdp_counts: Callable[[int, FiveTuple], tuple[int, int, int, int]] = lambda _p, _c: (0,) * 4
    #: called by every reload after the files (e.g. the TLS certificate, once there is one)
    reload_hooks: list[Callable[[], str | None]] = field(default_factory=list)
    drain_deadline: float | None = None
    last_reload: dict[str, Any] = field(default_factory=dict)
    _top_last: tuple[float, dict[int, int]] = (0.0, {})
    _drain_timer: asyncio.TimerHandle | None = None

    # -- what the operator sees ----------------------------------------------------------

    def counters(self, allocation: Allocation) -> list[int]:
        """The allocation's traffic on every data path: what userspace counted (the core, its
        channels and the C route mirror) plus what the XDP program relayed."""
        xdp = self.xdp_counts(allocation.port, allocation.client)
        return [a + b for a, b in zip(allocation.traffic(), xdp, strict=True)]

    def session_row(
        self, allocation: Allocation, now: float, counters: list[int] | None = None
    ) -> dict[str, Any]:
        server = self.server
        ips = {Family.V4: server.public_ip4, Family.V6: server.public_ip6}
        if counters is None:
            counters = self.counters(allocation)
        row: dict[str, Any] = {
            "id": allocation.port,
            "username": allocation.username,
            "user": allocation.user,
            "client": _addr(allocation.client.remote),
            "transport": allocation.client.transport.name.lower(),
            "relayed": [_addr((ips[f] or "", allocation.port)) for f in allocation.families],
            "age_s": round(max(0.0, now - allocation.created_at), 1),
            "expires_in_s": round(max(0.0, allocation.expires_at - now), 1),
            "channels": sum(1 for c in allocation.channels.values() if c.bound),
            "permissions": len(allocation.permissions),
        }
        row.update(zip(COUNTERS, counters, strict=True))
        row["rate_limit_bps"] = server.config.allocation_rate_limit
        return row

    def sessions(self, query: dict[str, list[str]]) -> tuple[int, str, bytes]:
        user = _one(query, "user")
        now = time.monotonic()
        rows = [
            self.session_row(a, now)
            for a in self.server.allocations()
            if user is None or a.user == user or a.username == user
        ]
        rows.sort(key=lambda r: (r["user"], r["id"]))
        return _json(HTTPStatus.OK, {"sessions": rows})

    def stats(self, query: dict[str, list[str]]) -> tuple[int, str, bytes]:
        """Totals and the allocations with the most traffic since the last call (``top``)."""
        try:
            limit = min(MAX_TOP, max(0, int(_one(query, "top") or 10)))
        except ValueError:
            return _json(HTTPStatus.BAD_REQUEST, {"error": "top: not a number"})
        now = time.monotonic()
        server = self.server
        then, before = self._top_last
        elapsed = max(now - then, 1e-6)
        totals = [0, 0, 0, 0]
        seen: dict[int, int] = {}
        movers: list[tuple[float, Allocation, list[int]]] = []
        channels = 0
        for allocation in server.allocations():
            counters = self.counters(allocation)
            for i in range(4):
                totals[i] += counters[i]
            moved = counters[OUT_BYTES] + counters[IN_BYTES]
            seen[allocation.port] = moved
            movers.append((moved - before.get(allocation.port, moved), allocation, counters))
            channels += len(allocation.channels)
        self._top_last = (now, seen)
        movers.sort(key=lambda m: m[0], reverse=True)
        top = []
        for delta, allocation, counters in movers[:limit]:
            row = self.session_row(allocation, now, counters)
            row["bytes_per_s"] = round(delta / elapsed, 1) if then else 0.0
            top.append(row)
        stats = server.stats
        xdp = self.xdp_totals()
        body = {
            "time": time.time(),
            "allocations": server.num_allocations,
            "channels": server.num_active_channels,
            "draining": server.draining,
            "totals": dict(zip(COUNTERS, totals, strict=True)),
            "userspace": {
                "datagrams": stats.relayed_packets_userspace,
                "bytes": stats.relayed_bytes_userspace,
            },
            "xdp": None if xdp is None else {"datagrams": xdp[0], "bytes": xdp[1]},
            "drops": dict(self.drops()),
            "top": top,
        }
        return _json(HTTPStatus.OK, body)

    def matching(self, query: dict[str, list[str]]) -> tuple[int, ...] | str:
        """The ports ``?user=`` or ``?allocation=`` name, or what is wrong with the query."""
        user, allocation = _one(query, "user"), _one(query, "allocation")
        if (user is None) == (allocation is None):
            return "give exactly one of user= and allocation="
        if allocation is not None:
            port = allocation.rpartition(":")[2]
            if not port.isdigit() or len(port) > 5:
                return f"not an allocation id: {allocation[:40]!r}"
            return (int(port),) if self.server.allocation_on(int(port)) else ()
        return tuple(
            a.port for a in self.server.allocations() if a.user == user or a.username == user
        )

    # -- what the control actor is told -------------------------------------------------

    def disconnect(self, message: Disconnect) -> None:
        freed = 0
        for port in message.ports:
            allocation = self.server.allocation_on(port)
            if allocation is not None and self.server.disconnect(allocation):
                freed += 1
        if freed:
            self.after_input()
        logger.info("operator disconnected %d allocation(s)", freed)

    def drain(self, message: Drain) -> None:
        loop = asyncio.get_running_loop()
        if message.deadline is not None:
            deadline = loop.time() + max(0.0, message.deadline)
            if self.drain_deadline is None or deadline < self.drain_deadline:
                self.drain_deadline = deadline
        if self.server.draining:
            logger.info("draining (deadline moved)" if message.deadline else "already draining")
            return
        self.server.draining = True
        logger.info(
            "draining: new allocations refused, %d left%s",
            self.server.num_allocations,
            "" if message.deadline is None else f", exit within {message.deadline:g} s",
        )
        self._check_drained()

    def _check_drained(self) -> None:
        loop = asyncio.get_running_loop()
        if self.server.num_allocations == 0:
            self.request_stop(0, "drained: no allocation left")
            return
        if self.drain_deadline is not None and loop.time() >= self.drain_deadline:
            self.request_stop(0, f"drain deadline: {self.server.num_allocations} allocations left")
            return
        self._drain_timer = loop.call_later(DRAIN_CHECK_INTERVAL, self._check_drained)

    def reload(self) -> None:
        """Re-read what can change without a restart. A file that cannot be read or parsed is
        logged and leaves the relay as it was (the other parts still reload)."""
        report: dict[str, Any] = {"ok": True}
        config = self.config
        if config.auth_secret_file:
            try:
                secrets_ = read_secret_file(config.auth_secret_file)
                self.server.set_auth_secrets(secrets_)
                report["secrets"] = len(secrets_)
                logger.info("reload: %d accepted secret(s) from %s", len(secrets_),
                            config.auth_secret_file)  # fmt: skip
            except ValueError as exc:
                report.update(ok=False, secrets_error=str(exc))
                logger.error("reload: %s; the secrets stay as they were", exc)
        if config.peer_list_file:
            try:
                allowed, denied = read_peer_list_file(config.peer_list_file)
                self.server.set_peer_lists(
                    config.allowed_peer_ips + allowed, config.denied_peer_ips + denied
                )
                report["peer_lists"] = {"allow": len(allowed), "deny": len(denied)}
                logger.info("reload: %d allowed and %d denied peer ranges from %s",
                            len(allowed), len(denied), config.peer_list_file)  # fmt: skip
            except ValueError as exc:
                report.update(ok=False, peer_lists_error=str(exc))
                logger.error("reload: %s; the peer lists stay as they were", exc)
        for hook in self.reload_hooks:
            try:
                error = hook()
            except Exception as exc:
                error = f"{hook!r} failed: {exc}"
            if error:
                report.update(ok=False)
                report.setdefault("errors", []).append(error)
                logger.error("reload: %s", error)
        self.last_reload = report

    def stop(self) -> None:
        if self._drain_timer is not None:
            self._drain_timer.cancel()


def _one(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    return values[0] if values else None


def _addr(addr: tuple[str, int]) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _json(status: int, body: object) -> tuple[int, str, bytes]:
    return int(status), "application/json", (json.dumps(body) + "\n").encode()


# -- the endpoint --------------------------------------------------------------------------


LoopHandler = Callable[[dict[str, list[str]]], tuple[int, str, bytes]]


class AdminEndpoint(HttpEndpoint):
    """The admin routes on a Unix socket (mode 0600, peer credentials checked); handlers run
    on the loop (they read the core), so each must be quick."""

    def __init__(
        self, path: str, routes: Mapping[tuple[str, str], LoopHandler], required: bool = True
    ) -> None:
        super().__init__("admin", ("unix", 0), dict(routes))
        self.path = path
        #: whether a socket that cannot be made stops the relay (``--admin-socket`` given);
        #: else one warning, and the relay runs without the operator verbs
        self.required = required
        self._inode: int | None = None

    async def start(self) -> None:
        path = Path(self.path)
        try:
            path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            _clear_stale(path)
            old = os.umask(0o177)
            try:
                self._server = await asyncio.start_unix_server(
                    self._serve, str(path), limit=8192, backlog=32
                )
            finally:
                os.umask(old)
            os.chmod(path, 0o600)
            self._inode = path.stat().st_ino
        except OSError as exc:
            reason = (os.strerror(exc.errno) if exc.errno else str(exc)).lower()
            message = f"cannot create the admin socket {path}: {reason}"
            if self.required:
                raise StartupError(message) from None
            logger.warning("%s; the operator verbs are off (give --admin-socket)", message)
            return
        logger.info("admin socket at %s (root and uid %d only)", path, os.geteuid())

    def stop(self) -> None:
        super().stop()
        with contextlib.suppress(OSError):  # only our own file: another relay may own it now
            if self._inode is not None and os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        self._inode = None

    async def _one_request(self, reader: Any, writer: Any, conn: Any) -> None:
        sock = writer.get_extra_info("socket")
        uid = -1
        with contextlib.suppress(OSError, AttributeError):
            uid = _PEERCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            )[1]
        if uid not in (0, os.geteuid()):
            conn.reading = False
            logger.warning("admin socket: refused a request from uid %d", uid)
            body = b"only root and the relay's user may use the admin socket\n"
            await self._reply(writer, "GET", HTTPStatus.FORBIDDEN, "text/plain", body)
            return
        await super()._one_request(reader, writer, conn)

    async def _dispatch(self, method: str, target: str) -> tuple[int, str, bytes]:
        from urllib.parse import parse_qs, urlsplit

        try:
            url = urlsplit(target)
            query = parse_qs(url.query, keep_blank_values=True, max_num_fields=32)
        except ValueError:
            return HTTPStatus.BAD_REQUEST, "text/plain", b"Bad Request"
        route = self.routes.get((method, url.path))
        if route is None:
            known = any(path == url.path for _, path in self.routes)
            error = HTTPStatus.METHOD_NOT_ALLOWED if known else HTTPStatus.NOT_FOUND
            return error, "text/plain", error.phrase.encode()
        try:
            return route(query)
        except Exception as exc:
            logger.error("admin socket: %s %s failed: %r", method, url.path, exc)
            return 500, "text/plain", b"internal error"


def _clear_stale(path: Path) -> None:
    """Remove a socket file no relay listens on any more; refuse one a relay still serves."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(17, "a file that is not a socket is in the way")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()
            return
    raise OSError(98, "another relay is serving it (give --admin-socket or another "
                      "--control-endpoint)")  # fmt: skip


def admin_routes(admin: Admin, tell: Callable[[object], object]) -> Routes:
    """The routes of the admin socket; ``tell`` hands a message to the control actor."""
    # here, not at the top: the verbs' client imports this module and needs no pykka
    from firezone_relay.actors.messages import Reload

    def disconnect(query: dict[str, list[str]]) -> tuple[int, str, bytes]:
        ports = admin.matching(query)
        if isinstance(ports, str):
            return _json(HTTPStatus.BAD_REQUEST, {"error": ports})
        if not ports:
            return _json(HTTPStatus.NOT_FOUND, {"error": "no such allocation", "disconnected": 0})
        tell(Disconnect(ports))
        return _json(HTTPStatus.OK, {"disconnected": len(ports), "ids": list(ports)})

    def drain(query: dict[str, list[str]]) -> tuple[int, str, bytes]:
        text = _one(query, "deadline")
        deadline = None
        if text is not None:
            try:
                deadline = float(text)
            except ValueError:
                deadline = -1.0
            if not 0 <= deadline < 1e7:
                return _json(HTTPStatus.BAD_REQUEST, {"error": "deadline: seconds, 0 or more"})
        tell(Drain(deadline))
        return _json(HTTPStatus.OK, {"draining": True, "allocations": admin.server.num_allocations,
                                     "deadline_s": deadline})  # fmt: skip

    def reload(_query: dict[str, list[str]]) -> tuple[int, str, bytes]:
        admin.last_reload = {}
        tell(Reload("firezone-relay reload"))
        report = admin.last_reload or {"ok": False, "error": "reload did not run"}
        return _json(HTTPStatus.OK if report.get("ok") else HTTPStatus.CONFLICT, report)

    return {
        ("GET", "/sessions"): admin.sessions,
        ("GET", "/stats"): admin.stats,
        ("POST", "/disconnect"): disconnect,
        ("POST", "/drain"): drain,
        ("POST", "/reload"): reload,
    }
