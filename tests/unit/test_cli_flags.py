"""Flags that shape the core and the portal session reach them; environment defaults go
through the flags' own validators."""

from __future__ import annotations

import pytest

from firezone_relay.actors.cli import build_parser, settings_from_args
from firezone_relay.actors.daemon import Settings


def _settings(*argv: str) -> Settings:
    return settings_from_args(build_parser().parse_args(["--public-ip4-addr", "127.0.0.1", *argv]))


def test_defaults_keep_firezone_behaviour() -> None:
    settings = _settings()
    assert settings.server.single_allocation_per_username is None  # the scheme decides
    assert settings.server.auth_scheme == "firezone" and settings.server.realm == "firezone"
    assert settings.portal is None and settings.xdp is None  # standalone, userspace


def test_opt_outs() -> None:
    settings = _settings(
        "--no-single-allocation-per-username",
        "--auth-scheme",
        "rest",
        "--realm",
        "example.org",
        "--max-allocations",
        "5",
    )
    assert not settings.server.single_allocation_per_username
    assert settings.server.auth_scheme == "rest" and settings.server.realm == "example.org"
    assert settings.server.max_allocations == 5
    portal = _settings("--token-in-query", "--api-url", "ws://127.0.0.1:1", "token-value")
    assert portal.portal is not None and portal.portal.token_in_query


@pytest.mark.parametrize(
    ("argv", "env", "named"),
    [
        (["--auth-scheme", "rest"], {}, "AUTH_SCHEME"),
        ([], {"AUTH_SCHEME": "rest"}, "AUTH_SCHEME"),
        (["--realm", "example.org"], {}, "REALM"),
        ([], {"REALM": "example.org"}, "REALM"),
    ],
)
def test_portal_mode_refuses_what_locks_connlib_out(
    argv: list[str], env: dict[str, str], named: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a token, a scheme or realm connlib cannot use is an error naming the variable;
    without one, the same settings are a standalone relay's choice."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=rf"^{named} / --{named.lower().replace('_', '-')} "):
        _settings(*argv, "--api-url", "ws://127.0.0.1:1", "token-value")
    assert _settings(*argv).portal is None


def test_channel_cap_covers_every_channel_number_in_portal_mode() -> None:
    """connlib numbers one channel per remote candidate through 0x4FFF: in portal mode the
    per-allocation cap is the whole number space; standalone keeps 1024; a flag wins."""
    portal = _settings("--api-url", "ws://127.0.0.1:1", "token-value")
    assert portal.server.max_channels_per_allocation == 0x4FFF - 0x4000 + 1
    assert _settings().server.max_channels_per_allocation == 1024
    explicit = _settings("--max-channels-per-allocation", "64", "--api-url", "ws://x:1", "t")
    assert explicit.server.max_channels_per_allocation == 64


def test_single_allocation_flag_is_tri_state() -> None:
    assert _settings("--single-allocation-per-username").server.single_allocation_per_username
    assert (
        _settings("--no-single-allocation-per-username").server.single_allocation_per_username
        is False
    )


def test_peer_lists_from_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALLOWED_PEER_IP", "203.0.113.0/24, 198.51.100.7")
    monkeypatch.setenv("DENIED_PEER_IP", "8.8.8.0/24")
    settings = _settings("--allowed-peer-ip", "10.9.0.0/16", "--denied-peer-ip", "1.1.1.1")
    assert settings.server.allowed_peer_ips == ("203.0.113.0/24", "198.51.100.7/32", "10.9.0.0/16")
    assert settings.server.denied_peer_ips == ("8.8.8.0/24", "1.1.1.1/32")


def test_private_peers_default_follows_the_mode() -> None:
    assert not _settings().server.allow_private_peers  # standalone: stricter
    portal = _settings("--api-url", "ws://127.0.0.1:1", "token-value")
    assert portal.server.allow_private_peers  # portal mode: as Firezone's relay


def test_one_source_for_the_portal_and_xdp() -> None:
    settings = _settings(
        "--public-ip6-addr",
        "::1",
        "--listen-port",
        "3479",
        "--lowest-port",
        "50000",
        "--highest-port",
        "50100",
        "--api-url",
        "wss://portal.example",
        "--ebpf-offloading",
        "eth0",
        "--ebpf-mandatory",
        "token-value",
        "relay-7",
    )
    portal, xdp = settings.portal, settings.xdp
    assert portal is not None and xdp is not None
    assert (portal.api_url, portal.token, portal.name) == (
        "wss://portal.example",
        "token-value",
        "relay-7",
    )
    for copy in (portal, xdp):
        assert (copy.public_ip4, copy.public_ip6, copy.listen_port) == ("127.0.0.1", "::1", 3479)
    assert (xdp.interface, xdp.lowest_port, xdp.highest_port, xdp.mandatory) == (
        "eth0",
        50000,
        50100,
        True,
    )
    assert not hasattr(settings, "extra")


def test_environment_defaults_are_parsed_like_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "LISTEN_PORT": "3479",
        "MAX_ALLOCATIONS": "7",
        "RNG_SEED": "42",
        "UNAUTHENTICATED_RATE_LIMIT": "2.5",
        "BIND_IP6_ADDR": "::1",
        "LOG_FORMAT": "json",
        "HEALTH_CHECK_ADDR": "[::1]:8081",
    }.items():
        monkeypatch.setenv(name, value)
    args = build_parser().parse_args(["--public-ip4-addr", "127.0.0.1"])
    assert (args.listen_port, args.max_allocations, args.rng_seed) == (3479, 7, 42)
    assert args.unauthenticated_rate_limit == 2.5 and args.log_format == "json"
    assert (args.bind_ip6_addr, args.health_check_addr) == ("::1", "[::1]:8081")
    # plain values, not the environment's wrapper type
    assert type(args.bind_ip6_addr) is str and type(args.health_check_addr) is str
    # a flag overrides the environment
    assert build_parser().parse_args(["--listen-port", "4000"]).listen_port == 4000


@pytest.mark.parametrize(
    ("name", "value", "flag", "why"),
    [
        ("LISTEN_PORT", "abc", "--listen-port", "not a port: 'abc'"),
        ("LOWEST_PORT", "70000", "--lowest-port", "not a port: 70000"),
        ("MAX_ALLOCATIONS", "0", "--max-allocations", "must be positive: 0"),
        ("MAX_CHANNELS_PER_ALLOCATION", "many", "--max-channels-per-allocation", "not a number"),
        ("RNG_SEED", "x", "--rng-seed", "not an integer: 'x'"),
        ("TIME_SCALE", "fast", "--time-scale", "not a number: 'fast'"),
        ("PUBLIC_IP6_ADDR", "1.2.3.4", "--public-ip6-addr", "not an IPv6 address: 1.2.3.4"),
        ("LOG_FORMAT", "xml", "--log-format", "invalid choice: 'xml'"),
        ("EBPF_ATTACH_MODE", "skb", "--ebpf-attach-mode", "invalid choice: 'skb'"),
        ("AUTH_SCHEME", "ldap", "--auth-scheme", "invalid choice: 'ldap'"),
        ("HEALTH_CHECK_ADDR", "8080", "--health-check-addr", "expected host:port"),
        ("DENIED_PEER_IP", "nonsense", "--denied-peer-ip", "nonsense"),
    ],
)
def test_a_bad_environment_value_fails_like_the_flag(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    name: str,
    value: str,
    flag: str,
    why: str,
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["--public-ip4-addr", "127.0.0.1"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: bad environment variable value {name}={value!r}" in err
    assert why in err
    monkeypatch.delenv(name)
    with pytest.raises(SystemExit) as exited:  # the same value as a flag: the same reason
        build_parser().parse_args(["--public-ip4-addr", "127.0.0.1", flag, value])
    assert exited.value.code == 2
    assert why in capsys.readouterr().err


def test_a_bad_environment_list_fails_even_beside_the_flag(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ALLOWED_PEER_IP", "10.0.0.0/8, 300.1.1.1")
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["--allowed-peer-ip", "192.0.2.0/24"])
    assert exited.value.code == 2
    assert "bad environment variable value ALLOWED_PEER_IP='300.1.1.1'" in capsys.readouterr().err


def test_secret_and_peer_list_files_are_read_at_start_and_bad_ones_named(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import pytest as _pytest

    from firezone_relay.actors.cli import build_parser, settings_from_args

    secrets = tmp_path / "secrets"
    secrets.write_text("# rotation\nnew-secret-0123456789\n\nold-secret-0123456789\n")
    peers = tmp_path / "peers"
    peers.write_text("allow 10.1.0.0/16\ndeny 203.0.113.0/24\n")
    base = ["--public-ip4-addr", "127.0.0.1", "--control-endpoint", "127.0.0.1:19999"]
    args = build_parser().parse_args(
        [*base, "--auth-secret-file", str(secrets), "--peer-list-file", str(peers),
         "--allowed-peer-ip", "10.2.0.0/16", "--allocation-rate-limit", "250000"]
    )  # fmt: skip
    settings = settings_from_args(args)
    assert settings.auth_secrets == ("new-secret-0123456789", "old-secret-0123456789")
    assert settings.auth_secret == "new-secret-0123456789"
    assert settings.server.allowed_peer_ips == ("10.2.0.0/16", "10.1.0.0/16")
    assert settings.server.denied_peer_ips == ("203.0.113.0/24",)
    assert settings.server.allocation_rate_limit == 250000
    assert settings.admin_socket is not None and settings.admin_socket.endswith(
        "control-19999.sock"
    )
    assert not settings.admin_socket_required

    peers.write_text("permit 10.0.0.0/8\n")
    for extra, words in (
        (["--peer-list-file", str(peers)], "expected 'allow CIDR' or 'deny CIDR'"),
        (["--auth-secret-file", str(tmp_path / "missing")], "cannot read the secret file"),
        (["--auth-secret-file", str(secrets), "--auth-secret", "x" * 16], "not both"),
    ):
        with _pytest.raises(ValueError, match=words):
            settings_from_args(build_parser().parse_args([*base, *extra]))


def test_the_allocation_rate_limit_keeps_xdp_off(caplog) -> None:  # type: ignore[no-untyped-def]
    import pytest as _pytest

    from firezone_relay.actors.cli import build_parser, settings_from_args

    base = ["--public-ip4-addr", "127.0.0.1", "--allocation-rate-limit", "1000",
            "--ebpf-offloading", "lo"]  # fmt: skip
    assert settings_from_args(build_parser().parse_args(base)).xdp is None
    assert "XDP offload stays off" in caplog.text
    with _pytest.raises(ValueError, match="--ebpf-mandatory"):
        settings_from_args(build_parser().parse_args([*base, "--ebpf-mandatory"]))
