"""The core's timers: typed records in one heap with lazy deletion (never a scan).

A record says what to look at when its deadline passes; the handler re-checks the state,
because the thing may have been refreshed or deleted since (then it re-arms or does nothing).
``Server`` dispatches records by type through its ``_TIMER_HANDLERS`` table.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from firezone_relay.protocol.allocations import Allocation, Channel


@dataclass(frozen=True, slots=True, eq=False)
class AllocationExpiry:
    allocation: Allocation


@dataclass(frozen=True, slots=True, eq=False)
class ChannelExpiry:
    """One per channel: it re-arms itself while the channel is refreshed, then waits out
    the rebind timeout before the channel number and peer are free again."""

    allocation: Allocation
    channel: Channel


@dataclass(frozen=True, slots=True, eq=False)
class PermissionExpiry:
    allocation: Allocation
    host: str


@dataclass(frozen=True, slots=True, eq=False)
class ReservationExpiry:
    token: bytes


@dataclass(frozen=True, slots=True, eq=False)
class QuarantineExpiry:
    port: int


@dataclass(frozen=True, slots=True, eq=False)
class ReservationWaitExpiry:
    """An Allocate waiting for the allocation registry's answer gives up (508)."""

    ticket: int


TimerRecord = (
    AllocationExpiry
    | ChannelExpiry
    | PermissionExpiry
    | ReservationExpiry
    | QuarantineExpiry
    | ReservationWaitExpiry
)


class Timers:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, TimerRecord]] = []
        self._seq = 0

    def __len__(self) -> int:
        return len(self._heap)

    def schedule(self, deadline: float, record: TimerRecord) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (deadline, self._seq, record))

    def next_deadline(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> Iterator[TimerRecord]:
        """Records due at ``now``, earliest first, including any a handler schedules while
        this runs that are due too."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            yield heapq.heappop(heap)[2]
