"""Health (``/healthz``, ``/readyz``, ``/metrics``) and control (``/log_filter``) HTTP endpoints.

The health port faces the network (``0.0.0.0`` by default), so the server is built to be
attacked: it runs on the event loop (asyncio streams, no thread per connection) with a tiny,
strict HTTP/1.1 parser. Every request is bounded: the head by ``MAX_HEAD_BYTES``, the body by
``MAX_BODY_BYTES`` (a ``Content-Length`` that is not plain ASCII digits is a 400, a larger one
a 413), the whole request by ``REQUEST_TIMEOUT`` seconds, and the open connections by
``MAX_CONNECTIONS`` (when full, the oldest connection still sending its request is dropped,
so half-sent requests cannot lock out a health checker). One request per connection.

Route handlers run on a small fixed thread pool, so a slow ``/metrics`` collection never
stalls the loop; they only read thread-safe state (a readiness flag, the OpenTelemetry
readers, which lock internally, and the logging module, also locked).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

__all__ = ["HttpEndpoint", "Limits", "parse_host_port"]

logger = logging.getLogger("relay.http")

#: (method, path) -> handler(query) -> (status, content type, body)
Routes = dict[tuple[str, str], Callable[[dict[str, list[str]]], tuple[int, str, bytes]]]

_REQUEST_LINE = re.compile(rb"([A-Z]{1,16}) (/[\x21-\x7e]*) HTTP/1\.([01])")
_HEADER = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([\x20-\x7e\t]*?)[ \t]*")
_DIGITS = re.compile(rb"[0-9]{1,18}")


class Limits:
    """The bounds every endpoint enforces (class attributes, so tests can read them)."""

    MAX_HEAD_BYTES = 8192
    MAX_BODY_BYTES = 64 * 1024
    MAX_HEADERS = 64
    REQUEST_TIMEOUT = 5.0  # seconds for the whole request, head and body
    MAX_CONNECTIONS = 32  # per endpoint
    HANDLER_THREADS = 2  # shared by every endpoint of the process


class _BadRequest(Exception):
    def __init__(self, status: HTTPStatus) -> None:
        super().__init__(status.phrase)
        self.status = status


_pool: ThreadPoolExecutor | None = None


def _handler_pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(Limits.HANDLER_THREADS, thread_name_prefix="http")
    return _pool


def parse_host_port(text: str) -> tuple[str, int]:
    """``0.0.0.0:8080`` / ``[::]:8080`` -> (host, port); ValueError if malformed or the port
    is outside 1-65535 (the kernel would silently take it modulo 65536)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isascii() or not port.isdigit():
        raise ValueError(f"expected host:port, got {text!r}")
    if not 0 < int(port) <= 65535:
        raise ValueError(f"port {port} of {text!r} is outside 1-65535")
    host = host.strip("[]")
    return host or "0.0.0.0", int(port)


def parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    """Request line and headers -> (method, target, {lower-case name: value}).

    Strict on purpose: anything a well-behaved client would not send is a _BadRequest.
    """
    lines = head.split(b"\r\n")
    match = _REQUEST_LINE.fullmatch(lines[0])
    if match is None:
        raise _BadRequest(HTTPStatus.BAD_REQUEST)
    if len(lines) - 1 > Limits.MAX_HEADERS:
        raise _BadRequest(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        field = _HEADER.fullmatch(line)
        if field is None:  # also refuses obsolete line folding
            raise _BadRequest(HTTPStatus.BAD_REQUEST)
        name = field.group(1).decode().lower()
        value = field.group(2).decode()
        if name in headers:
            if name in ("content-length", "host", "transfer-encoding"):
                raise _BadRequest(HTTPStatus.BAD_REQUEST)
            value = f"{headers[name]}, {value}"
        headers[name] = value
    return match.group(1).decode(), match.group(2).decode(), headers


def body_length(headers: dict[str, str]) -> int:
    """The body size a request announces; _BadRequest if it is malformed or too large."""
    if "transfer-encoding" in headers:
        raise _BadRequest(HTTPStatus.NOT_IMPLEMENTED)
    text = headers.get("content-length")
    if text is None:
        return 0
    if _DIGITS.fullmatch(text.encode()) is None:
        raise _BadRequest(HTTPStatus.BAD_REQUEST)
    length = int(text)
    if length > Limits.MAX_BODY_BYTES:
        raise _BadRequest(HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
    return length


class _Connection:
    __slots__ = ("reading", "started", "writer")

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.started = time.monotonic()
        self.reading = True


class HttpEndpoint:
    """One HTTP server with a fixed route table, served on the running event loop."""

    def __init__(self, name: str, address: tuple[str, int], routes: Routes) -> None:
        self.name = name
        self.routes = routes
        self._host, self._port = address
        self.address: tuple[str, int] = address
        self._server: asyncio.AbstractServer | None = None
        #: open connections in the order they arrived (dicts keep insertion order)
        self._connections: dict[asyncio.Task[None], _Connection] = {}

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve,
            self._host,
            self._port,
            limit=Limits.MAX_HEAD_BYTES,
            backlog=Limits.MAX_CONNECTIONS,
            reuse_address=True,
        )
        sockname = self._server.sockets[0].getsockname()
        self.address = (sockname[0], sockname[1])
        logger.info("%s endpoint listening on %s:%d", self.name, *self.address)

    def stop(self) -> None:
        """Close the listening socket and every open connection (loop thread)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for task, conn in list(self._connections.items()):
            conn.writer.transport.abort()
            task.cancel()
        self._connections.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._connections) >= Limits.MAX_CONNECTIONS:
            self._evict_or_refuse(writer)
            if writer.transport.is_closing():
                return
        conn = _Connection(writer)
        self._connections[task] = conn
        try:
            await self._one_request(reader, writer, conn)
        except (ConnectionError, asyncio.CancelledError):
            pass
        except Exception as exc:  # never a traceback for what a client sent
            logger.debug("%s endpoint: dropped a connection: %r", self.name, exc)
        finally:
            self._connections.pop(task, None)
            if conn.reading:
                writer.transport.abort()
            else:
                writer.close()

    def _evict_or_refuse(self, writer: asyncio.StreamWriter) -> None:
        """Full: drop the oldest connection still sending its request, else refuse this one."""
        for task, conn in self._connections.items():
            if conn.reading:
                del self._connections[task]
                conn.writer.transport.abort()
                task.cancel()
                return
        writer.transport.abort()

    async def _one_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: _Connection
    ) -> None:
        method = "GET"
        try:
            async with asyncio.timeout(Limits.REQUEST_TIMEOUT):
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.LimitOverrunError:
                    raise _BadRequest(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE) from None
                except asyncio.IncompleteReadError:
                    return  # the client went away mid-request
                method, target, headers = parse_head(head[:-4])
                length = body_length(headers)
                if length:
                    await reader.readexactly(length)
        except _BadRequest as bad:
            conn.reading = False
            await self._reply(writer, method, bad.status, "text/plain", bad.status.phrase.encode())
            return
        except TimeoutError:
            return  # half-sent request: drop it
        conn.reading = False
        status, ctype, body = await self._dispatch(method, target)
        logger.debug("%s endpoint: %s %s -> %d", self.name, method, target[:100], status)
        await self._reply(writer, method, status, ctype, body)

    async def _dispatch(self, method: str, target: str) -> tuple[int, str, bytes]:
        try:
            url = urlsplit(target)
            query = parse_qs(url.query, keep_blank_values=True, max_num_fields=32)
        except ValueError:
            return HTTPStatus.BAD_REQUEST, "text/plain", b"Bad Request"
        route = self.routes.get(("GET" if method == "HEAD" else method, url.path))
        if route is None:
            known = any(path == url.path for _, path in self.routes)
            error = HTTPStatus.METHOD_NOT_ALLOWED if known else HTTPStatus.NOT_FOUND
            return error, "text/plain", error.phrase.encode()
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(_handler_pool(), route, query)
        except Exception as exc:
            logger.error("%s endpoint: %s %s failed: %r", self.name, method, url.path, exc)
            return 500, "text/plain", b"internal error"

    @staticmethod
    async def _reply(
        writer: asyncio.StreamWriter, method: str, status: int, ctype: str, body: bytes
    ) -> None:
        phrase = HTTPStatus(status).phrase
        head = (
            f"HTTP/1.1 {status} {phrase}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        writer.write(head if method == "HEAD" else head + body)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(Limits.REQUEST_TIMEOUT):
                await writer.drain()
