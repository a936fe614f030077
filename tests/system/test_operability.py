"""What an operator sees: the version, and startup failures that say what to fix.

Every failure here exits non-zero with one line naming the socket or flag and the address or
value, and no traceback.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from firezone_relay.actors.portal import default_user_agent
from firezone_relay.actors.version import relay_version, software
from firezone_relay.protocol import stun
from firezone_relay.protocol.stun import Attr
from simulations.relay_process import daemon_args
from simulations.turn_client import TurnClient
from tests.system.conftest import ROOT, RelayProcess, free_port, port_range

pytestmark = pytest.mark.system


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FIREZONE_")}
    full_env.update({"PYTHONPATH": str(ROOT), **(env or {})})
    return subprocess.run(
        [sys.executable, "-m", "firezone_relay.actors.cli", *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def relay_args(listen: int, health: int, control: int, *extra: str) -> list[str]:
    """A loopback relay's flags (without the interpreter) for these ports."""
    cmd = daemon_args(listen, port_range(), health, control, "firezone", "127.0.0.1", None)
    return [*cmd, "--auth-secret", "operability-test-secret", *extra]


def fails_with(res: subprocess.CompletedProcess[str], code: int, message: str) -> None:
    output = res.stdout + res.stderr
    assert res.returncode == code, output
    assert message in output, output
    assert "Traceback" not in output, output


def test_version_names_the_package_version_and_revision() -> None:
    res = run_cli("--version")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"firezone-relay {relay_version()}"
    assert re.fullmatch(r"\d+\.\d+\.\d+(\+[0-9a-z.-]+)?", relay_version())
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short=8", "HEAD"], capture_output=True, text=True
    )
    if (ROOT / ".git").exists() and head.returncode == 0:  # a checkout: the revision is known
        assert head.stdout.strip() in relay_version()


def test_software_and_user_agent_carry_the_same_version(relay: RelayProcess) -> None:
    assert f" relay/{relay_version()} " in default_user_agent()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(TurnClient("", "").binding(), ("127.0.0.1", relay.listen_port))
        response = stun.parse(s.recv(2048))
    assert response.get(Attr.SOFTWARE) == software() == f"firezone-relay-py; rev={relay_version()}"


@pytest.mark.parametrize("taken", ["listen", "health", "control"])
def test_a_taken_port_names_the_socket_and_address(taken: str) -> None:
    listen = free_port()
    health, control = free_port(socket.SOCK_STREAM), free_port(socket.SOCK_STREAM)
    kind = socket.SOCK_DGRAM if taken == "listen" else socket.SOCK_STREAM
    port = {"listen": listen, "health": health, "control": control}[taken]
    with socket.socket(socket.AF_INET, kind) as squatter:
        squatter.bind(("127.0.0.1", port))
        if kind == socket.SOCK_STREAM:
            squatter.listen()
        res = run_cli(*relay_args(listen, health, control))
    what = {"listen": "listen socket", "health": "health endpoint", "control": "control endpoint"}
    fails_with(res, 1, f"cannot bind the {what[taken]} on 127.0.0.1:{port}: address already in use")


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--listen-port", "70000"], {}, "argument --listen-port: not a port: 70000"),
        (["--listen-port", "x"], {}, "argument --listen-port: not a port: 'x'"),
        (["--max-allocations", "0"], {}, "argument --max-allocations: must be positive: 0"),
        (["--health-check-addr", "8080"], {}, "--health-check-addr: expected host:port"),
        (["--control-endpoint", "nowhere"], {}, "--control-endpoint: expected host:port"),
        ([], {"LISTEN_PORT": "eighty"}, "bad environment variable value"),
        (["--lowest-port", "60000", "--highest-port", "50000"], {}, "bad allocation port range"),
    ],
)
def test_bad_flag_values(args: list[str], env: dict[str, str], message: str) -> None:
    fails_with(run_cli("--public-ip4-addr", "127.0.0.1", *args, env=env), 2, message)


def test_no_public_address() -> None:
    fails_with(
        run_cli("--auth-secret", "operability-test-secret"),
        2,
        "--public-ip4-addr / --public-ip6-addr",
    )
    fails_with(run_cli("--public-ip4-addr", "::1"), 2, "not an IPv4 address: ::1")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://portal.example", "unsupported portal URL scheme 'ftp'"),
        ("wss://", "has no host"),
        ("wss://portal.example:99999", "invalid portal URL"),
    ],
)
def test_invalid_portal_url(url: str, message: str) -> None:
    res = run_cli("--public-ip4-addr", "127.0.0.1", "--api-url", url, env={"FIREZONE_TOKEN": "t"})
    fails_with(res, 2, message)


@pytest.mark.parametrize(
    ("env", "named"),
    [({"AUTH_SCHEME": "rest"}, "AUTH_SCHEME"), ({"REALM": "example.org"}, "REALM")],
)
def test_portal_mode_refuses_what_locks_connlib_out(env: dict[str, str], named: str) -> None:
    """A Firezone deployment's environment with a stray standalone setting: exit 2 naming
    the variable, before anything starts."""
    env = {"FIREZONE_TOKEN": "t", "FIREZONE_API_URL": "wss://portal.example", **env}
    fails_with(run_cli("--public-ip4-addr", "127.0.0.1", env=env), 2, f"{named} / --")


def test_mandatory_xdp_that_cannot_start(tmp_path: Path) -> None:
    listen = free_port()
    health, control = free_port(socket.SOCK_STREAM), free_port(socket.SOCK_STREAM)
    extra = ("--ebpf-offloading", "nosuchif0", "--ebpf-mandatory")
    res = run_cli(*relay_args(listen, health, control, *extra))
    fails_with(res, 1, "XDP offload on nosuchif0 is mandatory but unavailable")


def test_a_listen_address_not_on_this_host() -> None:
    listen = free_port()
    health, control = free_port(socket.SOCK_STREAM), free_port(socket.SOCK_STREAM)
    res = run_cli(*relay_args(listen, health, control, "--bind-ip4-addr", "192.0.2.1"))
    fails_with(
        res,
        1,
        f"cannot bind the listen socket on 192.0.2.1:{listen}: cannot assign requested address "
        "(the address is not on any interface of this host)",
    )
