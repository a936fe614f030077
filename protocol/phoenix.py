"""Sans-IO client side of the Firezone portal's Phoenix channel (V1 JSON frames).

The relay talks to the portal over one websocket: it joins topic ``relay`` with its stamp
secret, heartbeats on topic ``phoenix`` and otherwise only listens (``init``, ``phx_close``,
``disconnect``). This module holds everything about that conversation that does not need a
socket or a clock, so it can be tested frame by frame with a fake clock:

* :func:`login_url`, :func:`user_agent` and :func:`parse_retry_after` build and read the HTTP
  side of the upgrade;
* :class:`PhoenixSession` is one websocket connection: frames in, frames and events out, and a
  timer deadline (join timeout, heartbeats);
* :class:`ReconnectPolicy` decides how long to wait between connections and when to give up.

Behaviour follows the Firezone relay at HEAD (see firezone-relay.md §3).
"""

from __future__ import annotations

import email.utils
import json
import math
import random
import urllib.parse
from collections import deque
from dataclasses import dataclass

#: Topic the relay joins, and the topic of Phoenix's socket-level heartbeats.
RELAY_TOPIC = "relay"
PHOENIX_TOPIC = "phoenix"

_SCHEMES = {"ws": "ws", "http": "ws", "wss": "wss", "https": "wss"}


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """Timers and limits of one connection (defaults: the Firezone relay at HEAD)."""

    heartbeat_interval: float = 10.0
    join_timeout: float = 5.0
    #: Reconnect once *more* than this many heartbeats are waiting for a reply.
    max_unanswered_heartbeats: int = 3
    #: Text frames longer than this (in characters) are ignored unparsed.
    max_frame_size: int = 64 * 1024
    topic: str = RELAY_TOPIC


@dataclass(frozen=True, slots=True)
class BackoffConfig:
    """Reconnect timing (defaults: backoff 0.4's ExponentialBackoff and the relay's limits)."""

    initial_interval: float = 0.5
    multiplier: float = 1.5
    randomization_factor: float = 0.5
    max_interval: float = 60.0
    #: MAX_PARTITION_TIME: give up once the portal has been gone this long after a join.
    max_elapsed: float = 24 * 3600.0
    #: Before the first successful join: a fixed interval and a short deadline.
    initial_phase_interval: float = 1.0
    initial_phase_max_elapsed: float = 15.0
    #: Upper bound on a honoured Retry-After, so a bogus header cannot park the relay.
    max_retry_after: float = 3600.0


# --------------------------------------------------------------------------------------------
# Events


@dataclass(frozen=True, slots=True)
class Joined:
    """The portal acknowledged the join: the relay is registered (ready)."""


@dataclass(frozen=True, slots=True)
class Init:
    """The portal's ``init`` push. The relay has nothing to take from it."""

    payload: object


@dataclass(frozen=True, slots=True)
class HeartbeatSent:
    ref: int


@dataclass(frozen=True, slots=True)
class Ignored:
    """Input that was dropped; ``quiet`` marks the expected kinds (worth a debug line only)."""

    reason: str
    quiet: bool = False


@dataclass(frozen=True, slots=True)
class Hiccup:
    """The connection is over but the relay should reconnect."""

    reason: str
    retry_after: float | None = None


@dataclass(frozen=True, slots=True)
class Fatal:
    """The portal connection cannot recover: the relay exits with code 1."""

    reason: str


Event = Joined | Init | HeartbeatSent | Ignored | Hiccup | Fatal


# --------------------------------------------------------------------------------------------
# The HTTP side of the upgrade


def login_url(
    api_url: str,
    *,
    port: int,
    name: str | None = None,
    ipv4: str | None = None,
    ipv6: str | None = None,
    token: str | None = None,
) -> str:
    """The websocket URL for a relay: ``<api_url>/relay/websocket?[token&]name&ipv4&ipv6&port``.

    ``http``/``ws`` map to ``ws`` and ``https``/``wss`` to ``wss``; other schemes raise
    ``ValueError``. The existing path is kept and any query, fragment or userinfo dropped.
    ``token`` is the legacy query-parameter form; normally it travels in a header.
    """
    try:
        parts = urllib.parse.urlsplit(api_url.strip())
        url_port = parts.port
    except ValueError as e:
        raise ValueError(f"invalid portal URL {api_url!r}: {e}") from None
    scheme = _SCHEMES.get(parts.scheme.lower())
    if scheme is None:
        raise ValueError(
            f"unsupported portal URL scheme {parts.scheme!r} in {api_url!r}: "
            "use ws, wss, http or https"
        )
    host = parts.hostname
    if not host:
        raise ValueError(f"portal URL {api_url!r} has no host")
    netloc = f"[{host}]" if ":" in host else host
    if url_port is not None:
        netloc = f"{netloc}:{url_port}"
    path = parts.path.rstrip("/") + "/relay/websocket"
    query: list[tuple[str, str]] = []
    if token is not None:
        query.append(("token", token))
    if name:
        query.append(("name", name))
    if ipv4:
        query.append(("ipv4", ipv4))
    if ipv6:
        query.append(("ipv6", ipv6))
    query.append(("port", str(port)))
    return urllib.parse.urlunsplit((scheme, netloc, path, urllib.parse.urlencode(query), ""))


def redact_url(url: str) -> str:
    """``url`` with the value of a ``token`` query parameter hidden, for logs."""
    parts = urllib.parse.urlsplit(url)
    query = [
        (k, "<redacted>" if k == "token" else v)
        for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    ]
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query, safe="<>")))


def user_agent(os_name: str, os_version: str, relay_version: str, arch: str, kernel: str) -> str:
    """Firezone's UA format, ``<os>/<ver> relay/<ver> (<arch>; <kernel>)``; the portal reads
    the relay version from the ``relay/<ver>`` token."""

    def token(s: str) -> str:
        return "".join(c for c in s if c.isprintable() and c not in " /;()") or "unknown"

    return (
        f"{token(os_name)}/{token(os_version)} relay/{token(relay_version)} "
        f"({token(arch)}; {token(kernel)})"
    )


def parse_retry_after(value: str | None, wall_now: float) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date), or None."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(int(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    try:
        return max(0.0, when.timestamp() - wall_now)
    except (OverflowError, OSError, ValueError):
        return None


# --------------------------------------------------------------------------------------------
# One connection


class PhoenixSession:
    """One websocket connection to the portal, from just after the upgrade to its end.

    Create it when the websocket is up (it queues the join at once), then feed it every
    received frame (:meth:`handle_frame`) and call :meth:`handle_timeout` when
    :meth:`poll_timeout` is due. Drain :meth:`next_frame` (text frames to send) and
    :meth:`next_event` after every call. After a :class:`Hiccup` or :class:`Fatal` the session
    is closed and ignores further input; a reconnect needs a new session (refs restart at 0).
    """

    def __init__(self, stamp_secret: str, now: float, config: SessionConfig | None = None) -> None:
        self._config = config if config is not None else SessionConfig()
        self._frames: deque[str] = deque()
        self._events: deque[Event] = deque()
        self._next_ref = 0
        self._joined = False
        self._closed = False
        self._outstanding_heartbeats: list[int] = []
        self._join_ref = self._push(self._config.topic, "phx_join", {"stamp_secret": stamp_secret})
        self._join_deadline = now + self._config.join_timeout
        self._heartbeat_at = now + self._config.heartbeat_interval

    # ---- state

    @property
    def joined(self) -> bool:
        return self._joined and not self._closed

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def unanswered_heartbeats(self) -> int:
        return len(self._outstanding_heartbeats)

    # ---- outputs

    def next_frame(self) -> str | None:
        return self._frames.popleft() if self._frames else None

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def poll_timeout(self) -> float | None:
        if self._closed:
            return None
        if not self._joined:
            return min(self._join_deadline, self._heartbeat_at)
        return self._heartbeat_at

    # ---- inputs

    def handle_timeout(self, now: float) -> None:
        if self._closed:
            return
        if not self._joined and now >= self._join_deadline:
            self._end(Hiccup(f"join not acknowledged within {self._config.join_timeout:g} s"))
            return
        if now < self._heartbeat_at:
            return
        self._heartbeat_at = now + self._config.heartbeat_interval
        if not self._joined:
            return  # held back: nothing is pipelined before the join reply
        if len(self._outstanding_heartbeats) > self._config.max_unanswered_heartbeats:
            self._end(Hiccup(f"{len(self._outstanding_heartbeats)} heartbeats unanswered"))
            return
        ref = self._push(PHOENIX_TOPIC, "heartbeat", {})
        self._outstanding_heartbeats.append(ref)
        self._events.append(HeartbeatSent(ref))

    def handle_frame(self, data: str | bytes, now: float) -> None:
        """One received websocket message. Never raises, whatever ``data`` holds."""
        if self._closed:
            return
        if not isinstance(data, str):
            self._ignore(f"binary frame of {len(data)} bytes")
            return
        if len(data) > self._config.max_frame_size:
            self._ignore(f"oversized frame of {len(data)} characters")
            return
        try:
            message = json.loads(data)
        except (ValueError, RecursionError):
            self._ignore(f"malformed frame {_excerpt(data)}")
            return
        if not isinstance(message, dict):
            self._ignore(f"frame is not a JSON object: {_excerpt(data)}")
            return
        topic = message.get("topic")
        event = message.get("event")
        if not isinstance(topic, str) or not isinstance(event, str):
            self._ignore(f"frame without topic or event: {_excerpt(data)}")
            return
        payload = message.get("payload")
        ref = _parse_ref(message.get("ref"))
        if event == "phx_reply":
            self._on_reply(topic, payload, ref, data)
        elif event == "phx_error":
            self._ignore(f"phx_error on topic {topic!r}", quiet=True)
        elif event == "phx_close":
            self._end(Hiccup(f"portal closed topic {topic!r}"))
        elif event == "disconnect":
            reason = payload.get("reason") if isinstance(payload, dict) else None
            if reason == "token_expired":
                self._end(Fatal("portal disconnected the relay: token expired"))
            else:
                self._ignore(f"disconnect with unknown reason: {_excerpt(data)}")
        elif event == "init" and topic == self._config.topic:
            self._events.append(Init(payload))
        else:
            self._ignore(f"unknown event {event!r} on topic {topic!r}")

    # ---- internals

    def _on_reply(self, topic: str, payload: object, ref: int | None, raw: str) -> None:
        if ref is None:
            self._ignore(f"reply without a ref: {_excerpt(raw)}")
            return
        if not isinstance(payload, dict) or payload.get("status") not in ("ok", "error"):
            self._ignore(f"reply without a valid status: {_excerpt(raw)}")
            return
        status = payload["status"]
        if ref == self._join_ref and not self._joined and topic == self._config.topic:
            if status == "ok":
                self._joined = True
                self._events.append(Joined())
            else:
                self._end(Fatal(f"portal refused the join: {_excerpt(payload.get('response'))}"))
            return
        if ref in self._outstanding_heartbeats:
            # Any answer proves the portal alive; older outstanding ones are moot.
            self._outstanding_heartbeats = [r for r in self._outstanding_heartbeats if r > ref]
            if status == "error":
                self._ignore(f"error reply to heartbeat {ref}: {_excerpt(raw)}")
            return
        self._ignore(f"reply with unknown ref {ref}", quiet=status == "ok")

    def _push(self, topic: str, event: str, payload: dict[str, str]) -> int:
        ref = self._next_ref
        self._next_ref += 1
        frame = {"topic": topic, "event": event, "payload": payload, "ref": ref}
        self._frames.append(json.dumps(frame, separators=(",", ":")))
        return ref

    def _ignore(self, reason: str, *, quiet: bool = False) -> None:
        self._events.append(Ignored(reason, quiet))

    def _end(self, event: Hiccup | Fatal) -> None:
        self._closed = True
        self._frames.clear()
        self._events.append(event)


def _parse_ref(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit() and len(value) < 20:
        return int(value)
    return None


def _excerpt(value: object, limit: int = 120) -> str:
    """A short, printable rendering of untrusted input for log lines."""
    text = value if isinstance(value, str) else repr(value)
    cut = text[:limit]
    cut = "".join(c if c.isprintable() else repr(c)[1:-1] for c in cut)
    return cut if len(text) <= limit else cut + "..."


# --------------------------------------------------------------------------------------------
# Reconnecting


class ReconnectPolicy:
    """How long to wait before the next connection attempt, and when to stop trying.

    Two phases. Until the first successful join, attempts are ``initial_phase_interval`` apart
    and the relay gives up after ``initial_phase_max_elapsed`` (a misconfigured relay should
    fail fast). After a join, the first retry is immediate, later ones follow a jittered
    exponential backoff, and the relay gives up once the partition has lasted ``max_elapsed``.
    A join resets the backoff. A Retry-After (capped) is a lower bound on the wait.
    """

    def __init__(self, rng: random.Random, config: BackoffConfig | None = None) -> None:
        self._config = config if config is not None else BackoffConfig()
        self._rng = rng
        self._started_at: float | None = None
        self._ever_joined = False
        self._partition_started_at: float | None = None
        self._current_interval = self._config.initial_interval

    @property
    def in_initial_phase(self) -> bool:
        return not self._ever_joined

    def start(self, now: float) -> None:
        """The first connection attempt begins."""
        self._started_at = now

    def joined(self, now: float) -> None:
        self._ever_joined = True
        self._partition_started_at = None
        self._current_interval = self._config.initial_interval

    def next_delay(self, now: float, retry_after: float | None = None) -> float | None:
        """An attempt failed (or a session ended) at ``now``: seconds until the next attempt,
        or None to give up."""
        c = self._config
        if not self._ever_joined:
            if self._started_at is None:
                self._started_at = now
            elapsed = now - self._started_at
            limit = c.initial_phase_max_elapsed
            delay = c.initial_phase_interval
        elif self._partition_started_at is None:
            self._partition_started_at = now
            elapsed = 0.0
            limit = c.max_elapsed
            delay = 0.0
        else:
            elapsed = now - self._partition_started_at
            limit = c.max_elapsed
            delay = self._randomized(self._current_interval)
            self._current_interval = min(self._current_interval * c.multiplier, c.max_interval)
        if retry_after is not None and math.isfinite(retry_after):
            delay = max(delay, min(max(retry_after, 0.0), c.max_retry_after))
        if elapsed + delay > limit:
            return None
        return delay

    def _randomized(self, interval: float) -> float:
        delta = self._config.randomization_factor * interval
        return interval - delta + self._rng.random() * 2 * delta
