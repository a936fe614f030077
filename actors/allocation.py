"""One loop-hosted actor per allocation port: it owns the port's sockets, their registration
with the loop and its teardown.

The actor never sees a relayed datagram: the reader callback it registers is the data plane's
``on_peer_readable``, called by the loop directly. The actor only handles the control messages
the pipeline routes to it (``CreateAllocation`` / ``FreeAllocation`` for each family), and
reports what became of the port to the relay's control actor as messages
(``PeerSocketOpened`` / ``PeerSocketClosed``, ``AllocationBindFailed``, ``AllocationStopped``):
it touches neither the core nor the data plane's socket table.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from typing import ClassVar

import pykka

from firezone_relay.actors.control import ControlActor
from firezone_relay.actors.loop_actor import LoopActor
from firezone_relay.actors.messages import (
    AllocationBindFailed,
    AllocationStopped,
    PeerSocketClosed,
    PeerSocketOpened,
    tell,
)
from firezone_relay.actors.sockets import ALLOCATION_RECEIVE_BYTES, bind_udp
from firezone_relay.protocol.commands import CreateAllocation, FreeAllocation
from firezone_relay.protocol.types import Family

__all__ = ["AllocationActor"]

logger = logging.getLogger("relay.allocation")

IP_MTU_DISCOVER = getattr(socket, "IP_MTU_DISCOVER", 10)
IP_PMTUDISC_DO = getattr(socket, "IP_PMTUDISC_DO", 2)


class AllocationActor(LoopActor):
    """The sockets of one allocation port (one per address family)."""

    registered: ClassVar[bool] = False  # tracked by the pipeline's port table instead

    def __init__(
        self,
        port: int,
        control: pykka.ActorRef[ControlActor],
        bind_hosts: dict[Family, str],
        on_readable: Callable[[socket.socket, int], None],
        *,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(loop=loop)
        self.port = port
        self._control = control
        self._bind_hosts = bind_hosts
        self._on_readable = on_readable  # the data plane's reader callback: (socket, port)
        self.sockets: dict[Family, socket.socket] = {}

    def on_receive(self, message: object) -> object:
        if isinstance(message, CreateAllocation):
            self._bind(message.family, message.dont_fragment)
        elif isinstance(message, FreeAllocation):
            self._close(message.family)
            if not self.sockets:
                self.stop()
        else:
            return super().on_receive(message)
        return None

    def _bind(self, family: Family, dont_fragment: bool = False) -> None:
        if family in self.sockets:
            return
        try:
            sock = bind_udp(
                family, self._bind_hosts[family], self.port, receive_bytes=ALLOCATION_RECEIVE_BYTES
            )
            if dont_fragment and family is Family.V4:
                # DF on every datagram to peers; a too-big one fails instead of fragmenting.
                # (IPv6 is never fragmented on the way; RFC 8656 ignores DF across families.)
                sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
        except (OSError, KeyError) as exc:
            logger.warning("allocation port %d/%s: bind failed: %s", self.port, family.name, exc)
            self._close_all()
            self.stop()
            # Report after this actor has let go of everything, so the Free commands the core
            # may emit for this port find nothing left to do.
            tell(self._control, AllocationBindFailed(self.port, time.monotonic()))
            return
        self.sockets[family] = sock
        tell(self._control, PeerSocketOpened(self.port, family, sock))
        self.actor_loop.add_reader(sock.fileno(), self._on_readable, sock, self.port)

    def _close(self, family: Family) -> None:
        sock = self.sockets.pop(family, None)
        if sock is None:
            return
        self.actor_loop.remove_reader(sock.fileno())
        # The data plane closes it, after dropping its routes; with no control left (shutdown)
        # nothing reads or relays any more, and it is closed here.
        if not tell(self._control, PeerSocketClosed(self.port, family, sock)):
            sock.close()

    def _close_all(self) -> None:
        for family in list(self.sockets):
            self._close(family)

    def on_stop(self) -> None:
        self._close_all()
        tell(self._control, AllocationStopped(self.port, self.actor_ref))

    def on_failure(self, *exc_info: object) -> None:
        self._close_all()
        tell(self._control, AllocationStopped(self.port, self.actor_ref))
