"""A small load-generating TURN client for the daemon benchmarks (bench_daemon.py).

It speaks STUN through aioice's codec (an implementation independent of ours), over plain
non-blocking sockets, and can drive thousands of allocations in pipelined batches.
"""

from __future__ import annotations

import hashlib
import os
import select
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aioice import stun

Addr = tuple[str, int]
UDP = 0x11000000


def long_term_key(username: str, realm: str, password: str) -> bytes:
    return hashlib.md5(f"{username}:{realm}:{password}".encode()).digest()


@dataclass
class Client:
    """One client socket and what it learned from the server."""

    sock: socket.socket
    username: str
    password: str
    realm: str | None = None
    nonce: bytes | None = None
    key: bytes | None = None
    relayed: Addr | None = None
    pending: bytes | None = None  # transaction id in flight
    request: bytes | None = None
    done: bool = False
    error: int | None = None


def request(
    client: Client, method: stun.Method, attributes: dict[str, object], auth: bool = True
) -> bytes:
    msg = stun.Message(method, stun.Class.REQUEST)
    for name, value in attributes.items():
        msg.attributes[name] = value
    if auth and client.nonce is not None and client.realm is not None:
        msg.attributes["USERNAME"] = client.username
        msg.attributes["REALM"] = client.realm
        msg.attributes["NONCE"] = client.nonce
        client.key = long_term_key(client.username, client.realm, client.password)
        msg.add_message_integrity(client.key)
    client.pending = msg.transaction_id
    client.request = bytes(msg)
    return client.request


def pipelined(
    clients: Sequence[Client],
    server: Addr,
    make: Callable[[Client], bytes],
    handle: Callable[[Client, stun.Message], None],
    window: int = 256,
    timeout: float = 60.0,
) -> float:
    """Send ``make(client)`` for every client with ``window`` in flight; ``handle`` each reply
    (it sets ``done`` or prepares a retry by leaving it false). Returns the elapsed seconds."""
    poller = select.epoll()
    by_fd: dict[int, Client] = {}
    todo = list(clients)
    for c in todo:
        c.done = False
    queue = list(reversed(todo))
    in_flight: dict[int, float] = {}
    start = time.monotonic()
    deadline = start + timeout
    remaining = len(todo)
    try:
        while remaining and time.monotonic() < deadline:
            while queue and len(in_flight) < window:
                c = queue.pop()
                fd = c.sock.fileno()
                if fd not in by_fd:
                    by_fd[fd] = c
                    poller.register(fd, select.EPOLLIN)
                c.sock.sendto(make(c), server)
                in_flight[fd] = time.monotonic()
            for fd, _ in poller.poll(0.05):
                c = by_fd[fd]
                while True:
                    try:
                        data = c.sock.recv(4096)
                    except BlockingIOError:
                        break
                    try:
                        msg = stun.parse_message(data)
                    except Exception:
                        continue
                    if msg.transaction_id != c.pending:
                        continue
                    handle(c, msg)
                    in_flight.pop(fd, None)
                    if c.done:
                        remaining -= 1
                    else:
                        queue.append(c)
                    break
            now = time.monotonic()
            for fd, sent in list(in_flight.items()):
                if now - sent > 1.0:  # lost: resend the same request
                    c = by_fd[fd]
                    assert c.request is not None
                    c.sock.sendto(c.request, server)
                    in_flight[fd] = now
    finally:
        poller.close()
    return time.monotonic() - start


def open_clients(n: int, host: str, credentials: Callable[[int], tuple[str, str]]) -> list[Client]:
    clients = []
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for i in range(n):
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.setblocking(False)
        s.bind((host, 0))
        username, password = credentials(i)
        clients.append(Client(s, username, password))
    return clients


def allocate_all(clients: Sequence[Client], server: Addr, window: int = 256) -> float:
    """Allocate for every client (401 challenge, then the authenticated Allocate)."""

    def make(c: Client) -> bytes:
        return request(c, stun.Method.ALLOCATE, {"REQUESTED-TRANSPORT": UDP})

    def handle(c: Client, msg: stun.Message) -> None:
        if msg.message_class == stun.Class.RESPONSE:
            c.relayed = msg.attributes["XOR-RELAYED-ADDRESS"]
            c.done = True
            return
        code = msg.attributes.get("ERROR-CODE", (0, ""))[0]
        if code in (401, 438) and "NONCE" in msg.attributes and (c.nonce is None or code == 438):
            c.realm = msg.attributes["REALM"]
            c.nonce = msg.attributes["NONCE"]
            return  # retried with credentials
        c.error = code
        c.done = True

    return pipelined(clients, server, make, handle, window)


def refresh_all(clients: Sequence[Client], server: Addr, lifetime: int, window: int = 256) -> float:
    def make(c: Client) -> bytes:
        return request(c, stun.Method.REFRESH, {"LIFETIME": lifetime})

    def handle(c: Client, msg: stun.Message) -> None:
        if msg.message_class == stun.Class.ERROR:
            code = msg.attributes.get("ERROR-CODE", (0, ""))[0]
            if code == 438 and "NONCE" in msg.attributes:
                c.nonce = msg.attributes["NONCE"]
                return
            c.error = code
        c.done = True

    return pipelined(clients, server, make, handle, window)


def channel_bind_all(
    clients: Sequence[Client], server: Addr, peers: Sequence[Addr], channel: int = 0x4000
) -> float:
    peer_of = {id(c): p for c, p in zip(clients, peers, strict=True)}

    def make(c: Client) -> bytes:
        return request(
            c,
            stun.Method.CHANNEL_BIND,
            {"CHANNEL-NUMBER": channel, "XOR-PEER-ADDRESS": peer_of[id(c)]},
        )

    def handle(c: Client, msg: stun.Message) -> None:
        if msg.message_class == stun.Class.ERROR:
            code = msg.attributes.get("ERROR-CODE", (0, ""))[0]
            if code == 438 and "NONCE" in msg.attributes:
                c.nonce = msg.attributes["NONCE"]
                return
            c.error = code
        c.done = True

    return pipelined(clients, server, make, handle)


def channel_data(channel: int, payload: bytes) -> bytes:
    return struct.pack("!HH", channel, len(payload)) + payload


def random_payload(size: int) -> bytes:
    return os.urandom(size)


# -- load generation and counting -----------------------------------------------------------------


def batch_io() -> tuple[Callable[[list[object]], tuple[int, int]], type, str]:
    """The data path's batch send and receive (compiled when built), used here so the load
    generator and the sink cost as little of their shared core as possible."""
    from firezone_relay.actors.udpio import IMPLEMENTATION, Receiver, send_batch

    return send_batch, Receiver, IMPLEMENTATION


def blast(
    items: list[object], rate: float | None, duration: float, per_call: int = 256
) -> tuple[int, int]:
    """Send the flat ``[sock, data, addr, ...]`` list round and round for ``duration`` seconds,
    at ``rate`` datagrams/s (paced in 1 ms ticks) or flat out when ``rate`` is None.
    Returns (datagrams the kernel accepted, elapsed seconds as ns)."""
    send_batch, _, _ = batch_io()
    total = len(items) // 3
    sent = attempted = 0
    pos = 0
    t0 = time.monotonic()
    end = t0 + duration
    next_tick = t0
    while True:
        now = time.monotonic()
        if now >= end:
            break
        due = per_call if rate is None else int((now - t0) * rate) - attempted
        while due > 0:
            take = min(due, total - pos, per_call)
            dropped, failed = send_batch(items[3 * pos : 3 * (pos + take)])
            sent += take - dropped - failed
            attempted += take
            due -= take
            pos = (pos + take) % total
        if rate is not None:
            next_tick += 0.001
            delay = next_tick - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    return sent, int((time.monotonic() - t0) * 1e9)


def count_forever(conn: Any, socks: Sequence[socket.socket]) -> None:
    """Child process: count datagrams arriving on ``socks``; answer every message on ``conn``
    with the count so far, and stop on "stop". Bounded to ten minutes."""
    _, receiver_type, _ = batch_io()
    rx = receiver_type(64, 2048, 0)
    recv = rx.recv
    poller = select.epoll()
    by_fd = {s.fileno(): s for s in socks}
    for fd in by_fd:
        poller.register(fd, select.EPOLLIN)
    count = 0
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        for fd, _ in poller.poll(0.01):
            s = by_fd[fd]
            for _ in range(16):
                n = recv(s)
                if n < 0:
                    break
                count += n
        if conn.poll():
            message = conn.recv()
            conn.send(count)
            if message == "stop":
                return
