"""Answering requests: build and sign the response, hold back unauthenticated answers a
spoofed source could use for reflection, cache authenticated ones for retransmissions, and
count every answer sent (``relay.responses``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from firezone_relay.protocol import stun
from firezone_relay.protocol.commands import Command, SendMessage
from firezone_relay.protocol.errors import ErrorCode
from firezone_relay.protocol.ratelimit import RateLimiter
from firezone_relay.protocol.stun import Attr, Class, Message, Method
from firezone_relay.protocol.transactions import TransactionCache
from firezone_relay.protocol.types import FiveTuple

#: the ``message_type`` label of ``relay.responses``
MESSAGE_TYPES = {
    Method.BINDING: "binding",
    Method.ALLOCATE: "allocate",
    Method.REFRESH: "refresh",
    Method.CHANNEL_BIND: "channelbind",
    Method.CREATE_PERMISSION: "createpermission",
}

Attributes = list[tuple[int, object]]


@dataclass(frozen=True, slots=True)
class Auth:
    """How to sign a response: the request's key, MI flavour and FINGERPRINT wish."""

    key: bytes | None
    sha256: bool
    fingerprint: bool
    #: MESSAGE-INTEGRITY was verified with ``key``: the answer does not count against the
    #: unauthenticated rate limit and goes into the retransmission cache
    verified: bool = False


class Reject(Exception):
    """Answer the request with this error code (signed with ``auth`` when given)."""

    def __init__(
        self,
        code: ErrorCode,
        auth: Auth | None = None,
        extra: tuple[tuple[int, object], ...] = (),
    ):
        super().__init__(code)
        self.code = code
        self.auth = auth
        self.extra = extra


class Counters(Protocol):
    """The part of ``protocol.server.Stats`` answers move."""

    responses: dict[tuple[str, str, int | None], int]
    rate_limited: int


class Responder:
    def __init__(
        self,
        software: str,
        emit: Callable[[Command], None],
        counters: Counters,
        limiter: RateLimiter | None,
        transactions: TransactionCache,
    ) -> None:
        self._software = software
        self._emit = emit
        self._counters = counters
        self._limiter = limiter
        self._transactions = transactions

    def reply(
        self,
        msg: Message,
        sender: FiveTuple,
        cls: int,
        attributes: Attributes,
        auth: Auth,
        now: float,
        cache: bool = False,
        digest: bytes | None = None,
    ) -> SendMessage:
        """Queue the response (unless rate-limited at ``now``) and return it; with ``cache``,
        a verified answer goes into the retransmission cache (under ``digest``, the
        request's, when ``msg`` no longer holds its bytes)."""
        payload = stun.encode(
            msg.method,
            cls,
            msg.transaction_id,
            [(Attr.SOFTWARE, self._software), *attributes],
            integrity_key=auth.key,
            integrity_sha256=auth.sha256,
            fingerprint=auth.fingerprint,
        )
        command = SendMessage(payload, sender)
        limiter = self._limiter
        if not auth.verified and limiter is not None and not limiter.allow(sender.remote[0], now):
            self._counters.rate_limited += 1
            return command  # not sent: a spoofed source must not make us reflect
        self._emit(command)
        success = cls == Class.SUCCESS
        self.count(
            "success" if success else "error",
            msg.method,
            None if success else error_code_of(attributes),
        )
        if cache and auth.verified:
            # an authenticated answer: a retransmission gets the same one
            self._transactions.store(
                sender, msg.transaction_id, msg.raw, payload, now, digest=digest
            )
        return command

    def reply_error(
        self,
        msg: Message,
        sender: FiveTuple,
        code: ErrorCode,
        auth: Auth,
        now: float,
        extra: tuple[tuple[int, object], ...] = (),
    ) -> None:
        attributes: Attributes = [(Attr.ERROR_CODE, (code, code.reason))]
        attributes.extend(extra)
        self.reply(msg, sender, Class.ERROR, attributes, auth, now)

    def count(self, cls: str, method: int, code: int | None) -> None:
        key = (cls, MESSAGE_TYPES.get(method, "unknown"), code)
        responses = self._counters.responses
        responses[key] = responses.get(key, 0) + 1


def error_code_of(attributes: Attributes) -> int | None:
    for attr_type, value in attributes:
        if attr_type == Attr.ERROR_CODE and isinstance(value, tuple):
            code = value[0]
            return code if isinstance(code, int) else None
    return None
