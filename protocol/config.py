"""The core's configuration: one frozen record, validated when it is made.

``firezone_relay.actors.cli.settings_from_args`` is the one place it is built from flags.
"""

from __future__ import annotations

from dataclasses import dataclass

from firezone_relay.protocol.auth import FIREZONE_REALM
from firezone_relay.protocol.policy import networks
from firezone_relay.protocol.ports import PortShares

__all__ = ["DEFAULT_MAX_ALLOCATIONS_PER_USER", "ServerConfig"]

#: with the rest scheme (and firezone's) when --max-allocations-per-user is not given
DEFAULT_MAX_ALLOCATIONS_PER_USER = 256


@dataclass(frozen=True, slots=True)
class ServerConfig:
    public_ip4: str | None = None
    public_ip6: str | None = None
    listen_port: int = 3478
    lowest_port: int = 49152
    highest_port: int = 65535
    auth_scheme: str = "firezone"
    realm: str = FIREZONE_REALM
    allow_loopback_peers: bool = False
    allow_private_peers: bool = False
    #: CIDRs always allowed as peers (override ``denied_peer_ips`` and the built-in
    #: refusals other than port 0, unspecified, broadcast, multicast and our listen port)
    allowed_peer_ips: tuple[str, ...] = ()
    #: CIDRs refused as peers on top of the built-in refusals
    denied_peer_ips: tuple[str, ...] = ()
    #: total allocations; None = as many as the port range holds. The daemon may lower it
    #: (e.g. from the file-descriptor limit) with ``dataclasses.replace`` before building
    #: the Server; beyond it Allocate gets 508.
    max_allocations: int | None = None
    #: allocations per user (the part after ``<expiry>:``); None = 256 (486 beyond)
    max_allocations_per_user: int | None = None
    max_channels_per_allocation: int = 1024
    max_permissions_per_allocation: int = 1024
    #: a new Allocate frees the username's previous allocation (Firezone's rule, for NATs
    #: that flip source ports). None: on for the firezone scheme, off for rest, whose
    #: credentials WebRTC apps share across a user's peer connections.
    single_allocation_per_username: bool | None = None
    #: unauthenticated answers per second per source IP (burst twice that); None = no limit
    unauthenticated_rate_limit: float | None = None
    #: relayed payload bytes per second per allocation, each direction; None = no limit
    allocation_rate_limit: float | None = None
    #: this host's interface addresses (loopback, behind a 1:1 NAT the relay's private
    #: address): refused as peers unless allowed, so a client cannot reach the host's own
    #: services through the relay
    local_addresses: frozenset[str] = frozenset()
    nonce_lifetime: float = 3600.0
    #: every duration (lifetimes, permissions, channels, nonces) is multiplied by this; the
    #: values on the wire stay nominal. Only for simulations and tests of real-time expiry.
    time_scale: float = 1.0
    nonce_uses: int = 10_000
    software: str = "firezone-relay-py; rev=0.1.0"
    #: the relay's worker processes (``--num-worker-threads``) and which one this core is:
    #: it allocates only in its share of the port range (``port_share``), hands the relay
    #: loop to another worker's share to that worker (``ForwardToWorker``), asks the
    #: supervisor's registry before it grants an Allocate (``ReserveAllocation``), and
    #: answers unauthenticated requests at ``unauthenticated_rate_limit / workers``. With
    #: one worker everything stays inside the core.
    workers: int = 1
    worker: int = 0

    def __post_init__(self) -> None:
        if self.public_ip4 is None and self.public_ip6 is None:
            raise ValueError("Must listen on at least one of IPv4 or IPv6")
        if self.auth_scheme not in ("firezone", "rest"):
            raise ValueError(f"unknown auth scheme {self.auth_scheme!r}")
        if not 0 < self.lowest_port <= self.highest_port <= 65535:
            raise ValueError("bad allocation port range")
        if not self.time_scale > 0:
            raise ValueError("time_scale must be positive")
        if not 0 <= self.worker < self.workers:
            raise ValueError(f"worker {self.worker} of {self.workers}")
        PortShares(self.lowest_port, self.highest_port, self.workers)  # enough ports each
        networks(self.allowed_peer_ips)  # raises ValueError on a bad CIDR
        networks(self.denied_peer_ips)

    @property
    def allocation_limit(self) -> int:
        """Allocations the server grants at most: the configured cap, never more than the
        ports of the range."""
        ports = self.highest_port - self.lowest_port + 1
        return ports if self.max_allocations is None else min(self.max_allocations, ports)

    @property
    def port_shares(self) -> PortShares:
        return PortShares(self.lowest_port, self.highest_port, self.workers)

    @property
    def port_share(self) -> tuple[int, int]:
        """The first and last port this worker allocates."""
        return self.port_shares.of(self.worker)

    @property
    def allocations_per_user_limit(self) -> int:
        cap = self.max_allocations_per_user
        return DEFAULT_MAX_ALLOCATIONS_PER_USER if cap is None else cap
