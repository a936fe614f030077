"""Recovery from a failed bind of an allocation port, a collaborator of ``Server``.

Linux's ephemeral range overlaps the allocation range, so the port the core chose may be held
by another local socket. The I/O layer reports it while the pipeline drains the commands, so
the Allocate's success response is normally still queued: then the allocation moves to
another free port (up to ``MAX_BIND_ATTEMPTS`` ports in all), its ``CreateAllocation``
commands are queued again right before the response ("socket before response"), and the
response (and its cached copy) names the new port. Otherwise, out of tries, or for
EVEN-PORT/RESERVATION-TOKEN allocations, the allocation is dropped and a queued success
becomes 508.
"""

from __future__ import annotations

import logging
from collections import deque

from firezone_relay.protocol import stun
from firezone_relay.protocol.allocations import Allocation, AllocationTable
from firezone_relay.protocol.commands import Command, CreateAllocation, SendMessage
from firezone_relay.protocol.errors import ErrorCode
from firezone_relay.protocol.ports import PortAllocator
from firezone_relay.protocol.stun import Attr, Class
from firezone_relay.protocol.transactions import TransactionCache
from firezone_relay.protocol.types import log_fields

__all__ = ["MAX_BIND_ATTEMPTS", "BindRecovery"]

log = logging.getLogger("relay")

#: ports one Allocate may try when binds fail (each failed port is quarantined) before 508
MAX_BIND_ATTEMPTS = 8


class BindRecovery:
    """Moves or fails an allocation whose port could not be bound; works on the core's
    command queue (in place: the allocation table holds its append), table, ports and
    retransmission cache."""

    def __init__(
        self,
        commands: deque[Command],
        table: AllocationTable,
        ports: PortAllocator,
        transactions: TransactionCache,
        software: str,
    ) -> None:
        self._commands = commands
        self._table = table
        self._ports = ports
        self._transactions = transactions
        self._software = software

    def failed(self, port: int, now: float | None) -> None:
        """``port`` could not be bound; with ``now`` it is avoided for a while either way."""
        allocation = self._table.by_port.get(port)
        if now is not None:
            self._ports.quarantine(port, now)
        if allocation is None:
            return
        pending = allocation.pending_response
        queued = pending is not None and pending in self._commands
        if queued and self._move(allocation, port):
            return
        self._table.remove(allocation)
        if pending is not None and queued:
            self._fail_pending(allocation, pending)

    def _fail_pending(self, allocation: Allocation, pending: SendMessage) -> None:
        """Turn a still-queued Allocate success into 508 (signed alike), uncached."""
        index = self._commands.index(pending)
        parsed = stun.parse(pending.payload)
        code = ErrorCode.INSUFFICIENT_CAPACITY
        error = stun.encode(
            parsed.method,
            Class.ERROR,
            parsed.transaction_id,
            [(Attr.SOFTWARE, self._software), (Attr.ERROR_CODE, (code, code.reason))],
            integrity_key=allocation.key or None,
        )
        self._commands[index] = SendMessage(error, pending.recipient)
        self._transactions.discard(allocation.client, allocation.transaction_id)

    def _move(self, allocation: Allocation, failed: int) -> bool:
        """Re-home a just-made allocation whose port could not be bound; False if it may
        not move (out of tries, no free port, or a port the client asked for)."""
        attempts = allocation.bind_attempts
        if attempts is None or attempts >= MAX_BIND_ATTEMPTS:
            return False
        port = self._ports.pick(even=False, avoid=failed)
        pending = allocation.pending_response
        if port is None or pending is None:
            return False
        log.info(
            "port %d is taken; the allocation moves to %d",
            failed,
            port,
            extra=log_fields(client=allocation.client, allocation=port, taken=failed),
        )
        allocation.bind_attempts = attempts + 1
        self._table.move(allocation, port)
        response = SendMessage(_readdress(pending.payload, port, allocation.key), pending.recipient)
        allocation.pending_response = response
        self._transactions.replace_response(
            allocation.client, allocation.transaction_id, response.payload
        )
        self._requeue_binds(allocation, failed, pending, response)
        return True

    def _requeue_binds(
        self, allocation: Allocation, failed: int, pending: SendMessage, response: SendMessage
    ) -> None:
        """Drop the failed port's remaining binds (the actor gave up the whole port), and
        bind the new port right before the response, keeping "socket before response"."""
        rebuilt: list[Command] = []
        for command in self._commands:
            if isinstance(command, CreateAllocation) and command.port == failed:
                continue
            if command is pending:
                rebuilt.extend(
                    CreateAllocation(allocation.port, family, allocation.dont_fragment)
                    for family in allocation.families
                )
                rebuilt.append(response)
            else:
                rebuilt.append(command)
        # in place: the allocation table holds the queue's append
        self._commands.clear()
        self._commands.extend(rebuilt)


def _readdress(payload: bytes, port: int, key: bytes) -> bytes:
    """Our Allocate success response with its XOR-RELAYED-ADDRESS port(s) changed,
    re-signed the way it was signed."""
    parsed = stun.parse(payload)
    tid = parsed.transaction_id
    attributes: list[tuple[int, object]] = []
    for attr_type, value in parsed.attributes:
        if attr_type in (Attr.MESSAGE_INTEGRITY, Attr.MESSAGE_INTEGRITY_SHA256, Attr.FINGERPRINT):
            continue
        decoded = stun.ATTRIBUTES[attr_type].decode(value, tid)
        if attr_type == Attr.XOR_RELAYED_ADDRESS:
            decoded = (decoded[0], port)
        attributes.append((attr_type, decoded))
    signed = parsed.integrity_offset is not None or parsed.integrity_sha256_offset is not None
    return stun.encode(
        parsed.method,
        parsed.cls,
        tid,
        attributes,
        integrity_key=key if signed and key else None,
        integrity_sha256=parsed.integrity_offset is None,
        fingerprint=parsed.fingerprint_offset is not None,
    )
