"""Request builders for the client side of TURN, as Firezone's clients send them.

Used by the tests, the trace simulator and the NAT integration agents; it keeps the
realm/nonce/key state so each request is signed the way connlib signs it (USERNAME,
REALM, NONCE, MESSAGE-INTEGRITY), and it checks the integrity of responses.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from firezone_relay.protocol import stun
from firezone_relay.protocol.stun import Attr, Class, Message, Method
from firezone_relay.protocol.types import Addr, Family


@dataclass(slots=True)
class TurnClient:
    username: str
    password: str
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    realm: str | None = None
    nonce: str | None = None
    fingerprint: bool = False
    software: str = "snownet; test"

    @property
    def key(self) -> bytes:
        return stun.long_term_key(self.username, self.realm or "firezone", self.password)

    def new_tid(self) -> bytes:
        return self.rng.randbytes(12)

    def request(
        self,
        method: int,
        attributes: list[tuple[int, object]],
        *,
        signed: bool = True,
        tid: bytes | None = None,
    ) -> bytes:
        """A request carrying SOFTWARE, the given attributes and, when ``signed``, USERNAME,
        REALM (if known), NONCE (if known) and MESSAGE-INTEGRITY."""
        attrs: list[tuple[int, object]] = [(Attr.SOFTWARE, self.software), *attributes]
        key = None
        if signed:
            attrs.append((Attr.USERNAME, self.username))
            if self.realm is not None:
                attrs.append((Attr.REALM, self.realm))
            if self.nonce is not None:
                attrs.append((Attr.NONCE, self.nonce))
            key = self.key
        return stun.encode(
            method,
            Class.REQUEST,
            tid or self.new_tid(),
            attrs,
            integrity_key=key,
            fingerprint=self.fingerprint,
        )

    def learn(self, response: Message) -> None:
        """Take REALM and NONCE from a 401/438 so the next request can authenticate."""
        realm = response.get(Attr.REALM)
        nonce = response.get(Attr.NONCE)
        if realm is not None:
            self.realm = realm
        if nonce is not None:
            self.nonce = nonce

    def verify(self, response: Message) -> bool:
        return stun.verify_integrity(response, self.key)

    # --- the requests a TURN client sends -------------------------------------------------

    def allocate(
        self,
        *,
        lifetime: int | None = None,
        additional_family: Family | None = None,
        requested_family: Family | None = None,
        transport: int = 17,
        signed: bool = True,
        extra: list[tuple[int, object]] | None = None,
        tid: bytes | None = None,
    ) -> bytes:
        attrs: list[tuple[int, object]] = [(Attr.REQUESTED_TRANSPORT, transport)]
        if lifetime is not None:
            attrs.append((Attr.LIFETIME, lifetime))
        if requested_family is not None:
            attrs.append((Attr.REQUESTED_ADDRESS_FAMILY, requested_family))
        if additional_family is not None:
            attrs.append((Attr.ADDITIONAL_ADDRESS_FAMILY, additional_family))
        attrs.extend(extra or [])
        return self.request(Method.ALLOCATE, attrs, signed=signed, tid=tid)

    def refresh(self, lifetime: int | None = None, tid: bytes | None = None) -> bytes:
        attrs: list[tuple[int, object]] = []
        if lifetime is not None:
            attrs.append((Attr.LIFETIME, lifetime))
        return self.request(Method.REFRESH, attrs, tid=tid)

    def channel_bind(self, channel: int, peer: Addr, tid: bytes | None = None) -> bytes:
        attrs: list[tuple[int, object]] = [
            (Attr.CHANNEL_NUMBER, channel),
            (Attr.XOR_PEER_ADDRESS, peer),
        ]
        return self.request(Method.CHANNEL_BIND, attrs, tid=tid)

    def create_permission(self, *peers: Addr, tid: bytes | None = None) -> bytes:
        return self.request(
            Method.CREATE_PERMISSION, [(Attr.XOR_PEER_ADDRESS, p) for p in peers], tid=tid
        )

    def send_indication(self, peer: Addr, data: bytes) -> bytes:
        return stun.encode(
            Method.SEND,
            Class.INDICATION,
            self.new_tid(),
            [(Attr.XOR_PEER_ADDRESS, peer), (Attr.DATA, data)],
        )

    def binding(self) -> bytes:
        return stun.encode(Method.BINDING, Class.REQUEST, self.new_tid(), [])
