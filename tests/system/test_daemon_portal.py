"""The daemon with a portal token, against the fake portal (simulations.portal) over real
websockets: readiness follows the join, and credentials the portal mints work on the relay."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest

from simulations.portal_thread import PortalThread
from tests.system.conftest import RelayProcess, http
from tests.system.peers import echo_peer, run, turn_client

pytestmark = pytest.mark.system


@pytest.fixture
def portal() -> Iterator[PortalThread]:
    with PortalThread("relay-token") as p:
        yield p


def _wait_status(relay: RelayProcess, path: str, status: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if http("GET", f"{relay.health}{path}", 1)[0] == status:
                return
        except OSError:  # not listening yet
            pass
        assert relay.alive(), relay.log()[-2000:]
        assert time.monotonic() < deadline, f"{path} never answered {status}"
        time.sleep(0.05)


def test_readiness_follows_the_portal_join(relay_factory, portal: PortalThread) -> None:  # type: ignore[no-untyped-def]
    portal.call(portal.portal.refuse, 503)  # the portal is "deploying"
    relay = relay_factory(
        "--api-url", portal.portal.url, "relay-token", "relay-1", wait_ready=False
    )
    _wait_status(relay, "/healthz", 200)
    time.sleep(0.5)
    assert http("GET", f"{relay.health}/readyz")[0] == 503  # sockets bound, not joined
    portal.call(portal.portal.accept)
    _wait_status(relay, "/readyz", 200)

    joined = portal.portal.connected_relays()
    assert [(r.name, r.ipv4, r.port) for r in joined] == [
        ("relay-1", "127.0.0.1", relay.listen_port)
    ]

    # credentials the portal hands to clients work on this relay (the stamp secret matches)
    creds = portal.call(portal.portal.credentials, "client-public-key")[0]

    async def body() -> None:
        _peer, peer_addr = await echo_peer()
        transport, inbox = await turn_client(
            ("127.0.0.1", relay.listen_port), creds["username"], creds["password"]
        )
        transport.sendto(b"via portal credentials", peer_addr)
        assert (await inbox.get())[0] == b"via portal credentials"
        transport.close()

    run(body)

    # losing the portal makes the relay unready but keeps it serving
    portal.call(portal.portal.refuse, 503)
    portal.call(portal.portal.drop)
    _wait_status(relay, "/readyz", 503)
    assert http("GET", f"{relay.health}/healthz")[0] == 200
    code, took = relay.stop()
    assert code == 0 and took < 2.0


def test_turn_keeps_relaying_through_a_portal_outage(relay_factory, portal: PortalThread) -> None:  # type: ignore[no-untyped-def]
    relay = relay_factory("--api-url", portal.portal.url, "relay-token", "relay-1")
    _wait_status(relay, "/readyz", 200)
    secret = portal.portal.connected_relays()[0].stamp_secret
    creds = portal.call(portal.portal.credentials, "gateway-public-key")[0]
    outage, down, during_done, restored = (threading.Event() for _ in range(4))

    async def body() -> None:
        _peer, peer_addr = await echo_peer()
        transport, inbox = await turn_client(
            ("127.0.0.1", relay.listen_port), creds["username"], creds["password"]
        )
        transport.sendto(b"before", peer_addr)
        assert (await inbox.get())[0] == b"before"
        outage.set()
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, down.wait, 20)
        for i in range(20):  # while the portal refuses every reconnect
            transport.sendto(b"during %d" % i, peer_addr)
            assert (await inbox.get())[0] == b"during %d" % i
            await asyncio.sleep(0.05)
        during_done.set()
        assert await loop.run_in_executor(None, restored.wait, 20)
        transport.sendto(b"after", peer_addr)
        assert (await inbox.get())[0] == b"after"
        transport.close()

    def outage_then_restore() -> None:
        outage.wait(10)
        portal.call(portal.portal.refuse, 503)
        portal.call(portal.portal.drop)
        _wait_status(relay, "/readyz", 503)
        down.set()
        during_done.wait(20)
        portal.call(portal.portal.accept)
        _wait_status(relay, "/readyz", 200, timeout=20)
        restored.set()

    driver = threading.Thread(target=outage_then_restore, daemon=True)
    driver.start()
    run(body, timeout=60)
    driver.join(5)
    rejoined = portal.portal.connected_relays()
    assert [r.stamp_secret for r in rejoined] == [secret]
    assert len(portal.portal.frames_from_relay("phx_join")) >= 2
    assert all(
        f["payload"] == {"stamp_secret": secret}
        for f in portal.portal.frames_from_relay("phx_join")
    )
    code, _ = relay.stop()
    assert code == 0
