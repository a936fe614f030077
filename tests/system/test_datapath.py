"""Which userspace data path runs is visible (issue 17, item 6): the daemon logs it at start,
exports it as ``relay.datapath.info{relay.userspace.impl}``, takes ``RELAY_DATAPATH=python`` to
force the pure-Python fallback, refuses a bad value with one line, falls back with one WARN
when the installed compiled helper is stale, and on each path the C route mirror holds exactly
the core's routes (``GET /debug/routes`` on the control endpoint)."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path
from typing import Any

import pytest

from firezone_relay.actors import udpio
from tests.required import REQUIRE_ALL
from tests.system.conftest import ROOT, RelayProcess, http, start_relay
from tests.system.peers import echo_peer, run, turn_client

pytestmark = pytest.mark.system

LINES = {
    "compiled": "userspace data path: recvmmsg/sendmmsg (compiled) "
    f"(API version {udpio.API_VERSION})",
    "python": "userspace data path: recvfrom/sendto (pure Python) "
    "(forced by RELAY_DATAPATH=python)",
}


def _relay_through_a_channel(relay: RelayProcess, n: int = 10) -> Any:
    """aioice binds a channel to the echo peer and relays ``n`` datagrams each way on it."""

    async def body() -> Any:
        _peer, peer_addr = await echo_peer()
        username, password = relay.credentials()
        transport, inbox = await turn_client(("127.0.0.1", relay.listen_port), username, password)
        for i in range(n):
            transport.sendto(b"x" * (100 + i), peer_addr)
            data, _ = await inbox.get()
            assert data == b"x" * (100 + i)
        return transport  # left open: the allocation and its channel stay

    return run(body)


def _log_lines(relay: RelayProcess, text: str) -> list[str]:
    return [line for line in relay.log().splitlines() if text in line]


@pytest.mark.parametrize("path", ["compiled", "python"])
def test_each_data_path_is_logged_exported_and_mirrors_the_core(
    relay_factory: Any, path: str
) -> None:
    if path == "compiled" and udpio.IMPL != "compiled" and "forced" not in udpio.IMPL_REASON:
        if REQUIRE_ALL:
            pytest.fail(f"the compiled helper is not in use here: {udpio.IMPL_REASON}")
        pytest.skip(udpio.IMPL_REASON)
    relay = relay_factory(env={"RELAY_DATAPATH": "python" if path == "python" else "auto"})
    _relay_through_a_channel(relay)

    (line,) = _log_lines(relay, "userspace data path:")
    assert LINES[path] in line and "WARN" not in line

    status, text = http("GET", f"{relay.health}/metrics")
    assert status == 200
    assert f'relay_datapath_info{{relay_userspace_impl="{path}"}} 1' in text.splitlines()

    status, body = http("GET", f"{relay.control}/debug/routes")
    assert status == 200
    routes = json.loads(body)
    assert routes["impl"] == path and routes["equal"], routes
    assert routes["core"] == 1  # one bound channel: a route each way
    assert routes["mirror"] == routes["expected"] == (2 if path == "compiled" else 0)


def test_a_bad_datapath_value_is_one_line_and_exit_2(tmp_path: Path) -> None:
    relay = start_relay(tmp_path, env={"RELAY_DATAPATH": "fast"}, wait_ready=False)
    assert relay.proc.wait(10) == 2
    errors = [line for line in relay.log().splitlines() if "error:" in line]
    assert errors == ["firezone-relay: error: RELAY_DATAPATH: 'fast' is not one of auto, python"]
    assert "Traceback" not in relay.log()


def test_a_stale_compiled_helper_falls_back_with_one_warning(tmp_path: Path) -> None:
    """The real module, its API version changed before the daemon imports it (what a build
    left installed from older sources looks like to actors/udpio.py)."""
    if udpio.IMPL != "compiled" and "forced" not in udpio.IMPL_REASON:
        if REQUIRE_ALL:
            pytest.fail(f"the compiled helper is not in use here: {udpio.IMPL_REASON}")
        pytest.skip(udpio.IMPL_REASON)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "from firezone_relay.actors import _udpio\n_udpio.API_VERSION = 0\n"
    )
    relay = start_relay(tmp_path, env={"PYTHONPATH": f"{site}:{ROOT}", "RELAY_DATAPATH": "auto"})
    try:
        _relay_through_a_channel(relay, 3)
        (line,) = _log_lines(relay, "userspace data path:")
        assert re.search(r"\bWARN", line), line
        assert "recvfrom/sendto (pure Python)" in line
        assert f"has API version 0, these sources expect {udpio.API_VERSION}" in line
        _, text = http("GET", f"{relay.health}/metrics")
        assert 'relay_datapath_info{relay_userspace_impl="python"} 1' in text.splitlines()
    finally:
        relay.stop(signal.SIGKILL)
