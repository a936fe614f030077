"""Start-up checks of the host's limits: the file-descriptor budget of the allocations, and
whether the kernel may hand the allocation ports to other sockets.

Each allocation holds one UDP socket per address family. If allocations could use every
descriptor, the health endpoint, the portal's websocket and the log would fail first (and an
attacker with one credential could get there), so a reserve is kept back and the allocation cap
is derived from what is left.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

__all__ = ["FD_RESERVE", "allocation_cap", "ephemeral_overlap", "open_fds", "port_range_warning"]

logger = logging.getLogger("relay.limits")

#: descriptors kept back for everything that is not an allocation: two HTTP endpoints at their
#: connection cap, the portal websocket, the OTLP exporter, the log, bcc, transient files
FD_RESERVE = 128

_PROC_SYS = Path("/proc/sys/net/ipv4")


def open_fds() -> int:
    """Descriptors this process holds now."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 64  # a conservative guess off Linux


def allocation_cap(port_range: int, nofile: int, in_use: int, families: int) -> int:
    """How many allocations fit: the port range, and the descriptors left after the reserve."""
    by_fds = (nofile - in_use - FD_RESERVE) // max(1, families)
    return max(0, min(port_range, by_fds))


def _ranges(text: str) -> list[tuple[int, int]]:
    """``1000-2000,3000`` -> [(1000, 2000), (3000, 3000)]; ignores what does not parse."""
    out: list[tuple[int, int]] = []
    for item in text.replace("\t", " ").replace(",", " ").split():
        low, _, high = item.partition("-")
        if low.isdigit() and (not high or high.isdigit()):
            out.append((int(low), int(high or low)))
    return out


def ephemeral_overlap(
    low: int, high: int, local_range: tuple[int, int], reserved: list[tuple[int, int]]
) -> int:
    """Ports of ``[low, high]`` the kernel may give any socket (ephemeral, not reserved)."""
    start, end = max(low, local_range[0]), min(high, local_range[1])
    if start > end:
        return 0
    exposed = end - start + 1
    for r_low, r_high in reserved:
        s, e = max(start, r_low), min(end, r_high)
        if s <= e:
            exposed -= e - s + 1
    return exposed


def port_range_warning(low: int, high: int, proc_sys: Path = _PROC_SYS) -> str | None:
    """A warning (with the fix) when the allocation range overlaps the ephemeral range and is
    not reserved; None when it is safe or the sysctls cannot be read."""
    try:
        parts = (proc_sys / "ip_local_port_range").read_text().split()
        reserved = _ranges((proc_sys / "ip_local_reserved_ports").read_text())
    except OSError:
        return None
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        return None
    local_range = (int(parts[0]), int(parts[1]))
    exposed = ephemeral_overlap(low, high, local_range, reserved)
    if not exposed:
        return None
    return (
        f"{exposed} ports of the allocation range {low}-{high} are in the kernel's ephemeral "
        f"range {local_range[0]}-{local_range[1]} (net.ipv4.ip_local_port_range): any local "
        "socket may take them and Allocate then has to pick another port. Reserve them: "
        f"`sysctl -w net.ipv4.ip_local_reserved_ports={low}-{high}` (persist it in "
        "/etc/sysctl.d/), or move the range (--lowest-port/--highest-port) or the ephemeral "
        "range out of each other's way"
    )
