"""Per-source token buckets for answers we give before a client has authenticated.

Unauthenticated answers (Binding, 401 challenges, 400/420 errors) are what a reflection
attack uses: a spoofed source gets a bigger datagram than it sent. A bucket per source IP
caps that; the table is an LRU of bounded size, so spoofed sources cannot grow memory.

A relay of N workers gives each worker ``for_workers(rate, N)``: a share of the rate and of
the burst, so that whatever worker each datagram reaches, a source gets at most ``rate``
answers a second from the relay as a whole, plus a burst of ``max(2 * rate, N)`` (each worker
keeps at least one token). That is exact as an upper bound with no traffic between workers:
a spoofed source's datagrams spread over the workers by their 5-tuples and each worker
answers its share. The price is on the other side: a source whose datagrams all reach one
worker (one 5-tuple: the kernel pins a 5-tuple to its worker) gets ``rate / N``.
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

    @classmethod
    def for_workers(cls, rate: float, workers: int, max_sources: int = 65_536) -> RateLimiter:
        """One worker's share of a relay-wide ``rate`` per source (see the module)."""
        share = rate / workers
        return cls(share, max(1.0, 2 * share), max_sources)

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
