"""A fuzz target for the compiled helper (``actors/_udpio.c``): the route mirror and the
ChannelData parser, driven through Python with operation sequences checked against a dict.

``udpio(data)`` reads ``data`` as a script: each step sets or drops a client -> peer or peer ->
client route (random addresses, channels and ports, some through sockets that are then
"closed" with ``drop_fd``), or sends the next bytes of the input as a datagram from the client
to the listen socket and relays it with ``relay_clients``. After every step the mirror's size
and, now and then, its whole contents (``debug_routes``) equal the model's; a datagram is
relayed exactly when it is ChannelData (0x40-0x4F, a length within the datagram) on a channel
the model holds, and the peer gets exactly its payload. Anything else raises.

``python -m simulations.fuzz_udpio --seconds 30`` runs it on random scripts (seeded, printed),
or under atheris when it is installed and ``--atheris`` is given (the C code itself is not
coverage-instrumented then: gcc has no libFuzzer; the Python driver's branches guide it).
``tox -e asan`` runs the random soak against an ASan+UBSan build.
"""

from __future__ import annotations

import argparse
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
RELAYED = [0]  # datagrams the mirror relayed, over every input (the soak reports it)


def _addr(take: Any) -> Addr:
    kind = take(1)[0] % 3
    if kind == 0:
        return ("127.0.0.1", 1 + int.from_bytes(take(2), "big") % 65535)
    if kind == 1:
        return (str(ipaddress.IPv4Address(take(4))), 1 + int.from_bytes(take(2), "big") % 65535)
    return (str(ipaddress.IPv6Address(take(16))), 1 + int.from_bytes(take(2), "big") % 65535)


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
    steps = 0
    while pos < len(data) and steps < 200:
        steps += 1
        op = take(1)[0] % 7
        if op in (0, 1):  # client -> peer; mostly from the real client, so datagrams hit it
            client = me if op == 0 else _addr(take)
            channel = int.from_bytes(take(2), "big")
            out = h.outs[take(1)[0] % 3].fileno()
            peer = h.peer.getsockname() if take(1)[0] % 2 else _addr(take)
            installed = rx.set_to_peer(client, channel, out, peer)
            if installed:
                to_peer[(client, channel & 0xFFFF)] = (out, peer)
            else:
                to_peer.pop((client, channel & 0xFFFF), None)
        elif op == 2:
            key = next(iter(to_peer), None) if take(1)[0] % 2 else (me, 0x4000)
            if key is not None:
                rx.drop_to_peer(*key)
                to_peer.pop(key, None)
        elif op == 3:
            port = int.from_bytes(take(2), "big")
            peer = _addr(take)
            client = _addr(take)
            channel = 0x4000 + take(1)[0]
            if rx.set_to_client(port, peer, h.listen.fileno(), client, channel):
                to_client[(port, peer)] = (h.listen.fileno(), client, channel)
            else:
                to_client.pop((port, peer), None)
        elif op == 4:
            key2 = next(iter(to_client), None)
            if key2 is not None:
                rx.drop_to_client(*key2)
                del to_client[key2]
        elif op == 5:
            fd = h.outs[take(1)[0] % 3].fileno()
            expected = sum(1 for out, _ in to_peer.values() if out == fd)
            assert rx.drop_fd(fd) == expected
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
        assert rx.routes == (len(to_peer), len(to_client)), (rx.routes, steps)
        if steps % 16 == 0:
            assert rx.debug_routes() == sorted(
                [("to_peer", c, ch, out, p) for (c, ch), (out, p) in to_peer.items()]
                + [("to_client", pt, p, fd, c, ch) for (pt, p), (fd, c, ch) in to_client.items()]
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--atheris", action="store_true", help="coverage-guided (needs atheris)")
    args, rest = parser.parse_known_args(argv)
    if args.atheris:
        import atheris  # type: ignore[import-not-found]

        atheris.Setup([sys.argv[0], f"-max_total_time={int(args.seconds)}", *rest], udpio)
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
        f"fuzz_udpio: {inputs} inputs ({RELAYED[0]} datagrams relayed by the mirror) in "
        f"{args.seconds:.0f} s, seed {seed}, no failure"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
