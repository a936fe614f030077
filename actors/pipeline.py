"""The declarative command pipeline: which actor (or loop handler) carries out each command.

``ROUTES`` (at the end of the module) is the one table mapping every command type the core
emits to the ``Pipeline`` method that carries it out; adding a command means adding a row there
(and, for a new kind of work, a method). The pipeline drains the core's FIFO after every input
and hands each command to its target in order.

Targets:

``_to_send``        loop handler: send the payload to the client (``DataPlane.send_message``)
``_to_allocation``  the per-port :class:`~actors.allocation.AllocationActor`, spawned on first use
``_to_route_sinks`` channel commands: collected over one drain and handed, as one tuple in
                    the order the core emitted them, to every ``RouteSink`` (the data plane's
                    C route mirror, the XDP map manager) when the drain ends, before the next
                    input is read
``_to_registry``    a worker of several: ``ReserveAllocation`` / ``ReleaseAllocation`` to the
                    supervisor's allocation registry (its answers come back through
                    ``Server.handle_registry_message``, then a drain)
``_to_worker``      a worker of several: ``ForwardToWorker`` (the relay loop to another
                    worker's allocation), sent from the loop; one per datagram, so never
                    through an actor inbox

A relay of one worker never emits the last two: its core holds its own registry and all
the ports.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar

from firezone_relay.protocol.commands import (
    Command,
    CreateAllocation,
    CreateChannelBinding,
    DeleteChannelBinding,
    ForwardToWorker,
    FreeAllocation,
    RegistryRequest,
    ReleaseAllocation,
    ReserveAllocation,
    SendMessage,
)

if TYPE_CHECKING:
    import pykka

    from firezone_relay.actors.allocation import AllocationActor
    from firezone_relay.protocol.server import Server

__all__ = ["ROUTES", "ChannelCommand", "Pipeline", "RouteSink"]

logger = logging.getLogger("relay.pipeline")

ChannelCommand = CreateChannelBinding | DeleteChannelBinding


class RouteSink(Protocol):
    """A copy of the core's channel routes kept outside it: the C route mirror
    (``DataPlane``), the XDP maps (``actors.offload.XdpRouteSink``); a third consumer (stream
    clients, workers) is one more implementation.

    The one ordering rule: when a drain ends, each sink gets that drain's channel commands as
    one tuple, in the order the core emitted them, before the next input is read. A sink
    makes its copy what the core holds after them (by re-reading the core, or by coalescing
    per key with the last command winning); every change of the core's routes comes with
    one of these commands (the allocation table's invariant 6)."""

    def sync_routes(self, commands: tuple[ChannelCommand, ...]) -> None: ...


class Pipeline:
    """Drains the core's commands into their targets (see ``ROUTES``)."""

    def __init__(
        self,
        server: Server,
        send: Callable[[SendMessage], None],
        spawn_allocation: Callable[[int], pykka.ActorRef[AllocationActor]],
        route_sinks: tuple[RouteSink, ...] = (),
        to_registry: Callable[[RegistryRequest], None] | None = None,
        to_worker: Callable[[ForwardToWorker], None] | None = None,
    ) -> None:
        self._server = server
        self._send = send
        self._spawn_allocation = spawn_allocation
        #: a worker of several: its channel to the supervisor's registry and to the other
        #: workers (the owner sets them before any input; a relay of one needs neither)
        self.to_registry = to_registry
        self.to_worker = to_worker
        #: who keeps a copy of the channel routes (see ``RouteSink``)
        self.route_sinks: list[RouteSink] = list(route_sinks)
        #: allocation port -> its actor; the actor removes itself when it stops
        self.allocations: dict[int, pykka.ActorRef[AllocationActor]] = {}
        self._channel_batch: list[ChannelCommand] = []
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
        if self._channel_batch:
            batch, self._channel_batch = tuple(self._channel_batch), []
            for sink in self.route_sinks:
                try:
                    sink.sync_routes(batch)
                except Exception:
                    logger.exception("route sink %r failed", sink)

    def observe(self, observer: Callable[[Command], None]) -> None:
        """Also show each command to ``observer`` once its target has it (tracing). Installed
        only when spans are exported, so without them the drain is unchanged; never for
        ``ForwardToWorker``, which is one per datagram."""
        for command_type, handler in list(self._handlers.items()):
            if command_type is not ForwardToWorker:
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

    def _to_route_sinks(self, command: ChannelCommand) -> None:
        if self.route_sinks:
            self._channel_batch.append(command)

    def _to_registry(self, command: RegistryRequest) -> None:
        if self.to_registry is None:
            logger.error("no allocation registry for %r", command)
            return
        self.to_registry(command)

    def _to_worker(self, command: ForwardToWorker) -> None:
        if self.to_worker is None:
            logger.error("no channel to worker %d", command.worker)
            return
        self.to_worker(command)

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
    CreateChannelBinding: Pipeline._to_route_sinks,
    DeleteChannelBinding: Pipeline._to_route_sinks,
    ReserveAllocation: Pipeline._to_registry,
    ReleaseAllocation: Pipeline._to_registry,
    ForwardToWorker: Pipeline._to_worker,
}

C = TypeVar("C", bound=Command)


def _then(handler: Callable[[C], None], observer: Callable[[Command], None]) -> Callable[[C], None]:
    def both(command: C) -> None:
        handler(command)
        observer(command)

    return both
