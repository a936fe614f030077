"""A tiny HTTP server for one file whose transfer the test can stop at an exact byte.

The NAT suite disturbs a download "mid-transfer". Timing (a rate-limited curl and polling)
cannot promise that the disruption lands before curl finishes, so the server itself holds:
``hold N`` on stdin makes every response stop after byte N of the body and wait; ``hold M``
(M > N) lets it go on to byte M; ``release`` lets it finish. Each command is acknowledged with
``ok`` on stdout once it is in force, so a hold the test has seen acknowledged before it starts
the download is exact (one given while a response is running binds from its next chunk).
Stdlib only: it runs as ``python -m`` in the gateway's namespace.

Usage: ``python -m tests.integration.gated_web PORT FILE`` (serves FILE as ``/<name>``).
"""

from __future__ import annotations

import http.server
import os
import socket
import sys
import threading
from pathlib import Path

CHUNK = 64 * 1024


class Gate:
    """How far into the body responses may go; None = to the end."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._limit: int | None = None

    def set(self, limit: int | None) -> None:
        with self._cond:
            self._limit = limit
            self._cond.notify_all()

    def allowed(self, sent: int, size: int) -> int:
        """Block while the gate is at ``sent``; then how many more bytes may go."""
        with self._cond:
            self._cond.wait_for(lambda: self._limit is None or self._limit > sent)
            end = size if self._limit is None else min(size, self._limit)
        return end - sent


GATE = Gate()


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves the one file, with its Content-Length, through :data:`GATE`."""

    server_version = "gated-web"
    path_served: Path

    def do_HEAD(self) -> None:
        self._respond(body=False)

    def do_GET(self) -> None:
        self._respond(body=True)

    def _respond(self, body: bool) -> None:
        if self.path != "/" + self.path_served.name:
            self.send_error(404)
            return
        size = self.path_served.stat().st_size
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size))
        self.end_headers()
        if not body:
            return
        with self.path_served.open("rb") as f:
            sent = 0
            while sent < size:
                data = f.read(min(CHUNK, GATE.allowed(sent, size)))
                self.wfile.write(data)
                sent += len(data)


class Server(http.server.ThreadingHTTPServer):
    """Dual-stack on ``::``."""

    address_family = socket.AF_INET6
    daemon_threads = True

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def control() -> None:
    """Read commands from stdin until EOF (the test has gone: exit)."""
    for line in sys.stdin:
        words = line.split()
        if words[:1] == ["hold"] and len(words) == 2 and words[1].isdigit():
            GATE.set(int(words[1]))
        elif words == ["release"]:
            GATE.set(None)
        else:
            print(f"error: unknown command {line.strip()!r}", flush=True)
            continue
        print("ok", flush=True)
    os._exit(0)


def main() -> None:
    port, path = int(sys.argv[1]), Path(sys.argv[2]).resolve()
    Handler.path_served = path
    server = Server(("::", port), Handler)
    threading.Thread(target=control, daemon=True).start()
    server.serve_forever()


if __name__ == "__main__":
    main()
