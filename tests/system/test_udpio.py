"""The data path's batch I/O (actors/udpio.py): the compiled helper and the pure-Python fallback
behave the same on real sockets, and the installed package carries the compiled one."""

from __future__ import annotations

import importlib.util
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from actors import udpio

pytestmark = pytest.mark.system

IMPLEMENTATIONS: list[tuple[str, Any, Callable[[list[Any]], tuple[int, int]]]] = [
    ("python", udpio.PyReceiver, udpio.py_send_batch)
]
if importlib.util.find_spec("_firezone_relay_udpio") is not None:
    import _firezone_relay_udpio as compiled

    IMPLEMENTATIONS.append(("compiled", compiled.Receiver, compiled.send_batch))


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    socks = []
    for _ in range(2):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        s.setblocking(False)
        socks.append(s)
    yield socks[0], socks[1]
    for s in socks:
        s.close()


def test_the_compiled_helper_is_built_where_a_compiler_is() -> None:
    """CI installs with `pip install .` on a machine with gcc: the fast path must be there."""
    assert udpio.IMPLEMENTATION.startswith("recvmmsg"), udpio.IMPLEMENTATION


@pytest.mark.parametrize(("name", "receiver", "send_batch"), IMPLEMENTATIONS)
def test_batches_arrive_in_order_with_sender_and_headroom(
    name: str, receiver: Any, send_batch: Any, pair: tuple[socket.socket, socket.socket]
) -> None:
    a, b = pair
    rx = receiver(8, 2048, 4)
    assert rx.recv(a) == -1  # nothing ready
    items: list[Any] = []
    for i in range(10):
        items += [b, bytes([i]) * (i + 1), a.getsockname()]
    assert send_batch(items) == (0, 0)
    assert rx.recv(a) == 8
    assert rx.lens[:8] == list(range(1, 9))
    assert rx.addrs[:8] == [b.getsockname()] * 8
    assert bytes(rx.views[2][: rx.lens[2]]) == b"\x02\x02\x02"
    assert bytes(rx.slots[2][:7]) == b"\x00\x00\x00\x00\x02\x02\x02"  # the headroom in front
    assert rx.recv(a) == 2
    assert rx.lens[:2] == [9, 10]
    assert rx.recv(a) == -1


@pytest.mark.parametrize(("name", "receiver", "send_batch"), IMPLEMENTATIONS)
def test_sends_that_cannot_go_are_counted_not_raised(
    name: str, receiver: Any, send_batch: Any, pair: tuple[socket.socket, socket.socket]
) -> None:
    a, b = pair
    items = [
        b, b"ok", a.getsockname(),
        None, b"no socket", a.getsockname(),
        b, b"bad host", ("not-an-address", 5),
        b, b"port 0", ("127.0.0.1", 0),
        b, b"ok too", a.getsockname(),
    ]  # fmt: skip
    assert send_batch(items) == (1, 2)
    rx = receiver(8, 2048, 0)
    assert rx.recv(a) == 2
    assert [bytes(rx.views[i][: rx.lens[i]]) for i in range(2)] == [b"ok", b"ok too"]


@pytest.mark.parametrize(("name", "receiver", "send_batch"), IMPLEMENTATIONS)
def test_ipv6_senders_are_host_port_pairs(name: str, receiver: Any, send_batch: Any) -> None:
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        s.bind(("::1", 0))
        s.setblocking(False)
        here = s.getsockname()[:2]
        assert send_batch([s, b"six", here]) == (0, 0)
        rx = receiver(4, 2048, 4)
        assert rx.recv(s) == 1
        assert rx.addrs[0] == here
        assert bytes(rx.views[0][: rx.lens[0]]) == b"six"


@pytest.mark.parametrize(("name", "receiver", "send_batch"), IMPLEMENTATIONS)
def test_a_datagram_fills_its_slot_without_touching_the_next(
    name: str, receiver: Any, send_batch: Any, pair: tuple[socket.socket, socket.socket]
) -> None:
    a, b = pair
    rx = receiver(2, 1028, 4)
    send_batch([b, b"x" * 1024, a.getsockname(), b, b"y", a.getsockname()])
    assert rx.recv(a) == 2
    assert rx.lens[:2] == [1024, 1]
    assert bytes(rx.views[0][:1024]) == b"x" * 1024
    assert bytes(rx.slots[1][:5]) == b"\x00\x00\x00\x00y"


@pytest.mark.parametrize(("name", "receiver", "send_batch"), IMPLEMENTATIONS)
def test_a_closed_socket_is_a_counted_failure_or_an_oserror(
    name: str, receiver: Any, send_batch: Any, pair: tuple[socket.socket, socket.socket]
) -> None:
    a, b = pair
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.close()
    assert send_batch([closed, b"x", a.getsockname(), b, b"y", a.getsockname()]) == (0, 1)
    with pytest.raises(OSError):
        receiver(2, 64, 0).recv(closed)
