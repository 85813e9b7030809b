"""Counters that every replica shares, in a NATS KV bucket whose max age is the counting
window (login throttles, LOGIN-DELAY): one key encoding (kit.counter_keys), compare-and-set
increments.
Uses kit.bus only (never nats)."""

from __future__ import annotations

import sys

from postbus.kit.bus import Bus, ErrorMap, KvBucket, raising
from postbus.kit.counter_keys import account_key, ip_key, kv_key

__all__ = ["KvCounters", "kv_key", "ip_key", "account_key"]  # the keys live in kit.counter_keys


class KvCounters:
    """Counts by text key; a key disappears a window after its last increment (the
    bucket's max age). Raises BusUnavailable, or what ``errors`` makes of it."""

    def __init__(self, bucket: KvBucket, *, errors: ErrorMap | None = None) -> None:
        self.bucket = bucket
        self.errors = errors

    @classmethod
    async def open(cls, bus: Bus, bucket: str, window_s: float, *,
                   errors: ErrorMap | None = None) -> KvCounters:
        """The bucket named ``bucket`` (created with max age ``window_s`` if absent)."""
        with raising(errors):
            return cls(await bus.kv_bucket(bucket, ttl_s=window_s), errors=errors)

    async def get(self, key: str) -> int:
        """The count, 0 when absent, expired or unreadable."""
        with raising(self.errors):
            e = await self.bucket.get(kv_key(key))
        try:
            return int(e.value) if e is not None else 0
        except ValueError:
            return 0

    async def incr(self, key: str) -> int:
        """Add one; the new count. Replicas counting at once never lose a unit."""
        n = await self.incr_below(key, sys.maxsize)
        assert n is not None
        return n

    async def incr_below(self, key: str, limit: int) -> int | None:
        """Add one unless the count is ``limit`` or more already: the new count, or None
        at the limit (parallel callers cannot both take the last unit)."""
        with raising(self.errors):
            return await self.bucket.incr_below(kv_key(key), limit)

    async def reset(self, key: str) -> None:
        with raising(self.errors):
            await self.bucket.delete(kv_key(key))
