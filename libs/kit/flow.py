"""Flow control shared by services: bounds on what many tasks hold at once. No I/O."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager


class ByteGate:
    """At most ``capacity`` bytes held at once across every task that passes through; a
    request larger than the whole capacity waits until it can hold all of it alone."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self.held = 0
        self._cond = asyncio.Condition()

    @asynccontextmanager
    async def hold(self, n: int) -> AsyncIterator[None]:
        n = max(0, min(n, self.capacity))
        async with self._cond:
            await self._cond.wait_for(lambda: self.held + n <= self.capacity)
            self.held += n
        try:
            yield
        finally:
            async with self._cond:
                self.held -= n
                self._cond.notify_all()


class RecentFailures:
    """Failures per key (a client address) within a sliding window, in this process:
    ``over(key)`` once ``limit`` happened within ``window_s``. At most ``max_keys`` keys
    are remembered (the least recently failing are forgotten first)."""

    def __init__(self, limit: int, window_s: float, max_keys: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window_s = window_s
        self.max_keys = max_keys
        self.clock = clock
        self._d: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, key: str) -> deque[float] | None:
        q = self._d.get(key)
        if q is None:
            return None
        cutoff = self.clock() - self.window_s
        while q and q[0] < cutoff:
            q.popleft()
        if not q:
            del self._d[key]
            return None
        return q

    def over(self, key: str) -> bool:
        if self.limit <= 0:
            return False
        q = self._recent(key)
        return q is not None and len(q) >= self.limit

    def add(self, key: str) -> None:
        if self.limit <= 0:
            return
        q = self._recent(key) or deque(maxlen=self.limit)
        q.append(self.clock())
        self._d[key] = q
        self._d.move_to_end(key)
        while len(self._d) > self.max_keys:
            self._d.popitem(last=False)
