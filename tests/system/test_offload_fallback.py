"""XDP is an accelerator: without it the relay runs, unless the operator made it mandatory."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.system

BASE = [
    sys.executable,
    "-m",
    "firezone_relay.actors.cli",
    "--public-ip4-addr",
    "127.0.0.1",
    "--listen-port",
    "34781",
    "--health-check-addr",
    "",
    "--control-endpoint",
    "",
    "--auth-secret",
    "offload-fallback-secret",
    "--ebpf-offloading",
    "nosuchif0",
]


def test_mandatory_offload_that_cannot_start_exits_1() -> None:
    done = subprocess.run([*BASE, "--ebpf-mandatory"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert "mandatory" in done.stderr + done.stdout
