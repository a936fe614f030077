"""Benchmark of the sans-IO core alone: routing decisions and authenticated Allocates per second.

    python -m simulations.bench.core [--seconds 2]

Prints figures; asserts nothing. Targets from the issue: >= 1,000,000 ChannelData routing
decisions per second in each direction on one core, >= 10,000 authenticated Allocates/s.
"""

from __future__ import annotations

import argparse
import random
import time

from firezone_relay.protocol import stun
from firezone_relay.protocol.auth import firezone_password
from firezone_relay.protocol.commands import CreateAllocation, SendMessage
from firezone_relay.protocol.server import Server, ServerConfig
from firezone_relay.protocol.types import FiveTuple, Transport, udp
from simulations import channel_data
from simulations.turn_client import TurnClient

NOW = 1_800_000_000.0
LISTEN = ("0.0.0.0", 3478)


def _drain(server: Server) -> None:
    while server.next_command() is not None:
        pass


def _setup(allocations: int) -> tuple[Server, list[tuple[FiveTuple, int]]]:
    server = Server(ServerConfig(public_ip4="52.0.0.1"), random.Random(1))
    routes = []
    for i in range(allocations):
        sender = udp((f"93.184.{i // 250}.{i % 250 + 1}", 40000 + i % 1000), LISTEN)
        salt = f"salt{i}"
        expiry = int(NOW) + 3600
        client = TurnClient(f"{expiry}:{salt}", firezone_password(server.auth_secret, expiry, salt))
        server.handle_client_input(client.allocate(), sender, NOW)
        while (command := server.next_command()) is not None:
            if isinstance(command, SendMessage):
                client.learn(stun.parse(command.payload))
        server.handle_client_input(client.allocate(), sender, NOW)
        commands = list(iter(server.next_command, None))
        port = next(c.port for c in commands if isinstance(c, CreateAllocation))
        _drain(server)
        server.handle_client_input(client.channel_bind(0x4000, ("8.8.8.8", 1000 + i)), sender, NOW)
        _drain(server)
        routes.append((sender, port))
    return server, routes


def bench_routing(seconds: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """Decisions/s in each direction (client -> peer, peer -> client): over the whole run,
    and in the fastest batch of 1,000 (the figure least moved by other load on a shared
    machine, for comparing builds)."""
    server, routes = _setup(100)
    datagram = channel_data.encode(0x4000, b"x" * 100)
    # what the data plane calls for a listen socket's datagrams: the client's address only
    handle_client = server.client_input(Transport.UDP, LISTEN).handle
    handle_peer = server.handle_peer_traffic
    payload = b"y" * 100
    work = [(sender.remote, port, ("8.8.8.8", 1000 + i)) for i, (sender, port) in enumerate(routes)]
    batch = work * 10
    rates = []
    best = []
    for direction in ("client", "peer"):
        count = 0
        fastest = float("inf")
        deadline = time.perf_counter() + seconds
        start = time.perf_counter()
        while (began := time.perf_counter()) < deadline:
            for sender, port, peer in batch:
                if direction == "client":
                    assert handle_client(datagram, sender, NOW) is not None
                else:
                    assert handle_peer(payload, peer, port, NOW) is not None
            fastest = min(fastest, time.perf_counter() - began)
            count += len(batch)
        rates.append(count / (time.perf_counter() - start))
        best.append(len(batch) / fastest)
    return (rates[0], rates[1]), (best[0], best[1])


def bench_allocate(seconds: float) -> float:
    server = Server(ServerConfig(public_ip4="52.0.0.1"), random.Random(1))
    expiry = int(NOW) + 3600
    requests = []
    for i in range(5000):
        salt = f"s{i}"
        client = TurnClient(f"{expiry}:{salt}", firezone_password(server.auth_secret, expiry, salt))
        sender = udp(
            (f"10.{i // 60000}.{(i // 250) % 240}.{i % 250 + 1}", 1024 + i % 60000), LISTEN
        )
        server.handle_client_input(client.allocate(), sender, NOW)
        client.learn(stun.parse(server.next_command().payload))  # type: ignore[union-attr]
        requests.append((client.allocate(), sender))
    count = 0
    start = time.perf_counter()
    for data, sender in requests:
        server.handle_client_input(data, sender, NOW)
        _drain(server)
        count += 1
        if time.perf_counter() - start > seconds:
            break
    assert server.num_allocations == count
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m simulations.bench.core", description=__doc__)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    (to_peer, to_client), (best_to_peer, best_to_client) = bench_routing(args.seconds)
    allocates = bench_allocate(args.seconds)
    print(f"ChannelData routing client->peer: {to_peer:,.0f} decisions/s (target 1,000,000)")
    print(f"ChannelData routing peer->client: {to_client:,.0f} decisions/s (target 1,000,000)")
    print(f"  fastest batch of 1,000:  client->peer {best_to_peer:,.0f}/s, peer->client ", end="")
    print(f"{best_to_client:,.0f}/s")
    print(f"authenticated Allocate handling:  {allocates:,.0f} /s (target 10,000)")


if __name__ == "__main__":
    main()
