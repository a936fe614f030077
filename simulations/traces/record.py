"""Record a trace from a live run: a scenario drives TurnClient against the real daemon, and
every datagram its sockets send or receive becomes a pcap frame.

``python -m simulations.traces.record client relay_loop --out simulations/traces/data``
``python -m simulations.traces.record --all``

The recording is taken at the scenario's sockets (timestamps on send and on arrival), so it
needs no capture privileges. The relay's listen port is written as 3478 so tcpdump and tshark
decode the trace as STUN. Hops between two allocations of the relay (the relay loop) never
touch a scenario socket; they are added as documentation frames from the channel bindings
the scenario made. The expectations file says how to start the relay, which endpoint is which
role, how each recorded username is minted again, and carries the scenario's notes per frame.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from firezone_relay.protocol import stun
from firezone_relay.protocol.stun import Attr, Class, Message, Method
from firezone_relay.protocol.types import Addr, Family
from simulations import relay_process
from simulations.channel_data import encode as channel_data
from simulations.relay_process import Credential, RelaySystem
from simulations.traces import tracefile
from simulations.traces.tracefile import TRACE_LISTEN_PORT, Expectations, Frame, format_addr
from simulations.turn_client import TurnClient

ROLE_HOSTS = {"client": "127.0.0.2", "gateway": "127.0.0.3", "peer": "127.0.0.4"}
OTHER_HOST = "127.0.0.5"
V6_HOST = "::1"
TRACES_DIR = Path(__file__).resolve().parent / "data"


class ScenarioError(AssertionError):
    """The live relay did not behave as the scenario requires; nothing is written."""


@dataclass(frozen=True)
class Scenario:
    name: str
    run: Callable[[Session], Awaitable[None]]
    description: str
    relay: dict[str, Any]
    kind: str = "legit"
    beside: str | None = None
    allow_loss: bool = False


class Endpoint:
    """A real UDP socket of one role; everything it sends and receives is recorded."""

    def __init__(self, session: Session, role: str, sock: socket.socket) -> None:
        self.session = session
        self.role = role
        self.sock = sock
        self.addr: Addr = sock.getsockname()[:2]
        self._inbox: list[tuple[bytes, Addr]] = []
        self._arrived = asyncio.Event()
        session.loop.add_reader(sock.fileno(), self._on_readable)

    @property
    def family(self) -> Family:
        return Family.of(self.addr[0])

    def _on_readable(self) -> None:
        for _ in range(256):
            try:
                data, source = self.sock.recvfrom(65536)
            except BlockingIOError:
                return
            except OSError:
                continue  # ICMP errors from earlier sends
            self.session._record(source[:2], self.addr, data)
            self._inbox.append((data, source[:2]))
            self._arrived.set()

    def send(self, data: bytes, to: Addr | None = None, note: str | None = None) -> None:
        destination = to or self.session.listen(self.family)
        if note:
            self.session.note(note)
        self.session._record(self.addr, destination, data)
        with contextlib.suppress(OSError):
            self.sock.sendto(data, destination)

    async def recv(
        self,
        timeout: float = 2.0,
        match: Callable[[bytes, Addr], bool] | None = None,
    ) -> tuple[bytes, Addr]:
        """The oldest received datagram (that ``match`` accepts)."""
        deadline = time.monotonic() + timeout
        while True:
            for i, (data, source) in enumerate(self._inbox):
                if match is None or match(data, source):
                    del self._inbox[i]
                    return data, source
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ScenarioError(f"{self.role} {format_addr(self.addr)}: nothing arrived")
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._arrived.wait()

    async def request(
        self, data: bytes, to: Addr | None = None, note: str | None = None, timeout: float = 2.0
    ) -> Message:
        """Send a STUN request and return the response with its transaction id."""
        tid = data[8:20]
        self.send(data, to, note)

        def is_response(payload: bytes, _source: Addr) -> bool:
            return len(payload) >= 20 and payload[0] < 0x40 and payload[8:20] == tid

        payload, _ = await self.recv(timeout, is_response)
        return stun.parse(payload)

    async def quiet(self, wait: float = 0.2) -> None:
        """Nothing may arrive for ``wait`` seconds (dropped input stays dropped)."""
        await asyncio.sleep(wait)
        if self._inbox:
            data, source = self._inbox[0]
            raise ScenarioError(
                f"{self.role} {format_addr(self.addr)} got an unexpected datagram from "
                f"{format_addr(source)}: {data[:40].hex()}"
            )

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.session.loop.remove_reader(self.sock.fileno())
        self.sock.close()


@dataclass
class _AllocationState:
    relayed: list[Addr] = field(default_factory=list)
    channels: dict[int, Addr] = field(default_factory=dict)


class Session:
    """What a scenario gets: endpoints, credentials, the relay's addresses, notes."""

    def __init__(self, system: RelaySystem, scenario: Scenario) -> None:
        self.system = system
        self.scenario = scenario
        self.loop = asyncio.get_running_loop()
        self.frames: list[tuple[float, Addr, Addr, bytes]] = []
        self.notes: dict[int, str] = {}
        self.credentials: dict[str, dict[str, Any]] = {}
        self.roles: dict[str, list[Addr]] = {}
        self.endpoints: list[Endpoint] = []
        self._endpoint_addrs: set[Addr] = set()
        self._pending_note: str | None = None
        self._seeds = 0
        # to synthesise relay-to-relay frames: per client endpoint, its allocation
        self._allocations: dict[Addr, _AllocationState] = {}
        self._owner_of_username: dict[str, Addr] = {}
        self._requests: dict[bytes, tuple[Addr, Message]] = {}

    # -- what scenarios use ----------------------------------------------------------------

    def listen(self, family: Family = Family.V4) -> Addr:
        return self.system.listen(family)

    def endpoint(self, role: str, family: Family = Family.V4, host: str | None = None) -> Endpoint:
        if host is None:
            host = V6_HOST if family == Family.V6 else ROLE_HOSTS.get(role, OTHER_HOST)
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.bind((host, 0))
        sock.setblocking(False)
        endpoint = Endpoint(self, role, sock)
        self.roles.setdefault(role, []).append(endpoint.addr)
        self.endpoints.append(endpoint)
        self._endpoint_addrs.add(endpoint.addr)
        return endpoint

    def credential(self, name: str, **spec: Any) -> Credential:
        """A live credential for ``name``, minted the way the replayer will mint it again:
        by the portal (from a public key) in portal mode, from the secret otherwise."""
        if self.system.portal is not None:
            spec.setdefault("public_key", f"{self.scenario.name}-{name}-public-key")
        else:
            spec.setdefault("user", f"{self.scenario.name}-{name}")
        credential = self.system.credential(spec)
        known = self.credentials.get(credential.username)
        if known is not None and known != spec:
            raise ScenarioError(f"two credentials share the username {credential.username}")
        self.credentials[credential.username] = spec
        return credential

    def literal_credential(self, username: str, password: str) -> Credential:
        """A username the replayer keeps as recorded (say a malformed one), signed with
        ``password``."""
        spec = {"literal": username, "sign_password": password}
        self.credentials[username] = spec
        return Credential(username, username, password)

    def turn_client(self, credential: Credential, realm: str | None = "firezone") -> TurnClient:
        """A TurnClient signing like connlib (USERNAME, REALM, MI on the first Allocate)."""
        import random

        self._seeds += 1
        return TurnClient(
            credential.username,
            credential.sign_password,
            rng=random.Random(f"{self.scenario.name}-{self._seeds}"),
            realm=realm,
        )

    def note(self, text: str) -> None:
        """Attach ``text`` to the next frame sent (shown in mismatch reports)."""
        self._pending_note = text

    async def allocate(self, ep: Endpoint, tc: TurnClient, **kwargs: Any) -> Message:
        """Firezone's handshake: Allocate without a nonce, 401 with REALM+NONCE, retry.
        With a nonce already known, one Allocate (plus a retry on 438)."""
        if tc.nonce is None:
            first = await ep.request(tc.allocate(**kwargs), note="Allocate without nonce")
            expect_error(first, 401)
            if first.has(Attr.MESSAGE_INTEGRITY) and not tc.verify(first):
                raise ScenarioError("401 not signed with the client's key")
            tc.learn(first)
        else:
            response = await ep.request(tc.allocate(**kwargs), note="Allocate with a known nonce")
            if response.cls != Class.ERROR or response.get(Attr.ERROR_CODE)[0] != 438:
                return expect_success(response, tc)
            tc.learn(response)
        response = await ep.request(tc.allocate(**kwargs), note="Allocate with the nonce")
        expect_success(response, tc)
        return response

    # -- recording ---------------------------------------------------------------------------

    def _record(self, src: Addr, dst: Addr, data: bytes) -> None:
        now = time.monotonic()
        self.frames.append((now, src, dst, data))
        sent = src in self._endpoint_addrs
        if sent and self._pending_note is not None:
            self.notes[len(self.frames) - 1] = self._pending_note
            self._pending_note = None
        if sent:
            self._track_sent(now, src, dst, data)
        else:
            self._track_received(dst, data)

    def _track_sent(self, now: float, src: Addr, dst: Addr, data: bytes) -> None:
        if len(data) >= 20 and data[0] < 0x40:
            with contextlib.suppress(stun.ParseError):
                msg = stun.parse(data)
                if msg.cls == Class.REQUEST:
                    self._requests[msg.transaction_id] = (src, msg)
            return
        if not (len(data) >= 4 and 0x40 <= data[0] <= 0x4F) or dst[1] != self.system.listen_port:
            return
        channel, length = struct.unpack_from("!HH", data)
        state = self._allocations.get(src)
        peer = state.channels.get(channel) if state else None
        if state is None or peer is None:
            return
        relayed = {a for s in self._allocations.values() for a in s.relayed}
        if peer in relayed:
            own = [a for a in state.relayed if Family.of(a[0]) == Family.of(peer[0])]
            if own:
                self.frames.append((now + 1e-6, own[0], peer, data[4 : 4 + length]))

    def _track_received(self, dst: Addr, data: bytes) -> None:
        if len(data) < 20 or data[0] >= 0x40:
            return
        try:
            msg = stun.parse(data)
        except stun.ParseError:
            return
        request = self._requests.get(msg.transaction_id)
        if msg.cls != Class.SUCCESS or request is None or request[0] != dst:
            return
        _, req = request
        with contextlib.suppress(stun.BadAttribute):
            if msg.method == Method.ALLOCATE:
                username = req.get(Attr.USERNAME)
                previous = self._owner_of_username.get(username)
                if previous is not None and previous != dst:
                    self._allocations.pop(previous, None)
                self._owner_of_username[username] = dst
                self._allocations[dst] = _AllocationState(msg.get_all(Attr.XOR_RELAYED_ADDRESS))
            elif msg.method == Method.REFRESH and msg.get(Attr.LIFETIME) == 0:
                self._allocations.pop(dst, None)
            elif msg.method == Method.CHANNEL_BIND and dst in self._allocations:
                self._allocations[dst].channels[req.get(Attr.CHANNEL_NUMBER)] = req.get(
                    Attr.XOR_PEER_ADDRESS
                )

    def to_trace(self) -> tuple[list[Frame], Expectations]:
        listen = {(ip, self.system.listen_port) for ip in self.system.ips}

        def norm(addr: Addr) -> Addr:
            return (addr[0], TRACE_LISTEN_PORT) if addr in listen else addr

        order = sorted(range(len(self.frames)), key=lambda i: self.frames[i][0])
        t0 = self.frames[order[0]][0] if order else 0.0
        frames: list[Frame] = []
        notes: dict[str, dict[str, Any]] = {}
        for new_index, i in enumerate(order):
            t, src, dst, data = self.frames[i]
            frames.append(Frame(round(t - t0, 6), norm(src), norm(dst), data))
            if i in self.notes:
                notes[str(new_index + 1)] = {"note": self.notes[i]}
        relay = dict(self.scenario.relay)
        expectations = Expectations(
            description=self.scenario.description,
            scenario=self.scenario.name,
            relay=relay,
            roles={role: [format_addr(a) for a in addrs] for role, addrs in self.roles.items()},
            credentials=self.credentials,
            kind=self.scenario.kind,
            beside=self.scenario.beside,
            allow_loss=self.scenario.allow_loss,
            frames=notes,
        )
        return frames, expectations

    def close(self) -> None:
        for endpoint in self.endpoints:
            endpoint.close()


# --- checks scenarios use while recording ----------------------------------------------------


def expect_success(msg: Message, tc: TurnClient | None = None) -> Message:
    if msg.cls != Class.SUCCESS:
        code = msg.get(Attr.ERROR_CODE) if msg.cls == Class.ERROR else None
        raise ScenarioError(f"expected success for method {msg.method:#x}, got {code}")
    if tc is not None and msg.has(Attr.MESSAGE_INTEGRITY) and not tc.verify(msg):
        raise ScenarioError("success response does not verify with the client's key")
    return msg


def expect_error(msg: Message, code: int) -> Message:
    got = msg.get(Attr.ERROR_CODE) if msg.cls == Class.ERROR else None
    if got is None or got[0] != code:
        raise ScenarioError(f"expected error {code} for method {msg.method:#x}, got {got}")
    return msg


async def expect_channel_data(ep: Endpoint, channel: int, data: bytes) -> None:
    payload, _ = await ep.recv()
    if payload[:4] != struct.pack("!HH", channel, len(data)) or payload[4 : 4 + len(data)] != data:
        raise ScenarioError(f"expected ChannelData {channel:#x} {data!r}, got {payload[:40]!r}")


async def expect_datagram(ep: Endpoint, data: bytes, source: Addr | None = None) -> None:
    payload, src = await ep.recv()
    if payload != data or (source is not None and src != source):
        raise ScenarioError(f"expected {data!r} from {source}, got {payload[:40]!r} from {src}")


__all__ = [
    "Endpoint",
    "Scenario",
    "ScenarioError",
    "Session",
    "channel_data",
    "expect_channel_data",
    "expect_datagram",
    "expect_error",
    "expect_success",
    "record",
]


# --- running a scenario ----------------------------------------------------------------------


async def record(scenario: Scenario, out_dir: Path, log_dir: Path | None = None) -> Path:
    """Run ``scenario`` against a fresh system; write ``<out_dir>/<name>.pcap`` and ``.json``."""
    system = await relay_process.start(scenario.relay, log_dir)
    session = Session(system, scenario)
    try:
        await scenario.run(session)
        await asyncio.sleep(0.05)
        if not system.alive():
            raise ScenarioError(f"the relay died during the scenario:\n{system.log()}")
    finally:
        session.close()
        await system.stop()
        system.cleanup()
    frames, expectations = session.to_trace()
    out_dir.mkdir(parents=True, exist_ok=True)
    return tracefile.save(out_dir / f"{scenario.name}.pcap", frames, expectations)


def main(argv: list[str] | None = None) -> int:
    from simulations.traces.scenarios import SCENARIOS

    parser = argparse.ArgumentParser(
        prog="python -m simulations.traces.record",
        description="Record scenarios against the live relay as pcap traces + expectations.",
    )
    parser.add_argument("names", nargs="*", help=f"scenarios: {', '.join(SCENARIOS)}")
    parser.add_argument("--all", action="store_true", help="record every scenario")
    parser.add_argument("--out", type=Path, default=TRACES_DIR)
    args = parser.parse_args(argv)
    names = list(SCENARIOS) if args.all else args.names
    if not names:
        parser.error("name a scenario or pass --all")
    for name in names:
        if name not in SCENARIOS:
            parser.error(f"unknown scenario {name!r}")
        path = asyncio.run(record(SCENARIOS[name], args.out))
        frames = tracefile.read_pcap(path)
        print(f"{path}: {len(frames)} frames, {frames[-1].t if frames else 0:.2f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
