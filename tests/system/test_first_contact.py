"""What a new operator meets in the first hour (issue 23), done as the operator did it.

The README's quick start with Debian's own Python, the command line as a subprocess (bad
values, help), signals to a running daemon, and the lines it logs: each test runs the real
``firezone-relay`` and looks at what the operator would see.
"""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from firezone_relay.protocol import stun
from simulations.relay_process import daemon_args, spawn_daemon
from simulations.turn_client import TurnClient
from tests.required import REQUIRE_ALL
from tests.system.conftest import ROOT, RelayProcess, free_port, port_range

pytestmark = pytest.mark.system

README = ROOT / "README.md"
SECRET = "first-contact-secret-0123456789"


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``firezone-relay ARGS`` as the operator runs it: the installed console script."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("FIREZONE_", "AUTH_"))}
    full_env.update({"COLUMNS": "100", **(env or {})})
    return subprocess.run(
        [str(Path(sys.executable).parent / "firezone-relay"), *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def one_line_error(res: subprocess.CompletedProcess[str], message: str) -> None:
    """Exit 2, and stderr is the error first, then one line pointing to --help."""
    lines = res.stderr.splitlines()
    assert res.returncode == 2, res.stdout + res.stderr
    assert len(lines) == 2, res.stderr
    assert lines[0].startswith("firezone-relay") and ": error: " in lines[0], res.stderr
    assert message in lines[0], res.stderr
    assert "--help" in lines[1], res.stderr
    assert "Traceback" not in res.stdout + res.stderr


def wait_for_log(relay: RelayProcess, pattern: str, timeout: float = 10.0) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while True:
        found = re.search(pattern, relay.log())
        if found is not None:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"no {pattern!r} in the log:\n{relay.log()[-3000:]}")
        time.sleep(0.05)  # polling step, not a timing assumption


# -- 1: the README's quick start on a stock Debian Python --------------------------------------


def readme_quick_start() -> str:
    """The README's first shell command."""
    block = re.search(r"```sh\n(.*?)```", README.read_text(), re.S)
    assert block is not None
    lines = [line for line in block.group(1).splitlines() if line.strip()]
    assert len(lines) == 1, lines  # one line to paste
    return lines[0]


def test_readme_quick_start_works_with_debian_python(tmp_path: Path) -> None:
    """PEP 668: Debian's python3 refuses `pip install` outside a venv; the quick start makes
    one. Run it with /usr/bin/python3 (not pyenv) in an empty home, then the relay it installed
    on free ports."""
    command = readme_quick_start()
    assert "sudo" not in command and "-m venv" in command, command
    if (
        not Path("/usr/bin/python3").exists()
        or subprocess.run(
            ["/usr/bin/python3", "-c", "import ensurepip, venv"], capture_output=True
        ).returncode
    ):
        if REQUIRE_ALL:
            pytest.fail("Debian's /usr/bin/python3 with python3-venv is needed")
        pytest.skip("no /usr/bin/python3 with venv (apt-get install python3-venv)")
    *install, run = command.split(" && ")
    env = {
        "HOME": str(tmp_path),
        "PATH": "/usr/bin:/bin",  # Debian's python3, not a pyenv shim
        "LANG": "C.UTF-8",
        **{k: v for k, v in os.environ.items() if k.startswith("PIP_")},
    }
    done = subprocess.run(
        " && ".join(install), shell=True, cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    relay_command = os.path.expanduser(run.split()[0].replace("~", str(tmp_path), 1))
    assert Path(relay_command).is_file(), relay_command
    listen, health, control = free_port(), free_port(), free_port()
    low, high = port_range()
    extra = ["--listen-port", str(listen), "--lowest-port", str(low), "--highest-port", str(high)]
    extra += ["--health-check-addr", f"127.0.0.1:{health}"]
    extra += ["--control-endpoint", f"127.0.0.1:{control}"]
    log = tmp_path / "relay.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [relay_command, *run.split()[1:], *extra], env=env, stdout=out, stderr=out
        )
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.5)
            for _ in range(60):  # until it answers a Binding (bounded)
                assert proc.poll() is None, log.read_text()
                s.sendto(TurnClient("", "").binding(), ("127.0.0.1", listen))
                try:
                    answer = stun.parse(s.recv(2048))
                    break
                except TimeoutError:
                    continue
            else:
                raise AssertionError(log.read_text())
        assert answer.get(stun.Attr.XOR_MAPPED_ADDRESS)[0] == "127.0.0.1"
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(10)
    assert code == 0, log.read_text()
    assert "Traceback" not in log.read_text()


# -- 2-6: bad values are one line, the error first, exit 2 ------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--auth-secret", ""], "argument --auth-secret: too short (0 characters)"),
        (["--auth-secret", "hunter2"], "argument --auth-secret: too short (7 characters)"),
        (["--health-check-addr", "127.0.0.1:99999"], "port 99999 of '127.0.0.1:99999' is outside"),
        (["--control-endpoint", "127.0.0.1:70000"], "port 70000 of '127.0.0.1:70000' is outside"),
        (["--health-check-addr", "127.0.0.1:0"], "port 0 of '127.0.0.1:0' is outside 1-65535"),
        (
            ["--unauthenticated-rate-limit", "-5"],
            "argument --unauthenticated-rate-limit: must be a positive number: -5",
        ),
        (["--unauthenticated-rate-limit", "nan"], "must be a positive number: nan"),
        (["--public-ip4-addr", "0.0.0.0"], "--public-ip4-addr: 0.0.0.0 is unspecified"),
        (["--public-ip4-addr", "224.0.0.1"], "224.0.0.1 is multicast or broadcast"),
        (["--public-ip4-addr", "255.255.255.255"], "is multicast or broadcast"),
        (["--public-ip6-addr", "::"], "--public-ip6-addr: :: is unspecified"),
        (["--public-ip6-addr", "ff02::1"], "ff02::1 is multicast"),
        (["--lowest-port", "1"], "--lowest-port 1: allocation ports start at 1024"),
        (
            ["--listen-port", "50000"],
            "--listen-port 50000 is inside the allocation range --lowest-port 49152",
        ),
        (["--listen-port", "x"], "argument --listen-port: not a port: 'x'"),
    ],
)
def test_a_bad_value_is_one_line_and_exit_2(args: list[str], message: str) -> None:
    one_line_error(
        run_cli("--public-ip4-addr", "127.0.0.1", "--auth-secret", SECRET, *args), message
    )


def test_an_empty_secret_variable_still_means_generate() -> None:
    """``AUTH_SECRET=`` (as in an environment file) is unset, not an empty key."""
    res = run_cli("--public-ip4-addr", "0.0.0.0", env={"AUTH_SECRET": ""})
    one_line_error(res, "0.0.0.0 is unspecified")  # got past the secret


def test_a_bad_environment_variable_is_one_line() -> None:
    res = run_cli("--public-ip4-addr", "127.0.0.1", env={"HEALTH_CHECK_ADDR": "0.0.0.0:99999"})
    one_line_error(res, "bad environment variable value HEALTH_CHECK_ADDR='0.0.0.0:99999'")


def test_token_paths_that_cannot_be_read(tmp_path: Path) -> None:
    """A token path naming a directory, a missing or an empty file is an error naming the
    path, never a token sent to the portal."""
    base = ["--public-ip4-addr", "127.0.0.1", "--api-url", "ws://127.0.0.1:1"]
    (tmp_path / "empty").write_text("\n")
    for path, what in (
        (tmp_path, f"the token file {tmp_path} is a directory"),
        (tmp_path / "missing", f"the token file {tmp_path / 'missing'} is missing"),
        (tmp_path / "empty", f"the token file {tmp_path / 'empty'} is empty"),
    ):
        one_line_error(run_cli(*base, str(path)), what)
        one_line_error(run_cli(*base, env={"FIREZONE_TOKEN": str(path)}), what)


def test_public_loopback_or_private_address_warns_naming_the_flag(
    relay_factory: object, tmp_path: Path
) -> None:
    relay: RelayProcess = relay_factory()  # type: ignore[operator]
    assert re.search(r"WARN .*--public-ip4-addr 127\.0\.0\.1 is a loopback address", relay.log())


# -- 7: help ----------------------------------------------------------------------------------


GROUPS = ("network", "authentication", "portal", "peers", "XDP offload", "limits", "telemetry")


def test_help_groups_the_flags_with_defaults_and_lists_the_subcommands() -> None:
    res = run_cli("--help")
    assert res.returncode == 0 and not res.stderr, res.stderr
    text = res.stdout
    headings = re.findall(r"^(\S[^:\n]*):$", text, re.M)
    for group in (*GROUPS, "operations"):
        assert any(h.startswith(group) for h in headings), (group, headings)
    from firezone_relay.actors.cli import build_parser

    for action in build_parser()._actions:
        if action.dest in ("help", "version") or action.help == "==SUPPRESS==":
            continue
        assert action.help and "(default: " in action.help and "[env: " in action.help, action
    for verb in ("credentials", "systemd-unit", "help"):
        assert re.search(rf"^  {verb}\s+\S", text, re.M), verb
    assert len(text.splitlines()[0]) < 80  # a short usage line, not every flag


def test_help_subcommand_and_each_subcommands_help() -> None:
    assert run_cli("help").stdout == run_cli("--help").stdout
    for verb in ("credentials", "systemd-unit", "help"):
        for args in ([verb, "--help"], ["help", verb]):
            res = run_cli(*args)
            assert res.returncode == 0 and not res.stderr, (args, res.stderr)
            assert res.stdout.startswith(f"usage: firezone-relay {verb}"), (args, res.stdout)


def test_unknown_subcommands_and_their_bad_arguments_are_one_line() -> None:
    one_line_error(run_cli("hlep"), "unknown subcommand 'hlep'")
    one_line_error(run_cli("help", "nope"), "unknown subcommand 'nope'")
    one_line_error(run_cli("credentials", "--ttl", "0"), "argument --ttl: must be positive: 0")
    one_line_error(run_cli("credentials"), "give --auth-secret or --auth-secret-file")
    one_line_error(run_cli("credentials", "--auth-secret", ""), "too short (0 characters)")
    one_line_error(run_cli("systemd-unit", "--bogus"), "unrecognized arguments: --bogus")


# -- 8: signals -------------------------------------------------------------------------------


def binding_answered(relay: RelayProcess) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(TurnClient("", "").binding(), ("127.0.0.1", relay.listen_port))
        return stun.parse(s.recv(2048)).get(stun.Attr.XOR_MAPPED_ADDRESS) is not None


def test_sighup_reloads_and_sigusr2_is_ignored_with_a_log_line(relay: RelayProcess) -> None:
    for sig, line in (
        (signal.SIGHUP, r"SIGHUP received: reloading"),
        (signal.SIGUSR2, r"SIGUSR2 received: ignored"),
        (signal.SIGHUP, r"(?s)SIGHUP received: reloading.*SIGHUP received: reloading"),
    ):
        relay.proc.send_signal(sig)
        wait_for_log(relay, line)
        assert relay.alive() and relay.readyz()
        assert binding_answered(relay)
    code, _took = relay.stop(signal.SIGTERM)
    assert code == 0
    assert "SIGTERM received: stopping" in relay.log()
    assert "shutting down (SIGTERM)" in relay.log()


def test_sigusr1_drains_with_a_log_line(relay: RelayProcess) -> None:
    relay.proc.send_signal(signal.SIGUSR1)
    assert relay.proc.wait(10) == 0  # nothing to wait for: drained at once
    assert "SIGUSR1 received: draining" in relay.log()
    assert "drained: no allocation left" in relay.log()


@pytest.mark.parametrize("sig", [signal.SIGQUIT, signal.SIGALRM, signal.SIGPWR])
def test_an_unexpected_signal_stops_cleanly_as_a_failure(relay: RelayProcess, sig: int) -> None:
    """Logged, allocations freed, and a non-zero exit so Restart=on-failure restarts it."""
    code, _took = relay.stop(sig)
    assert code == 128 + sig, relay.log()[-2000:]
    name = signal.Signals(sig).name
    assert f"{name} received: stopping" in relay.log()
    assert f"shutting down ({name})" in relay.log()
    assert "freed 0 allocations" in relay.log() and "Traceback" not in relay.log()


# -- 9: failed authentication -----------------------------------------------------------------


def test_failed_authentication_is_logged_at_info_with_username_realm_and_address(
    relay: RelayProcess,
) -> None:
    username, _password = relay.credentials()
    client = TurnClient(username, "not-the-password")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(5)
        server = ("127.0.0.1", relay.listen_port)
        s.sendto(client.allocate(signed=False), server)
        client.learn(stun.parse(s.recv(2048)))  # 401 with REALM and NONCE
        s.sendto(client.allocate(), server)
        answer = stun.parse(s.recv(2048))
        port = s.getsockname()[1]
    assert answer.get(stun.Attr.ERROR_CODE)[0] == 401
    found = wait_for_log(
        relay,
        rf" INFO [\w.]+: authentication failed from 127\.0\.0\.1:{port} \(udp\): wrong password.*"
        rf"\(username '{re.escape(username)}', realm 'firezone'\)",
    )
    assert found


# -- 10 and 14: where the standalone secret is, never what ------------------------------------


def test_a_generated_secret_never_reaches_the_log(tmp_path: Path) -> None:
    listen, health, control = free_port(), free_port(), free_port()
    args = daemon_args(listen, port_range(), health, control, "firezone", "127.0.0.1", None)
    daemon = spawn_daemon(args, tmp_path / "relay.log")
    try:
        daemon.wait_ready(lambda: "standalone mode" in daemon.log())
        log = daemon.log()
    finally:
        daemon.stop()
    assert "generated for this run (not logged" in log, log
    assert "--auth-secret" in log
    assert not re.search(r"[0-9a-f]{64}", log), log


def test_a_generated_secret_is_shown_once_on_a_terminal(tmp_path: Path) -> None:
    listen, health, control = free_port(), free_port(), free_port()
    args = daemon_args(listen, port_range(), health, control, "firezone", "127.0.0.1", None)
    master, terminal = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "firezone_relay.actors.cli", *args],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=terminal,
        stderr=terminal,
    )
    os.close(terminal)
    seen = b""
    try:
        deadline = time.monotonic() + 15
        while b"standalone mode" not in seen and time.monotonic() < deadline:
            if select.select([master], [], [], 0.5)[0]:
                seen += os.read(master, 65536)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        os.close(master)
    text = seen.decode(errors="replace")
    shown = re.findall(r"auth secret for this run \(not logged\): ([0-9a-f]{64})", text)
    assert len(shown) == 1, text
    assert "shown on this terminal only" in text
    assert text.count(shown[0]) == 2  # the line and the credentials command beside it


def test_the_state_directory_secret_is_generated_once_and_kept(tmp_path: Path) -> None:
    """What the unit does with its StateDirectory (systemd exports $STATE_DIRECTORY): the
    first start writes the secret (0600), later starts read it, so credentials minted from the
    file keep working; the log says where it is, never what."""
    path = tmp_path / "auth-secret"
    listen, health, control = free_port(), free_port(), free_port()
    args = daemon_args(listen, port_range(), health, control, "rest", "127.0.0.1", None)
    seen = []
    for run in range(2):
        daemon = spawn_daemon(
            args, tmp_path / f"relay-{run}.log", env={"STATE_DIRECTORY": str(tmp_path)}
        )
        try:
            daemon.wait_ready(lambda d=daemon: "standalone mode" in d.log())  # type: ignore[misc]
            seen.append(path.read_text().strip())
            log = daemon.log()
            assert seen[-1] not in log
            made = "generated now" if run == 0 else "kept across restarts"
            assert f"auth secret from {path} ({made})" in log, log
            creds = run_cli(
                "credentials", "--auth-secret-file", str(path), "--auth-scheme", "rest", "--json"
            )
            assert creds.returncode == 0, creds.stderr
        finally:
            daemon.stop()
    assert seen[0] == seen[1] and len(seen[0]) == 64
    assert path.stat().st_mode & 0o777 == 0o600


def test_a_short_secret_in_a_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "auth-secret"
    path.write_text(f"{SECRET}\nshort\n")
    res = run_cli("--public-ip4-addr", "127.0.0.1", env={"AUTH_SECRET_FILE": str(path)})
    one_line_error(res, f"the auth secret in {path} is too short (5 characters)")
    res = run_cli("--public-ip4-addr", "127.0.0.1", env={"STATE_DIRECTORY": str(tmp_path)})
    one_line_error(res, f"the auth secret in {path} is too short (5 characters)")
