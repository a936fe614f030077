"""Replay packet traces against the full system and check every datagram that comes back.

``python -m simulations.traces.replay simulations/traces/data/client.pcap [more.pcap ...]``

For each trace the replayer starts the relay daemon (with the test portal when the trace's
credentials come from a portal), binds one real UDP socket per trace endpoint on that role's
loopback address, and walks the frames in order:

* a frame from a role to the relay is *sent*, at its recorded time, once every response the
  trace shows before it has arrived (requests depend on earlier answers: nonces, addresses);
* a frame from the relay to a role is an *expectation*: the datagram that arrives on that
  role's socket must match it semantically (method, class, transaction id, error code,
  attribute list and the attributes that mean something; ChannelData channel and payload;
  relayed payloads and their source);
* relay-to-relay frames (the hairpin of the relay loop) are documentation and are skipped.

What differs between runs is re-bound, never compared: credentials are minted afresh (portal
or ``--auth-secret``) and requests re-signed with them; NONCE, XOR-RELAYED-ADDRESS and the
live socket addresses are learned from the live run and substituted into later requests
(XOR-PEER-ADDRESS) and into the checks (XOR-MAPPED-ADDRESS, sources of relayed data).
Transaction ids are kept, so retransmissions stay retransmissions.

A hostile trace names a legit trace to run ``beside``; both replay concurrently against one
relay, and the legit one must still see every expected datagram. The first mismatch is
printed with a semantic diff and scapy's dissection of expected and actual.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import difflib
import resource
import socket
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from firezone_relay.protocol import stun
from firezone_relay.protocol.stun import Attr, Class, Message
from firezone_relay.protocol.types import Addr, Family
from simulations import relay_process
from simulations.relay_process import Credential, RelaySystem
from simulations.traces import tracefile
from simulations.traces.tracefile import TRACE_LISTEN_PORT, Frame, Trace, format_addr

TRACES_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_TIMEOUT = 2.0  # seconds an expected datagram may take
GRACE = 0.3  # seconds to watch for stray datagrams after the last frame
LIFETIME_SLACK = 2  # seconds of LIFETIME difference tolerated (retransmissions count down)

SEND, EXPECT, INTERNAL = "send", "expect", "internal"

_NAMES = {spec_type: spec.name for spec_type, spec in stun.ATTRIBUTES.items()}
_METHODS = {
    0x001: "Binding",
    0x003: "Allocate",
    0x004: "Refresh",
    0x006: "Send",
    0x007: "Data",
    0x008: "CreatePermission",
    0x009: "ChannelBind",
}
_CLASSES = {
    Class.REQUEST: "request",
    Class.INDICATION: "indication",
    Class.SUCCESS: "success",
    Class.ERROR: "error",
}


def attr_name(attr_type: int) -> str:
    return _NAMES.get(attr_type, f"0x{attr_type:04x}")


# --- describing datagrams -------------------------------------------------------------------


def _try_parse(payload: bytes) -> Message | None:
    if len(payload) < 20 or payload[0] >= 0x40:
        return None
    try:
        return stun.parse(payload)
    except stun.ParseError:
        return None


def _is_channel_data(payload: bytes) -> bool:
    return len(payload) >= 4 and 0x40 <= payload[0] <= 0x4F


def describe(payload: bytes) -> str:
    """One line for humans: the STUN method/class and attributes, ChannelData, or bytes."""
    msg = _try_parse(payload)
    if msg is not None:
        parts = [f"{_METHODS.get(msg.method, hex(msg.method))} {_CLASSES[msg.cls]}"]
        parts.append(f"tid={msg.transaction_id.hex()}")
        for attr_type, value in msg.attributes:
            parts.append(f"{attr_name(attr_type)}={_value_text(msg, attr_type, value)}")
        return " ".join(parts)
    if _is_channel_data(payload):
        channel, length = struct.unpack_from("!HH", payload)
        data = payload[4 : 4 + length]
        return f"ChannelData channel=0x{channel:04x} length={length} data={_short(data)}"
    return f"{len(payload)} bytes {_short(payload)}"


def _short(data: bytes, limit: int = 24) -> str:
    text = data[:limit].hex()
    return text + ("..." if len(data) > limit else "")


def _value_text(msg: Message, attr_type: int, value: bytes) -> str:
    if attr_type in (Attr.MESSAGE_INTEGRITY, Attr.MESSAGE_INTEGRITY_SHA256):
        return _short(value, 6)
    spec = stun.ATTRIBUTES.get(attr_type)
    if spec is None:
        return _short(value)
    try:
        decoded = spec.decode(value, msg.transaction_id)
    except stun.BadAttribute:
        return f"<malformed {_short(value)}>"
    if isinstance(decoded, tuple) and len(decoded) == 2 and isinstance(decoded[0], str):
        return format_addr(decoded)  # an address
    if isinstance(decoded, bytes):
        return _short(decoded)
    return repr(decoded)


# --- results ----------------------------------------------------------------------------------


@dataclass
class Mismatch:
    trace: str
    frame: int  # 1-based, as tshark numbers frames
    reason: str
    expected: Frame | None = None
    actual: bytes | None = None
    actual_src: Addr | None = None
    note: str = ""

    def render(self) -> str:
        lines = [f"{self.trace}: frame {self.frame}: {self.reason}"]
        if self.note:
            lines.append(f"  trace note: {self.note}")
        if self.expected is not None:
            lines.append(
                f"  expected {format_addr(self.expected.src)} -> {format_addr(self.expected.dst)}:"
                f" {describe(self.expected.payload)}"
            )
        if self.actual is not None:
            src = format_addr(self.actual_src) if self.actual_src else "?"
            lines.append(f"  actual   from {src}: {describe(self.actual)}")
        if self.expected is not None and self.actual is not None:
            want = tracefile.dissect(self.expected.payload).splitlines()
            got = tracefile.dissect(self.actual).splitlines()
            diff = difflib.unified_diff(
                want, got, "expected (scapy)", "actual (scapy)", lineterm=""
            )
            lines.append("  " + "\n  ".join(diff))
        elif self.expected is not None:
            lines.append("  expected (scapy):")
            lines.append("  " + "\n  ".join(tracefile.dissect(self.expected.payload).splitlines()))
        elif self.actual is not None:
            lines.append("  actual (scapy):")
            lines.append("  " + "\n  ".join(tracefile.dissect(self.actual).splitlines()))
        return "\n".join(lines)


@dataclass
class TraceResult:
    name: str
    kind: str
    frames: int = 0
    sent: int = 0
    expected: int = 0
    matched: int = 0
    lost: int = 0
    duration: float = 0.0
    mismatch: Mismatch | None = None

    @property
    def ok(self) -> bool:
        return self.mismatch is None

    def summary(self) -> str:
        status = "ok" if self.ok else "MISMATCH"
        lost = f", {self.lost} lost (allowed)" if self.lost else ""
        return (
            f"{self.name} [{self.kind}]: {status}: {self.sent} sent, "
            f"{self.matched}/{self.expected} expected datagrams matched{lost}, "
            f"{self.duration:.2f}s"
        )


@dataclass
class RunResult:
    traces: list[TraceResult]
    relay_problem: str | None = None
    relay_log: str = ""

    @property
    def ok(self) -> bool:
        return self.relay_problem is None and all(t.ok for t in self.traces)

    def report(self) -> str:
        lines = [t.summary() for t in self.traces]
        for result in self.traces:
            if result.mismatch is not None:
                lines.append(result.mismatch.render())
        if self.relay_problem:
            lines.append(f"relay: {self.relay_problem}")
        return "\n".join(lines)


class _Failed(Exception):
    pass


# --- one trace ------------------------------------------------------------------------------


@dataclass
class _Pending:
    index: int
    frame: Frame
    key: tuple[Any, ...]
    armed_at: float | None = None  # set when the walk reaches the frame: the clock starts


@dataclass
class _Socket:
    trace_addr: Addr
    sock: socket.socket
    live_addr: Addr
    pending: list[_Pending] = field(default_factory=list)


def _expectation_key(payload: bytes, trace_src: Addr | None) -> tuple[Any, ...]:
    """What pairs an arriving datagram with the expectation it answers: the transaction id
    of a response; method and DATA of an indication (its transaction id is the relay's);
    channel and payload of ChannelData; source and payload of relayed data."""
    msg = _try_parse(payload)
    if msg is not None:
        if msg.cls in (Class.SUCCESS, Class.ERROR):
            return ("response", msg.transaction_id)
        return ("stun", msg.method, msg.cls, msg.get_raw(Attr.DATA))
    if _is_channel_data(payload):
        channel, length = struct.unpack_from("!HH", payload)
        return ("channel", channel, payload[4 : 4 + length])
    return ("raw", trace_src, payload)


class TraceReplay:
    """The replay of one trace against a running system."""

    def __init__(
        self,
        trace: Trace,
        system: RelaySystem,
        *,
        speed: float = 1.0,
        timeout: float = DEFAULT_TIMEOUT,
        grace: float = GRACE,
    ) -> None:
        self.trace = trace
        self.exp = trace.expectations
        self.system = system
        self.speed = speed
        self.timeout = timeout
        self.grace = grace
        self.result = TraceResult(trace.name, self.exp.kind, frames=len(trace.frames))
        self.loop = asyncio.get_running_loop()
        self.role_of = self.exp.role_of()
        relay_ips = {h for h in (self.exp.relay.get("ip4"), self.exp.relay.get("ip6")) if h}
        self.relay_ips = relay_ips or {"127.0.0.1"}
        # trace address -> live address: role sockets, the listen port, relayed addresses
        self.addr_map: dict[Addr, Addr] = {}
        self.reverse: dict[Addr, Addr] = {}
        self.nonces: dict[str, str] = {}
        self.tid_credential: dict[tuple[Addr, bytes], Credential] = {}
        self.sockets: dict[Addr, _Socket] = {}
        self.kinds = [self._classify(i, f) for i, f in enumerate(trace.frames)]
        self.expectations: dict[int, _Pending] = {}
        self.armed: collections.deque[_Pending] = collections.deque()
        self.met: set[int] = set()
        self.walked = 0  # 1-based number of the frame the walk is at
        self.lost_keys: set[tuple[Any, ...]] = set()
        self._wake = asyncio.Event()

    # -- setup ----------------------------------------------------------------------------

    def _classify(self, index: int, frame: Frame) -> str:
        from_role, to_role = frame.src in self.role_of, frame.dst in self.role_of
        if from_role and to_role:
            raise ValueError(f"frame {index + 1}: role to role ({frame.src} -> {frame.dst})")
        for addr in (frame.src, frame.dst):
            if addr not in self.role_of and addr[0] not in self.relay_ips:
                raise ValueError(
                    f"frame {index + 1}: {format_addr(addr)} is neither a role "
                    "endpoint nor a relay address (missing from roles?)"
                )
        if from_role:
            return SEND
        return EXPECT if to_role else INTERNAL

    def _bind(self, trace_addr: Addr, live_addr: Addr) -> None:
        self.addr_map[trace_addr] = live_addr
        self.reverse[live_addr] = trace_addr

    def open(self) -> None:
        for ip in self.relay_ips:
            family = Family.of(ip)
            with contextlib.suppress(ValueError):
                self._bind((ip, TRACE_LISTEN_PORT), self.system.listen(family))
        for trace_addr in self.role_of:
            af = socket.AF_INET6 if ":" in trace_addr[0] else socket.AF_INET
            sock = socket.socket(af, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.bind((trace_addr[0], 0))
            sock.setblocking(False)
            live = sock.getsockname()[:2]
            entry = _Socket(trace_addr, sock, live)
            self.sockets[trace_addr] = entry
            self._bind(trace_addr, live)
        for index, frame in enumerate(self.trace.frames):
            if self.kinds[index] == EXPECT:
                pending = _Pending(index, frame, _expectation_key(frame.payload, frame.src))
                self.expectations[index] = pending
                self.sockets[frame.dst].pending.append(pending)
                self.result.expected += 1
        for entry in self.sockets.values():
            self.loop.add_reader(entry.sock.fileno(), self._on_readable, entry)

    def close(self) -> None:
        for entry in self.sockets.values():
            with contextlib.suppress(Exception):
                self.loop.remove_reader(entry.sock.fileno())
            entry.sock.close()
        self.sockets.clear()

    # -- the walk ---------------------------------------------------------------------------

    async def run(self) -> TraceResult:
        start = time.monotonic()
        try:
            await self._walk()
        except _Failed:
            pass
        finally:
            self.result.duration = time.monotonic() - start
        return self.result

    def _fail(self, mismatch: Mismatch) -> None:
        if self.result.mismatch is None:
            self.result.mismatch = mismatch
        self._wake.set()

    def _check_failed(self) -> None:
        if self.result.mismatch is not None:
            raise _Failed

    async def _walk(self) -> None:
        frames = self.trace.frames
        t0 = time.monotonic()
        lag = 0.0
        for index, frame in enumerate(frames):
            self.walked = index + 1
            kind = self.kinds[index]
            if kind == EXPECT:
                self._arm(index, frame)
            elif kind == SEND:
                await self._barrier()
                target = t0 + frame.t / self.speed + lag
                now = time.monotonic()
                if now > target:
                    lag += now - target  # late: keep the recorded gaps from here on
                else:
                    await asyncio.sleep(target - now)
                self._check_failed()
                self._send(index, frame)
        await self._barrier()
        await asyncio.sleep(self.grace)
        self._check_failed()

    def _arm(self, index: int, frame: Frame) -> None:
        """Start the clock of an expectation. Every expectation is known from the start, so
        an answer may arrive before the walk reaches it (a burst of sends is in flight)."""
        pending = self.expectations[index]
        pending.armed_at = time.monotonic()
        self.armed.append(pending)

    async def _barrier(self) -> None:
        """Wait until every armed expectation is met (or lost, where loss is allowed)."""
        while True:
            self._check_failed()
            while self.armed and self.armed[0].index in self.met:
                self.armed.popleft()
            if not self.armed:
                return
            oldest = self.armed[0]
            assert oldest.armed_at is not None
            remaining = oldest.armed_at + self.timeout - time.monotonic()
            if remaining <= 0:
                self._missing(oldest)
                continue
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._wake.wait()

    def _missing(self, pending: _Pending) -> None:
        entry = self.sockets[pending.frame.dst]
        entry.pending.remove(pending)
        self.met.add(pending.index)
        if self.exp.allow_loss:
            self.result.lost += 1
            self.lost_keys.add(pending.key)
            return
        self._fail(
            Mismatch(
                self.trace.name,
                pending.index + 1,
                f"expected datagram did not arrive within {self.timeout:.1f}s",
                pending.frame,
                note=self.exp.frame_options(pending.index).get("note", ""),
            )
        )
        raise _Failed

    # -- sending ----------------------------------------------------------------------------

    def _send(self, index: int, frame: Frame) -> None:
        entry = self.sockets[frame.src]
        destination = self.addr_map.get(frame.dst)
        if destination is None:
            self._fail(
                Mismatch(
                    self.trace.name,
                    index + 1,
                    f"cannot send: {format_addr(frame.dst)} was never learned "
                    "(no live relayed address for it)",
                    frame,
                )
            )
            raise _Failed
        payload = self._rebind_request(frame, self.exp.frame_options(index))
        try:
            entry.sock.sendto(payload, destination)
        except BlockingIOError:
            self._fail(Mismatch(self.trace.name, index + 1, "send buffer full", frame))
            raise _Failed from None
        except OSError:
            pass  # e.g. a queued ICMP error surfacing on this socket; UDP sends are best effort
        self.result.sent += 1

    def credential(self, trace_username: str) -> Credential | None:
        spec = self.exp.credentials.get(trace_username)
        return None if spec is None else self.system.credential(spec)

    def map_addr(self, addr: Addr) -> Addr:
        return self.addr_map.get(addr, addr)

    def _rebind_request(self, frame: Frame, options: dict[str, Any]) -> bytes:
        """Substitute live credentials, nonces and addresses, and re-sign."""
        payload = frame.payload
        if options.get("verbatim"):
            return payload
        msg = _try_parse(payload)
        if msg is None:
            return payload
        tid = msg.transaction_id
        attributes: list[tuple[int, bytes]] = []
        credential: Credential | None = None
        changed = False
        for attr_type, value in msg.attributes:
            if attr_type in (
                Attr.MESSAGE_INTEGRITY,
                Attr.MESSAGE_INTEGRITY_SHA256,
                Attr.FINGERPRINT,
            ):
                continue
            new = value
            if attr_type == Attr.USERNAME:
                credential = self.credential(value.decode("utf-8", "replace"))
                if credential is not None:
                    new = credential.username.encode()
            elif attr_type == Attr.NONCE:
                live = self.nonces.get(value.decode("utf-8", "replace"))
                if live is not None:
                    new = live.encode()
            elif attr_type == Attr.XOR_PEER_ADDRESS:
                spec = stun.ATTRIBUTES[attr_type]
                try:
                    peer = spec.decode(value, tid)
                except stun.BadAttribute:
                    peer = None
                if peer is not None and self.map_addr(peer) != peer:
                    new = spec.encode(self.map_addr(peer), tid)
            changed = changed or new != value
            attributes.append((attr_type, new))
        if credential is not None:
            self.tid_credential[(frame.src, tid)] = credential
        integrity = None
        if msg.integrity_offset is not None:
            integrity = "sha1"
        elif msg.integrity_sha256_offset is not None:
            integrity = "sha256"
        if integrity is not None and credential is None:
            return payload  # signed with a key we cannot reproduce: send as recorded
        if not changed and integrity is None:
            return payload
        return build_message(
            payload[:2],
            tid,
            attributes,
            integrity=integrity,
            key=credential.sign_key if credential is not None else None,
            fingerprint=msg.fingerprint_offset is not None,
        )

    # -- receiving ----------------------------------------------------------------------------

    def _on_readable(self, entry: _Socket) -> None:
        for _ in range(256):
            try:
                data, source = entry.sock.recvfrom(65536)
            except BlockingIOError:
                return
            except OSError:
                continue  # ICMP port unreachable after sending to a freed allocation
            self._on_datagram(entry, data, source[:2])

    def _on_datagram(self, entry: _Socket, data: bytes, source: Addr) -> None:
        if self.result.mismatch is not None:
            return
        trace_source = self.reverse.get(source)
        key = _expectation_key(data, trace_source)
        candidates = [p for p in entry.pending if p.key == key]
        if not candidates:
            if self.exp.allow_loss and key in self.lost_keys:
                return  # a late answer to something already counted as lost
            # Explain against the closest thing that is due: same kind (and channel, method or
            # source) if there is one, else whatever is due first.
            armed = [p for p in entry.pending if p.armed_at is not None]
            similar = [p for p in armed if p.key[:2] == key[:2]]
            first = (similar or armed)[0] if similar or armed else None
            at = f"at {self._role_name(entry.trace_addr)} {format_addr(entry.trace_addr)}"
            if first is None:
                reason = f"unexpected datagram: nothing is due {at}"
            elif similar:
                why = self._compare(first.frame, data, source) or "differs"
                reason = f"{why} ({at})"
            else:
                reason = f"datagram does not match what is due {at}"
            self._fail(
                Mismatch(
                    self.trace.name,
                    first.index + 1 if first else self.walked,
                    reason,
                    first.frame if first else None,
                    data,
                    source,
                    self.exp.frame_options(first.index).get("note", "") if first else "",
                )
            )
            return
        pending = candidates[0]
        problem = self._compare(pending.frame, data, source)
        if problem is not None:
            self._fail(
                Mismatch(
                    self.trace.name,
                    pending.index + 1,
                    problem,
                    pending.frame,
                    data,
                    source,
                    self.exp.frame_options(pending.index).get("note", ""),
                )
            )
            return
        entry.pending.remove(pending)
        self.met.add(pending.index)
        self.result.matched += 1
        self._wake.set()

    def _role_name(self, addr: Addr) -> str:
        return self.role_of.get(addr, "?")

    # -- comparing ----------------------------------------------------------------------------

    def _compare(self, expected: Frame, data: bytes, source: Addr) -> str | None:
        want_source = self.addr_map.get(expected.src)
        if want_source is None:
            never = format_addr(expected.src)
            return f"came from {format_addr(source)}, but {never} was never learned"
        if want_source != source:
            return f"came from {format_addr(source)}, expected {format_addr(want_source)}"
        want = _try_parse(expected.payload)
        if want is not None:
            got = _try_parse(data)
            if got is None:
                return "expected a STUN message, got something else"
            return self._compare_stun(want, got, expected.dst)
        if _is_channel_data(expected.payload):
            if not _is_channel_data(data):
                return "expected ChannelData, got something else"
            want_channel, want_length = struct.unpack_from("!HH", expected.payload)
            got_channel, got_length = struct.unpack_from("!HH", data)
            if got_channel != want_channel:
                return f"channel 0x{got_channel:04x}, expected 0x{want_channel:04x}"
            if 4 + got_length > len(data):
                return "ChannelData length runs past the datagram"
            if data[4 : 4 + got_length] != expected.payload[4 : 4 + want_length]:
                return "ChannelData payload differs"
            return None
        if data != expected.payload:
            return "relayed payload differs"
        return None

    def _compare_stun(self, want: Message, got: Message, trace_dst: Addr) -> str | None:
        if (got.method, got.cls) != (want.method, want.cls):
            return (
                f"{_METHODS.get(got.method, hex(got.method))} {_CLASSES[got.cls]}, expected "
                f"{_METHODS.get(want.method, hex(want.method))} {_CLASSES[want.cls]}"
            )
        response = want.cls in (Class.SUCCESS, Class.ERROR)
        if response and got.transaction_id != want.transaction_id:
            return "transaction id differs"
        want_types = [t for t, _ in want.attributes]
        got_types = [t for t, _ in got.attributes]
        if want_types != got_types:
            want_text = ", ".join(map(attr_name, want_types))
            got_text = ", ".join(map(attr_name, got_types))
            return f"attributes differ: expected {want_text}; got {got_text}"
        bindings: list[tuple[str, Any, Any]] = []
        for (attr_type, want_raw), (_, got_raw) in zip(
            want.attributes, got.attributes, strict=True
        ):
            reason = self._compare_attribute(
                attr_type, want, want_raw, got, got_raw, trace_dst, bindings
            )
            if reason is not None:
                return f"{attr_name(attr_type)}: {reason}"
        for kind, trace_value, live_value in bindings:
            if kind == "nonce":
                self.nonces[trace_value] = live_value
            else:
                self._bind(trace_value, live_value)
        return None

    def _compare_attribute(
        self,
        attr_type: int,
        want: Message,
        want_raw: bytes,
        got: Message,
        got_raw: bytes,
        trace_dst: Addr,
        bindings: list[tuple[str, Any, Any]],
    ) -> str | None:
        if attr_type in (Attr.SOFTWARE, Attr.FINGERPRINT, Attr.RESERVATION_TOKEN):
            return None  # version string; already verified by parse; random
        if attr_type in (Attr.MESSAGE_INTEGRITY, Attr.MESSAGE_INTEGRITY_SHA256):
            credential = self.tid_credential.get((trace_dst, want.transaction_id))
            if credential is not None and not stun.verify_integrity(got, credential.key):
                return f"does not verify with the live key of {credential.username}"
            return None
        spec = stun.ATTRIBUTES.get(attr_type)
        if spec is None:
            return None if want_raw == got_raw else "value differs"
        try:
            got_value = spec.decode(got_raw, got.transaction_id)
        except stun.BadAttribute as exc:
            return f"malformed in the response: {exc}"
        try:
            want_value = spec.decode(want_raw, want.transaction_id)
        except stun.BadAttribute:
            return None if want_raw == got_raw else "value differs"
        if attr_type == Attr.NONCE:
            bindings.append(("nonce", want_value, got_value))
            return None
        if attr_type == Attr.XOR_RELAYED_ADDRESS:
            known = self.addr_map.get(want_value)
            if known is not None:
                if known != got_value:
                    return f"{format_addr(got_value)}, expected {format_addr(known)} as before"
                return None
            if got_value[0] != want_value[0]:
                return f"host {got_value[0]}, expected {want_value[0]}"
            low, high = self.system.lowest_port, self.system.highest_port
            if not low <= got_value[1] <= high:
                return f"port {got_value[1]} outside the relay's range {low}-{high}"
            bindings.append(("address", want_value, got_value))
            return None
        if attr_type in (Attr.XOR_MAPPED_ADDRESS, Attr.XOR_PEER_ADDRESS, Attr.MAPPED_ADDRESS):
            mapped = self.map_addr(want_value)
            if mapped != got_value:
                return f"{format_addr(got_value)}, expected {format_addr(mapped)}"
            return None
        if attr_type == Attr.LIFETIME:
            if abs(got_value - want_value) > LIFETIME_SLACK:
                return f"{got_value}, expected {want_value}"
            return None
        if attr_type == Attr.ERROR_CODE:
            if got_value[0] != want_value[0]:
                return f"{got_value[0]} {got_value[1]}, expected {want_value[0]} {want_value[1]}"
            return None
        if attr_type == Attr.ADDRESS_ERROR_CODE:
            if got_value[:2] != want_value[:2]:
                return f"{got_value[:2]}, expected {want_value[:2]}"
            return None
        if got_value != want_value:
            return f"{got_value!r}, expected {want_value!r}"
        return None


def build_message(
    type_bytes: bytes,
    tid: bytes,
    attributes: list[tuple[int, bytes]],
    *,
    integrity: str | None,
    key: bytes | None,
    fingerprint: bool,
) -> bytes:
    """Encode raw attribute values (kept byte for byte), then MESSAGE-INTEGRITY(-SHA256) and
    FINGERPRINT, as RFC 8489 §14.5-14.7 compute them."""
    import hashlib
    import hmac

    body = bytearray()
    for attr_type, value in attributes:
        body += struct.pack("!HH", attr_type, len(value)) + value + b"\x00" * (-len(value) % 4)
    head = bytes(type_bytes)
    if integrity is not None and key is not None:
        attr_type, digest, size = (
            (Attr.MESSAGE_INTEGRITY, hashlib.sha1, 20)
            if integrity == "sha1"
            else (Attr.MESSAGE_INTEGRITY_SHA256, hashlib.sha256, 32)
        )
        header = head + struct.pack("!HI", len(body) + 4 + size, stun.MAGIC_COOKIE) + tid
        mac = hmac.new(key, header + bytes(body), digest).digest()
        body += struct.pack("!HH", attr_type, size) + mac
    if fingerprint:
        header = head + struct.pack("!HI", len(body) + 8, stun.MAGIC_COOKIE) + tid
        crc = stun.fingerprint_of(header + bytes(body))
        body += struct.pack("!HHI", Attr.FINGERPRINT, 4, crc)
    return head + struct.pack("!HI", len(body), stun.MAGIC_COOKIE) + tid + bytes(body)


# --- whole runs -----------------------------------------------------------------------------


def with_companions(paths: list[Path], alone: bool = False) -> list[Path]:
    """Add the legit trace each hostile trace runs beside (unless ``alone``)."""
    out: list[Path] = []
    for path in paths:
        path = Path(path)
        if not alone:
            beside = tracefile.Expectations.from_json(
                tracefile.expectations_path(path).read_text()
            ).beside
            if beside:
                companion = path.parent / beside
                if companion not in out:
                    out.append(companion)
        if path not in out:
            out.append(path)
    return out


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def replay(
    paths: Sequence[Path | str],
    *,
    speed: float = 1.0,
    timeout: float = DEFAULT_TIMEOUT,
    log_dir: Path | None = None,
    mutate: Any = None,
) -> RunResult:
    """Replay ``paths`` concurrently against one freshly started system.

    ``mutate(trace)`` may edit the loaded traces first (tests use it to prove that a wrong
    expectation is caught).
    """
    _raise_fd_limit()
    traces = [tracefile.load(p) for p in paths]
    if mutate is not None:
        for trace in traces:
            mutate(trace)
    spec = relay_process.merge_specs([t.expectations.relay for t in traces])
    system = await relay_process.start(spec, log_dir)
    replays: list[TraceReplay] = []
    problem = None
    try:
        for trace in traces:
            r = TraceReplay(trace, system, speed=speed, timeout=timeout)
            replays.append(r)
            r.open()
        results = await asyncio.gather(*(r.run() for r in replays))
        if not system.alive():
            problem = f"the relay exited with {system.proc.returncode} during the replay"
    finally:
        for r in replays:
            r.close()
        code = await system.stop()
        log = system.log()
        system.cleanup()
    if problem is None and code != 0:
        problem = f"the relay exited with {code} on SIGTERM"
    if problem is None and ("Traceback" in log or "internal error" in log):
        problem = "the relay logged an internal error"
    errors = [line for line in log.splitlines() if " ERROR " in line]
    if problem is None and errors:
        problem = f"the relay logged {len(errors)} error(s), first: {errors[0]}"
    if problem is not None:
        problem += "\n" + _tail(log)
    return RunResult(list(results), problem, log)


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def run(paths: Sequence[Path | str], **kwargs: Any) -> RunResult:
    return asyncio.run(replay(paths, **kwargs))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.traces.replay",
        description="Replay TURN packet traces against the relay daemon and check the answers.",
    )
    parser.add_argument(
        "traces",
        nargs="*",
        type=Path,
        help="pcap files (default: every trace in simulations/traces/data)",
    )
    parser.add_argument(
        "--alone",
        action="store_true",
        help="do not add the legit trace a hostile trace runs beside",
    )
    parser.add_argument("--speed", type=float, default=1.0, help="time scale (2 = twice as fast)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help="seconds an expected datagram may take",
    )
    parser.add_argument("--log", action="store_true", help="print the relay's log")
    args = parser.parse_args(argv)
    paths = args.traces or sorted(TRACES_DIR.glob("*.pcap"))
    failures = 0
    groups = [with_companions([p], args.alone) for p in paths]
    for group in groups:
        result = run(group, speed=args.speed, timeout=args.timeout)
        print(result.report(), flush=True)
        if args.log:
            print(result.relay_log)
        failures += not result.ok
    if len(groups) > 1:
        print(f"{len(groups) - failures}/{len(groups)} runs passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
