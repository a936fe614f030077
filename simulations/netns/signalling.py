"""The out-of-band channel between NAT agents and the test: a tiny stand-in for the portal's
candidate exchange.

Agents connect to a Unix socket and speak JSON lines. Each agent says ``hello`` with its name,
then reports ``candidates`` (its relayed and server-reflexive addresses) and ``event`` lines.
The hub forwards an agent's candidates to its partner as a ``peer`` message, as the portal
relays ICE candidates between a client and a gateway, and lets the test push commands
(``credentials``, ``roam``, ``stats``) and wait for events.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

Message = dict[str, Any]


class Hub:
    """A threaded JSON-lines server on a Unix socket; see the module docstring."""

    def __init__(self, path: str, pairs: list[tuple[str, str]] | None = None) -> None:
        self.path = path
        self.partner: dict[str, str] = {}
        for a, b in pairs or []:
            self.partner[a] = b
            self.partner[b] = a
        self.events: list[Message] = []  # every message from agents, with "from"
        self.candidates: dict[str, Message] = {}
        self._conns: dict[str, socket.socket] = {}
        self._cond = threading.Condition()
        self._send_lock = threading.Lock()  # whole lines only, whichever thread sends
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Hub:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.path)
        listener.listen(8)
        self._listener = listener
        self._spawn(self._accept_loop, "hub-accept")
        return self

    def close(self) -> None:
        """Stop listening and hang up on every agent (agents exit when the hub goes)."""
        self._closed = True
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        with self._cond:
            conns = list(self._conns.values())
            self._cond.notify_all()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        for t in self._threads:
            t.join(1.0)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def __enter__(self) -> Hub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- talking to agents -----------------------------------------------------------------

    def send(self, name: str, message: Message) -> None:
        with self._cond:
            conn = self._conns.get(name)
        if conn is None:
            raise KeyError(f"agent {name!r} is not connected")
        with self._send_lock:
            conn.sendall((json.dumps(message) + "\n").encode())

    def wait_for(
        self, predicate: Callable[[list[Message]], Any], timeout: float, what: str = ""
    ) -> Any:
        """Wait until ``predicate(events)`` is truthy and return its value."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = predicate(self.events)
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    tail = "\n".join(json.dumps(e) for e in self.events[-15:])
                    raise TimeoutError(f"timed out waiting for {what or predicate}; last:\n{tail}")
                self._cond.wait(min(left, 0.5))

    def wait_event(
        self, name: str, event: str, timeout: float, since: int = 0, **match: Any
    ) -> Message:
        """The first ``event`` from agent ``name`` at index >= ``since`` matching ``match``."""

        def find(events: list[Message]) -> Message | None:
            for e in events[since:]:
                if (
                    e.get("from") == name
                    and e.get("event") == event
                    and all(e.get(k) == v for k, v in match.items())
                ):
                    return e
            return None

        return self.wait_for(find, timeout, f"{name}: {event} {match or ''}")  # type: ignore[no-any-return]

    def request(self, name: str, message: Message, reply: str, timeout: float = 5.0) -> Message:
        """Send a command and wait for the agent's ``reply`` event."""
        since = len(self.events)
        self.send(name, message)
        return self.wait_event(name, reply, timeout, since=since)

    def count(self, name: str, event: str, **match: Any) -> int:
        with self._cond:
            return sum(
                1
                for e in self.events
                if e.get("from") == name
                and e.get("event") == event
                and all(e.get(k) == v for k, v in match.items())
            )

    # -- internals -------------------------------------------------------------------------

    def _spawn(self, target: Callable[..., None], name: str, *args: Any) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self._spawn(self._reader, "hub-conn", conn)

    def _reader(self, conn: socket.socket) -> None:
        name: str | None = None
        with contextlib.suppress(OSError), conn.makefile("rb") as lines:
            for raw in lines:
                try:
                    msg = json.loads(raw)
                except ValueError:
                    continue
                if not isinstance(msg, dict):
                    continue
                kind = msg.get("type")
                if kind == "hello":
                    name = str(msg.get("name"))
                    with self._cond:
                        self._conns[name] = conn
                    self._forward_to(name)
                    self._record({"from": name, "event": "hello"})
                elif name is None:
                    continue
                elif kind == "candidates":
                    with self._cond:
                        self.candidates[name] = msg
                    partner = self.partner.get(name)
                    if partner is not None:
                        self._forward_to(partner)
                    self._record({"from": name, "event": "candidates", **msg})
                elif kind == "event":
                    self._record({"from": name, **msg})
        if name is not None:
            with self._cond:
                if self._conns.get(name) is conn:
                    del self._conns[name]
            self._record({"from": name, "event": "disconnected"})

    def _forward_to(self, name: str) -> None:
        """Give ``name`` its partner's latest candidates, if both are known."""
        partner = self.partner.get(name)
        with self._cond:
            cands = self.candidates.get(partner) if partner else None
            conn = self._conns.get(name)
        if cands is None or conn is None:
            return
        peer = {
            "type": "peer",
            "relay": cands.get("relay", {}),
            "srflx": cands.get("srflx", {}),
            "allocates": cands.get("allocates", True),
        }
        with contextlib.suppress(OSError), self._send_lock:
            conn.sendall((json.dumps(peer) + "\n").encode())

    def _record(self, event: Message) -> None:
        event.setdefault("at", time.monotonic())
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()
