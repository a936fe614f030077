"""Stream clients in the core: the transport is part of the 5-tuple, and a closed connection
frees its allocation at once (RFC 8656 §3.1)."""

from __future__ import annotations

from firezone_relay.protocol.commands import (
    DeleteChannelBinding,
    FreeAllocation,
    SendMessage,
)
from firezone_relay.protocol.routes import ToClient
from firezone_relay.protocol.stun import Attr
from firezone_relay.protocol.types import FiveTuple, Transport
from simulations import channel_data
from simulations.turn_client import TurnClient
from tests.unit.harness import CLIENT, NOW, PEER, Harness, Outcome, error_code, is_success

TCP = FiveTuple(Transport.TCP, CLIENT, ("10.0.0.1", 3478))
TLS = FiveTuple(Transport.TLS, CLIENT, ("10.0.0.1", 5349))


def send(h: Harness, data: bytes, client: FiveTuple) -> Outcome:
    relay = h.server.handle_client_input(data, client, h.now)
    return Outcome(h.drain(), relay)


def allocate(h: Harness, turn: TurnClient, client: FiveTuple, transport: int = 17) -> Outcome:
    turn.learn(send(h, turn.allocate(transport=0), client).response)
    return send(h, turn.allocate(transport=transport), client)


def test_a_tcp_a_tls_and_a_udp_client_on_one_address_are_three_clients() -> None:
    h = Harness(auth_scheme="rest")
    ports = set()
    for client in (TCP, TLS):
        outcome = allocate(h, h.client("same"), client)
        assert is_success(outcome.response)
        (message,) = [c for c in outcome.commands if isinstance(c, SendMessage)]
        assert message.recipient == client  # the answer goes back over that connection
        ports.add(outcome.response.get(Attr.XOR_RELAYED_ADDRESS)[1])
    udp = h.allocate(h.client("same"))
    assert is_success(udp.response)
    ports.add(udp.response.get(Attr.XOR_RELAYED_ADDRESS)[1])
    assert len(ports) == 3 and h.server.num_allocations == 3
    assert h.server.allocation_of(TCP) is not h.server.allocation_of(TLS)


def test_a_nonce_is_bound_to_its_transport() -> None:
    h = Harness()
    turn = h.client()
    h.authenticate(turn)  # nonce issued to the UDP 5-tuple
    assert error_code(send(h, turn.allocate(), TCP).response) == 438


def test_requested_transport_tcp_is_442_on_a_stream_too() -> None:
    h = Harness()
    assert error_code(allocate(h, h.client(), TCP, transport=6).response) == 442


def test_a_closed_connection_frees_its_allocation_and_channels() -> None:
    h = Harness()
    turn = h.client()
    port = allocate(h, turn, TCP).response.get(Attr.XOR_RELAYED_ADDRESS)[1]
    assert is_success(send(h, turn.channel_bind(0x4000, PEER), TCP).response)
    route = h.server.handle_peer_traffic(b"data", PEER, port, h.now)
    assert route == ToClient(TCP, 0x4000)  # peer data goes back to the stream client
    assert send(h, channel_data.encode(0x4000, b"up"), TCP).relay is not None
    h.server.handle_client_closed(TCP, NOW + 1)
    commands = h.drain()
    assert any(isinstance(c, FreeAllocation) and c.port == port for c in commands)
    assert any(isinstance(c, DeleteChannelBinding) and c.client == TCP for c in commands)
    assert h.server.num_allocations == 0 and h.server.allocation_of(TCP) is None
    h.server.check_invariants()
    h.server.handle_client_closed(TCP, NOW + 2)  # twice, or without an allocation: nothing
    assert h.drain() == []
