"""Startup failures an operator can act on: which socket, which address, what went wrong.

A bind error from the kernel says ``[Errno 98] Address already in use``; the operator needs
``cannot bind the health endpoint on 0.0.0.0:8080: address already in use``.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["StartupError", "binding"]

_HINTS = {
    errno.EACCES: "ports below 1024 need root or CAP_NET_BIND_SERVICE",
    errno.EADDRNOTAVAIL: "the address is not on any interface of this host",
}


class StartupError(Exception):
    """The relay cannot start; the message is complete and meant for the operator."""


def describe(host: str, port: int) -> str:
    """``0.0.0.0:8080`` / ``[::]:3478``."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@contextmanager
def binding(what: str, host: str, port: int) -> Iterator[None]:
    """Turn an OSError raised while binding ``what`` into a :class:`StartupError` that names
    the socket and the address."""
    try:
        yield
    except OSError as exc:
        # asyncio's servers wrap the kernel's words in their own sentence: take the errno's
        reason = (os.strerror(exc.errno) if exc.errno else exc.strerror or str(exc)).lower()
        hint = _HINTS.get(exc.errno or 0)
        message = f"cannot bind the {what} on {describe(host, port)}: {reason}"
        raise StartupError(f"{message} ({hint})" if hint else message) from None
