"""A deterministic harness around ``Server``: fixed RNG, explicit clock, parsed outputs."""

from __future__ import annotations

import random
from dataclasses import dataclass

from firezone_relay.protocol import stun
from firezone_relay.protocol.auth import firezone_password, rest_password
from firezone_relay.protocol.commands import Command, SendMessage
from firezone_relay.protocol.routes import ClientRoute
from firezone_relay.protocol.server import Server, ServerConfig
from firezone_relay.protocol.stun import Attr, Class, Message
from firezone_relay.protocol.types import Addr, Family, FiveTuple, udp
from simulations.turn_client import TurnClient

NOW = 1_800_000_000.0  # the harness's clock doubles as wall clock (unix_offset = 0)
PUBLIC4 = "52.0.0.1"
PUBLIC6 = "2600:1f00::1"
CLIENT = ("93.184.216.34", 40000)
CLIENT6 = ("2606:2800:220:1::7", 40000)
PEER = ("8.8.4.4", 5000)
PEER6 = ("2001:4860:4860::8844", 5000)
LISTEN = ("0.0.0.0", 3478)
LISTEN6 = ("::", 3478)


def five_tuple(client: Addr) -> FiveTuple:
    """The 5-tuple of a UDP client at ``client`` on the listen socket of its family."""
    return udp(client, LISTEN6 if ":" in client[0] else LISTEN)


@dataclass
class Outcome:
    commands: list[Command]
    relay: ClientRoute | None = None

    @property
    def messages(self) -> list[Message]:
        return [stun.parse(c.payload) for c in self.commands if isinstance(c, SendMessage)]

    @property
    def response(self) -> Message:
        (message,) = self.messages
        return message

    @property
    def others(self) -> list[Command]:
        return [c for c in self.commands if not isinstance(c, SendMessage)]


class Harness:
    def __init__(self, **config: object) -> None:
        settings: dict[str, object] = {"public_ip4": PUBLIC4, "public_ip6": PUBLIC6}
        settings.update(config)
        self.server = Server(ServerConfig(**settings), random.Random(1))  # type: ignore[arg-type]
        self.now = NOW

    def drain(self) -> list[Command]:
        out = []
        while (command := self.server.next_command()) is not None:
            out.append(command)
        return out

    def send(self, data: bytes, sender: Addr = CLIENT, at: float | None = None) -> Outcome:
        relay = self.server.handle_client_input(
            data, five_tuple(sender), self.now if at is None else at
        )
        return Outcome(self.drain(), relay)

    def peer(self, data: bytes, peer: Addr, port: int) -> Outcome:
        route = self.server.handle_peer_traffic(data, peer, port, self.now)
        outcome = Outcome(self.drain())
        outcome.route = route  # type: ignore[attr-defined]
        return outcome

    def advance(self, seconds: float) -> list[Command]:
        self.now += seconds
        self.server.handle_timeout(self.now)
        return self.drain()

    def client(self, salt: str = "n23JJ2wKKtt30oXi", expiry: int | None = None) -> TurnClient:
        expiry = int(self.now) + 3600 if expiry is None else expiry
        username = f"{expiry}:{salt}"
        if self.server.config.auth_scheme == "rest":
            password = rest_password(self.server.auth_secret, username)
        else:
            password = firezone_password(self.server.auth_secret, expiry, salt)
        return TurnClient(username, password, rng=random.Random(salt))

    def authenticate(self, client: TurnClient, sender: Addr = CLIENT) -> None:
        """Get a nonce the way connlib does: a signed request without NONCE, then a 401."""
        outcome = self.send(client.allocate(transport=0), sender)
        client.learn(outcome.response)

    def allocate(self, client: TurnClient, sender: Addr = CLIENT, **kwargs: object) -> Outcome:
        if client.nonce is None:
            self.authenticate(client, sender)
        return self.send(client.allocate(**kwargs), sender)  # type: ignore[arg-type]


def error_code(message: Message) -> int | None:
    value = message.get(Attr.ERROR_CODE)
    return None if value is None else int(value[0])


def is_success(message: Message) -> bool:
    return message.cls == Class.SUCCESS


__all__ = [
    "CLIENT",
    "CLIENT6",
    "NOW",
    "PEER",
    "PEER6",
    "PUBLIC4",
    "PUBLIC6",
    "Family",
    "five_tuple",
]
