"""The peer filter, with coturn's bypass history as regression cases."""

from __future__ import annotations

import pytest

from firezone_relay.protocol.policy import PeerPolicy, Verdict, networks

POLICY = PeerPolicy(own_addresses=frozenset({"52.0.0.1", "2600:1f00::1"}))

DENIED = [
    "0.0.0.0",  # CVE-2020-26262
    "0.1.2.3",
    "::",
    "127.0.0.1",
    "127.255.0.1",
    "::1",
    "::ffff:127.0.0.1",  # CVE-2026-27624
    "::ffff:7f00:1",
    "::127.0.0.1",  # IPv4-compatible
    "64:ff9b::7f00:1",  # NAT64 of loopback
    "2002:7f00:1::",  # 6to4 of loopback
    "169.254.169.254",  # cloud metadata
    "::ffff:169.254.169.254",
    "fe80::1",
    "fe80::1%eth0",
    "10.1.2.3",
    "172.16.0.1",
    "192.168.1.1",
    "100.64.0.1",
    "fc00::1",
    "fd12:3456::1",
    "fec0::1",
    "224.0.0.1",
    "ff02::1",
    "240.0.0.1",
    "255.255.255.255",
    "192.0.2.1",
    "198.51.100.1",
    "203.0.113.1",
    "2001:db8::1",
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo
    "198.18.0.1",
    "not an address",
]


@pytest.mark.parametrize("host", DENIED)
def test_denied(host: str) -> None:
    assert not POLICY.allows(host, 50000)


@pytest.mark.parametrize(
    "host",
    ["8.8.8.8", "2001:4860:4860::8888", "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1"],
)
def test_public_peers_allowed(host: str) -> None:
    assert POLICY.allows(host, 5000)


def test_own_address_only_on_allocation_ports() -> None:
    assert POLICY.allows("52.0.0.1", 49152)
    assert POLICY.allows("::ffff:52.0.0.1", 65535)
    assert POLICY.allows("2600:1f00::1", 50000)
    assert not POLICY.allows("52.0.0.1", 3478)
    assert not POLICY.allows("52.0.0.1", 80)
    assert not POLICY.allows("8.8.8.8", 0)


def test_opt_ins() -> None:
    lab = PeerPolicy(
        allow_loopback=True, allow_private=True, own_addresses=frozenset({"127.0.0.1"})
    )
    assert lab.allows("127.0.0.1", 3480)
    assert not lab.allows("127.0.0.1", 3478)
    assert lab.allows("::ffff:127.0.0.1", 9)
    assert lab.allows("10.0.0.1", 9) and lab.allows("fd00::1", 9)
    assert not lab.allows("169.254.169.254", 80)


def test_own_address_is_a_loop_verdict_on_allocation_ports_only() -> None:
    assert POLICY.classify("52.0.0.1", 50000) is Verdict.LOOP
    assert POLICY.classify("8.8.8.8", 50000) is Verdict.RELAY
    assert POLICY.classify("52.0.0.1", 80) is Verdict.REFUSE


def test_host_interface_addresses_are_refused_unless_allowed() -> None:
    host = PeerPolicy(
        allow_private=True,
        own_addresses=frozenset({"52.0.0.1"}),
        host_addresses=frozenset({"10.0.0.5", "127.0.0.1", "192.0.2.200"}),
    )
    for address in ("10.0.0.5", "127.0.0.1", "52.0.0.1"):
        for port in (22, 51820, 60000):
            if address == "52.0.0.1" and port >= 49152:
                continue  # the loop verdict
            assert not host.allows(address, port), (address, port)
    assert host.allows("10.0.0.6", 51820)
    allowed = PeerPolicy(host_addresses=frozenset({"10.0.0.5"}), allowed=networks(["10.0.0.0/24"]))
    assert allowed.allows("10.0.0.5", 51820)
    assert not allowed.allows("10.0.0.5", 3478)  # never our own listen port


def test_allow_list_overrides_defaults_and_deny_list() -> None:
    policy = PeerPolicy(
        allowed=networks(["203.0.113.0/24", "10.1.0.0/16"]),
        denied=networks(["10.0.0.0/8", "8.8.8.0/24"]),
    )
    assert policy.allows("203.0.113.7", 3478)  # TEST-NET-3, Firezone's compose lab
    assert not policy.allows("198.51.100.7", 3478)
    assert policy.allows("10.1.2.3", 9) and not policy.allows("10.2.0.1", 9)
    assert not policy.allows("8.8.8.8", 53) and policy.allows("8.8.4.4", 53)


def test_allow_list_cannot_open_unspecified_broadcast_or_multicast() -> None:
    policy = PeerPolicy(allowed=networks(["0.0.0.0/0", "::/0"]))
    for host in ("0.0.0.0", "0.1.2.3", "255.255.255.255", "224.0.0.1", "::", "ff02::1"):
        assert not policy.allows(host, 9), host
    assert policy.allows("127.0.0.1", 9) and policy.allows("169.254.169.254", 80)


def test_loopback_listen_port_is_refused_even_with_loopback_allowed() -> None:
    lab = PeerPolicy(allow_loopback=True)
    assert not lab.allows("127.0.0.2", 3478) and lab.allows("127.0.0.2", 3479)
