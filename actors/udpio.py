"""Batched UDP receive and send for the data path, compiled when possible.

``Receiver(count, slot, headroom)`` reads up to ``count`` datagrams per call into slots of one
buffer (``recv(sock)`` returns how many, or -1 when none was ready); datagram ``i`` is
``views[i][:lens[i]]`` from ``addrs[i]``, and ``slots[i]`` is the same slot with the headroom in
front, where a ChannelData header can be written without copying the payload.
``send_batch([sock, data, addr, ...])`` sends a flat list of datagrams and returns
``(dropped, failed)``: dropped counts sends that would block and items whose socket is None
(no socket for that port or family), failed any other error.

The route mirror: a ``Receiver`` also holds a copy of the core's bound-channel routes
(``set_to_peer`` / ``set_to_client`` / ``drop_to_peer`` / ``drop_to_client`` / ``drop_fd``),
and ``relay_clients(sock, stats)`` / ``relay_peers(sock, port, stats)`` read a batch, relay
datagrams ``[0, k)`` that the mirror routes (counting them in ``stats`` as the core's
``Stats.count_relayed`` would) and return ``(n, k)``: datagrams ``[k, n)`` (from the first one
the mirror does not route, so nothing overtakes a datagram the core has yet to see) are in
``addrs``/``lens`` for the core.
Drops and errors of the sends it makes are in ``send_drops`` / ``send_errors``. A run of
relayed datagrams of one size to one destination (peer traffic for one client) leaves as one
UDP GSO send (``gso``, ``gso_sends``), where the kernel takes it.
``drain_clients(stats, handoff, sock)`` / ``drain_peers(stats, handoff, sock, port)``
are whole reader callbacks: up to ``READ_BATCHES`` batches, each relayed as above, with the
rest of a batch handed to ``handoff(sock, [port,] n, k)``; with the compiled helper no
Python frame runs for a batch the mirror routes whole. ``datagrams_in`` counts what they read.
``debug_routes()`` lists every route the mirror holds (a walk of the table: for soaks and tests
that compare the mirror with the core, never for the data path).

The compiled helper (``actors/_udpio.c``, built by ``pip install .`` as
``firezone_relay.actors._udpio``) does this with one
``recvmmsg`` and one ``sendmmsg`` per run of datagrams leaving through the same socket, and
caches sender tuples. Where it could not be built, the pure-Python classes below give the same
behaviour with one syscall per datagram. ``IMPL`` says which one is in use (``compiled`` or
``python``) and ``IMPL_REASON`` why: ``RELAY_DATAPATH=python`` forces the fallback, and an
installed helper whose ``API_VERSION`` differs from this file's (a stale build) is not used.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

__all__ = [
    "IMPL",
    "IMPLEMENTATION",
    "IMPL_REASON",
    "PyReceiver",
    "Receiver",
    "choose",
    "py_send_batch",
    "send_batch",
]

Addr = tuple[str, int]

#: batches read from one ready socket per reader callback before yielding to the loop, so one
#: busy socket cannot starve the others (or the timers); the compiled helper's is the same
READ_BATCHES = 4


class PyReceiver:
    """recvfrom_into per datagram, in the compiled Receiver's shape."""

    def __init__(self, count: int, slot: int, headroom: int) -> None:
        if not (0 < count <= 1024 and 0 <= headroom < slot):
            raise ValueError("bad Receiver geometry")
        self.buffer = bytearray(count * slot)
        whole = memoryview(self.buffer)
        self.slots = [whole[i * slot : (i + 1) * slot] for i in range(count)]
        self.views = [s[headroom:] for s in self.slots]
        self.addrs: list[Addr] = [("", 0)] * count
        self.lens = [0] * count

    def recv(self, sock: socket.socket) -> int:
        addrs, lens = self.addrs, self.lens
        recv = sock.recvfrom_into
        n = 0
        for view in self.views:
            try:
                length, addr = recv(view)
            except BlockingIOError:
                break
            except OSError:
                if n:
                    break
                raise
            addrs[n] = addr if len(addr) == 2 else (addr[0], addr[1])
            lens[n] = length
            n += 1
        return n if n else -1

    # The route mirror: this fallback routes nothing, so everything goes to the core.

    routes = (0, 0)
    gso = False
    gso_sends = 0
    send_drops = 0
    send_errors = 0
    datagrams_in = 0
    kernel_drops = 0  # SO_RXQ_OVFL needs recvmsg's control messages: not counted here
    gso_refused = 0
    refused = 0

    def drain_clients(self, stats: object, handoff: Any, sock: socket.socket) -> None:
        self._drain(handoff, (sock,), sock)

    def drain_peers(self, stats: object, handoff: Any, sock: socket.socket, port: int) -> None:
        self._drain(handoff, (sock, port), sock)

    def _drain(self, handoff: Any, args: tuple[Any, ...], sock: socket.socket) -> None:
        for _ in range(READ_BATCHES):
            try:
                n = self.recv(sock)
            except OSError:
                continue  # e.g. a queued ICMP error; the socket stays usable
            if n < 0:
                break
            self.datagrams_in += n
            handoff(*args, n, 0)
            if n < len(self.views):
                break

    def relay_clients(self, sock: socket.socket, stats: object) -> tuple[int, int]:
        return self.recv(sock), 0

    def relay_peers(self, sock: socket.socket, port: int, stats: object) -> tuple[int, int]:
        return self.recv(sock), 0

    def set_to_peer(
        self,
        client: Addr,
        channel: int,
        fd: int,
        peer: Addr,
        in_fd: int = -1,
        counts: object = None,
    ) -> bool:
        return False

    def set_to_client(
        self,
        port: int,
        peer: Addr,
        fd: int,
        client: Addr,
        channel: int,
        in_fd: int = -1,
        counts: object = None,
    ) -> bool:
        return False

    def drop_to_peer(self, client: Addr, channel: int) -> None:
        pass

    def drop_to_client(self, port: int, peer: Addr) -> None:
        pass

    def drop_fd(self, fd: int) -> int:
        return 0

    def debug_routes(self) -> list[tuple[Any, ...]]:
        """Every mirrored route as a plain tuple, sorted (the compiled ``Receiver``'s method
        documents the shapes); this fallback mirrors nothing."""
        return []


# Any: the items alternate between socket (or None), data and address, which no list type says
def py_send_batch(items: list[Any]) -> tuple[int, int]:
    """sendto per datagram; counts what was dropped and what failed."""
    blocked = failed = 0
    for i in range(0, len(items), 3):
        sock = items[i]
        if sock is None:
            blocked += 1
            continue
        try:
            sock.sendto(items[i + 1], items[i + 2])
        except (BlockingIOError, InterruptedError):
            blocked += 1
        except OSError:
            failed += 1
        except (TypeError, ValueError, OverflowError):
            failed += 1
    return blocked, failed


#: The compiled helper's API version these sources expect (``UDPIO_API_VERSION`` in
#: ``actors/_udpio.c``); an installed module with another one is not used.
API_VERSION = 4
#: Forces the pure-Python fallback when set to ``python`` (``auto``, or unset, takes the
#: compiled helper when it is there and matches).
DATAPATH_ENV = "RELAY_DATAPATH"
DATAPATH_CHOICES = ("auto", "python")


def choose(
    forced: str | None, compiled: Any
) -> tuple[str, str, Any, Callable[[list[Any]], tuple[int, int]]]:
    """Which implementation to run: ``(name, why, Receiver, send_batch)`` where ``name`` is
    ``compiled`` or ``python`` (the ``relay.userspace.impl`` metric label) and ``why`` says
    why, in words for the start-up log. ``compiled`` is the imported helper, or None when it
    is not installed; ``forced`` the value of ``RELAY_DATAPATH``."""
    if forced == "python":
        return "python", f"forced by {DATAPATH_ENV}=python", PyReceiver, py_send_batch
    if compiled is None:
        return "python", "the compiled helper is not installed", PyReceiver, py_send_batch
    version = getattr(compiled, "API_VERSION", None)
    if version != API_VERSION:
        why = (
            f"the installed compiled helper has API version {version}, these sources "
            f"expect {API_VERSION} (reinstall the package)"
        )
        return "python", why, PyReceiver, py_send_batch
    return "compiled", f"API version {version}", compiled.Receiver, compiled.send_batch


def _import_compiled() -> Any:
    try:
        # untyped where the wheel is installed, not found in a bare source tree
        from firezone_relay.actors import (  # type: ignore[attr-defined,import-untyped,import-not-found,unused-ignore]
            _udpio,
        )
    except ImportError:  # no compiler where it was installed: same behaviour, more syscalls
        return None
    return _udpio


# The compiled Receiver (typed in _udpio.pyi) has PyReceiver's shape; one name for both.
Receiver: type[PyReceiver]
send_batch: Callable[[list[Any]], tuple[int, int]]
#: ``compiled`` or ``python``, why (see :func:`choose`), and a description for logs and benches
IMPL, IMPL_REASON, Receiver, send_batch = choose(
    os.environ.get(DATAPATH_ENV, "auto").strip().lower() or "auto", _import_compiled()
)
IMPLEMENTATION = (
    "recvmmsg/sendmmsg (compiled)" if IMPL == "compiled" else "recvfrom/sendto (pure Python)"
)
#: True when the choice fell back for a reason an operator should hear about (a WARN)
IMPL_DEGRADED = IMPL == "python" and not IMPL_REASON.startswith("forced")
