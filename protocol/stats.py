"""The core's plain integer counters: the data path bumps them, telemetry reads them."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["SIZE_BUCKET", "Stats", "size_bucket"]


@dataclass(slots=True)
class Stats:
    """Plain integer counters: the data path bumps them, telemetry reads them."""

    relayed_packets_userspace: int = 0
    relayed_bytes_userspace: int = 0
    packet_size_buckets: list[int] = field(default_factory=lambda: [0] * 16)
    responses: dict[tuple[str, str, int | None], int] = field(default_factory=dict)
    dropped_datagrams: int = 0  # malformed or not for us
    unroutable_datagrams: int = 0  # well-formed, but no channel, permission or allocation
    rate_limited: int = 0
    #: relayed datagrams dropped over ``--allocation-rate-limit``
    allocation_rate_limited: int = 0
    internal_errors: int = 0

    def count_relayed(self, length: int) -> None:
        """One datagram of ``length`` payload bytes relayed in userspace: the packet and byte
        counters and ``relay.packet.size`` move together, on every relaying path."""
        self.relayed_packets_userspace += 1
        self.relayed_bytes_userspace += length
        self.packet_size_buckets[SIZE_BUCKET[length]] += 1


def size_bucket(length: int) -> int:
    """The ``relay.packet.size`` bucket of a payload: 100 bytes wide, the last one (15) for
    1500 and more; the XDP program buckets the same way."""
    return length // 100 if length < 1500 else 15


#: size_bucket of every UDP payload length, so the per-datagram count is one index
SIZE_BUCKET = bytes(size_bucket(n) for n in range(65536))
