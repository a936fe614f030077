"""The allocation registry and the Allocate that waits for it: what makes the workers of one
relay count allocations as one (issue 20, item 3 of "One relay, not N")."""

from __future__ import annotations

import gc
import random
import weakref

import pytest

from firezone_relay.protocol import server as server_module
from firezone_relay.protocol import stun
from firezone_relay.protocol.commands import (
    CreateAllocation,
    CreateChannelBinding,
    DeleteChannelBinding,
    FreeAllocation,
    ReleaseAllocation,
    ReserveAllocation,
    SendMessage,
)
from firezone_relay.protocol.errors import ErrorCode
from firezone_relay.protocol.reservations import (
    EvictAllocation,
    ReservationAnswer,
    Reservations,
)
from firezone_relay.protocol.server import RESERVATION_ANSWER_TIMEOUT, Server, ServerConfig
from firezone_relay.protocol.stun import Method
from firezone_relay.protocol.types import Family, FiveTuple, Transport
from tests.unit.harness import CLIENT, PEER, Harness, error_code, five_tuple, is_success
from tests.unit.relay_group import Group

A = FiveTuple(Transport.UDP, ("198.51.100.1", 1000), ("0.0.0.0", 3478))
B = FiveTuple(Transport.UDP, ("198.51.100.2", 2000), ("0.0.0.0", 3478))
OTHER = ("93.184.216.34", 40001)


def _reserve(ticket: int, username: str = "1:u", user: str = "u", client: FiveTuple = A):
    return ReserveAllocation(ticket, client, username, user)


# --- the registry alone ----------------------------------------------------------------------


def test_registry_grants_and_releases() -> None:
    registry = Reservations(limit=10, per_user_limit=10, single_per_username=True)
    assert registry.reserve(0, _reserve(1)) == [ReservationAnswer(0, 1, None)]
    assert registry.holds(0, 1) and len(registry) == 1
    assert registry.reserve(0, _reserve(1)) == [ReservationAnswer(0, 1, None)]  # asked twice
    assert len(registry) == 1
    registry.release(0, 1)
    registry.release(0, 1)  # unknown tickets are ignored
    registry.release(1, 7)
    assert len(registry) == 0 and not registry.per_user and not registry.of_worker
    registry.check_invariants()


def test_registry_evicts_the_usernames_allocation_on_its_owner_before_granting() -> None:
    registry = Reservations(limit=10, per_user_limit=10, single_per_username=True)
    registry.reserve(0, _reserve(1, client=A))
    out = registry.reserve(1, _reserve(2, client=B))
    assert out == [EvictAllocation(0, 1, B), ReservationAnswer(1, 2, None)]
    assert not registry.holds(0, 1) and registry.holds(1, 2)
    registry.release(0, 1)  # the owner's release after the eviction changes nothing
    assert registry.holds(1, 2) and registry.per_user == {"u": 1}
    registry.check_invariants()


def test_registry_keeps_several_per_username_when_allowed() -> None:
    registry = Reservations(limit=10, per_user_limit=2, single_per_username=False)
    registry.reserve(0, _reserve(1))
    assert registry.reserve(1, _reserve(2)) == [ReservationAnswer(1, 2, None)]
    assert registry.reserve(1, _reserve(3, "2:u")) == [
        ReservationAnswer(1, 3, ErrorCode.ALLOCATION_QUOTA_REACHED)
    ]
    assert registry.reserve(0, _reserve(4, "3:v", "v")) == [ReservationAnswer(0, 4, None)]
    registry.check_invariants()


def test_registry_caps_the_relay() -> None:
    registry = Reservations(limit=2, per_user_limit=10, single_per_username=True)
    registry.reserve(0, _reserve(1, "1:a", "a"))
    registry.reserve(1, _reserve(2, "1:b", "b"))
    assert registry.reserve(0, _reserve(3, "1:c", "c")) == [
        ReservationAnswer(0, 3, ErrorCode.INSUFFICIENT_CAPACITY)
    ]
    # the username's own allocation makes room for its new one, as one core always did
    assert registry.reserve(0, _reserve(4, "1:b", "b")) == [
        EvictAllocation(1, 2, A),
        ReservationAnswer(0, 4, None),
    ]
    registry.check_invariants()


def test_a_dead_worker_releases_all_its_entries() -> None:
    registry = Reservations(limit=3, per_user_limit=10, single_per_username=True)
    for ticket in range(3):
        registry.reserve(ticket % 2, _reserve(ticket, f"1:{ticket}", f"{ticket}"))
    assert registry.worker_gone(0) == 2
    assert registry.worker_gone(0) == 0
    assert len(registry) == 1 and set(registry.tickets(1)) == {1}
    assert registry.reserve(1, _reserve(5, "1:0", "0")) == [ReservationAnswer(1, 5, None)]
    registry.check_invariants()


def test_handle_dispatches_requests() -> None:
    registry = Reservations(limit=3, per_user_limit=10, single_per_username=True)
    assert registry.handle(0, _reserve(1)) == [ReservationAnswer(0, 1, None)]
    assert registry.handle(0, ReleaseAllocation(1)) == []
    assert len(registry) == 0


# --- one core alone: its own registry, answered within the same call -------------------------


def test_a_single_worker_answers_allocate_at_once_without_registry_commands() -> None:
    h = Harness()
    client = h.client()
    out = h.allocate(client)
    assert is_success(out.response)
    assert not any(isinstance(c, ReserveAllocation | ReleaseAllocation) for c in out.commands)
    assert h.server.reservations is not None and len(h.server.reservations) == 1
    h.server.check_invariants()
    deleted = h.send(client.refresh(0))
    assert not any(isinstance(c, ReleaseAllocation) for c in deleted.commands)
    assert len(h.server.reservations) == 0
    h.server.check_invariants()


def test_a_single_worker_frees_the_usernames_allocation_through_its_registry() -> None:
    h = Harness()
    client = h.client()
    first = h.allocate(client)
    h.send(client.channel_bind(0x4000, PEER))
    client.nonce = None
    out = h.allocate(client, OTHER)
    old_port = first.others[0].port  # type: ignore[union-attr]
    assert out.others[:2] == [
        DeleteChannelBinding(five_tuple(CLIENT), 0x4000, PEER, old_port),
        FreeAllocation(old_port, Family.V4),
    ]
    assert is_success(out.response) and len(h.server.reservations or ()) == 1
    h.server.check_invariants()


# --- a worker of several: the Allocate waits for the supervisor's registry --------------------


def _worker(**config: object) -> Harness:
    return Harness(workers=2, worker=1, **config)


def _waiting(h: Harness, sender: tuple[str, int] = CLIENT):  # type: ignore[no-untyped-def]
    client = h.client()
    h.authenticate(client, sender)
    request = client.allocate()
    out = h.send(request, sender)
    (reserve,) = out.commands
    assert isinstance(reserve, ReserveAllocation)
    return client, request, reserve


def test_a_worker_answers_allocate_only_when_the_registry_answers() -> None:
    h = _worker()
    client, request, reserve = _waiting(h)
    assert reserve.client == five_tuple(CLIENT) and reserve.username == client.username
    assert reserve.user == client.username.split(":", 1)[1]
    assert h.server.num_allocations == 0
    h.server.handle_reservation(reserve.ticket, None, h.now)
    commands = h.drain()
    assert isinstance(commands[0], CreateAllocation)  # socket before response
    (response,) = [c for c in commands if isinstance(c, SendMessage)]
    first, last = h.server.config.port_share
    assert first <= commands[0].port <= last == 65535 and first > 49152
    # the answer went into the retransmission cache: a retransmission gets the same bytes
    assert h.send(request).commands == [response]
    assert is_success(h.send(request).response) and client.verify(h.send(request).response)
    h.server.check_invariants()


def test_a_retransmitted_allocate_while_waiting_makes_no_second_reservation() -> None:
    h = _worker()
    client, request, reserve = _waiting(h)
    assert h.send(request).commands == []
    other = client.allocate()  # a new transaction from the same 5-tuple
    assert error_code(h.send(other).response) == 437
    h.server.handle_reservation(reserve.ticket, None, h.now)
    assert is_success(_only_response(h.drain()))
    assert h.server.num_allocations == 1
    h.server.check_invariants()


def _only_response(commands: list[object]):  # type: ignore[no-untyped-def]
    (response,) = [stun.parse(c.payload) for c in commands if isinstance(c, SendMessage)]
    return response


@pytest.mark.parametrize(
    "refusal", [ErrorCode.ALLOCATION_QUOTA_REACHED, ErrorCode.INSUFFICIENT_CAPACITY]
)
def test_a_refused_reservation_answers_with_its_code_signed(refusal: ErrorCode) -> None:
    h = _worker()
    client, _, reserve = _waiting(h)
    h.server.handle_registry_message(ReservationAnswer(1, reserve.ticket, refusal), h.now)
    commands = h.drain()
    response = _only_response(commands)
    assert error_code(response) == refusal and client.verify(response)
    assert not any(isinstance(c, CreateAllocation | ReleaseAllocation) for c in commands)
    assert h.server.num_allocations == 0
    h.server.check_invariants()


def test_an_unanswered_reservation_times_out_with_508_and_a_late_grant_is_given_back() -> None:
    h = _worker()
    client, _, reserve = _waiting(h)
    assert h.advance(RESERVATION_ANSWER_TIMEOUT - 0.1) == []
    response = _only_response(h.advance(0.1))
    assert error_code(response) == 508 and client.verify(response)
    h.server.check_invariants()
    h.server.handle_reservation(reserve.ticket, None, h.now)
    assert h.drain() == [ReleaseAllocation(reserve.ticket)]
    h.server.handle_reservation(reserve.ticket, ErrorCode.INSUFFICIENT_CAPACITY, h.now)
    assert h.drain() == []
    # the client tries again (a new transaction): a new reservation
    again = h.send(client.allocate())
    (second,) = again.commands
    assert isinstance(second, ReserveAllocation) and second.ticket != reserve.ticket


def test_waiting_allocates_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_module, "MAX_WAITING_ALLOCATES", 3)
    h = _worker()
    for i in range(3):
        _waiting(h, ("93.184.216.34", 41000 + i))
    client = h.client()
    h.authenticate(client, OTHER)
    assert error_code(h.send(client.allocate(), OTHER).response) == 508
    h.server.check_invariants()


def test_a_worker_releases_its_allocations_when_they_end() -> None:
    h = _worker()
    client, _, reserve = _waiting(h)
    h.server.handle_reservation(reserve.ticket, None, h.now)
    h.drain()
    out = h.send(client.refresh(0))
    assert out.others[-1] == ReleaseAllocation(reserve.ticket)
    h.server.check_invariants()


def test_a_worker_frees_an_evicted_allocation() -> None:
    h = _worker()
    client, _, reserve = _waiting(h)
    h.server.handle_reservation(reserve.ticket, None, h.now)
    port = next(c.port for c in h.drain() if isinstance(c, CreateAllocation))
    h.send(client.channel_bind(0x4000, PEER))
    allocation = h.server.allocation_on(port)
    assert allocation is not None and not allocation.replaced
    h.server.handle_registry_message(EvictAllocation(1, reserve.ticket, five_tuple(OTHER)), h.now)
    assert allocation.replaced  # what tracing calls the end of it
    assert h.drain() == [
        DeleteChannelBinding(five_tuple(CLIENT), 0x4000, PEER, port),
        FreeAllocation(port, Family.V4),
        ReleaseAllocation(reserve.ticket),
    ]
    h.server.handle_registry_message(EvictAllocation(1, reserve.ticket, five_tuple(OTHER)), h.now)
    assert h.drain() == [] and h.server.num_allocations == 0
    assert error_code(h.send(client.refresh(600)).response) == 437


def test_a_stream_client_that_leaves_while_waiting_gives_its_grant_back() -> None:
    h = _worker()
    _, _, reserve = _waiting(h)
    h.server.handle_client_closed(five_tuple(CLIENT), h.now)
    h.server.check_invariants()
    h.server.handle_reservation(reserve.ticket, None, h.now)
    assert h.drain() == [ReleaseAllocation(reserve.ticket)]
    assert h.server.num_allocations == 0


def test_a_grant_while_draining_is_508_and_given_back() -> None:
    h = _worker()
    _, _, reserve = _waiting(h)
    h.server.draining = True
    h.server.handle_reservation(reserve.ticket, None, h.now)
    commands = h.drain()
    assert error_code(_only_response(commands)) == 508
    assert ReleaseAllocation(reserve.ticket) in commands


def test_a_worker_allocates_only_in_its_share_of_the_ports() -> None:
    group = Group(workers=3, lowest_port=50000, highest_port=50008)
    for worker in range(3):
        first, last = group.servers[worker].config.port_share
        assert last - first == 2
        for i in range(3):
            out = group.allocate(worker, group.client(f"w{worker}c{i}"), ("10.0.0.1", 1000 + i))
            assert first <= group.port_of(out) <= last
        out = group.allocate(worker, group.client(f"w{worker}full"), ("10.0.0.1", 2000))
        assert error_code(out.response) == 508  # its share is full, the others' are not
    group.check_invariants()


# --- several workers and the supervisor's registry --------------------------------------------


def test_one_username_from_two_workers_frees_the_first_before_the_second_answers() -> None:
    group = Group()
    client = group.client()
    first = group.allocate(0, client, CLIENT)
    old_port = group.port_of(first)
    group.send(0, client.channel_bind(0x4000, PEER), CLIENT)
    client.nonce = None  # another socket: another nonce (the same key on both workers)
    out = group.allocate(1, client, OTHER)
    kinds = [(w, type(e)) for w, e in out.events]
    assert kinds == [
        (0, DeleteChannelBinding),
        (0, FreeAllocation),
        (1, CreateAllocation),
        (1, SendMessage),
    ]
    assert out.of(0)[1] == FreeAllocation(old_port, Family.V4)
    assert is_success(out.response) and out.response.method == Method.ALLOCATE
    assert group.servers[0].num_allocations == 0 and group.servers[1].num_allocations == 1
    assert len(group.registry) == 1
    # the evicted allocation's release reached the registry and changed nothing
    assert isinstance(group.requests[-1][1], ReleaseAllocation)
    group.check_invariants()


def test_a_per_user_quota_holds_across_workers() -> None:
    group = Group(auth_scheme="rest", realm="example.org", max_allocations_per_user=2)
    codes = []
    for i in range(4):
        client = group.client("alice", expiry=int(group.now) + 3600 + i)
        out = group.allocate(i % 2, client, ("93.184.216.34", 41000 + i))
        codes.append(error_code(out.response))
    assert codes == [None, None, 486, 486]
    assert sum(s.num_allocations for s in group.servers) == 2
    group.check_invariants()


def test_max_allocations_holds_across_workers_and_a_dead_worker_frees_its_share() -> None:
    group = Group(max_allocations=3)
    codes = [
        error_code(group.allocate(i % 2, group.client(f"s{i}"), ("10.0.0.1", 1000 + i)).response)
        for i in range(4)
    ]
    assert codes == [None, None, None, 508]
    assert group.worker_died(0) == 2  # allocations 0 and 2 were on worker 0
    out = group.allocate(1, group.client("s9"), ("10.0.0.1", 1009))
    assert is_success(out.response)
    group.check_invariants()


def test_a_registry_answer_for_another_incarnation_is_harmless() -> None:
    group = Group()
    group.held = []
    client = group.client()
    group.allocate(0, client, CLIENT)
    (answer,) = group.held
    group.worker_died(0)
    assert len(group.registry) == 0
    assert group.deliver(answer).events == []  # the new core waits for nothing: given back
    assert group.requests[-1] == (0, ReleaseAllocation(answer.ticket))
    assert len(group.registry) == 0 and group.servers[0].num_allocations == 0
    group.check_invariants()


def test_channel_binding_commands_are_unchanged_on_a_worker() -> None:
    group = Group()
    client = group.client()
    port = group.port_of(group.allocate(1, client, CLIENT))
    out = group.send(1, client.channel_bind(0x4001, PEER), CLIENT)
    assert out.events[0] == (1, CreateChannelBinding(five_tuple(CLIENT), 0x4001, PEER, port))


@pytest.mark.parametrize("workers", [1, 2])
def test_the_release_hook_holds_no_reference_to_its_core(workers: int) -> None:
    """So the registry adds no reference cycle: a dropped core is freed without waiting for
    the cyclic GC (benchmarks and tests make many cores)."""
    gc.disable()
    try:
        server = Server(ServerConfig(public_ip4="52.0.0.1", workers=workers), random.Random(1))
        core = weakref.ref(server)
        del server
        assert core() is None
    finally:
        gc.enable()
