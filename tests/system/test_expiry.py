"""Expiry on the daemon's real timers: channels, their cooldown, then the allocation.

The relay runs with the hidden ``--time-scale`` so RFC 8656's durations (600 s channels, 300 s
cooldown, allocation lifetimes) pass in seconds; the wire still carries nominal values.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable

import pytest

from firezone_relay.protocol import stun
from firezone_relay.protocol.stun import Attr, Class
from simulations import channel_data
from simulations.turn_client import TurnClient
from tests.system.conftest import RelayProcess, http

pytestmark = pytest.mark.system

SCALE = 0.005  # channel 600 s -> 3 s, cooldown 300 s -> 1.5 s, LIFETIME 1200 s -> 6 s


def _metrics(relay: RelayProcess) -> dict[str, float]:
    status, text = http("GET", f"{relay.health}/metrics")
    assert status == 200
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[key] = float(value)
    return out


def _udp() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(1.0)
    return sock


def _request(sock: socket.socket, relay: RelayProcess, data: bytes) -> stun.Message:
    sock.sendto(data, ("127.0.0.1", relay.listen_port))
    return stun.parse(sock.recv(2048))


def _arrives(sock: socket.socket, timeout: float = 0.5) -> bytes | None:
    sock.settimeout(timeout)
    try:
        return sock.recv(2048)
    except TimeoutError:
        return None


def wait_for(condition: Callable[[], bool], deadline: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail at the (monotonic) ``deadline``."""
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)  # polling step


def test_channels_and_allocations_expire_on_the_daemons_timers(relay_factory) -> None:  # type: ignore[no-untyped-def]
    relay: RelayProcess = relay_factory("--time-scale", str(SCALE))
    client_sock, peer_a, peer_b = _udp(), _udp(), _udp()
    username, password = relay.credentials()
    client = TurnClient(username, password)
    client.learn(_request(client_sock, relay, client.allocate()))
    allocated = _request(client_sock, relay, client.allocate(lifetime=1200))
    assert allocated.cls == Class.SUCCESS and allocated.get(Attr.LIFETIME) == 1200
    start = time.monotonic()
    a_addr = peer_a.getsockname()
    assert _request(client_sock, relay, client.channel_bind(0x4000, a_addr)).cls == Class.SUCCESS

    client_sock.sendto(channel_data.encode(0x4000, b"bound"), ("127.0.0.1", relay.listen_port))
    assert _arrives(peer_a) == b"bound"

    # the channel (3 s) expires on the relay's timer
    wait_for(lambda: _metrics(relay)["relay_active_channels"] == 0, start + 30, "channel expiry")
    client_sock.sendto(channel_data.encode(0x4000, b"late"), ("127.0.0.1", relay.listen_port))
    assert _arrives(peer_a, 0.3) is None
    metrics = _metrics(relay)
    assert metrics["relay_active_channels"] == 0 and metrics["relay_active_allocations"] == 1

    # during the 1.5 s cooldown the number cannot go to another peer ...
    refused = _request(client_sock, relay, client.channel_bind(0x4000, peer_b.getsockname()))
    assert refused.get(Attr.ERROR_CODE)[0] == 400

    # ... after it, it can (each refused attempt changes nothing)
    def rebind() -> bool:
        answer = _request(client_sock, relay, client.channel_bind(0x4000, peer_b.getsockname()))
        return bool(answer.cls == Class.SUCCESS)

    wait_for(rebind, start + 30, "the end of the cooldown")

    # the allocation (6 s) expires
    wait_for(lambda: _metrics(relay)["relay_active_allocations"] == 0, start + 30, "expiry")
    gone = _request(client_sock, relay, client.refresh(600))
    assert gone.get(Attr.ERROR_CODE)[0] == 437
    assert "expired" in relay.log()
    code, _ = relay.stop()
    assert code == 0
