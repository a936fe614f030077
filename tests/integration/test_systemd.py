"""The systemd unit with its XDP drop-in grants enough for the relay with XDP, and no more.

(The unit's own checks, ``systemd-analyze verify`` included, are in
``tests/system/test_systemd_unit.py``.) The XDP test does what the unit does without systemd:
the relay runs as an unprivileged user with exactly the capabilities of the unit and its
drop-in (``setpriv``), offload on, in the relay namespace of the NAT topology, and relays a
channel in the kernel.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from simulations.frames import channel_data
from simulations.netns.relay import SECRET, allocate_and_bind
from simulations.netns.topology import Topology
from tests.integration.conftest import require_bcc
from tests.unprivileged import unprivileged_python, world_readable_site

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "actors" / "systemd" / "firezone-relay.service"
DROP_IN = REPO / "actors" / "systemd" / "xdp.conf"
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
    """The ambient capabilities of the unit with its XDP drop-in (systemd merges the lists),
    as setpriv names them (``net_admin``)."""
    caps = [
        cap
        for text in (UNIT.read_text(), DROP_IN.read_text())
        for line in directives(text)["AmbientCapabilities"]
        for cap in line.split()
    ]
    return sorted(c.removeprefix("CAP_").lower() for c in caps)


def test_xdp_capabilities_come_only_with_the_drop_in() -> None:
    unit, drop_in = directives(UNIT.read_text()), directives(DROP_IN.read_text())
    assert unit["AmbientCapabilities"] == unit["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    assert drop_in["AmbientCapabilities"] == drop_in["CapabilityBoundingSet"]
    assert unit_caps() == ["bpf", "net_admin", "net_bind_service", "perfmon"]


@pytest.fixture
def world_readable_env() -> Iterator[Path]:
    with world_readable_site() as base:
        yield base


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
    if python is None:
        pytest.fail("no Python interpreter runs as nobody")
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
