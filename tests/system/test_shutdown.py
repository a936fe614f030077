"""SIGTERM / SIGINT: stop accepting, free every allocation, exit 0 within 2 s."""

from __future__ import annotations

import asyncio
import re
import signal
import socket

import pytest

from tests.system.conftest import RelayProcess
from tests.system.peers import echo_peer, run, turn_client

pytestmark = pytest.mark.system


def _open_allocations(relay: RelayProcess, n: int) -> list[tuple[str, int]]:
    async def body() -> list[tuple[str, int]]:
        _peer, peer_addr = await echo_peer()
        relayed = []
        for _ in range(n):
            username, password = relay.credentials()
            transport, inbox = await turn_client(
                ("127.0.0.1", relay.listen_port), username, password
            )
            transport.sendto(b"bind a channel", peer_addr)
            await inbox.get()
            sockname = transport.get_extra_info("sockname")
            relayed.append((sockname[0], sockname[1]))
            # leave the allocation open: the relay has to free it
            transport._TurnTransport__inner_protocol.transport.close()  # type: ignore[attr-defined]
        await asyncio.sleep(0)
        return relayed

    return run(body)  # type: ignore[no-any-return]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_frees_allocations_and_exits_0_quickly(relay: RelayProcess, sig: int) -> None:
    relayed = _open_allocations(relay, 5)
    code, took = relay.stop(sig)
    assert code == 0, relay.log()[-2000:]
    assert took < 2.0
    log = relay.log()
    assert re.search(r"freed 5 allocations", log), log[-2000:]
    # the allocation ports are really closed: they can be bound again
    for host, port in relayed:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((host, port))


def test_portal_fatal_exits_1(relay_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # A token the portal refuses (401) is fatal: exit code 1, quickly.
    import threading

    from simulations.portal import Portal

    loop = asyncio.new_event_loop()
    portal = Portal("the-right-token")
    loop.run_until_complete(portal.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        relay = relay_factory("--api-url", portal.url, "wrong-token", wait_ready=False)
        code = relay.proc.wait(20)
        assert code == 1, relay.log()[-2000:]
        assert "rejected the token" in relay.log()
    finally:
        asyncio.run_coroutine_threadsafe(portal.stop(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
