"""Asyncio driver for the portal connection: websockets on the event loop around the sans-IO
:class:`protocol.phoenix.PhoenixSession` and :class:`protocol.phoenix.ReconnectPolicy`.

The relay's portal actor owns one :class:`PortalClient` and runs :meth:`PortalClient.run` as a
task on the event loop. ``run`` connects, joins, heartbeats and reconnects until it is
cancelled or the connection cannot recover; then it returns a :class:`Fatal` (and calls
``on_fatal``), after which the daemon exits with code 1. TURN service never depends on it: the
stamp secret is fixed at construction and nothing the portal sends can change it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import platform
import random
import socket
import ssl
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Status, StatusCode
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from firezone_relay.actors.version import relay_version
from firezone_relay.protocol.phoenix import (
    BackoffConfig,
    Fatal,
    HeartbeatSent,
    Hiccup,
    Ignored,
    Init,
    Joined,
    PhoenixSession,
    ReconnectPolicy,
    SessionConfig,
    login_url,
    parse_retry_after,
    redact_url,
    user_agent,
)

log = logging.getLogger("relay.portal")

#: Resolves a host name to IP addresses to try in order (called before every attempt).
Resolver = Callable[[str, int], Awaitable[list[str]]]


@dataclass(frozen=True)
class PortalConfig:
    """Where and how to reach the portal. All durations are in seconds."""

    api_url: str
    token: str
    listen_port: int = 3478
    name: str | None = None
    public_ip4: str | None = None
    public_ip6: str | None = None
    #: Also send the token as the pre-#11595 ``token`` query parameter.
    token_in_query: bool = False
    session: SessionConfig = field(default_factory=SessionConfig)
    backoff: BackoffConfig = field(default_factory=BackoffConfig)
    #: One whole attempt: DNS, TCP, TLS and the websocket upgrade.
    connect_timeout: float = 15.0
    close_timeout: float = 1.0
    #: Hard limit on a websocket message; beyond it the connection drops (a hiccup).
    max_message_size: int = 1024 * 1024
    #: TLS context for wss; None means the system's default, verifying, context.
    ssl_context: ssl.SSLContext | None = None
    user_agent: str | None = None

    def url(self) -> str:
        return login_url(
            self.api_url,
            port=self.listen_port,
            name=self.name,
            ipv4=self.public_ip4,
            ipv6=self.public_ip6,
            token=self.token if self.token_in_query else None,
        )


def default_user_agent(version: str | None = None) -> str:
    """``<os>/<ver> relay/<ver> (<arch>; <kernel>)`` for this machine."""
    os_name, os_version = platform.system() or "unknown", "unknown"
    with contextlib.suppress(OSError):
        release = platform.freedesktop_os_release()
        os_name = (release.get("NAME") or os_name).split()[0]
        os_version = release.get("VERSION_ID", os_version)
    return user_agent(
        os_name, os_version, version or relay_version(), platform.machine(), platform.release()
    )


async def resolve_host(host: str, port: int) -> list[str]:
    """All addresses of ``host`` in getaddrinfo's order, without duplicates."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    ips: list[str] = []
    for *_, sockaddr in infos:
        ip = str(sockaddr[0])
        if ip not in ips:
            ips.append(ip)
    return ips


class _Connect(connect):
    """websockets' connect, minus redirects: the portal never redirects a relay, and a
    redirect must not carry the token anywhere else."""

    def process_redirect(self, exc: Exception) -> Exception | str:
        return exc


class PortalClient:
    """Keeps the relay joined to the portal; see the module docstring."""

    def __init__(
        self,
        config: PortalConfig,
        stamp_secret: str,
        *,
        on_joined: Callable[[bool], None] | None = None,
        on_fatal: Callable[[str], None] | None = None,
        rng: random.Random | None = None,
        resolver: Resolver | None = None,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self._config = config
        # spans: portal.connect per attempt, portal.join, portal.reconnect, portal.fatal
        self._tracer = tracer or trace.NoOpTracer()
        self._attempt_context: Context | None = None
        self._join_span: trace.Span | None = None
        self._secret = stamp_secret
        self._url = config.url()  # raises ValueError for a bad FIREZONE_API_URL
        parts = urllib.parse.urlsplit(self._url)
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if parts.scheme == "wss" else 80)
        self._secure = parts.scheme == "wss"
        self._user_agent = config.user_agent or default_user_agent()
        self._on_joined = on_joined
        self._on_fatal = on_fatal
        self._policy = ReconnectPolicy(rng or random.Random(), config.backoff)
        self._resolver = resolver or resolve_host
        self._joined = False
        self.attempts = 0

    @property
    def joined(self) -> bool:
        return self._joined

    @property
    def url(self) -> str:
        """The websocket URL with any token redacted."""
        return redact_url(self._url)

    async def run(self) -> Fatal:
        """Connect and stay connected until cancelled; return the reason if it cannot."""
        loop = asyncio.get_running_loop()
        self._policy.start(loop.time())
        try:
            while True:
                outcome = await self._attempt()
                if isinstance(outcome, Fatal):
                    return self._fatal(outcome)
                delay = self._policy.next_delay(loop.time(), outcome.retry_after)
                if delay is None:
                    limit = (
                        self._config.backoff.initial_phase_max_elapsed
                        if self._policy.in_initial_phase
                        else self._config.backoff.max_elapsed
                    )
                    return self._fatal(
                        Fatal(f"portal unreachable for {limit:g} s; last error: {outcome.reason}")
                    )
                log.info(
                    "Portal connection hiccup: %s; reconnecting in %.2f s", outcome.reason, delay
                )
                with self._tracer.start_as_current_span(
                    "portal.reconnect",
                    context=self._attempt_context,
                    attributes={
                        "portal.reconnect.reason": outcome.reason,
                        "portal.reconnect.backoff_s": round(delay, 3),
                    },
                ):
                    await asyncio.sleep(delay)
        finally:
            self._set_joined(False)

    # ---- one connection

    async def _attempt(self) -> Hiccup | Fatal:
        self.attempts += 1
        connect = self._tracer.start_span(
            "portal.connect", attributes={"url.full": self.url, "portal.attempt": self.attempts}
        )
        self._attempt_context = trace.set_span_in_context(connect)
        try:
            async with asyncio.timeout(self._config.connect_timeout):
                ws = await self._open()
        except InvalidStatus as e:
            return _ended(connect, self._http_failure(e))
        except TimeoutError:
            return _ended(
                connect, Hiccup(f"connect timed out after {self._config.connect_timeout:g} s")
            )
        except Exception as e:  # any failure to connect is retried, never a crash
            return _ended(connect, Hiccup(f"connect failed: {_describe(e)}"))
        except BaseException:
            connect.end()
            raise
        connect.end()
        log.info("Connected to portal at %s", self.url)
        self._join_span = self._tracer.start_span("portal.join", context=self._attempt_context)
        try:
            outcome = await self._serve(ws)
            self._end_join(outcome.reason)
            return outcome
        finally:
            self._end_join("stopped")
            self._set_joined(False)
            with contextlib.suppress(Exception):
                await ws.close()

    async def _open(self) -> ClientConnection:
        ips = await self._resolver(self._host, self._port)
        if not ips:
            raise OSError(f"no addresses for {self._host}")
        kwargs: dict[str, Any] = {}  # Any: websockets' connect takes extra keywords as Any
        if self._secure:
            kwargs["ssl"] = self._config.ssl_context or ssl.create_default_context()
        last: OSError | None = None
        for ip in ips:
            try:
                return await _Connect(
                    self._url,
                    additional_headers={"X-Authorization": f"Bearer {self._config.token}"},
                    user_agent_header=self._user_agent,
                    compression=None,
                    proxy=None,
                    open_timeout=None,
                    ping_interval=None,
                    close_timeout=self._config.close_timeout,
                    max_size=self._config.max_message_size,
                    host=ip,
                    port=self._port,
                    **kwargs,
                )
            except OSError as e:  # refused or unreachable: try the next address
                last = e
        assert last is not None
        raise last

    async def _serve(self, ws: ClientConnection) -> Hiccup | Fatal:
        loop = asyncio.get_running_loop()
        session = PhoenixSession(self._secret, loop.time(), self._config.session)
        try:
            while True:
                while (frame := session.next_frame()) is not None:
                    await ws.send(frame)
                while (event := session.next_event()) is not None:
                    if isinstance(event, Hiccup | Fatal):
                        return event
                    self._on_event(event, loop.time())
                try:
                    async with asyncio.timeout_at(session.poll_timeout()):
                        message = await ws.recv()
                except TimeoutError:
                    session.handle_timeout(loop.time())
                    continue
                session.handle_frame(message, loop.time())
        except ConnectionClosed as e:
            return Hiccup(f"websocket closed: {_describe(e)}")

    def _on_event(self, event: Joined | Init | HeartbeatSent | Ignored, now: float) -> None:
        if isinstance(event, Joined):
            log.info("Joined the relay room on the portal")
            self._end_join(None)
            self._policy.joined(now)
            self._set_joined(True)
        elif isinstance(event, Init):
            log.debug("Received init from the portal (nothing to do)")
        elif isinstance(event, HeartbeatSent):
            log.debug("Sent heartbeat %d", event.ref)
        else:
            log.log(
                logging.DEBUG if event.quiet else logging.WARNING,
                "Ignoring input from the portal: %s",
                event.reason,
            )

    def _http_failure(self, e: InvalidStatus) -> Hiccup | Fatal:
        response = e.response
        text = response.body.decode("utf-8", "replace").strip()[:200] if response.body else ""
        body = "".join(c if c.isprintable() else " " for c in text)
        reason = f"HTTP {response.status_code}" + (f" - {body}" if body else "")
        if response.status_code == 401:
            return Fatal(f"portal rejected the token: {reason}")
        retry_after = parse_retry_after(response.headers.get("Retry-After"), time.time())
        return Hiccup(reason, retry_after)

    # ---- callbacks

    def _set_joined(self, joined: bool) -> None:
        if joined == self._joined:
            return
        self._joined = joined
        if self._on_joined is not None:
            try:
                self._on_joined(joined)
            except Exception:
                log.exception("on_joined callback failed")

    def _end_join(self, error: str | None) -> None:
        span, self._join_span = self._join_span, None
        if span is not None:
            if error is not None:
                span.set_status(Status(StatusCode.ERROR, error))
            span.end()

    def _fatal(self, outcome: Fatal) -> Fatal:
        log.error("Portal connection failed, the relay must exit: %s", outcome.reason)
        span = self._tracer.start_span(
            "portal.fatal",
            context=self._attempt_context,
            attributes={"portal.fatal.reason": outcome.reason, "portal.attempts": self.attempts},
        )
        _ended(span, outcome)
        self._set_joined(False)
        if self._on_fatal is not None:
            try:
                self._on_fatal(outcome.reason)
            except Exception:
                log.exception("on_fatal callback failed")
        return outcome


def _ended(span: trace.Span, outcome: Hiccup | Fatal) -> Hiccup | Fatal:
    """End ``span`` as failed with the outcome's reason; returns the outcome."""
    span.set_status(Status(StatusCode.ERROR, outcome.reason))
    span.end()
    return outcome


def _describe(e: BaseException) -> str:
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
