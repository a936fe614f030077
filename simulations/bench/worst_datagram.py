"""Issue 9.1's figure: the CPU time the core spends on the most expensive 64 KB datagrams we
could build, per datagram. Prints figures, asserts nothing.

    python -m simulations.bench.worst_datagram [--repeat N]

Each candidate goes through ``Server.handle_client_input`` as the data plane would hand it
over (the answer is built and queued; sending is not counted). The candidates:

- ``unknown-16k``: a Binding with ~16,000 distinct unknown comprehension-required attributes
  (the quadratic duplicate scan);
- ``unknown-max``: the largest count of unknown attributes a message may carry, 1 KB each,
  with FINGERPRINT (CRC over 64 KB, then a 420 naming them all);
- ``auth-64k``: an Allocate padded to 64 KB with a valid USERNAME and NONCE and a bogus
  MESSAGE-INTEGRITY (key derivation, HMAC over 64 KB, a signed 401);
- ``permission-32`` / ``permission-58``: authenticated CreatePermissions with 32 distinct
  peers (the cap) and with as many as fit in the attribute cap;
- ``send-64k``: a 64 KB Send indication on a live allocation with a permission;
- ``channel-64k``: 64 KB of ChannelData on an unbound channel.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable

from firezone_relay.protocol import stun
from firezone_relay.protocol.auth import firezone_password
from firezone_relay.protocol.server import Server, ServerConfig
from firezone_relay.protocol.stun import Attr, Class, Method
from firezone_relay.protocol.types import udp
from simulations.turn_client import TurnClient

NOW = 1_800_000_000.0
CLIENT = ("93.184.216.34", 40000)
CLIENT_5 = udp(CLIENT, ("0.0.0.0", 3478))
PEER = ("8.8.8.8", 9)


def _server() -> Server:
    server = Server(ServerConfig(public_ip4="52.0.0.1"), random.Random(1), secret="s" * 64)
    return server


def _drain(server: Server) -> int:
    n = 0
    while server.next_command() is not None:
        n += 1
    return n


def _client(server: Server) -> TurnClient:
    expiry = int(NOW) + 3600
    client = TurnClient(f"{expiry}:salt", firezone_password(server.auth_secret, expiry, "salt"))
    server.handle_client_input(client.allocate(transport=0), CLIENT_5, NOW)
    while (command := server.next_command()) is not None:
        client.learn(stun.parse(command.payload))  # type: ignore[union-attr]
    return client


def _allocated(server: Server) -> TurnClient:
    client = _client(server)
    server.handle_client_input(client.allocate(), CLIENT_5, NOW)
    _drain(server)
    return client


def _max_attributes() -> int:
    return getattr(stun, "MAX_ATTRIBUTES", 16_000)


Factory = Callable[[int], bytes]


def _with_tid(datagram: bytes) -> Factory:
    """The same unsigned datagram with a fresh transaction id each time (no cache hits)."""
    return lambda i: datagram[:8] + i.to_bytes(12, "big") + datagram[20:]


def candidates() -> dict[str, tuple[Server, Factory]]:
    out: dict[str, tuple[Server, Factory]] = {}
    server = _server()
    unknown = [(0x0100 + i, b"") for i in range(16_000)]
    out["unknown-16k"] = (
        server,
        _with_tid(stun.encode(Method.BINDING, Class.REQUEST, bytes(12), unknown)),
    )
    count = min(_max_attributes() - 1, 62)
    big = [(0x0100 + i, b"\xaa" * (64_000 // count - 4)) for i in range(count)]
    out["unknown-max"] = (server, _with_tid_fingerprinted(big))
    server = _server()
    client = _client(server)
    padding = [(Attr.REQUESTED_TRANSPORT, 17), (0x8F00, b"\x00" * 64_000)]

    def bogus_auth(i: int) -> bytes:
        signed = client.request(Method.ALLOCATE, padding)
        return signed[:-1] + bytes([signed[-1] ^ 1])  # a wrong MESSAGE-INTEGRITY

    out["auth-64k"] = (server, bogus_auth)
    server = _server()
    client = _allocated(server)
    peers = [(f"8.{i // 256}.{i % 256}.1", 9) for i in range(_max_attributes() - 6)]
    out["permission-32"] = (server, lambda i: client.create_permission(*peers[:32]))
    out["permission-58"] = (server, lambda i: client.create_permission(*peers[:58]))
    server = _server()
    sender = _allocated(server)
    server.handle_client_input(sender.create_permission(PEER), CLIENT_5, NOW)
    _drain(server)
    out["send-64k"] = (server, lambda i: sender.send_indication(PEER, b"\x00" * 64_000))
    out["channel-64k"] = (_server(), lambda i: b"\x40\x01\xfa\x00" + b"\x00" * 64_000)
    return out


def _with_tid_fingerprinted(attributes: list[tuple[int, object]]) -> Factory:
    return lambda i: stun.encode(
        Method.BINDING, Class.REQUEST, i.to_bytes(12, "big"), attributes, fingerprint=True
    )


def measure(server: Server, make: Factory, repeat: int) -> tuple[float, int, int]:
    """CPU milliseconds per datagram (building it excluded), its size, and how many
    commands one produced."""
    datagrams = [make(i) for i in range(repeat)]
    commands = 0
    start = time.process_time()
    for datagram in datagrams:
        server.handle_client_input(datagram, CLIENT_5, NOW)
        commands = _drain(server)
    return (time.process_time() - start) * 1000 / repeat, len(datagrams[0]), commands


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.bench.worst_datagram", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    print(f"{'datagram':<16}{'bytes':>8}{'ms CPU each':>14}{'commands':>10}")
    for name, (server, make) in candidates().items():
        repeat = max(1, args.repeat // 10) if name == "unknown-16k" else args.repeat
        ms, size, commands = measure(server, make, repeat)
        print(f"{name:<16}{size:>8}{ms:>14.3f}{commands:>10}")


if __name__ == "__main__":
    main()
