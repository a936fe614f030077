"""The daemon's control inputs as messages: a relay in-process on a uvloop loop, with the fake
portal (simulations.portal) and aioice TURN clients on the same loop over real sockets.

Every message the control actor dispatches through ``CONTROL_ROUTES`` is recorded, with
whether it arrived while the command pipeline was draining (the 508 swap needs that)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any

import aioice.stun
import pytest
import uvloop

from firezone_relay.actors.daemon import CONTROL_ROUTES, Relay, Settings
from firezone_relay.actors.messages import (
    AllocationBindFailed,
    AllocationStopped,
    PeerSocketClosed,
    PeerSocketOpened,
    PortalClosed,
    PortalFatal,
    PortalJoined,
    Shutdown,
    tell,
)
from firezone_relay.actors.portal import PortalConfig
from firezone_relay.protocol.auth import make_credentials
from firezone_relay.protocol.phoenix import BackoffConfig, SessionConfig
from firezone_relay.protocol.server import ServerConfig
from firezone_relay.protocol.types import Family
from simulations.portal import Portal
from tests.system.conftest import free_port, port_range
from tests.system.peers import echo_peer, turn_client

pytestmark = pytest.mark.system

SECRET = "control-messages-test-secret-0123456789abcdef"
TOKEN = "relay-token"


class RecordingRelay(Relay):
    """The daemon, recording each control message before its handler runs."""

    def __init__(self, settings: Settings) -> None:
        self.seen: list[tuple[object, bool]] = []  # (message, pipeline draining)
        super().__init__(settings)

    def control_handlers(self) -> dict[type[object], Callable[[Any], None]]:
        return {
            kind: self._recording(handle) for kind, handle in super().control_handlers().items()
        }

    def _recording(self, handle: Callable[[Any], None]) -> Callable[[Any], None]:
        def recorded(message: Any) -> None:
            self.seen.append((message, self.pipeline.draining))
            handle(message)

        return recorded

    def kinds(self, *types: type) -> list[type]:
        return [type(m) for m, _ in self.seen if not types or isinstance(m, types)]


def _settings(*, ports: tuple[int, int] | None = None, **overrides: Any) -> Settings:
    low, high = ports or port_range(40)
    server = ServerConfig(
        public_ip4="127.0.0.1",
        listen_port=free_port(),
        lowest_port=low,
        highest_port=high,
        allow_loopback_peers=True,
    )
    base: dict[str, Any] = {
        "server": server,
        "bind_ip4": "127.0.0.1",
        "auth_secret": SECRET,
        "health_check_addr": None,
        "control_endpoint": None,
        "stats_interval": 3600.0,
    }
    return Settings(**{**base, **overrides})


def _on_loop(body: Callable[[], Coroutine[Any, Any, None]]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(30):
            await body()

    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(bounded())
    finally:
        loop.close()


async def _until(predicate: Callable[[], bool]) -> None:
    """Wait (bounded by the test's timeout) for state that another task changes."""
    while not predicate():
        await asyncio.sleep(0.01)


async def _started(settings: Settings) -> RecordingRelay:
    relay = RecordingRelay(settings)
    await relay.start()
    return relay


async def _stopped(relay: Relay) -> None:
    await relay.shutdown()
    relay.finish()


def _credentials() -> tuple[str, str]:
    return make_credentials("firezone", SECRET, int(time.time()) + 3600, "alice")


def test_every_control_message_has_a_handler() -> None:
    assert all(callable(handle) for handle in CONTROL_ROUTES.values())


def test_a_portal_join_loss_and_fatal_error_arrive_as_messages() -> None:
    async def body() -> None:
        async with Portal(TOKEN) as portal:
            config = PortalConfig(
                api_url=portal.url,
                token=TOKEN,
                name="relay-1",
                public_ip4="127.0.0.1",
                session=SessionConfig(heartbeat_interval=0.1, join_timeout=0.3),
                backoff=BackoffConfig(
                    initial_interval=0.02,
                    max_interval=0.1,
                    initial_phase_interval=0.05,
                    initial_phase_max_elapsed=3.0,
                    max_elapsed=5.0,
                ),
                connect_timeout=2.0,
                close_timeout=0.2,
            )
            relay = await _started(_settings(portal=config))
            try:
                assert not relay.ready  # sockets bound, not joined yet
                await _until(lambda: relay.ready)
                assert relay.kinds() == [PortalJoined]
                joined = portal.connected_relays()
                assert [r.stamp_secret for r in joined] == [relay.server.auth_secret]

                portal.refuse(503)  # deploying: the session reconnects until it is back
                await portal.drop()
                await _until(lambda: not relay.ready)
                assert relay.kinds() == [PortalJoined, PortalClosed]
                portal.accept()
                await _until(lambda: relay.ready)

                portal.refuse(401)  # the token is revoked: the relay must exit 1
                await portal.drop()
                await _until(relay._stopping.is_set)
                assert relay.kinds() == [
                    PortalJoined,
                    PortalClosed,
                    PortalJoined,
                    PortalClosed,
                    PortalFatal,
                ]
                fatal = relay.seen[-1][0]
                assert isinstance(fatal, PortalFatal) and "401" in fatal.reason
                assert relay.exit_code == 1 and not relay.ready
            finally:
                await _stopped(relay)
            assert relay.portal is None and not relay.control.is_alive()

    _on_loop(body)


def test_an_allocation_reports_its_sockets_and_its_end() -> None:
    async def body() -> None:
        relay = await _started(_settings())
        try:
            _peer, peer_addr = await echo_peer()
            transport, inbox = await turn_client(
                ("127.0.0.1", relay.settings.server.listen_port), *_credentials()
            )
            port = transport.get_extra_info("sockname")[1]
            opened = relay.seen[0][0]
            assert isinstance(opened, PeerSocketOpened)
            assert (opened.port, opened.family) == (port, Family.V4)
            assert relay.seen[0][1]  # told within the drain that carried CreateAllocation
            assert relay.dataplane.allocation_sockets == {(port, int(Family.V4)): opened.sock}
            transport.sendto(b"through the allocation socket", peer_addr)
            assert (await inbox.get())[0] == b"through the allocation socket"

            transport.close()  # deletes the allocation (Refresh, lifetime 0)
            await _until(lambda: not relay.pipeline.allocations)
            assert relay.kinds() == [PeerSocketOpened, PeerSocketClosed, AllocationStopped]
            closed, stopped = relay.seen[1][0], relay.seen[2][0]
            assert isinstance(closed, PeerSocketClosed) and closed.port == port
            assert closed.sock is opened.sock
            assert closed.sock.fileno() == -1  # the data plane closed it, after its routes
            assert isinstance(stopped, AllocationStopped) and stopped.port == port
            assert relay.dataplane.allocation_sockets == {}

            assert tell(relay.control, Shutdown(0, "test"))  # what SIGTERM tells
            assert relay._stopping.is_set() and relay.exit_code == 0
        finally:
            await _stopped(relay)

    _on_loop(body)


def _held_port() -> tuple[socket.socket, int]:
    low, _ = port_range(2)
    for port in range(low, 65500):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            sock.close()
            continue
        return sock, port
    raise RuntimeError("no free port to hold")


def test_a_failed_bind_answers_508_within_the_same_drain() -> None:
    blocker, port = _held_port()

    async def body() -> None:
        relay = await _started(_settings(ports=(port, port)))
        try:
            with pytest.raises(aioice.stun.TransactionFailed, match="508"):
                await turn_client(("127.0.0.1", relay.settings.server.listen_port), *_credentials())
            assert relay.kinds(AllocationBindFailed, AllocationStopped) == [
                AllocationBindFailed,
                AllocationStopped,
            ]
            failed, draining = relay.seen[0]
            assert isinstance(failed, AllocationBindFailed) and failed.port == port
            assert draining  # the invariant the 508 swap relies on
            assert relay.server.num_allocations == 0 and not relay.pipeline.allocations
            assert relay.dataplane.allocation_sockets == {}
        finally:
            await _stopped(relay)

    try:
        _on_loop(body)
    finally:
        blocker.close()


def test_a_failed_bind_moves_the_allocation_within_the_same_drain() -> None:
    low, _ = port_range(2)
    ports = (low, low + 1)
    seed = 7

    async def first_choice() -> int:
        relay = await _started(_settings(ports=ports, rng_seed=seed))
        try:
            transport, _ = await turn_client(
                ("127.0.0.1", relay.settings.server.listen_port), *_credentials()
            )
            chosen = int(transport.get_extra_info("sockname")[1])
            transport.close()
            return chosen
        finally:
            await _stopped(relay)

    chosen: list[int] = []

    async def probe() -> None:
        chosen.append(await first_choice())

    _on_loop(probe)  # the same seed picks the same port first
    (taken,) = chosen
    other = ports[1] if taken == ports[0] else ports[0]
    blocker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    blocker.bind(("127.0.0.1", taken))

    async def body() -> None:
        relay = await _started(_settings(ports=ports, rng_seed=seed))
        try:
            transport, _ = await turn_client(
                ("127.0.0.1", relay.settings.server.listen_port), *_credentials()
            )
            assert transport.get_extra_info("sockname")[1] == other
            failed, draining = relay.seen[0]
            assert isinstance(failed, AllocationBindFailed) and failed.port == taken
            assert draining
            assert list(relay.dataplane.allocation_sockets) == [(other, int(Family.V4))]
            transport.close()
        finally:
            await _stopped(relay)

    try:
        _on_loop(body)
    finally:
        blocker.close()
