"""One loop-hosted actor per allocation port: it owns the port's sockets, their registration
with the loop, its counters and its teardown.

The actor never sees a relayed datagram: the reader callback it registers is the data plane's
``on_peer_readable``, called by the loop directly. The actor only handles the control messages
the pipeline routes to it (``CreateAllocation`` / ``FreeAllocation`` for each family).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

from actors.loop_actor import LoopActor
from actors.sockets import bind_udp
from protocol.commands import CreateAllocation, FreeAllocation
from protocol.types import Family

if TYPE_CHECKING:
    from actors.dataplane import DataPlane

__all__ = ["AllocationActor"]

logger = logging.getLogger("relay.allocation")

IP_MTU_DISCOVER = getattr(socket, "IP_MTU_DISCOVER", 10)
IP_PMTUDISC_DO = getattr(socket, "IP_PMTUDISC_DO", 2)


class AllocationActor(LoopActor):
    """Sockets and counters of one allocation port (one socket per address family)."""

    registered: ClassVar[bool] = False  # tracked by the pipeline's port table instead

    def __init__(
        self,
        port: int,
        dataplane: DataPlane,
        bind_hosts: dict[Family, str],
        on_gone: Callable[[int, AllocationActor], None],
        *,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(loop=loop)
        self.port = port
        self._dataplane = dataplane
        self._bind_hosts = bind_hosts
        self._on_gone = on_gone  # called with (port, actor) once the actor has stopped
        self.sockets: dict[Family, socket.socket] = {}
        #: datagrams and payload bytes relayed peer -> client through this allocation
        self.counters = [0, 0]

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
            sock = bind_udp(family, self._bind_hosts[family], self.port)
            if dont_fragment and family is Family.V4:
                # DF on every datagram to peers; a too-big one fails instead of fragmenting.
                # (IPv6 is never fragmented on the way; RFC 8656 ignores DF across families.)
                sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
        except (OSError, KeyError) as exc:
            logger.warning("allocation port %d/%s: bind failed: %s", self.port, family.name, exc)
            self._close_all()
            self.stop()
            # Tell the core after this actor has let go of everything, so the Free commands the
            # core may emit for this port find nothing left to do.
            self._dataplane.server.handle_allocation_failed(self.port, time.monotonic())
            return
        self.sockets[family] = sock
        self._dataplane.allocation_sockets[(self.port, int(family))] = sock
        self.actor_loop.add_reader(
            sock.fileno(), self._dataplane.on_peer_readable, sock, self.port, self.counters
        )

    def _close(self, family: Family) -> None:
        sock = self.sockets.pop(family, None)
        if sock is None:
            return
        self._dataplane.allocation_sockets.pop((self.port, int(family)), None)
        self.actor_loop.remove_reader(sock.fileno())
        sock.close()

    def _close_all(self) -> None:
        for family in list(self.sockets):
            self._close(family)

    def on_stop(self) -> None:
        self._close_all()
        self._on_gone(self.port, self)

    def on_failure(self, *exc_info: object) -> None:
        self._close_all()
        self._on_gone(self.port, self)
