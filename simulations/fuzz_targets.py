"""Coverage-guided fuzz targets for the code that reads the network: each is a function of
one input (bytes) that raises on a bug. ``python -m simulations.bench.fuzz_coverage`` runs them
under atheris (libFuzzer in process, the sans-IO core instrumented).

* ``stun``: the STUN codec and ChannelData framing. Every input is parsed; what parses has
  every attribute decoded, its integrity and fingerprint checked, and each decoded value
  encoded and decoded again to the same value. Only ``ValueError`` (``ParseError``,
  ``BadAttribute``) may come out.
* ``server``: the sans-IO ``Server`` with a fixed clock, a fixed secret and seeded randomness.
  The input is a script of steps (:class:`Script`): raw datagrams from one of four clients
  (UDP and TCP 5-tuples), requests they sign with valid credentials and the nonce the server
  gave them (so the fuzzer gets past authentication), ChannelData, peer datagrams to
  allocated ports, and clock advances. After every step ``Server.check_invariants()``
  holds, the server counted no internal error (it catches its own exceptions), and every
  message it sends parses.
* ``stream_framing``: TCP/TLS stream framing, when ``firezone_relay.protocol.stream_framing``
  exists: the input is cut into reads of fuzzer-chosen sizes; the frames are those of one
  whole read, and the framer holds less than one frame.
* ``proxy_protocol``: the PROXY v1/v2 header reader, when it exists: read whole and in pieces,
  the same header and the same bytes after it; only ``ProxyError`` comes out.

Seeds (:func:`seeds`) come from the trace files in ``simulations/traces/data``: every datagram
of every trace for ``stun``, each trace's client datagrams as a script for ``server``.
``python -m simulations.bench.fuzz_coverage`` runs them all for a while and reports coverage;
``tests/unit/test_fuzz_targets.py`` runs each for a bounded number of inputs.
"""

from __future__ import annotations

import hashlib
import importlib.util
import random
import struct
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from firezone_relay.protocol import stun
from firezone_relay.protocol.commands import SendMessage
from firezone_relay.protocol.server import Server, ServerConfig
from firezone_relay.protocol.stun import ATTRIBUTES, Attr, Class, Method
from firezone_relay.protocol.types import Addr, Family, FiveTuple, Transport, udp
from simulations import channel_data

__all__ = ["TARGETS", "Script", "run_script", "seeds", "server_input", "stun_input", "write_seeds"]

TRACES = Path(__file__).resolve().parent / "traces" / "data"
NOW = 1_800_000_000.0  # the server's clock, doubling as wall clock (unix_offset 0)
SECRET = "fuzz-secret"
PUBLIC4, PUBLIC6 = "52.0.0.1", "2600:1f00::1"
LISTEN4, LISTEN6 = ("0.0.0.0", 3478), ("::", 3478)
#: the clients' 5-tuples: two over UDP/IPv4 (one user's two allocations), one over UDP/IPv6,
#: one over TCP
CLIENTS: tuple[FiveTuple, ...] = (
    udp(("93.184.216.34", 40000), LISTEN4),
    udp(("93.184.216.35", 40001), LISTEN4),
    udp(("2606:2800:220:1::7", 40000), LISTEN6),
    FiveTuple(Transport.TCP, ("93.184.216.36", 40002), (PUBLIC4, 3478)),
)
PEERS: tuple[Addr, ...] = (
    ("8.8.4.4", 5000),
    ("8.8.4.4", 5001),
    ("2001:4860:4860::8844", 5000),
    ("127.0.0.1", 80),  # refused
    (PUBLIC4, 49152),  # the relay loop, when that port is allocated
)
STEPS = 64  # at most this many steps per script: the work per input stays bounded
KEY = stun.long_term_key("user", "realm", "pass")


# -- stun -------------------------------------------------------------------------------------


def stun_input(data: bytes) -> None:
    """One input of the ``stun`` target (raises AssertionError, or anything but ValueError,
    on a bug)."""
    try:
        channel, payload = channel_data.decode(data)
    except ValueError:
        pass
    else:
        assert channel_data.is_valid_channel(channel)
        assert channel_data.decode(channel_data.encode(channel, payload)) == (channel, payload)
    stun.is_stun(data)
    try:
        msg = stun.parse(data)
    except stun.ParseError:
        return
    assert msg.raw == data
    stun.verify_integrity(msg, KEY)
    stun.verify_fingerprint(msg)
    msg.unknown_comprehension_required()
    for attr_type, raw in msg.attributes:
        spec = ATTRIBUTES.get(attr_type)
        if spec is None:
            continue
        try:
            value = spec.decode(raw, msg.transaction_id)
        except ValueError:
            continue
        again = spec.decode(spec.encode(value, msg.transaction_id), msg.transaction_id)
        assert again == value, (hex(attr_type), value, again)


# -- server -----------------------------------------------------------------------------------


class Script:
    """Reads a fuzz input as steps; every read is total (short input reads as zeros)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def left(self) -> bool:
        return self.pos < len(self.data)

    def u8(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def u16(self) -> int:
        return self.u8() << 8 | self.u8()

    def blob(self) -> bytes:
        """A length-prefixed byte string (16-bit length)."""
        n = self.u16()
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def pick(self, options: tuple[Any, ...]) -> Any:
        return options[self.u8() % len(options)]


#: step kinds of a script (the first byte of a step, modulo their number)
RAW, SIGNED, CHANNEL_DATA, PEER, ADVANCE = range(5)
METHODS = (
    Method.ALLOCATE,
    Method.REFRESH,
    Method.CREATE_PERMISSION,
    Method.CHANNEL_BIND,
    Method.SEND,
    Method.BINDING,
)


@dataclass
class _Client:
    addr: FiveTuple
    username: str
    password: str
    realm: str | None = None
    nonce: str | None = None

    @property
    def key(self) -> bytes:
        return stun.long_term_key(self.username, self.realm or "firezone", self.password)


def _server() -> tuple[Server, list[_Client]]:
    config = ServerConfig(
        public_ip4=PUBLIC4,
        public_ip6=PUBLIC6,
        lowest_port=49152,
        highest_port=49159,  # few ports: exhaustion and reuse are reachable
        max_channels_per_allocation=8,
        max_permissions_per_allocation=8,
        auth_scheme="rest",
        max_allocations_per_user=3,
    )
    counter = iter(range(1 << 30))

    def token_bytes(n: int) -> bytes:
        return next(counter).to_bytes(8, "big").ljust(n, b"\x01")[:n]

    server = Server(config, random.Random(0), SECRET, token_bytes=token_bytes)
    from firezone_relay.protocol.auth import rest_password

    clients = []
    for i, addr in enumerate(CLIENTS):
        username = f"{int(NOW) + 3600}:user{i % 2}"
        clients.append(_Client(addr, username, rest_password(SECRET, username)))
    return server, clients


def _signed(script: Script, client: _Client, tid: bytes) -> bytes:
    method = script.pick(METHODS)
    attrs: list[tuple[int, object]] = []
    flags = script.u8()
    if method == Method.ALLOCATE:
        attrs.append((Attr.REQUESTED_TRANSPORT, script.pick((17, 17, 6, 0))))
        if flags & 1:
            attrs.append((Attr.REQUESTED_ADDRESS_FAMILY, script.pick((Family.V4, Family.V6))))
        if flags & 2:
            attrs.append((Attr.ADDITIONAL_ADDRESS_FAMILY, script.pick((Family.V4, Family.V6))))
        if flags & 4:
            attrs.append((Attr.DONT_FRAGMENT, True))
        if flags & 8:
            attrs.append((Attr.EVEN_PORT, bool(flags & 16)))
    if method in (Method.ALLOCATE, Method.REFRESH) and flags & 32:
        attrs.append((Attr.LIFETIME, script.pick((0, 1, 600, 3600, 0xFFFFFFFF))))
    if method == Method.CHANNEL_BIND:
        attrs.append((Attr.CHANNEL_NUMBER, script.pick((0x4000, 0x4001, 0x4FFF, 0x5000, 0x3FFF))))
    if method in (Method.CHANNEL_BIND, Method.CREATE_PERMISSION, Method.SEND):
        for _ in range(1 + (flags >> 6)):
            attrs.append((Attr.XOR_PEER_ADDRESS, script.pick(PEERS)))
    if method == Method.SEND:
        attrs.append((Attr.DATA, script.blob()[:256]))
        return stun.encode(method, Class.INDICATION, tid, attrs)
    attrs.append((Attr.USERNAME, client.username))
    if client.realm is not None:
        attrs.append((Attr.REALM, client.realm))
    if client.nonce is not None:
        attrs.append((Attr.NONCE, client.nonce))
    extra = script.blob()[:64]  # an unknown attribute, comprehension-optional or not
    if extra:
        unknown = (0xC000 if flags & 1 else 0x0040) | extra[0]
        if unknown not in ATTRIBUTES:
            attrs.append((unknown, extra[1:]))
    return stun.encode(
        method, Class.REQUEST, tid, attrs, integrity_key=client.key, fingerprint=bool(flags & 2)
    )


def server_input(data: bytes) -> None:
    """One input of the ``server`` target: a script run against a fresh ``Server``."""
    run_script(data)


def run_script(data: bytes) -> Counter[str]:
    """Run a script against a fresh ``Server``, checking after each step; the commands it
    emitted, by type name."""
    emitted: Counter[str] = Counter()
    server, clients = _server()
    script = Script(data)
    now = NOW
    ports: list[int] = [49152]
    for step in range(STEPS):
        if not script.left():
            break
        kind = script.u8() % 5
        client = clients[script.u8() % len(clients)]
        tid = struct.pack("!III", step, 0, len(data))
        if kind == RAW:
            server.handle_client_input(script.blob(), client.addr, now)
        elif kind == SIGNED:
            server.handle_client_input(_signed(script, client, tid), client.addr, now)
        elif kind == CHANNEL_DATA:
            channel = script.pick((0x4000, 0x4001, 0x4FFF, script.u16()))
            payload = script.blob()
            pad = script.u8() % 4
            length = max(0, min(0xFFFF, len(payload) + script.u8() % 3 - 1))  # may lie by 1
            frame = channel_data.HEADER.pack(channel, length)
            server.handle_client_input(frame + payload + bytes(pad), client.addr, now)
        elif kind == PEER:
            peer = script.pick(PEERS)
            port = script.pick(tuple(ports))
            server.handle_peer_traffic(script.blob(), peer, port, now)
        else:
            now += script.pick((1.0, 30.0, 299.0, 301.0, 600.0, 3600.0))
            server.handle_timeout(now)
        while (command := server.next_command()) is not None:
            emitted[type(command).__name__] += 1
            port = getattr(command, "port", None)
            if isinstance(port, int) and port not in ports:
                ports.append(port)
            if isinstance(command, SendMessage):
                _learn(clients, command)
        server.check_invariants()
        # the server turns its own exceptions into a count and a log line: any is a bug
        assert server.stats.internal_errors == 0
        server.poll_timeout()
    return emitted


def _learn(clients: list[_Client], command: SendMessage) -> None:
    """Every message the server sends parses; a client takes the realm and nonce of a
    401/438 addressed to it, as a real client would."""
    msg = stun.parse(command.payload)
    for client in clients:
        if client.addr != command.recipient or msg.cls != Class.ERROR:
            continue
        nonce, realm = msg.get(Attr.NONCE), msg.get(Attr.REALM)
        if nonce is not None:
            client.nonce = nonce
        if realm is not None:
            client.realm = realm


# -- stream framing (TCP and TLS) ------------------------------------------------------------


def stream_framing_input(data: bytes) -> None:
    """One input of the ``stream_framing`` target: the first byte picks read sizes."""
    from firezone_relay.protocol import stream_framing as sf  # type: ignore[attr-defined]

    if not data:
        return
    whole_error = chunked_error = False
    whole: list[bytes] = []
    try:
        whole = sf.StreamFramer().feed(data[1:])
    except sf.FramingError:
        whole_error = True
    framer = sf.StreamFramer()
    frames: list[bytes] = []
    rng = random.Random(data[0])
    pos = 1
    try:
        while pos < len(data):
            n = rng.choice((1, 2, 3, 7, 64, 1500))
            frames += framer.feed(data[pos : pos + n])
            pos += n
            assert framer.buffered < framer.max_frame + 3
    except sf.FramingError:
        chunked_error = True
    assert whole_error == chunked_error
    if not whole_error:
        assert frames == whole


def proxy_protocol_input(data: bytes) -> None:
    """One input of the ``proxy_protocol`` target: the header read whole and in reads of
    fuzzer-chosen sizes gives the same header and the same bytes after it."""
    from firezone_relay.protocol import proxy_protocol as pp  # type: ignore[attr-defined]

    if not data:
        return
    stream = data[1:]
    try:
        whole = pp.ProxyReader().feed(stream)
    except pp.ProxyError:
        whole = "error"
    reader = pp.ProxyReader()
    rng = random.Random(data[0])
    pos, chunked = 0, None
    try:
        while pos < len(stream):
            n = rng.choice((1, 2, 5, 16, 200))
            got = reader.feed(stream[pos : pos + n])
            pos += n
            if got is not None:
                chunked = (got[0], got[1] + stream[pos:])
                break
    except pp.ProxyError:
        chunked = "error"
    assert whole == chunked, (whole, chunked)


# -- registry, seeds, entry point -------------------------------------------------------------


def _exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(f"firezone_relay.protocol.{module}") is not None
    except ImportError:
        return False


#: name -> the one-input function; a target whose code is not there yet is left out
TARGETS: dict[str, Callable[[bytes], None]] = {"stun": stun_input, "server": server_input}
if _exists("stream_framing"):
    TARGETS["stream_framing"] = stream_framing_input
if _exists("proxy_protocol"):
    TARGETS["proxy_protocol"] = proxy_protocol_input
#: modules the targets import inside their functions (they may not exist yet)
LAZY_MODULES = [
    f"firezone_relay.protocol.{name}"
    for name in ("stream_framing", "proxy_protocol")
    if _exists(name)
]

#: PROXY headers as balancers send them (v1 lines; v2 IPv4, IPv6 with a TLV, LOCAL)
PROXY_SEEDS = (
    b"PROXY TCP4 192.0.2.1 198.51.100.1 40000 3478\r\n",
    b"PROXY TCP6 2001:db8::1 2001:db8::2 40000 3478\r\n",
    b"PROXY UNKNOWN\r\n",
    b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c\xc0\x00\x02\x01\xc6\x33\x64\x01\x9c\x40\x0d\x96",
    b"\r\n\r\n\x00\r\nQUIT\n\x21\x21\x00\x2a"
    + bytes(15)
    + b"\x01"
    + bytes(15)
    + b"\x02"
    + b"\x9c\x40\x0d\x96"
    + b"\x04\x00\x03abc",
    b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00",
)


def _trace_frames() -> Iterator[tuple[str, Any]]:
    from simulations.traces.tracefile import read_pcap

    for pcap in sorted(TRACES.rglob("*.pcap")):
        yield pcap.stem, read_pcap(pcap)


def seeds(target: str) -> Iterator[bytes]:
    """The seed inputs of ``target``, from the trace files."""
    for _name, frames in _trace_frames():
        if target == "proxy_protocol":
            for header in PROXY_SEEDS:
                yield b"\x00" + header + (frames[0].payload if frames else b"")
        elif target in ("stun", "stream_framing"):
            payloads = [f.payload for f in frames]
            yield from payloads
            if target == "stream_framing" and payloads:
                yield b"\x00" + b"".join(payloads[:16])
        elif target == "server":
            # each trace's first client's datagrams, in order, as RAW steps
            first = frames[0].src if frames else None
            steps = bytearray()
            for f in frames:
                if f.src == first and len(steps) < 16_000:
                    steps += bytes((RAW, 0)) + struct.pack("!H", len(f.payload)) + f.payload
            if steps:
                yield bytes(steps)
    if target == "server":  # allocate, bind, relay: the path a client takes
        allocate = (SIGNED, 0, 0, 0, 0, 0, 0)  # method, flags, transport, no extra attribute
        yield bytes(
            [
                *allocate,  # 401: the client learns the realm and nonce
                *allocate,
                *(SIGNED, 0, 3, 0, 0, 0, 0, 0),  # ChannelBind 0x4000 to the first peer
                *(CHANNEL_DATA, 0, 0, 0, 0, 0, 4, 1, 2, 3, 4, 0, 1),
                *(PEER, 0, 0, 0, 0, 4, 5, 6, 7, 8),
                *(ADVANCE, 0, 4),
            ]
        )


def write_seeds(target: str, directory: Path) -> int:
    """Write ``target``'s seeds into ``directory`` (a libFuzzer corpus); how many."""
    directory.mkdir(parents=True, exist_ok=True)
    n = 0
    for seed in seeds(target):
        (directory / hashlib.sha1(seed).hexdigest()).write_bytes(seed)
        n += 1
    return n
