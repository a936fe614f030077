"""The acceptance scenarios of the Firezone relay (reference §8.3, 1-23) and the RFC rules
we add on top, against the sans-IO server with a fixed RNG and an explicit clock."""

from __future__ import annotations

import struct

import pytest

from firezone_relay.protocol import stun
from firezone_relay.protocol.auth import firezone_password
from firezone_relay.protocol.channel_data import CHANNEL_NUMBERS
from firezone_relay.protocol.commands import (
    CreateAllocation,
    CreateChannelBinding,
    DeleteChannelBinding,
    FreeAllocation,
    SendMessage,
)
from firezone_relay.protocol.routes import LoopToClient, ToClient, ToPeer
from firezone_relay.protocol.server import MAX_BIND_ATTEMPTS
from firezone_relay.protocol.stun import Attr, Class, Method
from firezone_relay.protocol.types import Family
from simulations import channel_data
from tests.unit.harness import (
    CLIENT,
    CLIENT6,
    PEER,
    PEER6,
    PUBLIC4,
    PUBLIC6,
    Harness,
    error_code,
    five_tuple,
    is_success,
)

LOW = 49152


# --- 1. Binding --------------------------------------------------------------------------


@pytest.mark.parametrize("sender", [CLIENT, CLIENT6])
def test_binding_answers_with_software_and_mapped_address(sender: tuple[str, int]) -> None:
    h = Harness()
    out = h.send(h.client().binding(), sender)
    response = out.response
    assert is_success(response) and response.method == Method.BINDING
    assert [t for t, _ in response.attributes] == [Attr.SOFTWARE, Attr.XOR_MAPPED_ADDRESS]
    assert response.get(Attr.XOR_MAPPED_ADDRESS) == sender
    assert out.others == []


def test_binding_from_port_zero_is_ignored() -> None:
    h = Harness()
    assert h.send(h.client().binding(), ("93.184.216.34", 0)).commands == []


def test_fingerprint_in_request_means_fingerprint_in_response() -> None:
    h = Harness()
    request = stun.encode(Method.BINDING, Class.REQUEST, bytes(12), [], fingerprint=True)
    response = h.send(request).response
    assert response.fingerprint_offset is not None and stun.verify_fingerprint(response)


# --- 2-4. Authentication handshake and Allocate ------------------------------------------


def test_allocate_without_credentials_gets_401_with_realm_and_nonce() -> None:
    h = Harness()
    response = h.send(h.client().allocate(signed=False)).response
    assert error_code(response) == 401
    assert response.get(Attr.REALM) == "firezone"
    assert response.get(Attr.NONCE)
    assert response.integrity_offset is None


def test_connlib_first_allocate_gets_a_signed_401() -> None:
    h = Harness()
    client = h.client()
    response = h.send(client.allocate()).response  # USERNAME and MI, no NONCE
    assert error_code(response) == 401
    assert response.get(Attr.NONCE) and response.get(Attr.REALM) == "firezone"
    client.learn(response)
    assert client.verify(response)


def test_allocate_success_order_and_integrity() -> None:
    h = Harness()
    client = h.client()
    out = h.allocate(client)
    assert isinstance(out.commands[0], CreateAllocation)
    assert isinstance(out.commands[-1], SendMessage)
    assert out.others == [CreateAllocation(out.others[0].port, Family.V4)]  # type: ignore[union-attr]
    response = out.response
    assert is_success(response)
    assert [t for t, _ in response.attributes] == [
        Attr.SOFTWARE,
        Attr.XOR_RELAYED_ADDRESS,
        Attr.XOR_MAPPED_ADDRESS,
        Attr.LIFETIME,
        Attr.MESSAGE_INTEGRITY,
    ]
    port = out.others[0].port  # type: ignore[union-attr]
    assert LOW <= port <= 65535
    assert response.get(Attr.XOR_RELAYED_ADDRESS) == (PUBLIC4, port)
    assert response.get(Attr.XOR_MAPPED_ADDRESS) == CLIENT
    assert client.verify(response)


# --- 5-7. Lifetimes, expiry, Refresh ------------------------------------------------------


@pytest.mark.parametrize(
    ("requested", "granted"),
    [(None, 600), (10_000_000, 3600), (1200, 1200), (3599, 3599), (1, 600), (0, 600)],
)
def test_lifetime(requested: int | None, granted: int) -> None:
    h = Harness()
    response = h.allocate(h.client(), lifetime=requested).response
    assert response.get(Attr.LIFETIME) == granted


def test_allocation_expires_at_its_lifetime() -> None:
    h = Harness()
    out = h.allocate(h.client(), lifetime=1200)
    port = out.others[0].port  # type: ignore[union-attr]
    assert h.server.poll_timeout() is not None and h.server.poll_timeout() <= h.now + 1200
    assert h.advance(1199) == []
    assert h.advance(1) == [FreeAllocation(port, Family.V4)]
    assert h.server.num_allocations == 0


def test_refresh_replaces_the_expiry() -> None:
    h = Harness()
    client = h.client()
    port = h.allocate(client, lifetime=1200).others[0].port  # type: ignore[union-attr]
    h.advance(600)
    response = h.send(client.refresh(900)).response
    assert is_success(response) and response.get(Attr.LIFETIME) == 900
    assert client.verify(response)
    assert h.advance(899) == []  # t = 600 + 899: the original 1200 s are long gone
    assert h.advance(1) == [FreeAllocation(port, Family.V4)]


def test_refresh_zero_deletes_and_refresh_without_allocation_is_437() -> None:
    h = Harness()
    client = h.client()
    port = h.allocate(client).others[0].port  # type: ignore[union-attr]
    out = h.send(client.refresh(0))
    assert out.others == [FreeAllocation(port, Family.V4)]
    assert out.response.get(Attr.LIFETIME) == 0 and isinstance(out.commands[-1], SendMessage)
    assert h.advance(3000) == []
    assert error_code(h.send(client.refresh(600)).response) == 437


# --- 8. 437, retransmissions, one allocation per username --------------------------------


def test_second_allocate_from_same_socket_is_437_but_retransmission_succeeds() -> None:
    h = Harness()
    client = h.client()
    h.authenticate(client)
    request = client.allocate()
    first = h.send(request)
    again = h.send(request)  # same transaction id: a retransmission
    assert again.commands == [first.commands[-1]]
    other = h.send(client.allocate())
    assert error_code(other.response) == 437
    assert client.verify(other.response)


def test_retransmitted_refresh_zero_gets_the_same_success() -> None:
    h = Harness()
    client = h.client()
    h.allocate(client)
    request = client.refresh(0)
    first = h.send(request)
    again = h.send(request)
    assert again.commands == [first.commands[-1]]


def test_same_username_from_new_socket_frees_the_old_allocation_first() -> None:
    h = Harness()
    client = h.client()
    first = h.allocate(client)
    old_port = first.others[0].port  # type: ignore[union-attr]
    h.send(client.channel_bind(0x4000, PEER))
    roamed = ("93.184.216.34", 40001)
    client.nonce = None  # nonces are per socket: the roamed client is challenged again
    out = h.allocate(client, sender=roamed)
    assert out.others[:2] == [
        DeleteChannelBinding(five_tuple(CLIENT), 0x4000, PEER, old_port),
        FreeAllocation(old_port, Family.V4),
    ]
    assert isinstance(out.others[2], CreateAllocation)
    assert h.server.num_allocations == 1


def test_other_username_on_existing_allocation_is_441() -> None:
    h = Harness()
    owner = h.client("owner")
    h.allocate(owner)
    intruder = h.client("intruder")
    intruder.realm, intruder.nonce = owner.realm, owner.nonce
    response = h.send(intruder.refresh(600)).response
    assert error_code(response) == 441
    response = h.send(intruder.channel_bind(0x4000, PEER)).response
    assert error_code(response) == 441


# --- 9. Authentication failures -----------------------------------------------------------


def _with_attrs(client, drop: set[int] = frozenset(), nonce: str | None = None):  # type: ignore[no-untyped-def]
    attrs = [(Attr.REQUESTED_TRANSPORT, 17), (Attr.USERNAME, client.username)]
    attrs.append((Attr.REALM, "firezone"))
    if nonce is not None:
        attrs.append((Attr.NONCE, nonce))
    attrs = [a for a in attrs if a[0] not in drop]
    key = None if Attr.MESSAGE_INTEGRITY in drop else client.key
    return stun.encode(Method.ALLOCATE, Class.REQUEST, client.new_tid(), attrs, integrity_key=key)


@pytest.mark.parametrize("missing", [Attr.MESSAGE_INTEGRITY, Attr.USERNAME, Attr.NONCE])
def test_missing_credentials_give_401_with_realm_and_nonce(missing: int) -> None:
    h = Harness()
    client = h.client()
    h.authenticate(client)
    response = h.send(_with_attrs(client, {missing}, client.nonce)).response
    assert error_code(response) == 401
    assert response.get(Attr.REALM) == "firezone" and response.get(Attr.NONCE)


def test_non_uuid_nonce_is_401_unknown_uuid_is_438() -> None:
    h = Harness()
    client = h.client()
    h.authenticate(client)
    assert error_code(h.send(_with_attrs(client, nonce="not-a-uuid")).response) == 401
    unknown = "6e0e2a4c-1d4b-4f1e-9a51-0123456789ab"
    response = h.send(_with_attrs(client, nonce=unknown)).response
    assert error_code(response) == 438
    assert response.get(Attr.NONCE) and response.get(Attr.REALM)
    assert client.verify(response)


def test_nonce_from_another_socket_is_stale() -> None:
    h = Harness()
    client = h.client()
    h.authenticate(client, CLIENT)
    response = h.allocate(client, sender=("93.184.216.34", 40002)).response
    assert error_code(response) == 438
    client.learn(response)
    assert is_success(h.send(client.allocate(), ("93.184.216.34", 40002)).response)


def test_nonce_is_good_for_a_bounded_number_of_uses() -> None:
    h = Harness(nonce_uses=3)
    client = h.client()
    h.allocate(client)
    for _ in range(2):
        assert is_success(h.send(client.refresh(600)).response)
    response = h.send(client.refresh(600)).response
    assert error_code(response) == 438
    assert response.get(Attr.NONCE) != client.nonce
    client.learn(response)
    assert is_success(h.send(client.refresh(600)).response)


def test_nonce_expires_in_time() -> None:
    h = Harness(nonce_lifetime=100.0)
    client = h.client()
    h.allocate(client)
    h.advance(101)
    assert error_code(h.send(client.refresh(600)).response) == 438


def test_nonce_use_counters_are_forgotten_when_nonces_expire() -> None:
    h = Harness(nonce_lifetime=100.0)
    for i in range(20):
        h.allocate(h.client(f"salt{i}"), sender=("93.184.216.34", 41000 + i))
    assert len(h.server._auth.nonces) == 20
    h.advance(101)
    assert len(h.server._auth.nonces) == 0


def test_401_challenges_keep_no_state() -> None:
    h = Harness()
    for port in range(1, 2000):
        h.send(h.client().allocate(signed=False), ("198.51.100.9", port))
    assert len(h.server._auth.nonces) == 0


def test_expired_username_is_401() -> None:
    h = Harness()
    client = h.client(expiry=int(h.now) - 1)
    assert error_code(h.allocate(client).response) == 401


def test_wrong_password_is_401() -> None:
    h = Harness()
    client = h.client()
    client.password = "wrong"
    response = h.allocate(client).response
    assert error_code(response) == 401


def test_malformed_username_is_an_unsigned_401() -> None:
    h = Harness()
    client = h.client()
    client.username = "foobar"
    response = h.send(client.allocate()).response
    assert error_code(response) == 401 and response.integrity_offset is None


# --- 10-12. Transport, families, capacity ------------------------------------------------


def test_transport_other_than_udp_is_442_and_missing_transport_400() -> None:
    h = Harness()
    client = h.client()
    response = h.allocate(client, transport=6).response
    assert error_code(response) == 442 and client.verify(response)
    no_transport = stun.encode(
        Method.ALLOCATE,
        Class.REQUEST,
        bytes(12),
        [(Attr.USERNAME, client.username)],
        integrity_key=client.key,
    )
    response = h.send(no_transport).response
    assert error_code(response) == 400 and response.integrity_offset is None


V4, V6 = Family.V4, Family.V6
STACKS = {"ip4": {"public_ip6": None}, "ip6": {"public_ip4": None}, "dual": {}}


@pytest.mark.parametrize(
    ("stack", "requested", "additional", "expected"),
    [
        ("ip4", None, None, (V4,)),
        ("dual", None, None, (V4,)),
        ("ip4", V4, None, (V4,)),
        ("ip6", V6, None, (V6,)),
        ("dual", V6, None, (V6,)),
        ("dual", None, V6, (V4, V6)),
        ("ip4", None, V6, (V4,)),
        ("ip6", None, V6, (V6,)),
        ("dual", V4, V6, 400),
        ("dual", None, V4, 400),
        ("ip6", None, None, 440),
        ("ip6", V4, None, 440),
        ("ip4", V6, None, 440),
    ],
)
def test_address_family_table(
    stack: str, requested: Family | None, additional: Family | None, expected: object
) -> None:
    h = Harness(**STACKS[stack])
    sender = CLIENT
    out = h.allocate(h.client(), sender, requested_family=requested, additional_family=additional)
    if isinstance(expected, int):
        assert error_code(out.response) == expected
        return
    port = out.others[0].port  # type: ignore[union-attr]
    assert out.others == [CreateAllocation(port, f) for f in expected]
    relayed = out.response.get_all(Attr.XOR_RELAYED_ADDRESS)
    public = {V4: PUBLIC4, V6: PUBLIC6}
    assert relayed == [(public[f], port) for f in expected]
    address_error = out.response.get(Attr.ADDRESS_ERROR_CODE)
    if additional is not None and len(expected) == 1:
        assert address_error[0] == (V6 if expected == (V4,) else V4)
        assert address_error[1] == 440
    else:
        assert address_error is None


def test_port_exhaustion_is_508() -> None:
    h = Harness(lowest_port=50000, highest_port=50002)
    for i in range(3):
        out = h.allocate(h.client(f"s{i}"), sender=("93.184.216.34", 41000 + i))
        assert is_success(out.response)
    assert error_code(h.allocate(h.client("s9"), sender=("93.184.216.34", 41009)).response) == 508


def test_allocation_quotas() -> None:
    h = Harness(max_allocations=2)
    for i in range(2):
        h.allocate(h.client(f"s{i}"), sender=("93.184.216.34", 41000 + i))
    assert error_code(h.allocate(h.client("s9"), sender=("93.184.216.34", 41009)).response) == 508
    rest = Harness(auth_scheme="rest", realm="example.org", max_allocations_per_user=1)
    ok = rest.allocate(rest.client("alice"), sender=("93.184.216.34", 41000))
    assert is_success(ok.response)
    other_expiry = rest.client("alice", expiry=int(rest.now) + 7200)
    out = rest.allocate(other_expiry, sender=("93.184.216.34", 41001))
    assert error_code(out.response) == 486


# --- 13-19. Channels and the data path ---------------------------------------------------


def _bound(h: Harness, channel: int = 0x4000, peer: tuple[str, int] = PEER):  # type: ignore[no-untyped-def]
    client = h.client()
    port = h.allocate(client, additional_family=V6).others[0].port  # type: ignore[union-attr]
    out = h.send(client.channel_bind(channel, peer))
    return client, port, out


def test_channel_bind_emits_binding_before_success() -> None:
    h = Harness()
    client, port, out = _bound(h)
    assert out.commands[0] == CreateChannelBinding(five_tuple(CLIENT), 0x4000, PEER, port)
    assert is_success(out.response) and client.verify(out.response)
    assert [t for t, _ in out.response.attributes] == [Attr.SOFTWARE, Attr.MESSAGE_INTEGRITY]
    assert h.server.num_active_channels == 1


def test_data_path_both_ways() -> None:
    h = Harness()
    _, port, _ = _bound(h)
    datagram = channel_data.encode(0x4000, b"hello") + b"\x00\x00\x00"  # padded
    out = h.send(datagram)
    # padded ChannelData: the payload without the padding
    assert out.relay == ToPeer(port, PEER, slice(4, 9)) and out.commands == []
    assert datagram[4:9] == b"hello"
    back = h.peer(b"world", PEER, port)
    assert back.route == ToClient(five_tuple(CLIENT), 0x4000)  # type: ignore[attr-defined]
    assert h.server.stats.relayed_packets_userspace == 2
    unpadded = channel_data.encode(0x4000, b"hello!!!")
    route = h.send(unpadded).relay
    # unpadded: the channel's route itself, built once when it was bound
    assert route == ToPeer(port, PEER, slice(4, None)) and unpadded[route.span] == b"hello!!!"
    assert h.send(unpadded).relay is route


@pytest.mark.parametrize(
    "datagram",
    [
        channel_data.encode(0x4001, b"x"),  # unknown channel
        b"\x40\x00\x00\x09short",  # length lies
        b"\x40\x00\x00",  # truncated header
        b"\x50\x00\x00\x01x",  # outside the channel range
        b"\xff" * 30,  # not TURN at all
        b"",
    ],
)
def test_bad_channel_data_is_dropped(datagram: bytes) -> None:
    h = Harness()
    _bound(h)
    out = h.send(datagram)
    assert out.relay is None and out.commands == []


def test_unknown_peer_without_permission_is_dropped() -> None:
    h = Harness()
    _, port, _ = _bound(h)
    back = h.peer(b"x", ("1.2.3.4", 9), port)
    assert back.route is None and back.commands == []  # type: ignore[attr-defined]


def test_channel_lifecycle_expiry_cooldown_and_rebind() -> None:
    h = Harness()
    client, port, _ = _bound(h)
    h.send(client.refresh(3600))
    commands = h.advance(600)
    assert DeleteChannelBinding(five_tuple(CLIENT), 0x4000, PEER, port) in commands
    assert h.send(channel_data.encode(0x4000, b"x")).relay is None
    # during the cooldown
    other_peer = ("8.8.8.8", 53)
    assert error_code(h.send(client.channel_bind(0x4000, other_peer)).response) == 400
    assert error_code(h.send(client.channel_bind(0x4001, PEER)).response) == 400
    out = h.send(client.channel_bind(0x4000, PEER))
    assert out.commands[0] == CreateChannelBinding(five_tuple(CLIENT), 0x4000, PEER, port)
    assert h.send(channel_data.encode(0x4000, b"x")).relay is not None
    # expire again and wait out the cooldown: the number is free for another peer
    h.send(client.refresh(3600))
    h.advance(600)
    h.advance(300)
    assert is_success(h.send(client.channel_bind(0x4000, other_peer)).response)


def test_channel_refresh_moves_the_expiry() -> None:
    h = Harness()
    client, port, _ = _bound(h)
    h.send(client.refresh(3600))
    h.advance(500)
    out = h.send(client.channel_bind(0x4000, PEER))
    assert out.commands[0] == CreateChannelBinding(five_tuple(CLIENT), 0x4000, PEER, port)
    assert DeleteChannelBinding(five_tuple(CLIENT), 0x4000, PEER, port) not in h.advance(200)
    assert DeleteChannelBinding(five_tuple(CLIENT), 0x4000, PEER, port) in h.advance(400)


def test_peer_family_must_be_served_443() -> None:
    h = Harness()
    client = h.client()
    h.allocate(client)  # IPv4 only
    assert error_code(h.send(client.channel_bind(0x4000, PEER6)).response) == 443
    h6 = Harness()
    client6 = h6.client()
    h6.allocate(client6, requested_family=V6)
    assert error_code(h6.send(client6.channel_bind(0x4000, PEER)).response) == 443
    dual = Harness()
    client_d = dual.client()
    dual.allocate(client_d, additional_family=V6)
    assert is_success(dual.send(client_d.channel_bind(0x4000, PEER)).response)
    assert is_success(dual.send(client_d.channel_bind(0x4001, PEER6)).response)


def test_channel_bind_errors() -> None:
    h = Harness()
    client = h.client()
    h.authenticate(client)
    assert error_code(h.send(client.channel_bind(0x4000, PEER)).response) == 437
    missing = client.request(Method.CHANNEL_BIND, [(Attr.CHANNEL_NUMBER, 0x4000)])
    response = h.send(missing).response
    assert error_code(response) == 400 and response.integrity_offset is None
    h.allocate(client)
    assert error_code(h.send(client.channel_bind(0x5000, PEER)).response) == 400
    assert error_code(h.send(client.channel_bind(0x3FFF, PEER)).response) == 400


def test_deleting_an_allocation_deletes_its_channels_first() -> None:
    h = Harness()
    client, port, _ = _bound(h)
    h.send(client.channel_bind(0x4001, PEER6))
    out = h.send(client.refresh(0))
    assert out.others == [
        DeleteChannelBinding(five_tuple(CLIENT), 0x4000, PEER, port),
        DeleteChannelBinding(five_tuple(CLIENT), 0x4001, PEER6, port),
        FreeAllocation(port, V4),
        FreeAllocation(port, V6),
    ]
    assert h.server.num_active_channels == 0


def test_channel_quota() -> None:
    h = Harness(max_channels_per_allocation=1)
    client, _, _ = _bound(h)
    assert error_code(h.send(client.channel_bind(0x4001, ("8.8.8.8", 1))).response) == 508


def test_portal_cap_lets_every_channel_number_bind_and_cool_down() -> None:
    """Portal mode's cap is the whole number space: connlib binding one channel per remote
    candidate up through 0x4FFF never meets 508, neither with numbers still cooling down
    after expiry nor when it rebinds them; the memory this bounds is per allocation."""
    h = Harness(max_channels_per_allocation=CHANNEL_NUMBERS)
    client, _, _ = _bound(h)
    peers = {n: (f"8.8.{n >> 8 & 0xFF}.{n & 0xFF}", 4000 + n % 1000) for n in range(0x4001, 0x5000)}
    for number, peer in peers.items():
        out = h.send(client.channel_bind(number, peer))
        assert is_success(out.response), hex(number)
    assert h.server.num_active_channels == CHANNEL_NUMBERS
    h.server.check_invariants()
    h.advance(300)
    assert is_success(h.send(client.refresh(600)).response)
    h.advance(300 + 1)  # every channel expires; the numbers cool down for 5 minutes
    assert h.server.num_active_channels == 0
    for number in (0x4000, 0x4ABC, 0x4FFF):
        peer = peers.get(number, PEER)
        assert is_success(h.send(client.channel_bind(number, peer)).response), hex(number)
    h.server.check_invariants()


# --- 20. Permissions, Send and Data indications -------------------------------------------


def test_create_permission_needs_an_allocation() -> None:
    h = Harness()
    client = h.client()
    h.authenticate(client)
    assert error_code(h.send(client.create_permission(PEER)).response) == 437


def test_send_and_data_indications_follow_permissions() -> None:
    h = Harness()
    client = h.client()
    port = h.allocate(client).others[0].port  # type: ignore[union-attr]
    indication = client.send_indication(PEER, b"ping")
    assert h.send(indication).relay is None  # no permission yet
    assert h.peer(b"x", PEER, port).commands == []
    response = h.send(client.create_permission(PEER)).response
    assert is_success(response) and client.verify(response)
    out = h.send(indication)
    assert out.relay is not None
    assert isinstance(out.relay, ToPeer)
    relay_port, peer, span = out.relay
    assert (relay_port, peer, indication[span]) == (port, PEER, b"ping")
    # any port of a permitted IP may answer; it arrives as a Data indication
    back = h.peer(b"pong", ("8.8.4.4", 6000), port)
    (message,) = back.messages
    assert (message.method, message.cls) == (Method.DATA, Class.INDICATION)
    assert message.get(Attr.XOR_PEER_ADDRESS) == ("8.8.4.4", 6000)
    assert message.get(Attr.DATA) == b"pong"
    assert back.commands[0].recipient == five_tuple(CLIENT)  # type: ignore[union-attr]
    # permissions last 300 s and data does not refresh them
    h.advance(299)
    h.send(indication)
    h.advance(1)
    assert h.send(indication).relay is None
    assert h.peer(b"x", PEER, port).commands == []


def test_channel_bind_installs_a_permission() -> None:
    h = Harness()
    _, port, _ = _bound(h)
    (message,) = h.peer(b"hi", ("8.8.4.4", 7777), port).messages
    assert message.get(Attr.DATA) == b"hi"


def test_permission_errors() -> None:
    h = Harness()
    client = h.client()
    h.allocate(client)
    assert error_code(h.send(client.create_permission()).response) == 400
    assert error_code(h.send(client.create_permission(PEER6)).response) == 443
    assert error_code(h.send(client.create_permission(("127.0.0.1", 1))).response) == 403
    small = Harness(max_permissions_per_allocation=1)
    c = small.client()
    small.allocate(c)
    assert is_success(small.send(c.create_permission(PEER)).response)
    assert error_code(small.send(c.create_permission(("8.8.8.8", 1))).response) == 508


# --- 21. Garbage and unsupported messages ------------------------------------------------


def test_unknown_method_is_400_and_non_requests_are_dropped() -> None:
    h = Harness()
    unknown = stun.encode(0x00A, Class.REQUEST, bytes(12), [])
    assert error_code(h.send(unknown).response) == 400
    for cls in (Class.SUCCESS, Class.ERROR, Class.INDICATION):
        assert h.send(stun.encode(Method.BINDING, cls, bytes(12), [])).commands == []
    binding = h.client().binding()
    assert h.send(binding + b"\x00\x00\x00\x00").commands == []
    for first in (0x04, 0x3F, 0x50, 0xFF):
        assert h.send(bytes([first]) + binding[1:]).commands == []


def test_unknown_comprehension_required_attribute_is_420() -> None:
    h = Harness()
    request = stun.encode(Method.ALLOCATE, Class.REQUEST, bytes(12), [(0x0031, b"xx")])
    response = h.send(request).response
    assert error_code(response) == 420
    assert response.get(Attr.UNKNOWN_ATTRIBUTES) == (0x0031,)
    optional = stun.encode(Method.BINDING, Class.REQUEST, bytes(12), [(0xC0DE, b"xx")])
    assert is_success(h.send(optional).response)


def test_even_port_is_understood() -> None:
    h = Harness()
    out = h.allocate(h.client(), extra=[(Attr.EVEN_PORT, False)])
    assert is_success(out.response)
    assert out.others[0].port % 2 == 0  # type: ignore[union-attr]
    reserving = h.allocate(h.client("r"), ("93.184.216.34", 41001), extra=[(Attr.EVEN_PORT, True)])
    port = reserving.others[0].port  # type: ignore[union-attr]
    token = reserving.response.get(Attr.RESERVATION_TOKEN)
    assert port % 2 == 0 and token is not None
    claim = h.allocate(
        h.client("t"), ("93.184.216.34", 41002), extra=[(Attr.RESERVATION_TOKEN, token)]
    )
    assert claim.others == [CreateAllocation(port + 1, V4)]
    again = h.allocate(
        h.client("u"), ("93.184.216.34", 41003), extra=[(Attr.RESERVATION_TOKEN, token)]
    )
    assert error_code(again.response) == 508


def test_dont_fragment_is_honoured() -> None:
    h = Harness()
    out = h.allocate(h.client(), extra=[(Attr.DONT_FRAGMENT, True)])
    assert is_success(out.response)
    assert out.others[0].dont_fragment  # type: ignore[union-attr]
    assert not h.allocate(h.client("x"), ("93.184.216.34", 41000)).others[0].dont_fragment  # type: ignore[union-attr]


def test_message_integrity_sha256_is_verified_and_answered_in_kind() -> None:
    h = Harness()
    client = h.client()
    h.authenticate(client)
    attrs = [
        (Attr.REQUESTED_TRANSPORT, 17),
        (Attr.USERNAME, client.username),
        (Attr.REALM, client.realm),
        (Attr.NONCE, client.nonce),
    ]
    request = stun.encode(
        Method.ALLOCATE,
        Class.REQUEST,
        bytes(12),
        attrs,
        integrity_key=client.key,
        integrity_sha256=True,
    )
    response = h.send(request).response
    assert is_success(response)
    assert response.integrity_sha256_offset is not None and response.integrity_offset is None
    assert stun.verify_integrity(response, client.key)


# --- 22. Dual allocations ------------------------------------------------------------------


def test_dual_allocation_serves_both_families_on_one_port() -> None:
    h = Harness()
    out = h.allocate(h.client(), additional_family=V6)
    port = out.others[0].port  # type: ignore[union-attr]
    assert out.others == [CreateAllocation(port, V4), CreateAllocation(port, V6)]
    assert out.response.get_all(Attr.XOR_RELAYED_ADDRESS) == [(PUBLIC4, port), (PUBLIC6, port)]


def test_refresh_zero_with_family_frees_one_half_of_a_dual_allocation() -> None:
    h = Harness()
    client = h.client()
    port = h.allocate(client, additional_family=V6).others[0].port  # type: ignore[union-attr]
    request = client.request(
        Method.REFRESH, [(Attr.LIFETIME, 0), (Attr.REQUESTED_ADDRESS_FAMILY, V6)]
    )
    out = h.send(request)
    assert out.others == [FreeAllocation(port, V6)]
    assert h.server.num_allocations == 1
    assert error_code(h.send(client.channel_bind(0x4000, PEER6)).response) == 443


# --- 23. Credentials -----------------------------------------------------------------------


def test_firezone_password_vectors() -> None:
    secret = "4c98bf59c99b3e467ecd7cf9d6b3e5279645fca59be67bc5bb4af3cf653761ab"
    assert (
        firezone_password(secret, 1892160000, "n23JJ2wKKtt30oXi")
        == "00hqldgk5xLeKKOB+xls9mHMVtgqzie9DulfgQwMv68"
    )
    assert (
        firezone_password("1cab293a-4032-46f4-862a-40e5d174b0d2", 1685984278, "uvdgKvS9GXYZ_vmv")
        == "6xUIoZ+QvxKhRasLifwfRkMXl+ETLJUsFkHlXjlHAkg"
    )


def test_rest_scheme_end_to_end() -> None:
    h = Harness(auth_scheme="rest", realm="example.org")
    client = h.client("bob")
    out = h.allocate(client)
    assert is_success(out.response) and client.realm == "example.org"
    assert client.verify(out.response)


# --- Peer policy in requests and the relay-loop exception ----------------------------------


def test_peer_policy_applies_to_channel_bind() -> None:
    h = Harness()
    client, _, _ = _bound(h)
    for peer in [
        ("127.0.0.1", 9),
        ("10.0.0.1", 9),
        ("169.254.169.254", 80),
        ("::ffff:127.0.0.1", 9),
    ]:
        family_ok = h.send(client.channel_bind(0x4100, peer)).response
        assert error_code(family_ok) == 403, peer
    assert error_code(h.send(client.channel_bind(0x4100, (PUBLIC4, 3478))).response) == 403
    # our own address: only a live allocation's port (issue 9.3)
    assert error_code(h.send(client.channel_bind(0x4100, (PUBLIC4, 50000))).response) == 403
    own = h.server._allocations[five_tuple(CLIENT)].port
    assert is_success(h.send(client.channel_bind(0x4100, (PUBLIC4, own))).response)


def test_allowing_loopback_peers() -> None:
    h = Harness(allow_loopback_peers=True)
    client, _, _ = _bound(h)
    assert is_success(h.send(client.channel_bind(0x4100, ("127.0.0.1", 9))).response)
    assert error_code(h.send(client.channel_bind(0x4101, ("10.0.0.1", 9))).response) == 403


# --- I/O feedback, shutdown, counters ---------------------------------------------------


def test_failed_bind_moves_the_allocation_to_another_port() -> None:
    """Issue 9.11: a port held by another local socket costs a retry, not the Allocate."""
    h = Harness()
    client = h.client()
    h.authenticate(client)
    request = client.allocate(additional_family=V6)
    h.server.handle_client_input(request, five_tuple(CLIENT), h.now)
    first = h.server.next_command()
    assert isinstance(first, CreateAllocation)
    h.server.handle_allocation_failed(first.port, h.now)
    rest = h.drain()
    moved = [c for c in rest if isinstance(c, CreateAllocation)]
    assert [c.family for c in moved] == [V4, V6] and moved[0].port != first.port
    assert all(c.port == moved[0].port for c in moved)  # the failed port's V6 bind is gone
    assert not any(isinstance(c, FreeAllocation) for c in rest)
    assert isinstance(rest[-1], SendMessage)  # sockets before the response
    response = stun.parse(rest[-1].payload)
    assert is_success(response) and client.verify(response)
    assert response.get(Attr.XOR_RELAYED_ADDRESS) == (PUBLIC4, moved[0].port)
    assert h.server.num_allocations == 1
    # a retransmission gets the moved response from the cache
    assert h.send(request).commands == [rest[-1]]


def test_failed_bind_of_an_even_port_allocation_answers_508() -> None:
    h = Harness()
    client = h.client()
    h.authenticate(client)
    h.server.handle_client_input(
        client.allocate(extra=[(Attr.EVEN_PORT, True)]), five_tuple(CLIENT), h.now
    )
    command = h.server.next_command()
    assert isinstance(command, CreateAllocation)
    h.server.handle_allocation_failed(command.port, h.now)
    assert error_code(stun.parse(h.drain()[0].payload)) == 508  # type: ignore[union-attr]


def test_failed_binds_answer_508_after_bounded_tries() -> None:
    h = Harness()
    client = h.client()
    h.authenticate(client)
    h.server.handle_client_input(client.allocate(), five_tuple(CLIENT), h.now)
    tried = []
    for _ in range(MAX_BIND_ATTEMPTS):
        command = h.server.next_command()
        assert isinstance(command, CreateAllocation)
        tried.append(command.port)
        h.server.handle_allocation_failed(command.port, h.now)
    assert len(set(tried)) == MAX_BIND_ATTEMPTS
    rest = h.drain()
    assert rest[1] == FreeAllocation(tried[-1], V4)
    response = stun.parse(rest[0].payload)  # type: ignore[union-attr]
    assert error_code(response) == 508 and client.verify(response)
    assert h.server.num_allocations == 0
    retry = h.send(client.allocate())
    assert is_success(retry.response)
    assert retry.others[0].port not in tried  # type: ignore[union-attr]


def test_free_all_undoes_everything() -> None:
    h = Harness()
    _, port, _ = _bound(h)
    h.server.free_all()
    assert h.drain() == [
        DeleteChannelBinding(five_tuple(CLIENT), 0x4000, PEER, port),
        FreeAllocation(port, V4),
        FreeAllocation(port, V6),
    ]


def test_response_counters() -> None:
    h = Harness()
    h.allocate(h.client())
    responses = h.server.stats.responses
    assert responses[("error", "allocate", 401)] == 1
    assert responses[("success", "allocate", None)] == 1


def test_timers_come_from_a_heap_not_a_scan() -> None:
    h = Harness()
    for i in range(200):
        h.allocate(h.client(f"s{i}"), ("93.184.216.34", 42000 + i), lifetime=600 + i)
    assert h.server.poll_timeout() == h.now + 600
    h.advance(600)
    assert h.server.num_allocations == 199


def test_channel_data_header_fits_the_documented_struct() -> None:
    h = Harness()
    _, port, _ = _bound(h)
    client, channel = h.peer(b"abc", PEER, port).route  # type: ignore[attr-defined]
    assert struct.pack("!HH", channel, 3) + b"abc" == channel_data.encode(0x4000, b"abc")
    assert client == five_tuple(CLIENT)


def test_several_allocations_per_username_when_allowed() -> None:
    h = Harness(single_allocation_per_username=False)
    client = h.client()
    h.allocate(client)
    client.nonce = None
    out = h.allocate(client, sender=("93.184.216.34", 40001))
    assert is_success(out.response) and not any(isinstance(c, FreeAllocation) for c in out.others)
    assert h.server.num_allocations == 2


def test_unauthenticated_answers_are_rate_limited_per_source() -> None:
    h = Harness(unauthenticated_rate_limit=5.0)
    binding = h.client().binding()
    answered = sum(len(h.send(binding, ("198.51.100.9", 1000 + i)).commands) for i in range(50))
    assert answered == 10  # the burst
    assert h.server.stats.rate_limited == 40
    assert len(h.send(binding, ("198.51.100.10", 1)).commands) == 1  # another source
    h.now += 1.0
    assert len(h.send(binding, ("198.51.100.9", 1)).commands) == 1  # refilled
    client = h.client()  # authenticated traffic is never limited
    for _ in range(3):
        h.now += 0.2
        client.nonce = None
        h.authenticate(client, ("198.51.100.11", 7))
    assert is_success(h.allocate(client, ("198.51.100.11", 7)).response)
    for _ in range(20):
        assert is_success(h.send(client.refresh(600), ("198.51.100.11", 7)).response)


def test_rate_limiter_memory_is_bounded() -> None:
    from firezone_relay.protocol.ratelimit import RateLimiter

    limiter = RateLimiter(1.0, max_sources=100)
    for i in range(10_000):
        limiter.allow(f"10.0.{i // 256}.{i % 256}", 0.0)
    assert len(limiter) == 100


# --- The relay loop: both ends are allocations on this relay -------------------------------

CLIENT_B = ("198.51.200.7", 50000)


def _two_allocations(h: Harness):  # type: ignore[no-untyped-def]
    a, b = h.client("client-a"), h.client("gateway-b")
    port_a = h.allocate(a).others[0].port  # type: ignore[union-attr]
    port_b = h.allocate(b, CLIENT_B).others[0].port  # type: ignore[union-attr]
    return a, b, port_a, port_b


def test_relay_loop_channel_to_channel_is_delivered_in_place() -> None:
    h = Harness()
    a, b, port_a, port_b = _two_allocations(h)
    assert is_success(h.send(a.channel_bind(0x4000, (PUBLIC4, port_b))).response)
    assert is_success(h.send(b.channel_bind(0x4ABC, (PUBLIC4, port_a)), CLIENT_B).response)
    out = h.send(channel_data.encode(0x4000, b"through the loop"))
    assert out.relay == LoopToClient(five_tuple(CLIENT_B), 0x4ABC, len(b"through the loop"))
    assert out.commands == []
    back = h.send(channel_data.encode(0x4ABC, b"and back"), CLIENT_B)
    assert back.relay == LoopToClient(five_tuple(CLIENT), 0x4000, len(b"and back"))


def test_relay_loop_without_a_channel_on_the_far_side_uses_its_permissions() -> None:
    h = Harness()
    a, b, port_a, port_b = _two_allocations(h)
    h.send(a.channel_bind(0x4000, (PUBLIC4, port_b)))
    assert h.send(channel_data.encode(0x4000, b"x")).commands == []  # no permission on B
    h.send(b.create_permission((PUBLIC4, 1)), CLIENT_B)
    (indication,) = h.send(channel_data.encode(0x4000, b"hello b")).messages
    assert indication.method == Method.DATA
    assert indication.get(Attr.XOR_PEER_ADDRESS) == (PUBLIC4, port_a)
    assert indication.get(Attr.DATA) == b"hello b"
    # and a Send indication from B to A's relayed address reaches A's channel
    out = h.send(b.send_indication((PUBLIC4, port_a), b"hi a"), CLIENT_B)
    assert out.relay is None  # no channel on A for B yet: A has a permission (its ChannelBind)
    (to_a,) = out.commands
    assert to_a.recipient == five_tuple(CLIENT)  # type: ignore[union-attr]
    assert channel_data.decode(to_a.payload) == (0x4000, b"hi a")  # type: ignore[union-attr]


def test_own_address_port_without_an_allocation_is_refused() -> None:
    """Issue 9.3: a port of our range without an allocation may be any local socket."""
    h = Harness(public_ip4="127.0.0.1", public_ip6=None, allow_loopback_peers=True)
    client = h.client()
    port = h.allocate(client).others[0].port  # type: ignore[union-attr]
    lab_peer = ("127.0.0.1", port + 1 if port < 65535 else port - 1)
    assert error_code(h.send(client.channel_bind(0x4000, lab_peer)).response) == 403
    h.send(client.create_permission(lab_peer))
    out = h.send(client.send_indication(lab_peer, b"abc"))
    assert out.relay is None and out.commands == []


@pytest.mark.parametrize(("scheme", "single"), [("firezone", True), ("rest", False)])
def test_username_rule_follows_the_scheme_by_default(scheme: str, single: bool) -> None:
    h = Harness(auth_scheme=scheme)
    client = h.client("shared")
    h.allocate(client)
    client.nonce = None
    assert is_success(h.allocate(client, sender=("93.184.216.34", 40001)).response)
    assert h.server.num_allocations == (1 if single else 2)


def test_the_relays_own_private_address_is_refused_behind_nat() -> None:
    h = Harness(allow_private_peers=True, local_addresses=frozenset({"172.31.0.10"}))
    client, _, _ = _bound(h)
    assert error_code(h.send(client.channel_bind(0x4100, ("172.31.0.10", 3478))).response) == 403
    assert error_code(h.send(client.channel_bind(0x4101, ("172.31.0.10", 22))).response) == 403
    assert is_success(h.send(client.channel_bind(0x4102, ("172.31.0.11", 3478))).response)


def test_drops_are_counted_by_kind() -> None:
    h = Harness()
    _, port, _ = _bound(h)
    h.send(channel_data.encode(0x4444, b"x"))  # well-formed, no such channel
    h.peer(b"x", ("1.2.3.4", 9), port)  # no permission for that peer
    assert h.server.stats.unroutable_datagrams == 2
    h.send(b"\xff" * 8)  # not TURN
    assert h.server.stats.dropped_datagrams == 1


def test_time_scale_shrinks_durations_but_not_the_wire_values() -> None:
    h = Harness(time_scale=0.01)
    client, port, _ = _bound(h)
    assert h.server.poll_timeout() == pytest.approx(h.now + 3.0)  # the 300 s permission
    h.advance(2.9)
    assert h.send(client.refresh(1200)).response.get(Attr.LIFETIME) == 1200  # 12 s here
    assert DeleteChannelBinding(five_tuple(CLIENT), 0x4000, PEER, port) in h.advance(
        3.2
    )  # 600 s: 6 s
    assert h.advance(8.7) == []
    assert FreeAllocation(port, V4) in h.advance(0.3)
