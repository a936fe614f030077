"""The retransmission cache: a retransmitted request gets the response it got the first time.

Only what a retransmission needs is kept: a 16-byte digest of the request (to tell a true
retransmission from a new request reusing the transaction ID) and our response bytes, never
the request itself, so a client padding its requests to 64 KB pins 16 bytes, not 64 KB. The
cache has an entry cap and a byte budget; entries share one TTL, so insertion order is expiry
order and eviction is from the front.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

from firezone_relay.protocol.types import FiveTuple

#: bytes an entry costs beyond its response (key tuple, digest, OrderedDict node), roughly
ENTRY_OVERHEAD = 240


def request_digest(raw: bytes) -> bytes:
    return hashlib.blake2b(raw, digest_size=16).digest()


class TransactionCache:
    def __init__(
        self, ttl: float, max_entries: int = 65_536, max_bytes: int = 16 * 1024 * 1024
    ) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[tuple[FiveTuple, bytes], tuple[float, bytes, bytes]] = (
            OrderedDict()
        )

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, sender: FiveTuple, tid: bytes, raw: bytes, now: float) -> bytes | None:
        """The cached response if ``raw`` retransmits a request still in the cache."""
        entry = self._entries.get((sender, tid))
        if entry is None or entry[0] <= now or entry[1] != request_digest(raw):
            return None
        return entry[2]

    def store(
        self,
        sender: FiveTuple,
        tid: bytes,
        raw: bytes,
        response: bytes,
        now: float,
        digest: bytes | None = None,
    ) -> None:
        """Cache ``response`` to the request ``raw`` (or, when the request is no longer
        kept, to the request whose ``request_digest`` is ``digest``)."""
        key = (sender, tid)
        self.discard(sender, tid)
        if digest is None:
            digest = request_digest(raw)
        self._entries[key] = (now + self.ttl, digest, response)
        self.bytes += len(response) + ENTRY_OVERHEAD
        entries = self._entries
        while entries:
            oldest_key, oldest = next(iter(entries.items()))
            over = len(entries) > self.max_entries or self.bytes > self.max_bytes
            if not over and oldest[0] > now:
                break
            del entries[oldest_key]
            self.bytes -= len(oldest[2]) + ENTRY_OVERHEAD

    def replace_response(self, sender: FiveTuple, tid: bytes, response: bytes) -> None:
        """Swap the response of a cached transaction (a retried bind changed the port)."""
        entry = self._entries.get((sender, tid))
        if entry is not None:
            self.bytes += len(response) - len(entry[2])
            self._entries[(sender, tid)] = (entry[0], entry[1], response)

    def discard(self, sender: FiveTuple, tid: bytes) -> None:
        entry = self._entries.pop((sender, tid), None)
        if entry is not None:
            self.bytes -= len(entry[2]) + ENTRY_OVERHEAD
