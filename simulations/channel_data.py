"""ChannelData messages (RFC 8656 §12.4) for tests and simulations: 2-byte channel, 2-byte
length, then the data. The relay itself parses only the header, on its hot paths."""

from __future__ import annotations

import struct

from firezone_relay.protocol.channel_data import MAX_CHANNEL, MIN_CHANNEL

HEADER = struct.Struct("!HH")


def is_valid_channel(number: int) -> bool:
    return MIN_CHANNEL <= number <= MAX_CHANNEL


def encode(channel: int, data: bytes) -> bytes:
    """A ChannelData message, unpadded (padding is optional over UDP)."""
    return HEADER.pack(channel, len(data)) + data


def decode(datagram: bytes | memoryview) -> tuple[int, bytes]:
    """``(channel, data)``; trailing bytes past the length field (padding) are ignored.

    Raises ValueError for a short datagram, a lying length or a channel outside the range.
    """
    if len(datagram) < 4:
        raise ValueError("shorter than a ChannelData header")
    channel, length = HEADER.unpack_from(datagram)
    if not is_valid_channel(channel):
        raise ValueError("channel number outside 0x4000-0x4FFF")
    if 4 + length > len(datagram):
        raise ValueError("length runs past the datagram")
    return channel, bytes(datagram[4 : 4 + length])
