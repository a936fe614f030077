"""Logging: human or JSON lines on stderr, levels set by RUST_LOG-style directives.

A directive string is a comma-separated list of ``level`` (the default for everything) or
``target=level`` items, e.g. ``info,relay=debug,relay.dataplane=trace``. Targets are Python logger
names (``::`` is accepted for ``.``); levels are ``off, error, warn, info, debug, trace``.
Directives can be replaced at run time (control endpoint ``POST /log_filter``).

Nothing the network sends may flood the log or print a traceback (a TURN server is attacked by
people without credentials), so the handler carries a :class:`FloodGuard`: each call site may
write ``FLOOD_BURST`` warnings and errors (``FLOOD_BURST_INFO`` info lines, so a busy relay keeps
its allocation lines; lines marked ``from_network`` get the smaller burst at any level) per
``FLOOD_INTERVAL`` seconds; the rest are counted and summarised ("suppressed K"). An exception
is rendered as one line (type, message and the innermost frame) unless its logger is enabled
for DEBUG, where the full traceback helps.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from opentelemetry import trace as otel_trace

__all__ = ["FloodGuard", "LogFilter", "configure", "parse_directives"]

#: lines one call site may log per interval (INFO and above) before it is suppressed
FLOOD_BURST = 10
FLOOD_BURST_INFO = 600
FLOOD_INTERVAL = 60.0

TRACE = 5
logging.addLevelName(TRACE, "TRACE")

_LEVELS = {
    "off": logging.CRITICAL + 10,
    "error": logging.ERROR,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "trace": TRACE,
}
#: Rust target names that mean our loggers
_ALIASES = {"firezone_relay": "relay", "relay_proto": "protocol"}
_TARGET = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*((\.|::)[A-Za-z_][A-Za-z0-9_]*)*$")
#: chatty libraries kept at warn unless a directive names them (like firezone_logging does)
_QUIET = {
    "grpc": logging.WARNING,
    "urllib3": logging.WARNING,
    "websockets": logging.INFO,
    "asyncio": logging.WARNING,
    "opentelemetry": logging.WARNING,
}


def parse_directives(text: str) -> tuple[int, dict[str, int]]:
    """Parse a directive string into (default level, {logger name: level}); ValueError if bad."""
    default = logging.INFO
    targets: dict[str, int] = {}
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        if "=" in item:
            target, _, level_name = item.partition("=")
            target, level_name = target.strip(), level_name.strip().lower()
            if not _TARGET.match(target):
                raise ValueError(f"invalid log target {target!r}")
            if level_name not in _LEVELS:
                raise ValueError(f"invalid log level {level_name!r}")
            name = target.replace("::", ".")
            targets[_ALIASES.get(name, name)] = _LEVELS[level_name]
        else:
            level_name = item.lower()
            if level_name not in _LEVELS:
                raise ValueError(f"invalid directive {item!r}")
            default = _LEVELS[level_name]
    return default, targets


@dataclass(slots=True)
class _Site:
    """One log call site's flood window."""

    start: float  # when the window began
    lines: int  # lines logged in the window
    suppressed: int  # lines dropped since the last report
    template: str  # the message, for the report


class FloodGuard(logging.Filter):
    """Per call site rate limit for the log handler; thread-safe.

    A site is ``(logger, file, line)``. DEBUG and TRACE lines pass untouched: an operator asked
    for them. ``flush`` logs one summary line per site that was suppressed.
    """

    def __init__(
        self,
        burst: int = FLOOD_BURST,
        interval: float = FLOOD_INTERVAL,
        burst_info: int = FLOOD_BURST_INFO,
    ) -> None:
        super().__init__()
        self.burst = burst
        self.burst_info = burst_info
        self.interval = interval
        self._lock = threading.Lock()
        self._sites: dict[tuple[str, str, int], _Site] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        template = record.msg
        if record.exc_info and not logging.getLogger(record.name).isEnabledFor(logging.DEBUG):
            _compact_exception(record)
        if record.levelno < logging.INFO or record.name == "relay.logs":
            return True
        site = (record.name, record.pathname, record.lineno)
        now = time.monotonic()
        with self._lock:
            state = self._sites.get(site)
            if state is None:
                if len(self._sites) >= 4096:  # bounded even against a bug that varies sites
                    self._sites.clear()
                state = self._sites[site] = _Site(now, 0, 0, str(template))
            if now - state.start >= self.interval:
                if state.suppressed:
                    record.msg = f"{record.msg} (suppressed {state.suppressed} like this before)"
                state.start, state.lines, state.suppressed = now, 0, 0
            state.lines += 1
            # lines the network can cause (``extra={"from_network": True}``) get the warnings'
            # burst at any level
            strict = record.levelno >= logging.WARNING or getattr(record, "from_network", False)
            if state.lines <= (self.burst if strict else self.burst_info):
                return True
            state.suppressed += 1
            return False

    def flush(self) -> None:
        """Log how many lines each site lost since its window began, and start anew."""
        with self._lock:
            lost = [
                (site, s.suppressed, s.template) for site, s in self._sites.items() if s.suppressed
            ]
            for site, *_ in lost:
                self._sites[site].suppressed = 0
        for (name, _, lineno), count, template in lost:
            logging.getLogger("relay.logs").warning(
                "suppressed %d log lines like %r (%s, line %d)", count, template[:200], name, lineno
            )


def _compact_exception(record: logging.LogRecord) -> None:
    """Fold ``exc_info`` into the message as one line: no traceback in production logs."""
    exc_info = record.exc_info
    if not exc_info or exc_info[1] is None:
        record.exc_info = None
        return
    exc = exc_info[1]
    where = ""
    frames = traceback.extract_tb(exc_info[2])
    if frames:
        last = frames[-1]
        where = f" at {'/'.join(last.filename.rsplit('/', 2)[-2:])}:{last.lineno}"
    record.msg = f"{record.getMessage()} [{type(exc).__name__}: {str(exc)[:200]!r}{where}]"
    record.args = None
    record.exc_info = None
    record.exc_text = None


class LogFilter:
    """Applies directive strings to Python loggers; safe to call from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._touched: set[str] = set()
        self.current = ""
        self.flood_guard: FloodGuard | None = None
        #: called with the directives after each change (a supervisor passes them on to its
        #: workers); from the thread that applied them
        self.on_change: list[Callable[[str], None]] = []

    def flush_suppressed(self) -> None:
        """Summarise what the flood guard held back (stats timer and shutdown call this)."""
        if self.flood_guard is not None:
            self.flood_guard.flush()

    def apply(self, text: str) -> None:
        default, targets = parse_directives(text)  # raises before changing anything
        with self._lock:
            for name in self._touched - targets.keys():
                logging.getLogger(name).setLevel(logging.NOTSET)
            for name, level in _QUIET.items():
                if name not in targets:
                    logging.getLogger(name).setLevel(max(level, default))
            for name, level in targets.items():
                logging.getLogger(name).setLevel(level)
            logging.getLogger().setLevel(default)
            self._touched = set(targets)
            self.current = text
        for listener in self.on_change:
            listener(text)


def _fields(record: logging.LogRecord) -> dict[str, object]:
    """The event's structured fields (``extra=log_fields(...)``), or none."""
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, dict) else {}


def _timestamp(record: logging.LogRecord) -> str:
    """RFC 3339 in UTC with microseconds, as tracing-subscriber's default timer prints it."""
    ts = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
    return ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _level(record: logging.LogRecord) -> str:
    """tracing's level names: TRACE, DEBUG, INFO, WARN, ERROR (CRITICAL is ERROR)."""
    if record.levelno >= logging.ERROR:
        return "ERROR"
    if record.levelno >= logging.WARNING:
        return "WARN"
    if record.levelno >= logging.INFO:
        return "INFO"
    return "DEBUG" if record.levelno >= logging.DEBUG else "TRACE"


def _target(record: logging.LogRecord) -> str:
    """The logger name as a Rust target (``relay.portal`` -> ``relay::portal``), the names
    RUST_LOG directives use."""
    return record.name.replace(".", "::")


def _current_span() -> dict[str, object] | None:
    """The current OpenTelemetry span as tracing-subscriber's JSON layer shows a span: its
    fields, then ``name``; None outside a recording span."""
    span = otel_trace.get_current_span()
    name = getattr(span, "name", None)
    if not span.is_recording() or not isinstance(name, str):
        return None
    attributes = getattr(span, "attributes", None) or {}
    return {**{k: v for k, v in attributes.items()}, "name": name}


class HumanFormatter(logging.Formatter):
    """``2025-01-01T12:00:00.123456Z  INFO relay::daemon: message key=value ...``"""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record)} {_level(record):>5} {_target(record)}: {record.getMessage()}"
        for key, value in _fields(record).items():
            line += f" {key}={value}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line in the shape of tracing-subscriber's JSON layer (Firezone's
    ``--log-format json``): ``timestamp``, ``level``, ``fields`` (``message`` first, then the
    event's fields), ``target``, and ``span`` / ``spans`` when a span is current."""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, object] = {"message": record.getMessage()}
        fields.update((k, v) for k, v in _fields(record).items() if k != "message")
        if record.exc_info:
            fields["error"] = self.formatException(record.exc_info)
        out: dict[str, object] = {
            "timestamp": _timestamp(record),
            "level": _level(record),
            "fields": fields,
            "target": _target(record),
        }
        span = _current_span()
        if span is not None:
            out["span"] = span
            out["spans"] = [span]
        return json.dumps(out, default=str)


def configure(fmt: str, directives: str, stream: TextIO | None = None) -> LogFilter:
    """Install one stderr handler with the chosen format and apply the initial directives."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else HumanFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    guard = FloodGuard()
    handler.addFilter(guard)
    root.addHandler(handler)
    log_filter = LogFilter()
    log_filter.flood_guard = guard
    try:
        log_filter.apply(directives)
    except ValueError as exc:
        log_filter.apply("info")
        logging.getLogger("relay").warning("ignoring bad log directives %r: %s", directives, exc)
    return log_filter
