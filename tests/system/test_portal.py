"""The portal driver (actors.portal) against the fake portal (simulations.portal) over real
websockets on loopback: the upgrade request, the join, heartbeats, every fatal case, every
hiccup, Retry-After, DNS, TLS and bad input. Intervals are shortened so the suite stays fast."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from firezone_relay.actors.portal import PortalClient, PortalConfig, resolve_host
from firezone_relay.protocol.auth import firezone_password, portal_salt
from firezone_relay.protocol.phoenix import BackoffConfig, Fatal, SessionConfig
from simulations.portal import Portal, relay_id

pytestmark = pytest.mark.system

TOKEN = "relay-token"
SECRET = "5e" * 32
FAST_SESSION = SessionConfig(heartbeat_interval=0.1, join_timeout=0.3)
FAST_BACKOFF = BackoffConfig(
    initial_interval=0.02,
    max_interval=0.1,
    initial_phase_interval=0.05,
    initial_phase_max_elapsed=3.0,
    max_elapsed=5.0,
)


def run(body: Callable[[], Coroutine[Any, Any, None]], timeout: float = 15.0) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(timeout):
            await body()

    asyncio.run(bounded())


@dataclass
class Relay:
    """A driver running against ``portal``, recording its callbacks."""

    portal: Portal
    config: PortalConfig
    resolver: Callable[[str, int], Awaitable[list[str]]] | None = None
    joined: list[bool] = field(default_factory=list)
    fatal: list[str] = field(default_factory=list)
    client: PortalClient = field(init=False)
    task: asyncio.Task[Fatal] = field(init=False)

    def start(self) -> Relay:
        self.client = PortalClient(
            self.config,
            SECRET,
            on_joined=self.joined.append,
            on_fatal=self.fatal.append,
            resolver=self.resolver,
        )
        self.task = asyncio.get_running_loop().create_task(self.client.run())
        return self

    async def outcome(self, timeout: float = 10.0) -> Fatal:
        async with asyncio.timeout(timeout):
            return await self.task

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)

    async def wait_joins(self, n: int) -> None:
        await self.portal.wait_for(lambda: len(self.portal.relays) >= n)
        await wait_until(lambda: self.joined.count(True) >= n)


def config_for(portal: Portal, **overrides: Any) -> PortalConfig:
    base = PortalConfig(
        api_url=portal.url,
        token=TOKEN,
        listen_port=3478,
        name="relay-1",
        public_ip4="127.0.0.1",
        public_ip6="::1",
        session=FAST_SESSION,
        backoff=FAST_BACKOFF,
        connect_timeout=2.0,
        close_timeout=0.2,
    )
    return replace(base, **overrides)


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


def joins(portal: Portal) -> list[dict[str, Any]]:
    return portal.frames_from_relay("phx_join")


def assert_same_secret_rejoins(portal: Portal, n: int) -> None:
    frames = joins(portal)
    assert len(frames) >= n
    for frame in frames:
        assert frame == {
            "topic": "relay",
            "event": "phx_join",
            "payload": {"stamp_secret": SECRET},
            "ref": 0,
        }


# ---- the upgrade and the join


def test_upgrade_request_and_join() -> None:
    async def body() -> None:
        async with Portal(TOKEN) as portal:
            relay = Relay(portal, config_for(portal)).start()
            await relay.wait_joins(1)
            [request] = portal.requests
            assert request.path == "/relay/websocket"
            assert list(request.query.items()) == [
                ("name", "relay-1"),
                ("ipv4", "127.0.0.1"),
                ("ipv6", "::1"),
                ("port", "3478"),
            ]
            assert request.headers["x-authorization"] == f"Bearer {TOKEN}"
            assert re.fullmatch(r"\S+/\S+ relay/\S+ \(\S+; \S+\)", request.headers["user-agent"])
            first = portal.frames[0]
            assert first.inbound
            assert first.data == (
                '{"topic":"relay","event":"phx_join","payload":{"stamp_secret":"'
                + SECRET
                + '"},"ref":0}'
            )
            assert relay.joined == [True]
            assert relay.client.joined
            assert "token" not in relay.client.url
            await relay.stop()
            assert relay.joined == [True, False]

    run(body)


def test_legacy_token_query_parameter() -> None:
    async def body() -> None:
        async with Portal(TOKEN) as portal:
            relay = Relay(portal, config_for(portal, token_in_query=True, name=None)).start()
            await relay.wait_joins(1)
            request = portal.requests[0]
            assert list(request.query) == ["token", "ipv4", "ipv6", "port"]
            assert request.query["token"] == TOKEN
            assert "<redacted>" in relay.client.url
            await relay.stop()

    run(body)


def test_api_url_path_is_kept() -> None:
    async def body() -> None:
        async with Portal(TOKEN) as portal:
            api_url = portal.url.replace("ws://", "http://") + "/api/"
            relay = Relay(portal, config_for(portal, api_url=api_url)).start()
            await relay.wait_joins(1)
            assert portal.requests[0].path == "/api/relay/websocket"
            await relay.stop()

    run(body)


def test_unsupported_url_scheme_is_refused() -> None:
    with pytest.raises(ValueError, match="unsupported portal URL scheme 'ftp'"):
        PortalClient(PortalConfig(api_url="ftp://portal.example", token=TOKEN), SECRET)


def test_init_is_ignored_and_heartbeats_flow(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="relay.portal")

    async def body() -> None:
        async with Portal(TOKEN) as portal:
            relay = Relay(portal, config_for(portal)).start()
            await portal.wait_for(lambda: len(portal.frames_from_relay("heartbeat")) >= 3)
            inits = [
                f
                for f in portal.frames
                if not f.inbound and f.message and f.message["event"] == "init"
            ]
            assert len(inits) == 1
            heartbeats = portal.frames_from_relay("heartbeat")
            assert [h["ref"] for h in heartbeats[:3]] == [1, 2, 3]
            assert all(h["topic"] == "phoenix" and h["payload"] == {} for h in heartbeats)
            assert len(portal.requests) == 1
            assert relay.joined == [True]
            await relay.stop()

    run(body)
    assert any("init" in r.getMessage() for r in caplog.records)


# ---- fatal outcomes (exit code 1)


def test_http_401_is_fatal() -> None:
    async def body() -> None:
        async with Portal("another-token") as portal:
            relay = Relay(portal, config_for(portal)).start()
            outcome = await relay.outcome()
            assert "401" in outcome.reason
            assert relay.fatal == [outcome.reason]
            assert [r.status for r in portal.requests] == [401]
            assert relay.joined == []

    run(body)


def test_join_error_reply_is_fatal() -> None:
    async def body() -> None:
        async with Portal(TOKEN) as portal:
            portal.join_reply = "error"
            relay = Relay(portal, config_for(portal)).start()
            outcome = await relay.outcome()
            assert "refused the join" in outcome.reason
            assert len(portal.requests) == 1
            assert relay.fatal == [outcome.reason]

    run(body)


def test_disconnect_token_expired_is_fatal() -> None:
    async def body() -> None:
        async with Portal(TOKEN) as portal:
            relay = Relay(portal, config_for(portal)).start()
            await relay.wait_joins(1)
            await portal.send_disconnect("token_expired")
            outcome = await relay.outcome()
            assert "token expired" in outcome.reason
            assert relay.joined == [True, False]
            assert len(portal.requests) == 1

    run(body)


def test_partition_longer_than_the_limit_is_fatal() -> None:
    async def body() -> None:
        portal = Portal(TOKEN)
        await portal.start()
        backoff = replace(FAST_BACKOFF, max_elapsed=0.5)
        relay = Relay(portal, config_for(portal, backoff=backoff)).start()
        await relay.wait_joins(1)
        await portal.stop()
        outcome = await relay.outcome()
        assert "unreachable" in outcome.reason
        assert relay.joined == [True, False]
        assert relay.client.attempts > 3

    run(body)


def test_initial_connection_phase_gives_up() -> None:
    async def body() -> None:
        portal = Portal(TOKEN)
        await portal.start()
        await portal.stop()  # a port nobody listens on
        backoff = replace(FAST_BACKOFF, initial_phase_interval=0.1, initial_phase_max_elapsed=0.5)
        relay = Relay(portal, config_for(portal, backoff=backoff)).start()
        started = time.monotonic()
        outcome = await relay.outcome()
        assert time.monotonic() - started >= 0.4
        assert "unreachable for 0.5 s" in outcome.reason
        assert 2 <= relay.client.attempts <= 7

    run(body)


def test_a_connect_attempt_that_hangs_times_out() -> None:
    async def body() -> None:
        accepted: list[asyncio.StreamWriter] = []

        async def silent(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.append(writer)  # accept TCP, never answer the upgrade

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        portal = Portal(TOKEN, port=port)  # only for config_for's url
        backoff = replace(FAST_BACKOFF, initial_phase_interval=0.05, initial_phase_max_elapsed=0.5)
        config = config_for(portal, backoff=backoff, connect_timeout=0.2)
        relay = Relay(portal, config).start()
        outcome = await relay.outcome()
        assert "connect timed out after 0.2 s" in outcome.reason
        assert len(accepted) >= 2
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()

    run(body)


# ---- hiccups: reconnect with the same secret


async def drop(portal: Portal) -> None:
    await portal.drop()


async def restart(portal: Portal) -> None:
    await portal.restart()


async def close_frame(portal: Portal) -> None:
    await portal.close_connections(1011)


async def phx_close(portal: Portal) -> None:
    await portal.send_phx_close()


async def server_errors(portal: Portal) -> None:
    portal.refuse(503, body="maintenance", times=2)
    await portal.drop()


async def not_answering_joins(portal: Portal) -> None:
    portal.join_reply = "ignore"
    await portal.drop()
    await portal.wait_for(lambda: len(portal.requests) >= 3)  # two joins timed out
    portal.join_reply = "ok"


async def forbidden(portal: Portal) -> None:
    portal.refuse(403, times=1)
    await portal.drop()


@pytest.mark.parametrize(
    "hiccup",
    [drop, restart, close_frame, phx_close, server_errors, not_answering_joins, forbidden],
)
def test_hiccup_reconnects_with_the_same_secret(
    hiccup: Callable[[Portal], Awaitable[None]],
) -> None:
    async def body() -> None:
        async with Portal(TOKEN) as portal:
            relay = Relay(portal, config_for(portal)).start()
            await relay.wait_joins(1)
            await hiccup(portal)
            await relay.wait_joins(2)
            assert_same_secret_rejoins(portal, 2)
            assert relay.joined == [True, False, True]
            assert relay.fatal == []
            assert not relay.task.done()
            # the new connection heartbeats again, refs restarting after the join
            last = portal.relays[-1].connection
            await portal.wait_for(
                lambda: len(portal.frames_from_relay("heartbeat", connection=last)) >= 1
            )
            assert portal.frames_from_relay("heartbeat", connection=last)[0]["ref"] == 1
            await relay.stop()

    run(body)


def test_join_timeout_in_the_initial_phase_retries() -> None:
    async def body() -> None:
        async with Portal(TOKEN) as portal:
            portal.join_reply = "ignore"
            relay = Relay(portal, config_for(portal)).start()
            await portal.wait_for(lambda: len(joins(portal)) >= 2)
            assert relay.joined == []
            portal.join_reply = "ok"
            await relay.wait_joins(1)
            assert_same_secret_rejoins(portal, 3)
            await relay.stop()

    run(body)


def test_unanswered_heartbeats_trigger_a_reconnect() -> None:
    async def body() -> None:
        async with Portal(TOKEN) as portal:
            portal.answer_heartbeats = False
            relay = Relay(portal, config_for(portal)).start()
            await relay.wait_joins(2)
            # more than three unanswered: the fifth tick reconnects instead of sending
            assert len(portal.frames_from_relay("heartbeat", connection=0)) == 4
            assert_same_secret_rejoins(portal, 2)
            assert relay.fatal == []
            await relay.stop()

    run(body)


def test_429_retry_after_is_honoured_after_a_join() -> None:
    async def body() -> None:
        async with Portal(TOKEN) as portal:
            relay = Relay(portal, config_for(portal)).start()
            await relay.wait_joins(1)
            portal.refuse(429, retry_after=1, times=1)
            await portal.drop()
            await relay.wait_joins(2)
            statuses = [r.status for r in portal.requests]
            assert statuses == [101, 429, 101]
            assert portal.requests[2].at - portal.requests[1].at >= 0.95
            await relay.stop()

    run(body)


def test_429_retry_after_is_honoured_in_the_initial_phase() -> None:
    async def body() -> None:
        async with Portal(TOKEN) as portal:
            portal.refuse(429, retry_after=1, times=1)
            relay = Relay(portal, config_for(portal)).start()
            await relay.wait_joins(1)
            assert [r.status for r in portal.requests] == [429, 101]
            assert portal.requests[1].at - portal.requests[0].at >= 0.95
            await relay.stop()

    run(body)


# ---- bad input


def test_bad_input_is_ignored_without_dropping_the_session() -> None:
    async def body() -> None:
        async with Portal(TOKEN) as portal:
            relay = Relay(portal, config_for(portal)).start()
            await relay.wait_joins(1)
            bad: list[str | bytes] = [
                "not json",
                "[1,2,3]",
                "{}",
                '{"topic":"relay","event":"surprise","payload":{},"ref":null}',
                '{"topic":"relay","event":"phx_reply","payload":{"status":"ok"},"ref":999}',
                '{"topic":"relay","event":"phx_reply","payload":{"status":"ok"},"ref":null}',
                '{"topic":"relay","event":"phx_reply","payload":{"status":"error"},"ref":0}',
                '{"topic":"relay","event":"phx_error","payload":{},"ref":null}',
                '{"topic":"relay","event":"disconnect","payload":{"reason":"other"},"ref":null}',
                '{"topic":"relay","event":"init","payload":{"stamp_secret":"evil"},"ref":null}',
                json.dumps({"topic": "relay", "event": "phx_close", "pad": "x" * 200_000}),
                b'{"topic":"relay","event":"phx_close","payload":{},"ref":null}',
                b"\xff\x00",
                "[" * 20000 + "]" * 20000,
            ]
            for data in bad:
                await portal.send_raw(data)
            seen = len(portal.frames_from_relay("heartbeat"))
            await portal.wait_for(lambda: len(portal.frames_from_relay("heartbeat")) >= seen + 3)
            assert len(portal.requests) == 1
            assert portal.live_connections == 1
            assert relay.joined == [True]
            assert relay.fatal == []
            assert_same_secret_rejoins(portal, 1)
            await relay.stop()

    run(body)


def test_a_message_beyond_the_hard_limit_is_a_hiccup_not_a_crash() -> None:
    async def body() -> None:
        async with Portal(TOKEN) as portal:
            relay = Relay(portal, config_for(portal, max_message_size=100_000)).start()
            await relay.wait_joins(1)
            await portal.send_raw("x" * 150_000)
            await relay.wait_joins(2)
            assert_same_secret_rejoins(portal, 2)
            assert relay.fatal == []
            await relay.stop()

    run(body)


# ---- DNS and TLS


def test_dns_is_resolved_before_every_attempt() -> None:
    async def body() -> None:
        async with Portal(TOKEN) as portal:
            lookups: list[tuple[str, int]] = []

            async def resolver(host: str, port: int) -> list[str]:
                lookups.append((host, port))
                return ["127.0.0.1"]

            api_url = f"ws://portal.invalid:{portal.port}"
            relay = Relay(portal, config_for(portal, api_url=api_url), resolver=resolver).start()
            await relay.wait_joins(1)
            assert portal.requests[0].headers["host"] == f"portal.invalid:{portal.port}"
            await portal.drop()
            await relay.wait_joins(2)
            assert lookups == [("portal.invalid", portal.port)] * 2
            await relay.stop()

    run(body)


def test_addresses_are_tried_in_order() -> None:
    async def body() -> None:
        async with Portal(TOKEN) as portal:
            dead = socket.socket()
            dead.bind(("127.0.0.2", 0))  # bound, never listening: connection refused
            dead_ip = "127.0.0.2"

            async def resolver(host: str, port: int) -> list[str]:
                return [dead_ip, "127.0.0.1"]

            try:
                relay = Relay(portal, config_for(portal), resolver=resolver).start()
                await relay.wait_joins(1)
                assert relay.client.attempts == 1
                await relay.stop()
            finally:
                dead.close()

    run(body)


def test_default_resolver_resolves_localhost() -> None:
    async def body() -> None:
        ips = await resolve_host("localhost", 80)
        assert "127.0.0.1" in ips or "::1" in ips
        assert len(ips) == len(set(ips))

    run(body)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-days", "1", "-subj", "/CN=localhost", "-keyout", str(key),
            "-out", str(cert), "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def test_tls_is_verified_by_default(tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)

    async def body() -> None:
        async with Portal(TOKEN, ssl_context=server_ctx) as portal:
            backoff = replace(
                FAST_BACKOFF, initial_phase_interval=0.1, initial_phase_max_elapsed=0.3
            )
            untrusting = Relay(portal, config_for(portal, backoff=backoff)).start()
            outcome = await untrusting.outcome()
            assert "CERTIFICATE_VERIFY_FAILED" in outcome.reason
            assert portal.requests == []

            trusting_ctx = ssl.create_default_context(cafile=str(cert))
            trusting = Relay(portal, config_for(portal, ssl_context=trusting_ctx)).start()
            await trusting.wait_joins(1)
            assert portal.url.startswith("wss://")
            await trusting.stop()

    run(body)


# ---- the portal's own behaviour


def test_portal_refuses_missing_token_and_missing_address() -> None:
    async def body() -> None:
        async with Portal(TOKEN) as portal:
            no_token = Relay(portal, config_for(portal, token="")).start()
            await no_token.outcome()
            assert portal.requests[-1].status == 401
            no_ip = Relay(
                portal, config_for(portal, public_ip4=None, public_ip6=None, connect_timeout=0.5)
            ).start()
            await portal.wait_for(lambda: len(portal.requests) >= 3)
            assert portal.requests[-1].status == 422
            await no_ip.stop()

    run(body)


def test_portal_mints_credentials_for_joined_relays() -> None:
    async def body() -> None:
        async with Portal(TOKEN) as portal:
            relay = Relay(portal, config_for(portal, listen_port=3479)).start()
            await relay.wait_joins(1)
            creds = portal.credentials("client-public-key", expires_at=1_900_000_000)
            salt = portal_salt("client-public-key")
            password = firezone_password(SECRET, 1_900_000_000, salt)
            common = {
                "id": relay_id(SECRET),
                "type": "turn",
                "username": f"1900000000:{salt}",
                "password": password,
                "expires_at": 1_900_000_000,
            }
            assert creds == [
                {**common, "addr": "127.0.0.1:3479"},
                {**common, "addr": "[::1]:3479"},
            ]
            await relay.stop()
            await portal.wait_for(lambda: portal.live_connections == 0)
            assert portal.credentials("client-public-key") == []

    run(body)


def test_portal_command_line() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "simulations.portal", "--port", str(port), "--token", TOKEN],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    watchdog = threading.Timer(20.0, proc.kill)  # readline() has no timeout of its own
    watchdog.start()
    with proc:
        try:
            assert proc.stdout is not None
            banner = [proc.stdout.readline() for _ in range(3)]
            assert f"FIREZONE_API_URL=ws://127.0.0.1:{port}" in banner[1]

            async def body() -> None:
                portal = Portal(TOKEN, port=port)  # only for config_for's url
                relay = Relay(portal, config_for(portal)).start()
                await wait_until(lambda: relay.joined == [True])
                await relay.stop()

            run(body)
            printed = [proc.stdout.readline() for _ in range(4)]
            assert printed[0].startswith("relay joined: id=" + relay_id(SECRET))
            entries = [json.loads(line) for line in printed[2:]]
            assert [e["addr"] for e in entries] == ["127.0.0.1:3478", "[::1]:3478"]
        finally:
            watchdog.cancel()
            proc.terminate()
