"""Per-source token buckets for answers we give before a client has authenticated.

Unauthenticated answers (Binding, 401 challenges, 400/420 errors) are what a reflection
attack uses: a spoofed source gets a bigger datagram than it sent. A bucket per source IP
caps that; the table is an LRU of bounded size, so spoofed sources cannot grow memory.
"""

from __future__ import annotations

from collections import OrderedDict


class RateLimiter:
    def __init__(self, rate: float, burst: float | None = None, max_sources: int = 65_536) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = burst if burst is not None else 2 * rate
        self.max_sources = max_sources
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, source: str, now: float) -> bool:
        """Take one token from ``source``'s bucket; False if it is empty."""
        buckets = self._buckets
        entry = buckets.get(source)
        if entry is None:
            tokens = self.burst
            if len(buckets) >= self.max_sources:
                buckets.popitem(last=False)
        else:
            tokens, last = entry
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            buckets.move_to_end(source)
        if tokens < 1.0:
            buckets[source] = (tokens, now)
            return False
        buckets[source] = (tokens - 1.0, now)
        return True
