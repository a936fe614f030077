"""Issue 9's attacks on the core, and issue 10's connlib rotation and peer lists, run against
the daemon process over real sockets on loopback. Each of these failed on the main branch
the issues were filed against."""

from __future__ import annotations

import random
import socket
import time
from pathlib import Path

import pytest

from firezone_relay.protocol import stun
from firezone_relay.protocol.stun import Attr, Class, Method
from simulations import channel_data
from simulations.turn_client import TurnClient
from tests.adversarial.conftest import Attacker, error_code
from tests.system.conftest import RelayProcess, port_range

Factory = object


def _cpu_seconds(relay: RelayProcess) -> float:
    fields = Path(f"/proc/{relay.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0  # utime + stime, in USER_HZ


def _attacker(relay: RelayProcess, user: str | None = None, host: str = "127.0.0.1") -> Attacker:
    return Attacker(relay, *relay.credentials(user), host=host)


def _udp(host: str, port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, port))
    sock.setblocking(False)
    return sock


def _received(sock: socket.socket) -> list[bytes]:
    got = []
    while True:
        try:
            got.append(sock.recv(65535))
        except BlockingIOError:
            return got


def _free_port_in_range(relay: RelayProcess, host: str) -> socket.socket:
    """A UDP socket of ours on a port of the relay's allocation range."""
    for port in random.sample(range(relay.lowest_port, relay.highest_port + 1), 50):
        try:
            return _udp(host, port)
        except OSError:
            continue
    raise RuntimeError("no free port in the relay's range")


# --- 9.1: quadratic attribute scan ----------------------------------------------------------


def test_many_attribute_datagrams_cost_no_cpu_and_get_no_answer(relays: Factory) -> None:
    relay = relays()  # type: ignore[operator]
    attacker = _attacker(relay)
    hostile = stun.encode(
        Method.BINDING, Class.REQUEST, bytes(12), [(0x0100 + i, b"") for i in range(16_000)]
    )
    assert len(hostile) > 60_000
    before = _cpu_seconds(relay)
    for _ in range(5):
        attacker.send(hostile)
    binding = attacker.ask(attacker.turn.binding(), timeout=60)
    assert binding.cls == Class.SUCCESS
    assert attacker.drain() == []  # no 420 for the hostile datagrams: dropped unparsed
    # five of them cost ~7 s of CPU when the scan was quadratic
    assert _cpu_seconds(relay) - before < 2.0
    assert relay.alive()


# --- 9.3: SSRF into the host ----------------------------------------------------------------


def test_loopback_service_in_the_allocation_range_is_unreachable(relays: Factory) -> None:
    relay = relays()  # type: ignore[operator]
    service = _free_port_in_range(relay, "127.0.0.1")
    target = ("127.0.0.1", service.getsockname()[1])
    attacker = _attacker(relay)
    assert attacker.allocate().cls == Class.SUCCESS
    turn = attacker.turn
    assert error_code(attacker.ask(turn.channel_bind(0x4000, target))) == 403
    attacker.send(channel_data.encode(0x4000, b"ssrf via channel"))
    attacker.ask(turn.create_permission(target))  # our own address: permitted, loop only
    attacker.send(turn.send_indication(target, b"ssrf via send"))
    attacker.barrier()
    assert _received(service) == []


def test_host_interface_address_is_unreachable(relays: Factory) -> None:
    from firezone_relay.actors.sockets import local_addresses

    host = next(
        (a for a in sorted(local_addresses()) if ":" not in a and not a.startswith("127.")), None
    )
    assert host is not None, "this test needs a non-loopback IPv4 address on the host"
    relay = relays("--allow-private-peers")  # type: ignore[operator]
    service = _free_port_in_range(relay, host)
    target = (host, service.getsockname()[1])
    attacker = _attacker(relay)
    assert attacker.allocate().cls == Class.SUCCESS
    assert error_code(attacker.ask(attacker.turn.channel_bind(0x4000, target))) == 403
    attacker.send(channel_data.encode(0x4000, b"ssrf"))
    attacker.barrier()
    assert _received(service) == []


def test_relay_loop_between_two_allocations_still_works(relays: Factory) -> None:
    relay = relays()  # type: ignore[operator]
    a, b = _attacker(relay), _attacker(relay)
    assert a.allocate().cls == Class.SUCCESS
    relayed_b = b.allocate().get(Attr.XOR_RELAYED_ADDRESS)
    assert a.ask(a.turn.channel_bind(0x4000, relayed_b)).cls == Class.SUCCESS
    assert b.ask(b.turn.create_permission(("127.0.0.1", 1))).cls == Class.SUCCESS
    a.send(channel_data.encode(0x4000, b"hello through the loop"))
    indication = stun.parse(b.receive())
    assert indication.method == Method.DATA
    assert indication.get(Attr.DATA) == b"hello through the loop"


# --- 9.4: memory pinning --------------------------------------------------------------------


def test_create_permission_with_too_many_peers_gets_508(relays: Factory) -> None:
    relay = relays()  # type: ignore[operator]
    attacker = _attacker(relay)
    assert attacker.allocate().cls == Class.SUCCESS
    peers = [(f"8.8.{i}.1", 9) for i in range(40)]
    assert error_code(attacker.ask(attacker.turn.create_permission(*peers))) == 508
    same = [("8.8.8.8", 1000 + i) for i in range(50)]  # one address: one permission
    assert attacker.ask(attacker.turn.create_permission(*same)).cls == Class.SUCCESS


def test_padded_refreshes_do_not_pin_memory(relays: Factory) -> None:
    relay = relays()  # type: ignore[operator]
    attacker = _attacker(relay)
    assert attacker.allocate().cls == Class.SUCCESS
    padding = [(0x8F00, b"\x00" * 60_000)]  # comprehension-optional: ignored, but cached
    warm = attacker.ask(attacker.turn.request(Method.REFRESH, padding))
    assert warm.cls == Class.SUCCESS
    before = relay.rss_kb()
    for _ in range(400):
        assert attacker.ask(attacker.turn.request(Method.REFRESH, padding)).cls == Class.SUCCESS
    grown_mb = (relay.rss_kb() - before) / 1024
    assert grown_mb < 8, f"RSS grew {grown_mb:.1f} MB"  # raw requests: 400 x 60 KB = 24 MB


# --- 9.5 / 9.6: allocation floods and the log flood -----------------------------------------


def test_leading_zero_expiry_is_not_another_username(relays: Factory) -> None:
    relay = relays()  # type: ignore[operator]
    username, password = relay.credentials("salt")
    assert Attacker(relay, username, password).allocate().cls == Class.SUCCESS
    alias = Attacker(relay, f"0{username}", password)
    assert error_code(alias.allocate()) == 401


def test_one_rest_credential_gets_at_most_256_allocations(relays: Factory) -> None:
    relay = relays(scheme="rest")  # type: ignore[operator]
    username, password = relay.credentials("alice")
    clients = []
    try:
        for _ in range(256):
            client = Attacker(relay, username, password)
            clients.append(client)
            allocated = client.allocate()
            for _ in range(3):  # 508: ports held by other processes on a shared machine
                if error_code(allocated) != 508:
                    break
                allocated = client.ask(client.turn.allocate())
            assert allocated.cls == Class.SUCCESS, error_code(allocated)
        extra = Attacker(relay, username, password)
        clients.append(extra)
        assert error_code(extra.allocate()) == 486
    finally:
        for client in clients:
            client.close()


def test_unicode_digit_usernames_log_no_traceback(relays: Factory) -> None:
    relay = relays()  # type: ignore[operator]
    attacker = Attacker(relay, "²:x", "whatever")
    attacker.turn.realm, attacker.turn.nonce = "firezone", "00000000-0000-0000-0000-000000000000"
    size = len(relay.log())
    for _ in range(100):
        attacker.send(attacker.turn.allocate())
    attacker.barrier()
    attacker.drain()
    grown = relay.log()[size:]
    assert "Traceback" not in grown and len(grown) < 4096


# --- 9.7 / 9.8: unauthenticated answers -----------------------------------------------------


def test_signed_401s_count_against_the_rate_limit(relays: Factory) -> None:
    relay = relays("--unauthenticated-rate-limit", "5")  # type: ignore[operator]
    attacker = Attacker(relay, *relay.credentials())
    attacker.turn.realm = "firezone"
    for _ in range(200):
        attacker.send(attacker.turn.allocate())  # USERNAME and MESSAGE-INTEGRITY: signed 401
    bystander = Attacker(relay, "x", "y", host="127.0.0.2")  # another source IP, own bucket
    bystander.barrier()
    answered = len(attacker.drain())
    assert answered < 50, answered  # a burst of 10 plus 5/s


def test_rest_challenges_are_unsigned_and_weak_secrets_are_warned_of(relays: Factory) -> None:
    relay = relays(scheme="rest")  # type: ignore[operator]  # "system-test-secret": weak
    attacker = _attacker(relay, "bob")
    challenge = attacker.ask(attacker.turn.allocate())
    assert error_code(challenge) == 401 and challenge.integrity_offset is None
    assert "weaker than 128 bits" in relay.log()
    firezone = relays()  # type: ignore[operator]
    client = _attacker(firezone)
    signed = client.ask(client.turn.allocate())
    assert error_code(signed) == 401 and client.turn.verify(signed)


# --- 9.9 / 9.10: key material and nonce state -----------------------------------------------


def test_relays_with_one_rng_seed_share_no_nonce_key(relays: Factory) -> None:
    one = relays("--rng-seed", "7")  # type: ignore[operator]
    two = relays("--rng-seed", "7")  # type: ignore[operator]
    sock = _udp("127.0.0.1")
    sock.setblocking(True)
    sock.settimeout(5)
    turn = TurnClient(*one.credentials())
    for _ in range(5):
        nonces = []
        for relay in (one, two):
            sock.sendto(turn.allocate(), ("127.0.0.1", relay.listen_port))
            nonces.append(stun.parse(sock.recv(2048)).get(Attr.NONCE))
        if nonces[0][:8] == nonces[1][:8]:  # issued in the same second
            assert nonces[0] != nonces[1]
            return
    pytest.fail("could not get two nonces issued in the same second")


def test_bogus_integrity_does_not_spend_the_nonce(relays: Factory) -> None:
    relay = relays()  # type: ignore[operator]
    attacker = _attacker(relay)
    attacker.authenticate()
    forged = TurnClient(attacker.turn.username, "wrong password", realm="firezone")
    forged.nonce = attacker.turn.nonce
    # 100 per round: the 100 answers fit the attacker's default receive buffer, so the
    # barrier's own answer is never the one the kernel drops
    for _ in range(100):
        for _ in range(100):
            attacker.send(forged.allocate())
        attacker.barrier()
        attacker.drain()
    assert attacker.allocate().cls == Class.SUCCESS  # 10,000 uses would be gone: 438


# --- 9.11: a taken port -----------------------------------------------------------------------


def test_ports_held_by_other_sockets_are_skipped(relays: Factory) -> None:
    low, _ = port_range(4)
    taken = []
    for port in (low, low + 1, low + 2):
        try:
            taken.append(_udp("127.0.0.1", port))
        except OSError:
            pass  # someone else holds it: just as taken
    relay = relays(ports=(low, low + 3))  # type: ignore[operator]
    attacker = _attacker(relay)
    for _ in range(3):
        allocated = attacker.allocate()
        assert allocated.cls == Class.SUCCESS, error_code(allocated)
        assert allocated.get(Attr.XOR_RELAYED_ADDRESS) == ("127.0.0.1", low + 3)
        assert attacker.ask(attacker.turn.refresh(0)).cls == Class.SUCCESS
    for sock in taken:
        sock.close()


# --- 10.1 / 10.2: connlib's credential rotation, the peer lists --------------------------------


def test_connlib_credential_rotation(relays: Factory) -> None:
    relay = relays()  # type: ignore[operator]
    first = _attacker(relay, "salt")
    assert first.allocate().cls == Class.SUCCESS
    rotated = TurnClient(*relay.credentials("salt", ttl=7200), rng=random.Random(time.time()))
    first.turn = rotated  # same socket, new credentials: connlib's new Allocation
    assert error_code(first.allocate()) == 437
    deleted = first.ask(rotated.refresh(0))
    assert deleted.cls == Class.SUCCESS and rotated.verify(deleted)
    again = first.ask(rotated.allocate())
    assert again.cls == Class.SUCCESS and rotated.verify(again)


def test_peer_allow_and_deny_lists(relays: Factory) -> None:
    relay = relays(  # type: ignore[operator]
        "--allowed-peer-ip", "203.0.113.0/24", "--denied-peer-ip", "8.8.8.0/24"
    )
    attacker = _attacker(relay)
    assert attacker.allocate().cls == Class.SUCCESS
    turn = attacker.turn
    assert attacker.ask(turn.channel_bind(0x4000, ("203.0.113.5", 5000))).cls == Class.SUCCESS
    assert error_code(attacker.ask(turn.channel_bind(0x4001, ("198.51.100.5", 5000)))) == 403
    assert error_code(attacker.ask(turn.channel_bind(0x4002, ("8.8.8.8", 53)))) == 403
    assert attacker.ask(turn.channel_bind(0x4003, ("8.8.4.4", 53))).cls == Class.SUCCESS
