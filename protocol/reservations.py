"""The allocation registry: what makes the workers of one relay count allocations as one.

Each worker's core asks before it grants an Allocate (``ReserveAllocation``) and says when an
allocation ends (``ReleaseAllocation``); the registry answers each request at once with
``ReservationAnswer`` (granted, or refused with 486 or 508), after telling the owner of the
username's previous allocation to free it (``EvictAllocation``) when the username may hold
only one. It holds the relay-wide rules: the Firezone scheme's one allocation per username,
``--max-allocations-per-user`` and ``--max-allocations``.

The supervisor runs one for all workers and calls ``worker_gone`` when a worker dies (its
entries go with it). A core of a relay with one worker runs its own in the same call, so
nothing waits. Sans-IO: messages in, messages out; no clock is needed, because the workers
time out what they wait for and tell the registry what they no longer hold.

An evicted entry is forgotten at once, before its owner frees the allocation: the registry's
counts never exceed the quotas, and the owner's later ``ReleaseAllocation`` of it is a no-op.
A ticket is the worker's name for one allocation (unique within the worker).

Invariants (``check_invariants``): ``by_username`` names live entries of that username;
``per_user`` counts the entries of each user (no zeros); ``of_worker`` partitions the entries
by worker; at most ``limit`` entries and ``per_user_limit`` a user.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from firezone_relay.protocol.commands import RegistryRequest, ReserveAllocation
from firezone_relay.protocol.config import ServerConfig
from firezone_relay.protocol.errors import ErrorCode
from firezone_relay.protocol.types import FiveTuple

__all__ = [
    "EvictAllocation",
    "RegistryMessage",
    "ReservationAnswer",
    "Reservations",
]


@dataclass(frozen=True, slots=True)
class ReservationAnswer:
    """To ``worker``: the Allocate waiting on ``ticket`` may go ahead (``refusal`` None) or
    gets ``refusal`` (486: the user's quota; 508: the relay's)."""

    worker: int
    ticket: int
    refusal: ErrorCode | None


@dataclass(frozen=True, slots=True)
class EvictAllocation:
    """To ``worker``: free the allocation of ``ticket`` (its username allocated again, from
    ``by``); sent before the answer that grants the new one."""

    worker: int
    ticket: int
    by: FiveTuple


#: what the registry sends to a worker's core (``Server.handle_registry_message``)
RegistryMessage = ReservationAnswer | EvictAllocation


class Reservations:
    """The live allocations of every worker, by (worker, ticket)."""

    def __init__(self, limit: int, per_user_limit: int, single_per_username: bool) -> None:
        self.limit = limit
        self.per_user_limit = per_user_limit
        self.single_per_username = single_per_username
        #: (worker, ticket) -> (username, user)
        self._entries: dict[tuple[int, int], tuple[str, str]] = {}
        #: username -> its latest entry (the one a new Allocate of it evicts)
        self.by_username: dict[str, tuple[int, int]] = {}
        self.per_user: dict[str, int] = {}
        self.of_worker: dict[int, set[int]] = {}

    @classmethod
    def from_config(cls, config: ServerConfig) -> Reservations:
        """The registry of a relay run with ``config`` (the same for every worker)."""
        single = config.single_allocation_per_username
        return cls(
            config.allocation_limit,
            config.allocations_per_user_limit,
            config.auth_scheme == "firezone" if single is None else single,
        )

    def __len__(self) -> int:
        return len(self._entries)

    def holds(self, worker: int, ticket: int) -> bool:
        return (worker, ticket) in self._entries

    def handle(self, worker: int, request: RegistryRequest) -> list[RegistryMessage]:
        """One request of ``worker`` (as the supervisor knows it, never as it claims):
        what to send, in order."""
        if isinstance(request, ReserveAllocation):
            return self.reserve(worker, request)
        self.release(worker, request.ticket)
        return []

    def reserve(self, worker: int, request: ReserveAllocation) -> list[RegistryMessage]:
        """Evict the username's previous allocation (when it may hold one), then check the
        quotas (as one core always did: the eviction happens even when they refuse)."""
        evicted, refusal = self.admit(worker, request.ticket, request.username, request.user)
        answer = ReservationAnswer(worker, request.ticket, refusal)
        if evicted is None:
            return [answer]
        return [EvictAllocation(evicted[0], evicted[1], request.client), answer]

    def admit(
        self, worker: int, ticket: int, username: str, user: str
    ) -> tuple[tuple[int, int] | None, ErrorCode | None]:
        """``reserve`` without the messages, for a core that is the relay's only worker:
        the (worker, ticket) to evict, if any, and the refusal, if any."""
        key = (worker, ticket)
        if key in self._entries:  # asked twice: granted already
            return None, None
        previous = self.by_username.get(username) if self.single_per_username else None
        if previous is not None:
            self._forget(previous)
        if self.per_user.get(user, 0) >= self.per_user_limit:
            return previous, ErrorCode.ALLOCATION_QUOTA_REACHED
        if len(self._entries) >= self.limit:
            return previous, ErrorCode.INSUFFICIENT_CAPACITY
        self._entries[key] = (username, user)
        self.by_username[username] = key
        self.per_user[user] = self.per_user.get(user, 0) + 1
        tickets = self.of_worker.get(worker)
        if tickets is None:
            self.of_worker[worker] = {ticket}
        else:
            tickets.add(ticket)
        return previous, None

    def release(self, worker: int, ticket: int) -> None:
        """The allocation ended; unknown tickets (evicted, never granted) are ignored."""
        if (worker, ticket) in self._entries:
            self._forget((worker, ticket))

    def worker_gone(self, worker: int) -> int:
        """A worker died: its allocations died with it. Returns how many were held."""
        tickets = self.of_worker.pop(worker, set())
        for ticket in tickets:
            self._forget((worker, ticket), tickets)
        return len(tickets)

    def _forget(self, key: tuple[int, int], tickets: set[int] | None = None) -> None:
        username, user = self._entries.pop(key)
        if self.by_username.get(username) == key:
            del self.by_username[username]
        remaining = self.per_user[user] - 1
        if remaining:
            self.per_user[user] = remaining
        else:
            del self.per_user[user]
        if tickets is None:  # else the caller took the worker's whole set
            of_worker = self.of_worker[key[0]]
            of_worker.discard(key[1])
            if not of_worker:
                del self.of_worker[key[0]]

    def tickets(self, worker: int) -> Iterable[int]:
        """The tickets ``worker`` holds (a copy; tests and debugging)."""
        return set(self.of_worker.get(worker, ()))

    def check_invariants(self) -> None:
        """Assert the invariants of the module docstring (tests)."""
        assert len(self._entries) <= self.limit
        users: dict[str, int] = {}
        for (worker, ticket), (_, user) in self._entries.items():
            users[user] = users.get(user, 0) + 1
            assert ticket in self.of_worker[worker]
        assert users == self.per_user
        assert all(count <= self.per_user_limit for count in users.values())
        assert sum(len(t) for t in self.of_worker.values()) == len(self._entries)
        assert all(self.of_worker.values())
        for username, key in self.by_username.items():
            assert self._entries[key][0] == username
