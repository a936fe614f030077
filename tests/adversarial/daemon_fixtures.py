"""Fixtures of the daemon attacks: the system tests' daemon fixtures, plus a daemon under a
small descriptor limit (``prlimit --nofile=N``). Imported by the test module (not a conftest,
so the suite's other adversarial modules keep their own fixtures)."""

from __future__ import annotations

import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from simulations.relay_process import start_local
from tests.system.conftest import SECRET, RelayProcess, http, relay, relay_factory

__all__ = ["http", "limited_relay", "relay", "relay_factory", "start_limited_relay"]


def start_limited_relay(tmp_path: Path, nofile: int, *extra: str) -> RelayProcess:
    """A relay whose RLIMIT_NOFILE (soft and hard) is ``nofile``, started through prlimit."""
    prlimit = shutil.which("prlimit")
    if prlimit is None:
        raise RuntimeError("prlimit (util-linux) is needed")
    wrapper = [prlimit, f"--nofile={nofile}"]
    return start_local(tmp_path, *extra, secret=SECRET, wrapper=wrapper)


@pytest.fixture
def limited_relay(tmp_path: Path) -> Iterator[Callable[..., RelayProcess]]:
    started: list[RelayProcess] = []

    def factory(nofile: int, *extra: str) -> RelayProcess:
        daemon = start_limited_relay(tmp_path, nofile, *extra)
        started.append(daemon)
        return daemon

    yield factory
    for daemon in started:
        daemon.stop(signal.SIGKILL)
