"""Per-allocation byte buckets: ``--allocation-rate-limit`` (bytes per second, each direction).

One bucket per allocation and direction, as coturn's ``max-bps`` treats input and output
separately. A datagram passes when the bucket holds its length in tokens; otherwise it is
dropped whole (never truncated) and counted as ``rate_limited``. The bucket holds at most a
tenth of a second of traffic, and never less than one largest UDP payload, so a datagram of any
size can pass at the configured rate.
"""

from __future__ import annotations

__all__ = ["ByteBucket", "burst_for"]

#: the largest UDP payload: a bucket must hold at least this much, or big datagrams never pass
MAX_DATAGRAM = 65_535


def burst_for(rate: float) -> float:
    """The bucket's depth for ``rate`` bytes per second."""
    return max(rate / 10.0, float(MAX_DATAGRAM))


class ByteBucket:
    """A token bucket of bytes; time is passed in (sans-IO)."""

    __slots__ = ("burst", "last", "rate", "tokens")

    def __init__(self, rate: float, now: float) -> None:
        if not rate > 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = burst_for(rate)
        self.tokens = self.burst
        self.last = now

    def take(self, length: int, now: float) -> bool:
        """Take ``length`` bytes; False (and nothing taken) when there are not enough."""
        tokens = self.tokens + (now - self.last) * self.rate
        self.last = now
        if tokens > self.burst:
            tokens = self.burst
        if tokens < length:
            self.tokens = tokens
            return False
        self.tokens = tokens - length
        return True
