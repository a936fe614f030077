"""Health (``/healthz``, ``/readyz``, ``/metrics``) and control (``/log_filter``) HTTP endpoints.

They run on the standard library's ``ThreadingHTTPServer`` in threads of their own, so a slow
scraper can never stall the event loop. Handlers only read thread-safe state: a readiness flag,
the OpenTelemetry readers (which lock internally) and the logging module (also locked).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

__all__ = ["HttpEndpoint", "parse_host_port"]

logger = logging.getLogger("relay.http")

#: (method, path) -> handler(query) -> (status, content type, body)
Routes = dict[tuple[str, str], Callable[[dict[str, list[str]]], tuple[int, str, bytes]]]


def parse_host_port(text: str) -> tuple[str, int]:
    """``0.0.0.0:8080`` / ``[::]:8080`` -> (host, port); ValueError if malformed."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected host:port, got {text!r}")
    host = host.strip("[]")
    return host or "0.0.0.0", int(port)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        route = self.server.routes.get((method, url.path))
        if route is None:
            known = any(path == url.path for _, path in self.server.routes)
            error = HTTPStatus.METHOD_NOT_ALLOWED if known else HTTPStatus.NOT_FOUND
            self._reply(error, "text/plain", error.phrase.encode())
            return
        try:
            status, ctype, body = route(parse_qs(url.query, keep_blank_values=True))
        except Exception:
            logger.exception("HTTP handler for %s %s failed", method, url.path)
            status, ctype, body = 500, "text/plain", b"internal error"
        self._reply(status, ctype, body)

    def _reply(self, status: int, ctype: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(min(length, 65536))
        self._dispatch("POST")

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    routes: Routes


class _Server6(_Server):
    address_family = socket.AF_INET6


class HttpEndpoint:
    """One HTTP server with a fixed route table, served on a daemon thread."""

    def __init__(self, name: str, address: tuple[str, int], routes: Routes) -> None:
        host, port = address
        server_cls = _Server6 if ":" in host else _Server
        self._server = server_cls((host, port), _Handler)
        self._server.routes = routes
        self.name = name
        self.address = self._server.server_address[:2]
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name=f"http-{name}",
            daemon=True,
        )

    def start(self) -> None:
        self._thread.start()
        logger.info("%s endpoint listening on %s:%d", self.name, *self.address)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
