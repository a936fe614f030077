"""Every flag and environment variable of Firezone's relay (``rust/relay/server/src/main.rs``
at HEAD, with ``HealthCheckArgs``) starts this relay; ``--help`` names each one's variable."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from firezone_relay.actors.cli import build_parser
from tests.system.conftest import ROOT, RelayProcess, start_from_env
from tests.system.peers import echo_peer, run, turn_client

pytestmark = pytest.mark.system

#: Firezone's clap arguments at HEAD: (flag, environment variable)
FIREZONE_ARGS = [
    ("--public-ip4-addr", "PUBLIC_IP4_ADDR"),
    ("--public-ip6-addr", "PUBLIC_IP6_ADDR"),
    ("--bind-ip4-addr", "BIND_IP4_ADDR"),
    ("--bind-ip6-addr", "BIND_IP6_ADDR"),
    ("--listen-port", "LISTEN_PORT"),
    ("--lowest-port", "LOWEST_PORT"),
    ("--highest-port", "HIGHEST_PORT"),
    ("--api-url", "FIREZONE_API_URL"),
    ("TOKEN", "FIREZONE_TOKEN"),
    ("NAME", "FIREZONE_NAME"),
    ("--rng-seed", "RNG_SEED"),
    ("--log-format", "LOG_FORMAT"),
    ("--otlp-grpc-endpoint", "OTLP_GRPC_ENDPOINT"),
    ("--google-cloud-project-id", "GOOGLE_CLOUD_PROJECT_ID"),
    ("--ebpf-offloading", "EBPF_OFFLOADING"),
    ("--ebpf-attach-mode", "EBPF_ATTACH_MODE"),
    ("--ebpf-int4-addr", "EBPF_INT4_ADDR"),
    ("--ebpf-int6-addr", "EBPF_INT6_ADDR"),
    ("--health-check-addr", "HEALTH_CHECK_ADDR"),
    ("--control-endpoint", "CONTROL_ENDPOINT"),
    ("--num-worker-threads", "NUM_WORKER_THREADS"),
    ("--telemetry", "TELEMETRY"),
]
#: read around Firezone's binary: its log filter, the Sentry variable before Firezone #10964,
#: and what docker-init-relay.sh reads
OTHER_ENV = [
    "RUST_LOG",
    "FIREZONE_TELEMETRY",
    "LISTEN_ADDRESS_DISCOVERY_METHOD",
    "OTEL_METADATA_DISCOVERY_METHOD",
]

IGNORED = {
    "telemetry": "--telemetry (TELEMETRY / FIREZONE_TELEMETRY) is ignored",
    "project": "--google-cloud-project-id (GOOGLE_CLOUD_PROJECT_ID) is ignored",
}


def _help() -> str:
    out = subprocess.run(
        [sys.executable, "-m", "firezone_relay.actors.cli", "--help"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "80"},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return out.stdout


def test_help_shows_each_firezone_flag_with_its_environment_variable() -> None:
    text = _help()
    shown = {
        name for names in re.findall(r"\[env: ([A-Z0-9_, ]+)\]", text) for name in names.split(", ")
    }
    for flag, env in FIREZONE_ARGS:
        assert flag in text
        assert env in shown, env
    assert set(OTHER_ENV) <= shown
    assert "[env: TELEMETRY, FIREZONE_TELEMETRY]" in text


def _sample(action: argparse.Action) -> list[str]:
    """Values to try for ``action``'s variable, most specific first."""
    if action.choices:
        return [str(c) for c in action.choices]
    if action.nargs == 0:
        return ["true"]
    return [
        *("192.0.2.7", "2001:db8::7", "4242", "2.5", "203.0.113.0/24", "some-value"),
        "a-value-longer-than-sixteen-characters",
    ]


def test_every_environment_variable_in_help_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """``[env: X]`` is never a lie: setting X changes what the flag parses to."""
    for name in [k for k in os.environ if k.isupper()]:
        monkeypatch.delenv(name)
    base = vars(build_parser().parse_args([]))
    shown = [a for a in build_parser()._actions if a.dest not in ("help", "version")]
    assert shown
    for action in shown:
        if action.help == argparse.SUPPRESS:
            continue
        assert action.help and "[env: " in action.help, action.dest
        names = action.help.split("[env: ")[1].rstrip("]").split(", ")
        for env in names:
            changed = False
            for value in _sample(action):
                monkeypatch.setenv(env, value)
                try:
                    parsed = vars(build_parser().parse_args([]))
                except (SystemExit, ValueError):
                    continue
                finally:
                    monkeypatch.delenv(env)
                if parsed[action.dest] != base[action.dest]:
                    changed = True
                    break
            assert changed, f"{env} does not set {action.dest}"


def _turn_works(relay: RelayProcess) -> None:
    username, password = relay.credentials()

    async def body() -> None:
        _peer, peer_addr = await echo_peer()
        transport, inbox = await turn_client(("127.0.0.1", relay.listen_port), username, password)
        transport.sendto(b"firezone flags", peer_addr)
        assert (await inbox.get())[0] == b"firezone flags"
        transport.close()

    run(body)


def _warnings(log: str) -> list[str]:
    return [
        json.loads(line)["fields"]["message"]
        for line in log.splitlines()
        if line.startswith("{") and json.loads(line).get("level") == "WARN"
    ]


def test_daemon_runs_with_firezone_flags(relay_factory) -> None:  # type: ignore[no-untyped-def]
    relay: RelayProcess = relay_factory(
        "--telemetry",
        "--num-worker-threads",
        "4",
        "--google-cloud-project-id",
        "fz-project",
        "--log-format",
        "json",
        "--rng-seed",
        "7",
        "--ebpf-attach-mode",
        "generic",
        "--ebpf-int4-addr",
        "127.0.0.1",
        "--ebpf-int6-addr",
        "::1",
    )
    _turn_works(relay)
    code, _ = relay.stop()
    assert code == 0
    warnings = _warnings(relay.log())
    for text in IGNORED.values():  # each said once, at WARN
        assert sum(text in w for w in warnings) == 1, (text, warnings)


def test_no_warning_without_them(relay_factory) -> None:  # type: ignore[no-untyped-def]
    relay: RelayProcess = relay_factory("--log-format", "json")
    code, _ = relay.stop()
    assert code == 0
    assert not [w for w in _warnings(relay.log()) if "is ignored" in w]


def _start_from_env(tmp_path: Path, env: dict[str, str]) -> RelayProcess:
    relay = start_from_env(
        tmp_path,
        {
            "PUBLIC_IP4_ADDR": "127.0.0.1",
            "ALLOW_LOOPBACK_PEERS": "true",
            "LOG_FORMAT": "json",
            "RUST_LOG": "info",
            **env,
        },
    )
    relay.wait_ready(relay.readyz)
    return relay


@pytest.mark.parametrize("telemetry", ["TELEMETRY", "FIREZONE_TELEMETRY"])
def test_daemon_runs_with_firezone_environment(tmp_path: Path, telemetry: str) -> None:
    relay = _start_from_env(
        tmp_path,
        {
            telemetry: "true",
            "NUM_WORKER_THREADS": "2",
            "GOOGLE_CLOUD_PROJECT_ID": "fz-project",
            "RNG_SEED": "7",
            "EBPF_ATTACH_MODE": "generic",
            "EBPF_INT4_ADDR": "127.0.0.1",
            "EBPF_INT6_ADDR": "::1",
        },
    )
    try:
        _turn_works(relay)
    finally:
        code, _ = relay.stop()
    assert code == 0
    warnings = _warnings(relay.log())
    for text in IGNORED.values():
        assert sum(text in w for w in warnings) == 1, (text, warnings)


def test_telemetry_false_is_no_telemetry(tmp_path: Path) -> None:
    relay = _start_from_env(tmp_path, {"TELEMETRY": "false", "FIREZONE_TELEMETRY": "false"})
    code, _ = relay.stop()
    assert code == 0
    assert not [w for w in _warnings(relay.log()) if "is ignored" in w]


def test_bad_worker_thread_count_is_a_usage_error() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "firezone_relay.actors.cli", "--num-worker-threads", "0"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert "--num-worker-threads" in out.stderr
