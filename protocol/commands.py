"""Immutable commands the core emits for the I/O layer and the actors to carry out.

Relaying itself never goes through a command (see ``Server.handle_client_input``); commands
carry control-plane work only, in the order the core emitted them.
"""

from __future__ import annotations

from dataclasses import dataclass

from firezone_relay.protocol.types import Addr, Family, FiveTuple

__all__ = [
    "Command",
    "CreateAllocation",
    "CreateChannelBinding",
    "DeleteChannelBinding",
    "ForwardToWorker",
    "FreeAllocation",
    "RegistryRequest",
    "ReleaseAllocation",
    "ReserveAllocation",
    "SendMessage",
]


@dataclass(frozen=True, slots=True)
class SendMessage:
    """Send ``payload`` to ``recipient`` from the listen socket of the recipient's family."""

    payload: bytes
    recipient: FiveTuple


@dataclass(frozen=True, slots=True)
class CreateAllocation:
    """Bind a UDP socket on ``port`` for ``family``; report failure with
    ``Server.handle_allocation_failed(port)``. ``dont_fragment``: the client asked for the
    DF bit on what the relay sends to peers (DONT-FRAGMENT, RFC 8656 §7.2)."""

    port: int
    family: Family
    dont_fragment: bool = False


@dataclass(frozen=True, slots=True)
class FreeAllocation:
    """Close the socket on ``port`` for ``family``."""

    port: int
    family: Family


@dataclass(frozen=True, slots=True)
class CreateChannelBinding:
    """A channel became (or stayed) bound: keep any fast path (XDP maps) in sync."""

    client: FiveTuple
    channel: int
    peer: Addr
    allocation_port: int


@dataclass(frozen=True, slots=True)
class DeleteChannelBinding:
    """A channel stopped relaying: remove it from any fast path."""

    client: FiveTuple
    channel: int
    peer: Addr
    allocation_port: int


@dataclass(frozen=True, slots=True)
class ReserveAllocation:
    """Ask the relay-wide allocation registry (``protocol.reservations``) for room for one
    allocation of ``username`` (``user``: its part after ``<expiry>:``, which quotas count)
    from ``client``; the answer comes back through ``Server.handle_reservation(ticket, ...)``.
    ``ticket``: names the allocation to the registry for as long as it lives (a counter from
    a random start: unique in the worker, and across its restarts as good as certain).

    Emitted only by a worker of several (``ServerConfig.workers`` > 1): one core alone asks
    its own registry within the same call."""

    ticket: int
    client: FiveTuple
    username: str
    user: str


@dataclass(frozen=True, slots=True)
class ReleaseAllocation:
    """The allocation of ``ticket`` ended (or its late grant found no Allocate waiting): the
    registry forgets it. Emitted only by a worker of several, as ``ReserveAllocation``."""

    ticket: int


@dataclass(frozen=True, slots=True)
class ForwardToWorker:
    """The relay loop across workers: ``payload`` leaves our allocation ``from_relayed_addr``
    for the relayed address ``to_relayed_addr``, whose port belongs to ``worker``. That
    worker's core takes it as ``Server.handle_forwarded(from_relayed_addr,
    to_relayed_addr[1], payload, now)``, as a peer datagram. Per datagram, so the I/O layer
    sends it from the loop, never through an actor inbox; a single worker never emits it."""

    worker: int
    from_relayed_addr: Addr
    to_relayed_addr: Addr
    payload: bytes


#: what goes to the allocation registry (the supervisor's, for a worker of several)
RegistryRequest = ReserveAllocation | ReleaseAllocation

Command = (
    SendMessage
    | CreateAllocation
    | FreeAllocation
    | CreateChannelBinding
    | DeleteChannelBinding
    | ReserveAllocation
    | ReleaseAllocation
    | ForwardToWorker
)
