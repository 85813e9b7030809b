"""Write transactions of the store: group commit on SQLite, one transaction each on
PostgreSQL. Every write of the repository goes through ``Writer.write``.

SQLite has one writer at a time. Taking turns through a lock cost one turn of the event
loop per transaction, and under load a turn is several milliseconds: IMAP STORE, EXPUNGE
and APPEND queued for 100+ ms behind each other at 90 writes a second, while each took
about one millisecond of work. Here the transactions that are waiting run one after the
other inside one ``BEGIN IMMEDIATE`` ... ``COMMIT`` (one fsync), each in a savepoint so a
refused one (over quota, not found) changes nothing and the others still commit. Results
are handed out only after the COMMIT: a caller that hears "done" has a durable change.

PostgreSQL lets replicas and transactions write at once (row locks order them), so each
write is its own transaction there, retried on deadlock or serialization failure.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from postbus.kit.logging import get_logger
from postbus.kit.metrics import histogram
from postbus.mailbox_store.db import IMMEDIATE
from postbus.mailbox_store.prepared import driver_execute

T = TypeVar("T")
Tx = Callable[[AsyncConnection], Awaitable[Any]]

log = get_logger(__name__)
GROUP = histogram("postbus_store_group_commit_size", "Write transactions per SQLite commit",
                  buckets=(1, 2, 4, 8, 16, 32, 64))
# waiting transactions run in one commit, at most this many (bounds how long the first waits)
MAX_GROUP = 32


def retryable(exc: DBAPIError) -> bool:
    """Deadlock, serialization failure or a busy SQLite: the whole transaction may be redone."""
    orig = exc.orig
    code = getattr(orig, "sqlstate", None) or getattr(getattr(orig, "__cause__", None),
                                                      "sqlstate", None)
    if code in ("40P01", "40001"):
        return True
    text = str(orig).lower()
    return "database is locked" in text or "deadlock detected" in text


async def settle(fut: asyncio.Future[T], work: Awaitable[T]) -> None:
    """Hand ``work``'s result, or its exception, to the caller waiting on ``fut`` (unless
    that caller gave up)."""
    try:
        result = await work
    except Exception as exc:
        if not fut.done():
            fut.set_exception(exc)
    else:
        if not fut.done():
            fut.set_result(result)


class Writer:
    def __init__(self, engine: AsyncEngine, *, max_group: int = MAX_GROUP) -> None:
        self.engine = engine
        self.sqlite = engine.dialect.name == "sqlite"
        self.max_group = max_group
        self._pending: list[tuple[Tx, asyncio.Future[Any]]] = []
        self._worker: asyncio.Task[None] | None = None

    async def write(self, fn: Callable[[AsyncConnection], Awaitable[T]], attempts: int = 5) -> T:
        """Run ``fn`` in a write transaction; returns once its change is committed."""
        if not self.sqlite:
            return await self._alone(fn, attempts)
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending.append((fn, fut))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain(), name="store-group-commit")
        return await fut

    async def _alone(self, fn: Callable[[AsyncConnection], Awaitable[T]], attempts: int) -> T:
        for i in range(attempts):
            try:
                async with self._begin() as conn:
                    return await fn(conn)
            except DBAPIError as exc:
                if i + 1 < attempts and retryable(exc):
                    log.warning("write transaction retried", error=str(exc.orig)[:200])
                    await asyncio.sleep(0.01 * (2 ** i))
                    continue
                raise
        raise AssertionError("unreachable")

    @contextlib.asynccontextmanager
    async def _begin(self) -> AsyncIterator[AsyncConnection]:
        async with self.engine.connect() as conn:
            if self.sqlite:
                await conn.execution_options(**{IMMEDIATE: True})
            async with conn.begin():
                yield conn

    async def _drain(self) -> None:
        while self._pending:
            group, self._pending = (self._pending[:self.max_group],
                                    self._pending[self.max_group:])
            group = [(fn, fut) for fn, fut in group if not fut.done()]  # cancelled callers
            if group:
                await self._commit_group(group)

    async def _one(self, fn: Tx, fut: asyncio.Future[Any]) -> None:
        """One transaction on its own, its outcome handed to its caller."""
        await settle(fut, self._alone(fn, 5))

    async def _commit_group(self, group: list[tuple[Tx, asyncio.Future[Any]]]) -> None:
        GROUP.observe(len(group))
        if len(group) == 1:  # nothing to keep it apart from: no savepoint
            await self._one(*group[0])
            return
        outcomes: list[tuple[bool, Any]] = []
        try:
            async with self._begin() as conn:
                for fn, _ in group:
                    # plain SQL: begin_nested() compiled SAVEPOINT and RELEASE anew each time
                    # (7 % of the store's CPU under imaptest)
                    await driver_execute(conn, "SAVEPOINT g")
                    try:
                        value = await fn(conn)
                    except Exception as exc:
                        if isinstance(exc, DBAPIError) and retryable(exc):
                            raise  # the whole group is redone, one at a time
                        # a refusal (or a failed statement): undone to its savepoint
                        await driver_execute(conn, "ROLLBACK TO g")
                        await driver_execute(conn, "RELEASE g")
                        outcomes.append((False, exc))
                    else:
                        await driver_execute(conn, "RELEASE g")
                        outcomes.append((True, value))
        except Exception as exc:
            # BEGIN or COMMIT failed (or a busy database): nothing of the group is stored;
            # run each alone so one bad transaction fails only itself
            log.warning("group commit failed; writing one at a time", error=str(exc)[:200],
                        size=len(group))
            for fn, fut in group:
                await self._one(fn, fut)
            return
        for (_, fut), (ok, value) in zip(group, outcomes, strict=True):
            if fut.done():
                continue
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)
