"""Long-term credentials: Firezone's scheme, the TURN REST API scheme, and nonces.

Both schemes derive the password from a server secret and the username, so the relay
stores no users. Nonces are stateless (RFC 8489 allows any opaque value): a UUID-shaped
token of issue time plus a MAC over that time and the client's 5-tuple, so a nonce is
bound to the socket it was issued to and expires, and handing one out costs no memory.
Only clients that come back with a valid nonce *and* a valid MESSAGE-INTEGRITY get a use
counter, so memory grows with real clients holding credentials, never with spoofed traffic.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import hmac
import math
import struct
from dataclasses import dataclass

from firezone_relay.protocol.types import FiveTuple

FIREZONE_REALM = "firezone"


def firezone_password(secret: str, expiry: int, salt: str) -> str:
    """base64-no-pad(SHA-256("<expiry>:<secret>:<salt>")), as the Firezone portal mints it."""
    digest = hashlib.sha256(f"{expiry}:{secret}:{salt}".encode()).digest()
    return base64.b64encode(digest).decode().rstrip("=")


def rest_password(secret: str, username: str) -> str:
    """base64(HMAC-SHA1(secret, username)): coturn's ``use-auth-secret``."""
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def portal_salt(public_key: str) -> str:
    """The salt the portal derives from a client's or gateway's public key."""
    return base64.b64encode(hashlib.sha256(public_key.encode()).digest()).decode().rstrip("=")


@dataclass(frozen=True, slots=True)
class Identity:
    """What a username tells us: its expiry and the user it stands for (quota key)."""

    expiry: int
    user: str


def parse_username(scheme: str, username: str) -> Identity | None:
    """``<expiry>:<salt>`` (firezone) or ``<expiry>:<user>`` (rest); None if malformed."""
    parts = username.split(":")
    if scheme == "firezone":
        if len(parts) != 2:
            return None
        expiry_text, user = parts
    else:
        if len(parts) < 2:
            return None
        expiry_text, user = parts[0], ":".join(parts[1:])
    if not _canonical_decimal(expiry_text):
        return None
    expiry = int(expiry_text)
    if expiry >= 2**64:
        return None
    return Identity(expiry, user)


def _canonical_decimal(text: str) -> bool:
    """ASCII digits without a leading zero: one expiry has one spelling, so one credential
    cannot become many usernames (``0<expiry>``, Unicode digits) that share a password."""
    return (
        0 < len(text) <= 20
        and text.isascii()
        and text.isdigit()
        and (text[0] != "0" or text == "0")
    )


def secret_bits(secret: str) -> float:
    """A generous estimate of a secret's strength: length times log2 of the size of the
    character classes it uses (hex-looking secrets count 4 bits a character)."""
    if not secret:
        return 0.0
    if all(c in "0123456789abcdef" for c in secret.lower()):
        return 4.0 * len(secret)
    alphabet = 0
    alphabet += 10 if any(c.isdigit() for c in secret) else 0
    alphabet += 26 if any(c.islower() for c in secret) else 0
    alphabet += 26 if any(c.isupper() for c in secret) else 0
    alphabet += 33 if any(not c.isalnum() for c in secret) else 0
    return len(secret) * math.log2(max(alphabet, 2))


def password_for(scheme: str, secret: str, username: str, identity: Identity) -> str:
    if scheme == "firezone":
        return firezone_password(secret, identity.expiry, identity.user)
    return rest_password(secret, username)


def make_credentials(scheme: str, secret: str, expiry: int, user: str) -> tuple[str, str]:
    """A ``(username, password)`` pair that a relay with ``secret`` accepts until ``expiry``."""
    username = f"{expiry}:{user}"
    identity = Identity(expiry, user)
    return username, password_for(scheme, secret, username, identity)


class NonceCheck:
    OK = "ok"
    MALFORMED = "malformed"  # not a nonce we could have issued: 401
    STALE = "stale"  # ours but expired, used up or issued to another socket: 438


def _format_uuid(raw: bytes) -> str:
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _parse_uuid(text: str) -> bytes | None:
    if len(text) != 36 or text.count("-") != 4:
        return None
    try:
        raw = bytes.fromhex(text.replace("-", ""))
    except ValueError:
        return None
    if len(raw) != 16 or _format_uuid(raw) != text.lower():
        return None
    return raw


@dataclass(slots=True)
class _Budget:
    nonce: str
    remaining: int
    issued: int


class Nonces:
    """Stateless, socket-bound nonces with a per-client use budget.

    ``issue`` returns the client's current nonce if it still has uses left, else a new one.
    ``validate`` judges a presented nonce without touching any state; ``consume`` counts one
    use and is called only once the request's MESSAGE-INTEGRITY has been verified, so a
    valid nonce echoed with a bogus integrity creates no state. ``check`` does both.
    """

    def __init__(self, key: bytes, lifetime: float = 3600.0, max_uses: int = 10_000) -> None:
        self._key = key
        self.lifetime = lifetime
        self.max_uses = max_uses
        # Only clients that came back with a valid nonce have a budget.
        self._uses: dict[FiveTuple, _Budget] = {}
        self._expiry: list[tuple[float, FiveTuple, str]] = []

    def __len__(self) -> int:
        return len(self._uses)

    def _mac(self, stamp: int, client: FiveTuple) -> bytes:
        transport, (host, port), (local_host, local_port) = client
        bound = f"{int(transport)}|{host}|{port}|{local_host}|{local_port}"
        msg = struct.pack("!I", stamp) + bound.encode()
        return hmac.new(self._key, msg, hashlib.sha256).digest()[:12]

    def _mint(self, stamp: int, client: FiveTuple) -> str:
        return _format_uuid(struct.pack("!I", stamp) + self._mac(stamp, client))

    def issue(self, client: FiveTuple, unix_now: float) -> str:
        entry = self._uses.get(client)
        stamp = int(unix_now) & 0xFFFFFFFF
        if entry is not None:
            if entry.remaining > 0 and entry.issued + self.lifetime > unix_now:
                return entry.nonce
            stamp = max(stamp, entry.issued + 1) & 0xFFFFFFFF
        return self._mint(stamp, client)

    def validate(self, nonce: str, client: FiveTuple, unix_now: float) -> str:
        """OK, MALFORMED or STALE for ``nonce`` from ``client``; changes nothing."""
        raw = _parse_uuid(nonce)
        if raw is None:
            return NonceCheck.MALFORMED
        stamp = struct.unpack_from("!I", raw)[0]
        if not hmac.compare_digest(raw[4:], self._mac(stamp, client)):
            return NonceCheck.STALE
        if stamp + self.lifetime <= unix_now or stamp > unix_now + 60:
            return NonceCheck.STALE
        entry = self._uses.get(client)
        if entry is None:
            return NonceCheck.OK
        if entry.nonce != nonce.lower():
            # older than the nonce this client already uses
            return NonceCheck.STALE if entry.issued >= stamp else NonceCheck.OK
        return NonceCheck.OK if entry.remaining > 0 else NonceCheck.STALE

    def consume(self, nonce: str, client: FiveTuple) -> None:
        """Count one use of a nonce ``validate`` accepted (after integrity passed)."""
        raw = _parse_uuid(nonce)
        if raw is None:
            return
        nonce = nonce.lower()
        stamp = struct.unpack_from("!I", raw)[0]
        entry = self._uses.get(client)
        if entry is None or entry.nonce != nonce:
            entry = _Budget(nonce, self.max_uses, stamp)
            self._uses[client] = entry
            heapq.heappush(self._expiry, (stamp + self.lifetime, client, nonce))
        entry.remaining -= 1

    def check(self, nonce: str, client: FiveTuple, unix_now: float) -> str:
        """``validate`` then, if OK, ``consume``."""
        verdict = self.validate(nonce, client, unix_now)
        if verdict == NonceCheck.OK:
            self.consume(nonce, client)
        return verdict

    def next_expiry(self) -> float | None:
        return self._expiry[0][0] if self._expiry else None

    def expire(self, unix_now: float) -> None:
        """Forget use counters of nonces past their lifetime."""
        while self._expiry and self._expiry[0][0] <= unix_now:
            _, client, nonce = heapq.heappop(self._expiry)
            entry = self._uses.get(client)
            if entry is not None and entry.nonce == nonce:
                del self._uses[client]
