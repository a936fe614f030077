"""The TURN server state machine (RFC 8656 over UDP, Firezone-compatible), sans-IO.

Inputs are datagrams with their addresses and a ``now`` (monotonic seconds); outputs are
commands (``next_command``), a deadline (``poll_timeout``) and, for relayed data, the
return value of the two ``handle_*`` calls so the I/O layer forwards without copying.

``Server`` keeps the entry points and the request and timer handlers; the state it works on
lives in collaborators (``protocol.allocations``, ``protocol.ports``, ``protocol.timers``,
``protocol.transactions``), and its outputs are typed (``protocol.commands``,
``protocol.routes``, ``protocol.errors``).

Where Firezone's relay departs from the RFCs we follow the RFC unless that could break
Firezone's own clients; README.md lists each such choice.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import logging
import random
import secrets
import struct
from collections import deque
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

from firezone_relay.protocol import stun
from firezone_relay.protocol.allocations import (
    IN_PACKETS,
    OUT_PACKETS,
    Allocation,
    AllocationTable,
    Channel,
)
from firezone_relay.protocol.auth import Nonces
from firezone_relay.protocol.authenticator import Authenticator
from firezone_relay.protocol.channel_data import MAX_CHANNEL, MIN_CHANNEL
from firezone_relay.protocol.client_input import ClientInput
from firezone_relay.protocol.commands import (
    Command,
    CreateAllocation,
    CreateChannelBinding,
    ForwardToWorker,
    ReleaseAllocation,
    ReserveAllocation,
    SendMessage,
)
from firezone_relay.protocol.config import ServerConfig
from firezone_relay.protocol.errors import ErrorCode
from firezone_relay.protocol.policy import PeerPolicy, Verdict, networks
from firezone_relay.protocol.ports import PortAllocator
from firezone_relay.protocol.rate_limit import ByteBucket
from firezone_relay.protocol.ratelimit import RateLimiter
from firezone_relay.protocol.rebind import MAX_BIND_ATTEMPTS, BindRecovery
from firezone_relay.protocol.reservations import (
    EvictAllocation,
    RegistryMessage,
    ReservationAnswer,
    Reservations,
)
from firezone_relay.protocol.responses import Auth, Reject, Responder
from firezone_relay.protocol.routes import ClientRoute, LoopToClient, ToClient, ToPeer
from firezone_relay.protocol.stats import SIZE_BUCKET as _SIZE_BUCKET
from firezone_relay.protocol.stats import Stats
from firezone_relay.protocol.stun import Attr, Class, Message, Method
from firezone_relay.protocol.timers import (
    AllocationExpiry,
    ChannelExpiry,
    PermissionExpiry,
    QuarantineExpiry,
    ReservationExpiry,
    ReservationWaitExpiry,
    TimerRecord,
    Timers,
)
from firezone_relay.protocol.transactions import TransactionCache, request_digest
from firezone_relay.protocol.types import Addr, Family, FiveTuple, Transport, log_fields

log = logging.getLogger("relay")

DEFAULT_LIFETIME = 600
MAX_LIFETIME = 3600
PERMISSION_LIFETIME = 300
CHANNEL_LIFETIME = 600
CHANNEL_REBIND_TIMEOUT = 300
TRANSACTION_CACHE_TTL = 40.0
TRANSACTION_CACHE_SIZE = 65_536
TRANSACTION_CACHE_BYTES = 16 * 1024 * 1024
#: distinct peer addresses one CreatePermission may carry; beyond it the request gets 508
#: (the server cannot install that many at once; the client may split the request)
MAX_PEERS_PER_REQUEST = 32
INTERNAL_ERROR_LOG_INTERVAL = 60.0
RESERVATION_LIFETIME = 30
FOREIGN_PORT_QUARANTINE = 60.0
#: Allocates of a worker of several waiting for the registry's answer at once (508 beyond),
#: and how long one waits (then 508): the supervisor answers within microseconds
MAX_WAITING_ALLOCATES = 1024
RESERVATION_ANSWER_TIMEOUT = 2.0
UDP = 17

_HH = struct.Struct("!HH")
_unpack_hh = _HH.unpack_from

__all__ = [
    "MAX_BIND_ATTEMPTS",
    "Allocation",
    "Channel",
    "ClientRoute",
    "Server",
    "ServerConfig",
    "Stats",
]


class _AllocateRequest(NamedTuple):
    """The attributes of an Allocate that decide what it gets (a NamedTuple: one per
    Allocate, and a frozen dataclass costs microseconds to build)."""

    transport: int | None
    requested_family: Family | None
    additional_family: Family | None
    even_port: bool | None  # None: absent; else its R bit (reserve the next port)
    token: bytes | None
    lifetime: int | None
    dont_fragment: bool

    @staticmethod
    def of(msg: Message) -> _AllocateRequest:
        return _AllocateRequest(
            transport=msg.get(Attr.REQUESTED_TRANSPORT),
            requested_family=msg.get(Attr.REQUESTED_ADDRESS_FAMILY),
            additional_family=msg.get(Attr.ADDITIONAL_ADDRESS_FAMILY),
            even_port=msg.get(Attr.EVEN_PORT),
            token=msg.get(Attr.RESERVATION_TOKEN),
            lifetime=msg.get(Attr.LIFETIME),
            dont_fragment=msg.has(Attr.DONT_FRAGMENT),
        )

    @property
    def fixed_port(self) -> bool:
        """The client chose the port (EVEN-PORT, RESERVATION-TOKEN): no retry elsewhere."""
        return self.token is not None or self.even_port is not None


@dataclasses.dataclass(slots=True, eq=False)
class _WaitingAllocate:
    """An authenticated Allocate that waits for the allocation registry's answer."""

    ticket: int
    #: the request; while it waits on another process, a stub without its bytes
    msg: Message
    client: FiveTuple
    auth: Auth
    username: str
    user: str
    request: _AllocateRequest
    families: tuple[Family, ...]
    address_error: tuple[Family, int, str] | None
    #: ``request_digest`` of the request's bytes once ``msg`` is a stub
    digest: bytes | None = None


class Server:
    """The TURN server: entry points, request handlers and timer handlers.

    Entry points (the I/O layer calls only these): ``handle_client_input`` (listen port),
    ``handle_peer_traffic`` (allocation ports), ``handle_timeout`` / ``poll_timeout``,
    ``next_command``, ``handle_allocation_failed`` and ``free_all``.

    Inputs are dispatched by two tables at the end of this module: ``_HANDLERS`` (STUN
    request method -> ``_on_*`` handler) and ``_TIMER_HANDLERS`` (timer record type ->
    ``_on_*_expiry``). The state lives in collaborators with one job each:
    ``AllocationTable`` (allocations, channels, permissions, fast-path routes and their
    invariants, see ``protocol.allocations``), ``PortAllocator`` (``protocol.ports``),
    ``Timers`` (``protocol.timers``), ``TransactionCache`` (``protocol.transactions``),
    ``Nonces`` (``protocol.auth``) and ``PeerPolicy`` (``protocol.policy``).

    ``rng`` chooses ports only (``--rng-seed`` makes that deterministic for tests); the
    auth secret, the nonce key, reservation tokens and transaction IDs come from
    ``token_bytes``, by default the OS's CSPRNG (``secrets``). ``nonce_key``: the key of
    the stateless nonces, the same for every worker of one relay (so a nonce one worker
    issued is valid on all of them); drawn from ``token_bytes`` when not given.

    A worker of several (``config.workers`` > 1) asks the supervisor's allocation registry
    before it grants an Allocate (``ReserveAllocation``; the answer comes back through
    ``handle_registry_message``); a core alone holds its own registry (``reservations``)
    and asks it within the same call."""

    def __init__(
        self,
        config: ServerConfig,
        rng: random.Random,
        secret: str | None = None,
        token_bytes: Callable[[int], bytes] = secrets.token_bytes,
        nonce_key: bytes | None = None,
    ) -> None:
        self.config = config
        self._rng = rng
        self._token_bytes = token_bytes
        self._indication_ids = stun.TransactionIds(token_bytes)
        first_secret = secret if secret is not None else token_bytes(32).hex()
        #: drain: new Allocates get 508, existing allocations go on
        self.draining = False
        self.unix_offset = 0.0
        self.stats = Stats()
        self._scale = config.time_scale
        self._auth = Authenticator(
            config.auth_scheme,
            config.realm,
            (first_secret,),
            Nonces(
                token_bytes(32) if nonce_key is None else nonce_key,
                config.nonce_lifetime * self._scale,
                config.nonce_uses,
            ),
        )
        self.policy = _peer_policy(config)
        self._families = tuple(
            f
            for f, ip in ((Family.V4, config.public_ip4), (Family.V6, config.public_ip6))
            if ip is not None
        )
        self._own_hosts = frozenset(
            str(ipaddress.ip_address(a)) for a in (config.public_ip4, config.public_ip6) if a
        )
        self._commands: deque[Command] = deque()
        self._timers = Timers()
        self._worker = config.worker
        #: the relay-wide allocation registry when this core is the relay's only worker;
        #: None when it is the supervisor's, asked through commands
        self.reservations = Reservations.from_config(config) if config.workers == 1 else None
        #: tells the registry that the allocation of a ticket ended (no reference back to
        #: the server, so that a dropped server is freed at once, without the cyclic GC)
        self._release = _releaser(self.reservations, config.worker, self._commands)
        self._table = AllocationTable(
            self._commands.append, config.max_channels_per_allocation, self._release
        )
        #: the next registry ticket: a counter from a random start (see ``ReserveAllocation``)
        self._next_ticket = int.from_bytes(token_bytes(8), "big") >> 1
        #: Allocates waiting for the registry's answer, by ticket and by client
        self._waiting: dict[int, _WaitingAllocate] = {}
        self._waiting_clients: dict[FiveTuple, _WaitingAllocate] = {}
        #: the port shares of the relay's workers; None when this core is the only one
        self._shares = config.port_shares if config.workers > 1 else None
        first_port, last_port = config.port_share
        #: what this worker grants at most: the relay's cap within its share of the ports
        self._local_limit = min(config.allocation_limit, last_port - first_port + 1)
        self._ports = PortAllocator(
            first_port,
            last_port,
            rng,
            token_bytes,
            self._timers,
            self._table.by_port,
            RESERVATION_LIFETIME * self._scale,
            FOREIGN_PORT_QUARANTINE * self._scale,
        )
        # The table's indexes under short names, for the per-datagram paths.
        self._allocations = self._table.by_client
        self._by_port = self._table.by_port
        self._p2c = self._table.to_client
        self._c2c = self._table.looped
        self._client_inputs: dict[tuple[Transport, Addr], ClientInput] = {}
        single = config.single_allocation_per_username
        #: the Firezone rule (the registry applies it; tracing reads it)
        self.single_allocation_per_username = (
            config.auth_scheme == "firezone" if single is None else single
        )
        self._transactions = TransactionCache(
            TRANSACTION_CACHE_TTL * self._scale, TRANSACTION_CACHE_SIZE, TRANSACTION_CACHE_BYTES
        )
        self._error_logged_at: float | None = None
        self._rebind = BindRecovery(
            self._commands, self._table, self._ports, self._transactions, config.software
        )
        rate = config.unauthenticated_rate_limit
        self._responder = Responder(
            config.software,
            self._commands.append,
            self.stats,
            RateLimiter.for_workers(rate, config.workers) if rate else None,
            self._transactions,
        )

    # --- accessors ---------------------------------------------------------------------

    @property
    def num_allocations(self) -> int:
        return len(self._allocations)

    @property
    def num_active_channels(self) -> int:
        return len(self._p2c)

    def allocation_on(self, port: int) -> Allocation | None:
        """The live allocation on ``port`` (for observers such as tracing; read-only)."""
        return self._by_port.get(port)

    def allocation_of(self, client: FiveTuple) -> Allocation | None:
        """The live allocation of ``client``'s 5-tuple (read-only)."""
        return self._allocations.get(client)

    def allocation_of_username(self, username: str) -> Allocation | None:
        """The latest live allocation made with ``username`` (read-only)."""
        return self._table.by_username.get(username)

    def allocations(self) -> list[Allocation]:
        """The live allocations (a copy; for the operator's listing)."""
        return list(self._allocations.values())

    def disconnect(self, allocation: Allocation) -> bool:
        """Free a live allocation at once (the operator's ``disconnect``): its routes and
        sockets go, and its client's next request gets 437. False if it was gone already."""
        if self._by_port.get(allocation.port) is not allocation:
            return False
        log.info(
            "allocation on port %d disconnected",
            allocation.port,
            extra=log_fields(client=allocation.client, allocation=allocation.port),
        )
        self._table.remove(allocation)
        return True

    @property
    def auth_secret(self) -> str:
        """The secret new credentials are minted with."""
        return self._auth.secrets[0]

    @property
    def auth_secrets(self) -> tuple[str, ...]:
        """Every secret credentials are accepted with; the first is ``auth_secret``."""
        return self._auth.secrets

    def set_auth_secrets(self, secrets_: tuple[str, ...]) -> None:
        """Accept credentials of any of ``secrets_`` from now on; the first one is the one
        new credentials are minted with (``reload`` of ``--auth-secret-file``)."""
        if not secrets_ or not all(secrets_):
            raise ValueError("at least one non-empty secret")
        self._auth.secrets = tuple(secrets_)

    def set_peer_lists(self, allowed: tuple[str, ...], denied: tuple[str, ...]) -> None:
        """Replace ``--allowed-peer-ip`` / ``--denied-peer-ip`` (``reload``); judges new
        permissions and channels, never ones already granted. ValueError on a bad CIDR."""
        config = dataclasses.replace(self.config, allowed_peer_ips=allowed, denied_peer_ips=denied)
        self.policy = _peer_policy(config)
        self.config = config

    def check_invariants(self) -> None:
        """Assert the invariants of the allocation table and the port allocator (tests)."""
        self._table.check_invariants()
        self._ports.check_invariants()
        assert len(self._waiting) == len(self._waiting_clients) <= MAX_WAITING_ALLOCATES
        for client, waiting in self._waiting_clients.items():
            assert self._waiting[waiting.ticket] is waiting and waiting.client == client
            assert client not in self._allocations
        registry = self.reservations
        if registry is not None:  # this core is the relay: the registry holds its table
            registry.check_invariants()
            assert not self._waiting
            assert set(registry.tickets(self._worker)) == set(self._table.by_ticket)
            assert len(registry) == len(self._table)
        for allocation in self._allocations.values():
            assert all(f in self._families for f in allocation.families)
            # CreatePermission adds up to its cap, each channel (ChannelBind) one more
            assert len(allocation.permissions) <= (
                self.config.max_permissions_per_allocation + self.config.max_channels_per_allocation
            )

    @property
    def public_ip4(self) -> str | None:
        return self.config.public_ip4

    @property
    def public_ip6(self) -> str | None:
        return self.config.public_ip6

    def next_command(self) -> Command | None:
        return self._commands.popleft() if self._commands else None

    def poll_timeout(self) -> float | None:
        deadlines = []
        timer = self._timers.next_deadline()
        if timer is not None:
            deadlines.append(timer)
        nonce_expiry = self._auth.nonces.next_expiry()
        if nonce_expiry is not None:
            deadlines.append(nonce_expiry - self.unix_offset)
        return min(deadlines) if deadlines else None

    # --- data path -----------------------------------------------------------------------

    def client_input(self, transport: Transport, local: Addr) -> ClientInput:
        """The entry point for what clients send over ``transport`` to the relay's ``local``
        address, for the I/O layer to hold per listen socket: its ``handle(data, client
        address, now)`` is ``handle_client_input`` without a 5-tuple built per datagram.
        One per (transport, local), kept: the relay's own addresses bound their number."""
        key = (transport, local)
        entry = self._client_inputs.get(key)
        if entry is None:
            routes = self._table.peer_routes(transport, local)
            entry = ClientInput(transport, local, routes, self.stats, self._client_input)
            self._client_inputs[key] = entry
        return entry

    def handle_client_input(
        self, data: bytes | memoryview, sender: FiveTuple, now: float
    ) -> ClientRoute | None:
        """A datagram on the listen port. Returns a ``ToPeer`` (relay ``data[span]`` to a
        peer), a ``LoopToClient`` (the peer is another allocation on this relay: hand the
        data to that allocation's client without a trip through the network), or None."""
        return self.client_input(sender.transport, sender.local).handle(data, sender.remote, now)

    def _client_input(
        self, data: bytes | memoryview, sender: FiveTuple, now: float
    ) -> ClientRoute | None:
        """``handle_client_input`` for all but ChannelData on a bound channel (``ClientInput``
        relays that)."""
        try:
            size = len(data)
            if size < 4 or sender.remote[1] == 0:
                self.stats.dropped_datagrams += 1
                return None
            first = data[0]
            if 0x40 <= first <= 0x4F:
                number, length = _unpack_hh(data)
                if 4 + length <= size and (sender, number) in self._c2c:
                    return self._loop_channel_data(data, sender, number, length, now)
                self.stats.unroutable_datagrams += 1
                return None
            if first < 0x04:
                return self._handle_stun(data, sender, now)
            self.stats.dropped_datagrams += 1
            return None
        except Exception:  # never let bad input escape the core
            self._internal_error("handling a datagram", now)
            return None

    def channel_routes(
        self, client: FiveTuple, channel: int, port: int, peer: Addr
    ) -> tuple[ToPeer | None, ToClient | None]:
        """The routes the core holds now under a channel's two keys, for a route cache in the
        I/O layer to copy (the relay loop's are left out: only the core may relay those)."""
        to_peer = self._table.peer_route(client, channel)
        to_client = self._p2c.get((port, peer))
        return (
            None if to_peer is None else to_peer.to_peer,
            None if to_client is None else to_client.to_client,
        )

    def all_channel_routes(
        self,
    ) -> tuple[Mapping[tuple[FiveTuple, int], Channel], Mapping[tuple[int, Addr], Channel]]:
        """Read-only views of every channel route (client, channel) -> the channel whose
        ``to_peer`` it is, and (port, peer) -> the channel whose ``to_client`` it is: for debug
        reads that compare a route cache with the core (a walk costs a walk of the table)."""
        to_peer = {
            (bound.to_client.client, number): bound
            for routes in self._table.to_peer.values()
            for (_, number), bound in routes.items()
        }
        return to_peer, MappingProxyType(self._p2c)

    def handle_peer_traffic(
        self, data: bytes | memoryview, peer: Addr, allocation_port: int, now: float
    ) -> ToClient | None:
        """A datagram on an allocation port. Returns a ``ToClient`` when it is to be sent to
        the client as ChannelData; Data indications come out as commands."""
        channel = self._p2c.get((allocation_port, peer))
        if channel is not None:
            length = len(data)
            limit = channel.limit_in
            if limit is not None and not limit.take(length, now):
                self.stats.allocation_rate_limited += 1
                return None
            channel.in_datagrams += 1  # the allocation's count (Allocation.traffic)
            channel.in_bytes += length
            stats = self.stats  # Stats.count_relayed, inlined on the hot path
            stats.relayed_packets_userspace += 1
            stats.relayed_bytes_userspace += length
            stats.packet_size_buckets[_SIZE_BUCKET[length]] += 1
            return channel.to_client
        try:
            self._data_indication(bytes(data), peer, allocation_port, now)
        except Exception:
            self._internal_error("relaying from a peer", now)
        return None

    def _metered(self, allocation: Allocation, way: int, length: int, now: float) -> bool:
        """Count a relayed datagram of ``allocation`` (``way``: ``OUT_PACKETS`` client -> peer,
        ``IN_PACKETS`` peer -> client); False, counted as rate limited, when it is over the
        allocation's ``--allocation-rate-limit``. The two ChannelData paths inline the count
        and call this only for a limited allocation (which it then counts)."""
        bucket = allocation.limit_out if way == OUT_PACKETS else allocation.limit_in
        if bucket is not None and not bucket.take(length, now):
            self.stats.allocation_rate_limited += 1
            return False
        counters = allocation.counters
        counters[way] += 1
        counters[way + 1] += length
        return True

    def _internal_error(self, what: str, now: float) -> None:
        """A bug met by some input: count it, and log its traceback at most once a minute,
        so no stream of datagrams can flood the log."""
        self.stats.internal_errors += 1
        last = self._error_logged_at
        if last is None or now - last >= INTERNAL_ERROR_LOG_INTERVAL:
            self._error_logged_at = now
            log.exception(
                "internal error %s (%d so far; logged at most once a minute)",
                what,
                self.stats.internal_errors,
            )

    def _data_indication(self, data: bytes, peer: Addr, port: int, now: float) -> None:
        allocation = self._by_port.get(port)
        if allocation is None:
            self.stats.unroutable_datagrams += 1
            return
        expires = allocation.permissions.get(peer[0])
        if expires is None or expires <= now or len(data) > 65_000:
            self.stats.unroutable_datagrams += 1
            return
        if not self._metered(allocation, IN_PACKETS, len(data), now):
            return
        payload = stun.data_indication(self._indication_ids(), peer, data)
        self.stats.count_relayed(len(data))
        self._commands.append(SendMessage(payload, allocation.client))

    # --- timers --------------------------------------------------------------------------

    def handle_timeout(self, now: float) -> None:
        try:
            self._auth.nonces.expire(now + self.unix_offset)
            for record in self._timers.pop_due(now):
                _TIMER_HANDLERS[type(record)](self, record, now)
        except Exception:
            self._internal_error("handling timers", now)

    def _schedule_allocation(self, allocation: Allocation, now: float) -> None:
        """Arm the expiry timer unless one at or before the deadline is still armed, so a
        client refreshing in a loop cannot grow the timer heap."""
        if allocation.timer_at <= now or allocation.expires_at < allocation.timer_at:
            allocation.timer_at = allocation.expires_at
            self._timers.schedule(allocation.expires_at, AllocationExpiry(allocation))

    def _on_allocation_expiry(self, record: AllocationExpiry, now: float) -> None:
        allocation = record.allocation
        if self._by_port.get(allocation.port) is not allocation:
            return
        if allocation.expires_at <= now:
            log.info(
                "allocation on port %d expired",
                allocation.port,
                extra=log_fields(client=allocation.client, allocation=allocation.port),
            )
            self._table.remove(allocation)
        else:  # refreshed since this timer was armed
            self._schedule_allocation(allocation, now)

    def _on_channel_expiry(self, record: ChannelExpiry, now: float) -> None:
        allocation, channel = record.allocation, record.channel
        if allocation.channels.get(channel.number) is not channel:
            return
        rebind_deadline = channel.expires_at + CHANNEL_REBIND_TIMEOUT * self._scale
        if channel.bound and channel.expires_at <= now:
            self._table.unbind(allocation, channel)
            log.info(
                "channel %#06x expired",
                channel.number,
                extra=log_fields(
                    channel=channel.number,
                    client=allocation.client,
                    peer=channel.peer,
                    allocation=allocation.port,
                ),
            )
            self._timers.schedule(rebind_deadline, record)
        elif channel.bound:  # refreshed since this timer was armed
            self._timers.schedule(channel.expires_at, record)
        elif rebind_deadline <= now:
            self._table.forget(allocation, channel)

    def _on_permission_expiry(self, record: PermissionExpiry, now: float) -> None:
        expires = record.allocation.permissions.get(record.host)
        if expires is not None and expires <= now:
            self._table.revoke(record.allocation, record.host)
        elif expires is not None:  # refreshed since this timer was armed
            self._timers.schedule(expires, record)

    def _on_reservation_expiry(self, record: ReservationExpiry, now: float) -> None:
        self._ports.on_reservation_expiry(record, now)

    def _on_quarantine_expiry(self, record: QuarantineExpiry, now: float) -> None:
        self._ports.on_quarantine_expiry(record, now)

    # --- STUN dispatch -------------------------------------------------------------------

    def _handle_stun(
        self, data: bytes | memoryview, sender: FiveTuple, now: float
    ) -> ToPeer | None:
        try:
            msg = stun.parse(data)
        except stun.ParseError as exc:
            log.debug("dropping malformed STUN: %s", exc, extra=log_fields(sender=sender))
            self.stats.dropped_datagrams += 1
            return None
        if msg.cls == Class.REQUEST:
            self._handle_request(msg, sender, now)
            return None
        if msg.cls == Class.INDICATION and msg.method == Method.SEND:
            return self._handle_send(msg, sender, now)
        self.stats.dropped_datagrams += 1
        return None

    def _handle_request(self, msg: Message, sender: FiveTuple, now: float) -> None:
        cached = self._transactions.lookup(sender, msg.transaction_id, msg.raw, now)
        if cached is not None:
            self._commands.append(SendMessage(cached, sender))
            return
        fingerprint = msg.fingerprint_offset is not None
        unknown = msg.unknown_comprehension_required()
        if unknown:
            self._responder.reply_error(
                msg,
                sender,
                ErrorCode.UNKNOWN_ATTRIBUTE,
                Auth(None, False, fingerprint),
                now,
                ((Attr.UNKNOWN_ATTRIBUTES, unknown),),
            )
            return
        handler = _HANDLERS.get(msg.method)
        if handler is None:
            self._responder.reply_error(
                msg, sender, ErrorCode.BAD_REQUEST, Auth(None, False, fingerprint), now
            )
            return
        try:
            handler(self, msg, sender, now)
        except stun.BadAttribute as exc:
            log.debug("bad attribute: %s", exc, extra=log_fields(sender=sender))
            self._responder.reply_error(
                msg, sender, ErrorCode.BAD_REQUEST, Auth(None, False, fingerprint), now
            )
        except Reject as reject:
            auth = reject.auth or Auth(None, False, fingerprint)
            self._responder.reply_error(msg, sender, reject.code, auth, now, reject.extra)

    def _own_allocation(
        self, sender: FiveTuple, auth: Auth, username: str, any_username: bool = False
    ) -> Allocation:
        """The sender's allocation; 437 without one, 441 when it belongs to another
        username, unless ``any_username`` (valid credentials from the allocation's own
        5-tuple, which is how connlib deletes it after a credential rotation)."""
        allocation = self._allocations.get(sender)
        if allocation is None:
            raise Reject(ErrorCode.ALLOCATION_MISMATCH, auth)
        if allocation.username != username and not any_username:
            raise Reject(ErrorCode.WRONG_CREDENTIALS, auth)
        return allocation

    # --- Binding -------------------------------------------------------------------------

    def _on_binding(self, msg: Message, sender: FiveTuple, now: float) -> None:
        auth = Auth(None, False, msg.fingerprint_offset is not None)
        self._responder.reply(
            msg, sender, Class.SUCCESS, [(Attr.XOR_MAPPED_ADDRESS, sender.remote)], auth, now
        )

    # --- Allocate ------------------------------------------------------------------------

    def _on_allocate(self, msg: Message, sender: FiveTuple, now: float) -> None:
        request = _AllocateRequest.of(msg)
        if request.transport is None:
            raise Reject(ErrorCode.BAD_REQUEST)
        auth, username, identity = self._auth.authenticate(msg, sender, now + self.unix_offset)
        existing = self._allocations.get(sender)
        if existing is not None:
            if existing.transaction_id != msg.transaction_id:
                raise Reject(ErrorCode.ALLOCATION_MISMATCH, auth)
            self._allocate_success(msg, existing, auth, now, (), None)  # a retransmission
            return
        waiting = self._waiting_clients.get(sender)
        if waiting is not None:
            if waiting.msg.transaction_id != msg.transaction_id:
                raise Reject(ErrorCode.ALLOCATION_MISMATCH, auth)
            return  # a retransmission: the registry's answer answers both
        if self.draining:
            raise Reject(ErrorCode.INSUFFICIENT_CAPACITY, auth)
        families, address_error = self._check_allocate(request, auth)
        if len(self._waiting) >= MAX_WAITING_ALLOCATES:
            raise Reject(ErrorCode.INSUFFICIENT_CAPACITY, auth)
        ticket = self._next_ticket
        self._next_ticket += 1
        waiting = _WaitingAllocate(
            ticket, msg, sender, auth, username, identity.user, request, families, address_error
        )
        registry = self.reservations
        if registry is not None:  # the relay's only worker: answered right here
            evicted, refusal = registry.admit(self._worker, ticket, username, identity.user)
            if evicted is not None:
                self.handle_eviction(evicted[1], sender)
            self._answer(waiting, refusal, now)
            return
        # Wait for the supervisor's registry, keeping only what the answer needs.
        self._waiting[ticket] = waiting
        self._waiting_clients[sender] = waiting
        waiting.digest = request_digest(msg.raw)
        waiting.msg = Message(msg.method, msg.cls, msg.transaction_id)
        self._commands.append(ReserveAllocation(ticket, sender, username, identity.user))
        self._timers.schedule(
            now + RESERVATION_ANSWER_TIMEOUT * self._scale, ReservationWaitExpiry(ticket)
        )

    # --- the allocation registry's answers -----------------------------------------------

    def handle_registry_message(self, message: RegistryMessage, now: float) -> None:
        """What the supervisor's allocation registry sends this worker (a
        ``ReservationAnswer`` or an ``EvictAllocation``); the answer to an Allocate comes
        out as commands, as if the Allocate had just arrived."""
        try:
            self._on_registry_message(message, now)
        except Exception:
            self._internal_error("handling the allocation registry's answer", now)

    def _on_registry_message(self, message: RegistryMessage, now: float) -> None:
        if type(message) is ReservationAnswer:
            self.handle_reservation(message.ticket, message.refusal, now)
        elif type(message) is EvictAllocation:
            self.handle_eviction(message.ticket, message.by)

    def handle_reservation(self, ticket: int, refusal: ErrorCode | None, now: float) -> None:
        """The registry's answer to the Allocate waiting on ``ticket``: go ahead (``refusal``
        None) or answer ``refusal``. A grant nobody waits for any more (timed out, the
        client's connection closed) is given back."""
        waiting = self._waiting.pop(ticket, None)
        if waiting is None:
            if refusal is None:
                self._release(ticket)
            return
        del self._waiting_clients[waiting.client]
        self._answer(waiting, refusal, now)

    def _answer(self, waiting: _WaitingAllocate, refusal: ErrorCode | None, now: float) -> None:
        """Answer an Allocate the registry has decided on."""
        msg, auth, ticket = waiting.msg, waiting.auth, waiting.ticket
        try:
            if refusal is not None:
                raise Reject(refusal, auth)
            self._grant(waiting, now)
        except Reject as reject:
            if refusal is None:
                self._release(ticket)
            self._responder.reply_error(
                msg, waiting.client, reject.code, reject.auth or auth, now, reject.extra
            )
        except Exception:
            if refusal is None and ticket not in self._table.by_ticket:
                self._release(ticket)
            raise

    def handle_eviction(self, ticket: int, by: FiveTuple | None = None) -> None:
        """The registry frees the allocation of ``ticket``: its username allocated again
        (from ``by``) and may hold one allocation only (Firezone's rule, for NATs that flip
        source ports). Nothing if it is gone already."""
        previous = self._table.by_ticket.get(ticket)
        if previous is None:
            return
        log.info(
            "username allocates again: freeing its previous allocation",
            extra=log_fields(
                username=previous.username,
                sender=by if by is not None else "",
                previous_client=previous.client,
                previous_allocation=previous.port,
            ),
        )
        previous.replaced = True
        self._table.remove(previous)

    def _on_reservation_wait_expiry(self, record: ReservationWaitExpiry, now: float) -> None:
        """The registry did not answer in time: 508, and a late grant is given back."""
        waiting = self._waiting.pop(record.ticket, None)
        if waiting is None:
            return
        del self._waiting_clients[waiting.client]
        log.warning(
            "the allocation registry did not answer within %.0f s",
            RESERVATION_ANSWER_TIMEOUT,
            extra=log_fields(sender=waiting.client, username=waiting.username),
        )
        self._responder.reply_error(
            waiting.msg, waiting.client, ErrorCode.INSUFFICIENT_CAPACITY, waiting.auth, now
        )

    def _forget_waiting(self, client: FiveTuple) -> None:
        """The client is gone before the registry answered (its grant is given back)."""
        waiting = self._waiting_clients.pop(client, None)
        if waiting is not None:
            del self._waiting[waiting.ticket]

    def _grant(self, waiting: _WaitingAllocate, now: float) -> None:
        """The registry made room: make the allocation and answer."""
        if self.draining or len(self._table) >= self._local_limit:
            raise Reject(ErrorCode.INSUFFICIENT_CAPACITY, waiting.auth)
        msg, sender, auth, request = waiting.msg, waiting.client, waiting.auth, waiting.request
        families, username = waiting.families, waiting.username
        port, reservation_token = self._choose_port(request, auth, now)
        lifetime = _effective_lifetime(request.lifetime)
        allocation = Allocation(
            client=sender,
            port=port,
            families=families,
            username=username,
            user=waiting.user,
            key=auth.key or b"",
            expires_at=now + lifetime * self._scale,
            transaction_id=msg.transaction_id,
            bind_attempts=None if request.fixed_port else 1,
            dont_fragment=request.dont_fragment,
            created_at=now,
            ticket=waiting.ticket,
        )
        rate = self.config.allocation_rate_limit
        if rate:
            allocation.limit_out, allocation.limit_in = ByteBucket(rate, now), ByteBucket(rate, now)
        self._install_allocation(allocation, now)
        extra: list[tuple[int, object]] = []
        if reservation_token is not None:
            extra.append((Attr.RESERVATION_TOKEN, reservation_token))
        if waiting.address_error is not None:
            extra.append((Attr.ADDRESS_ERROR_CODE, waiting.address_error))
        log.info(
            "allocated port %d",
            port,
            extra=log_fields(
                sender=sender,
                port=port,
                lifetime=f"{lifetime}s",
                families="+".join(f.name for f in families),
                username=username,
            ),
        )
        self._allocate_success(
            msg, allocation, auth, now, tuple(extra), lifetime, digest=waiting.digest
        )

    def _check_allocate(
        self, request: _AllocateRequest, auth: Auth
    ) -> tuple[tuple[Family, ...], tuple[Family, int, str] | None]:
        """Transport and attribute combinations (RFC 8656 §7.2); the families to relay."""
        if request.transport != UDP:
            raise Reject(ErrorCode.UNSUPPORTED_TRANSPORT_PROTOCOL, auth)
        if request.token is not None and (
            request.even_port is not None
            or request.requested_family is not None
            or request.additional_family is not None
        ):
            raise Reject(ErrorCode.BAD_REQUEST, auth)
        if request.even_port and request.additional_family is not None:
            raise Reject(ErrorCode.BAD_REQUEST, auth)
        return self._derive_families(request.requested_family, request.additional_family, auth)

    def _choose_port(
        self, request: _AllocateRequest, auth: Auth, now: float
    ) -> tuple[int, bytes | None]:
        """The reserved port of a RESERVATION-TOKEN, or a free (even) one; with EVEN-PORT's
        R bit also a token reserving the next port."""
        if request.token is not None:
            reserved = self._ports.claim(request.token, now)
            if reserved is None:
                raise Reject(ErrorCode.INSUFFICIENT_CAPACITY, auth)
            return reserved, None
        port = self._ports.pick(even=request.even_port is not None)
        if port is None:
            raise Reject(ErrorCode.INSUFFICIENT_CAPACITY, auth)
        if not request.even_port:
            return port, None
        token = self._ports.reserve_next(port, now)
        if token is None:
            raise Reject(ErrorCode.INSUFFICIENT_CAPACITY, auth)
        return port, token

    def _install_allocation(self, allocation: Allocation, now: float) -> None:
        """Index it, arm its expiry, and bind its sockets (before the response goes out)."""
        self._table.add(allocation)
        self._schedule_allocation(allocation, now)
        for family in allocation.families:
            self._commands.append(
                CreateAllocation(allocation.port, family, allocation.dont_fragment)
            )

    def _allocate_success(
        self,
        msg: Message,
        allocation: Allocation,
        auth: Auth,
        now: float,
        extra: tuple[tuple[int, object], ...],
        lifetime: int | None,
        digest: bytes | None = None,
    ) -> None:
        if lifetime is None:
            lifetime = max(0, round((allocation.expires_at - now) / self._scale))
        attributes: list[tuple[int, object]] = [
            (Attr.XOR_RELAYED_ADDRESS, (self._public_ip(f), allocation.port))
            for f in allocation.families
        ]
        attributes.append((Attr.XOR_MAPPED_ADDRESS, allocation.client.remote))
        attributes.append((Attr.LIFETIME, lifetime))
        attributes.extend(extra)
        allocation.pending_response = self._responder.reply(
            msg, allocation.client, Class.SUCCESS, attributes, auth, now, cache=True, digest=digest
        )

    def _public_ip(self, family: Family) -> str:
        ip = self.config.public_ip4 if family == Family.V4 else self.config.public_ip6
        assert ip is not None
        return ip

    def _derive_families(
        self, requested: Family | None, additional: Family | None, auth: Auth
    ) -> tuple[tuple[Family, ...], tuple[Family, int, str] | None]:
        have = self._families
        if requested is not None and additional is not None:
            raise Reject(ErrorCode.BAD_REQUEST, auth)
        if additional == Family.V4:
            raise Reject(ErrorCode.BAD_REQUEST, auth)
        if additional == Family.V6:
            if have == (Family.V4, Family.V6):
                return have, None
            missing = Family.V6 if have == (Family.V4,) else Family.V4
            return have, (
                missing,
                ErrorCode.ADDRESS_FAMILY_NOT_SUPPORTED,
                ErrorCode.ADDRESS_FAMILY_NOT_SUPPORTED.reason,
            )
        wanted = requested or Family.V4
        if wanted not in have:
            raise Reject(ErrorCode.ADDRESS_FAMILY_NOT_SUPPORTED, auth)
        return (wanted,), None

    # --- Refresh -------------------------------------------------------------------------

    def _on_refresh(self, msg: Message, sender: FiveTuple, now: float) -> None:
        lifetime_request = msg.get(Attr.LIFETIME)
        requested_family = msg.get(Attr.REQUESTED_ADDRESS_FAMILY)
        auth, username, _ = self._auth.authenticate(msg, sender, now + self.unix_offset)
        deleting = lifetime_request == 0
        allocation = self._own_allocation(sender, auth, username, any_username=deleting)
        if requested_family is not None and requested_family not in allocation.families:
            raise Reject(ErrorCode.PEER_ADDRESS_FAMILY_MISMATCH, auth)
        if deleting:
            if allocation.username != username:
                log.info(
                    "allocation deleted with new credentials",
                    extra=log_fields(
                        sender=sender,
                        allocation=allocation.port,
                        previous_username=allocation.username,
                        username=username,
                    ),
                )
            if requested_family is not None and len(allocation.families) > 1:
                self._table.drop_family(allocation, requested_family)
            else:
                log.info(
                    "deleted allocation on port %d",
                    allocation.port,
                    extra=log_fields(sender=sender, allocation=allocation.port),
                )
                self._table.remove(allocation)
            self._responder.reply(
                msg, sender, Class.SUCCESS, [(Attr.LIFETIME, 0)], auth, now, cache=True
            )
            return
        lifetime = _effective_lifetime(lifetime_request)
        allocation.expires_at = now + lifetime * self._scale
        self._schedule_allocation(allocation, now)
        self._responder.reply(
            msg, sender, Class.SUCCESS, [(Attr.LIFETIME, lifetime)], auth, now, cache=True
        )

    # --- CreatePermission ----------------------------------------------------------------

    def _on_create_permission(self, msg: Message, sender: FiveTuple, now: float) -> None:
        peers: list[Addr] = msg.get_all(Attr.XOR_PEER_ADDRESS)
        auth, username, _ = self._auth.authenticate(msg, sender, now + self.unix_offset)
        if not peers:
            raise Reject(ErrorCode.BAD_REQUEST, auth)
        allocation = self._own_allocation(sender, auth, username)
        hosts = list(dict.fromkeys(host for host, _ in peers))  # permissions are per address
        if len(hosts) > MAX_PEERS_PER_REQUEST:
            raise Reject(ErrorCode.INSUFFICIENT_CAPACITY, auth)
        for host in hosts:
            if Family.of(host) not in allocation.families:
                raise Reject(ErrorCode.PEER_ADDRESS_FAMILY_MISMATCH, auth)
            # Judge the address alone, on a port of the allocation range: our own public
            # address passes (Send to it reaches only live allocations, inside the relay).
            if not self.policy.allows(host, self.config.lowest_port):
                raise Reject(ErrorCode.FORBIDDEN, auth)
        new = [host for host in hosts if host not in allocation.permissions]
        if len(allocation.permissions) + len(new) > self.config.max_permissions_per_allocation:
            raise Reject(ErrorCode.INSUFFICIENT_CAPACITY, auth)
        for host in hosts:
            self._permit(allocation, host, now)
        self._responder.reply(msg, sender, Class.SUCCESS, [], auth, now, cache=True)

    def _permit(self, allocation: Allocation, host: str, now: float) -> None:
        """Install or refresh a permission; a timer only for a new one (the timer re-arms
        itself for refreshed ones), so refreshing in a loop cannot grow the heap."""
        until = now + PERMISSION_LIFETIME * self._scale
        if self._table.permit(allocation, host, until):
            self._timers.schedule(until, PermissionExpiry(allocation, host))

    # --- ChannelBind ---------------------------------------------------------------------

    def _on_channel_bind(self, msg: Message, sender: FiveTuple, now: float) -> None:
        number = msg.get(Attr.CHANNEL_NUMBER)
        peer = msg.get(Attr.XOR_PEER_ADDRESS)
        if number is None or peer is None or not MIN_CHANNEL <= number <= MAX_CHANNEL:
            raise Reject(ErrorCode.BAD_REQUEST)
        auth, username, _ = self._auth.authenticate(msg, sender, now + self.unix_offset)
        allocation = self._own_allocation(sender, auth, username)
        loop = self._check_channel_peer(allocation, peer, auth)
        channel = self._channel_for(allocation, number, peer, auth, now)
        self._table.route(allocation, channel, loop)
        self._permit(allocation, peer[0], now)
        self._commands.append(CreateChannelBinding(sender, number, peer, allocation.port))
        self._responder.reply(msg, sender, Class.SUCCESS, [], auth, now, cache=True)

    def _check_channel_peer(self, allocation: Allocation, peer: Addr, auth: Auth) -> bool:
        """Whether the peer may be bound at all; True when it is another allocation of this
        relay (the relay loop)."""
        if Family.of(peer[0]) not in allocation.families:
            raise Reject(ErrorCode.PEER_ADDRESS_FAMILY_MISMATCH, auth)
        verdict = self.policy.classify(*peer)
        if verdict is Verdict.REFUSE or (
            verdict is Verdict.LOOP
            and not (
                peer[0] in self._own_hosts
                and (peer[1] in self._by_port or self._other_worker(peer[1]) is not None)
            )
        ):
            # our own address only in its canonical form, and only on a live allocation
            # (of this worker; another worker's port is judged by that worker, per datagram)
            raise Reject(ErrorCode.FORBIDDEN, auth)
        return verdict is Verdict.LOOP

    def _channel_for(
        self, allocation: Allocation, number: int, peer: Addr, auth: Auth, now: float
    ) -> Channel:
        """The channel to (re)bind: a new one, or the same number to the same peer
        refreshed (also during its rebind timeout); anything else is 400."""
        bound_number = allocation.channel_by_peer.get(peer)
        if bound_number is not None and bound_number != number:
            raise Reject(ErrorCode.BAD_REQUEST, auth)
        channel = allocation.channels.get(number)
        if channel is not None and channel.peer != peer:
            raise Reject(ErrorCode.BAD_REQUEST, auth)
        expires_at = now + CHANNEL_LIFETIME * self._scale
        if channel is not None:
            self._table.renew_channel(channel, expires_at)
            return channel
        if len(allocation.channels) >= self.config.max_channels_per_allocation:
            raise Reject(ErrorCode.INSUFFICIENT_CAPACITY, auth)
        channel = self._table.add_channel(allocation, number, peer, expires_at)
        log.info(
            "bound channel %#06x",
            number,
            extra=log_fields(
                sender=allocation.client, allocation=allocation.port, peer=peer, channel=number
            ),
        )
        # one timer per channel: it re-arms itself while the channel is refreshed
        self._timers.schedule(expires_at, ChannelExpiry(allocation, channel))
        return channel

    # --- Send indication -----------------------------------------------------------------

    def _handle_send(self, msg: Message, sender: FiveTuple, now: float) -> ToPeer | None:
        allocation = self._allocations.get(sender)
        if allocation is None or msg.unknown_comprehension_required():
            self.stats.dropped_datagrams += 1
            return None
        try:
            peer = msg.get(Attr.XOR_PEER_ADDRESS)
        except stun.BadAttribute:
            peer = None
        span = _find_value(msg.raw, Attr.DATA)
        if peer is None or span is None:
            self.stats.dropped_datagrams += 1
            return None
        expires = allocation.permissions.get(peer[0])
        verdict = self.policy.classify(*peer)
        if (
            expires is None
            or expires <= now
            or Family.of(peer[0]) not in allocation.families
            or verdict is Verdict.REFUSE
        ):
            self.stats.unroutable_datagrams += 1
            return None
        start, end = span
        if not self._metered(allocation, OUT_PACKETS, end - start, now):
            return None
        if verdict is Verdict.LOOP:
            # our own address: only a live allocation, inside the relay; never a socket
            if peer[0] in self._own_hosts:
                if peer[1] in self._by_port:
                    self._deliver_to_allocation(msg.raw[start:end], peer, allocation.port, now)
                    return None
                owner = self._other_worker(peer[1])
                if owner is not None:
                    self._commands.append(
                        ForwardToWorker(owner, (peer[0], allocation.port), peer, msg.raw[start:end])
                    )
                    return None
            self.stats.unroutable_datagrams += 1
            return None
        self.stats.count_relayed(end - start)
        return ToPeer(allocation.port, peer, slice(start, end))

    # --- the relay loop ------------------------------------------------------------------

    def _loop_channel_data(
        self, data: bytes | memoryview, sender: FiveTuple, channel: int, length: int, now: float
    ) -> ClientRoute | None:
        """ChannelData to another allocation of this relay: hand it straight to that
        allocation's client instead of sending it out and back through the network, which
        needs the public address to be local (it is not behind a cloud NAT). A port of the
        range that no longer holds an allocation may be some other local socket (Linux's
        ephemeral range overlaps ours): that is dropped, never sent."""
        port, peer, _ = self._c2c[(sender, channel)].to_peer
        target_allocation = self._by_port.get(peer[1])
        if target_allocation is None:
            owner = self._other_worker(peer[1])
            if owner is None:
                self.stats.unroutable_datagrams += 1
            elif self._metered(self._allocations[sender], OUT_PACKETS, length, now):
                payload = bytes(data[4 : 4 + length])
                self._commands.append(ForwardToWorker(owner, (peer[0], port), peer, payload))
            return None
        if not self._metered(self._allocations[sender], OUT_PACKETS, length, now):
            return None
        target = self._p2c.get((peer[1], (peer[0], port)))
        if target is None:
            self._deliver_to_allocation(bytes(data[4 : 4 + length]), peer, port, now)
            return None
        if not self._metered(target_allocation, IN_PACKETS, length, now):
            return None
        self.stats.count_relayed(length)
        return LoopToClient(target.to_client.client, target.number, length)

    def _other_worker(self, port: int) -> int | None:
        """The worker of several whose share holds ``port``, if it is not this one."""
        shares = self._shares
        if shares is None:
            return None
        owner = shares.owner(port)
        return None if owner == self._worker else owner

    def handle_forwarded(
        self, from_relayed_addr: Addr, to_port: int, payload: bytes, now: float
    ) -> ToClient | None:
        """The relay loop from another worker (its ``ForwardToWorker``): ``payload`` left
        that worker's allocation ``from_relayed_addr`` for our allocation on ``to_port``.
        Judged as a datagram of the peer ``from_relayed_addr`` on ``to_port``
        (``handle_peer_traffic``: the channel bound to it, else a permission for its address,
        else dropped), and answered the same way: a ``ToClient`` to send as ChannelData, or
        a Data indication among the commands."""
        shares = self._shares
        host, from_port = from_relayed_addr
        if (
            shares is None
            or host not in self._own_hosts
            or shares.owner(from_port) in (None, self._worker)
            or shares.owner(to_port) != self._worker
            or len(payload) > 0xFFFF
        ):
            self.stats.unroutable_datagrams += 1
            return None
        return self.handle_peer_traffic(payload, from_relayed_addr, to_port, now)

    def _deliver_to_allocation(self, data: bytes, peer: Addr, from_port: int, now: float) -> None:
        """What the allocation on ``peer``'s port would do with ``data`` arriving from our
        own allocation ``from_port``: ChannelData if a channel is bound, else a Data
        indication if permitted (both as commands: this is not the hot path)."""
        source = (peer[0], from_port)
        target = self._p2c.get((peer[1], source))
        if target is None:
            self._data_indication(data, source, peer[1], now)
            return
        if not self._metered(self._by_port[peer[1]], IN_PACKETS, len(data), now):
            return
        self.stats.count_relayed(len(data))
        client, channel = target.to_client
        self._commands.append(SendMessage(struct.pack("!HH", channel, len(data)) + data, client))

    # --- failed binds and shutdown -----------------------------------------------------

    def handle_allocation_failed(self, port: int, now: float | None = None) -> None:
        """The I/O layer could not bind ``port`` (another local socket holds it: Linux's
        ephemeral range overlaps ours). Called while the pipeline drains the commands, so
        the Allocate's success response is normally still queued: then the allocation
        moves to another free port (up to ``MAX_BIND_ATTEMPTS`` ports in all), its
        ``CreateAllocation`` commands are queued again before the response, and the
        response (and its cached copy) names the new port. Otherwise, or out of tries, or
        for EVEN-PORT/RESERVATION-TOKEN allocations, the allocation is dropped and a queued
        success becomes 508. With ``now``, the port is avoided for a while either way."""
        try:
            self._rebind.failed(port, now)
        except Exception:
            self._internal_error("handling a failed allocation", now if now is not None else 0.0)

    def handle_client_closed(self, client: FiveTuple, now: float) -> None:
        """A stream client's connection closed: its allocation goes at once (RFC 8656 §3.1:
        on TCP and TLS the allocation lives as long as the connection)."""
        self._forget_waiting(client)
        allocation = self._allocations.get(client)
        if allocation is not None:
            log.info(
                "%s closed its connection: allocation on port %d freed", client, allocation.port
            )
            self._table.remove(allocation)

    def free_all(self) -> None:
        """Shutdown: delete every allocation, emitting the commands that undo them."""
        for client in list(self._waiting_clients):
            self._forget_waiting(client)
        for allocation in list(self._allocations.values()):
            self._table.remove(allocation)


def _releaser(
    registry: Reservations | None, worker: int, commands: deque[Command]
) -> Callable[[int], None]:
    """How a core tells the registry that an allocation ended: its own registry directly,
    the supervisor's through a command."""
    if registry is not None:
        return functools.partial(registry.release, worker)

    def emit(ticket: int) -> None:
        commands.append(ReleaseAllocation(ticket))

    return emit


def _peer_policy(config: ServerConfig) -> PeerPolicy:
    return PeerPolicy(
        allow_loopback=config.allow_loopback_peers,
        allow_private=config.allow_private_peers,
        own_addresses=frozenset(
            str(ipaddress.ip_address(a)) for a in (config.public_ip4, config.public_ip6) if a
        ),
        host_addresses=frozenset(
            str(ipaddress.ip_address(a.split("%")[0])) for a in config.local_addresses
        ),
        lowest_port=config.lowest_port,
        highest_port=config.highest_port,
        listen_port=config.listen_port,
        allowed=networks(config.allowed_peer_ips),
        denied=networks(config.denied_peer_ips),
    )


def _effective_lifetime(requested: int | None) -> int:
    """RFC 8656 §7.2: min(requested, max), and never below the default."""
    if requested is None:
        return DEFAULT_LIFETIME
    return max(DEFAULT_LIFETIME, min(requested, MAX_LIFETIME))


def _find_value(raw: bytes, attr_type: int) -> tuple[int, int] | None:
    """Byte span of the first ``attr_type`` value in a parsed message's raw bytes."""
    offset = 20
    while offset + 4 <= len(raw):
        found, length = _unpack_hh(raw, offset)
        if found == attr_type:
            return offset + 4, offset + 4 + length
        offset += 4 + length + (-length % 4)
    return None


#: the requests the server answers (anything else is 400); Send indications and
#: ChannelData take the data paths of ``handle_client_input``
_HANDLERS: dict[int, Callable[[Server, Message, FiveTuple, float], None]] = {
    Method.BINDING: Server._on_binding,
    Method.ALLOCATE: Server._on_allocate,
    Method.REFRESH: Server._on_refresh,
    Method.CREATE_PERMISSION: Server._on_create_permission,
    Method.CHANNEL_BIND: Server._on_channel_bind,
}

#: what a due timer record means: re-check the state it names and act (or re-arm)
_TIMER_HANDLERS: dict[type[TimerRecord], Callable[[Server, Any, float], None]] = {
    AllocationExpiry: Server._on_allocation_expiry,
    ChannelExpiry: Server._on_channel_expiry,
    PermissionExpiry: Server._on_permission_expiry,
    ReservationExpiry: Server._on_reservation_expiry,
    QuarantineExpiry: Server._on_quarantine_expiry,
    ReservationWaitExpiry: Server._on_reservation_wait_expiry,
}
