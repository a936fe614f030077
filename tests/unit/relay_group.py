"""Several cores of one relay in one test, with the supervisor's part played by hand.

Each worker is a ``Server`` configured as worker ``i`` of ``n`` with the same secret and
nonce key; one ``Reservations`` registry answers their ``ReserveAllocation`` /
``ReleaseAllocation``; ``ForwardToWorker`` goes to the named worker's
``handle_forwarded``. Everything else a core emits is recorded, in the order the group
produced it, as ``(worker, command)``. Delivery is depth-first (a message's consequences
come out before the next message is delivered), so the order of ``events`` is the order in
which the supervisor would send things.
"""

from __future__ import annotations

import collections
import random
from dataclasses import dataclass, field

from firezone_relay.protocol import stun
from firezone_relay.protocol.auth import firezone_password, rest_password
from firezone_relay.protocol.commands import (
    Command,
    CreateAllocation,
    ForwardToWorker,
    ReleaseAllocation,
    ReserveAllocation,
    SendMessage,
)
from firezone_relay.protocol.reservations import (
    EvictAllocation,
    RegistryMessage,
    ReservationAnswer,
    Reservations,
)
from firezone_relay.protocol.routes import ClientRoute, ToClient
from firezone_relay.protocol.server import Server, ServerConfig
from firezone_relay.protocol.stun import Message
from firezone_relay.protocol.types import Addr
from simulations.turn_client import TurnClient
from tests.unit.harness import NOW, PUBLIC4, PUBLIC6, five_tuple

SECRET = "a shared secret of the relay, 32+"
NONCE_KEY = bytes(range(32))


@dataclass(frozen=True)
class Forwarded:
    """What a worker's ``handle_forwarded`` returned for a ``ForwardToWorker``: the
    ChannelData route to its client, with the payload the I/O layer would frame."""

    route: ToClient
    payload: bytes


@dataclass
class GroupOutcome:
    events: list[tuple[int, Command | Forwarded]] = field(default_factory=list)
    relay: ClientRoute | ToClient | None = None

    def of(self, worker: int) -> list[Command | Forwarded]:
        return [event for w, event in self.events if w == worker]

    def messages(self, worker: int | None = None) -> list[Message]:
        return [
            stun.parse(e.payload)
            for w, e in self.events
            if isinstance(e, SendMessage) and (worker is None or w == worker)
        ]

    @property
    def response(self) -> Message:
        (message,) = self.messages()
        return message


class Group:
    def __init__(self, workers: int = 2, **config: object) -> None:
        settings: dict[str, object] = {"public_ip4": PUBLIC4, "public_ip6": PUBLIC6}
        settings.update(config)
        self.servers = [
            Server(
                ServerConfig(**settings, workers=workers, worker=i),  # type: ignore[arg-type]
                random.Random(i + 1),
                SECRET,
                nonce_key=NONCE_KEY,
            )
            for i in range(workers)
        ]
        self.registry = Reservations.from_config(self.servers[0].config)
        self.now = NOW
        #: registry messages kept back instead of delivered (``hold``), for tests of waiting
        self.held: list[RegistryMessage] | None = None
        #: every ``ReserveAllocation`` / ``ReleaseAllocation`` the registry saw, by worker
        self.requests: list[tuple[int, ReserveAllocation | ReleaseAllocation]] = []
        #: how often each path of interest was taken (random walks check they were)
        self.seen: collections.Counter[str] = collections.Counter()
        self._out = GroupOutcome()

    # --- inputs --------------------------------------------------------------------------

    def send(self, worker: int, data: bytes, sender: Addr) -> GroupOutcome:
        relay = self.servers[worker].handle_client_input(data, five_tuple(sender), self.now)
        return self._pump(worker, relay)

    def peer(self, worker: int, data: bytes, peer: Addr, port: int) -> GroupOutcome:
        relay = self.servers[worker].handle_peer_traffic(data, peer, port, self.now)
        return self._pump(worker, relay)

    def advance(self, seconds: float) -> GroupOutcome:
        self.now += seconds
        for server in self.servers:
            waiting = len(server._waiting)
            server.handle_timeout(self.now)
            self.seen["timed out"] += waiting - len(server._waiting)
        self._out = GroupOutcome()
        for i in range(len(self.servers)):
            self._drain(i)
        return self._out

    def deliver(self, message: RegistryMessage) -> GroupOutcome:
        """Deliver a held registry message now."""
        self.seen["late"] += 1
        self._out = GroupOutcome()
        self.servers[message.worker].handle_registry_message(message, self.now)
        self._drain(message.worker)
        return self._out

    def worker_died(self, worker: int) -> int:
        """The supervisor saw ``worker`` die: a fresh core takes its place."""
        gone = self.registry.worker_gone(worker)
        old = self.servers[worker]
        self.servers[worker] = Server(old.config, random.Random(99), SECRET, nonce_key=NONCE_KEY)
        return gone

    # --- clients -------------------------------------------------------------------------

    def client(self, salt: str = "n23JJ2wKKtt30oXi", expiry: int | None = None) -> TurnClient:
        expiry = int(self.now) + 3600 if expiry is None else expiry
        username = f"{expiry}:{salt}"
        if self.servers[0].config.auth_scheme == "rest":
            password = rest_password(SECRET, username)
        else:
            password = firezone_password(SECRET, expiry, salt)
        return TurnClient(username, password, rng=random.Random(salt))

    def allocate(self, worker: int, client: TurnClient, sender: Addr) -> GroupOutcome:
        if client.nonce is None:
            client.learn(self.send(worker, client.allocate(transport=0), sender).response)
        return self.send(worker, client.allocate(), sender)

    def port_of(self, outcome: GroupOutcome) -> int:
        return next(e.port for _, e in outcome.events if isinstance(e, CreateAllocation))

    def check_invariants(self) -> None:
        self.registry.check_invariants()
        for server in self.servers:
            server.check_invariants()

    # --- the supervisor's part -----------------------------------------------------------

    def _pump(self, worker: int, relay: ClientRoute | ToClient | None) -> GroupOutcome:
        self._out = GroupOutcome(relay=relay)
        self._drain(worker)
        return self._out

    def _drain(self, worker: int) -> None:
        server = self.servers[worker]
        while (command := server.next_command()) is not None:
            if isinstance(command, ReserveAllocation | ReleaseAllocation):
                self.requests.append((worker, command))
                for message in self.registry.handle(worker, command):
                    if isinstance(message, EvictAllocation):
                        self.seen["evicted"] += 1
                    elif isinstance(message, ReservationAnswer) and message.refusal is not None:
                        self.seen["refused"] += 1
                    if self.held is not None:
                        self.held.append(message)
                        continue
                    self.servers[message.worker].handle_registry_message(message, self.now)
                    self._drain(message.worker)
            elif isinstance(command, ForwardToWorker):
                self.seen["forwarded"] += 1
                target = self.servers[command.worker]
                relayed = target.stats.relayed_packets_userspace
                route = target.handle_forwarded(
                    command.from_relayed_addr, command.to_relayed_addr[1], command.payload, self.now
                )
                if target.stats.relayed_packets_userspace > relayed:
                    self.seen["delivered forward"] += 1
                if route is not None:
                    self._out.events.append((command.worker, Forwarded(route, command.payload)))
                self._drain(command.worker)
            else:
                self._out.events.append((worker, command))
