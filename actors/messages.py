"""The relay's control messages: frozen, told to the relay's control actor
(``actors.control.ControlActor``) or to the portal session.

Everything that changes the daemon's state, other than a datagram, arrives as one of these:
the portal session says it joined, lost or gave up on the portal; allocation actors say a
socket opened, closed or could not be bound, and that they stopped; a signal says stop. They
live apart from the actors that send and receive them, so that a sender and its receiver
need not import each other (the allocation actor and the control actor did).
"""

from __future__ import annotations

import contextlib
import socket
from dataclasses import dataclass
from typing import Any

import pykka

from firezone_relay.protocol.types import Family

__all__ = [
    "AllocationBindFailed",
    "AllocationStopped",
    "PeerSocketClosed",
    "PeerSocketOpened",
    "PortalClosed",
    "PortalConnect",
    "PortalFatal",
    "PortalJoined",
    "Reload",
    "Shutdown",
    "tell",
]


# -- the portal session ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PortalConnect:
    """To the portal session: join the portal, registering ``stamp_secret`` (the secret the
    core checks credentials against; fixed for the session's life)."""

    stamp_secret: str


@dataclass(frozen=True, slots=True)
class PortalJoined:
    """From the portal session: the portal acknowledged the join; the relay is ready."""


@dataclass(frozen=True, slots=True)
class PortalClosed:
    """From the portal session: the connection is gone; it reconnects, the relay is unready."""


@dataclass(frozen=True, slots=True)
class PortalFatal:
    """From the portal session: the portal cannot be reached or refused us; the relay exits 1."""

    reason: str


@dataclass(frozen=True, slots=True)
class Reload:
    """To the control actor (SIGHUP, ``systemctl reload``, ``firezone-relay reload``): re-read
    what can change without a restart; the relay keeps running."""

    reason: str


@dataclass(frozen=True, slots=True)
class Shutdown:
    """To the control actor (signals): stop the relay with ``code``. To the portal session:
    close the connection and stop."""

    code: int = 0
    reason: str = ""


# -- allocation actors -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerSocketOpened:
    """An allocation actor bound ``sock``: traffic to peers of ``port`` leaves through it."""

    port: int
    family: Family
    sock: socket.socket


@dataclass(frozen=True, slots=True)
class PeerSocketClosed:
    """An allocation actor is done with its ``family`` socket of ``port`` (its reader is
    removed): the data plane drops its routes and closes it, so the fd cannot be reused while
    a route still names it, however late this message is handled."""

    port: int
    family: Family
    sock: socket.socket


@dataclass(frozen=True, slots=True)
class AllocationBindFailed:
    """An allocation actor could not bind ``port`` (at monotonic time ``at``) and stopped."""

    port: int
    at: float


@dataclass(frozen=True, slots=True)
class AllocationStopped:
    """The allocation actor of ``port`` stopped; ``actor`` is its reference."""

    port: int
    #: Any: naming the allocation actor's class here would import its module back
    actor: pykka.ActorRef[Any]


def tell(ref: pykka.ActorRef[Any] | None, message: object) -> bool:  # Any: any actor
    """Tell ``message`` to ``ref`` unless it has stopped (during shutdown, late news is moot);
    returns whether it was delivered."""
    if ref is None:
        return False
    with contextlib.suppress(pykka.ActorDeadError):
        ref.tell(message)
        return True
    return False
