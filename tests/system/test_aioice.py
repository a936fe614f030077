"""aioice's TURN client through the relay daemon: allocate, bind a channel, echo both ways."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys

import aioice.stun
import pytest

from tests.system.conftest import ROOT, RelayProcess
from tests.system.peers import echo_peer, run, turn_client

pytestmark = pytest.mark.system


async def _echo_through(relay: RelayProcess, server_host: str, peer_host: str, n: int = 20) -> None:
    peer, peer_addr = await echo_peer(peer_host)
    username, password = relay.credentials()
    transport, inbox = await turn_client((server_host, relay.listen_port), username, password)
    try:
        relayed = transport.get_extra_info("sockname")
        assert relayed[0] == (relay.args[relay.args.index("--public-ip4-addr") + 1])
        assert relay.lowest_port <= relayed[1] <= relay.highest_port
        for i in range(n):
            payload = b"ping %d " % i + bytes(range(100))
            transport.sendto(payload, peer_addr)
            data, source = await inbox.get()
            assert (data, source) == (payload, peer_addr)
        # the peer saw every datagram coming from the relayed address
        assert {source for _, source in peer.received} == {(relayed[0], relayed[1])}
        # peer -> client without a prompt: the channel carries it too
        assert peer.transport is not None
        peer.transport.sendto(b"unsolicited", (relayed[0], relayed[1]))
        assert await inbox.get() == (b"unsolicited", peer_addr)
    finally:
        transport.close()
        assert peer.transport is not None
        peer.transport.close()


def test_ipv4_allocate_channel_echo(relay: RelayProcess) -> None:
    run(lambda: _echo_through(relay, "127.0.0.1", "127.0.0.1"))
    assert relay.alive()


def test_ipv6_client_transport(relay_factory) -> None:  # type: ignore[no-untyped-def]
    # aioice cannot ask for an IPv6 relayed address, so this checks the IPv6 listen socket
    # (client over ::1) with a relayed IPv4 allocation: traffic to the client leaves from the
    # listen socket of the client's family.
    relay = relay_factory(ip4="127.0.0.1", ip6="::1")
    run(lambda: _echo_through(relay, "::1", "127.0.0.1"))


def test_many_clients_in_parallel(relay: RelayProcess) -> None:
    async def body() -> None:
        await asyncio.gather(
            *(_echo_through(relay, "127.0.0.1", "127.0.0.1", 5) for _ in range(20))
        )

    run(body)


def test_cli_credentials_are_accepted(relay: RelayProcess) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "firezone_relay.actors.cli",
            "credentials",
            "--auth-secret",
            relay.secret,
            "--salt",
            "laptop",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    values = dict(line.split("=", 1) for line in out.split())
    assert values["username"].endswith(":laptop")

    async def body() -> None:
        transport, _ = await turn_client(
            ("127.0.0.1", relay.listen_port), values["username"], values["password"]
        )
        transport.close()

    run(body)


def test_rest_scheme_credentials(relay_factory) -> None:  # type: ignore[no-untyped-def]
    relay = relay_factory(scheme="rest")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "firezone_relay.actors.cli",
            "credentials",
            "--auth-secret",
            relay.secret,
            "--auth-scheme",
            "rest",
            "--user",
            "bob",
            "--json",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    import json

    values = json.loads(out)

    async def body() -> None:
        transport, _ = await turn_client(
            ("127.0.0.1", relay.listen_port), values["username"], values["password"]
        )
        transport.close()

    run(body)


def test_wrong_password_is_refused(relay: RelayProcess) -> None:
    username, _ = relay.credentials()

    async def body() -> None:
        with pytest.raises(aioice.stun.TransactionFailed, match="401"):
            await turn_client(("127.0.0.1", relay.listen_port), username, "not-the-password")

    run(body)
    run(lambda: _echo_through(relay, "127.0.0.1", "127.0.0.1", 2))


def test_bind_failure_is_an_error_and_the_relay_lives_on(relay_factory) -> None:  # type: ignore[no-untyped-def]
    # The whole allocation range is one port, held by someone else: the client gets an error
    # (508) instead of a relayed address that does not exist, and the relay keeps serving.
    blocker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    blocker.bind(("127.0.0.1", 0))
    port = blocker.getsockname()[1]
    try:
        relay = relay_factory(ports=(port, port))
        username, password = relay.credentials()

        async def body() -> None:
            with pytest.raises(aioice.stun.TransactionFailed, match="508"):
                await turn_client(("127.0.0.1", relay.listen_port), username, password)

        run(body)
        assert relay.alive()
        assert "bind failed" in relay.log()
    finally:
        blocker.close()


def test_unavailable_xdp_offload_falls_back_to_userspace(relay_factory) -> None:  # type: ignore[no-untyped-def]
    relay = relay_factory("--ebpf-offloading", "nosuchif0", "--ebpf-attach-mode", "generic")
    run(lambda: _echo_through(relay, "127.0.0.1", "127.0.0.1", 3))
    assert "unavailable" in relay.log()
