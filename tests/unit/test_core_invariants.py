"""Random sequences of requests, data, timers and failed binds keep the core's invariants.

After every step ``Server.check_invariants`` asserts what ``protocol.allocations`` and
``protocol.ports`` document: the indexes agree, routes exist exactly for bound channels,
quotas hold, reservations are consistent.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from firezone_relay.protocol.commands import CreateAllocation
from firezone_relay.protocol.stun import Attr, Method
from firezone_relay.protocol.types import Addr, Family
from simulations import channel_data
from simulations.turn_client import TurnClient
from tests.unit.harness import PEER, PEER6, PUBLIC4, Harness

SENDERS: list[Addr] = [("93.184.216.34", 40000 + i) for i in range(3)] + [
    ("2606:2800:220:1::7", 40000)
]
PEERS: list[Addr] = [PEER, ("8.8.8.8", 7000), PEER6]

VARIANTS = ["plain", "even", "dual", "v6"]
CHANNELS = st.integers(0x4000, 0x4003)
steps = st.lists(
    st.one_of(
        st.tuples(st.just("allocate"), st.integers(0, 3), st.sampled_from(VARIANTS)),
        st.tuples(st.just("permission"), st.integers(0, 3), st.integers(0, 2)),
        st.tuples(st.just("bind"), st.integers(0, 3), CHANNELS, st.integers(0, 3)),
        st.tuples(st.just("refresh"), st.integers(0, 3), st.sampled_from([0, 600, None])),
        st.tuples(st.just("drop_v6"), st.integers(0, 3)),
        st.tuples(st.just("data"), st.integers(0, 3), st.integers(0x4000, 0x4003)),
        st.tuples(st.just("peer"), st.integers(0, 2), st.integers(0, 3)),
        st.tuples(st.just("advance"), st.sampled_from([1.0, 200.0, 350.0, 700.0])),
        st.tuples(st.just("bind_failed"), st.integers(0, 3)),
    ),
    max_size=40,
)


class _World:
    """A harness with a few clients on fixed 5-tuples, each with one username (two share)."""

    def __init__(self) -> None:
        self.h = Harness(lowest_port=50000, highest_port=50015, max_channels_per_allocation=3)
        salts = ["a", "b", "c", "a"]  # senders 0 and 3 share a username
        self.clients: list[TurnClient] = [self.h.client(salt) for salt in salts]
        self.ports: dict[int, int] = {}

    def send(self, index: int, data: bytes) -> None:
        outcome = self.h.send(data, SENDERS[index])
        for command in outcome.others:
            if isinstance(command, CreateAllocation):
                self.ports[index] = command.port
        for message in outcome.messages:
            self.clients[index].learn(message)

    def step(self, op: tuple) -> None:  # type: ignore[type-arg]
        kind, *args = op
        server = self.h.server
        if kind == "allocate":
            index, variant = args
            client = self.clients[index]
            if client.nonce is None:
                self.h.authenticate(client, SENDERS[index])
            options: dict[str, object] = {
                "plain": {},
                "even": {"extra": [(Attr.EVEN_PORT, True)]},
                "dual": {"additional_family": Family.V6},
                "v6": {"requested_family": Family.V6},
            }[variant]
            self.send(index, client.allocate(**options))
        elif kind == "permission":
            index, peer = args
            self.send(index, self.clients[index].create_permission(PEERS[peer]))
        elif kind == "bind":
            index, number, target = args
            # targets 0-2 are peers; 3 is another allocation of this relay (the relay loop)
            other = self.ports.get((index + 1) % 4)
            peer = (PUBLIC4, other) if target == 3 and other is not None else PEERS[target % 3]
            self.send(index, self.clients[index].channel_bind(number, peer))
        elif kind == "refresh":
            index, lifetime = args
            self.send(index, self.clients[index].refresh(lifetime=lifetime))
        elif kind == "drop_v6":
            (index,) = args
            client = self.clients[index]
            data = client.request(
                Method.REFRESH,
                [(Attr.LIFETIME, 0), (Attr.REQUESTED_ADDRESS_FAMILY, Family.V6)],
            )
            self.send(index, data)
        elif kind == "data":
            index, number = args
            self.h.send(channel_data.encode(number, b"data"), SENDERS[index])
        elif kind == "peer":
            peer, index = args
            port = self.ports.get(index)
            if port is not None:
                self.h.peer(b"from a peer", PEERS[peer], port)
        elif kind == "advance":
            (seconds,) = args
            self.h.advance(seconds)
        elif kind == "bind_failed":
            (index,) = args
            port = self.ports.get(index)
            if port is not None:
                server.handle_allocation_failed(port, self.h.now)
                self.h.drain()
        server.check_invariants()
        assert server.stats.internal_errors == 0


@settings(max_examples=200, deadline=None)
@given(steps)
def test_invariants_hold_after_every_step(ops: list[tuple]) -> None:  # type: ignore[type-arg]
    world = _World()
    world.h.server.check_invariants()
    for op in ops:
        world.step(op)
    world.h.server.free_all()
    world.h.drain()
    world.h.server.check_invariants()
    assert world.h.server.num_allocations == 0 and world.h.server.num_active_channels == 0
