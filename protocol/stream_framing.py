"""STUN and ChannelData on a byte stream (TURN over TCP and TLS, RFC 8656 §12.5).

A stream has no datagram boundaries: a message may arrive in pieces, or several in one read.
The first two bits of a frame tell the two kinds apart (00: STUN, 01: ChannelData), and each
carries its own length, so ``StreamFramer.feed`` cuts the stream into the frames the core takes
as datagrams. ChannelData on a stream is padded to a multiple of 4 bytes; the padding is
skipped on input and added on output (``channel_data_frame``).

Bounded: at most one unfinished frame is kept (less than ``MAX_FRAME`` bytes), and anything that
cannot start a frame (other first bits, a STUN length that is not a multiple of 4, no magic
cookie, a channel number outside 0x4000-0x4FFF) is a ``FramingError``: the stream cannot be
resynchronised, so the connection is closed.
"""

from __future__ import annotations

import struct

from firezone_relay.protocol.stun import COOKIE_BYTES

__all__ = ["MAX_FRAME", "FramingError", "StreamFramer", "channel_data_frame", "for_stream"]

#: the longest frame there can be: a STUN header and the largest length its 16-bit field allows
#: (a multiple of 4); padded ChannelData (4 + 65535 + 1) is shorter
MAX_FRAME = 20 + 0xFFFC

_HEADER = struct.Struct("!HH")
_PAD = (b"", b"\0\0\0", b"\0\0", b"\0")


class FramingError(ValueError):
    """The stream does not carry STUN or ChannelData: close the connection."""


class StreamFramer:
    """Splits a byte stream into STUN messages and ChannelData frames (without padding)."""

    __slots__ = ("_buffer", "max_frame")

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        if not 24 <= max_frame <= MAX_FRAME:
            raise ValueError("max_frame out of range")
        #: frames longer than this are a FramingError (the default allows every legal frame)
        self.max_frame = max_frame
        self._buffer = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes of an unfinished frame held (always less than ``max_frame`` + 3)."""
        return len(self._buffer)

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """The frames ``data`` completes, in order; the rest is kept for the next call.

        Raises FramingError as soon as the bytes seen cannot be the start of a frame."""
        buffer = self._buffer
        view: bytes | bytearray | memoryview
        if buffer:
            buffer += data
            view = buffer
        else:
            view = data  # the common case: no copy until a frame is cut out
        frames: list[bytes] = []
        pos = 0
        end = len(view)
        limit = self.max_frame
        while end - pos >= 4:
            first = view[pos]
            length = (view[pos + 2] << 8) | view[pos + 3]
            if first < 0x40:  # STUN
                if length & 3:
                    raise FramingError("STUN length not a multiple of 4")
                if end - pos >= 8 and view[pos + 4 : pos + 8] != COOKIE_BYTES:
                    raise FramingError("STUN message without the magic cookie")
                size = padded = 20 + length
            elif first < 0x50:  # ChannelData, channels 0x4000-0x4FFF
                size = 4 + length
                padded = (size + 3) & ~3
            else:
                raise FramingError("neither STUN nor ChannelData")
            if size > limit:
                raise FramingError("frame longer than allowed")
            if end - pos < padded:
                break
            frames.append(bytes(view[pos : pos + size]))
            pos += padded
        if view is buffer:
            del buffer[:pos]
        elif pos < end:
            buffer += view[pos:]
        return frames


def channel_data_frame(channel: int, data: bytes | memoryview) -> bytes:
    """ChannelData for a stream: the header, the data and padding to a multiple of 4."""
    return _HEADER.pack(channel, len(data)) + bytes(data) + _PAD[len(data) & 3]


def for_stream(frame: bytes) -> bytes:
    """A whole STUN message or ChannelData as a stream carries it: ChannelData padded to a
    multiple of 4 (the core builds some unpadded, as UDP allows), STUN as it is."""
    if frame and 0x40 <= frame[0] < 0x50:
        return frame + _PAD[len(frame) & 3]
    return frame
