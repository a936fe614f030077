"""Bad input at the socket level leaves the relay serving, with bounded memory."""

from __future__ import annotations

import os
import random
import socket
import struct
import time

import pytest

from tests.system.conftest import RelayProcess, http
from tests.system.peers import echo_peer, run, turn_client

pytestmark = pytest.mark.system

MAGIC = 0x2112A442


def _stun(msg_type: int, attrs: bytes = b"", length: int | None = None) -> bytes:
    body_len = len(attrs) if length is None else length
    return struct.pack("!HHI", msg_type, body_len, MAGIC) + os.urandom(12) + attrs


def _unauthenticated_allocate() -> bytes:
    requested_transport = struct.pack("!HHI", 0x0019, 4, 17 << 24)
    return _stun(0x0003, requested_transport)


def _garbage(rng: random.Random) -> bytes:
    kind = rng.randrange(8)
    if kind == 0:
        return b""
    if kind == 1:
        return rng.randbytes(rng.randrange(1, 4))
    if kind == 2:  # truncated ChannelData: header claims more than follows
        return struct.pack("!HH", rng.randrange(0x4000, 0x5000), 1000) + rng.randbytes(10)
    if kind == 3:  # ChannelData on a channel nobody bound
        return struct.pack("!HH", 0x4001, 20) + rng.randbytes(20)
    if kind == 4:  # STUN header with a lying length
        return _stun(0x0001, rng.randbytes(8), length=rng.randrange(0, 65535) & ~3)
    if kind == 5:  # STUN with a garbage attribute
        return _stun(
            rng.choice([0x0001, 0x0003, 0x0004, 0x0008, 0x0009, 0x0016]),
            struct.pack("!HH", rng.randrange(65536), 4) + rng.randbytes(4),
        )
    if kind == 6:  # Allocate with a truncated attribute
        return _stun(0x0003, struct.pack("!HH", 0x0019, 8) + b"\x11")
    return rng.randbytes(rng.randrange(4, 1500))


def _drain(sock: socket.socket) -> int:
    n = 0
    while True:
        try:
            sock.recv(2048)
            n += 1
        except (BlockingIOError, ConnectionRefusedError):
            return n


def _still_serves(relay: RelayProcess) -> None:
    assert relay.alive(), relay.log()[-3000:]
    assert http("GET", f"{relay.health}/healthz")[0] == 200

    async def body() -> None:
        _peer, peer_addr = await echo_peer()
        username, password = relay.credentials()
        transport, inbox = await turn_client(("127.0.0.1", relay.listen_port), username, password)
        transport.sendto(b"still here", peer_addr)
        assert (await inbox.get())[0] == b"still here"
        transport.close()

    run(body)


def test_garbage_and_truncated_datagrams(relay: RelayProcess) -> None:
    rng = random.Random(7)
    target = ("127.0.0.1", relay.listen_port)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for i in range(6000):
            sock.sendto(_garbage(rng), target)
            if i % 200 == 0:
                time.sleep(0.002)  # stay well inside the socket buffer

    # and at an allocation port, from a peer with no permission
    async def stray_peer_traffic() -> None:
        username, password = relay.credentials()
        transport, _ = await turn_client(target, username, password)
        relayed = transport.get_extra_info("sockname")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stray:
            for _ in range(500):
                stray.sendto(rng.randbytes(rng.randrange(0, 600)), relayed)
        transport.close()

    run(stray_peer_traffic)
    _still_serves(relay)


def test_unauthenticated_allocate_flood_from_many_ports(relay: RelayProcess) -> None:
    target = ("127.0.0.1", relay.listen_port)

    def flood(sockets: int, per_socket: int) -> int:
        socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(sockets)]
        answers = 0
        try:
            for s in socks:
                s.setblocking(False)
            for _ in range(per_socket):
                for s in socks:
                    s.sendto(_unauthenticated_allocate(), target)
                time.sleep(0.01)
                answers += sum(_drain(s) for s in socks)
            time.sleep(0.2)
            answers += sum(_drain(s) for s in socks)
        finally:
            for s in socks:
                s.close()
        return answers

    flood(200, 5)  # warm up: caches, allocator arenas
    before = relay.rss_kb()
    answered = sum(flood(250, 10) for _ in range(4))  # 10,000 Allocates from 1,000 ports
    after = relay.rss_kb()
    print(f"RSS {before} kB -> {after} kB over 10,000 unauthenticated Allocates")
    assert answered > 5000  # they were answered (401), not silently lost
    assert after - before < 8 * 1024, f"RSS grew {after - before} kB over a 10k-request flood"
    _still_serves(relay)
