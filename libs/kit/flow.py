"""Flow control shared by services: bounds on what many tasks hold at once. No I/O."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
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
