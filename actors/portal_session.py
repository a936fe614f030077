"""The portal session actor: hosts :class:`actors.portal.PortalClient` on the event loop.

The client is an asyncio driver (websockets), so the actor is loop-hosted and runs
``client.run()`` as a task it owns. It speaks only messages: told :class:`PortalConnect` it
starts the driver with that stamp secret, told :class:`Shutdown` it cancels the driver and
stops; it tells the relay's control actor :class:`PortalJoined`, :class:`PortalClosed` and
:class:`PortalFatal` as the connection comes and goes.
"""

from __future__ import annotations

import asyncio
import logging

import pykka
from opentelemetry import trace

from firezone_relay.actors.control import ControlActor
from firezone_relay.actors.loop_actor import LoopActor
from firezone_relay.actors.messages import (
    PortalClosed,
    PortalConnect,
    PortalFatal,
    PortalJoined,
    Shutdown,
    tell,
)
from firezone_relay.actors.portal import PortalClient, PortalConfig
from firezone_relay.protocol.phoenix import Fatal

__all__ = ["PortalSession"]

logger = logging.getLogger("relay.portal")


class PortalSession(LoopActor):
    """Keeps the relay joined to the portal for as long as the actor lives."""

    def __init__(
        self,
        config: PortalConfig,
        control: pykka.ActorRef[ControlActor],
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        tracer: trace.Tracer | None = None,
    ) -> None:
        super().__init__(loop=loop)
        self._config = config
        self._control = control
        self._tracer = tracer
        self._task: asyncio.Task[Fatal] | None = None

    def on_receive(self, message: object) -> object:
        if isinstance(message, PortalConnect):
            self._connect(message.stamp_secret)
        elif isinstance(message, Shutdown):
            self.stop()  # on_stop cancels the driver
        else:
            return super().on_receive(message)
        return None

    def _connect(self, stamp_secret: str) -> None:
        if self._task is not None:
            return  # one session, one secret
        client = PortalClient(
            self._config,
            stamp_secret,
            on_joined=self._joined,
            on_fatal=self._fatal,
            tracer=self._tracer,
        )
        logger.info("connecting to the portal at %s", client.url)
        self._task = self.actor_loop.create_task(client.run(), name="portal")
        self._task.add_done_callback(self._finished)

    def _joined(self, joined: bool) -> None:
        tell(self._control, PortalJoined() if joined else PortalClosed())

    def _fatal(self, reason: str) -> None:
        tell(self._control, PortalFatal(reason))

    def _finished(self, task: asyncio.Task[Fatal]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:  # the driver promises not to raise; treat it as fatal if it does
            logger.error("portal driver crashed: %r", exc)
            self._fatal(f"portal driver crashed: {exc!r}")

    def on_stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
