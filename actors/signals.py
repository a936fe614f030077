"""What each signal does to the relay, in one place; none ends it without a log line.

* SIGTERM, SIGINT: stop cleanly (free every allocation, detach XDP), exit 0.
* SIGHUP: reload (``actors.admin``; ``systemctl reload`` sends it). The relay keeps running.
* SIGUSR1: drain (no new allocations; exit 0 once the last one is gone).
* SIGUSR2: logged and ignored (its default would kill the relay silently).
* SIGQUIT, SIGALRM, SIGVTALRM, SIGPROF, SIGIO, SIGPWR, SIGXCPU, SIGSYS (whose default is to
  end the process): stop cleanly too, but exit 128 + the signal's number, so systemd's
  ``Restart=on-failure`` brings the relay back.
* SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT: ``faulthandler`` writes which signal and where.
* SIGKILL cannot be caught; systemd logs it.

The event loop's handlers (``Relay.run``) turn these into control messages. Before the loop
runs (flags, cloud metadata discovery), :func:`install_startup_handlers` does the same with
plain Python handlers.
"""

from __future__ import annotations

import faulthandler
import logging
import signal
import sys
from types import FrameType
from typing import Final

__all__ = [
    "DRAIN",
    "FAILURE_EXIT",
    "IGNORED",
    "RELOAD",
    "STOP_CLEAN",
    "install_startup_handlers",
]

logger = logging.getLogger("relay")

STOP_CLEAN: Final = (signal.SIGTERM, signal.SIGINT)
RELOAD: Final = signal.SIGHUP
DRAIN: Final = signal.SIGUSR1
IGNORED: Final = (signal.SIGUSR2,)
#: signals whose default is to end the process: stop, and exit 128 + n (a failure)
FAILURE_EXIT: Final = tuple(
    getattr(signal, name)
    for name in (
        "SIGQUIT",
        "SIGALRM",
        "SIGVTALRM",
        "SIGPROF",
        "SIGIO",
        "SIGPWR",
        "SIGXCPU",
        "SIGSYS",
    )
    if hasattr(signal, name)
)


def exit_code(sig: int) -> int:
    """The exit code after ``sig``: 0 for a requested stop, 128 + n otherwise."""
    return 0 if sig in STOP_CLEAN else 128 + sig


def _on_startup_signal(sig: int, _frame: FrameType | None) -> None:
    name = signal.Signals(sig).name
    if sig in (RELOAD, DRAIN) or sig in IGNORED:
        logger.info("%s received while starting: ignored", name)
        return
    logger.info("%s received while starting: exiting", name)
    raise SystemExit(exit_code(sig))


def install_startup_handlers() -> None:
    """Handle every signal above before the event loop takes them over."""
    faulthandler.enable(file=sys.stderr)
    for sig in (*STOP_CLEAN, RELOAD, DRAIN, *IGNORED, *FAILURE_EXIT):
        signal.signal(sig, _on_startup_signal)
