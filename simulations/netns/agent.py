"""A NAT-test agent: a TURN client that behaves like Firezone's clients and gateways, and a
TUN tunnel whose IP packets ride its TURN channel, so ordinary TCP runs through the relay.

Run inside a network namespace::

    python -m simulations.netns.agent --name client --server 10.99.0.10:3478 --dual \\
        --username U --password P --tun fzt0 --tun-addr 100.64.0.1/24 \\
        --signal /tmp/hub.sock --peer-family 4

TURN behaviour, after connlib's ``snownet`` allocation:

* Binding first (server-reflexive address), then Allocate signed with USERNAME and
  MESSAGE-INTEGRITY but no NONCE; the 401 gives REALM and NONCE and the request is signed
  again. A 438 gives a new nonce and the request is repeated. A 401 to a request that carried
  a nonce means the credentials are bad: they are dropped, the allocation is forgotten, and
  the agent waits for new credentials (``credentials`` command, as the portal pushes them).
* REQUESTED-TRANSPORT UDP, ADDITIONAL-ADDRESS-FAMILY IPv6 on dual-stack relays (Allocate and
  Refresh, as connlib sends them).
* The allocation is refreshed at half its lifetime; a 437 to Refresh (or ChannelBind) means
  the relay lost it, so the agent allocates again. Channels with traffic are re-bound at half
  their 10-minute lifetime. ``--refresh-scale`` shrinks both periods so tests exercise them.
* Requests are retransmitted with a doubling timeout (same bytes, same transaction id).
* When nothing has come from the relay for ``--probe-after`` seconds the allocation is
  refreshed at once: that is how the agent notices a restarted relay (connlib learns it from
  failing connections and the portal).

``--transport tcp`` or ``tls`` reaches the relay over one TCP (or TLS, certificate not checked:
a lab) connection instead of UDP, as a browser behind a UDP-blocking firewall does: the same
messages, framed on the stream (RFC 8656 §12.5); relaying to the partner stays UDP.

Without ``--allocate`` the agent only learns its server-reflexive address and exchanges raw
UDP with the partner's relayed address (a gateway reachable through its NAT). The partner's
addresses arrive from the signalling hub (``simulations.netns.signalling``); the agent binds a
channel to the partner's relayed address (or server-reflexive address, if the partner does not
allocate) in ``--peer-family``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import socket
import ssl
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from firezone_relay.protocol import stun
from firezone_relay.protocol.channel_data import MAX_CHANNEL, MIN_CHANNEL
from firezone_relay.protocol.stream_framing import StreamFramer
from firezone_relay.protocol.stun import Attr, Class, Method
from firezone_relay.protocol.types import Addr, Family
from simulations.netns import tun
from simulations.turn_client import TurnClient

log = logging.getLogger("agent")

CHANNEL_LIFETIME = 600.0
INITIAL_RTO = 0.5
MAX_RTO = 4.0  # a lossy path must not leave a request waiting long between tries
MAX_TRANSMISSIONS = 9  # sent at 0, 0.5, 1.5, 3.5, 7.5 ... 23.5 s; given up at 27.5 s
HEADER = struct.Struct("!HH")
METHOD_NAMES = {
    Method.BINDING: "binding",
    Method.ALLOCATE: "allocate",
    Method.REFRESH: "refresh",
    Method.CHANNEL_BIND: "channelbind",
}


@dataclass
class Config:
    name: str
    server: Addr
    signal_path: str
    tun_name: str
    tun_addrs: list[str]
    username: str | None = None
    password: str | None = None
    allocate: bool = True
    dual: bool = False
    peer_family: int = 4
    bind: str | None = None
    refresh_scale: float = 1.0
    probe_after: float = 25.0
    keepalive: float = 1.0
    mtu: int = tun.DEFAULT_MTU
    transport: str = "udp"


@dataclass
class Pending:
    method: int
    data: bytes
    sent_at: float
    rto: float
    transmissions: int
    had_nonce: bool
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Channel:
    peer: Addr
    bound: bool = False
    bound_at: float = 0.0
    last_rx: float = 0.0


def parse_addr(text: str) -> Addr:
    """``1.2.3.4:5`` or ``[::1]:5``."""
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def family_key(host: str) -> str:
    return "6" if ":" in host else "4"


class Agent:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.loop = asyncio.get_running_loop()
        self.rng = random.Random()
        self.turn: TurnClient | None = None
        if cfg.username is not None and cfg.password is not None:
            self.turn = TurnClient(cfg.username, cfg.password, rng=self.rng)
        self.sock: socket.socket | None = None
        #: over TCP/TLS: the stream's framer and what waits for the socket to take it
        self.framer = StreamFramer()
        self.outgoing = bytearray()
        self.tun_fd = -1
        self.pending: dict[bytes, Pending] = {}
        self.relayed: dict[str, Addr] = {}
        self.srflx: dict[str, Addr] = {}
        self.allocated_at = 0.0
        self.lifetime = 0.0
        self.channels: dict[int, Channel] = {}
        self.channel_retry_at = 0.0
        self.peer: dict[str, Any] | None = None
        self.target: Addr | None = None
        self.last_rx_relay = time.monotonic()
        self.next_allocate_at = 0.0
        self.allocate_backoff = 0.5
        self.next_keepalive = 0.0
        self.writer: asyncio.StreamWriter | None = None
        self.done = asyncio.Event()
        self.stats = {
            "tun_rx": 0,
            "tun_tx": 0,
            "udp_tx": 0,
            "udp_rx": 0,
            "tun_write_drops": 0,
            "udp_send_drops": 0,
            "no_channel_drops": 0,
            "unknown_rx": 0,
        }

    # -- setup -----------------------------------------------------------------------------

    async def run(self) -> None:
        cfg = self.cfg
        self.tun_fd = tun.open_tun(cfg.tun_name)
        tun.configure(cfg.tun_name, cfg.tun_addrs, cfg.mtu)
        self.loop.add_reader(self.tun_fd, self._on_tun)
        self._open_socket(cfg.bind)
        reader, self.writer = await asyncio.open_unix_connection(cfg.signal_path)
        self._send_hub({"type": "hello", "name": cfg.name})
        self.event("ready", tun=cfg.tun_name, local=self._local())
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self.done.set)
        self._start_turn()
        tick = asyncio.ensure_future(self._ticker())
        hub = asyncio.ensure_future(self._hub_reader(reader))
        await self.done.wait()
        tick.cancel()
        hub.cancel()
        self._close_socket()
        self.loop.remove_reader(self.tun_fd)
        os.close(self.tun_fd)

    def _open_socket(self, bind: str | None) -> None:
        if self.cfg.transport != "udp":
            self._open_stream(bind)
            return
        fam = socket.AF_INET6 if ":" in self.cfg.server[0] else socket.AF_INET
        sock = socket.socket(fam, socket.SOCK_DGRAM)
        if fam == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
        sock.bind((bind or ("::" if fam == socket.AF_INET6 else "0.0.0.0"), 0))
        sock.setblocking(False)
        self.sock = sock
        self.loop.add_reader(sock.fileno(), self._on_udp)

    def _open_stream(self, bind: str | None) -> None:
        """One connection to the relay (blocking connect and handshake: bounded, at start)."""
        source = (bind, 0) if bind else None
        sock = socket.create_connection(self.cfg.server, timeout=5, source_address=source)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.cfg.transport == "tls":
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            context.set_alpn_protocols(["stun.turn"])
            sock = context.wrap_socket(sock)
        sock.setblocking(False)
        self.framer = StreamFramer()
        self.outgoing.clear()
        self.sock = sock
        self.loop.add_reader(sock.fileno(), self._on_stream)

    def _close_socket(self) -> None:
        if self.sock is not None:
            self.loop.remove_reader(self.sock.fileno())
            if self.outgoing:
                self.loop.remove_writer(self.sock.fileno())
                self.outgoing.clear()
            self.sock.close()
            self.sock = None

    def _local(self) -> str:
        if self.sock is None:
            return ""
        host, port = self.sock.getsockname()[:2]
        return f"{host}:{port}"

    # -- the hub ---------------------------------------------------------------------------

    def _send_hub(self, msg: dict[str, Any]) -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write((json.dumps(msg) + "\n").encode())

    def event(self, name: str, **fields: Any) -> None:
        log.info("%s %s", name, fields)
        self._send_hub({"type": "event", "event": name, **fields})

    def _publish_candidates(self) -> None:
        self._send_hub(
            {
                "type": "candidates",
                "relay": {k: list(v) for k, v in self.relayed.items()},
                "srflx": {k: list(v) for k, v in self.srflx.items()},
                "allocates": self.cfg.allocate,
            }
        )

    async def _hub_reader(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                try:
                    msg = json.loads(line)
                    self._on_command(msg)
                except Exception as exc:  # a bad command must not kill the tunnel
                    log.exception("bad command %r", line)
                    self.event("command_failed", error=str(exc))
        finally:
            log.info("signalling hub gone, exiting")
            self.done.set()

    def _on_command(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "peer":
            self.peer = msg
            self._choose_target()
        elif kind == "credentials":
            self.turn = TurnClient(msg["username"], msg["password"], rng=self.rng)
            self.event("credentials_updated", username=msg["username"])
            # like connlib's update_credentials: refresh (or allocate) with the new ones
            if self.relayed:
                self._send_refresh()
            else:
                self._invalidate("new credentials")
                self.next_allocate_at = 0.0
                self._start_turn()
        elif kind == "roam":
            self._roam(msg.get("bind"))
        elif kind == "stats":
            self.event(
                "stats",
                **self.stats,
                channels={f"{n:#x}": [list(c.peer), c.bound] for n, c in self.channels.items()},
                relayed=self.relayed,
                target=self.target and list(self.target),
            )
        elif kind == "refresh":
            self._send_refresh()
        else:
            self.event("unknown_command", command=kind)

    def _choose_target(self) -> None:
        peer = self.peer or {}
        fam = str(self.cfg.peer_family)
        relay = peer.get("relay", {}).get(fam)
        srflx = peer.get("srflx", {}).get(fam)
        # Relayed candidates when the partner allocates (it will publish one), else its
        # server-reflexive address; an agent without allocation can only use relayed ones.
        chosen = relay if peer.get("allocates", True) or not self.cfg.allocate else srflx
        target = (chosen[0], int(chosen[1])) if chosen else None
        if target != self.target:
            self.target = target
            self.next_keepalive = 0.0
            if target is not None and not self.cfg.allocate:
                # open our NAT towards it before the partner's first packet arrives, or the
                # NAT may pick another port for us (the relay's packet took ours)
                self._keepalive(time.monotonic())
            self.event("target", peer=target and list(target))
            self._ensure_channel()

    # -- TURN ------------------------------------------------------------------------------

    def _start_turn(self) -> None:
        """Binding first (srflx), then Allocate once it answers, as connlib does."""
        if not any(p.method == Method.BINDING for p in self.pending.values()):
            self._send(
                Method.BINDING,
                stun.encode(Method.BINDING, Class.REQUEST, self.rng.randbytes(12), []),
                False,
            )

    def _send_allocate(self) -> None:
        if self.turn is None or not self.cfg.allocate:
            return
        if any(p.method == Method.ALLOCATE for p in self.pending.values()):
            return
        self._send_signed(Method.ALLOCATE, self._allocate_attrs())

    def _allocate_attrs(self) -> list[tuple[int, object]]:
        attrs: list[tuple[int, object]] = [(Attr.REQUESTED_TRANSPORT, 17)]
        if self.cfg.dual:
            attrs.append((Attr.ADDITIONAL_ADDRESS_FAMILY, Family.V6))
        return attrs

    def _send_refresh(self) -> None:
        if self.turn is None or any(p.method == Method.REFRESH for p in self.pending.values()):
            return
        self._send_signed(Method.REFRESH, self._allocate_attrs())

    def _send_signed(
        self, method: int, attrs: list[tuple[int, object]], info: dict[str, Any] | None = None
    ) -> None:
        assert self.turn is not None
        data = self.turn.request(method, attrs)
        self._send(method, data, self.turn.nonce is not None, info)

    def _send(
        self, method: int, data: bytes, had_nonce: bool, info: dict[str, Any] | None = None
    ) -> None:
        tid = data[8:20]
        now = time.monotonic()
        if self.sock is None and self.cfg.transport != "udp":  # the relay closed it: again
            try:
                self._open_stream(self.cfg.bind)
            except OSError as exc:
                log.info("cannot reconnect to the relay: %s", exc)
        self.pending[tid] = Pending(method, data, now, INITIAL_RTO, 1, had_nonce, info or {})
        self._sendto(data, self.cfg.server)

    def _sendto(self, data: bytes, dest: Addr) -> None:
        if self.sock is None:
            return
        if self.cfg.transport != "udp" and dest == self.cfg.server:
            self._stream_send(data)
            return
        try:
            self.sock.sendto(data, dest)
            self.stats["udp_tx"] += 1
        except (BlockingIOError, InterruptedError):
            self.stats["udp_send_drops"] += 1
        except OSError as exc:  # e.g. no route while the address moves
            self.stats["udp_send_drops"] += 1
            log.debug("send to %s failed: %s", dest, exc)

    def _on_response(self, msg: stun.Message) -> None:
        p = self.pending.pop(msg.transaction_id, None)
        if p is None:
            return
        method = METHOD_NAMES.get(p.method, hex(p.method))
        if msg.cls == Class.ERROR:
            code = (msg.get(Attr.ERROR_CODE) or (0, ""))[0]
            self._on_error(p, method, code, msg)
            return
        if msg.cls != Class.SUCCESS:
            return
        if p.method != Method.BINDING and (self.turn is None or not self.turn.verify(msg)):
            self.event("bad_integrity", method=method)
            return
        now = time.monotonic()
        if p.method == Method.BINDING:
            mapped = msg.get(Attr.XOR_MAPPED_ADDRESS)
            if mapped is not None:
                addr: Addr = (mapped[0], mapped[1])
                old = self.srflx.get(family_key(addr[0]))
                self.srflx[family_key(addr[0])] = addr
                if old != addr:
                    self.event("srflx", addr=list(mapped))
                    self._publish_candidates()
            if self.cfg.allocate and not self.relayed:
                self._send_allocate()
        elif p.method == Method.ALLOCATE:
            self.relayed = {
                family_key(a[0]): (a[0], a[1]) for a in msg.get_all(Attr.XOR_RELAYED_ADDRESS)
            }
            mapped = msg.get(Attr.XOR_MAPPED_ADDRESS)
            if mapped is not None:
                self.srflx[family_key(mapped[0])] = (mapped[0], mapped[1])
            self.lifetime = float(msg.get(Attr.LIFETIME) or 600)
            self.allocated_at = now
            self.allocate_backoff = 0.5
            self.channels.clear()
            self.event(
                "allocated",
                relay={k: list(v) for k, v in self.relayed.items()},
                lifetime=self.lifetime,
                local=self._local(),
            )
            self._publish_candidates()
            self._ensure_channel()
        elif p.method == Method.REFRESH and p.info.get("reallocate"):
            self._send_allocate()
        elif p.method == Method.REFRESH:
            self.lifetime = float(msg.get(Attr.LIFETIME) or 600)
            self.allocated_at = now
            self.event("refreshed", lifetime=self.lifetime)
        elif p.method == Method.CHANNEL_BIND:
            number = p.info["channel"]
            ch = self.channels.get(number)
            if ch is not None:
                first = not ch.bound
                ch.bound, ch.bound_at, ch.last_rx = True, now, now
                self.event(
                    "channel_bound" if first else "channel_refreshed",
                    channel=number,
                    peer=list(ch.peer),
                )

    def _on_error(self, p: Pending, method: str, code: int, msg: stun.Message) -> None:
        if code in (401, 438) and self.turn is not None:
            if code == 401 and p.had_nonce:
                # connlib: a 401 although we sent a nonce -> the credentials are invalid
                self.event("auth_failed", method=method)
                self.turn = None
                self._invalidate("credentials rejected")
                return
            self.turn.learn(msg)
            if code == 438:
                self.event("stale_nonce", method=method)
            self._resign(p)
            return
        self.event("error_response", method=method, code=code)
        if p.method in (Method.REFRESH, Method.CHANNEL_BIND) and code == 437:
            self._invalidate(f"{method} 437")
            self._send_allocate()
        elif p.method == Method.CHANNEL_BIND:
            self.channels.pop(p.info.get("channel", -1), None)
            self.channel_retry_at = time.monotonic() + 1.0
        elif p.method == Method.ALLOCATE and code == 437:
            # An earlier Allocate of ours succeeded but every response was lost: delete that
            # allocation (we do not know its address), then allocate again.
            self._send_signed(Method.REFRESH, [(Attr.LIFETIME, 0)], {"reallocate": True})
        elif p.method == Method.ALLOCATE:
            self.next_allocate_at = time.monotonic() + self.allocate_backoff
            self.allocate_backoff = min(self.allocate_backoff * 2, 8.0)

    def _resign(self, p: Pending) -> None:
        """Send the request again with the (new) realm and nonce: same attributes, new id."""
        assert self.turn is not None
        original = stun.parse(p.data)
        skip = {
            Attr.USERNAME,
            Attr.REALM,
            Attr.NONCE,
            Attr.MESSAGE_INTEGRITY,
            Attr.SOFTWARE,
            Attr.FINGERPRINT,
        }
        attrs = [(t, original.get(t)) for t, _ in original.attributes if t not in skip]
        self._send_signed(p.method, attrs, p.info)

    def _invalidate(self, reason: str) -> None:
        if self.relayed or self.channels:
            self.event("allocation_invalidated", reason=reason)
        self.relayed = {}
        self.channels.clear()
        self.lifetime = 0.0
        self.pending = {tid: p for tid, p in self.pending.items() if p.method == Method.BINDING}
        self._publish_candidates()

    def _ensure_channel(self) -> None:
        """Bind a channel to the target, unless one is bound or being bound."""
        if not self.cfg.allocate or self.turn is None or not self.relayed:
            return
        target = self.target
        if target is None or family_key(target[0]) not in self.relayed:
            return
        if time.monotonic() < self.channel_retry_at:
            return
        if any(c.peer == target for c in self.channels.values()):
            return
        number = max(self.channels, default=MIN_CHANNEL - 1) + 1
        if number > MAX_CHANNEL:
            number = MIN_CHANNEL
        self.channels[number] = Channel(target)
        self._bind(number, target)

    def _bind(self, number: int, peer: Addr) -> None:
        if any(
            p.method == Method.CHANNEL_BIND and p.info.get("channel") == number
            for p in self.pending.values()
        ):
            return
        self._send_signed(
            Method.CHANNEL_BIND,
            [(Attr.CHANNEL_NUMBER, number), (Attr.XOR_PEER_ADDRESS, peer)],
            {"channel": number},
        )

    def _roam(self, bind: str | None) -> None:
        """A new network: new socket (new 5-tuple), nothing kept but the credentials."""
        old = self._local()
        self._close_socket()
        self.pending.clear()
        self.relayed = {}
        self.srflx = {}
        self.channels.clear()
        self._open_socket(bind)
        self.event("roamed", old=old, local=self._local())
        self.next_allocate_at = 0.0
        self.last_rx_relay = time.monotonic()
        self._start_turn()

    # -- timers ----------------------------------------------------------------------------

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            try:
                self._tick(time.monotonic())
            except Exception:
                log.exception("tick failed")

    def _tick(self, now: float) -> None:
        for tid, p in list(self.pending.items()):
            if now < p.sent_at + p.rto:
                continue
            if p.transmissions >= MAX_TRANSMISSIONS:
                del self.pending[tid]
                self._on_timeout(p)
                continue
            p.transmissions += 1
            p.sent_at = now
            p.rto = min(p.rto * 2, MAX_RTO)
            self._sendto(p.data, self.cfg.server)
        scale = self.cfg.refresh_scale
        if self.relayed:
            if now >= self.allocated_at + self.lifetime / 2 * scale:
                self._send_refresh()
            elif now - self.last_rx_relay >= self.cfg.probe_after:
                self.last_rx_relay = now  # one probe per quiet period
                self.event("probe", quiet=self.cfg.probe_after)
                self._send_refresh()
            for number, ch in self.channels.items():
                if (
                    ch.bound
                    and ch.last_rx > ch.bound_at
                    and now >= ch.bound_at + CHANNEL_LIFETIME / 2 * scale
                ):
                    self._bind(number, ch.peer)
            self._ensure_channel()
        elif (
            self.cfg.allocate
            and self.turn is not None
            and now >= self.next_allocate_at
            and not self.pending
        ):
            # no allocation (lost, rejected, or never made): try again, backing off
            self.next_allocate_at = now + self.allocate_backoff
            self.allocate_backoff = min(self.allocate_backoff * 2, 8.0)
            if self.srflx:
                self._send_allocate()
            else:
                self._start_turn()
        if not self.cfg.allocate:
            if not self.srflx and not self.pending:
                self._start_turn()
            if self.target is not None and now >= self.next_keepalive:
                self._keepalive(now)

    def _keepalive(self, now: float) -> None:
        """Open and keep our NAT mapping towards the partner's relayed address."""
        assert self.target is not None
        self.next_keepalive = now + self.cfg.keepalive
        self._sendto(b"\x00", self.target)

    def _on_timeout(self, p: Pending) -> None:
        method = METHOD_NAMES.get(p.method, hex(p.method))
        self.event("request_timeout", method=method)
        if p.method == Method.REFRESH:
            self._invalidate("refresh timed out")
        elif p.method == Method.CHANNEL_BIND:
            ch = self.channels.get(p.info.get("channel", -1))
            if ch is not None and not ch.bound:
                del self.channels[p.info["channel"]]

    # -- data path -------------------------------------------------------------------------

    def _on_tun(self) -> None:
        for _ in range(256):
            try:
                packet = os.read(self.tun_fd, 65535)
            except (BlockingIOError, InterruptedError):
                return
            self.stats["tun_rx"] += 1
            target = self.target
            if target is None:
                self.stats["no_channel_drops"] += 1
                continue
            if not self.cfg.allocate:
                self._sendto(packet, target)
                continue
            for number, ch in self.channels.items():
                if ch.peer == target and ch.bound:
                    self._sendto(HEADER.pack(number, len(packet)) + packet, self.cfg.server)
                    break
            else:
                self.stats["no_channel_drops"] += 1

    def _on_udp(self) -> None:
        sock = self.sock
        if sock is None:
            return
        for _ in range(256):
            try:
                data, sender = sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            self.stats["udp_rx"] += 1
            src: Addr = (sender[0], sender[1])
            if src == self.cfg.server:
                self.last_rx_relay = time.monotonic()
                if data and 0x40 <= data[0] <= 0x4F:
                    self._on_channel_data(data)
                elif stun.is_stun(data):
                    try:
                        msg = stun.parse(data)
                    except ValueError:
                        continue
                    self._on_response(msg)
                else:
                    self.stats["unknown_rx"] += 1
            elif not self.cfg.allocate and src == self.target:
                if len(data) >= 20:  # skip our partner's 1-byte keepalives
                    self._write_tun(data)
            else:
                self.stats["unknown_rx"] += 1

    def _stream_send(self, data: bytes) -> None:
        """Queue a frame (ChannelData padded to 4 bytes) and write what the socket takes; a
        backlog past 4 MiB drops, as a full UDP socket buffer would."""
        if data[0] >= 0x40:
            data += bytes(-len(data) % 4)
        if len(self.outgoing) > 4 << 20:
            self.stats["udp_send_drops"] += 1
            return
        waiting = bool(self.outgoing)
        self.outgoing += data
        self.stats["udp_tx"] += 1
        if not waiting:
            self._flush_stream()

    def _flush_stream(self) -> None:
        sock = self.sock
        if sock is None:
            return
        while self.outgoing:
            try:
                sent = sock.send(self.outgoing)
            except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError):
                break
            except (ssl.SSLWantReadError, OSError) as exc:
                log.debug("stream send failed: %s", exc)
                break
            del self.outgoing[:sent]
        if self.outgoing:
            self.loop.add_writer(sock.fileno(), self._flush_stream)
        else:
            self.loop.remove_writer(sock.fileno())

    def _on_stream(self) -> None:
        sock = self.sock
        if sock is None:
            return
        for _ in range(256):
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
                return
            except OSError as exc:
                data = b""
                log.info("relay connection failed: %s", exc)
            if not data:  # the relay closed the connection: its allocation is gone
                self.event("relay_closed")
                self._close_socket()
                self._invalidate("connection closed")
                return
            self.last_rx_relay = time.monotonic()
            try:
                frames = self.framer.feed(data)
            except ValueError:
                self.stats["unknown_rx"] += 1
                continue
            for frame in frames:
                self.stats["udp_rx"] += 1
                if frame[0] >= 0x40:
                    self._on_channel_data(frame)
                else:
                    try:
                        self._on_response(stun.parse(frame))
                    except ValueError:
                        continue

    def _on_channel_data(self, data: bytes) -> None:
        if len(data) < 4:
            return
        number, length = HEADER.unpack_from(data)
        ch = self.channels.get(number)
        if ch is None or not ch.bound or 4 + length > len(data):
            self.stats["unknown_rx"] += 1
            return
        ch.last_rx = time.monotonic()
        if length >= 20:
            self._write_tun(data[4 : 4 + length])

    def _write_tun(self, packet: bytes) -> None:
        try:
            os.write(self.tun_fd, packet)
            self.stats["tun_tx"] += 1
        except (BlockingIOError, InterruptedError):
            self.stats["tun_write_drops"] += 1
        except OSError as exc:
            self.stats["tun_write_drops"] += 1
            log.debug("tun write failed: %s", exc)


def parse_args(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(
        prog="python -m simulations.netns.agent",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--name", required=True)
    p.add_argument("--server", required=True, type=parse_addr, help="relay host:port")
    p.add_argument("--signal", required=True, help="signalling hub Unix socket")
    p.add_argument("--tun", default="fzt0")
    p.add_argument("--tun-addr", action="append", default=[], help="CIDR; repeatable")
    p.add_argument("--username")
    p.add_argument("--password")
    p.add_argument(
        "--no-allocate",
        action="store_true",
        help="no allocation: raw UDP to the partner's relayed address",
    )
    p.add_argument(
        "--dual",
        action="store_true",
        help="the relay is dual-stack: ask for ADDITIONAL-ADDRESS-FAMILY IPv6",
    )
    p.add_argument("--peer-family", type=int, choices=(4, 6), default=4)
    p.add_argument("--bind", help="local address to send from")
    p.add_argument(
        "--refresh-scale",
        type=float,
        default=1.0,
        help="multiply refresh periods (tests: 0.01 refreshes every few seconds)",
    )
    p.add_argument("--probe-after", type=float, default=25.0)
    p.add_argument("--keepalive", type=float, default=1.0)
    p.add_argument("--mtu", type=int, default=tun.DEFAULT_MTU)
    p.add_argument("--transport", choices=("udp", "tcp", "tls"), default="udp")
    a = p.parse_args(argv)
    return Config(
        name=a.name,
        server=a.server,
        signal_path=a.signal,
        tun_name=a.tun,
        tun_addrs=a.tun_addr,
        username=a.username,
        password=a.password,
        allocate=not a.no_allocate,
        dual=a.dual,
        peer_family=a.peer_family,
        bind=a.bind,
        refresh_scale=a.refresh_scale,
        probe_after=a.probe_after,
        keepalive=a.keepalive,
        mtu=a.mtu,
        transport=a.transport,
    )


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s {cfg.name} %(levelname)s %(message)s",
    )

    async def go() -> None:
        await Agent(cfg).run()

    try:
        import uvloop

        uvloop.run(go())
    except ImportError:
        asyncio.run(go())
    with contextlib.suppress(Exception):
        sys.stdout.flush()


if __name__ == "__main__":
    main()
