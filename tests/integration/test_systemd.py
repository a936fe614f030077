"""The systemd unit: it verifies, and the privileges it grants are enough for the relay with XDP.

The second test does what the unit does without systemd: the relay runs as an unprivileged
user with exactly the unit's capabilities (``setpriv``), offload on, in the relay namespace of
the NAT topology, and relays a channel in the kernel.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from simulations.frames import channel_data
from simulations.netns.relay import SECRET, allocate_and_bind
from simulations.netns.topology import Topology
from tests.integration.conftest import require_bcc

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "actors" / "systemd" / "firezone-relay.service"
HEALTH = 8080


def directives(text: str) -> dict[str, list[str]]:
    """``Key=Value`` lines of a unit file, every value of each key in order."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


def unit_caps() -> list[str]:
    """The unit's ambient capabilities, as setpriv names them (``net_admin``)."""
    (caps,) = directives(UNIT.read_text())["AmbientCapabilities"]
    return sorted(c.removeprefix("CAP_").lower() for c in caps.split())


def test_unit_verifies(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed (apt-get install systemd)")
    relay = Path(sys.executable).parent / "firezone-relay"
    assert relay.exists(), relay
    unit = tmp_path / "firezone-relay.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/firezone-relay", str(relay)))
    res = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0 and not res.stderr.strip(), res.stderr
    d = directives(UNIT.read_text())
    assert d["DynamicUser"] == ["yes"] and d["NoNewPrivileges"] == ["yes"]
    assert d["Restart"] == ["on-failure"] and d["EnvironmentFile"]
    assert d["ProtectSystem"] == ["strict"] and d["ProtectHome"] == ["yes"]
    assert d["CapabilityBoundingSet"] == d["AmbientCapabilities"]
    assert unit_caps() == ["bpf", "net_admin", "net_bind_service", "perfmon"]


def test_cli_prints_the_unit_and_its_environment_file() -> None:
    for args, name in (([], "firezone-relay.service"), (["--env"], "firezone-relay.env")):
        out = subprocess.run(
            [sys.executable, "-m", "firezone_relay.actors.cli", "systemd-unit", *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        assert out == (UNIT.parent / name).read_text()


@pytest.fixture
def world_readable_env() -> Iterator[Path]:
    """This tox environment's packages, hard-linked where an unprivileged user can read them
    (``.tox`` and a pyenv under /root are not); removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix="fzrelay-", dir="/tmp"))
    try:
        base.chmod(0o755)
        purelib = sysconfig.get_paths()["purelib"]
        subprocess.run(["cp", "-al", purelib, str(base / "site")], check=True, timeout=60)
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def unprivileged_python() -> str:
    """An interpreter the unprivileged user can run, of this interpreter's minor version."""
    candidates = [sys.executable, f"/usr/bin/python{sys.version_info[0]}.{sys.version_info[1]}"]
    for python in candidates:
        res = subprocess.run(
            ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups", python, "-V"],
            capture_output=True,
            timeout=30,
        )
        if res.returncode == 0:
            return python
    pytest.fail(f"none of {candidates} runs as nobody")


def wait_for(predicate: object, timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()  # type: ignore[operator]
        if value:
            return value
        time.sleep(0.05)  # polling step, not a timing assumption
    raise AssertionError(f"timed out waiting for {what}")


def xdp_relayed(t: Topology) -> float:
    """``relay_packet_size`` observations on the XDP path, from the relay's /metrics."""
    s = t.rly.socket(socket.AF_INET, socket.SOCK_STREAM)
    with s:
        s.settimeout(3)
        s.connect(("127.0.0.1", HEALTH))
        s.sendall(b"GET /metrics HTTP/1.0\r\nHost: relay\r\n\r\n")
        body = b""
        while chunk := s.recv(65536):
            body += chunk
    m = re.search(rb'relay_packet_size_bytes_count\{relay_datapath="xdp"\} (\S+)', body)
    return float(m.group(1)) if m else 0.0


def test_relays_with_xdp_as_an_unprivileged_user(
    topology: Topology, world_readable_env: Path, tmp_path: Path
) -> None:
    require_bcc()
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv not installed (apt-get install util-linux)")
    t = topology
    caps = ",".join(["-all", *(f"+{c}" for c in unit_caps())])
    python = unprivileged_python()
    log_path = tmp_path / "relay.log"
    with log_path.open("wb") as log:
        proc = t.rly.popen(
            *("setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups"),
            *("--inh-caps", caps, "--ambient-caps", caps, "--bounding-set", caps),
            "--no-new-privs",
            *(python, "-m", "firezone_relay.actors.cli", "--public-ip4-addr", t.relay4),
            *("--lowest-port", "49152", "--highest-port", "49407", "--auth-secret", SECRET),
            *("--allow-private-peers", "--health-check-addr", f"127.0.0.1:{HEALTH}"),
            *("--ebpf-offloading", t.relay_dev, "--ebpf-attach-mode", "generic"),
            "--ebpf-mandatory",
            cwd=world_readable_env,
            env={
                "PYTHONPATH": str(world_readable_env / "site"),
                "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                "HOME": str(world_readable_env),
                "PYTHONUNBUFFERED": "1",
            },
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:

        def offload_decided() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"relay exited {proc.returncode}:\n{log_path.read_text()}")
            return "eBPF offloading enabled" in log_path.read_text(errors="replace")

        wait_for(offload_decided, 90, "XDP offload to attach")
        status = Path(f"/proc/{proc.pid}/status").read_text()
        assert re.search(r"^Uid:\s+65534\s", status, re.M), status
        cap_eff = int(re.search(r"^CapEff:\s+(\w+)", status, re.M).group(1), 16)  # type: ignore[union-attr]
        wanted = {"net_bind_service": 10, "net_admin": 12, "perfmon": 38, "bpf": 39}
        assert cap_eff == sum(1 << wanted[c] for c in unit_caps())
        assert "prog/xdp" in t.rly.ip("-d", "link", "show", "dev", t.relay_dev)

        client = t.cli.udp("0.0.0.0", 40000)
        peer = t.rtr.udp(t.gateway_public4, 50000)  # a peer on the public segment
        server = (t.relay4, 3478)
        wait_for(lambda: relay_answers(client, server), 30, "the relay to answer STUN")
        relayed = allocate_and_bind(client, server, 0x4000, (t.gateway_public4, 50000))
        for i in range(200):  # until the binding is in the kernel's map (bounded)
            client.sendto(channel_data(0x4000, b"to peer %d" % i), server)
            data, src = peer.recvfrom(2048)
            assert data == b"to peer %d" % i and src == relayed
            if xdp_relayed(t) > 0:
                break
        else:
            raise AssertionError(f"XDP relayed nothing:\n{log_path.read_text()}")
        peer.sendto(b"to client", relayed)
        client.settimeout(2)
        assert client.recvfrom(2048)[0] == channel_data(0x4000, b"to client")
        assert wait_for(lambda: xdp_relayed(t) >= 2, 10, "the XDP counters") and proc.poll() is None
    finally:
        proc.terminate()
        code = proc.wait(10)
    assert code == 0, log_path.read_text()
    assert "Traceback" not in log_path.read_text()


def relay_answers(sock: socket.socket, server: tuple[str, int]) -> bool:
    from simulations.turn_client import TurnClient

    sock.settimeout(0.2)
    sock.sendto(TurnClient("", "").binding(), server)
    try:
        sock.recv(2048)
    except OSError:
        return False
    finally:
        sock.settimeout(2)
    return True
