"""Random sequences against two workers and their allocation registry keep every invariant.

The steps mix Allocates (one username on both workers), deletions, expiries, failed binds,
channels and data across workers, answers of the registry held back and delivered late (or
after the Allocate gave up), and a worker dying. After every step each core and the registry
assert their invariants; the relay never holds more allocations than ``--max-allocations``
beyond evictions still on their way; and whenever nothing is in flight, the registry holds
exactly the allocations the workers hold.
"""

from __future__ import annotations

import collections
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from firezone_relay.protocol.reservations import EvictAllocation
from firezone_relay.protocol.types import Addr
from simulations import channel_data
from simulations.turn_client import TurnClient
from tests.unit.harness import PEER, PUBLIC4
from tests.unit.relay_group import Group, GroupOutcome

SENDERS: list[Addr] = [("93.184.216.34", 40000 + i) for i in range(4)]
LIMIT = 2

steps = st.lists(
    st.one_of(
        st.tuples(st.just("allocate"), st.integers(0, 3)),
        st.tuples(st.just("refresh"), st.integers(0, 3), st.sampled_from([0, 600])),
        st.tuples(st.just("bind"), st.integers(0, 3), st.just(0x4000), st.booleans()),
        st.tuples(st.just("data"), st.integers(0, 3), st.just(0x4000)),
        st.tuples(st.just("indication"), st.integers(0, 3)),
        st.tuples(st.just("advance"), st.sampled_from([0.5, 2.5, 700.0])),
        st.tuples(st.just("hold")),
        st.tuples(st.just("deliver")),
        st.tuples(st.just("permission"), st.integers(0, 3)),
        # rarer: each takes allocations away
        st.tuples(st.just("die"), st.integers(0, 1), st.integers(0, 5)),
        st.tuples(st.just("bind_failed"), st.integers(0, 3), st.integers(0, 5)),
    ),
    min_size=10,
    max_size=60,
)


class _World:
    def __init__(self) -> None:
        self.group = Group(lowest_port=50000, highest_port=50007, max_allocations=LIMIT)
        salts = ["a", "b", "c", "a"]  # senders 0 (worker 0) and 3 (worker 1) share a username
        self.clients: list[TurnClient] = [self.group.client(salt) for salt in salts]
        self.ports: dict[int, int] = {}

    @staticmethod
    def worker(index: int) -> int:
        return index % 2

    def learn(self, index: int, outcome: GroupOutcome) -> None:
        for message in outcome.messages(self.worker(index)):
            self.clients[index].learn(message)

    def send(self, index: int, data: bytes) -> None:
        outcome = self.group.send(self.worker(index), data, SENDERS[index])
        self.learn(index, outcome)
        try:
            self.ports[index] = self.group.port_of(outcome)
        except StopIteration:
            pass

    def step(self, op: tuple) -> None:  # type: ignore[type-arg]
        kind, *args = op
        group = self.group
        if kind == "allocate":
            (index,) = args
            client = self.clients[index]
            if client.nonce is None:
                self.send(index, client.allocate(transport=0))
            self.send(index, client.allocate())
        elif kind == "refresh":
            index, lifetime = args
            self.send(index, self.clients[index].refresh(lifetime=lifetime))
        elif kind == "bind":
            index, number, loop = args
            other = self.ports.get((index + 1) % 4)
            peer = (PUBLIC4, other) if loop and other is not None else PEER
            self.send(index, self.clients[index].channel_bind(number, peer))
        elif kind == "data":
            index, number = args
            self.send(index, channel_data.encode(number, b"data"))
        elif kind == "indication":
            (index,) = args
            other = self.ports.get((index + 1) % 4)
            if other is not None:
                self.send(index, self.clients[index].send_indication((PUBLIC4, other), b"x"))
        elif kind == "advance":
            (seconds,) = args
            group.advance(seconds)
        elif kind == "hold":
            if group.held is None:
                group.held = []
        elif kind == "deliver":
            held, group.held = group.held or [], None
            for message in held:
                group.deliver(message)
        elif kind == "permission":
            (index,) = args
            self.send(index, self.clients[index].create_permission((PUBLIC4, 1)))
        elif kind == "die":
            worker, dice = args
            if dice:
                return self.check()
            group.worker_died(worker)
            for index in range(worker, 4, 2):
                self.ports.pop(index, None)  # their nonces survive: the key is the relay's
        elif kind == "bind_failed":
            index, dice = args
            port = self.ports.get(index) if dice == 0 else None
            server = group.servers[self.worker(index)]
            if port is not None and server.allocation_on(port) is not None:
                server.handle_allocation_failed(port, group.now)
                group.advance(0.0)
        self.check()

    def check(self) -> None:
        group = self.group
        group.check_invariants()
        assert all(server.stats.internal_errors == 0 for server in group.servers)
        held = group.held or []
        evictions = sum(isinstance(m, EvictAllocation) for m in held)
        assert sum(s.num_allocations for s in group.servers) <= LIMIT + evictions
        if not held:
            for worker, server in enumerate(group.servers):
                assert set(group.registry.tickets(worker)) == set(server._table.by_ticket)


@settings(max_examples=300, deadline=None)
@given(steps)
def test_two_workers_and_their_registry_stay_consistent(ops: list[tuple]) -> None:  # type: ignore[type-arg]
    world = _World()
    for op in ops:
        world.step(op)
    world.step(("deliver",))
    for server in world.group.servers:
        server.free_all()
    world.group.advance(0.0)
    world.check()
    assert len(world.group.registry) == 0


def test_random_walks_reach_every_cross_worker_path() -> None:
    """Seeded walks over the same steps, checked like the property above, that must go
    through every path of interest (so that the walks prove something)."""
    rng = random.Random(20)
    seen: collections.Counter[str] = collections.Counter()
    kinds = ["allocate", "bind", "data", "indication", "permission"] * 3
    kinds += ["refresh", "advance", "hold", "deliver", "die", "bind_failed"]
    for _ in range(150):
        world = _World()
        for _ in range(40):
            kind = rng.choice(kinds)
            index = rng.randrange(4)
            op: tuple[object, ...] = {
                "allocate": ("allocate", index),
                "refresh": ("refresh", index, rng.choice([0, 600])),
                "bind": ("bind", index, 0x4000, rng.random() < 0.7),
                "data": ("data", index, 0x4000),
                "indication": ("indication", index),
                "permission": ("permission", index),
                "advance": ("advance", rng.choice([0.5, 2.5, 700.0])),
                "hold": ("hold",),
                "deliver": ("deliver",),
                "die": ("die", index % 2, rng.randrange(6)),
                "bind_failed": ("bind_failed", index, rng.randrange(3)),
            }[kind]
            world.step(op)
        world.step(("deliver",))
        seen.update(world.group.seen)
    for what in ("forwarded", "delivered forward", "evicted", "refused", "timed out", "late"):
        assert seen[what] > 0, (what, seen)
