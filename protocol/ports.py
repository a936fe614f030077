"""Choosing allocation ports: the range, EVEN-PORT reservations, and ports to avoid.

Invariants (``check_invariants``):

- ``reserved`` is exactly the set of ports of ``reservations``, and no reserved port is in
  use by an allocation (a reservation is taken out of both before its port is used);
- a port is handed out only if it is in the range, not in use, not reserved and not
  quarantined (``is_free``).

A port the I/O layer could not bind (another local socket holds it: Linux's ephemeral range
overlaps ours) is quarantined for a while, so the retry and later Allocates avoid it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Container

from firezone_relay.protocol.timers import QuarantineExpiry, ReservationExpiry, Timers

__all__ = ["PortAllocator", "PortShares"]


class PortShares:
    """The allocation range split among the workers of one relay: worker ``i`` owns the
    contiguous slice from ``lowest + size * i // workers`` (sizes differ by at most one port),
    so a peer's datagram reaches the worker of its allocation by its destination port alone,
    and the relay loop finds the worker of a relayed address without asking anyone."""

    __slots__ = ("_size", "highest", "lowest", "workers")

    def __init__(self, lowest: int, highest: int, workers: int) -> None:
        size = highest - lowest + 1
        if not 1 <= workers <= size:
            raise ValueError(f"{workers} workers cannot share {size} ports")
        self.lowest, self.highest, self.workers = lowest, highest, workers
        self._size = size

    def of(self, worker: int) -> tuple[int, int]:
        """The first and last port of ``worker``'s share."""
        if not 0 <= worker < self.workers:
            raise ValueError(f"no worker {worker} of {self.workers}")
        size, workers = self._size, self.workers
        return (
            self.lowest + size * worker // workers,
            self.lowest + size * (worker + 1) // workers - 1,
        )

    def owner(self, port: int) -> int | None:
        """The worker whose share holds ``port``; None outside the range."""
        offset = port - self.lowest
        if not 0 <= offset < self._size:
            return None
        # the largest i with size * i // workers <= offset
        return ((offset + 1) * self.workers - 1) // self._size


class PortAllocator:
    def __init__(
        self,
        lowest: int,
        highest: int,
        rng: random.Random,
        token_bytes: Callable[[int], bytes],
        timers: Timers,
        in_use: Container[int],
        reservation_lifetime: float,
        quarantine: float,
    ) -> None:
        self.lowest = lowest
        self.highest = highest
        self._rng = rng
        self._token_bytes = token_bytes
        self._timers = timers
        self._in_use = in_use
        self._reservation_lifetime = reservation_lifetime
        self._quarantine = quarantine
        #: RESERVATION-TOKEN -> (reserved port, deadline)
        self.reservations: dict[bytes, tuple[int, float]] = {}
        self.reserved: set[int] = set()
        #: port -> until when it is avoided
        self.quarantined: dict[int, float] = {}

    def is_free(self, port: int, avoid: int | None = None) -> bool:
        return (
            port != avoid
            and port not in self._in_use
            and port not in self.reserved
            and port not in self.quarantined
        )

    def pick(self, even: bool, avoid: int | None = None) -> int | None:
        """A free port (an even one for EVEN-PORT): random tries first, then a scan."""
        low, high = self.lowest, self.highest
        step = 2 if even else 1
        first = low + (low % 2 if even else 0)
        count = (high - first) // step + 1
        if count <= 0:
            return None
        for _ in range(32):
            port = first + self._rng.randrange(count) * step
            if self.is_free(port, avoid):
                return port
        start = self._rng.randrange(count)
        for i in range(count):
            port = first + ((start + i) % count) * step
            if self.is_free(port, avoid):
                return port
        return None

    def reserve_next(self, port: int, now: float) -> bytes | None:
        """EVEN-PORT with R: hold ``port + 1`` for a while; its token, or None if taken."""
        following = port + 1
        if following > self.highest or not self.is_free(following):
            return None
        token = self._token_bytes(8)
        until = now + self._reservation_lifetime
        self.reservations[token] = (following, until)
        self.reserved.add(following)
        self._timers.schedule(until, ReservationExpiry(token))
        return token

    def claim(self, token: bytes, now: float) -> int | None:
        """The port a live RESERVATION-TOKEN holds, released for use; None if unknown."""
        reserved = self.reservations.pop(token, None)
        if reserved is None:
            return None
        self.reserved.discard(reserved[0])
        return reserved[0] if reserved[1] > now else None

    def quarantine(self, port: int, now: float) -> None:
        until = now + self._quarantine
        self.quarantined[port] = until
        self._timers.schedule(until, QuarantineExpiry(port))

    def on_reservation_expiry(self, record: ReservationExpiry, now: float) -> None:
        reservation = self.reservations.get(record.token)
        if reservation is not None and reservation[1] <= now:
            del self.reservations[record.token]
            self.reserved.discard(reservation[0])

    def on_quarantine_expiry(self, record: QuarantineExpiry, now: float) -> None:
        if self.quarantined.get(record.port, now + 1) <= now:
            del self.quarantined[record.port]

    def check_invariants(self) -> None:
        assert self.reserved == {port for port, _ in self.reservations.values()}
        assert not any(port in self._in_use for port in self.reserved)
        assert all(self.lowest <= port <= self.highest for port in self.reserved)
