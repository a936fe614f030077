"""The core's collaborators on their own: port allocator, timer dispatch, error codes."""

from __future__ import annotations

import random
import typing

from firezone_relay.protocol import stun
from firezone_relay.protocol.errors import ErrorCode
from firezone_relay.protocol.ports import PortAllocator
from firezone_relay.protocol.server import _TIMER_HANDLERS
from firezone_relay.protocol.timers import QuarantineExpiry, ReservationExpiry, TimerRecord, Timers


def _ports(in_use: set[int], timers: Timers) -> PortAllocator:
    counter = iter(range(1, 1000))
    return PortAllocator(
        50000,
        50003,
        random.Random(1),
        lambda n: next(counter).to_bytes(n, "big"),
        timers,
        in_use,
        reservation_lifetime=30.0,
        quarantine=60.0,
    )


def test_every_timer_record_has_a_handler() -> None:
    assert set(_TIMER_HANDLERS) == set(typing.get_args(TimerRecord))


def test_every_error_code_has_the_reason_stun_sends() -> None:
    for code in ErrorCode:
        assert code.reason == stun.REASONS[code]


def test_ports_avoid_used_reserved_and_quarantined_ones() -> None:
    timers = Timers()
    in_use = {50000}
    ports = _ports(in_use, timers)
    token = ports.reserve_next(50000, now=0.0)
    assert token is not None and ports.reserved == {50001}
    ports.quarantine(50002, now=0.0)
    assert {ports.pick(even=False) for _ in range(20)} == {50003}
    assert ports.pick(even=False, avoid=50003) is None
    ports.check_invariants()
    # both timers run out: the ports are free again
    for record in timers.pop_due(100.0):
        if isinstance(record, ReservationExpiry):
            ports.on_reservation_expiry(record, 100.0)
        elif isinstance(record, QuarantineExpiry):
            ports.on_quarantine_expiry(record, 100.0)
    assert not ports.reserved and not ports.quarantined and len(timers) == 0
    ports.check_invariants()


def test_an_expired_reservation_token_frees_its_port_when_presented() -> None:
    timers = Timers()
    ports = _ports(set(), timers)
    token = ports.reserve_next(50000, now=0.0)
    assert token is not None
    assert ports.claim(token, now=31.0) is None  # expired, though its timer has not run yet
    assert not ports.reserved and not ports.reservations
    ports.check_invariants()


def test_a_live_reservation_token_hands_over_its_port_once() -> None:
    ports = _ports(set(), Timers())
    token = ports.reserve_next(50000, now=0.0)
    assert token is not None
    assert ports.claim(token, now=1.0) == 50001
    assert ports.claim(token, now=1.0) is None
