"""``firezone-relay top``: the running relay on one terminal screen, every second.

Plain ANSI (clear screen, home) and the terminal in cbreak mode while it runs, so ``q`` quits
without Enter; Ctrl-C quits too, and the terminal is restored either way. The rates come from
two consecutive ``/stats`` answers of the admin socket.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import sys
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from firezone_relay.actors.admin_cli import human_bytes

if TYPE_CHECKING:
    from firezone_relay.actors.admin_cli import AdminClient

__all__ = ["render", "run_top"]

CLEAR = "\x1b[H\x1b[2J"


def _rate(now: Mapping[str, Any], then: Mapping[str, Any] | None, key: str, dt: float) -> float:
    if then is None or dt <= 0:
        return 0.0
    return max(0.0, (float(now.get(key) or 0) - float(then.get(key) or 0)) / dt)


def render(now: Mapping[str, Any], then: Mapping[str, Any] | None, width: int) -> list[str]:
    """The screen for the latest ``/stats`` answer ``now`` and the one before, ``then``."""
    dt = float(now["time"]) - float(then["time"]) if then is not None else 0.0
    totals, before = now["totals"], then["totals"] if then else None
    lines = [
        f"firezone-relay top  {time.strftime('%H:%M:%S', time.localtime(now['time']))}"
        f"   allocations {now['allocations']}   channels {now['channels']}"
        + ("   DRAINING" if now["draining"] else "")
        + "   (q quits)",
        "",
        f"{'':14}{'datagrams/s':>14}{'bytes/s':>14}",
    ]
    for label, key in (("client->peer", "to_peer"), ("peer->client", "to_client")):
        pps = _rate(totals, before, f"{key}_datagrams", dt)
        bps = _rate(totals, before, f"{key}_bytes", dt)
        lines.append(f"{label:14}{pps:>14.0f}{human_bytes(bps) + '/s':>14}")
    for path in ("userspace", "xdp"):
        figures = now.get(path)
        if figures is None:
            lines.append(f"{path:14}{'off':>14}")
            continue
        previous = then.get(path) if then else None
        pps = _rate(figures, previous, "datagrams", dt)
        bps = _rate(figures, previous, "bytes", dt)
        lines.append(f"{path:14}{pps:>14.0f}{human_bytes(bps) + '/s':>14}")
    connections = now.get("connections") or {}
    lines.append("")
    lines.append("connections  " + "  ".join(
        f"{transport} {connections.get(transport, 0)}" for transport in ("tcp", "tls")
    ))  # fmt: skip
    drops = now["drops"]
    old_drops = then["drops"] if then else None
    lines.append("")
    lines.append("drops/s  " + "  ".join(
        f"{reason} {_rate(drops, old_drops, reason, dt):.0f}" for reason in sorted(drops)
    ))  # fmt: skip
    lines.append("")
    lines.append(f"{'ID':>6}  {'USER':20} {'CLIENT':22} {'CH':>3} {'BYTES/S':>11} "
                 f"{'TO PEER':>10} {'TO CLIENT':>10}")  # fmt: skip
    for row in now["top"]:
        lines.append(
            f"{row['id']:>6}  {str(row['user'])[:20]:20} {row['client'][:22]:22} "
            f"{row['channels']:>3} {human_bytes(row['bytes_per_s']) + '/s':>11} "
            f"{human_bytes(row['to_peer_bytes']):>10} {human_bytes(row['to_client_bytes']):>10}"
        )
    return [line[:width] for line in lines]


@contextlib.contextmanager
def _keys() -> Iterator[int | None]:
    """Standard input in cbreak mode (keys without Enter, no echo) when it is a terminal."""
    if not sys.stdin.isatty():
        yield None
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _quit_pressed(fd: int | None, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for a key; True for q or Q."""
    if fd is None:
        time.sleep(timeout)
        return False
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            key = os.read(fd, 32)
            if not key or b"q" in key.lower():
                return True
    return False


def run_top(client: AdminClient, interval: float = 1.0, iterations: int = 0) -> int:
    """Refresh until q, Ctrl-C, or ``iterations`` screens (0: no end)."""
    then: dict[str, Any] | None = None
    shown = 0
    out = sys.stdout
    try:
        with _keys() as fd:
            while True:
                now = client.request("GET", "/stats", top=15)
                width = shutil.get_terminal_size((100, 30)).columns
                out.write(CLEAR + "\n".join(render(now, then, width)) + "\n")
                out.flush()
                then = now
                shown += 1
                if iterations and shown >= iterations:
                    return 0
                if _quit_pressed(fd, interval):
                    return 0
    except KeyboardInterrupt:
        return 0
