"""The loop-hosted actor that dispatches the relay's control messages.

Everything that changes the daemon's state, other than a datagram, arrives as one of the
frozen messages of :mod:`actors.messages` told to the relay's :class:`ControlActor`. The actor
looks the message's type up in one table (``actors.daemon.CONTROL_ROUTES``) and calls the
handler it names. Datagrams never come this way: the data plane's reader callbacks call the
core directly.

The actor is hosted on the event loop (:mod:`actors.loop_actor`), so a message told from the
loop thread while it is idle is handled at once, in the teller's stack. The 508 swap relies on
that (see ``Relay._on_allocation_bind_failed``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from firezone_relay.actors.loop_actor import LoopActor

__all__ = ["ControlActor"]

logger = logging.getLogger("relay.control")


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
