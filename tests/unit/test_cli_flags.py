"""Flags that shape the core and the portal session reach them."""

from __future__ import annotations

from actors.cli import build_parser, settings_from_args


def _settings(*argv: str):  # type: ignore[no-untyped-def]
    return settings_from_args(build_parser().parse_args(["--public-ip4-addr", "127.0.0.1", *argv]))


def test_defaults_keep_firezone_behaviour() -> None:
    settings = _settings()
    assert settings.server.single_allocation_per_username is None  # the scheme decides
    assert settings.server.auth_scheme == "firezone" and settings.server.realm == "firezone"
    assert not settings.token_in_query


def test_opt_outs() -> None:
    settings = _settings(
        "--no-single-allocation-per-username",
        "--token-in-query",
        "--auth-scheme",
        "rest",
        "--realm",
        "example.org",
        "--max-allocations",
        "5",
    )
    assert not settings.server.single_allocation_per_username
    assert settings.token_in_query
    assert settings.server.auth_scheme == "rest" and settings.server.realm == "example.org"
    assert settings.server.max_allocations == 5


def test_single_allocation_flag_is_tri_state() -> None:
    assert _settings("--single-allocation-per-username").server.single_allocation_per_username
    assert (
        _settings("--no-single-allocation-per-username").server.single_allocation_per_username
        is False
    )


def test_peer_lists_from_flags_and_environment(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("ALLOWED_PEER_IP", "203.0.113.0/24, 198.51.100.7")
    monkeypatch.setenv("DENIED_PEER_IP", "8.8.8.0/24")
    settings = _settings("--allowed-peer-ip", "10.9.0.0/16", "--denied-peer-ip", "1.1.1.1")
    assert settings.server.allowed_peer_ips == ("203.0.113.0/24", "198.51.100.7/32", "10.9.0.0/16")
    assert settings.server.denied_peer_ips == ("8.8.8.0/24", "1.1.1.1/32")


def test_private_peers_default_follows_the_mode() -> None:
    assert not _settings().server.allow_private_peers  # standalone: stricter
    portal = _settings("--api-url", "ws://127.0.0.1:1", "token-value")
    assert portal.server.allow_private_peers  # portal mode: as Firezone's relay
