"""A fuzz target for the compiled helper (``actors/_udpio.c``): the route mirror and the
ChannelData parser, driven through Python with operation sequences checked against a dict.

``udpio(data)`` reads ``data`` as a script: each step sets or drops a client -> peer or peer ->
client route (random addresses, channels and ports, some through sockets that are then
"closed" with ``drop_fd``), or sends the next bytes of the input as a datagram from the client
to the listen socket and relays it with ``relay_clients``. After every step the mirror's size
and, now and then, its whole contents (``debug_routes``) equal the model's; a datagram is
relayed exactly when it is ChannelData (0x40-0x4F, a length within the datagram) on a channel
the model holds, and the peer gets exactly its payload. Anything else raises.

Each route is set with a ``counts`` argument (the allocation's per-direction counters the
mirror counts into, ``actors/dataplane.py``), taken from the input: None, a writable two-word
``array('Q')`` or a view of one, or something hostile (read-only bytes, the wrong item format or
size, too short, not contiguous, a released view, an int). A hostile one raises TypeError,
BufferError or ValueError and leaves the route table as it was; a good one counts exactly the
datagrams and payload bytes relayed on its route, and is released (its array can grow again)
once the route is replaced, dropped or closed with ``drop_fd``, or its receiver is freed.

``python -m simulations.fuzz_udpio --seconds 30`` runs it on random scripts (seeded, printed),
or under atheris when it is installed and ``--atheris`` is given (the C code itself is not
coverage-instrumented then: gcc has no libFuzzer; the Python driver's branches guide it).
``tox -e asan`` runs the random soak against an ASan+UBSan build.
"""

from __future__ import annotations

import argparse
import array
import ipaddress
import random
import socket
import sys
import time
from typing import Any

from firezone_relay.actors import _udpio  # type: ignore[attr-defined]

Addr = tuple[str, int]


class Counted:
    def __init__(self) -> None:
        self.relayed_packets_userspace = 0
        self.relayed_bytes_userspace = 0
        self.packet_size_buckets = [0] * 16


class Harness:
    """Sockets shared by every input (opening them per input would cost more than the step)."""

    def __init__(self) -> None:
        def udp() -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", 0))
            s.setblocking(False)
            return s

        self.listen, self.client, self.peer = udp(), udp(), udp()
        self.outs = [udp() for _ in range(3)]  # allocation sockets routes leave through

    def drain(self, sock: socket.socket) -> list[bytes]:
        got = []
        while True:
            try:
                got.append(sock.recv(70000))
            except BlockingIOError:
                return got


HARNESS: Harness | None = None
RELAYED = [0, 0, 0]  # datagrams the mirror relayed, of them counted, hostile counts refused


def _addr(take: Any) -> Addr:
    kind = take(1)[0] % 3
    if kind == 0:
        return ("127.0.0.1", 1 + int.from_bytes(take(2), "big") % 65535)
    if kind == 1:
        return (str(ipaddress.IPv4Address(take(4))), 1 + int.from_bytes(take(2), "big") % 65535)
    return (str(ipaddress.IPv6Address(take(16))), 1 + int.from_bytes(take(2), "big") % 65535)


class Counts:
    """One ``counts`` argument: what is passed, the array behind it, and whether the helper
    must refuse it."""

    def __init__(self, arg: Any, backing: array.array[int] | None, hostile: bool) -> None:
        self.arg, self.backing, self.hostile = arg, backing, hostile

    def released(self) -> bool:
        """Whether nothing holds a buffer of the backing array (it can grow). Releases a view
        passed as the argument, which fails while the helper still holds it."""
        if self.backing is None:
            return True
        try:
            if isinstance(self.arg, memoryview):
                self.arg.release()
            self.backing.append(0)
        except BufferError:
            return False
        self.backing.pop()
        return True


def _counts(take: Any) -> Counts:
    kind = take(1)[0] % 12
    good = array.array("Q", [0, 0, 0, 0])
    if kind < 3:
        return Counts(None, None, False)
    if kind < 6:
        return Counts(good, good, False)
    if kind == 6:
        return Counts(memoryview(good)[2:4], good, False)
    if kind == 7:
        released = memoryview(good)
        released.release()
        return Counts(released, good, True)
    hostile: list[Any] = [
        bytes(16),  # read-only
        array.array("q", [0, 0]),  # signed
        array.array("Q", [0]),  # one word
        memoryview(good)[::2],  # not contiguous
        bytearray(16),  # bytes, not 'Q'
        12345,
    ]
    arg = hostile[take(1)[0] % len(hostile)]
    return Counts(arg, None, True)


def _set(method: Any, args: tuple[Any, ...], counts: Counts) -> bool | None:
    """Set a route with ``counts``; None when the helper refused the arguments (as it must for
    a hostile ``counts`` it reads), with the route table unchanged. A route it cannot mirror
    (False) is dropped before ``counts`` is read, hostile or not."""
    try:
        installed = method(*args, -1, counts.arg)
    except (TypeError, BufferError, ValueError):
        assert counts.hostile, counts.arg
        assert counts.released()
        RELAYED[2] += 1
        return None
    assert not (installed and counts.hostile), counts.arg
    assert installed or counts.released()
    return bool(installed)


def _counted(counts: Counts | None) -> tuple[int, int] | None:
    """(datagrams, bytes) a route's good counts hold; None when it has none."""
    if counts is None or counts.backing is None or counts.hostile:
        return None
    words = counts.backing
    return (words[2], words[3]) if counts.arg is not words else (words[0], words[1])


def _same_form(item: Any) -> Any:
    """An (address, port) of ``debug_routes`` with the address in Python's spelling."""
    if isinstance(item, tuple):
        return (str(ipaddress.ip_address(item[0])), item[1])
    return item


def udpio(data: bytes) -> None:
    """One input: a script of mirror operations and datagrams (see the module docstring)."""
    global HARNESS
    if HARNESS is None:
        HARNESS = Harness()
    h = HARNESS
    rx = _udpio.Receiver(8, 2052, 4)
    me = h.client.getsockname()
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        chunk = data[pos : pos + n]
        pos += n
        return chunk.ljust(n, b"\0")

    to_peer: dict[tuple[Addr, int], tuple[int, Addr]] = {}
    to_client: dict[tuple[int, Addr], tuple[int, Addr, int]] = {}
    #: the counts each route was set with, and what they must hold
    peer_counts: dict[tuple[Addr, int], tuple[Counts, list[int]]] = {}
    client_counts: dict[tuple[int, Addr], Counts] = {}
    dropped: list[Counts] = []  # counts of routes gone: released

    def forget_peer(key: tuple[Addr, int]) -> None:
        old = peer_counts.pop(key, None)
        if old is not None:
            dropped.append(old[0])

    def forget_client(key: tuple[int, Addr]) -> None:
        old = client_counts.pop(key, None)
        if old is not None:
            dropped.append(old)

    steps = 0
    while pos < len(data) and steps < 200:
        steps += 1
        op = take(1)[0] % 7
        if op in (0, 1):  # client -> peer; mostly from the real client, so datagrams hit it
            client = me if op == 0 else _addr(take)
            channel = int.from_bytes(take(2), "big")
            out = h.outs[take(1)[0] % 3].fileno()
            peer = h.peer.getsockname() if take(1)[0] % 2 else _addr(take)
            counts = _counts(take)
            installed = _set(rx.set_to_peer, (client, channel, out, peer), counts)
            key = (client, channel & 0xFFFF)
            if installed is not None:
                forget_peer(key)
            if installed:
                to_peer[key] = (out, peer)
                peer_counts[key] = (counts, [0, 0])
            elif installed is False:
                to_peer.pop(key, None)
        elif op == 2:
            key = next(iter(to_peer), None) if take(1)[0] % 2 else (me, 0x4000)
            if key is not None:
                rx.drop_to_peer(*key)
                to_peer.pop(key, None)
                forget_peer(key)
        elif op == 3:
            port = int.from_bytes(take(2), "big")
            peer = _addr(take)
            client = _addr(take)
            channel = 0x4000 + take(1)[0]
            counts = _counts(take)
            fd = h.listen.fileno()
            installed = _set(rx.set_to_client, (port, peer, fd, client, channel), counts)
            if installed is not None:
                forget_client((port & 0xFFFF, peer))
            if installed:
                to_client[(port, peer)] = (fd, client, channel)
                client_counts[(port & 0xFFFF, peer)] = counts
            elif installed is False:
                to_client.pop((port, peer), None)
        elif op == 4:
            key2 = next(iter(to_client), None)
            if key2 is not None:
                rx.drop_to_client(*key2)
                del to_client[key2]
                forget_client((key2[0] & 0xFFFF, key2[1]))
        elif op == 5:
            fd = h.outs[take(1)[0] % 3].fileno()
            expected = sum(1 for out, _ in to_peer.values() if out == fd)
            assert rx.drop_fd(fd) == expected
            for k in [k for k, v in to_peer.items() if v[0] == fd]:
                forget_peer(k)
            to_peer = {k: v for k, v in to_peer.items() if v[0] != fd}
        else:
            size = take(1)[0] % 40
            first = take(1)[0]
            datagram = bytes([0x40 | (first & 0x0F) if first & 0x80 else first]) + take(size)
            mine = [ch for c, ch in to_peer if c == me]
            if first & 0x40 and mine:  # aim at a route the model holds
                body = datagram[4:]
                length = max(0, len(body) - (first & 3))  # padding after the payload, at times
                channel = mine[first % len(mine)]
                datagram = channel.to_bytes(2, "big") + length.to_bytes(2, "big") + body
            h.client.sendto(datagram, h.listen.getsockname())
            n, k = rx.relay_clients(h.listen, Counted())
            assert n == 1
            route = None
            if len(datagram) >= 4 and 0x40 <= datagram[0] <= 0x4F:
                length = int.from_bytes(datagram[2:4], "big")
                if 4 + length <= len(datagram):
                    route = to_peer.get((me, int.from_bytes(datagram[:2], "big")))
            assert k == (1 if route is not None else 0), (datagram.hex(), route)
            RELAYED[0] += k
            arrived = h.drain(h.peer)
            for out in h.outs:
                h.drain(out)
            if route is not None and route[1] == h.peer.getsockname():
                assert arrived == [datagram[4 : 4 + length]], arrived
            else:
                assert arrived == []
            if route is not None:
                counts, expect = peer_counts[(me, int.from_bytes(datagram[:2], "big"))]
                expect[0] += 1
                expect[1] += length
                got = _counted(counts)
                assert got is None or got == tuple(expect), (got, expect)
                RELAYED[1] += got is not None
        assert rx.routes == (len(to_peer), len(to_client)), (rx.routes, steps)
        while dropped:
            assert dropped.pop().released()
        if steps % 16 == 0:
            expected = sorted(
                [("to_peer", c, ch, out, p) for (c, ch), (out, p) in to_peer.items()]
                + [("to_client", pt, p, fd, c, ch) for (pt, p), (fd, c, ch) in to_client.items()]
            )
            # inet_ntop writes ::/96 addresses as ::a.b.c.d, Python as hex words: compare values
            got_routes = sorted(tuple(map(_same_form, r)) for r in rx.debug_routes())
            assert got_routes == expected, (got_routes, expected)
    if take(1)[0] % 2:
        del rx  # the receiver goes with every route it holds (as at the relay's shutdown)
        dropped.extend(c for c, _ in peer_counts.values())
        dropped.extend(client_counts.values())
        while dropped:
            assert dropped.pop().released()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--atheris", action="store_true", help="coverage-guided (needs atheris)")
    args, rest = parser.parse_known_args(argv)
    if args.atheris:
        import atheris  # type: ignore[import-not-found]

        # coverage of the driver's branches (the C code is not instrumented: gcc has no
        # libFuzzer) is what guides atheris here
        target = atheris.instrument_func(udpio)
        for helper in (_addr, _counts, _set, _counted):
            globals()[helper.__name__] = atheris.instrument_func(helper)
        atheris.Setup([sys.argv[0], f"-max_total_time={int(args.seconds)}", *rest], target)
        atheris.Fuzz()
        return 0
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    rng = random.Random(seed)
    deadline = time.monotonic() + args.seconds
    inputs = 0
    while time.monotonic() < deadline:
        data = rng.randbytes(rng.randrange(1, 2000))
        try:
            udpio(data)
        except Exception:
            print(f"fuzz_udpio: seed {seed}, input {inputs} failed: {data.hex()}")
            raise
        inputs += 1
    print(
        f"fuzz_udpio: {inputs} inputs ({RELAYED[0]} datagrams relayed by the mirror, "
        f"{RELAYED[1]} of them checked in their counts; {RELAYED[2]} hostile counts refused) in "
        f"{args.seconds:.0f} s, seed {seed}, no failure"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
