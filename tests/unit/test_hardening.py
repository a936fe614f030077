"""Issue 9 (hostile input) and issue 10.1 (connlib's credential rotation) on the sans-IO core."""

from __future__ import annotations

import random

import pytest

from firezone_relay.protocol import stun
from firezone_relay.protocol.auth import Nonces, parse_username, secret_bits
from firezone_relay.protocol.commands import CreateAllocation
from firezone_relay.protocol.config import DEFAULT_MAX_ALLOCATIONS_PER_USER, ServerConfig
from firezone_relay.protocol.server import MAX_PEERS_PER_REQUEST, Server
from firezone_relay.protocol.stun import Attr, Class, Method
from firezone_relay.protocol.transactions import ENTRY_OVERHEAD, TransactionCache
from simulations import channel_data
from simulations.turn_client import TurnClient
from tests.unit.harness import CLIENT, PEER, PUBLIC4, Harness, error_code, five_tuple, is_success

# --- 9.1 attribute parsing ------------------------------------------------------------------


def _unknown_attributes(count: int) -> bytes:
    return stun.encode(
        Method.BINDING,
        Class.REQUEST,
        bytes(12),
        [(0x0100 + i % 0x7000, b"") for i in range(count)],
    )


def test_attribute_count_is_capped() -> None:
    assert len(stun.parse(_unknown_attributes(stun.MAX_ATTRIBUTES)).attributes) == 64
    with pytest.raises(stun.ParseError):
        stun.parse(_unknown_attributes(stun.MAX_ATTRIBUTES + 1))


def test_the_quadratic_datagram_is_dropped_unanswered() -> None:
    h = Harness()
    datagram = _unknown_attributes(16_000)  # ~64 KB of distinct unknown attributes
    assert len(datagram) > 60_000
    assert h.send(datagram).commands == []
    assert h.server.stats.dropped_datagrams == 1


def test_unknown_attributes_are_listed_once_in_wire_order() -> None:
    message = stun.encode(
        Method.BINDING, Class.REQUEST, bytes(12), [(0x7001, b""), (0x0123, b""), (0x7001, b"")]
    )
    assert stun.parse(message).unknown_comprehension_required() == [0x7001, 0x0123]


# --- 9.3 the relay's own and host addresses -------------------------------------------------


def test_host_addresses_are_refused_even_when_private_peers_are_allowed() -> None:
    h = Harness(allow_private_peers=True, local_addresses=frozenset({"10.0.0.5", "127.0.0.1"}))
    client = h.client()
    h.allocate(client)
    for peer in [("10.0.0.5", 51820), ("127.0.0.1", 50000), (PUBLIC4, 22)]:
        assert error_code(h.send(client.channel_bind(0x4000, peer)).response) == 403, peer
    assert is_success(h.send(client.channel_bind(0x4000, ("10.0.0.6", 51820))).response)


def test_relay_loop_channel_to_a_freed_allocation_is_dropped() -> None:
    h = Harness()
    a, b = h.client("a"), h.client("b")
    h.allocate(a)
    port_b = h.allocate(b, ("198.51.200.7", 50000)).others[0].port  # type: ignore[union-attr]
    assert is_success(h.send(a.channel_bind(0x4000, (PUBLIC4, port_b))).response)
    h.send(b.refresh(0), ("198.51.200.7", 50000))  # B goes away; its port may be anyone's
    out = h.send(channel_data.encode(0x4000, b"to a local socket?"))
    assert out.relay is None and out.commands == []


# --- 9.4 memory per request -----------------------------------------------------------------


def _allocated(h: Harness) -> TurnClient:
    client = h.client()
    assert is_success(h.allocate(client).response)
    return client


def test_create_permission_dedupes_its_peers() -> None:
    h = Harness()
    client = _allocated(h)
    timers = len(h.server._timers)
    copies = [(PEER[0], 1000 + i) for i in range(50)]  # one address, many ports
    assert is_success(h.send(client.create_permission(*copies)).response)
    assert len(h.server._timers) == timers + 1


def test_create_permission_caps_distinct_peers_with_508() -> None:
    h = Harness()
    client = _allocated(h)
    peers = [(f"8.8.{i}.1", 9) for i in range(MAX_PEERS_PER_REQUEST + 1)]
    assert error_code(h.send(client.create_permission(*peers)).response) == 508
    assert is_success(h.send(client.create_permission(*peers[:-1])).response)


def test_refreshing_in_a_loop_does_not_grow_the_timer_heap() -> None:
    h = Harness()
    client = _allocated(h)
    h.send(client.create_permission(PEER))
    h.send(client.channel_bind(0x4000, ("8.8.8.8", 9)))
    timers = len(h.server._timers)
    for _ in range(50):
        h.advance(5)
        h.send(client.refresh(600))
        h.send(client.create_permission(PEER))
        h.send(client.channel_bind(0x4000, ("8.8.8.8", 9)))
    assert len(h.server._timers) == timers
    # and the refreshed deadlines still hold: nothing expires early
    h.advance(100)
    assert (
        h.server.num_allocations == 1
        and PEER[0] in h.server._allocations[five_tuple(CLIENT)].permissions
    )
    assert h.server.num_active_channels == 1


def test_transaction_cache_keeps_a_digest_not_the_request() -> None:
    h = Harness()
    client = _allocated(h)
    padded = client.request(Method.REFRESH, [(0x8F00, b"\x00" * 60_000)])
    out = h.send(padded)
    assert is_success(out.response)
    cache = h.server._transactions
    assert cache.bytes < 2_000  # the allocation's and the refresh's responses
    assert h.send(padded).commands == out.commands  # a retransmission: the same answer


def test_transaction_cache_byte_budget() -> None:
    cache = TransactionCache(ttl=40.0, max_entries=1000, max_bytes=10 * (100 + ENTRY_OVERHEAD))
    for i in range(50):
        cache.store(("1.2.3.4", i), bytes(12), b"req", b"r" * 100, now=0.0)
    assert len(cache) == 10 and cache.bytes <= cache.max_bytes
    assert cache.lookup(("1.2.3.4", 49), bytes(12), b"req", 1.0) == b"r" * 100
    assert cache.lookup(("1.2.3.4", 49), bytes(12), b"other", 1.0) is None
    assert cache.lookup(("1.2.3.4", 0), bytes(12), b"req", 1.0) is None


# --- 9.5 floods -----------------------------------------------------------------------------


@pytest.mark.parametrize("expiry", ["01800003600", "001800003600", "١٨٠٠٠٠٣٦٠٠", "²", "+1", ""])
def test_expiry_must_be_canonical_ascii(expiry: str) -> None:
    assert parse_username("firezone", f"{expiry}:salt") is None
    assert parse_username("rest", f"{expiry}:alice") is None


def test_expiry_parse_accepts_the_canonical_form() -> None:
    assert parse_username("firezone", "1800003600:salt") is not None


def test_leading_zero_username_does_not_authenticate() -> None:
    h = Harness()
    client = h.client()
    alias = TurnClient(f"0{client.username}", client.password, rng=random.Random(3))
    out = h.allocate(alias)
    assert error_code(out.response) == 401 and h.server.num_allocations == 0


def test_rest_scheme_caps_allocations_per_user_by_default() -> None:
    h = Harness(auth_scheme="rest", lowest_port=40000, highest_port=40999)
    client = h.client("alice")
    for i in range(DEFAULT_MAX_ALLOCATIONS_PER_USER):
        client.nonce = None
        assert is_success(h.allocate(client, ("93.184.216.34", 1000 + i)).response)
    client.nonce = None
    assert error_code(h.allocate(client, ("93.184.216.34", 9999)).response) == 486


def test_total_cap_follows_the_port_range() -> None:
    config = ServerConfig(public_ip4=PUBLIC4, lowest_port=50000, highest_port=50009)
    assert config.allocation_limit == 10
    assert ServerConfig(public_ip4=PUBLIC4, max_allocations=3).allocation_limit == 3
    h = Harness(lowest_port=50000, highest_port=50001, max_allocations_per_user=100)
    for i in range(2):
        assert is_success(h.allocate(h.client(f"s{i}"), ("93.184.216.34", 2000 + i)).response)
    assert error_code(h.allocate(h.client("s9"), ("93.184.216.34", 2009)).response) == 508


def test_a_bug_logs_one_traceback_a_minute(caplog: pytest.LogCaptureFixture) -> None:
    h = Harness()

    def boom(*args: object) -> None:
        raise RuntimeError("bug")

    h.server._handle_stun = boom  # type: ignore[method-assign]
    for _ in range(100):
        h.send(h.client().binding())
    assert h.server.stats.internal_errors == 100
    assert len([r for r in caplog.records if r.exc_info]) == 1
    h.now += 60
    h.send(h.client().binding())
    assert len([r for r in caplog.records if r.exc_info]) == 2


# --- 9.7 / 9.8 unauthenticated answers --------------------------------------------------------


def test_signed_401s_count_against_the_rate_limit() -> None:
    h = Harness(unauthenticated_rate_limit=5)
    client = h.client()
    answered = 0
    for _ in range(200):
        client.nonce = None
        answered += len(h.send(client.allocate()).commands)
    assert answered == 10  # the burst; the clock does not move


def test_rest_challenges_are_unsigned_firezone_ones_signed() -> None:
    rest = Harness(auth_scheme="rest")
    challenge = rest.send(rest.client("bob").allocate()).response
    assert error_code(challenge) == 401 and challenge.integrity_offset is None
    firezone = Harness()
    client = firezone.client()
    challenge = firezone.send(client.allocate()).response
    assert error_code(challenge) == 401 and client.verify(challenge)


def test_secret_strength_estimate() -> None:
    assert secret_bits("system-test-secret") < 128
    assert secret_bits("0123456789abcdef" * 2) == 128
    assert secret_bits("correct horse battery staple, but a bit longer!") >= 128


# --- 9.9 / 9.10 secrets and nonce state -------------------------------------------------------


def test_seeded_rng_does_not_derive_keys_or_tokens() -> None:
    config = ServerConfig(public_ip4=PUBLIC4)
    one, two = Server(config, random.Random(1)), Server(config, random.Random(1))
    assert one.auth_secret != two.auth_secret
    assert one._auth.nonces.issue(five_tuple(CLIENT), 0) != two._auth.nonces.issue(
        five_tuple(CLIENT), 0
    )


def test_injected_token_source_is_used() -> None:
    server = Server(
        ServerConfig(public_ip4=PUBLIC4), random.Random(1), token_bytes=lambda n: b"\x07" * n
    )
    assert server.auth_secret == "07" * 32


def test_bogus_integrity_with_a_valid_nonce_creates_no_state() -> None:
    h = Harness()
    client = h.client()
    h.authenticate(client)
    forged = TurnClient(client.username, "wrong", realm=client.realm, nonce=client.nonce)
    for port in range(1000, 1100):
        sender = (CLIENT[0], port)
        forged.nonce = h.server._auth.nonces.issue(five_tuple(sender), h.now)
        assert error_code(h.send(forged.allocate(), sender).response) == 401
    assert len(h.server._auth.nonces) == 0
    assert is_success(h.send(client.allocate()).response)
    assert len(h.server._auth.nonces) == 1


def test_nonce_uses_are_counted_only_for_valid_requests() -> None:
    nonces = Nonces(b"k" * 32, max_uses=2)
    nonce = nonces.issue(five_tuple(CLIENT), 100.0)
    for _ in range(5):
        assert nonces.validate(nonce, five_tuple(CLIENT), 100.0) == "ok"
    nonces.consume(nonce, five_tuple(CLIENT))
    nonces.consume(nonce, five_tuple(CLIENT))
    assert nonces.validate(nonce, five_tuple(CLIENT), 100.0) == "stale"


# --- 10.1 credential rotation, as connlib does it ---------------------------------------------


def test_connlib_credential_rotation() -> None:
    """connlib (snownet allocation.rs / node/allocations.rs) replaces its Allocation on new
    credentials, from the same socket: Binding, Allocate -> 437, Refresh(0) -> delete,
    Allocate again. Only that delete may carry another username."""
    h = Harness()
    old = h.client("salt", expiry=int(h.now) + 3600)
    assert is_success(h.allocate(old).response)
    new = h.client("salt", expiry=int(h.now) + 7200)
    new.rng = random.Random("fresh transaction ids")
    h.authenticate(new)
    mismatch = h.send(new.allocate()).response
    assert error_code(mismatch) == 437 and new.verify(mismatch)
    # connlib never refreshes or binds with the new credentials on the old allocation:
    assert error_code(h.send(new.refresh(600)).response) == 441
    assert error_code(h.send(new.channel_bind(0x4000, PEER)).response) == 441
    assert error_code(h.send(new.create_permission(PEER)).response) == 441
    deleted = h.send(new.refresh(0))
    assert is_success(deleted.response) and new.verify(deleted.response)
    assert deleted.response.get(Attr.LIFETIME) == 0 and h.server.num_allocations == 0
    again = h.send(new.allocate())
    assert is_success(again.response) and new.verify(again.response)
    assert any(isinstance(c, CreateAllocation) for c in again.others)


def test_delete_with_invalid_other_credentials_is_refused() -> None:
    h = Harness()
    assert is_success(h.allocate(h.client("salt")).response)
    forged = TurnClient(f"{int(h.now) + 60}:other", "not the password", rng=random.Random(9))
    h.authenticate(forged)
    assert error_code(h.send(forged.refresh(0)).response) == 401
    assert h.server.num_allocations == 1
