"""Authentication of TURN requests: the challenge, the long-term credential check and the
counting of nonce uses (RFC 8489 §9.2), in one collaborator of ``Server``.

The server hands it a request, the client's 5-tuple and the wall-clock time; it answers with
how to sign the response and who the user is, or raises the ``Reject`` (401/438 with REALM and
a nonce) to send back. Nonces are bound to the 5-tuple (see ``protocol.auth.Nonces``).
"""

from __future__ import annotations

import logging

from firezone_relay.protocol import stun
from firezone_relay.protocol.auth import (
    Identity,
    NonceCheck,
    Nonces,
    parse_username,
    password_for,
)
from firezone_relay.protocol.errors import ErrorCode
from firezone_relay.protocol.responses import Auth, Reject
from firezone_relay.protocol.stun import Attr, Message
from firezone_relay.protocol.types import FiveTuple, log_fields

log = logging.getLogger("relay")

__all__ = ["Authenticator"]


class Authenticator:
    """Checks credentials of ``scheme`` (firezone or rest) under ``realm`` against any of
    ``secrets`` (several during a rotation; the first mints new ones), with ``nonces`` handing
    out and counting nonces. ``unix_now``: wall-clock seconds."""

    def __init__(self, scheme: str, realm: str, secrets: tuple[str, ...], nonces: Nonces) -> None:
        self.scheme = scheme
        self.realm = realm
        self.secrets = secrets
        self.nonces = nonces

    def challenge(
        self,
        msg: Message,
        client: FiveTuple,
        code: ErrorCode,
        unix_now: float,
        key: bytes | None,
    ) -> Reject:
        """401/438 with REALM and a nonce for this 5-tuple. Signed when we know the key and
        the scheme is firezone (connlib checks every response, and the portal's secret is
        random); unsigned with rest as RFC 8489 says, so a challenge gives nothing to test
        guesses of the shared secret against offline."""
        nonce = self.nonces.issue(client, unix_now)
        if self.scheme != "firezone":
            key = None
        fingerprint = msg.fingerprint_offset is not None
        sha256 = msg.integrity_sha256_offset is not None and msg.integrity_offset is None
        return Reject(
            code,
            Auth(key, sha256, fingerprint),
            ((Attr.REALM, self.realm), (Attr.NONCE, nonce)),
        )

    def authenticate(
        self, msg: Message, client: FiveTuple, unix_now: float
    ) -> tuple[Auth, str, Identity]:
        """RFC 8489 §9.2.4 checks; returns how to sign and who the user is, or raises the
        challenge. A nonce use is counted only once MESSAGE-INTEGRITY passed."""
        username = msg.get(Attr.USERNAME)
        nonce = msg.get(Attr.NONCE)
        realm = msg.get(Attr.REALM)  # also validates its encoding
        has_integrity = msg.integrity_offset is not None or msg.integrity_sha256_offset is not None
        identity = parse_username(self.scheme, username) if username is not None else None
        key = None
        if username is not None and identity is not None:
            key = self._key_for(msg, username, identity, has_integrity)
        if has_integrity and username is not None and identity is None:
            _auth_failed(client, username, realm, f"not a {self.scheme} username")
        if not has_integrity or username is None or nonce is None or identity is None:
            raise self.challenge(
                msg, client, ErrorCode.UNAUTHORIZED, unix_now, key if has_integrity else None
            )
        assert key is not None
        check = self.nonces.validate(nonce, client, unix_now)
        if check == NonceCheck.MALFORMED:
            raise self.challenge(msg, client, ErrorCode.UNAUTHORIZED, unix_now, key)
        if check == NonceCheck.STALE:
            raise self.challenge(msg, client, ErrorCode.STALE_NONCE, unix_now, key)
        if identity.expiry < unix_now:
            _auth_failed(client, username, realm, "the credential expired")
            raise self.challenge(msg, client, ErrorCode.UNAUTHORIZED, unix_now, key)
        if not stun.verify_integrity(msg, key):
            _auth_failed(client, username, realm, "wrong password (or another secret)")
            raise self.challenge(msg, client, ErrorCode.UNAUTHORIZED, unix_now, key)
        self.nonces.consume(nonce, client)  # state only once integrity passed
        sha256 = msg.integrity_offset is None
        fingerprint = msg.fingerprint_offset is not None
        return Auth(key, sha256, fingerprint, verified=True), username, identity

    def _key_for(self, msg: Message, username: str, identity: Identity, signed: bool) -> bytes:
        """The long-term key of the first accepted secret that the message's integrity
        verifies with (several during a secret rotation), else the first secret's."""
        first = None
        for secret in self.secrets:
            password = password_for(self.scheme, secret, username, identity)
            key = stun.long_term_key(username, self.realm, password)
            if len(self.secrets) == 1 or not signed:
                return key
            if first is None:
                first = key
            if stun.verify_integrity(msg, key):
                return key
        assert first is not None
        return first


def _auth_failed(sender: FiveTuple, username: str, realm: str | None, why: str) -> None:
    """One INFO line an operator can act on (a client with a bad or stale credential). Its
    text comes from the network: quoted and cut short, and marked ``from_network`` so the log
    handler holds it to the warnings' per-site rate limit (an attacker needs no credential)."""
    host, port = sender.remote
    log.info(
        "authentication failed from %s:%d (%s): %s (username %r, realm %r)",
        f"[{host}]" if ":" in host else host,
        port,
        sender.transport.name.lower(),
        why,
        username[:64],
        None if realm is None else realm[:64],
        extra={
            "from_network": True,
            **log_fields(
                sender=sender,
                transport=sender.transport.name.lower(),
                username=username[:64],
                realm=None if realm is None else realm[:64],
            ),
        },
    )
