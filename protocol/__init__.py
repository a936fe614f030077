"""Sans-IO STUN/TURN core: bytes, addresses and time in; commands and deadlines out."""

from protocol.commands import (
    Command,
    CreateAllocation,
    CreateChannelBinding,
    DeleteChannelBinding,
    FreeAllocation,
    SendMessage,
)
from protocol.types import Addr, Family

__all__ = [
    "Addr",
    "Command",
    "CreateAllocation",
    "CreateChannelBinding",
    "DeleteChannelBinding",
    "Family",
    "FreeAllocation",
    "SendMessage",
]
