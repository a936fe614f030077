"""Immutable commands the core emits for the I/O layer and the actors to carry out.

Relaying itself never goes through a command (see ``Server.handle_client_input``); commands
carry control-plane work only, in the order the core emitted them.
"""

from __future__ import annotations

from dataclasses import dataclass

from firezone_relay.protocol.types import Addr, Family, FiveTuple


@dataclass(frozen=True, slots=True)
class SendMessage:
    """Send ``payload`` to ``recipient`` from the listen socket of the recipient's family."""

    payload: bytes
    recipient: FiveTuple


@dataclass(frozen=True, slots=True)
class CreateAllocation:
    """Bind a UDP socket on ``port`` for ``family``; report failure with
    ``Server.handle_allocation_failed(port)``. ``dont_fragment``: the client asked for the
    DF bit on what the relay sends to peers (DONT-FRAGMENT, RFC 8656 §7.2)."""

    port: int
    family: Family
    dont_fragment: bool = False


@dataclass(frozen=True, slots=True)
class FreeAllocation:
    """Close the socket on ``port`` for ``family``."""

    port: int
    family: Family


@dataclass(frozen=True, slots=True)
class CreateChannelBinding:
    """A channel became (or stayed) bound: keep any fast path (XDP maps) in sync."""

    client: FiveTuple
    channel: int
    peer: Addr
    allocation_port: int


@dataclass(frozen=True, slots=True)
class DeleteChannelBinding:
    """A channel stopped relaying: remove it from any fast path."""

    client: FiveTuple
    channel: int
    peer: Addr
    allocation_port: int


Command = (
    SendMessage | CreateAllocation | FreeAllocation | CreateChannelBinding | DeleteChannelBinding
)
