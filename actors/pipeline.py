"""The declarative command pipeline: which actor (or loop handler) carries out each command.

``ROUTES`` (at the end of the module) is the one table mapping every command type the core
emits to the ``Pipeline`` method that carries it out; adding a command means adding a row there
(and, for a new kind of work, a method). The pipeline drains the core's FIFO after every input
and hands each command to its target in order.

Targets:

``_to_send``        loop handler: send the payload to the client (``DataPlane.send_message``)
``_to_allocation``  the per-port :class:`~actors.allocation.AllocationActor`, spawned on first use
``_to_fast_path``   the XDP map manager actor, if offload is on: channel commands are collected
                    over one drain and told to it as one tuple; and ``mirror`` (the data
                    plane's copy of the channel routes), called at once, on the loop, for each
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, TypeVar

from firezone_relay.protocol.commands import (
    Command,
    CreateAllocation,
    CreateChannelBinding,
    DeleteChannelBinding,
    FreeAllocation,
    SendMessage,
)

if TYPE_CHECKING:
    import pykka

    from firezone_relay.actors.allocation import AllocationActor
    from firezone_relay.actors.xdp_manager import XdpManager
    from firezone_relay.protocol.server import Server

__all__ = ["ROUTES", "Pipeline"]

logger = logging.getLogger("relay.pipeline")


class Pipeline:
    """Drains the core's commands into their targets (see ``ROUTES``)."""

    def __init__(
        self,
        server: Server,
        send: Callable[[SendMessage], None],
        spawn_allocation: Callable[[int], pykka.ActorRef[AllocationActor]],
        fast_path: pykka.ActorRef[XdpManager] | None = None,
    ) -> None:
        self._server = server
        self._send = send
        self._spawn_allocation = spawn_allocation
        self.fast_path = fast_path
        #: keeps the data plane's route mirror in step (``DataPlane.sync_channel``)
        self.mirror: Callable[[CreateChannelBinding | DeleteChannelBinding], None] | None = None
        #: allocation port -> its actor; the actor removes itself when it stops
        self.allocations: dict[int, pykka.ActorRef[AllocationActor]] = {}
        self._fast_path_batch: list[Command] = []
        # Any: each handler takes the command type it is keyed by, which no dict type can say
        self._handlers: dict[type, Callable[[Any], None]] = {
            command_type: functools.partial(target, self) for command_type, target in ROUTES.items()
        }
        #: True while ``drain`` runs: what a target reports back synchronously (an allocation
        #: port that could not be bound) still finds the core's later commands queued
        self.draining = False

    def drain(self) -> None:
        """Carry out everything the core has queued, in order."""
        next_command = self._server.next_command
        handlers = self._handlers
        self.draining = True
        try:
            while (command := next_command()) is not None:
                handler = handlers.get(type(command))
                if handler is None:
                    logger.error("no route for command %r", command)
                    continue
                try:
                    handler(command)
                except Exception:
                    logger.exception("carrying out %r failed", command)
        finally:
            self.draining = False
        if self._fast_path_batch:
            batch, self._fast_path_batch = tuple(self._fast_path_batch), []
            if self.fast_path is not None:
                try:
                    self.fast_path.tell(batch)
                except Exception:  # dead actor: offload is gone, userspace still relays
                    logger.warning("XDP map manager is gone; channel updates dropped")
                    self.fast_path = None

    def observe(self, observer: Callable[[Command], None]) -> None:
        """Also show each command to ``observer`` once its target has it (tracing). Installed
        only when spans are exported, so without them the drain is unchanged."""
        for command_type, handler in list(self._handlers.items()):
            self._handlers[command_type] = _then(handler, observer)

    def _to_send(self, command: SendMessage) -> None:
        self._send(command)

    def _to_allocation(self, command: CreateAllocation | FreeAllocation) -> None:
        ref = self.allocations.get(command.port)
        if ref is None:
            if isinstance(command, FreeAllocation):
                return  # already gone (a failed bind freed it)
            ref = self._spawn_allocation(command.port)
            self.allocations[command.port] = ref
        ref.tell(command)

    def _to_fast_path(self, command: CreateChannelBinding | DeleteChannelBinding) -> None:
        if self.mirror is not None:
            self.mirror(command)
        if self.fast_path is not None:
            self._fast_path_batch.append(command)

    def allocation_gone(self, port: int, actor: pykka.ActorRef[AllocationActor]) -> None:
        """The allocation actor ``actor`` of ``port`` has stopped (a newer one may own the
        port already)."""
        if self.allocations.get(port) is actor:
            del self.allocations[port]


#: command type -> the ``Pipeline`` method that carries it out
# Any: each method takes the command type it is keyed by, which no dict type can say
ROUTES: Final[Mapping[type[Command], Callable[[Pipeline, Any], None]]] = {
    SendMessage: Pipeline._to_send,
    CreateAllocation: Pipeline._to_allocation,
    FreeAllocation: Pipeline._to_allocation,
    CreateChannelBinding: Pipeline._to_fast_path,
    DeleteChannelBinding: Pipeline._to_fast_path,
}

C = TypeVar("C", bound=Command)


def _then(handler: Callable[[C], None], observer: Callable[[Command], None]) -> Callable[[C], None]:
    def both(command: C) -> None:
        handler(command)
        observer(command)

    return both
