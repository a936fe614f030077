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
