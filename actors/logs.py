"""Logging: human or JSON lines on stderr, levels set by RUST_LOG-style directives.

A directive string is a comma-separated list of ``level`` (the default for everything) or
``target=level`` items, e.g. ``info,relay=debug,relay.dataplane=trace``. Targets are Python logger
names (``::`` is accepted for ``.``); levels are ``off, error, warn, info, debug, trace``.
Directives can be replaced at run time (control endpoint ``POST /log_filter``).
"""

from __future__ import annotations

import datetime
import json
import logging
import re
import sys
import threading
from typing import Any, TextIO

__all__ = ["LogFilter", "configure", "parse_directives"]

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


class LogFilter:
    """Applies directive strings to Python loggers; safe to call from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._touched: set[str] = set()
        self.current = ""

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


class HumanFormatter(logging.Formatter):
    """``2025-01-01T12:00:00.123456Z  INFO relay.daemon: message``"""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        line = (
            f"{ts.strftime('%Y-%m-%dT%H:%M:%S.%f')}Z {_short(record.levelname):>5} "
            f"{record.name}: {record.getMessage()}"
        )
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the fields log collectors expect."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        out: dict[str, Any] = {
            "timestamp": ts.isoformat().replace("+00:00", "Z"),
            "level": record.levelname,
            "target": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out["fields"] = fields
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure(fmt: str, directives: str, stream: TextIO | None = None) -> LogFilter:
    """Install one stderr handler with the chosen format and apply the initial directives."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else HumanFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    log_filter = LogFilter()
    try:
        log_filter.apply(directives)
    except ValueError as exc:
        log_filter.apply("info")
        logging.getLogger("relay").warning("ignoring bad log directives %r: %s", directives, exc)
    return log_filter


def _short(levelname: str) -> str:
    return "WARN" if levelname == "WARNING" else levelname
