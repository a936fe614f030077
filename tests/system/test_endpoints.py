"""``/healthz``, ``/readyz`` and the control endpoint's ``POST /log_filter``."""

from __future__ import annotations

import time

import pytest

from tests.system.conftest import RelayProcess, http
from tests.system.peers import run, turn_client

pytestmark = pytest.mark.system


def test_health_and_readiness_in_standalone_mode(relay: RelayProcess) -> None:
    assert http("GET", f"{relay.health}/healthz")[0] == 200
    status, body = http("GET", f"{relay.health}/readyz")
    assert status == 200 and body.strip()  # the version string
    assert http("GET", f"{relay.health}/nope")[0] == 404
    assert http("POST", f"{relay.health}/healthz")[0] == 405


def test_log_filter_changes_levels_at_run_time(relay: RelayProcess) -> None:
    async def allocate() -> None:
        username, password = relay.credentials()
        transport, _ = await turn_client(("127.0.0.1", relay.listen_port), username, password)
        transport.close()

    # at warn, allocations are not logged
    assert http("POST", f"{relay.control}/log_filter?directives=warn")[0] == 200
    run(allocate)

    # RUST_LOG-style per-target directive turns them (and debug lines) back on
    status, _ = http("POST", f"{relay.control}/log_filter?directives=warn,relay=debug")
    assert status == 200
    run(allocate)
    log = wait_for_log(relay, "allocated port")
    # exactly one: the second allocation's (levels are checked when a record is made, so the
    # first one, made at warn, can never show up later)
    assert log.count("allocated port") == 1
    assert " DEBUG relay" in log


def wait_for_log(relay: RelayProcess, text: str, timeout: float = 10.0) -> str:
    """The relay's log once it contains ``text`` (bounded poll)."""
    deadline = time.monotonic() + timeout
    while text not in (log := relay.log()):
        assert time.monotonic() < deadline, f"{text!r} never logged:\n{log}"
        time.sleep(0.02)  # polling step
    return log


@pytest.mark.parametrize(
    "query", ["directives=info,relay=loud", "directives=nonsense", "directives=a%20b=info", ""]
)
def test_log_filter_rejects_bad_directives(relay: RelayProcess, query: str) -> None:
    assert http("POST", f"{relay.control}/log_filter?{query}")[0] == 400
    assert http("GET", f"{relay.control}/log_filter?directives=info")[0] == 405
    assert http("POST", f"{relay.control}/log_filter?directives=info")[0] == 200


def test_json_logs(relay_factory) -> None:  # type: ignore[no-untyped-def]
    """Every line in the shape of Firezone's JSON logs (``tests/unit/test_log_format.py``),
    client addresses as fields in Firezone's names and form, never a tuple in the text."""
    import json

    from tests.system.peers import echo_peer, run, turn_client
    from tests.unit.test_log_format import FIREZONE, check_firezone_shape

    relay = relay_factory("--log-format", "json")
    username, password = relay.credentials()

    async def body() -> tuple[str, int]:
        _peer, peer_addr = await echo_peer()
        transport, inbox = await turn_client(("127.0.0.1", relay.listen_port), username, password)
        transport.sendto(b"json logs", peer_addr)
        await inbox.get()
        mapped: tuple[str, int] = transport.get_extra_info("related_address")
        transport.close()
        return mapped

    client = run(body)
    relay.stop()
    lines = [json.loads(line) for line in relay.log().splitlines()]
    for record in lines:
        check_firezone_shape(record)
        assert "('" not in record["fields"]["message"], record
    (bound,) = [r for r in lines if r["fields"]["message"].startswith("bound channel")]
    assert set(FIREZONE[1]["fields"]) <= set(bound["fields"])
    assert bound["fields"]["sender"] == f"{client[0]}:{client[1]}"
    assert bound["fields"]["channel"].isdigit() and bound["fields"]["allocation"].isdigit()
    (allocated,) = [r for r in lines if r["fields"]["message"].startswith("allocated port")]
    assert {"sender", "port", "lifetime"} <= set(allocated["fields"])
