"""The systemd unit deploys unedited (issue 23, items 12-16), checked as an operator uses it.

``firezone-relay systemd-unit`` (and ``--xdp``, ``--env``) is run as the installed console
script, what it prints is verified with ``systemd-analyze verify`` in a unit directory, and the
relay is run as ``nobody`` with what systemd would give its dynamic user: a
``$CREDENTIALS_DIRECTORY`` holding the token or the secret, a state directory of its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from simulations.portal_thread import PortalThread
from simulations.relay_process import daemon_args, http
from tests.required import REQUIRE_ALL
from tests.system.conftest import ROOT, free_port, port_range
from tests.unprivileged import AS_NOBODY, unprivileged_python, world_readable_site

pytestmark = pytest.mark.system

RELAY = Path(sys.executable).parent / "firezone-relay"
NOBODY = 65534


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(RELAY), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )


def directives(text: str) -> dict[str, list[str]]:
    """``Key=Value`` lines of a unit file, every value of each key in order."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


def need(tool: str) -> None:
    if shutil.which(tool) is None:
        if REQUIRE_ALL:
            pytest.fail(f"{tool} is not installed")
        pytest.skip(f"{tool} not installed")


def test_the_unit_runs_this_firezone_relay_and_verifies(tmp_path: Path) -> None:
    """Items 12 and 16: ExecStart= is the console script that wrote it; the unit and its XDP
    drop-in pass `systemd-analyze verify` where an operator puts them."""
    need("systemd-analyze")
    unit = cli("systemd-unit")
    assert unit.returncode == 0 and not unit.stderr, unit.stderr
    d = directives(unit.stdout)
    assert d["ExecStart"] == [str(RELAY)]
    # run as `python -m ...` the unit still names the installed console script
    module = subprocess.run(
        [sys.executable, "-m", "firezone_relay.actors.cli", "systemd-unit"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert directives(module.stdout)["ExecStart"] == [str(RELAY)]
    units = tmp_path / "system"
    (units / "firezone-relay.service.d").mkdir(parents=True)
    (units / "firezone-relay.service").write_text(unit.stdout)
    drop_in = cli("systemd-unit", "--xdp").stdout
    (units / "firezone-relay.service.d" / "xdp.conf").write_text(drop_in)
    verify = subprocess.run(
        ["systemd-analyze", "verify", str(units / "firezone-relay.service")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_UNIT_PATH": f"{units}:"},
    )
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    assert d["DynamicUser"] == ["yes"] and d["NoNewPrivileges"] == ["yes"]
    assert d["Restart"] == ["on-failure"] and d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert d["ProtectSystem"] == ["strict"] and d["ProtectHome"] == ["yes"]


def test_xdp_privileges_come_only_with_the_drop_in() -> None:
    """Item 16: the unit alone may bind a low port and nothing more; the drop-in adds what
    XDP needs."""
    unit = directives(cli("systemd-unit").stdout)
    assert unit["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    assert unit["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    assert unit["SystemCallFilter"] == ["@system-service"]
    xdp = directives(cli("systemd-unit", "--xdp").stdout)
    assert xdp["AmbientCapabilities"] == ["CAP_BPF CAP_NET_ADMIN CAP_PERFMON"]
    assert xdp["CapabilityBoundingSet"] == xdp["AmbientCapabilities"]
    assert xdp["SystemCallFilter"] == ["bpf"]


def test_a_forgotten_public_address_fails_at_start_with_one_line() -> None:
    """Item 13: the environment file ships with PUBLIC_IP4_ADDR commented out; the relay
    started with it as it stands refuses to start, saying what to set."""
    text = cli("systemd-unit", "--env").stdout
    env = directives(text)
    assert "PUBLIC_IP4_ADDR" not in env and "PUBLIC_IP6_ADDR" not in env
    assert "#PUBLIC_IP4_ADDR=" in text
    res = cli(env={"PATH": "/usr/bin:/bin", **{k: v[-1] for k, v in env.items()}})
    assert res.returncode == 2, res.stderr
    lines = res.stderr.splitlines()
    assert "--public-ip4-addr / --public-ip6-addr" in lines[0] and len(lines) == 2, res.stderr
    assert "Traceback" not in res.stderr


def test_the_unit_keeps_the_secret_in_its_state_directory() -> None:
    """Item 14: standalone, the secret is generated once into the StateDirectory (the relay's
    side of it is ``test_auth_secret_file_is_generated_once_and_kept``)."""
    d = directives(cli("systemd-unit").stdout)
    assert d["StateDirectory"] == ["firezone-relay"]  # systemd exports $STATE_DIRECTORY
    assert d["LoadCredential"] == [
        "token:firezone-relay.token",
        "auth-secret:firezone-relay.auth-secret",
    ]


# -- item 15: the dynamic user and its credentials ---------------------------------------------


@pytest.fixture
def as_nobody() -> Iterator[tuple[str, Path]]:
    """(interpreter, world-readable packages) to run the relay as nobody."""
    need("setpriv")
    if os.geteuid() != 0:
        if REQUIRE_ALL:
            pytest.fail("running the relay as nobody needs root")
        pytest.skip("needs root (setpriv to nobody)")
    python = unprivileged_python()
    if python is None:
        pytest.fail("no Python interpreter runs as nobody")
    with world_readable_site() as base:
        yield python, base


def run_as_nobody(
    setup: tuple[str, Path], args: list[str], env: dict[str, str], log: Path
) -> subprocess.Popen[bytes]:
    python, base = setup
    with log.open("wb") as out:
        return subprocess.Popen(
            [*AS_NOBODY, python, "-m", "firezone_relay.actors.cli", *args],
            cwd=base,
            env={
                "PYTHONPATH": str(base / "site"),
                "PATH": "/usr/bin:/bin",
                "PYTHONUNBUFFERED": "1",
                **env,
            },
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def credentials_dir(base: Path, **files: str) -> Path:
    """What systemd makes of LoadCredential=: a directory only the service's user reads."""
    directory = base / "credentials"
    directory.mkdir()
    for name, value in files.items():
        (directory / name.replace("_", "-")).write_text(value + "\n")
        os.chown(directory / name.replace("_", "-"), NOBODY, -1)
        (directory / name.replace("_", "-")).chmod(0o400)
    os.chown(directory, NOBODY, -1)
    directory.chmod(0o500)
    return directory


def test_a_root_only_token_file_is_one_line_not_a_crash_loop(
    as_nobody: tuple[str, Path], tmp_path: Path
) -> None:
    """The mistake of issue 23: FIREZONE_TOKEN names a root-only file the dynamic user cannot
    read. One line naming the file and the way out, exit 2."""
    token = as_nobody[1] / "token"
    token.write_text("secret-token\n")
    token.chmod(0o600)  # root's
    listen, health, control = free_port(), free_port(), free_port()
    args = daemon_args(listen, port_range(), health, control, "firezone", "127.0.0.1", None)
    env = {"FIREZONE_TOKEN": str(token), "FIREZONE_API_URL": "ws://127.0.0.1:1"}
    proc = run_as_nobody(as_nobody, args, env, tmp_path / "relay.log")
    assert proc.wait(30) == 2
    out = (tmp_path / "relay.log").read_text()
    assert f"cannot read the token file {token}: permission denied" in out, out
    assert "LoadCredential=" in out and "Traceback" not in out
    assert len(out.strip().splitlines()) == 2, out


def test_the_dynamic_user_reads_its_token_from_a_credential(
    as_nobody: tuple[str, Path], tmp_path: Path
) -> None:
    """LoadCredential=token:...: no FIREZONE_TOKEN at all; the relay running as nobody finds
    the token in $CREDENTIALS_DIRECTORY and joins the portal with it."""
    with PortalThread("credential-token-0123") as portal:
        creds = credentials_dir(as_nobody[1], token="credential-token-0123")
        listen, health, control = free_port(), free_port(), free_port()
        args = daemon_args(listen, port_range(), health, control, "firezone", "127.0.0.1", None)
        env = {"CREDENTIALS_DIRECTORY": str(creds), "FIREZONE_API_URL": portal.url}
        proc = run_as_nobody(as_nobody, args, env, tmp_path / "relay.log")
        try:
            for _ in range(300):  # until the portal sees it join (bounded)
                assert proc.poll() is None, (tmp_path / "relay.log").read_text()
                if portal.joined_relays():
                    break
                time.sleep(0.05)  # polling step, not a timing assumption
            else:
                raise AssertionError((tmp_path / "relay.log").read_text())
            assert http("GET", f"http://127.0.0.1:{health}/readyz")[0] == 200
            status = Path(f"/proc/{proc.pid}/status").read_text()
            assert f"Uid:\t{NOBODY}\t" in status
        finally:
            proc.terminate()
            code = proc.wait(10)
    assert code == 0
    assert "Traceback" not in (tmp_path / "relay.log").read_text()


def test_the_dynamic_user_reads_its_secret_from_a_credential(
    as_nobody: tuple[str, Path], tmp_path: Path
) -> None:
    """LoadCredential=auth-secret:...: standalone, the secret comes from the credential, and
    credentials minted from it are accepted."""
    from firezone_relay.protocol import stun
    from simulations.turn_client import TurnClient

    secret = "credential-secret-0123456789abcdef"
    creds = credentials_dir(as_nobody[1], auth_secret=secret)
    listen, health, control = free_port(), free_port(), free_port()
    args = daemon_args(listen, port_range(), health, control, "rest", "127.0.0.1", None)
    log = tmp_path / "relay.log"
    proc = run_as_nobody(as_nobody, args, {"CREDENTIALS_DIRECTORY": str(creds)}, log)
    try:
        for _ in range(300):  # until it is ready (bounded)
            assert proc.poll() is None, log.read_text()
            with contextlib.suppress(OSError):
                if http("GET", f"http://127.0.0.1:{health}/readyz", 1)[0] == 200:
                    break
            time.sleep(0.05)  # polling step, not a timing assumption
        minted = cli("credentials", "--auth-secret", secret, "--auth-scheme", "rest", "--json")
        who = json.loads(minted.stdout)
        client = TurnClient(who["username"], who["password"])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(5)
            s.sendto(client.allocate(signed=False), ("127.0.0.1", listen))
            client.learn(stun.parse(s.recv(2048)))
            s.sendto(client.allocate(), ("127.0.0.1", listen))
            answer = stun.parse(s.recv(2048))
        assert answer.cls == stun.Class.SUCCESS, answer
    finally:
        proc.terminate()
        code = proc.wait(10)
    assert code == 0
    text = log.read_text()
    assert "auth secret from systemd credential auth-secret" in text and secret not in text
