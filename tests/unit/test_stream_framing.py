"""Framing STUN and ChannelData on a stream (RFC 8656 §12.5), and the PROXY protocol header:
every split of the bytes gives the same frames, and hostile bytes are an error, never a hang
or unbounded memory."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firezone_relay.protocol import stun
from firezone_relay.protocol.proxy_protocol import (
    MAX_V1_BYTES,
    MAX_V2_BYTES,
    V2_SIGNATURE,
    ProxyError,
    ProxyHeader,
    ProxyReader,
)
from firezone_relay.protocol.stream_framing import (
    MAX_FRAME,
    FramingError,
    StreamFramer,
    channel_data_frame,
    for_stream,
)

BINDING = stun.encode(stun.Method.BINDING, stun.Class.REQUEST, b"\x01" * 12, [])


def _allocate() -> bytes:
    return stun.encode(
        stun.Method.ALLOCATE,
        stun.Class.REQUEST,
        b"\x02" * 12,
        [(stun.Attr.REQUESTED_TRANSPORT, 17), (stun.Attr.SOFTWARE, "x")],
    )


def _frames() -> tuple[list[bytes], bytes]:
    """Frames as the core takes them, and the stream carrying them (padding included)."""
    frames = [
        BINDING,
        b"\x40\x00\x00\x03abc",
        _allocate(),
        b"\x4f\xff\x00\x00",
        b"\x40\x01\x00\x04wxyz",
    ]
    stream = BINDING + channel_data_frame(0x4000, b"abc") + _allocate()
    stream += channel_data_frame(0x4FFF, b"") + channel_data_frame(0x4001, b"wxyz")
    return frames, stream


def test_channel_data_is_padded_on_output() -> None:
    assert channel_data_frame(0x4000, b"abc") == b"\x40\x00\x00\x03abc\0"
    assert channel_data_frame(0x4000, b"abcd") == b"\x40\x00\x00\x04abcd"
    assert len(channel_data_frame(0x4000, b"a" * 65535)) % 4 == 0


def test_for_stream_pads_channel_data_only() -> None:
    assert for_stream(b"\x40\x00\x00\x03abc") == b"\x40\x00\x00\x03abc\0"
    assert for_stream(b"\x40\x00\x00\x04abcd") == b"\x40\x00\x00\x04abcd"
    assert for_stream(BINDING) == BINDING


def test_one_read_with_several_frames() -> None:
    frames, stream = _frames()
    framer = StreamFramer()
    assert framer.feed(stream) == frames
    assert framer.buffered == 0


def test_byte_by_byte() -> None:
    frames, stream = _frames()
    framer = StreamFramer()
    out: list[bytes] = []
    for i in range(len(stream)):
        out += framer.feed(stream[i : i + 1])
    assert out == frames and framer.buffered == 0


@given(st.lists(st.integers(min_value=0, max_value=200), max_size=30))
def test_every_split_gives_the_same_frames(cuts: list[int]) -> None:
    frames, stream = _frames()
    framer = StreamFramer()
    out: list[bytes] = []
    pos = 0
    for cut in cuts:
        out += framer.feed(memoryview(stream)[pos : pos + cut])
        pos += cut
    out += framer.feed(stream[pos:])
    assert out == frames


def test_the_largest_frames_are_accepted() -> None:
    framer = StreamFramer()
    data = b"\x40\x00\xff\xff" + b"x" * 65535 + b"\0"
    assert framer.feed(data) == [data[:-1]]
    big_stun = struct.pack("!HHI12s", 0x0001, 0xFFFC, stun.MAGIC_COOKIE, b"t" * 12) + bytes(65532)
    assert len(big_stun) == MAX_FRAME
    assert framer.feed(big_stun) == [big_stun]


def test_a_half_frame_is_held_within_bounds() -> None:
    framer = StreamFramer()
    assert framer.feed(b"\x40\x00\xff\xff" + b"x" * 1000) == []
    assert framer.buffered == 1004
    assert framer.feed(b"x" * 64535) == []  # one byte and the padding short
    assert framer.buffered < MAX_FRAME


@pytest.mark.parametrize(
    "junk",
    [
        b"\x80\x00\x00\x00",  # first bits 10
        b"\xc0\x00\x00\x00",  # first bits 11
        b"\x50\x00\x00\x00",  # reserved channel
        b"\x00\x01\x00\x02" + b"\0" * 16,  # STUN length not a multiple of 4
        b"\x00\x01\x00\x00\x21\x12\xa4\x43",  # no magic cookie
        b"POST / HTTP/1.1\r\n",  # ("GET " would be ChannelData of channel 0x4745)
        b"\x16\x03\x01\x02\x00",  # a TLS ClientHello on the TCP port
    ],
)
def test_what_cannot_start_a_frame_is_an_error(junk: bytes) -> None:
    with pytest.raises(FramingError):
        StreamFramer().feed(junk)


def test_an_error_after_good_frames() -> None:
    framer = StreamFramer()
    with pytest.raises(FramingError):
        framer.feed(BINDING + b"\xff\xff\xff\xff")


def test_a_lower_limit() -> None:
    framer = StreamFramer(max_frame=1500)
    with pytest.raises(FramingError):
        framer.feed(b"\x40\x00\x05\xdd")  # 4 + 1501


@given(st.binary(max_size=300), st.integers(min_value=1, max_value=64))
def test_random_bytes_never_escape_as_anything_but_framing_errors(data: bytes, step: int) -> None:
    framer = StreamFramer()
    try:
        for i in range(0, len(data), step):
            for frame in framer.feed(data[i : i + step]):
                assert len(frame) >= 4
    except FramingError:
        return
    assert framer.buffered < MAX_FRAME + 3


# -- PROXY protocol ------------------------------------------------------------------------


def _v2(command: int, family: int, body: bytes) -> bytes:
    return V2_SIGNATURE + struct.pack("!BBH", 0x20 | command, family, len(body)) + body


def _feed_all(data: bytes, step: int = 0) -> tuple[ProxyHeader, bytes]:
    reader = ProxyReader()
    if not step:
        result = reader.feed(data)
    else:
        result = None
        for i in range(0, len(data), step):
            if result is not None:  # the header is complete: the rest is the stream's
                return result[0], result[1] + data[i:]
            result = reader.feed(data[i : i + step])
    assert result is not None
    return result


@pytest.mark.parametrize("step", [0, 1, 7])
def test_proxy_v1(step: int) -> None:
    header, rest = _feed_all(b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n" + BINDING, step)
    assert header == ProxyHeader(("192.0.2.1", 56324), ("198.51.100.2", 443), 1)
    assert rest == BINDING
    header, rest = _feed_all(b"PROXY TCP6 2001:db8::0:1 2001:db8::2 1 3478\r\n")
    assert header.source == ("2001:db8::1", 1) and rest == b""
    header, _ = _feed_all(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n")
    assert header.source is None


@pytest.mark.parametrize("step", [0, 1, 5])
def test_proxy_v2_with_tlvs(step: int) -> None:
    addresses = bytes([192, 0, 2, 1, 198, 51, 100, 2]) + struct.pack("!HH", 50000, 443)
    tlvs = b"\x01\x00\x08stun.turn" + b"\x04\x00\x00"  # ALPN, then NOOP
    data = _v2(1, 0x11, addresses + tlvs) + b"\x16\x03\x01"
    header, rest = _feed_all(data, step)
    assert header == ProxyHeader(("192.0.2.1", 50000), ("198.51.100.2", 443), 2)
    assert rest == b"\x16\x03\x01"


def test_proxy_v2_ipv6_local_and_unspec() -> None:
    src = bytes.fromhex("20010db8000000000000000000000001")
    dst = bytes.fromhex("20010db8000000000000000000000002")
    header, _ = _feed_all(_v2(1, 0x21, src + dst + struct.pack("!HH", 1, 2)))
    assert header.source == ("2001:db8::1", 1) and header.destination == ("2001:db8::2", 2)
    header, rest = _feed_all(_v2(0, 0x00, b"") + BINDING)
    assert header == ProxyHeader(None, None, 2) and rest == BINDING
    header, _ = _feed_all(_v2(1, 0x31, b"\0" * 216))  # AF_UNIX
    assert header.source is None


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.0\r\n",
        BINDING,
        b"PROXY TCP4 192.0.2.1 198.51.100.2 56324\r\n",
        b"PROXY TCP4 2001:db8::1 198.51.100.2 1 2\r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.2 65536 2\r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.2 01 2\r\n",
        b"PROXY TCP4 192.0.2.1  198.51.100.2 1 2\r\n",
        b"PROXY UDP4 192.0.2.1 198.51.100.2 1 2\r\n",
        b"PROXY " + b"A" * MAX_V1_BYTES,
        b"PROXY TCP4 \xff\xfe 198.51.100.2 1 2\r\n",
        V2_SIGNATURE[:-1] + b"X",
        _v2(2, 0x11, bytes(12)),  # unknown command
        V2_SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12),  # version 1 in a v2 header
        _v2(1, 0x11, bytes(11)),  # addresses cut short
        _v2(1, 0x21, bytes(35)),
        V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, MAX_V2_BYTES),  # too long
    ],
)
def test_bad_proxy_headers_are_errors(data: bytes) -> None:
    with pytest.raises(ProxyError):
        ProxyReader().feed(data)


def test_proxy_reader_waits_for_the_rest() -> None:
    reader = ProxyReader()
    assert reader.feed(b"") is None
    assert reader.feed(b"PRO") is None
    assert reader.feed(V2_SIGNATURE[:0]) is None
    reader = ProxyReader()
    assert reader.feed(V2_SIGNATURE + b"\x21\x11\x00") is None


@given(st.binary(max_size=200))
def test_proxy_reader_on_random_bytes(data: bytes) -> None:
    reader = ProxyReader()
    try:
        reader.feed(data)
    except ProxyError:
        pass
