"""The relay's control messages and the loop-hosted actor that dispatches them.

Everything that changes the daemon's state, other than a datagram, arrives as one of these
frozen messages told to the relay's :class:`ControlActor`: the portal session says it joined,
lost or gave up on the portal; allocation actors say a socket opened, closed or could not be
bound, and that they stopped; a signal says stop. The actor looks the message's type up in one
table (``actors.daemon.CONTROL_ROUTES``) and calls the handler it names. Datagrams never come
this way: the data plane's reader callbacks call the core directly.

The actor is hosted on the event loop (:mod:`actors.loop_actor`), so a message told from the
loop thread while it is idle is handled at once, in the teller's stack. The 508 swap relies on
that (see ``Relay._on_allocation_bind_failed``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pykka

from firezone_relay.actors.loop_actor import LoopActor
from firezone_relay.protocol.types import Family

if TYPE_CHECKING:
    from firezone_relay.actors.allocation import AllocationActor

__all__ = [
    "AllocationBindFailed",
    "AllocationStopped",
    "ControlActor",
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

logger = logging.getLogger("relay.control")


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
    actor: pykka.ActorRef[AllocationActor]


def tell(ref: pykka.ActorRef[Any] | None, message: object) -> bool:  # Any: any actor
    """Tell ``message`` to ``ref`` unless it has stopped (during shutdown, late news is moot);
    returns whether it was delivered."""
    if ref is None:
        return False
    with contextlib.suppress(pykka.ActorDeadError):
        ref.tell(message)
        return True
    return False


class ControlActor(LoopActor):
    """Dispatches each message to the handler ``routes`` maps its type to.

    A handler that raises is logged and the actor lives on: losing the control inbox would
    leave the relay deaf to its portal and its allocations.
    """

    def __init__(
        self,
        # Any: each handler takes the message type it is keyed by, which no dict type can say
        routes: Mapping[type[object], Callable[[Any], None]],
        *,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(loop=loop)
        self._routes = dict(routes)

    def on_receive(self, message: object) -> object:
        handler = self._routes.get(type(message))
        if handler is None:
            logger.error("no route for control message %r", message)
            return None
        try:
            handler(message)
        except Exception:
            logger.exception("handling %r failed", message)
        return None
