"""Real peers for the system tests: a UDP echo peer, aioice TURN clients, coturn's turnutils."""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import subprocess
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aioice.turn


def run(body: Callable[[], Coroutine[Any, Any, Any]], timeout: float = 30.0) -> Any:
    """Run an async test body on a fresh loop, bounded in time."""

    async def bounded() -> Any:
        async with asyncio.timeout(timeout):
            return await body()

    return asyncio.run(bounded())


class EchoPeer(asyncio.DatagramProtocol):
    """Echoes every datagram back to its sender; records who sent what."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.received: list[tuple[bytes, tuple[str, int]]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.received.append((data, (addr[0], addr[1])))
        assert self.transport is not None
        self.transport.sendto(data, addr)


async def echo_peer(host: str = "127.0.0.1") -> tuple[EchoPeer, tuple[str, int]]:
    loop = asyncio.get_running_loop()
    transport, peer = await loop.create_datagram_endpoint(EchoPeer, local_addr=(host, 0))
    sockname = transport.get_extra_info("sockname")
    return peer, (sockname[0], sockname[1])


class Inbox(asyncio.DatagramProtocol):
    """What a TURN client application receives through its relayed transport."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.queue.put_nowait((data, (addr[0], addr[1])))

    async def get(self, timeout: float = 3.0) -> tuple[bytes, tuple[str, int]]:
        return await asyncio.wait_for(self.queue.get(), timeout)


async def turn_client(
    server: tuple[str, int], username: str, password: str
) -> tuple[aioice.turn.TurnTransport, Inbox]:
    return await aioice.turn.create_turn_endpoint(Inbox, server, username, password)


# -- coturn's turnutils -------------------------------------------------------------------------

HAVE_TURNUTILS = (
    shutil.which("turnutils_uclient") is not None and shutil.which("turnutils_peer") is not None
)

_COUNTERS = re.compile(r"tot_send_msgs=(\d+), tot_recv_msgs=(\d+)")
_TOTALS_SEND = re.compile(r"Total sent messages?:? *(\d+)", re.I)


@dataclass
class UclientResult:
    returncode: int
    output: str
    sent: int = 0
    received: int = 0
    errors: list[str] = field(default_factory=list)


def parse_uclient(returncode: int, output: str) -> UclientResult:
    result = UclientResult(returncode, output)
    counters = _COUNTERS.findall(output)
    if counters:
        result.sent, result.received = (int(x) for x in counters[-1])
    result.errors = [line for line in output.splitlines() if "error" in line.lower()]
    return result


def start_turnutils_peer(host: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            ["turnutils_peer", "-L", host, "-p", str(port)], stdout=out, stderr=subprocess.STDOUT
        )


def free_udp_pair(host: str) -> int:
    """An even port p with p and p+1 free (turnutils_peer listens on both)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(200):
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1] & ~1
        try:
            with (
                socket.socket(family, socket.SOCK_DGRAM) as a,
                socket.socket(family, socket.SOCK_DGRAM) as b,
            ):
                a.bind((host, port))
                b.bind((host, port + 1))
        except OSError:
            continue
        return int(port)
    raise RuntimeError("no free port pair")
