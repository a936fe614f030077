# The compiled data-path helper (actors/_udpio.c); actors/udpio.py documents it and gives the
# pure-Python fallback with the same shape.
import socket
from collections.abc import Callable
from typing import Any

Addr = tuple[str, int]

class Receiver:
    addrs: list[Addr]
    lens: list[int]
    views: list[memoryview]
    slots: list[memoryview]
    buffer: bytearray
    routes: tuple[int, int]
    send_drops: int
    send_errors: int
    datagrams_in: int
    gso: bool
    gso_sends: int
    gso_refused: int
    refused: int
    longest_run: int
    kernel_drops: int
    def __init__(self, count: int, slot: int, headroom: int) -> None: ...
    def recv(self, sock: socket.socket) -> int: ...
    def relay_clients(self, sock: socket.socket, stats: object) -> tuple[int, int]: ...
    def relay_peers(self, sock: socket.socket, port: int, stats: object) -> tuple[int, int]: ...
    def drain_clients(
        self, stats: object, handoff: Callable[..., object], sock: socket.socket
    ) -> None: ...
    def drain_peers(
        self, stats: object, handoff: Callable[..., object], sock: socket.socket, port: int
    ) -> None: ...
    def set_to_peer(
        self, client: Addr, channel: int, fd: int, peer: Addr, in_fd: int = -1
    ) -> bool: ...
    def set_to_client(
        self, port: int, peer: Addr, fd: int, client: Addr, channel: int, in_fd: int = -1
    ) -> bool: ...
    def drop_to_peer(self, client: Addr, channel: int) -> None: ...
    def drop_to_client(self, port: int, peer: Addr) -> None: ...
    def drop_fd(self, fd: int) -> int: ...
    def debug_routes(self) -> list[tuple[Any, ...]]: ...

def send_batch(items: list[Any]) -> tuple[int, int]: ...
