"""The core's side of the operator verbs: per-allocation counters on every userspace path,
``--allocation-rate-limit``, disconnect, drain, several accepted secrets, and reloaded peer
lists."""

from __future__ import annotations

from firezone_relay.protocol.allocations import COUNTERS
from firezone_relay.protocol.auth import firezone_password
from firezone_relay.protocol.rate_limit import ByteBucket, burst_for
from simulations import channel_data
from tests.unit.harness import CLIENT, PEER, Harness, error_code, is_success

CLIENT_B = ("198.51.200.7", 50000)


def counters(h: Harness, port: int) -> dict[str, int]:
    allocation = h.server.allocation_on(port)
    assert allocation is not None
    return dict(zip(COUNTERS, allocation.traffic(), strict=True))


def test_each_allocation_counts_its_datagrams_and_bytes_each_way() -> None:
    h = Harness()
    client = h.client()
    port = h.allocate(client).others[0].port  # type: ignore[union-attr]
    assert is_success(h.send(client.channel_bind(0x4000, PEER)).response)
    h.send(channel_data.encode(0x4000, b"a" * 150))
    h.send(client.send_indication(PEER, b"c" * 100))
    h.peer(b"b" * 250, PEER, port)
    h.peer(b"d" * 40, ("8.8.4.4", 6000), port)  # a Data indication
    counters_before = {
        "to_peer_datagrams": 2,
        "to_peer_bytes": 250,
        "to_client_datagrams": 2,
        "to_client_bytes": 290,
    }
    assert counters(h, port) == counters_before
    allocation = h.server.allocation_on(port)
    assert allocation is not None
    h.server.disconnect(allocation)  # unbinding moves the channel's counts to the allocation
    assert dict(zip(COUNTERS, allocation.counters, strict=True)) == counters_before


def test_the_bucket_passes_its_rate_and_drops_the_rest() -> None:
    bucket = ByteBucket(250_000, 0.0)
    passed = sum(1000 for i in range(10_000) if bucket.take(1000, i * 0.001))  # 1 MB/s for 10 s
    assert abs(passed - (250_000 * 10 + burst_for(250_000))) <= 1000
    assert not ByteBucket(1000, 0.0).take(65_536, 0.0)  # more than the bucket ever holds


def test_the_rate_limit_drops_and_counts_what_is_over_it_each_way() -> None:
    h = Harness(allocation_rate_limit=100_000)
    client = h.client()
    port = h.allocate(client).others[0].port  # type: ignore[union-attr]
    assert is_success(h.send(client.channel_bind(0x4000, PEER)).response)
    sent = [h.send(channel_data.encode(0x4000, b"x" * 1000)).relay for _ in range(100)]
    assert sum(r is not None for r in sent) == 65  # the bucket: 65535 bytes
    relayed_back = [h.peer(b"y" * 1000, PEER, port).route for _ in range(100)]  # type: ignore[attr-defined]
    assert sum(r is not None for r in relayed_back) == 65  # the other direction has its own
    h.now += 0.5  # 50 kB more each way
    assert sum(h.send(channel_data.encode(0x4000, b"x" * 1000)).relay is not None
               for _ in range(100)) == 50  # fmt: skip
    assert h.server.stats.allocation_rate_limited == 35 + 35 + 50
    assert counters(h, port)["to_peer_bytes"] == 115_000


def test_disconnect_frees_at_once_and_the_next_request_gets_437() -> None:
    h = Harness()
    client = h.client()
    port = h.allocate(client).others[0].port  # type: ignore[union-attr]
    assert is_success(h.send(client.channel_bind(0x4000, PEER)).response)
    allocation = h.server.allocation_on(port)
    assert allocation is not None and h.server.disconnect(allocation)
    assert not h.server.disconnect(allocation)
    freed = h.drain()
    assert {type(c).__name__ for c in freed} == {"DeleteChannelBinding", "FreeAllocation"}
    assert h.send(channel_data.encode(0x4000, b"late")).relay is None
    assert error_code(h.send(client.refresh(600)).response) == 437
    h.server.check_invariants()


def test_draining_refuses_new_allocations_and_keeps_the_old_ones() -> None:
    h = Harness()
    old, new = h.client("old"), h.client("new")
    assert is_success(h.allocate(old).response)
    h.server.draining = True
    assert error_code(h.allocate(new, CLIENT_B).response) == 508
    assert is_success(h.send(old.refresh(600)).response)


def test_every_accepted_secret_authenticates_and_the_first_signs() -> None:
    h = Harness()
    h.server.set_auth_secrets(("secret-b", "secret-a"))
    expiry = int(h.now) + 3600
    for salt, secret, sender in (("sa", "secret-a", CLIENT), ("sb", "secret-b", CLIENT_B)):
        client = h.client(salt)
        client.password = firezone_password(secret, expiry, salt)
        response = h.allocate(client, sender).response
        assert is_success(response) and client.verify(response)
    h.server.set_auth_secrets(("secret-b",))
    stale = h.client("sc")
    stale.password = firezone_password("secret-a", expiry, "sc")
    assert error_code(h.allocate(stale, ("198.51.200.8", 1)).response) == 401
    assert h.server.auth_secret == "secret-b"


def test_reloaded_peer_lists_judge_new_permissions() -> None:
    h = Harness()
    client = h.client()
    h.allocate(client)
    assert is_success(h.send(client.create_permission(PEER)).response)
    h.server.set_peer_lists((), ("8.8.4.0/24",))
    assert error_code(h.send(client.create_permission(PEER)).response) == 403
    h.server.set_peer_lists(("8.8.4.0/24",), ())
    assert is_success(h.send(client.create_permission(PEER)).response)
