"""A stand-in for the Firezone portal, as relays see it, for tests and demos.

It is a real websockets server speaking the portal's relay socket protocol (Phoenix V1 JSON
frames on ``/relay/websocket``): it authenticates the token (``X-Authorization: Bearer`` header
or legacy ``token`` query parameter), acknowledges ``phx_join`` on topic ``relay``, pushes
``init``, answers heartbeats, and mints TURN credentials for joined relays the way the portal
does for clients and gateways. Tests steer it through its methods and attributes (refuse with a
status, stop answering joins or heartbeats, drop connections, restart, push events) and assert
on what it recorded. Run ``python -m simulations.portal --port N --token T`` for a demo portal.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import ssl
import time
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from firezone_relay.protocol.auth import firezone_password, portal_salt

log = logging.getLogger("simulations.portal")

#: Gateways get relay credentials valid this long (`@relay_credentials_expire_in_hours`).
DEFAULT_CREDENTIAL_LIFETIME = 90 * 24 * 3600


@dataclass
class RecordedRequest:
    """One websocket upgrade request as the portal saw it."""

    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    status: int  # 101 when accepted
    at: float = field(default_factory=time.monotonic)


@dataclass
class RecordedFrame:
    """One websocket message; ``connection`` indexes :attr:`Portal.requests`."""

    connection: int
    inbound: bool  # True: from the relay
    data: str | bytes
    message: dict[str, Any] | None  # parsed JSON object, if it was one


@dataclass
class Relay:
    """A relay that joined, with what the portal keeps about it (presence)."""

    id: str
    stamp_secret: str
    ipv4: str | None
    ipv6: str | None
    port: int
    name: str | None
    user_agent: str | None
    connection: int
    online: bool = True

    def addrs(self) -> list[str]:
        out = []
        if self.ipv4:
            out.append(f"{self.ipv4}:{self.port}")
        if self.ipv6:
            out.append(f"[{self.ipv6}]:{self.port}")
        return out


@dataclass
class _Refusal:
    status: int
    retry_after: str | None
    body: str
    remaining: int | None  # None: until told otherwise


@dataclass
class _Conn:
    index: int
    ws: ServerConnection
    query: dict[str, str]
    headers: dict[str, str]
    relay: Relay | None = None
    joined_topics: set[str] = field(default_factory=set)


def relay_id(stamp_secret: str) -> str:
    """UUIDv4-shaped id derived from SHA-256(stamp_secret), like the portal at HEAD."""
    return str(uuid.UUID(bytes=hashlib.sha256(stamp_secret.encode()).digest()[:16], version=4))


def extract_token(query: dict[str, str], headers: dict[str, str]) -> str | None:
    """Header first (``X-Authorization: Bearer <t>``), then the legacy query parameter."""
    value = headers.get("x-authorization", "")
    if value.startswith("Bearer "):
        return value[len("Bearer ") :].strip()
    return query.get("token")


class Portal:
    """The fake portal; see the module docstring. Use as ``async with Portal(...) as portal``."""

    def __init__(
        self,
        token: str = "relay-token",
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
        idle_timeout: float | None = 41.0,
        credential_lifetime: int = DEFAULT_CREDENTIAL_LIFETIME,
        on_relay_joined: Callable[[Relay], None] | None = None,
    ) -> None:
        self.token = token
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.idle_timeout = idle_timeout
        self.credential_lifetime = credential_lifetime
        self.on_relay_joined = on_relay_joined
        #: "ok" (acknowledge), "error" (refuse) or "ignore" (never answer).
        self.join_reply = "ok"
        self.answer_heartbeats = True
        self.push_init = True
        self.requests: list[RecordedRequest] = []
        self.frames: list[RecordedFrame] = []
        self.relays: list[Relay] = []  # every join, oldest first
        self._refusal: _Refusal | None = None
        self._server: Server | None = None
        self._conns: dict[int, _Conn] = {}
        self._request_of: dict[uuid.UUID, int] = {}
        self._waiters: list[asyncio.Future[None]] = []

    # ---- lifecycle

    async def start(self) -> None:
        self._server = await serve(
            self._handler,
            self.host,
            self.port,
            process_request=self._process_request,
            ssl=self.ssl_context,
            ping_interval=None,
            compression=None,
            max_size=None,
        )
        if self.port == 0:
            self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and close every connection (1001), as a portal deploy would."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def __aenter__(self) -> Portal:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        scheme = "wss" if self.ssl_context is not None else "ws"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    # ---- control

    def refuse(
        self,
        status: int,
        *,
        retry_after: int | str | None = None,
        body: str = "",
        times: int | None = None,
    ) -> None:
        """Answer the next ``times`` upgrades (all, if None) with ``status``."""
        value = None if retry_after is None else str(retry_after)
        self._refusal = _Refusal(status, value, body, times)

    def accept(self) -> None:
        """Stop refusing upgrades."""
        self._refusal = None

    async def drop(self) -> None:
        """Cut every live connection at the TCP level, without a close frame."""
        for conn in list(self._conns.values()):
            conn.ws.transport.abort()

    async def close_connections(self, code: int = 1011, reason: str = "") -> None:
        """Close every live connection with a close frame."""
        for conn in list(self._conns.values()):
            with contextlib.suppress(Exception):
                await conn.ws.close(code, reason)

    async def push(self, event: str, payload: object, topic: str = "relay") -> None:
        """Push an event (``ref`` null) to every live connection."""
        await self.send_raw(
            _encode({"topic": topic, "event": event, "payload": payload, "ref": None})
        )

    async def send_raw(self, data: str | bytes) -> None:
        """Send ``data`` as is (text or binary) to every live connection."""
        for conn in list(self._conns.values()):
            await self._send(conn, data)

    async def send_phx_close(self) -> None:
        await self.push("phx_close", {})

    async def send_disconnect(self, reason: str = "token_expired") -> None:
        """What the portal does when the relay's token or group is deleted: push
        ``disconnect`` and stop the channel."""
        await self.push("disconnect", {"reason": reason})
        await self.send_phx_close()

    # ---- observing

    @property
    def live_connections(self) -> int:
        return len(self._conns)

    def connected_relays(self) -> list[Relay]:
        return [r for r in self.relays if r.online]

    def frames_from_relay(
        self, event: str | None = None, connection: int | None = None
    ) -> list[dict[str, Any]]:
        return [
            f.message
            for f in self.frames
            if f.inbound
            and f.message is not None
            and (event is None or f.message.get("event") == event)
            and (connection is None or f.connection == connection)
        ]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Wait until ``predicate()`` holds; it is re-checked whenever something is recorded."""
        async with asyncio.timeout(timeout):
            while not predicate():
                waiter = asyncio.get_running_loop().create_future()
                self._waiters.append(waiter)
                await waiter

    def credentials(
        self, public_key: str, *, expires_at: int | None = None, relays: list[Relay] | None = None
    ) -> list[dict[str, Any]]:
        """TURN credentials for a client or gateway with ``public_key``: one entry per relay
        address family, as the portal renders them in ``init`` / ``relays_presence``."""
        expiry = (
            expires_at if expires_at is not None else int(time.time()) + self.credential_lifetime
        )
        salt = portal_salt(public_key)
        username = f"{expiry}:{salt}"
        out: list[dict[str, Any]] = []
        for relay in self.connected_relays() if relays is None else relays:
            password = firezone_password(relay.stamp_secret, expiry, salt)
            for addr in relay.addrs():
                out.append(
                    {
                        "id": relay.id,
                        "type": "turn",
                        "addr": addr,
                        "username": username,
                        "password": password,
                        "expires_at": expiry,
                    }
                )
        return out

    # ---- websocket server

    def _process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        parts = urllib.parse.urlsplit(request.path)
        query = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
        headers = {k.lower(): v for k, v in request.headers.raw_items()}
        response = self._check(ws, parts.path, query, headers)
        status = 101 if response is None else response.status_code
        self.requests.append(RecordedRequest(parts.path, query, headers, status))
        if response is None:
            self._request_of[ws.id] = len(self.requests) - 1
        self._notify()
        return response

    def _check(
        self, ws: ServerConnection, path: str, query: dict[str, str], headers: dict[str, str]
    ) -> Response | None:
        refusal = self._refusal
        if refusal is not None:
            if refusal.remaining is not None:
                refusal.remaining -= 1
                if refusal.remaining <= 0:
                    self._refusal = None
            response = ws.respond(refusal.status, refusal.body)
            if refusal.retry_after is not None:
                response.headers["Retry-After"] = refusal.retry_after
            return response
        if not path.endswith("/relay/websocket"):
            return ws.respond(404, "Not Found")
        token = extract_token(query, headers)
        if token is None:
            return ws.respond(401, "Missing token")
        if token != self.token:
            return ws.respond(401, "Invalid token")
        if not query.get("ipv4") and not query.get("ipv6"):
            return ws.respond(422, "missing_ip")
        port = query.get("port", "3478")
        if not port.isdigit() or not 0 < int(port) < 65536:
            return ws.respond(422, "invalid port")
        return None

    async def _handler(self, ws: ServerConnection) -> None:
        index = self._request_of.pop(ws.id)
        request = self.requests[index]
        conn = _Conn(index, ws, request.query, request.headers)
        self._conns[index] = conn
        self._notify()
        try:
            while True:
                try:
                    async with asyncio.timeout(self.idle_timeout):
                        data = await ws.recv()
                except TimeoutError:
                    await ws.close(1000, "idle timeout")
                    break
                await self._on_frame(conn, data)
        except ConnectionClosed:
            pass
        finally:
            del self._conns[index]
            if conn.relay is not None:
                conn.relay.online = False
            self._notify()

    async def _on_frame(self, conn: _Conn, data: str | bytes) -> None:
        message: dict[str, Any] | None = None
        if isinstance(data, str):
            with contextlib.suppress(ValueError, RecursionError):
                parsed = json.loads(data)
                if isinstance(parsed, dict):
                    message = parsed
        self.frames.append(RecordedFrame(conn.index, True, data, message))
        self._notify()
        if message is None:
            log.warning("Ignoring undecodable frame from relay %d", conn.index)
            return
        topic, event = message.get("topic"), message.get("event")
        payload, ref = message.get("payload"), message.get("ref")
        if topic == "phoenix" and event == "heartbeat":
            if self.answer_heartbeats:
                await self._reply(conn, "phoenix", ref, "ok", {})
        elif event == "phx_join":
            await self._on_join(conn, topic, payload, ref)
        elif isinstance(topic, str) and topic in conn.joined_topics:
            await self._reply(conn, topic, ref, "error", {"reason": "unknown_message"})
        else:
            await self._reply(conn, str(topic), ref, "error", {"reason": "unmatched topic"})

    async def _on_join(self, conn: _Conn, topic: object, payload: object, ref: object) -> None:
        if topic != "relay":
            await self._reply(conn, str(topic), ref, "error", {"reason": "unmatched topic"})
            return
        if self.join_reply == "ignore":
            return
        secret = payload.get("stamp_secret") if isinstance(payload, dict) else None
        if self.join_reply != "ok" or not isinstance(secret, str) or not secret:
            await self._reply(conn, "relay", ref, "error", {"reason": "join refused"})
            return
        await self._reply(conn, "relay", ref, "ok", {})
        conn.joined_topics.add("relay")
        request = self.requests[conn.index]
        relay = Relay(
            id=relay_id(secret),
            stamp_secret=secret,
            ipv4=request.query.get("ipv4") or None,
            ipv6=request.query.get("ipv6") or None,
            port=int(request.query.get("port", "3478")),
            name=request.query.get("name"),
            user_agent=request.headers.get("user-agent"),
            connection=conn.index,
        )
        for old in self.relays:  # a re-join replaces the presence of the same relay
            if old.online and old.id == relay.id:
                old.online = False
        conn.relay = relay
        self.relays.append(relay)
        self._notify()
        if self.push_init:
            await self._send(
                conn, _encode({"topic": "relay", "event": "init", "payload": {}, "ref": None})
            )
        if self.on_relay_joined is not None:
            self.on_relay_joined(relay)

    async def _reply(
        self, conn: _Conn, topic: str, ref: object, status: str, response: object
    ) -> None:
        payload = {"status": status, "response": response}
        await self._send(
            conn, _encode({"topic": topic, "event": "phx_reply", "payload": payload, "ref": ref})
        )

    async def _send(self, conn: _Conn, data: str | bytes) -> None:
        message = None
        if isinstance(data, str):
            with contextlib.suppress(ValueError, RecursionError):
                parsed = json.loads(data)
                message = parsed if isinstance(parsed, dict) else None
        self.frames.append(RecordedFrame(conn.index, False, data, message))
        self._notify()
        with contextlib.suppress(ConnectionClosed):
            await conn.ws.send(data)

    def _notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


def _encode(message: dict[str, Any]) -> str:
    return json.dumps(message, separators=(",", ":"))


# ---- command line


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m simulations.portal", description="A fake Firezone portal for relays."
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8081)
    p.add_argument("--token", required=True, help="the relay token to accept")
    p.add_argument(
        "--public-key",
        default="demo-client-public-key",
        help="mint credentials for a client with this public key",
    )
    p.add_argument("--lifetime", type=int, default=DEFAULT_CREDENTIAL_LIFETIME)
    p.add_argument("--tls-cert", help="serve wss with this certificate (PEM)")
    p.add_argument("--tls-key", help="private key for --tls-cert")
    return p.parse_args(argv)


async def _serve_forever(args: argparse.Namespace) -> None:
    ctx = None
    if args.tls_cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.tls_cert, args.tls_key)

    def joined(relay: Relay) -> None:
        print(
            f"relay joined: id={relay.id} name={relay.name} addrs={','.join(relay.addrs())} "
            f"ua={relay.user_agent!r}",
            flush=True,
        )
        creds = portal.credentials(args.public_key, relays=[relay])
        print(f"credentials for public key {args.public_key!r}:", flush=True)
        for entry in creds:
            print(json.dumps(entry), flush=True)

    portal = Portal(
        args.token,
        host=args.host,
        port=args.port,
        ssl_context=ctx,
        credential_lifetime=args.lifetime,
        on_relay_joined=joined,
    )
    async with portal:
        print(f"portal listening on {portal.url}/relay/websocket", flush=True)
        print(f"relay: FIREZONE_API_URL={portal.url} FIREZONE_TOKEN={args.token}", flush=True)
        print(
            f"clients: credentials are minted for public key {args.public_key!r} "
            f"(salt {portal_salt(args.public_key)}) when a relay joins",
            flush=True,
        )
        await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_forever(_parse_args(argv)))


if __name__ == "__main__":
    main()
