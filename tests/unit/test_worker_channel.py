"""The supervisor-worker channel decodes only its own messages, and the port shares and the
steering hash are what the supervisor and the tests rely on."""

from __future__ import annotations

import json
import struct

import pytest

from firezone_relay.actors.steering import program, worker_for
from firezone_relay.actors.worker_channel import (
    AdminRequest,
    ChannelError,
    WorkerChannel,
    WorkerReady,
    WorkerStats,
    XdpRoutes,
    decode,
    encode,
    route_commands,
    route_row,
)
from firezone_relay.protocol.commands import CreateChannelBinding, DeleteChannelBinding
from firezone_relay.protocol.types import Family, FiveTuple, Transport


def test_messages_round_trip() -> None:
    for message in (
        WorkerReady(1, 1234),
        WorkerStats(0, {"allocations": 3, "drops": {"invalid": 1}}),
        AdminRequest(7, "sessions", {"limit": 10}),
    ):
        frame = encode(message)
        (size,) = struct.unpack_from("!I", frame)
        assert size == len(frame) - 4
        assert decode(frame[4:]) == message


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1, 2]",
        b'{"type": "Popen", "args": "sh"}',
        b'{"type": "WorkerReady", "index": 1}',
        b'{"type": "WorkerReady", "index": 1, "pid": 2, "more": 3}',
        b'{"type": "WorkerReady", "index": "1", "pid": 2}',
        b'{"type": "WorkerReady", "index": true, "pid": 2}',
        b'{"type": "WorkerStats", "index": 0, "counts": [1]}',
        b"[" * 100_000,
    ],
)
def test_anything_else_is_refused(body: bytes) -> None:
    with pytest.raises(ChannelError):
        decode(body)


def test_only_channel_messages_encode() -> None:
    with pytest.raises(TypeError):
        encode(object())


def test_a_reader_drops_an_oversized_or_bad_frame_and_closes() -> None:
    got: list[object] = []
    closed: list[bool] = []

    class Transport:
        def abort(self) -> None:
            closed.append(True)

    channel = WorkerChannel(got.append, lambda: None)
    channel.transport = Transport()  # type: ignore[assignment]
    frame = encode(WorkerReady(0, 1))
    channel.data_received(frame[:3])
    channel.data_received(frame[3:] + frame)
    assert got == [WorkerReady(0, 1)] * 2
    channel.data_received(struct.pack("!I", 1 << 30))
    assert closed == [True]
    bad = json.dumps({"type": "Nope"}).encode()
    channel.data_received(struct.pack("!I", len(bad)) + bad)
    assert closed == [True, True]


def test_the_hash_spreads_sources_and_the_programs_are_bounded() -> None:
    seen = [worker_for("192.0.2.1", port, 4) for port in range(1024, 2048)]
    assert set(seen) == {0, 1, 2, 3}
    assert min(seen.count(w) for w in range(4)) > 200
    assert worker_for("2001:db8::1", 5000, 3) in (0, 1, 2)
    for family in Family:
        assert len(program(family, 2)) < 32
    with pytest.raises(ValueError):
        program(Family.V4, 0)


def test_channel_routes_round_trip_and_bad_rows_are_refused() -> None:
    client = FiveTuple(Transport.UDP, ("198.51.100.7", 40000), ("0.0.0.0", 3478))
    commands = (
        CreateChannelBinding(client, 0x4000, ("2001:db8::9", 5000), 50001),
        DeleteChannelBinding(client, 0x4001, ("192.0.2.1", 6000), 50001),
    )
    message = XdpRoutes(1, [route_row(c) for c in commands])
    decoded = decode(encode(message)[4:])
    assert isinstance(decoded, XdpRoutes)
    assert route_commands(decoded.commands) == commands
    good = route_row(commands[0])
    for bad in (
        [good[:9]],
        ["update", *good[1:]],
        [[*good[:1], 9, *good[2:]]],
        [[*good[:3], "40000", *good[4:]]],
        [[*good[:6], True, *good[7:]]],
        ["not a row"],
    ):
        with pytest.raises(ChannelError):
            route_commands(bad)  # type: ignore[arg-type]
