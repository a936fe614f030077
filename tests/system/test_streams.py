"""The stream listeners (``actors.streams``) on real loopback sockets, in this process: framing
across reads, TLS with ALPN and its minimum version, PROXY v1/v2 from trusted sources only, TLS
after a PROXY header in the same segment, certificate reload under open connections, and the
bounds (caps, handshake and idle timeouts, the write buffer)."""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop

from firezone_relay.actors.streams import StreamConnection, StreamOptions, Streams
from firezone_relay.actors.tls import TlsConfigError, TlsContexts
from firezone_relay.protocol import stun
from firezone_relay.protocol.proxy_protocol import V2_SIGNATURE
from firezone_relay.protocol.stream_framing import channel_data_frame
from tests.system.tls_files import make_cert

pytestmark = pytest.mark.system

BINDING = stun.encode(stun.Method.BINDING, stun.Class.REQUEST, b"\x07" * 12, [])


class Sink:
    """Records frames; answers every frame by echoing it, padded as the relay would."""

    def __init__(self) -> None:
        self.frames: list[tuple[StreamConnection, bytes]] = []
        self.closed: list[StreamConnection] = []
        self.allocated: set[StreamConnection] = set()
        self.echo = True

    def stream_frames(self, conn: StreamConnection, frames: list[bytes]) -> None:
        for frame in frames:
            self.frames.append((conn, frame))
            if self.echo:
                if frame[0] >= 0x40:
                    conn.send(channel_data_frame(int.from_bytes(frame[:2], "big"), frame[4:]))
                else:
                    conn.send(frame)

    def stream_closed(self, conn: StreamConnection) -> None:
        self.closed.append(conn)

    def stream_has_allocation(self, conn: StreamConnection) -> bool:
        return conn in self.allocated


def run(body: Callable[[], Awaitable[None]]) -> None:
    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(asyncio.wait_for(body(), 30))
    finally:
        loop.close()


async def blocking(fn: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def connect(port: int, prefix: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    if prefix:
        sock.sendall(prefix)
    return sock


def recv_exact(sock: socket.socket | ssl.SSLSocket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError(f"closed after {len(out)} of {n} bytes")
        out += chunk
    return out


def closed_by_peer(sock: socket.socket | ssl.SSLSocket) -> bool:
    """True once the relay closes (EOF or reset) within the socket's timeout."""
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, ssl.SSLError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return True


def client_context(cafile: Path, alpn: bool = True) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(cafile))
    if alpn:
        context.set_alpn_protocols(["stun.turn"])
    return context


def tls_connect(port: int, cafile: Path, prefix: bytes = b"", alpn: bool = True) -> Any:
    """A TLS client whose first segment is ``prefix`` followed by its ClientHello."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_context(cafile, alpn).wrap_bio(incoming, outgoing, server_hostname="localhost")
    first = True
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            sock.sendall((prefix if first else b"") + outgoing.read())
            first = False
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("closed during the handshake") from None
            incoming.write(data)
    if outgoing.pending:
        sock.sendall(outgoing.read())
    return _BioClient(sock, tls, incoming, outgoing)


class _BioClient:
    def __init__(self, sock: socket.socket, tls: ssl.SSLObject, i: ssl.MemoryBIO, o: ssl.MemoryBIO):
        self.sock, self.tls, self.incoming, self.outgoing = sock, tls, i, o

    def sendall(self, data: bytes) -> None:
        self.tls.write(data)
        self.sock.sendall(self.outgoing.read())

    def recv(self, n: int) -> bytes:
        while True:
            try:
                return self.tls.read(n)
            except ssl.SSLWantReadError:
                data = self.sock.recv(65536)
                if not data:
                    return b""
                self.incoming.write(data)

    def close(self) -> None:
        self.sock.close()


async def start(sink: Sink, tls: TlsContexts | None = None, **options: Any) -> tuple[Streams, int]:
    streams = Streams(asyncio.get_running_loop(), StreamOptions(**options), sink)
    listener = await streams.listen("127.0.0.1", 0, tls)
    return streams, listener.port


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, Path]:
    d = tmp_path_factory.mktemp("streams-tls")
    return (*make_cert(d, "a", "relay-a"), *make_cert(d, "b", "relay-b"))


def test_tcp_frames_across_reads_and_padded_answers() -> None:
    sink = Sink()

    async def body() -> None:
        streams, port = await start(sink)

        def client() -> None:
            sock = connect(port)
            stream = BINDING + channel_data_frame(0x4000, b"abcde") + BINDING
            for i in range(len(stream)):  # one byte per segment at worst
                sock.sendall(stream[i : i + 1])
            assert recv_exact(sock, len(stream)) == stream
            sock.close()

        await blocking(client)
        await asyncio.sleep(0.05)
        assert [f for _, f in sink.frames] == [BINDING, b"\x40\x00\x00\x05abcde", BINDING]
        conn = sink.frames[0][0]
        assert conn.transport_name == "tcp" and conn.client[0] == "127.0.0.1"
        assert sink.closed == [conn] and not streams.connections
        streams.close()

    run(body)


def test_garbage_closes_the_connection() -> None:
    sink = Sink()

    async def body() -> None:
        streams, port = await start(sink)
        sock = connect(port, b"\xff" * 8)
        assert await blocking(closed_by_peer, sock)
        assert streams.protocol_errors == 1 and not streams.connections
        streams.close()

    run(body)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_tls_with_alpn_and_its_minimum_version(certs: tuple[Path, ...]) -> None:
    cert, key = certs[0], certs[1]
    sink = Sink()

    async def body() -> None:
        tls = TlsContexts(str(cert), str(key))
        streams, port = await start(sink, tls)

        def client() -> None:
            c = tls_connect(port, cert)
            assert c.tls.selected_alpn_protocol() == "stun.turn"
            assert c.tls.version() in ("TLSv1.2", "TLSv1.3")
            c.sendall(BINDING + channel_data_frame(0x4001, b"x"))
            assert recv_exact(c, len(BINDING) + 8) == BINDING + b"\x40\x01\x00\x01x\0\0\0"
            c.close()
            # without ALPN the session still works (browsers vary)
            c = tls_connect(port, cert, alpn=False)
            assert c.tls.selected_alpn_protocol() is None
            c.close()
            old = client_context(cert)
            old.minimum_version = ssl.TLSVersion.TLSv1
            old.maximum_version = ssl.TLSVersion.TLSv1_1
            old.set_ciphers("ALL:@SECLEVEL=0")
            with pytest.raises((ssl.SSLError, ConnectionError)):
                old.wrap_socket(connect(port), server_hostname="localhost")

        await blocking(client)
        await asyncio.sleep(0.05)
        assert sink.frames[0][0].transport_name == "tls"
        assert sink.frames[0][0].alpn == "stun.turn"
        assert streams.protocol_errors >= 1
        streams.close()

    run(body)


def _v1(host: str, port: int) -> bytes:
    return f"PROXY TCP4 {host} 127.0.0.1 {port} 3478\r\n".encode()


def _v2(host: str, port: int) -> bytes:
    body = socket.inet_aton(host) + socket.inet_aton("127.0.0.1") + struct.pack("!HH", port, 443)
    body += b"\x03\x00\x04abcd"  # a CRC32C TLV, skipped
    return V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, len(body)) + body


@pytest.mark.parametrize("header", [_v1, _v2], ids=["v1", "v2"])
def test_proxy_header_from_a_trusted_source(header: Callable[[str, int], bytes]) -> None:
    sink = Sink()

    async def body() -> None:
        streams, port = await start(sink, proxy_from=("127.0.0.0/8",))

        def client() -> None:
            sock = connect(port, header("198.51.100.7", 40000) + BINDING)
            assert recv_exact(sock, len(BINDING)) == BINDING
            sock.close()
            sock = connect(port, BINDING)  # no header from a trusted source: closed
            assert closed_by_peer(sock)

        await blocking(client)
        assert sink.frames[0][0].client == ("198.51.100.7", 40000)
        assert sink.frames[0][0].peer[0] == "127.0.0.1"
        assert len(sink.frames) == 1 and streams.protocol_errors == 1
        streams.close()

    run(body)


def test_proxy_header_from_an_untrusted_source_is_never_believed() -> None:
    sink = Sink()

    async def body() -> None:
        streams, port = await start(sink, proxy_from=("192.0.2.0/24",))
        for header in (_v1("198.51.100.7", 1), _v2("198.51.100.7", 1)):
            sock = await blocking(connect, port, header + BINDING)
            assert await blocking(closed_by_peer, sock)
        assert not sink.frames and streams.protocol_errors == 2
        streams.close()

    run(body)


def test_tls_after_a_proxy_v2_header_in_the_same_segment(certs: tuple[Path, ...]) -> None:
    cert, key = certs[0], certs[1]
    sink = Sink()

    async def body() -> None:
        tls = TlsContexts(str(cert), str(key))
        streams, port = await start(sink, tls, proxy_from=("127.0.0.1/32",))

        def client() -> None:
            c = tls_connect(port, cert, prefix=_v2("203.0.113.9", 5555))
            c.sendall(BINDING)
            assert recv_exact(c, len(BINDING)) == BINDING
            c.close()

        await blocking(client)
        assert sink.frames[0][0].client == ("203.0.113.9", 5555)
        assert sink.frames[0][0].transport_name == "tls"
        streams.close()

    run(body)


def test_certificate_reload_under_open_connections(certs: tuple[Path, ...], tmp_path: Path) -> None:
    cert_a, key_a, cert_b, key_b = certs
    live_cert, live_key = tmp_path / "cert.pem", tmp_path / "key.pem"
    live_cert.write_bytes(cert_a.read_bytes())
    live_key.write_bytes(key_a.read_bytes())
    sink = Sink()

    async def body() -> None:
        tls = TlsContexts(str(live_cert), str(live_key))
        streams, port = await start(sink, tls)
        old = await blocking(tls_connect, port, cert_a)
        live_cert.write_bytes(cert_b.read_bytes())
        live_key.write_bytes(key_b.read_bytes())
        assert tls.reload() is None

        def after_reload() -> None:
            old.sendall(BINDING)  # the open connection stays, on its old session
            assert recv_exact(old, len(BINDING)) == BINDING
            with pytest.raises(ssl.SSLError):
                tls_connect(port, cert_a)  # new connections get the new certificate
            tls_connect(port, cert_b).close()

        await blocking(after_reload)
        # a bad file keeps the current certificate, with one error
        live_key.write_text("not a key\n")
        error = tls.reload()
        assert error is not None and "key.pem" in error
        assert tls.reloads == 1 and tls.reload_failures == 1
        await blocking(lambda: tls_connect(port, cert_b).close())
        old.close()
        streams.close()

    run(body)


def test_bad_certificate_files_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(TlsConfigError, match=r"missing\.pem"):
        TlsContexts(str(tmp_path / "missing.pem"), str(tmp_path / "missing-key.pem"))
    (tmp_path / "junk.pem").write_text("junk")
    with pytest.raises(TlsConfigError, match=r"junk\.pem"):
        TlsContexts(str(tmp_path / "junk.pem"), str(tmp_path / "junk.pem"))


def test_connection_caps_total_and_per_source() -> None:
    sink = Sink()

    async def body() -> None:
        streams, port = await start(sink, max_per_source=2, max_connections=3)
        a = await blocking(connect, port)
        b = await blocking(connect, port)
        c = await blocking(connect, port)  # third from 127.0.0.1: refused
        assert await blocking(closed_by_peer, c)
        assert len(streams.connections) == 2 and streams.refused == 1
        a.close()
        await asyncio.sleep(0.05)
        d = await blocking(connect, port, BINDING)  # room again
        assert await blocking(recv_exact, d, len(BINDING)) == BINDING
        for s in (b, d):
            s.close()
        streams.close()

    run(body)


def test_handshake_and_idle_timeouts(certs: tuple[Path, ...]) -> None:
    cert, key = certs[0], certs[1]
    sink = Sink()

    async def body() -> None:
        tls = TlsContexts(str(cert), str(key))
        streams = Streams(
            asyncio.get_running_loop(),
            StreamOptions(handshake_timeout=0.3, idle_timeout=0.6),
            sink,
        )
        tls_port = (await streams.listen("127.0.0.1", 0, tls)).port
        tcp_port = (await streams.listen("127.0.0.1", 0)).port
        silent_tls = await blocking(connect, tls_port, b"\x16\x03\x01")  # a hello that stops
        half_frame = await blocking(connect, tcp_port, b"\x40\x00\xff\xff" + b"x" * 100)
        holder = await blocking(connect, tcp_port, BINDING)
        await blocking(recv_exact, holder, len(BINDING))
        sink.allocated.add(sink.frames[-1][0])  # this one holds an allocation
        assert await blocking(closed_by_peer, silent_tls)
        assert await blocking(closed_by_peer, half_frame)
        assert streams.timeouts == 2
        await asyncio.sleep(1.0)  # past two idle periods: the allocation keeps it open
        holder.sendall(BINDING)
        assert await blocking(recv_exact, holder, len(BINDING)) == BINDING
        holder.close()
        streams.close()

    run(body)


def test_a_client_that_does_not_read_loses_frames_not_memory() -> None:
    sink = Sink()
    sink.echo = False

    async def body() -> None:
        streams, port = await start(sink, max_write_buffer=65536)
        sock = await blocking(connect, port, BINDING)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        while not sink.frames:
            await asyncio.sleep(0.01)
        conn = sink.frames[0][0]
        frame = channel_data_frame(0x4000, b"y" * 1200)
        sent = sum(conn.send(frame) for _ in range(20_000))  # 24 MB offered
        assert streams.dropped == 20_000 - sent > 0
        assert conn.transport is not None
        assert conn.transport.get_write_buffer_size() <= 65536
        sock.close()
        streams.close()

    run(body)
