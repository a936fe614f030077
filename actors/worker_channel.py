"""The local channel between the supervisor and one worker: typed, frozen messages over a Unix
socketpair, each a length-prefixed JSON object naming its type.

Only the message types listed in ``MESSAGES`` decode, each field must have the type its
dataclass declares (ints, floats, strings, booleans, None, and JSON objects and lists of them
for the count snapshots), a frame is at most ``MAX_FRAME`` bytes and a reader buffers at most
one frame: what comes off the channel never runs code and never grows memory without bound.
The worker's start-up settings are not a channel message: they reach it once, from its parent,
on its standard input (``actors.worker``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import socket
import struct
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, cast

from firezone_relay.protocol.commands import CreateChannelBinding, DeleteChannelBinding
from firezone_relay.protocol.types import FiveTuple, Transport

ChannelCommand = CreateChannelBinding | DeleteChannelBinding

__all__ = [
    "MAX_FRAME",
    "MESSAGES",
    "AdminAnswer",
    "AdminRequest",
    "ChannelError",
    "Forward",
    "RegistryAsk",
    "RegistryTell",
    "WorkerChannel",
    "WorkerReady",
    "WorkerStats",
    "XdpRoutes",
    "decode",
    "encode",
    "five_tuple",
    "five_tuple_row",
    "route_commands",
    "route_row",
]

logger = logging.getLogger("relay.workers")

#: the largest frame either side sends or accepts (a ``sessions`` answer of 100 rows fits)
MAX_FRAME: Final = 4 * 1024 * 1024
_HEADER = struct.Struct("!I")


class ChannelError(ValueError):
    """A frame that is not one of the channel's messages."""


@dataclass(frozen=True, slots=True)
class WorkerReady:
    """Worker → supervisor: its sockets are read and its core answers (``/readyz``)."""

    index: int
    pid: int


@dataclass(frozen=True, slots=True)
class WorkerStats:
    """Worker → supervisor, periodically: the counts ``/metrics`` and the stats line sum over
    the workers (``actors.supervisor.WorkerTotals``). ``counts`` maps each ``MetricsSource``
    reading to its JSON form (see ``actors.worker.snapshot``)."""

    index: int
    counts: dict[str, Any]


@dataclass(frozen=True, slots=True)
class AdminRequest:
    """Supervisor → worker: one operator verb (``sessions``, ``stats``, ``disconnect``,
    ``drain``, ``reload``) with its JSON arguments; answered by ``AdminAnswer`` with the same
    ``request``."""

    request: int
    verb: str
    arguments: dict[str, Any]


@dataclass(frozen=True, slots=True)
class AdminAnswer:
    """Worker → supervisor: what the worker's ``Admin`` answered (an HTTP status and body)."""

    request: int
    status: int
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class XdpRoutes:
    """Worker → supervisor: one drain's channel commands for the XDP map manager, which the
    supervisor runs once for the host; each row is ``route_row``'s form."""

    index: int
    commands: list[Any]


@dataclass(frozen=True, slots=True)
class RegistryAsk:
    """Worker → supervisor: the core's ``ReserveAllocation`` (``reserve``, with the client's
    5-tuple as ``route_row`` writes one, ``username`` and ``user``) or ``ReleaseAllocation``
    of ``ticket``, for the allocation registry (``protocol.reservations``)."""

    ticket: int
    reserve: bool
    client: list[Any]
    username: str
    user: str


@dataclass(frozen=True, slots=True)
class RegistryTell:
    """Supervisor → worker: the registry's ``ReservationAnswer`` (``evict`` false: ``refusal``
    is None or the error code) or ``EvictAllocation`` (``evict``: ``by`` is the 5-tuple that
    allocated the username again), for ``Server.handle_registry_message``."""

    ticket: int
    evict: bool
    refusal: int | None
    by: list[Any]


@dataclass(frozen=True, slots=True)
class Forward:
    """The relay loop across workers (the core's ``ForwardToWorker``): worker → supervisor
    names the target ``worker``; supervisor → that worker passes it on. ``payload`` is
    base64."""

    worker: int
    from_host: str
    from_port: int
    to_host: str
    to_port: int
    payload: str


#: the closed set of messages the channel carries
MESSAGES: Final[dict[str, type[Any]]] = {
    cls.__name__: cls
    for cls in (
        WorkerReady,
        WorkerStats,
        AdminRequest,
        AdminAnswer,
        XdpRoutes,
        RegistryAsk,
        RegistryTell,
        Forward,
    )
}
#: the most channel commands one ``XdpRoutes`` row list may hold when decoded
MAX_ROUTES: Final = 65536


def route_row(command: ChannelCommand) -> list[Any]:
    """A channel command as a JSON row: kind, transport, client address, relay address,
    channel, peer, allocation port."""
    client = command.client
    return [
        "create" if isinstance(command, CreateChannelBinding) else "delete",
        int(client.transport),
        client.remote[0],
        client.remote[1],
        client.local[0],
        client.local[1],
        command.channel,
        command.peer[0],
        command.peer[1],
        command.allocation_port,
    ]


def five_tuple_row(client: FiveTuple) -> list[Any]:
    """A 5-tuple as a JSON row: transport, client address, relay address."""
    return [int(client.transport), client.remote[0], client.remote[1], *client.local]


def five_tuple(row: list[Any]) -> FiveTuple:
    """``five_tuple_row``'s inverse; ChannelError on anything else."""
    if not isinstance(row, list) or len(row) != 5:
        raise ChannelError("a 5-tuple is a list of 5")
    transport, rhost, rport, lhost, lport = row
    if not (isinstance(rhost, str) and isinstance(lhost, str)):
        raise ChannelError("a 5-tuple's hosts are strings")
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in (rport, lport)):
        raise ChannelError("a 5-tuple's ports are numbers")
    try:
        return FiveTuple(Transport(transport), (rhost, rport), (lhost, lport))
    except ValueError:
        raise ChannelError("a 5-tuple's transport is wrong") from None


def route_commands(rows: list[Any]) -> tuple[ChannelCommand, ...]:
    """The channel commands of ``XdpRoutes.commands``; ChannelError on any malformed row."""
    if len(rows) > MAX_ROUTES:
        raise ChannelError(f"{len(rows)} routes in one message")
    commands: list[ChannelCommand] = []
    for row in rows:
        if not isinstance(row, list) or len(row) != 10:
            raise ChannelError("a route row is a list of 10")
        kind, transport, rhost, rport, lhost, lport, channel, phost, pport, port = row
        texts = (rhost, lhost, phost)
        numbers = (transport, rport, lport, channel, pport, port)
        if kind not in ("create", "delete") or not all(isinstance(t, str) for t in texts):
            raise ChannelError("a route row's kind or addresses are wrong")
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in numbers):
            raise ChannelError("a route row's numbers are wrong")
        try:
            client = FiveTuple(Transport(transport), (rhost, rport), (lhost, lport))
        except ValueError:
            raise ChannelError("a route row's transport is wrong") from None
        cls = CreateChannelBinding if kind == "create" else DeleteChannelBinding
        commands.append(cls(client, channel, (phost, pport), port))
    return tuple(commands)


_HINTS: Final = {name: typing.get_type_hints(cls) for name, cls in MESSAGES.items()}


def encode(message: object) -> bytes:
    """One frame: the length, then ``{"type": ..., fields...}`` as JSON."""
    name = type(message).__name__
    if MESSAGES.get(name) is not type(message):
        raise TypeError(f"not a channel message: {name}")
    body = {"type": name, **{f.name: getattr(message, f.name) for f in dataclasses.fields(message)}}  # type: ignore[arg-type]
    data = json.dumps(body, separators=(",", ":")).encode()
    if len(data) > MAX_FRAME:
        raise ValueError(f"{name} is {len(data)} bytes, more than a frame holds")
    return _HEADER.pack(len(data)) + data


def _fits(value: object, hint: object) -> bool:
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        return any(_fits(value, arm) for arm in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is bool:
        return isinstance(value, bool)
    if origin is dict:
        return isinstance(value, dict)
    if origin is list:
        return isinstance(value, list)
    return False


def decode(data: bytes) -> object:
    """The message in one frame's payload; ChannelError for anything else."""
    try:
        body = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise ChannelError(f"not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ChannelError("not an object")
    name = body.pop("type", None)
    cls = MESSAGES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ChannelError(f"unknown message type {name!r}")
    hints = _HINTS[name]
    if body.keys() != hints.keys():
        raise ChannelError(f"{name}: fields {sorted(body)} are not {sorted(hints)}")
    for key, hint in hints.items():
        if not _fits(body[key], hint):
            raise ChannelError(f"{name}.{key}: {type(body[key]).__name__} is not {hint}")
    return cls(**body)


class WorkerChannel(asyncio.Protocol):
    """One end of the channel on an event loop: decodes frames into messages for
    ``on_message``; ``on_closed`` runs once when the other end is gone (or sent garbage)."""

    def __init__(self, on_message: Callable[[object], None], on_closed: Callable[[], None]) -> None:
        self.on_message = on_message
        self.on_closed = on_closed
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._closed = False

    @classmethod
    async def open(
        cls,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        on_message: Callable[[object], None],
        on_closed: Callable[[], None],
    ) -> WorkerChannel:
        _, protocol = await loop.connect_accepted_socket(lambda: cls(on_message, on_closed), sock)
        return protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def send(self, message: object) -> None:
        """Queue one message (dropped once the channel is closed)."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(encode(message))

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self._buffer)
            if size > MAX_FRAME:
                self._fail(f"a frame of {size} bytes")
                return
            if len(self._buffer) < _HEADER.size + size:
                return
            payload = bytes(self._buffer[_HEADER.size : _HEADER.size + size])
            del self._buffer[: _HEADER.size + size]
            try:
                message = decode(payload)
            except ChannelError as exc:
                self._fail(str(exc))
                return
            self.on_message(message)

    def _fail(self, why: str) -> None:
        logger.error("worker channel closed: %s", why)
        self._buffer.clear()
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._closed:
            self._closed = True
            self.on_closed()
