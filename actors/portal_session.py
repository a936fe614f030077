"""The portal session actor: hosts :class:`actors.portal.PortalClient` on the event loop.

The client is an asyncio driver (websockets), so the actor is loop-hosted and runs
``client.run()`` as a task it owns: started in ``on_start``, cancelled in ``on_stop``. The
client's callbacks are forwarded to the daemon, which tracks readiness and exits with code 1 on
a fatal portal error.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from opentelemetry import trace

from actors.loop_actor import LoopActor
from actors.portal import PortalClient, PortalConfig
from protocol.phoenix import Fatal

__all__ = ["PortalSession"]

logger = logging.getLogger("relay.portal")


class PortalSession(LoopActor):
    """Keeps the relay joined to the portal for as long as the actor lives."""

    def __init__(
        self,
        config: PortalConfig,
        stamp_secret: str,
        on_joined: Callable[[bool], None],
        on_fatal: Callable[[str], None],
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        tracer: trace.Tracer | None = None,
    ) -> None:
        super().__init__(loop=loop)
        self.client = PortalClient(
            config, stamp_secret, on_joined=on_joined, on_fatal=on_fatal, tracer=tracer
        )
        self._on_fatal = on_fatal
        self._task: asyncio.Task[Fatal] | None = None

    def on_start(self) -> None:
        logger.info("connecting to the portal at %s", self.client.url)
        self._task = self.actor_loop.create_task(self.client.run(), name="portal")
        self._task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[Fatal]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:  # the driver promises not to raise; treat it as fatal if it does
            logger.error("portal driver crashed: %r", exc)
            self._on_fatal(f"portal driver crashed: {exc!r}")

    def on_stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
