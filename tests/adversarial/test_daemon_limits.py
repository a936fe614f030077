"""The pieces behind the daemon's defences, without a process: the descriptor budget, the
ephemeral-range check against sysctl files, and the log flood guard."""

from __future__ import annotations

import io
import logging
from pathlib import Path

from firezone_relay.actors.limits import (
    FD_RESERVE,
    allocation_cap,
    ephemeral_overlap,
    port_range_warning,
)
from firezone_relay.actors.logs import FLOOD_BURST, FloodGuard, HumanFormatter


def test_allocation_cap_keeps_the_reserve() -> None:
    assert allocation_cap(16384, 1 << 20, 30, 2) == 16384  # the port range binds
    assert allocation_cap(400, 400, 20, 1) == 400 - 20 - FD_RESERVE
    assert allocation_cap(400, 400, 20, 2) == (400 - 20 - FD_RESERVE) // 2
    assert allocation_cap(400, 100, 20, 1) == 0


def test_ephemeral_overlap_subtracts_reserved_ports() -> None:
    assert ephemeral_overlap(49152, 65535, (32768, 60999), []) == 60999 - 49152 + 1
    assert ephemeral_overlap(49152, 65535, (32768, 60999), [(49152, 65535)]) == 0
    assert ephemeral_overlap(49152, 49251, (32768, 60999), [(49152, 49200)]) == 51
    assert ephemeral_overlap(61000, 65535, (32768, 60999), []) == 0


def test_port_range_warning_reads_the_sysctls(tmp_path: Path) -> None:
    (tmp_path / "ip_local_port_range").write_text("32768\t60999\n")
    (tmp_path / "ip_local_reserved_ports").write_text("\n")
    warning = port_range_warning(49152, 65535, tmp_path)
    assert warning is not None
    assert "sysctl -w net.ipv4.ip_local_reserved_ports=49152-65535" in warning
    (tmp_path / "ip_local_reserved_ports").write_text("1000,49152-65535\n")
    assert port_range_warning(49152, 65535, tmp_path) is None
    assert port_range_warning(49152, 65535, tmp_path / "missing") is None


def test_flood_guard_limits_a_site_folds_tracebacks_and_summarises() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(HumanFormatter())
    guard = FloodGuard()
    handler.addFilter(guard)
    log = logging.getLogger("relay.test_flood")
    summaries = logging.getLogger("relay.logs")
    for logger in (log, summaries):
        logger.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        for i in range(100):
            try:
                int("²")
            except ValueError:
                log.exception("bad datagram %d", i)
        guard.flush()
    finally:
        for logger in (log, summaries):
            logger.removeHandler(handler)
    text = stream.getvalue()
    assert "Traceback" not in text
    assert text.count(": bad datagram") == FLOOD_BURST
    assert "ValueError" in text
    assert f"suppressed {100 - FLOOD_BURST} log lines like 'bad datagram %d'" in text
