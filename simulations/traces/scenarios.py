"""The scenarios behind the traces in simulations/traces/data/: live runs of TurnClient
against the daemon, recorded with ``python -m simulations.traces.record NAME`` (see
``record.py``).

Each scenario asserts what the relay answers while it records, so a trace is only written
when the live relay behaved; the replayer then holds every later relay to the same answers.
Roles live on their own loopback addresses (client 127.0.0.2, gateway 127.0.0.3, peer
127.0.0.4, anyone else 127.0.0.5; ::1 with distinct ports for IPv6), the relay on 127.0.0.1
and ::1.
"""

from __future__ import annotations

import asyncio
import struct
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from firezone_relay.protocol import stun
from firezone_relay.protocol.stun import Attr, Class, Message, Method
from firezone_relay.protocol.types import Addr, Family
from simulations.channel_data import encode as channel_data
from simulations.traces.record import (
    Endpoint,
    Scenario,
    ScenarioError,
    Session,
    expect_channel_data,
    expect_datagram,
    expect_error,
    expect_success,
)
from simulations.turn_client import TurnClient

PORTAL_DUAL = {"auth": "portal", "ip4": "127.0.0.1", "ip6": "::1"}
STANDALONE = {"auth": "standalone", "ip4": "127.0.0.1"}
STANDALONE_DUAL = {"auth": "standalone", "ip4": "127.0.0.1", "ip6": "::1"}

SCENARIOS: dict[str, Scenario] = {}


def scenario(
    name: str, description: str, relay: dict[str, Any], **kwargs: Any
) -> Callable[[Callable[[Session], Awaitable[None]]], Callable[[Session], Awaitable[None]]]:
    def register(
        func: Callable[[Session], Awaitable[None]],
    ) -> Callable[[Session], Awaitable[None]]:
        SCENARIOS[name] = Scenario(name, func, description, relay, **kwargs)
        return func

    return register


# --- helpers ----------------------------------------------------------------------------------


def relayed(response: Message, family: Family = Family.V4) -> Addr:
    for addr in response.get_all(Attr.XOR_RELAYED_ADDRESS):
        if Family.of(addr[0]) == family:
            return addr  # type: ignore[no-any-return]
    raise ScenarioError(f"no {family.name} relayed address in the Allocate response")


def connlib_refresh(tc: TurnClient, lifetime: int | None = None) -> bytes:
    """Refresh as connlib sends it: with REQUESTED-TRANSPORT and ADDITIONAL-ADDRESS-FAMILY."""
    attrs: list[tuple[int, object]] = [
        (Attr.REQUESTED_TRANSPORT, 17),
        (Attr.ADDITIONAL_ADDRESS_FAMILY, Family.V6),
    ]
    if lifetime is not None:
        attrs.append((Attr.LIFETIME, lifetime))
    return tc.request(Method.REFRESH, attrs)


async def bind(ep: Endpoint, tc: TurnClient, channel: int, peer: Addr, note: str = "") -> None:
    response = await ep.request(
        tc.channel_bind(channel, peer), note=note or f"ChannelBind {channel:#x}"
    )
    expect_success(response, tc)


def payload(tag: str, i: int, size: int = 0) -> bytes:
    head = f"{tag}-{i:04d}|".encode()
    size = size or 40 + (i * 37) % 1200
    return (head * (size // len(head) + 1))[:size]


async def ping_pong(
    client: Endpoint, channel: int, peer: Endpoint, relay_addr: Addr, tag: str, count: int
) -> None:
    """``count`` datagrams each way, one at a time: ChannelData up, plain UDP back."""
    for i in range(count):
        data = payload(f"{tag}-up", i)
        client.send(channel_data(channel, data))
        await expect_datagram(peer, data, relay_addr)
        data = payload(f"{tag}-down", i)
        peer.send(data, to=relay_addr)
        await expect_channel_data(client, channel, data)


async def bursts(
    a: Endpoint,
    a_channel: int,
    b: Endpoint,
    b_channel: int,
    tag: str,
    count: int,
    burst: int,
    pause: float = 0.0,
) -> None:
    """Relay-loop traffic: ``count`` ChannelData each way, ``burst`` at a time in flight,
    ``pause`` seconds between bursts (so hostile traces replayed beside it overlap)."""
    for start in range(0, count, burst):
        batch = range(start, min(count, start + burst))
        for i in batch:
            a.send(channel_data(a_channel, payload(f"{tag}-ab", i, 200)))
            b.send(channel_data(b_channel, payload(f"{tag}-ba", i, 200)))
        for i in batch:
            await expect_channel_data(b, b_channel, payload(f"{tag}-ab", i, 200))
        for i in batch:
            await expect_channel_data(a, a_channel, payload(f"{tag}-ba", i, 200))
        await asyncio.sleep(pause)


def signed_raw(tc: TurnClient, method: int, attrs: list[tuple[int, bytes]]) -> bytes:
    """A request signed like ``tc`` signs, with attribute values given as raw bytes (so they
    can be malformed on purpose)."""
    from simulations.traces.replay import build_message

    raw: list[tuple[int, bytes]] = [
        (Attr.SOFTWARE, tc.software.encode()),
        *attrs,
        (Attr.USERNAME, tc.username.encode()),
    ]
    if tc.realm is not None:
        raw.append((Attr.REALM, tc.realm.encode()))
    if tc.nonce is not None:
        raw.append((Attr.NONCE, tc.nonce.encode()))
    type_bytes = struct.pack("!H", stun.pack_type(method, Class.REQUEST))
    return build_message(
        type_bytes, tc.new_tid(), raw, integrity="sha1", key=tc.key, fingerprint=False
    )


def stun_raw(method: int, cls: int, attrs: list[tuple[int, bytes]], tid: bytes) -> bytes:
    body = b"".join(struct.pack("!HH", t, len(v)) + v + b"\0" * (-len(v) % 4) for t, v in attrs)
    return (
        struct.pack("!HHI", stun.pack_type(method, cls), len(body), stun.MAGIC_COOKIE) + tid + body
    )


# --- the three situations the relay exists for ------------------------------------------------


@scenario(
    "client",
    "A Firezone client on IPv4 with portal-minted credentials: Binding keepalive, Allocate "
    "(first without nonce, 401, retry; dual-stack via ADDITIONAL-ADDRESS-FAMILY), ChannelBind "
    "to a peer, data both ways, Refresh as connlib sends it, channel refresh, a Data "
    "indication from a permitted peer port without a channel, a Send indication, "
    "CreatePermission, Refresh 0.",
    PORTAL_DUAL,
)
async def client(s: Session) -> None:
    tc = s.turn_client(s.credential("client"))
    ep = s.endpoint("client")
    peer = s.endpoint("peer")
    other = s.endpoint("peer")  # same host as the peer: covered by its permission
    expect_success(await ep.request(tc.binding(), note="Binding keepalive (no auth)"))
    alloc = await s.allocate(ep, tc, additional_family=Family.V6)
    relay4 = relayed(alloc, Family.V4)
    relayed(alloc, Family.V6)
    await bind(ep, tc, 0x4000, peer.addr)
    await ping_pong(ep, 0x4000, peer, relay4, "client", 12)
    response = await ep.request(connlib_refresh(tc), note="Refresh with connlib's attributes")
    expect_success(response, tc)
    await bind(ep, tc, 0x4000, peer.addr, "ChannelBind refresh (same channel, same peer)")
    data = b"from a permitted peer port without a channel"
    other.send(data, to=relay4, note="peer port without channel: Data indication")
    indication, _ = await ep.recv()
    msg = stun.parse(indication)
    if (msg.method, msg.cls) != (Method.DATA, Class.INDICATION) or msg.get(Attr.DATA) != data:
        raise ScenarioError("expected a Data indication")
    ep.send(tc.send_indication(other.addr, b"send indication"), note="Send indication")
    await expect_datagram(other, b"send indication", relay4)
    response = await ep.request(tc.create_permission(peer.addr, other.addr))
    expect_success(response, tc)
    await ping_pong(ep, 0x4000, peer, relay4, "client2", 4)
    response = await ep.request(tc.refresh(0), note="Refresh 0: delete the allocation")
    expect_success(response, tc)
    ep.send(channel_data(0x4000, b"after delete"), note="ChannelData after delete: dropped")
    await peer.quiet()


@scenario(
    "gateway",
    "A Firezone gateway on IPv6 with portal-minted credentials: dual-stack Allocate "
    "(ADDITIONAL-ADDRESS-FAMILY=IPv6, two XOR-RELAYED-ADDRESS), channels to an IPv4 and an "
    "IPv6 peer, data both ways on both (IPv6 client to IPv4 peer crosses families), "
    "Refresh and channel refresh as connlib does them.",
    PORTAL_DUAL,
)
async def gateway(s: Session) -> None:
    tc = s.turn_client(s.credential("gateway"))
    ep = s.endpoint("gateway", Family.V6)
    peer4 = s.endpoint("peer")
    peer6 = s.endpoint("peer", Family.V6)
    alloc = await s.allocate(ep, tc, additional_family=Family.V6)
    relay4, relay6 = relayed(alloc, Family.V4), relayed(alloc, Family.V6)
    await bind(ep, tc, 0x4000, peer4.addr, "ChannelBind to the IPv4 peer")
    await bind(ep, tc, 0x4001, peer6.addr, "ChannelBind to the IPv6 peer")
    await ping_pong(ep, 0x4000, peer4, relay4, "gw4", 10)
    await ping_pong(ep, 0x4001, peer6, relay6, "gw6", 10)
    expect_success(await ep.request(connlib_refresh(tc, 600)), tc)
    await bind(ep, tc, 0x4000, peer4.addr, "ChannelBind refresh")
    await bind(ep, tc, 0x4001, peer6.addr, "ChannelBind refresh")
    await ping_pong(ep, 0x4000, peer4, relay4, "gw4b", 3)
    await ping_pong(ep, 0x4001, peer6, relay6, "gw6b", 3)
    response = await ep.request(tc.channel_bind(0x4000, peer6.addr), note="peer bound elsewhere")
    expect_error(response, 400)
    expect_success(await ep.request(tc.refresh(0), note="Refresh 0"), tc)


@scenario(
    "relay_loop",
    "Client and gateway allocated on the same relay (portal credentials), each binding a "
    "channel to the other's relayed address (IPv4 and IPv6): data flows channel -> relay -> "
    "relay -> channel, the hop between the two allocations is shown as a relay-to-relay frame.",
    PORTAL_DUAL,
)
async def relay_loop(s: Session) -> None:
    ctc = s.turn_client(s.credential("client"))
    gtc = s.turn_client(s.credential("gateway"))
    c = s.endpoint("client")
    g = s.endpoint("gateway")
    calloc = await s.allocate(c, ctc, additional_family=Family.V6)
    galloc = await s.allocate(g, gtc, additional_family=Family.V6)
    await bind(c, ctc, 0x4000, relayed(galloc, Family.V4), "client: channel to gateway's relay4")
    await bind(g, gtc, 0x4000, relayed(calloc, Family.V4), "gateway: channel to client's relay4")
    await bind(c, ctc, 0x4001, relayed(galloc, Family.V6), "client: channel to gateway's relay6")
    await bind(g, gtc, 0x4001, relayed(calloc, Family.V6), "gateway: channel to client's relay6")
    await bursts(c, 0x4000, g, 0x4000, "loop4", 150, 10, 0.05)
    await bursts(c, 0x4001, g, 0x4001, "loop6", 60, 10, 0.05)
    expect_success(await c.request(connlib_refresh(ctc)), ctc)
    expect_success(await g.request(connlib_refresh(gtc)), gtc)
    await bursts(c, 0x4000, g, 0x4000, "loop4b", 100, 10, 0.05)


# --- the nasty ones ---------------------------------------------------------------------------


@scenario(
    "roaming",
    "A client roams: the same username allocates from a new 5-tuple. Its old nonce is bound to "
    "the old socket (438), the retry allocates anew and frees the old allocation; the old "
    "socket's channel stops relaying and its Refresh gets 437; the new socket binds and relays.",
    STANDALONE,
)
async def roaming(s: Session) -> None:
    credential = s.credential("client")
    tc = s.turn_client(credential)
    old = s.endpoint("client")
    peer = s.endpoint("peer")
    alloc = await s.allocate(old, tc)
    relay_old = relayed(alloc)
    await bind(old, tc, 0x4000, peer.addr)
    await ping_pong(old, 0x4000, peer, relay_old, "before", 5)
    old_tc = s.turn_client(credential)
    old_tc.nonce, old_tc.realm = tc.nonce, tc.realm
    new = s.endpoint("client")
    response = await new.request(tc.allocate(), note="roamed: Allocate with the old socket's nonce")
    expect_error(response, 438)
    tc.learn(response)
    response = await new.request(tc.allocate(), note="roamed: Allocate with the new nonce")
    relay_new = relayed(expect_success(response, tc))
    old.send(channel_data(0x4000, b"old socket"), note="old 5-tuple's channel: dropped")
    await peer.quiet()
    response = await old.request(old_tc.refresh(), note="old 5-tuple refreshes: 437")
    expect_error(response, 437)
    await bind(new, tc, 0x4000, peer.addr, "new 5-tuple binds the same channel")
    await ping_pong(new, 0x4000, peer, relay_new, "after", 5)
    expect_success(await new.request(tc.refresh(0)), tc)


@scenario(
    "retransmissions",
    "Retransmitted requests (same transaction id, same bytes, same 5-tuple) get the same "
    "response: Allocate (same relayed address), ChannelBind, Refresh, CreatePermission. A new "
    "Allocate transaction from the allocated 5-tuple gets 437.",
    STANDALONE,
)
async def retransmissions(s: Session) -> None:
    tc = s.turn_client(s.credential("client"))
    ep = s.endpoint("client")
    peer = s.endpoint("peer")
    first = tc.allocate()
    expect_error(await ep.request(first, note="Allocate without nonce"), 401)
    response = await ep.request(first, note="retransmitted Allocate without nonce: 401 again")
    expect_error(response, 401)
    tc.learn(response)
    allocate = tc.allocate()
    alloc = expect_success(await ep.request(allocate), tc)
    again = expect_success(await ep.request(allocate, note="retransmitted Allocate"), tc)
    if again.get_all(Attr.XOR_RELAYED_ADDRESS) != alloc.get_all(Attr.XOR_RELAYED_ADDRESS):
        raise ScenarioError("a retransmitted Allocate got another relayed address")
    expect_error(await ep.request(tc.allocate(), note="new Allocate transaction: 437"), 437)
    bind_request = tc.channel_bind(0x4000, peer.addr)
    expect_success(await ep.request(bind_request), tc)
    expect_success(await ep.request(bind_request, note="retransmitted ChannelBind"), tc)
    # a request and its retransmission both in flight before the answer
    refresh = tc.refresh(1200)
    ep.send(refresh, note="Refresh")
    ep.send(refresh, note="Refresh retransmitted at once")
    for _ in range(2):
        response = stun.parse((await ep.recv())[0])
        if expect_success(response, tc).get(Attr.LIFETIME) != 1200:
            raise ScenarioError("Refresh 1200 not granted")
    permission = tc.create_permission(peer.addr)
    expect_success(await ep.request(permission), tc)
    expect_success(await ep.request(permission, note="retransmitted CreatePermission"), tc)
    await ping_pong(ep, 0x4000, peer, relayed(alloc), "rtx", 4)
    expect_success(await ep.request(tc.refresh(0)), tc)


@scenario(
    "expiry",
    "Lifetimes and deletion (expiry in real time is 600 s at least, so the trace deletes): "
    "LIFETIME 1 is raised to 600, 100000 capped to 3600; Refresh 0 deletes the allocation and "
    "its channels (data dropped both ways, Refresh/ChannelBind/CreatePermission get 437), the "
    "same socket allocates again; Refresh 0 with REQUESTED-ADDRESS-FAMILY=IPv6 frees only the "
    "IPv6 half of a dual allocation.",
    STANDALONE_DUAL,
)
async def expiry(s: Session) -> None:
    tc = s.turn_client(s.credential("client"))
    ep = s.endpoint("client")
    peer = s.endpoint("peer")
    peer6 = s.endpoint("peer", Family.V6)
    alloc = await s.allocate(ep, tc, lifetime=1)
    if alloc.get(Attr.LIFETIME) != 600:
        raise ScenarioError("LIFETIME 1 not raised to 600")
    relay1 = relayed(alloc)
    response = expect_success(await ep.request(tc.refresh(100000), note="Refresh 100000"), tc)
    if response.get(Attr.LIFETIME) != 3600:
        raise ScenarioError("LIFETIME 100000 not capped to 3600")
    expect_success(await ep.request(tc.refresh(), note="Refresh without LIFETIME: 600"), tc)
    await bind(ep, tc, 0x4000, peer.addr)
    await ping_pong(ep, 0x4000, peer, relay1, "live", 3)
    response = await ep.request(tc.refresh(0), note="Refresh 0: delete")
    if expect_success(response, tc).get(Attr.LIFETIME) != 0:
        raise ScenarioError("Refresh 0 did not answer LIFETIME 0")
    ep.send(channel_data(0x4000, b"after delete"), note="ChannelData after delete: dropped")
    peer.send(b"to the freed relayed address", to=relay1, note="to a freed port: dropped")
    await asyncio.gather(peer.quiet(), ep.quiet())
    expect_error(await ep.request(tc.refresh(), note="Refresh after delete: 437"), 437)
    response = await ep.request(tc.channel_bind(0x4000, peer.addr), note="ChannelBind: 437")
    expect_error(response, 437)
    expect_error(await ep.request(tc.create_permission(peer.addr)), 437)
    alloc = await s.allocate(ep, tc, additional_family=Family.V6)
    relay4, relay6 = relayed(alloc, Family.V4), relayed(alloc, Family.V6)
    await bind(ep, tc, 0x4000, peer.addr, "ChannelBind on the new allocation")
    await bind(ep, tc, 0x4001, peer6.addr, "ChannelBind to the IPv6 peer")
    await ping_pong(ep, 0x4001, peer6, relay6, "v6", 2)
    request = tc.request(
        Method.REFRESH,
        [(Attr.LIFETIME, 0), (Attr.REQUESTED_ADDRESS_FAMILY, Family.V6)],
    )
    expect_success(await ep.request(request, note="Refresh 0 for IPv6 only"), tc)
    ep.send(channel_data(0x4001, b"v6 half gone"), note="IPv6 channel went with its family")
    await peer6.quiet()
    response = await ep.request(tc.channel_bind(0x4002, peer6.addr), note="IPv6 peer now: 443")
    expect_error(response, 443)
    await ping_pong(ep, 0x4000, peer, relay4, "v4", 3)
    expect_success(await ep.request(tc.refresh(0)), tc)


@scenario(
    "stale_nonce",
    "Nonce and credential failures: a forged UUID nonce (438, then retry), a nonce that is not "
    "a UUID (401), a nonce issued to another socket (438), a wrong password (401 twice: connlib "
    "gives up), expired credentials (401), no MESSAGE-INTEGRITY (401 unsigned), a malformed "
    "username (401 unsigned).",
    STANDALONE,
)
async def stale_nonce(s: Session) -> None:
    tc = s.turn_client(s.credential("client"))
    ep = s.endpoint("client")
    alloc = await s.allocate(ep, tc)
    relayed(alloc)
    tc.nonce = str(uuid.UUID(int=0x1234_5678_9ABC_DEF0_1234_5678_9ABC_DEF0))
    response = await ep.request(tc.refresh(), note="forged UUID nonce: 438")
    tc.learn(expect_error(response, 438))
    if not tc.verify(response):
        raise ScenarioError("438 not signed")
    expect_success(await ep.request(tc.refresh(), note="retry with the fresh nonce"), tc)
    tc.nonce = "not-a-uuid"
    response = await ep.request(tc.refresh(), note="nonce that is not a UUID: 401")
    tc.learn(expect_error(response, 401))
    expect_success(await ep.request(tc.refresh()), tc)

    other_tc = s.turn_client(s.credential("other"))
    other = s.endpoint("client")
    await s.allocate(other, other_tc)
    tc.nonce = other_tc.nonce  # issued to the other socket
    response = await ep.request(tc.refresh(), note="another socket's nonce: 438")
    tc.learn(expect_error(response, 438))
    expect_success(await ep.request(tc.refresh()), tc)

    wrong = s.turn_client(s.credential("wrong", sign_password="not-the-password"))
    bad = s.endpoint("client")
    response = await bad.request(wrong.allocate(), note="wrong password, no nonce: 401")
    wrong.learn(expect_error(response, 401))
    response = await bad.request(wrong.allocate(), note="wrong password with nonce: 401")
    expect_error(response, 401)

    expired = s.turn_client(s.credential("expired", expired=True))
    late = s.endpoint("client")
    expired.learn(expect_error(await late.request(expired.allocate()), 401))
    response = await late.request(expired.allocate(), note="expired username with nonce: 401")
    expect_error(response, 401)

    response = await late.request(expired.allocate(signed=False), note="no USERNAME/MI: 401")
    if expect_error(response, 401).has(Attr.MESSAGE_INTEGRITY):
        raise ScenarioError("an unsigned 401 expected")
    cred = s.literal_credential("foobar", "password")
    malformed = s.turn_client(cred)
    response = await late.request(malformed.allocate(), note="malformed USERNAME: 401 unsigned")
    if expect_error(response, 401).has(Attr.MESSAGE_INTEGRITY):
        raise ScenarioError("an unsigned 401 expected")
    expect_success(await ep.request(tc.refresh(0)), tc)
    expect_success(await other.request(other_tc.refresh(0)), other_tc)


def _garbage(tid: bytes) -> list[tuple[str, bytes]]:
    valid = stun.encode(Method.BINDING, Class.REQUEST, tid, [])
    bad_cookie = valid[:4] + b"\xde\xad\xbe\xef" + valid[8:]
    lying_long = struct.pack("!HHI", 0x0001, 200, stun.MAGIC_COOKIE) + tid
    lying_short = stun_raw(Method.BINDING, Class.REQUEST, [(Attr.SOFTWARE, b"x" * 12)], tid)
    lying_short = lying_short[:2] + struct.pack("!H", 4) + lying_short[4:]
    odd_length = struct.pack("!HHI", 0x0001, 3, stun.MAGIC_COOKIE) + tid + b"abc"
    attr_past_end = (
        struct.pack("!HHI", 0x0001, 8, stun.MAGIC_COOKIE)
        + tid
        + struct.pack("!HH", 0x8022, 64)
        + b"abcd"
    )
    fingerprint = bytearray(stun.encode(Method.BINDING, Class.REQUEST, tid, [], fingerprint=True))
    fingerprint[-1] ^= 0xFF
    return [
        ("empty datagram", b""),
        ("three bytes", b"\x00\x01\x00"),
        ("19-byte STUN header", valid[:19]),
        ("bad magic cookie", bad_cookie),
        ("length longer than the datagram", lying_long),
        ("length shorter than the attributes", lying_short),
        ("length not a multiple of 4", odd_length),
        ("attribute running past the end", attr_past_end),
        ("trailing bytes after a Binding", valid + b"junk"),
        ("bad FINGERPRINT", bytes(fingerprint)),
        ("first byte 0x05", b"\x05" + bytes(range(40))),
        ("first byte 0x50 (channel 0x5000)", b"\x50\x00\x00\x04abcd"),
        ("first byte 0x80 (RTP-like)", b"\x80\x60" + bytes(100)),
        ("first byte 0xff", b"\xff" * 64),
        ("1400 bytes of noise", bytes((i * 131 + 7) % 256 for i in range(1400))),
        (
            "Binding success response from a client",
            stun.encode(Method.BINDING, Class.SUCCESS, tid, []),
        ),
        (
            "error response from a client",
            stun.encode(
                Method.ALLOCATE, Class.ERROR, tid, [(Attr.ERROR_CODE, (400, "Bad Request"))]
            ),
        ),
        (
            "Send indication without XOR-PEER-ADDRESS",
            stun.encode(Method.SEND, Class.INDICATION, tid, [(Attr.DATA, b"x")]),
        ),
    ]


@scenario(
    "garbage",
    "Malformed input around a live allocation: framing errors, lying lengths, bad FINGERPRINT, "
    "unknown first bytes, responses and bad indications from clients (all dropped silently); "
    "malformed attributes (400), unknown method (400), unknown comprehension-required "
    "attribute (420), missing or wrong REQUESTED-TRANSPORT (400/442); ChannelData with a lying "
    "length, on an unbound channel, or from a stranger (dropped). The allocation keeps relaying.",
    STANDALONE,
)
async def garbage(s: Session) -> None:
    tc = s.turn_client(s.credential("client"))
    ep = s.endpoint("client")
    peer = s.endpoint("peer")
    stranger = s.endpoint("attacker")
    alloc = await s.allocate(ep, tc)
    relay = relayed(alloc)
    await bind(ep, tc, 0x4000, peer.addr)
    for what, data in _garbage(b"g" * 12):
        stranger.send(data, note=f"stranger: {what}")
        ep.send(data, note=f"client: {what}")
    ep.send(struct.pack("!HH", 0x4000, 500) + b"short", note="ChannelData length > datagram")
    ep.send(channel_data(0x4FFF, b"unbound channel"), note="ChannelData on an unbound channel")
    stranger.send(channel_data(0x4000, b"spoofed"), note="ChannelData from a stranger")
    await asyncio.gather(ep.quiet(), stranger.quiet(), peer.quiet())

    unknown_method = tc.request(0x00A, [])
    expect_error(await ep.request(unknown_method, note="unknown method 0x00a: 400"), 400)
    response = await ep.request(
        tc.request(Method.REFRESH, [(0x0031, b"\x00\x00\x00\x00")]),
        note="unknown comprehension-required attribute 0x0031: 420",
    )
    if expect_error(response, 420).get(Attr.UNKNOWN_ATTRIBUTES) != (0x0031,):
        raise ScenarioError("420 without UNKNOWN-ATTRIBUTES 0x0031")
    response = await ep.request(
        signed_raw(
            tc,
            Method.CHANNEL_BIND,
            [
                (Attr.CHANNEL_NUMBER, b"\x40\x01\x00\x00"),
                (Attr.XOR_PEER_ADDRESS, b"\x00\x03\x00\x01abcd"),
            ],
        ),
        note="XOR-PEER-ADDRESS with address family 3: 400",
    )
    expect_error(response, 400)
    response = await ep.request(tc.channel_bind(0x3FFF, peer.addr), note="channel 0x3fff: 400")
    expect_error(response, 400)
    response = await stranger.request(
        tc.request(Method.ALLOCATE, []), note="Allocate without REQUESTED-TRANSPORT: 400"
    )
    expect_error(response, 400)
    stranger_tc = s.turn_client(s.credential("stranger"))
    stranger_tc.learn(expect_error(await stranger.request(stranger_tc.allocate()), 401))
    response = await stranger.request(stranger_tc.allocate(transport=6), note="TCP: 442")
    expect_error(response, 442)
    response = await stranger.request(
        signed_raw(
            stranger_tc,
            Method.ALLOCATE,
            [
                (Attr.REQUESTED_TRANSPORT, b"\x11\x00\x00\x00"),
                (Attr.REQUESTED_ADDRESS_FAMILY, b"\x07\x00\x00\x00"),
            ],
        ),
        note="REQUESTED-ADDRESS-FAMILY 7: 400",
    )
    expect_error(response, 400)
    expect_success(await stranger.request(stranger_tc.binding(), note="Binding still answered"))
    await ping_pong(ep, 0x4000, peer, relay, "survivor", 4)
    expect_success(await ep.request(tc.refresh(0)), tc)


# --- hostile traces, replayed beside a legit one ---------------------------------------------


@scenario(
    "hostile_garbage",
    "Malformed STUN and lying lengths from 40 source ports (127.0.0.5 and ::1), paced over "
    "about two seconds; replayed beside relay_loop, which must not lose a datagram.",
    PORTAL_DUAL,
    kind="hostile",
    beside="relay_loop.pcap",
)
async def hostile_garbage(s: Session) -> None:
    senders = [s.endpoint("attacker") for _ in range(30)]
    senders += [s.endpoint("attacker6", Family.V6) for _ in range(10)]
    items = _garbage(b"h" * 12)
    for round_ in range(12):
        for i, ep in enumerate(senders):
            data = items[(i + round_) % len(items)][1]
            ep.send(data)
        await asyncio.sleep(0.15)
    await asyncio.gather(*(ep.quiet(0.05) for ep in senders))


@scenario(
    "hostile_spoofed_channeldata",
    "ChannelData on the channel numbers the legit clients use (0x4000, 0x4001), from 60 "
    "unbound sources, with correct and lying lengths, paced over about two seconds; replayed "
    "beside relay_loop, which must not lose a datagram.",
    PORTAL_DUAL,
    kind="hostile",
    beside="relay_loop.pcap",
)
async def hostile_spoofed_channeldata(s: Session) -> None:
    senders = [s.endpoint("spoofer") for _ in range(50)]
    senders += [s.endpoint("spoofer6", Family.V6) for _ in range(10)]
    for round_ in range(15):
        for i, ep in enumerate(senders):
            channel = 0x4000 + (i + round_) % 2
            if (i + round_) % 5 == 0:
                ep.send(struct.pack("!HH", channel, 1000) + b"lying length")
            else:
                ep.send(channel_data(channel, payload("spoof", i, 200)))
        await asyncio.sleep(0.12)
    await asyncio.gather(*(ep.quiet(0.05) for ep in senders))


@scenario(
    "hostile_allocate_flood",
    "An Allocate flood: 300 source ports send unauthenticated Allocates (401 each), 50 of them "
    "complete the handshake with their own credentials and hold allocations, then delete "
    "them; replayed beside relay_loop, which must not lose a datagram (losses on the flood "
    "itself are tolerated).",
    {**PORTAL_DUAL, "ports": 300},
    kind="hostile",
    beside="relay_loop.pcap",
    allow_loss=True,
)
async def hostile_allocate_flood(s: Session) -> None:
    flooders = [s.endpoint("flooder") for _ in range(300)]
    anonymous = TurnClient("", "", realm=None)
    for start in range(0, len(flooders), 30):
        batch = flooders[start : start + 30]
        for ep in batch:
            ep.send(anonymous.allocate(signed=False))
        for ep in batch:
            expect_error(stun.parse((await ep.recv())[0]), 401)
        await asyncio.sleep(0.05)
    holders = flooders[:50]
    clients = [s.turn_client(s.credential(f"flood{i}")) for i in range(len(holders))]
    for step in ("challenge", "allocate", "delete"):
        for ep, tc in zip(holders, clients, strict=True):
            if step == "delete":
                ep.send(tc.refresh(0))
            else:
                ep.send(tc.allocate())
        for ep, tc in zip(holders, clients, strict=True):
            response = stun.parse((await ep.recv())[0])
            if step == "challenge":
                tc.learn(expect_error(response, 401))
            else:
                expect_success(response, tc)
        await asyncio.sleep(0.2)
