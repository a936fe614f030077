"""The operator verbs of ``firezone-relay``: ``sessions``, ``disconnect``, ``drain``, ``reload``
and ``top``, each a short HTTP request to the running relay's admin socket (``actors.admin``).

The socket is found from the same ``--control-endpoint`` / ``CONTROL_ENDPOINT`` the relay was
started with (``/run/firezone-relay/control-<port>.sock``), or ``--admin-socket``. Only root
and the relay's own user get an answer; anyone else gets one line saying so, exit 1.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlencode

__all__ = ["VERBS", "AdminClient", "AdminError"]

TIMEOUT = 10.0


class AdminError(Exception):
    """The relay could not be asked, or refused; the message is one line for the operator."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class AdminClient:
    """Requests to one relay's admin socket."""

    def __init__(self, path: str, timeout: float = TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout

    def request(self, method: str, route: str, **query: object) -> dict[str, Any]:
        params = {k: v for k, v in query.items() if v is not None}
        target = route + (f"?{urlencode(params)}" if params else "")
        conn = _UnixConnection(self.path, self.timeout)
        try:
            try:
                conn.request(method, target, body=b"" if method == "POST" else None)
            except (BrokenPipeError, ConnectionResetError):
                # A refused caller's 403 can be answered and closed before the request is
                # written: the answer is still there to read.
                pass
            response = conn.getresponse()
            status, body = response.status, response.read()
        except PermissionError:
            raise AdminError(
                f"permission denied on {self.path}: only root and the relay's user may use "
                "the operator verbs"
            ) from None
        except (FileNotFoundError, ConnectionRefusedError):
            raise AdminError(
                f"no relay answers on {self.path} (is it running? it is found from "
                "--control-endpoint / CONTROL_ENDPOINT, or give --admin-socket)"
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            raise AdminError(f"talking to the relay on {self.path}: {exc}") from None
        finally:
            conn.close()
        if status == 403:
            raise AdminError(body.decode(errors="replace").strip() or "forbidden")
        try:
            answer = json.loads(body)
        except ValueError:
            raise AdminError(f"the relay answered {status}: {body[:200]!r}") from None
        if not isinstance(answer, dict):
            raise AdminError(f"the relay answered {status} with {type(answer).__name__}")
        if status >= 400 and status != 404:
            raise AdminError(str(answer.get("error") or answer))
        answer.setdefault("_status", status)
        return answer


def _parser(verb: str, description: str) -> argparse.ArgumentParser:
    from firezone_relay.actors.subcommands import verb_parser

    p = verb_parser(verb, description)
    p.add_argument(
        "--control-endpoint",
        default=os.environ.get("CONTROL_ENDPOINT") or "127.0.0.1:9999",
        help="the relay's --control-endpoint; its admin socket is found from it "
        "[env: CONTROL_ENDPOINT]",
    )
    p.add_argument(
        "--admin-socket",
        default=os.environ.get("ADMIN_SOCKET") or None,
        metavar="PATH",
        help="the relay's admin socket, when it was started with --admin-socket "
        "[env: ADMIN_SOCKET]",
    )
    return p


def _client(parser: argparse.ArgumentParser, args: argparse.Namespace) -> AdminClient:
    from firezone_relay.actors.admin import admin_socket_path

    try:
        path = admin_socket_path(args.control_endpoint, args.admin_socket)
    except ValueError as exc:
        parser.error(f"--control-endpoint: {exc}")
    if path is None:
        parser.error("no admin socket: give --admin-socket or --control-endpoint")
    return AdminClient(path)


def _run(body: Callable[[], int]) -> int:
    try:
        return body()
    except AdminError as exc:
        print(f"firezone-relay: {exc}", file=sys.stderr)
        return 1


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


SESSION_COLUMNS = ("ID", "USER", "CLIENT", "RELAYED", "AGE", "LEFT", "CH", "PERM",
                   "TO PEER", "TO CLIENT")  # fmt: skip


def session_lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The ``sessions`` table: one row per allocation."""
    workers = any("worker" in r for r in rows)  # a relay of several workers says whose
    columns = ("WORKER", *SESSION_COLUMNS) if workers else SESSION_COLUMNS
    table = [columns]
    for r in rows:
        table.append(
            (
                *((str(r.get("worker", "")),) if workers else ()),
                str(r["id"]),
                str(r["username"]),
                f"{r['client']}/{r['transport']}",
                ",".join(r["relayed"]),
                _duration(r["age_s"]),
                _duration(r["expires_in_s"]),
                str(r["channels"]),
                str(r["permissions"]),
                f"{r['to_peer_datagrams']} dg {human_bytes(r['to_peer_bytes'])}",
                f"{r['to_client_datagrams']} dg {human_bytes(r['to_client_bytes'])}",
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in table]  # fmt: skip


def sessions_main(argv: Sequence[str]) -> int:
    p = _parser("sessions", "List the running relay's allocations, one row each.")
    p.add_argument("--user", help="only this user (the part after '<expiry>:') or username")
    p.add_argument("--json", action="store_true", help="print JSON, one object per allocation")
    args = p.parse_args(argv)
    client = _client(p, args)

    def body() -> int:
        rows = client.request("GET", "/sessions", user=args.user)["sessions"]
        if args.json:
            print(json.dumps(rows, indent=1))
        else:
            print("\n".join(session_lines(rows)))
        return 0

    return _run(body)


def disconnect_main(argv: Sequence[str]) -> int:
    p = _parser("disconnect", "Free allocations at once: the client's next request gets 437.")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", help="every allocation of this user (or username)")
    who.add_argument("--allocation", metavar="ID", help="the allocation with this ID (its port)")
    args = p.parse_args(argv)
    client = _client(p, args)

    def body() -> int:
        answer = client.request("POST", "/disconnect", user=args.user, allocation=args.allocation)
        if answer["_status"] == 404:
            print("firezone-relay: no such allocation", file=sys.stderr)
            return 1
        print(f"disconnected {answer['disconnected']} allocation(s): "
              f"{', '.join(map(str, answer['ids']))}")  # fmt: skip
        return 0

    return _run(body)


def drain_main(argv: Sequence[str]) -> int:
    p = _parser(
        "drain",
        "Stop taking allocations (/readyz 503, new Allocates 508) and exit 0 when the last "
        "allocation ends, or at the deadline. SIGUSR1 does the same without a deadline.",
    )
    p.add_argument("--deadline", type=float, metavar="S", help="exit after S seconds at most")
    args = p.parse_args(argv)
    if args.deadline is not None and not 0 <= args.deadline < 1e7:
        p.error("--deadline: seconds, 0 or more")
    client = _client(p, args)

    def body() -> int:
        answer = client.request("POST", "/drain", deadline=args.deadline)
        until = "" if args.deadline is None else f", exiting within {args.deadline:g} s"
        print(f"draining: {answer['allocations']} allocation(s) left{until}")
        return 0

    return _run(body)


def reload_main(argv: Sequence[str]) -> int:
    p = _parser(
        "reload",
        "Re-read --auth-secret-file and --peer-list-file (SIGHUP does the same).",
    )
    args = p.parse_args(argv)
    client = _client(p, args)

    def body() -> int:
        answer = client.request("POST", "/reload")
        parts = []
        if "secrets" in answer:
            parts.append(f"{answer['secrets']} secret(s)")
        if "peer_lists" in answer:
            lists = answer["peer_lists"]
            parts.append(f"{lists['allow']} allowed and {lists['deny']} denied peer range(s)")
        print("reloaded" + (": " + ", ".join(parts) if parts else " (nothing to re-read)"))
        return 0

    return _run(body)


def top_main(argv: Sequence[str]) -> int:
    p = _parser("top", "A live view of the running relay, refreshed every second; q quits.")
    p.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)
    p.add_argument("--iterations", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    client = _client(p, args)
    from firezone_relay.actors.top import run_top

    return _run(lambda: run_top(client, args.interval, args.iterations))


#: verb -> main(argv)
VERBS: Mapping[str, Callable[[Sequence[str]], int]] = {
    "sessions": sessions_main,
    "disconnect": disconnect_main,
    "drain": drain_main,
    "reload": reload_main,
    "top": top_main,
}
