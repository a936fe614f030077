"""What the two per-datagram calls of the core return: where the I/O layer sends the bytes.

Routes are small typed tuples, told apart by type (never by length). The routes of bound
channels are built once, when the channel is bound, and handed out as they are for every
datagram; only the rarer cases (Send indications, padded ChannelData, the relay loop) build
one per datagram.
"""

from __future__ import annotations

from typing import NamedTuple, final

from firezone_relay.protocol.types import Addr, FiveTuple

#: the payload of unpadded ChannelData: everything after the 4-byte header
AFTER_HEADER = slice(4, None)


@final  # so a ``type(route) is ...`` test narrows the union in both branches
class ToPeer(NamedTuple):
    """Send ``data[span]`` (``data``: the datagram given to the core) to ``peer`` from the
    allocation socket on ``port`` of the peer's family."""

    port: int
    peer: Addr
    span: slice


@final
class ToClient(NamedTuple):
    """Peer traffic for a bound channel: write the ChannelData header ``(channel, len(data))``
    in front of the datagram and send both to ``client`` from the listen socket."""

    client: FiveTuple
    channel: int


@final
class LoopToClient(NamedTuple):
    """The relay loop (the peer is another allocation on this relay): rewrite the 4-byte
    ChannelData header at the start of the datagram to ``(channel, length)`` and send
    ``data[:4 + length]`` to ``client`` from the listen socket of its family."""

    client: FiveTuple
    channel: int
    length: int


#: what ``Server.handle_client_input`` returns for relayed data
ClientRoute = ToPeer | LoopToClient
