"""Sans-IO STUN/TURN core: bytes, addresses and time in; commands and deadlines out."""

from firezone_relay.protocol.commands import (
    Command,
    CreateAllocation,
    CreateChannelBinding,
    DeleteChannelBinding,
    FreeAllocation,
    SendMessage,
)
from firezone_relay.protocol.types import Addr, Family, FiveTuple, Transport

__all__ = [
    "Addr",
    "Command",
    "CreateAllocation",
    "CreateChannelBinding",
    "DeleteChannelBinding",
    "Family",
    "FiveTuple",
    "FreeAllocation",
    "SendMessage",
    "Transport",
]
