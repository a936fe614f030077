"""Build packet traces from what Firezone's code says its clients and its relay do.

The traces in ``simulations/traces/data/`` were recorded from this repository's own TURN client,
so replaying them shows only that the relay agrees with that client. The traces built here
(``simulations/traces/data/firezone/``) are written from Firezone's source instead:

* connlib's TURN client, ``rust/libs/connlib/snownet/src/allocation.rs`` of firezone/firezone:
  the attributes of each request (``MessagePrototype``: REQUESTED-TRANSPORT 17,
  ADDITIONAL-ADDRESS-FAMILY IPv6 and SOFTWARE "snownet" on Allocate and Refresh; LIFETIME 0
  appended to delete; XOR-PEER-ADDRESS, CHANNEL-NUMBER, SOFTWARE on ChannelBind; then
  USERNAME, REALM, NONCE when known, MESSAGE-INTEGRITY), a fresh transaction id for every
  (re)transmission, the 401 dance (first request without NONCE), the 437 re-sync per method
  (``handle_input``), refresh at half the granted LIFETIME (``refresh_allocation_at``),
  channel refresh after 5 minutes when data arrived (``Channel::needs_refresh``), keepalive
  Bindings every 25 s (``BINDING_INTERVAL``), retransmission after 1 s (``REQUEST_TIMEOUT``,
  ``backoff.rs``); credential rotation from ``node/allocations.rs`` (``upsert`` replaces the
  allocation, from the same socket, when the portal hands out new credentials);
* the Firezone relay's acceptance tests, ``rust/relay/proto/tests/regression.rs`` and the
  unit tests of ``rust/relay/proto/src/server.rs``: requests built as those tests build them
  (attribute order included; no REALM attribute, the same transaction id after a 401) and
  the answers they assert (SOFTWARE first; Allocate: XOR-RELAYED-ADDRESS, XOR-MAPPED-ADDRESS,
  LIFETIME). Those tests use proptest values, not literal bytes, so the bytes here are ours.

Every citation (``derived_from``) names ``FIREZONE_COMMIT`` and files that exist there;
``SOURCES.json`` holds their blobs, and ``--verify-sources <clone>`` checks the files and the
cited names against a clone. Credentials are the portal's: ``<expiry>:<salt>`` with the salt
base64 (no padding) of a SHA-256, gateways expiring 2038-01-01.

Expected answers are what the relay must send: Firezone's answer, except where the README's
"Where we differ" table says otherwise; a trace lists what only we send under ``ours``
(ADDRESS-ERROR-CODE on a partial dual-stack allocation, the hour after which our nonces go
stale), and a trace that checks our own rules throughout is named ``ours_``. Time in these
traces is connlib's (seconds of its clock); they replay ``speed`` times faster against a relay
started with ``--time-scale 1/speed``, so expiry and refresh deadlines fall where they would.

``python -m simulations.traces.connlib`` writes them again (deterministic).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from firezone_relay.protocol import stun
from firezone_relay.protocol.stun import Attr, Class, Method, long_term_key
from firezone_relay.protocol.types import Addr, Family
from simulations.channel_data import encode as channel_data
from simulations.traces import tracefile
from simulations.traces.tracefile import Expectations, Frame

OUT_DIR = Path(__file__).resolve().parent / "data" / "firezone"
REPO = "firezone/firezone"
ALLOCATION_RS = "rust/libs/connlib/snownet/src/allocation.rs"
ALLOCATIONS_RS = "rust/libs/connlib/snownet/src/node/allocations.rs"
BACKOFF_RS = "rust/libs/connlib/snownet/src/backoff.rs"
REGRESSION_RS = "rust/relay/proto/tests/regression.rs"
SERVER_RS = "rust/relay/proto/src/server.rs"
CLIENT_MESSAGE_RS = "rust/relay/proto/src/server/client_message.rs"
COMPOSE_YML = "docker-compose.yml"
#: the firezone/firezone commit every ``derived_from`` cites: its files hold what is named
FIREZONE_COMMIT = "df8139e82dd537f4bc99af32f7f94033b809ef3e"
SOURCES = Path(__file__).resolve().parent / "data" / "firezone" / "SOURCES.json"

SPEED = 100.0  # replay speed; the relay runs with --time-scale 1/SPEED
RELAY4: Addr = ("127.0.0.1", 3478)
RELAY6: Addr = ("::1", 3478)
REALM = "firezone"
CONNLIB_SOFTWARE = "snownet"
RELAY_SOFTWARE = "firezone-relay"  # the value is not compared, only the attribute's place
BINDING_INTERVAL = 25.0
REQUEST_TIMEOUT = 1.0
DEFAULT_LIFETIME = 600
CHANNEL_LIFETIME = 600.0
CHANNEL_REBIND_TIMEOUT = 300.0
RTT = 0.002  # connlib's clock between a request and its answer in these traces
#: the expiry the portal puts in every gateway's relay credentials (``@relay_credentials_expire_at``
#: in elixir/lib/portal_api/gateway/channel/shared.ex): 2038-01-01T00:00:00Z
GATEWAY_EXPIRY = 2145916800
#: a client's relay credentials expire with its session (``subject.expires_at``): a week on
CLIENT_EXPIRY = 1800604800
CLIENT_TTL = 7 * 86400
NONCE_LIFETIME = 3600.0  # our relay's nonces go stale after an hour


def _relay(speed: float = SPEED, **extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "auth": "standalone",
        "ip4": RELAY4[0],
        "ip6": RELAY6[0],
        "args": ["--time-scale", f"{1 / speed:g}"],
    }
    spec.update(extra)
    return spec


def _origin(path: str, *functions: str) -> dict[str, Any]:
    return {"repo": REPO, "commit": FIREZONE_COMMIT, "path": path, "functions": list(functions)}


@dataclass
class Builder:
    """A trace under construction: frames in order, notes, roles and credentials."""

    name: str
    description: str
    derived_from: list[dict[str, Any]]
    relay: dict[str, Any] = field(default_factory=_relay)
    needs: str | None = None  # a relay feature not on every branch yet ("rotation", ...)
    #: what the expected answers hold that Firezone's relay would not send (ours only)
    ours: list[str] = field(default_factory=list)
    speed: float = SPEED
    t: float = 0.0
    frames: list[Frame] = field(default_factory=list)
    notes: dict[str, dict[str, Any]] = field(default_factory=dict)
    roles: dict[str, list[str]] = field(default_factory=dict)
    credentials: dict[str, dict[str, Any]] = field(default_factory=dict)
    _tids: int = 0
    _ports: int = 20000

    def tid(self) -> bytes:
        self._tids += 1
        return hashlib.sha256(f"{self.name}/{self._tids}".encode()).digest()[:12]

    def role(self, role: str, addr: Addr) -> Addr:
        text = tracefile.format_addr(addr)
        if text not in self.roles.setdefault(role, []):
            self.roles[role].append(text)
        return addr

    def relayed(self, host: str) -> Addr:
        """A placeholder for an address the relay allocates; the replayer learns the live one."""
        self._ports += 2
        return host, self._ports

    def wait(self, seconds: float) -> None:
        self.t = round(self.t + seconds, 6)

    def add(self, src: Addr, dst: Addr, payload: bytes, note: str | None = None) -> None:
        self.frames.append(Frame(self.t, src, dst, payload))
        if note:
            self.notes[str(len(self.frames))] = {"note": note}

    def save(self, out_dir: Path = OUT_DIR) -> Path:
        out_dir.mkdir(parents=True, exist_ok=True)
        expectations = Expectations(
            description=self.description,
            scenario=self.name,
            relay=self.relay,
            roles=self.roles,
            credentials=self.credentials,
            frames=self.notes,
        )
        path = tracefile.save(out_dir / f"{self.name}.pcap", self.frames, expectations)
        data = json.loads(tracefile.expectations_path(path).read_text())
        data["derived_from"] = self.derived_from
        data["speed"] = self.speed
        data["needs"] = self.needs
        data["ours"] = self.ours
        tracefile.expectations_path(path).write_text(json.dumps(data, indent=1) + "\n")
        return path


# --- connlib's TURN client ---------------------------------------------------------------


@dataclass
class Connlib:
    """One connlib ``Allocation``: its socket(s) towards one relay, its credentials and nonce."""

    b: Builder
    role: str
    sock: Addr
    key_label: str  # stands for the WireGuard public key the portal hashes into the salt
    relay: Addr = RELAY4
    #: connlib's socket of the other family; with it (and a dual-stack relay) connlib sends one
    #: Binding per family and keeps the socket whose answer comes first
    sock6: Addr | None = None
    nonce: str | None = None
    relayed4: Addr | None = None
    relayed6: Addr | None = None
    with_realm: bool = True  # Firezone's relay tests sign without a REALM attribute
    software: bool = True
    _late_binding_answer: bytes | None = None

    def __post_init__(self) -> None:
        self.b.role(self.role, self.sock)
        if self.sock6 is not None:
            self.b.role(self.role, self.sock6)
        spec: dict[str, Any] = {"user": self.user}
        if self.role == "gateway":
            spec["expiry"] = GATEWAY_EXPIRY
        else:
            spec["ttl"] = CLIENT_TTL
        self.b.credentials[self.username] = spec

    @property
    def user(self) -> str:
        """The salt of the username as the portal makes it: base64 (no padding) of the
        SHA-256 of the client's or gateway's public key (``generate_hash``)."""
        digest = hashlib.sha256(f"{self.key_label} public key".encode()).digest()
        return base64.b64encode(digest).decode().rstrip("=")

    @property
    def expiry(self) -> int:
        return GATEWAY_EXPIRY if self.role == "gateway" else CLIENT_EXPIRY

    @property
    def username(self) -> str:
        return f"{self.expiry}:{self.user}"

    @property
    def key(self) -> bytes:
        return long_term_key(self.username, REALM, f"trace-password-{self.key_label}")

    # -- requests (MessagePrototype) --

    def _sign(self, method: int, attrs: list[tuple[int, Any]], tid: bytes) -> bytes:
        attrs = [*attrs, (Attr.USERNAME, self.username)]
        if self.with_realm:
            attrs.append((Attr.REALM, REALM))
        if self.nonce is not None:
            attrs.append((Attr.NONCE, self.nonce))
        return stun.encode(method, Class.REQUEST, tid, attrs, integrity_key=self.key)

    def _soft(self) -> list[tuple[int, Any]]:
        return [(Attr.SOFTWARE, CONNLIB_SOFTWARE)] if self.software else []

    def transport(self) -> list[tuple[int, Any]]:
        return [(Attr.REQUESTED_TRANSPORT, 17), (Attr.ADDITIONAL_ADDRESS_FAMILY, Family.V6)]

    def request(self, method: int, attrs: list[tuple[int, Any]], note: str, tid: bytes) -> bytes:
        data = self._sign(method, attrs, tid)
        self.b.add(self.sock, self.relay, data, note)
        self._after_first_request()
        return tid

    # -- answers the relay must give --

    def answer(
        self,
        method: int,
        cls: int,
        tid: bytes,
        attrs: list[tuple[int, Any]],
        signed: bool = True,
    ) -> None:
        self.b.wait(RTT / 2)
        all_attrs = [(Attr.SOFTWARE, RELAY_SOFTWARE), *attrs]
        key = self.key if signed else None
        data = stun.encode(method, cls, tid, all_attrs, integrity_key=key)
        self.b.add(self.relay, self.sock, data)
        self.b.wait(RTT / 2)

    def error(self, method: int, tid: bytes, code: int, *extra: tuple[int, Any]) -> None:
        self.answer(method, Class.ERROR, tid, [(Attr.ERROR_CODE, (code, _REASONS[code])), *extra])

    # -- what connlib does --

    def pick_socket(self) -> None:
        """``send_binding_requests``: a Binding to each of the relay's families from the socket
        of that family; the first answer (IPv4 here) picks the active socket, and the other
        answer arrives after connlib has already sent its Allocate from the picked one."""
        dual = self.sock6 is not None and "ip6" in self.b.relay
        tid4 = self.b.tid()
        request = stun.encode(Method.BINDING, Class.REQUEST, tid4, self._soft())
        self.b.add(self.sock, self.relay, request, "Binding to the relay's IPv4 address")
        tid6 = self.b.tid()
        if dual:
            assert self.sock6 is not None
            request = stun.encode(Method.BINDING, Class.REQUEST, tid6, self._soft())
            self.b.add(self.sock6, RELAY6, request, "Binding to the relay's IPv6 address")
        self.answer(
            Method.BINDING, Class.SUCCESS, tid4, [(Attr.XOR_MAPPED_ADDRESS, self.sock)], False
        )
        self._late_binding_answer = tid6 if dual else None

    def _after_first_request(self) -> None:
        """The IPv6 Binding's answer, second: connlib has picked IPv4 and ignores it."""
        tid6, self._late_binding_answer = self._late_binding_answer, None
        if tid6 is None or self.sock6 is None:
            return
        data = stun.encode(
            Method.BINDING,
            Class.SUCCESS,
            tid6,
            [(Attr.SOFTWARE, RELAY_SOFTWARE), (Attr.XOR_MAPPED_ADDRESS, self.sock6)],
        )
        self.b.add(RELAY6, self.sock6, data, "IPv6 answer second: the socket is already picked")

    def binding(self, note: str = "Binding (keepalive / socket selection)") -> None:
        tid = self.b.tid()
        data = stun.encode(Method.BINDING, Class.REQUEST, tid, self._soft())
        self.b.add(self.sock, self.relay, data, note)
        self.answer(
            Method.BINDING, Class.SUCCESS, tid, [(Attr.XOR_MAPPED_ADDRESS, self.sock)], False
        )

    def challenge(self, method: int, attrs: list[tuple[int, Any]], note: str) -> None:
        """A request without NONCE; 401 with REALM and NONCE, signed (the username parses)."""
        self.nonce = None
        tid = self.request(method, attrs, note, self.b.tid())
        self.nonce = _uuid(self.b.name, self.b.tid())
        self.error(method, tid, 401, (Attr.REALM, REALM), (Attr.NONCE, self.nonce))

    def allocate_request(self, note: str = "Allocate") -> bytes:
        return self.request(Method.ALLOCATE, self.transport() + self._soft(), note, self.b.tid())

    def allocated(self, tid: bytes, lifetime: int = DEFAULT_LIFETIME) -> None:
        self.relayed4 = self.relayed4 or self.b.relayed(RELAY4[0])
        self.relayed6 = self.relayed6 or self.b.relayed(RELAY6[0])
        self.answer(
            Method.ALLOCATE,
            Class.SUCCESS,
            tid,
            [
                (Attr.XOR_RELAYED_ADDRESS, self.relayed4),
                (Attr.XOR_RELAYED_ADDRESS, self.relayed6),
                (Attr.XOR_MAPPED_ADDRESS, self.sock),
                (Attr.LIFETIME, lifetime),
            ],
        )

    def connect(self) -> None:
        """``Allocation::new``: a Binding per family picks the socket, Allocate without NONCE
        gets 401, Allocate with it succeeds (dual-stack through ADDITIONAL-ADDRESS-FAMILY)."""
        self.pick_socket()
        self.challenge(Method.ALLOCATE, self.transport() + self._soft(), "Allocate without NONCE")
        self.allocated(self.allocate_request("Allocate with the NONCE of the 401"))

    def refresh(
        self, note: str = "Refresh at LIFETIME/2", lifetime: int = DEFAULT_LIFETIME
    ) -> None:
        tid = self.request(Method.REFRESH, self.transport() + self._soft(), note, self.b.tid())
        self.answer(Method.REFRESH, Class.SUCCESS, tid, [(Attr.LIFETIME, lifetime)])

    def delete_request(self, note: str) -> bytes:
        attrs = self.transport() + self._soft() + [(Attr.LIFETIME, 0)]
        return self.request(Method.REFRESH, attrs, note, self.b.tid())

    def deleted(self, tid: bytes) -> None:
        self.answer(Method.REFRESH, Class.SUCCESS, tid, [(Attr.LIFETIME, 0)])
        self.relayed4 = self.relayed6 = None

    def bind_request(self, channel: int, peer: Addr, note: str) -> bytes:
        attrs = [(Attr.XOR_PEER_ADDRESS, peer), (Attr.CHANNEL_NUMBER, channel), *self._soft()]
        return self.request(Method.CHANNEL_BIND, attrs, note, self.b.tid())

    def bind(self, channel: int, peer: Addr, note: str = "ChannelBind") -> None:
        tid = self.bind_request(channel, peer, note)
        self.answer(Method.CHANNEL_BIND, Class.SUCCESS, tid, [])

    def relayed_for(self, peer: Addr) -> Addr:
        relayed = self.relayed6 if ":" in peer[0] else self.relayed4
        assert relayed is not None, "no allocation"
        return relayed

    def to_peer(self, channel: int, peer: Addr, payload: bytes, note: str | None = None) -> None:
        self.b.add(self.sock, self.relay, channel_data(channel, payload), note)
        self.b.wait(RTT / 2)
        self.b.add(self.relayed_for(peer), peer, payload)
        self.b.wait(RTT / 2)

    def from_peer(self, channel: int, peer: Addr, payload: bytes, note: str | None = None) -> None:
        self.b.add(peer, self.relayed_for(peer), payload, note)
        self.b.wait(RTT / 2)
        self.b.add(self.relay, self.sock, channel_data(channel, payload))
        self.b.wait(RTT / 2)

    def ping_pong(self, channel: int, peer: Addr, tag: str, rounds: int = 2) -> None:
        for i in range(rounds):
            self.to_peer(channel, peer, _wireguard(f"{tag} out {i}"))
            self.from_peer(channel, peer, _wireguard(f"{tag} back {i}"))

    def keepalives(self, until: float, channel_traffic: tuple[int, Addr] | None = None) -> None:
        """Idle until ``until``: a Binding every 25 s; with ``channel_traffic`` the peer sends
        now and then, as a WireGuard keepalive would (so the channel is in use)."""
        while self.b.t + BINDING_INTERVAL < until:
            self.b.wait(BINDING_INTERVAL)
            self.binding("keepalive Binding (25 s)")
            if channel_traffic is not None:
                self.from_peer(*channel_traffic, _wireguard(f"keepalive {self.b.t:.0f}"))
        self.b.t = round(max(self.b.t, until), 6)


_REASONS = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    437: "Allocation Mismatch",
    438: "Stale Nonce",
    440: "Address Family not Supported",
    441: "Wrong Credentials",
}


def _uuid(name: str, seed: bytes) -> str:
    h = hashlib.sha256(name.encode() + seed).hexdigest()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def _wireguard(tag: str, size: int = 148) -> bytes:
    """Something shaped like a WireGuard message (type 1, reserved zeros), ``size`` bytes."""
    body = hashlib.sha256(tag.encode()).digest() * (size // 32 + 1)
    return (b"\x01\x00\x00\x00" + body)[:size]


CLIENT: Addr = ("127.0.0.2", 52625)
GATEWAY: Addr = ("127.0.0.3", 52626)
CLIENT6: Addr = ("::1", 52627)  # connlib's IPv6 socket
GATEWAY6: Addr = ("::1", 52629)
PEER: Addr = ("127.0.0.4", 51820)
PEER2: Addr = ("127.0.0.4", 51821)
PEER6: Addr = ("::1", 51822)


# --- the traces --------------------------------------------------------------------------


def connlib_allocate() -> Builder:
    b = Builder(
        "connlib_allocate",
        "connlib's allocation on a dual-stack relay: a Binding from each family's socket; the "
        "IPv4 answer comes first and picks the socket, connlib sends its Allocate from it "
        "before the IPv6 answer arrives (ignored); Allocate without NONCE -> signed 401, "
        "Allocate with the "
        "NONCE -> both relayed addresses and LIFETIME 600; keepalive Bindings every 25 s; "
        "Refresh at 300 s (LIFETIME/2) with the same attributes as Allocate; a lost Refresh "
        "answer: connlib re-sends after 1 s with a new transaction id (a new request, not a "
        "retransmission) and the relay refreshes again; on shutdown Refresh LIFETIME 0.",
        [
            _origin(
                ALLOCATION_RS,
                "Allocation::new",
                "Allocation::send_binding_requests",
                "Allocation::handle_input",
                "Allocation::handle_timeout",
                "Allocation::refresh_allocation_at",
                "request::MessagePrototype::allocate/refresh/delete_allocation/authenticate",
                "request::transport_attributes",
                "ActiveSocket::handle_timeout (BINDING_INTERVAL)",
            ),
            _origin(BACKOFF_RS, "new", "ExponentialBackoff::handle_timeout"),
        ],
    )
    c = Connlib(b, "client", CLIENT, "connlib-allocate", sock6=CLIENT6)
    c.connect()
    c.keepalives(300.0)
    c.refresh()
    c.keepalives(600.0)
    tid = c.request(
        Method.REFRESH, c.transport() + c._soft(), "Refresh at 600 s; its answer is lost", b.tid()
    )
    c.answer(Method.REFRESH, Class.SUCCESS, tid, [(Attr.LIFETIME, DEFAULT_LIFETIME)])
    b.wait(REQUEST_TIMEOUT - RTT)
    c.refresh("Refresh again after REQUEST_TIMEOUT, new transaction id")
    b.wait(30)
    c.deleted(c.delete_request("Refresh LIFETIME 0 on shutdown"))
    return b


def connlib_channels() -> Builder:
    b = Builder(
        "connlib_channels",
        "connlib's channels: ChannelBind 0x4000 to an IPv4 peer and 0x4001 to an IPv6 peer "
        "(numbers in order from 0x4000), data sent optimistically right behind the bind, "
        "WireGuard traffic both ways; at 300 s after binding the channel that received data "
        "is refreshed (same number, same peer) and the idle one is not; the idle channel "
        "expires at 600 s and its peer's data is dropped; connlib re-binds the same number "
        "to the same peer inside the 5-minute cooldown (bound_channel_to_peer) and that "
        "succeeds; the allocation is refreshed every 300 s throughout.",
        [
            _origin(
                ALLOCATION_RS,
                "Allocation::bind_channel",
                "Allocation::encode_channel_data_header",
                "ChannelBindings::new_channel_to_peer",
                "ChannelBindings::channels_to_refresh",
                "Channel::needs_refresh / bound_to_peer / can_rebind",
                "request::MessagePrototype::channel_bind",
            )
        ],
    )
    b.role("peer", PEER)
    b.role("peer", PEER6)
    c = Connlib(b, "client", CLIENT, "connlib-channels", sock6=CLIENT6)
    c.connect()
    b.wait(1)
    c.bind(0x4000, PEER, "ChannelBind 0x4000 (IPv4 peer)")
    c.ping_pong(0x4000, PEER, "v4")
    c.bind(0x4001, PEER6, "ChannelBind 0x4001 (IPv6 peer)")
    c.to_peer(0x4001, PEER6, _wireguard("v6 handshake"), "one datagram to the IPv6 peer")
    bound = b.t
    c.keepalives(300.0 - 1, channel_traffic=(0x4000, PEER))
    c.refresh()
    b.t = round(bound + 300.0 + 1, 6)
    c.bind(0x4000, PEER, "channel refresh: 0x4000 received data, 5 min after binding")
    c.ping_pong(0x4000, PEER, "after channel refresh", 1)
    c.keepalives(bound + CHANNEL_LIFETIME + 40, channel_traffic=(0x4000, PEER))
    b.add(PEER6, c.relayed_for(PEER6), _wireguard("late v6"), "0x4001 expired: dropped")
    c.refresh()
    b.wait(5)
    c.bind(0x4001, PEER6, "re-bind 0x4001 to the same peer during the cooldown")
    c.from_peer(0x4001, PEER6, _wireguard("v6 again"))
    c.to_peer(0x4000, PEER, _wireguard("0x4000 still bound"))
    return b


def connlib_resync_allocate() -> Builder:
    b = Builder(
        "connlib_resync_allocate",
        "437 re-sync for Allocate: the Allocate answer is lost, connlib sends Allocate again "
        "after 1 s with a new transaction id and gets 437; it deletes with Refresh LIFETIME 0 "
        "and, on the LIFETIME 0 answer, allocates again.",
        [
            _origin(
                ALLOCATION_RS,
                "Allocation::handle_input (AllocationMismatch, ALLOCATE)",
                "Allocation::handle_input (REFRESH with LIFETIME 0)",
                "Allocation::handle_timeout (re-send through authenticate_and_queue)",
            ),
            _origin(BACKOFF_RS, "new"),
        ],
    )
    b.role("peer", PEER)
    c = Connlib(b, "client", CLIENT, "connlib-resync-allocate", sock6=CLIENT6)
    c.pick_socket()
    c.challenge(Method.ALLOCATE, c.transport() + c._soft(), "Allocate without NONCE")
    c.allocated(c.allocate_request("Allocate; its answer is lost"))
    b.wait(REQUEST_TIMEOUT - RTT)
    tid = c.allocate_request("Allocate again after 1 s: a new transaction")
    c.error(Method.ALLOCATE, tid, 437)
    c.deleted(c.delete_request("437 to Allocate: delete to re-sync"))
    c.allocated(c.allocate_request("LIFETIME 0 answer: allocate again"))
    c.bind(0x4000, PEER)
    c.ping_pong(0x4000, PEER, "after re-sync")
    return b


def connlib_resync_refresh() -> Builder:
    b = Builder(
        "connlib_resync_refresh",
        "437 re-sync for Refresh: the host sleeps for 20 minutes (connlib's Instant clock does "
        "not advance during suspend), the relay expires the allocation at 600 s, connlib's "
        "Refresh after waking gets 437 and it allocates again with the nonce it has; the new "
        "allocation relays.",
        [
            _origin(
                ALLOCATION_RS,
                "Allocation::handle_input (AllocationMismatch, REFRESH)",
                "Allocation::refresh_allocation_at",
            )
        ],
    )
    b.role("peer", PEER)
    c = Connlib(b, "client", CLIENT, "connlib-resync-refresh", sock6=CLIENT6)
    c.connect()
    b.wait(1)
    c.bind(0x4000, PEER)
    c.ping_pong(0x4000, PEER, "before sleep", 1)
    b.wait(1200)
    tid = c.request(Method.REFRESH, c.transport() + c._soft(), "Refresh after waking", b.tid())
    c.error(Method.REFRESH, tid, 437)
    c.relayed4 = c.relayed6 = None
    c.allocated(c.allocate_request("437 to Refresh: allocate again"))
    c.bind(0x4000, PEER, "ChannelBind on the new allocation")
    c.ping_pong(0x4000, PEER, "after re-sync")
    return b


def connlib_resync_channel_bind() -> Builder:
    b = Builder(
        "connlib_resync_channel_bind",
        "437 re-sync for ChannelBind: after a 20-minute suspend the first request is a "
        "ChannelBind for a new peer; 437, connlib allocates again and binds the buffered peer "
        "with its next channel number (the numbering is not reset).",
        [
            _origin(
                ALLOCATION_RS,
                "Allocation::handle_input (AllocationMismatch, CHANNEL_BIND)",
                "Allocation::invalidate_allocation",
                "ChannelBindings::clear / next_channel_number",
            )
        ],
    )
    b.role("peer", PEER)
    b.role("peer", PEER2)
    c = Connlib(b, "client", CLIENT, "connlib-resync-bind", sock6=CLIENT6)
    c.connect()
    b.wait(1)
    c.bind(0x4000, PEER)
    c.ping_pong(0x4000, PEER, "before sleep", 1)
    b.wait(1200)
    tid = c.bind_request(0x4001, PEER2, "ChannelBind after waking")
    c.error(Method.CHANNEL_BIND, tid, 437)
    c.relayed4 = c.relayed6 = None
    c.allocated(c.allocate_request("437 to ChannelBind: allocate again"))
    c.bind(0x4002, PEER2, "the buffered peer, next channel number")
    c.ping_pong(0x4002, PEER2, "after re-sync")
    return b


def connlib_bad_credentials() -> Builder:
    b = Builder(
        "connlib_bad_credentials",
        "connlib with credentials the relay does not accept (expired): Allocate without NONCE "
        "-> 401 with a NONCE, Allocate with it -> 401 again; a 401 to a request that carried a "
        "NONCE means invalid credentials, so connlib drops them and sends nothing more.",
        [
            _origin(
                ALLOCATION_RS,
                "Allocation::handle_input (Unauthorized with a NONCE in the request)",
                "Allocation::can_be_freed (AuthenticationError)",
            )
        ],
    )
    c = Connlib(b, "client", CLIENT, "connlib-expired", sock6=CLIENT6)
    b.credentials[c.username] = {"user": c.user, "expired": True}
    c.pick_socket()
    c.challenge(Method.ALLOCATE, c.transport() + c._soft(), "Allocate without NONCE")
    tid = c.allocate_request("Allocate with the NONCE: still 401, connlib gives up")
    c.error(Method.ALLOCATE, tid, 401, (Attr.REALM, REALM), (Attr.NONCE, c.nonce))
    return b


def connlib_rotation() -> Builder:
    b = Builder(
        "connlib_rotation",
        "Credential rotation: the portal hands connlib new credentials for the same relay; "
        "connlib replaces its Allocation and, from the same socket, Binding, Allocate without "
        "NONCE (401), Allocate with the new credentials -> 437, Refresh LIFETIME 0 with the "
        "new credentials -> must delete the old allocation (LIFETIME 0; not 441), Allocate -> "
        "success; relaying works on the new allocation.",
        [
            _origin(ALLOCATIONS_RS, "Allocations::upsert (UpsertResult::Replaced)"),
            _origin(
                ALLOCATION_RS,
                "Allocation::new",
                "Allocation::handle_input (AllocationMismatch, ALLOCATE; REFRESH LIFETIME 0)",
            ),
        ],
        needs="rotation",
    )
    b.role("peer", PEER)
    old = Connlib(b, "client", CLIENT, "connlib-rotation-a", sock6=CLIENT6)
    old.connect()
    b.wait(1)
    old.bind(0x4000, PEER)
    old.ping_pong(0x4000, PEER, "old credentials", 1)
    b.wait(120)
    new = Connlib(b, "client", CLIENT, "connlib-rotation-b", sock6=CLIENT6)
    new.pick_socket()  # a new Allocation picks its socket again
    new.challenge(Method.ALLOCATE, new.transport() + new._soft(), "new credentials, no NONCE")
    tid = new.allocate_request("Allocate with the new credentials")
    new.error(Method.ALLOCATE, tid, 437)
    new.deleted(new.delete_request("437: delete with the new credentials (rotation)"))
    new.allocated(new.allocate_request("LIFETIME 0 answer: allocate again"))
    new.bind(0x4000, PEER, "ChannelBind on the new allocation")
    new.ping_pong(0x4000, PEER, "new credentials")
    return b


PAIR_DESCRIPTION = (
    "Relay-to-relay, {side}'s half: the client allocates on relay A and the gateway on relay "
    "B; each binds a channel to the other's relayed address (a relay candidate pair), so ICE "
    "checks and WireGuard cross both relays. This is relay {relay}'s view; the other relay's "
    "allocation is the peer role ({peer}). The same datagrams are in the other half."
)


def _pair(side: str) -> Builder:
    client_side = side == "client"
    b = Builder(
        f"connlib_relay_pair_{side}",
        PAIR_DESCRIPTION.format(
            side=side, relay="A" if client_side else "B", peer="127.0.0.6:49160"
        ),
        [
            _origin(
                ALLOCATION_RS,
                "Allocation::bind_channel",
                "Allocation::encode_channel_data_header",
                "Allocation::decapsulate",
            ),
            _origin(ALLOCATIONS_RS, "Allocations::candidates_for_relay"),
        ],
    )
    other_relayed: Addr = ("127.0.0.6", 49160)
    b.role("remote_relay", other_relayed)
    me = Connlib(
        b,
        side,
        CLIENT if client_side else GATEWAY,
        f"connlib-pair-{side}",
        sock6=CLIENT6 if client_side else GATEWAY6,
    )
    me.connect()
    b.wait(0.5)
    me.bind(0x4000, other_relayed, "ChannelBind to the other relay's allocation")
    check = _ice_check(client_side)
    answer = _ice_check(not client_side)
    if client_side:
        me.to_peer(0x4000, other_relayed, check, "ICE check through both relays")
        me.from_peer(0x4000, other_relayed, answer)
    else:
        me.from_peer(0x4000, other_relayed, check, "ICE check from the other relay")
        me.to_peer(0x4000, other_relayed, answer)
    for i in range(3):
        if client_side:
            me.to_peer(0x4000, other_relayed, _wireguard(f"pair {i}", 148))
            me.from_peer(0x4000, other_relayed, _wireguard(f"pair reply {i}", 92))
        else:
            me.from_peer(0x4000, other_relayed, _wireguard(f"pair {i}", 148))
            me.to_peer(0x4000, other_relayed, _wireguard(f"pair reply {i}", 92))
    return b


def _ice_check(controlling: bool) -> bytes:
    """A STUN Binding as str0m sends it for an ICE check, inside the channel."""
    tid = hashlib.sha256(b"ice" + bytes([controlling])).digest()[:12]
    attrs: list[tuple[int, Any]] = [
        (Attr.USERNAME, "rfrag:lfrag"),
        (Attr.ICE_CONTROLLING if controlling else Attr.ICE_CONTROLLED, 1),
        (Attr.PRIORITY, 1853824767),
    ]
    return stun.encode(Method.BINDING, Class.REQUEST, tid, attrs, integrity_key=b"ice-pwd")


def connlib_relay_pair_client() -> Builder:
    return _pair("client")


def connlib_relay_pair_gateway() -> Builder:
    return _pair("gateway")


def firezone_relay_regression() -> Builder:
    b = Builder(
        "firezone_relay_regression",
        "The Firezone relay's regression tests as one trace, requests built as those tests "
        "build them (no REALM, no SOFTWARE; the authenticated Allocate re-uses the 401's "
        "transaction id): Binding; unauthenticated Allocate with LIFETIME -> 401; the same "
        "transaction authenticated -> success; Refresh in time; ChannelBind and ping-pong; "
        "Refresh LIFETIME 0 deletes and frees the channels; the IPv6 ping-pong with "
        "REQUESTED-ADDRESS-FAMILY IPv6.",
        [
            _origin(
                REGRESSION_RS,
                "can_answer_stun_request_from_ip4_address",
                "unauthenticated_allocate_triggers_authentication",
                "when_refreshed_in_time_allocation_does_not_expire",
                "ping_pong_relay",
                "when_receiving_lifetime_0_for_existing_allocation_then_delete",
                "freeing_allocation_clears_all_channels",
                "ping_pong_ip6_relay",
                "binding_response / allocate_response / refresh_response",
            ),
            _origin(
                CLIENT_MESSAGE_RS,
                "Allocate::new_unauthenticated_udp",
                "Allocate::make_attributes",
                "Refresh::new",
                "ChannelBind::new",
            ),
        ],
    )
    b.role("peer", PEER)
    b.role("peer", PEER6)
    c = Connlib(b, "client", CLIENT, "fz-regression", with_realm=False, software=False)
    c.binding("Binding without attributes")
    tid = b.tid()
    data = stun.encode(
        Method.ALLOCATE,
        Class.REQUEST,
        tid,
        [(Attr.REQUESTED_TRANSPORT, 17), (Attr.LIFETIME, 1800)],
    )
    b.add(c.sock, c.relay, data, "unauthenticated Allocate")
    c.nonce = _uuid(b.name, tid)
    c.error(Method.ALLOCATE, tid, 401, (Attr.REALM, REALM), (Attr.NONCE, c.nonce))
    # the 401 above is unsigned: the request carried no USERNAME
    b.frames[-1] = Frame(
        b.frames[-1].t,
        c.relay,
        c.sock,
        stun.encode(
            Method.ALLOCATE,
            Class.ERROR,
            tid,
            [
                (Attr.SOFTWARE, RELAY_SOFTWARE),
                (Attr.ERROR_CODE, (401, "Unauthorized")),
                (Attr.REALM, REALM),
                (Attr.NONCE, c.nonce),
            ],
        ),
    )
    attrs = [(Attr.REQUESTED_TRANSPORT, 17), (Attr.USERNAME, c.username), (Attr.NONCE, c.nonce)]
    data = stun.encode(
        Method.ALLOCATE,
        Class.REQUEST,
        tid,
        [*attrs, (Attr.LIFETIME, 1800)],
        integrity_key=c.key,
    )
    b.add(c.sock, c.relay, data, "the same transaction, authenticated")
    c.relayed4 = b.relayed(RELAY4[0])
    c.answer(
        Method.ALLOCATE,
        Class.SUCCESS,
        tid,
        [
            (Attr.XOR_RELAYED_ADDRESS, c.relayed4),
            (Attr.XOR_MAPPED_ADDRESS, c.sock),
            (Attr.LIFETIME, 1800),
        ],
    )
    b.wait(900)
    tid = b.tid()
    data = _fz_signed(c, Method.REFRESH, tid, [(Attr.LIFETIME, 1200)])
    b.add(c.sock, c.relay, data, "Refresh at half the lifetime")
    c.answer(Method.REFRESH, Class.SUCCESS, tid, [(Attr.LIFETIME, 1200)])
    b.wait(1)
    tid = b.tid()
    data = _fz_signed(
        c, Method.CHANNEL_BIND, tid, [(Attr.CHANNEL_NUMBER, 0x4123), (Attr.XOR_PEER_ADDRESS, PEER)]
    )
    b.add(c.sock, c.relay, data, "ChannelBind as ChannelBind::new builds it")
    c.answer(Method.CHANNEL_BIND, Class.SUCCESS, tid, [])
    b.wait(1)
    c.ping_pong(0x4123, PEER, "ping pong")
    tid = b.tid()
    b.add(c.sock, c.relay, _fz_signed(c, Method.REFRESH, tid, [(Attr.LIFETIME, 0)]), "Refresh 0")
    c.answer(Method.REFRESH, Class.SUCCESS, tid, [(Attr.LIFETIME, 0)])
    b.add(c.sock, c.relay, channel_data(0x4123, b"after delete"), "channels cleared: dropped")
    b.wait(1)
    # ping_pong_ip6_relay
    c6 = Connlib(b, "client", ("::1", 52628), "fz-regression-6", relay=RELAY6)
    c6.with_realm = c6.software = False
    c6.nonce = None
    tid = b.tid()
    data = stun.encode(Method.ALLOCATE, Class.REQUEST, tid, [(Attr.REQUESTED_TRANSPORT, 17)])
    b.add(c6.sock, c6.relay, data, "IPv6: unauthenticated Allocate")
    c6.nonce = _uuid(b.name, tid)
    b.wait(RTT / 2)
    b.add(
        c6.relay,
        c6.sock,
        stun.encode(
            Method.ALLOCATE,
            Class.ERROR,
            tid,
            [
                (Attr.SOFTWARE, RELAY_SOFTWARE),
                (Attr.ERROR_CODE, (401, "Unauthorized")),
                (Attr.REALM, REALM),
                (Attr.NONCE, c6.nonce),
            ],
        ),
    )
    b.wait(RTT / 2)
    tid = b.tid()
    attrs = [
        (Attr.REQUESTED_TRANSPORT, 17),
        (Attr.USERNAME, c6.username),
        (Attr.NONCE, c6.nonce),
        (Attr.REQUESTED_ADDRESS_FAMILY, Family.V6),
        (Attr.LIFETIME, 3600),
    ]
    data = stun.encode(Method.ALLOCATE, Class.REQUEST, tid, attrs, integrity_key=c6.key)
    b.add(c6.sock, c6.relay, data, "Allocate::new_authenticated_udp_ip6")
    c6.relayed6 = b.relayed(RELAY6[0])
    c6.answer(
        Method.ALLOCATE,
        Class.SUCCESS,
        tid,
        [
            (Attr.XOR_RELAYED_ADDRESS, c6.relayed6),
            (Attr.XOR_MAPPED_ADDRESS, c6.sock),
            (Attr.LIFETIME, 3600),
        ],
    )
    b.wait(1)
    tid = b.tid()
    data = _fz_signed(
        c6,
        Method.CHANNEL_BIND,
        tid,
        [(Attr.CHANNEL_NUMBER, 0x4001), (Attr.XOR_PEER_ADDRESS, PEER6)],
    )
    b.add(c6.sock, c6.relay, data, "IPv6 ChannelBind")
    c6.answer(Method.CHANNEL_BIND, Class.SUCCESS, tid, [])
    c6.ping_pong(0x4001, PEER6, "ip6 ping pong")
    return b


def _fz_signed(c: Connlib, method: int, tid: bytes, attrs: list[tuple[int, Any]]) -> bytes:
    """Refresh::new / ChannelBind::new: USERNAME first, then the method's attributes and
    NONCE (ChannelBind: USERNAME, CHANNEL-NUMBER, XOR-PEER-ADDRESS, NONCE), then the MAC."""
    assert c.nonce is not None
    if method == Method.REFRESH:
        ordered = [(Attr.USERNAME, c.username), (Attr.NONCE, c.nonce), *attrs]
    else:
        ordered = [(Attr.USERNAME, c.username), *attrs, (Attr.NONCE, c.nonce)]
    return stun.encode(method, Class.REQUEST, tid, ordered, integrity_key=c.key)


def firezone_relay_rebind_after_expiry() -> Builder:
    b = Builder(
        "firezone_relay_rebind_after_expiry",
        "allows_rebind_channel_after_expiry: a channel bound at 1 s expires at 10 min; "
        "during the next 5 minutes its number cannot go to another peer (400); after them "
        "the same number binds to another peer.",
        [
            _origin(REGRESSION_RS, "allows_rebind_channel_after_expiry"),
            _origin(SERVER_RS, "Channel::is_expired / can_be_deleted"),
        ],
    )
    b.role("peer", PEER)
    b.role("peer", PEER2)
    c = Connlib(b, "client", CLIENT, "fz-rebind", with_realm=False, software=False)
    c.challenge(Method.ALLOCATE, [(Attr.REQUESTED_TRANSPORT, 17)], "Allocate without NONCE")
    tid = b.tid()
    attrs = [
        (Attr.REQUESTED_TRANSPORT, 17),
        (Attr.USERNAME, c.username),
        (Attr.NONCE, c.nonce),
        (Attr.LIFETIME, 3600),
    ]
    b.add(
        c.sock,
        c.relay,
        stun.encode(Method.ALLOCATE, Class.REQUEST, tid, attrs, integrity_key=c.key),
    )
    c.relayed4 = b.relayed(RELAY4[0])
    c.answer(
        Method.ALLOCATE,
        Class.SUCCESS,
        tid,
        [
            (Attr.XOR_RELAYED_ADDRESS, c.relayed4),
            (Attr.XOR_MAPPED_ADDRESS, c.sock),
            (Attr.LIFETIME, 3600),
        ],
    )
    b.wait(1)
    tid = b.tid()
    attrs = [(Attr.CHANNEL_NUMBER, 0x4000), (Attr.XOR_PEER_ADDRESS, PEER)]
    b.add(c.sock, c.relay, _fz_signed(c, Method.CHANNEL_BIND, tid, attrs), "ChannelBind")
    c.answer(Method.CHANNEL_BIND, Class.SUCCESS, tid, [])
    c.ping_pong(0x4000, PEER, "bound", 1)
    b.wait(CHANNEL_LIFETIME + 60)
    tid = b.tid()
    attrs = [(Attr.CHANNEL_NUMBER, 0x4000), (Attr.XOR_PEER_ADDRESS, PEER2)]
    b.add(c.sock, c.relay, _fz_signed(c, Method.CHANNEL_BIND, tid, attrs), "during cooldown")
    c.error(Method.CHANNEL_BIND, tid, 400)
    b.wait(CHANNEL_REBIND_TIMEOUT)
    tid = b.tid()
    b.add(c.sock, c.relay, _fz_signed(c, Method.CHANNEL_BIND, tid, attrs), "after cooldown")
    c.answer(Method.CHANNEL_BIND, Class.SUCCESS, tid, [])
    c.ping_pong(0x4000, PEER2, "rebound", 1)
    return b


def firezone_relay_address_families() -> Builder:
    b = Builder(
        "firezone_relay_address_families",
        "The address-family rules of Firezone's server.rs unit tests on an IPv4-only relay: "
        "REQUESTED- and ADDITIONAL-ADDRESS-FAMILY together -> 400; ADDITIONAL IPv4 -> 400; "
        "REQUESTED IPv6 -> 440; ADDITIONAL IPv6 (connlib's Allocate) -> an IPv4 allocation "
        "with ADDRESS-ERROR-CODE 440 for the IPv6 half, which only this relay sends "
        "(Firezone's relay answers without it; see `ours`).",
        [
            _origin(
                SERVER_RS,
                "derive_relay_addresses",
                "tests::requested_and_additional_is_bad_request",
                "tests::requested_address_family_not_available_is_not_supported",
                "tests::additional_address_family_ip4_is_bad_request",
            )
        ],
        relay={"auth": "standalone", "ip4": RELAY4[0]},
        ours=[
            "ADDRESS-ERROR-CODE (IPv6, 440) in the answer to connlib's Allocate on an IPv4-only "
            "relay: Firezone's relay allocates IPv4 and says nothing about IPv6"
        ],
    )
    c = Connlib(b, "client", CLIENT, "fz-families")
    c.challenge(Method.ALLOCATE, c.transport() + c._soft(), "Allocate without NONCE")
    cases: list[tuple[list[tuple[int, Any]], int, str]] = [
        (
            [
                (Attr.REQUESTED_TRANSPORT, 17),
                (Attr.REQUESTED_ADDRESS_FAMILY, Family.V4),
                (Attr.ADDITIONAL_ADDRESS_FAMILY, Family.V6),
            ],
            400,
            "REQUESTED and ADDITIONAL together",
        ),
        (
            [(Attr.REQUESTED_TRANSPORT, 17), (Attr.ADDITIONAL_ADDRESS_FAMILY, Family.V4)],
            400,
            "ADDITIONAL IPv4",
        ),
        (
            [(Attr.REQUESTED_TRANSPORT, 17), (Attr.REQUESTED_ADDRESS_FAMILY, Family.V6)],
            440,
            "REQUESTED IPv6 on an IPv4-only relay",
        ),
    ]
    for attrs, code, note in cases:
        tid = c.request(Method.ALLOCATE, attrs, note, b.tid())
        c.error(Method.ALLOCATE, tid, code)
    tid = c.allocate_request("connlib's Allocate on an IPv4-only relay")
    c.relayed4 = b.relayed(RELAY4[0])
    c.answer(
        Method.ALLOCATE,
        Class.SUCCESS,
        tid,
        [
            (Attr.XOR_RELAYED_ADDRESS, c.relayed4),
            (Attr.XOR_MAPPED_ADDRESS, c.sock),
            (Attr.LIFETIME, DEFAULT_LIFETIME),
            (Attr.ADDRESS_ERROR_CODE, (Family.V6, 440, "Address Family not Supported")),
        ],
    )
    b.notes[str(len(b.frames))] = {
        "note": "ADDRESS-ERROR-CODE is ours (RFC 8656 §7.1); Firezone's relay omits it"
    }
    return b


def ours_lab_peer_rules() -> Builder:
    b = Builder(
        "ours_lab_peer_rules",
        "Our peer rules, not Firezone's (its relay refuses no peer address): a relay "
        "configured for Firezone's compose lab, whose internet is 203.0.113.0/24 "
        "(--allowed-peer-ip 203.0.113.0/24): ChannelBind to a gateway on 203.0.113.0/24 "
        "(TEST-NET-3) succeeds; another documentation range (198.51.100.0/24) stays refused "
        "with 403.",
        [_origin(COMPOSE_YML, "networks: internet (203.0.113.0/24)")],
        relay=_relay(
            args=["--time-scale", f"{1 / SPEED:g}", "--allowed-peer-ip", "203.0.113.0/24"]
        ),
        needs="allow-list",
        ours=["the 403 to a peer on 198.51.100.0/24: Firezone's relay binds any peer"],
    )
    c = Connlib(b, "client", CLIENT, "fz-lab-rules", sock6=CLIENT6)
    c.connect()
    c.bind(0x4000, ("203.0.113.20", 51820), "ChannelBind to the lab's gateway NAT")
    tid = c.bind_request(0x4001, ("198.51.100.7", 51820), "ChannelBind to TEST-NET-2")
    c.error(Method.CHANNEL_BIND, tid, 403)
    return b


STALE_NONCE_SPEED = 150.0  # an hour of connlib's time in 25 s of replay


def connlib_stale_nonce_438() -> Builder:
    b = Builder(
        "connlib_stale_nonce_438",
        "connlib's stale-nonce path: the NONCE of the first 401 signs every request for an "
        "hour (keepalives every 25 s, Refresh every 300 s); the host then suspends for 7 "
        "minutes (connlib's clock stops, the allocation refreshed at 3300 s lives until "
        "3900 s), and on waking connlib binds a channel for a new remote candidate with the "
        "nonce it has, now past the relay's hour: 438 Stale Nonce, signed, with a new NONCE; "
        "connlib re-signs the same ChannelBind with it (a new transaction) and that succeeds; "
        "data flows; on shutdown Refresh LIFETIME 0 with the new NONCE.",
        [
            _origin(
                ALLOCATION_RS,
                "Allocation::handle_input (Unauthorized or StaleNonce: take the new Nonce, "
                "authenticate_and_queue the original request)",
                "Allocation::authenticate_and_queue",
                "tests::upon_stale_nonce_reauthorizes_using_new_nonce",
                "Allocation::bind_channel",
            ),
            _origin(SERVER_RS, "Server::verify_auth (StaleNonce)"),
        ],
        relay=_relay(STALE_NONCE_SPEED),
        speed=STALE_NONCE_SPEED,
        ours=[
            "the 438 itself: our nonces go stale after an hour; Firezone's relay counts "
            "10,000 requests per nonce (Nonces::NUM_REQUESTS in rust/relay/proto/src/auth.rs) "
            "and would accept this ChannelBind; connlib handles a 438 the same either way"
        ],
    )
    b.role("peer", PEER)
    c = Connlib(b, "client", CLIENT, "connlib-stale-nonce", sock6=CLIENT6)
    c.connect()
    refreshed = b.t
    while refreshed + 300 < NONCE_LIFETIME - 200:
        c.keepalives(refreshed + 300)
        c.refresh()
        refreshed = b.t
    b.wait(10)
    b.wait(7 * 60)  # suspended: nothing is sent, the relay's clock goes on
    stale = c.nonce
    tid = c.bind_request(0x4000, PEER, "after waking: ChannelBind with the hour-old NONCE")
    c.nonce = _uuid(b.name, tid)
    assert c.nonce != stale
    c.error(Method.CHANNEL_BIND, tid, 438, (Attr.REALM, REALM), (Attr.NONCE, c.nonce))
    c.bind(0x4000, PEER, "the same ChannelBind re-signed with the new NONCE")
    c.ping_pong(0x4000, PEER, "after 438")
    c.deleted(c.delete_request("Refresh LIFETIME 0 on shutdown, new NONCE"))
    return b


BUILDERS: dict[str, Callable[[], Builder]] = {
    f.__name__: f
    for f in (
        connlib_allocate,
        connlib_channels,
        connlib_resync_allocate,
        connlib_resync_refresh,
        connlib_resync_channel_bind,
        connlib_rotation,
        connlib_bad_credentials,
        connlib_relay_pair_client,
        connlib_relay_pair_gateway,
        firezone_relay_regression,
        firezone_relay_rebind_after_expiry,
        firezone_relay_address_families,
        ours_lab_peer_rules,
        connlib_stale_nonce_438,
    )
}


def cited_sources() -> dict[str, list[str]]:
    """Every Firezone file the traces cite, with the names cited from it."""
    cited: dict[str, list[str]] = {}
    for build in BUILDERS.values():
        for origin in build().derived_from:
            cited.setdefault(origin["path"], []).extend(origin["functions"])
    return cited


def _names(function: str) -> list[str]:
    """The identifiers a cited function stands on: ``Allocation::handle_input (...)`` ->
    ``Allocation``, ``handle_input``; ``a / b`` and ``x/y`` name several."""
    head = function.split(" (")[0]
    return [n for n in re.split(r"::|[./, ]+|:", head) if n and n[0].isalpha()]


def verify_sources(checkout: Path) -> list[str]:
    """Problems with the citations against a firezone/firezone clone: a file missing at
    FIREZONE_COMMIT, a name not in it, or SOURCES.json not listing that file's blob."""
    manifest = json.loads(SOURCES.read_text())
    problems = []
    if manifest["commit"] != FIREZONE_COMMIT:
        problems.append(f"SOURCES.json is for {manifest['commit']}, not {FIREZONE_COMMIT}")
    for path, functions in sorted(cited_sources().items()):
        spec = f"{FIREZONE_COMMIT}:{path}"
        git = ["git", "-C", str(checkout)]
        shown = subprocess.run([*git, "show", spec], capture_output=True, text=True)
        if shown.returncode != 0:
            problems.append(f"{path}: not in firezone/firezone at {FIREZONE_COMMIT}")
            continue
        blob = subprocess.run([*git, "rev-parse", spec], capture_output=True, text=True)
        if manifest["files"].get(path) != blob.stdout.strip():
            problems.append(f"{path}: SOURCES.json has no blob {blob.stdout.strip()}")
        for function in functions:
            for name in _names(function):
                if not re.search(rf"\b{re.escape(name)}\b", shown.stdout):
                    problems.append(f"{path}: {name!r} (from {function!r}) not found")
    return problems


def write_sources(checkout: Path) -> None:
    """SOURCES.json: the commit and the blob of every cited file at it."""
    files = {}
    for path in sorted(cited_sources()):
        spec = f"{FIREZONE_COMMIT}:{path}"
        blob = subprocess.run(
            ["git", "-C", str(checkout), "rev-parse", spec],
            capture_output=True,
            text=True,
            check=True,
        )
        files[path] = blob.stdout.strip()
    data = {"repo": REPO, "commit": FIREZONE_COMMIT, "files": files}
    SOURCES.write_text(json.dumps(data, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.traces.connlib",
        description="Write the traces built from Firezone's code.",
    )
    parser.add_argument("names", nargs="*", help=f"default all: {', '.join(BUILDERS)}")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument(
        "--verify-sources",
        type=Path,
        metavar="CLONE",
        help="check every citation against a firezone/firezone clone (and rewrite "
        "SOURCES.json with --write-sources) instead of writing traces",
    )
    parser.add_argument("--write-sources", action="store_true")
    args = parser.parse_args(argv)
    if args.verify_sources is not None:
        if args.write_sources:
            write_sources(args.verify_sources)
        problems = verify_sources(args.verify_sources)
        print("\n".join(problems) or f"every citation holds at {FIREZONE_COMMIT}")
        return 1 if problems else 0
    for name in args.names or list(BUILDERS):
        path = BUILDERS[name]().save(args.out)
        print(f"{path}: {len(tracefile.read_pcap(path))} frames")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
