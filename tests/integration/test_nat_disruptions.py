"""Transfers that something interrupts half-way: the client changes networks, the portal goes
away and comes back, the relay restarts with a new secret. The web server holds the 10 MB
download at an exact byte (``NatRun.hold_web_at``) while the disruption happens, so it lands
mid-transfer however fast the transfer runs; once released, the download must complete with
the right checksum, and the relay's log must stay free of warnings and errors.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.integration.nat_fixtures import (
    CLIENT_KEY,
    GATEWAY_KEY,
    MODES,
    datapath,
    nat_run,
    require_nat_tools,
    shared_blob,
    wait_until,
)

pytestmark = pytest.mark.integration

MIDWAY = 2_000_000  # where the web server holds the download while a test disrupts it


@pytest.fixture
def blob(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    require_nat_tools()
    return shared_blob(tmp_path_factory)


@pytest.mark.parametrize("mode", MODES)
def test_client_roams_to_a_new_network_mid_transfer(
    mode: str, tmp_path: Path, blob: tuple[Path, str]
) -> None:
    """The client's address changes (so its public address and 5-tuple do); it allocates
    again with the same credentials, and the relay frees the old allocation (one allocation
    per username). The gateway follows the client's new relayed address."""
    with nat_run(tmp_path, blob, xdp=datapath(mode), gateway_allocates=False) as run:
        before = run.hub.wait_event("client", "allocated", 1)
        run.hold_web_at(MIDWAY)
        download = run.download(max_time=60)
        download.wait_for_bytes(MIDWAY, 20)
        assert download.received() == MIDWAY
        since = len(run.hub.events)
        local = run.topo.move_client()
        run.hub.send("client", {"type": "roam", "bind": local})
        after = run.hub.wait_event("client", "allocated", 20, since=since)
        run.release_web()
        run.finish(download)

        assert after["local"].startswith(local + ":")
        assert after["relay"]["4"] != before["relay"]["4"]
        srflx = run.hub.wait_event("client", "srflx", 1, since=since)
        assert srflx["addr"][0] == run.topo.client_roam_public4  # the relay saw the move
        run.hub.wait_event("gateway", "target", 1, since=since, peer=after["relay"]["4"])
        assert run.relay.metric("relay_active_allocations") == 1


@pytest.mark.parametrize("mode", MODES)
def test_portal_stops_and_restarts_mid_transfer(
    mode: str, tmp_path: Path, blob: tuple[Path, str]
) -> None:
    """The relay joined the test portal, which minted the agents' credentials. The portal
    goes down mid-transfer: relaying carries on, TURN refreshes still authenticate (the
    relay keeps its secret), the relay reports not-ready, then rejoins with the same stamp
    secret once the portal is back. The web server lets the download move from ``MIDWAY`` to
    ``2 * MIDWAY`` only while the portal is down (and the agents have refreshed without it),
    then holds it there until the portal is back."""
    with nat_run(tmp_path, blob, xdp=datapath(mode), portal=True, gateway_allocates=False) as run:
        portal = run.portal_thread
        assert portal is not None
        (first,) = portal.joined_relays()
        run.hold_web_at(MIDWAY)
        download = run.download(max_time=120)
        download.wait_for_bytes(MIDWAY, 20)
        assert download.received() == MIDWAY

        portal.stop_serving()
        since = len(run.hub.events)
        wait_until(lambda: run.relay.http("GET", "/readyz")[0] == 503, 10, "the relay to notice")
        run.hub.wait_event("client", "refreshed", 10, since=since)  # every 3 s in tests
        run.hub.wait_event("client", "channel_refreshed", 10, since=since)
        run.hold_web_at(2 * MIDWAY)  # relaying without the portal
        download.wait_for_bytes(2 * MIDWAY, 20)
        assert download.received() == 2 * MIDWAY
        assert download.proc.poll() is None
        portal.start_serving()
        wait_until(portal.joined_relays, 20, "the relay to rejoin the portal", step=0.1)
        run.release_web()
        run.finish(download)

        (second,) = portal.joined_relays()
        assert second.connection != first.connection
        assert second.stamp_secret == first.stamp_secret
        assert run.relay.http("GET", "/readyz")[0] == 200


@pytest.mark.parametrize("secret", ["new", "same"])
@pytest.mark.parametrize("mode", MODES)
def test_relay_restarts_mid_transfer(
    mode: str, secret: str, tmp_path: Path, blob: tuple[Path, str]
) -> None:
    """Both agents allocate (relay loop), and the relay restarts mid-transfer. The agents
    notice the silence and refresh.

    * new secret: their old credentials get 401, so they drop them and wait; with
      credentials minted from the new secret (what the portal would push) they allocate again;
    * same secret: the credentials still work, the relay answers 437 (no such allocation), and
      they allocate again at once.

    Either way they exchange their new relayed addresses and the download resumes."""
    with nat_run(tmp_path, blob, xdp=datapath(mode)) as run:
        run.hold_web_at(MIDWAY)
        download = run.download(max_time=60)
        download.wait_for_bytes(MIDWAY, 20)
        assert download.received() == MIDWAY
        since = len(run.hub.events)
        assert run.relay.stop() == 0  # a clean shutdown on SIGTERM
        if secret == "new":
            run.secret = run.relay.secret = os.urandom(32).hex()
        run.relay.start()
        if run.xdp:
            run.relay.wait_offload()
        if secret == "new":
            for name in ("client", "gateway"):
                run.hub.wait_event(name, "auth_failed", 20, since=since)
            for name, key in (("client", CLIENT_KEY), ("gateway", GATEWAY_KEY)):
                username, password = run.credentials(key)
                run.hub.send(
                    name, {"type": "credentials", "username": username, "password": password}
                )
        for name in ("client", "gateway"):
            run.hub.wait_event(name, "allocated", 20, since=since)
        run.release_web()
        run.finish(download)
        assert run.relay.metric("relay_active_allocations") == 2
        for name in ("client", "gateway"):
            if secret == "same":
                assert run.hub.count(name, "auth_failed") == 0
                run.hub.wait_event(name, "error_response", 1, since=since, code=437)
