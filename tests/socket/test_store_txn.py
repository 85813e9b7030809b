"""The store's Writer (txn.py) on a real SQLite file: waiting transactions share one commit,
each in a savepoint, so a refused one changes nothing and the others still commit; a
transaction alone needs no savepoint and behaves the same."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from postbus.mailbox_store import db
from postbus.mailbox_store.txn import GROUP, Writer


class Refused(Exception):
    pass


async def _engine(tmp_path: Path) -> AsyncEngine:
    engine = db.create_engine(f"sqlite:///{tmp_path / 'w.db'}")
    async with engine.begin() as conn:
        await conn.execute(text("CREATE TABLE t (v INTEGER PRIMARY KEY)"))
    return engine


async def _values(engine: AsyncEngine) -> list[int]:
    async with engine.connect() as conn:
        return list((await conn.execute(text("SELECT v FROM t ORDER BY v"))).scalars())


def _insert(v: int, refuse: bool = False) -> Callable[[AsyncConnection], Awaitable[int]]:
    async def tx(conn: AsyncConnection) -> int:
        await conn.execute(text("INSERT INTO t (v) VALUES (:v)"), {"v": v})
        if refuse:
            raise Refused(str(v))  # after its write: the write must be undone
        return v
    return tx


def _commits() -> float:
    return next(s.value for s in GROUP.collect()[0].samples if s.name.endswith("_count"))


async def test_a_refused_transaction_in_a_group_changes_nothing_and_the_others_commit(
        tmp_path: Path) -> None:
    engine = await _engine(tmp_path)
    try:
        w = Writer(engine)
        before = _commits()
        results = await asyncio.gather(w.write(_insert(1)), w.write(_insert(2, refuse=True)),
                                       w.write(_insert(3)), return_exceptions=True)
        assert results[0] == 1 and results[2] == 3 and isinstance(results[1], Refused)
        assert await _values(engine) == [1, 3]
        assert _commits() - before == 1  # the three shared one commit
    finally:
        await engine.dispose()


async def test_a_transaction_alone_commits_or_is_rolled_back_whole(tmp_path: Path) -> None:
    engine = await _engine(tmp_path)
    try:
        w = Writer(engine)
        assert await w.write(_insert(7)) == 7
        with pytest.raises(Refused):
            await w.write(_insert(8, refuse=True))
        assert await w.write(_insert(9)) == 9
        assert await _values(engine) == [7, 9]
    finally:
        await engine.dispose()


async def test_a_failed_delivery_batch_is_retried_one_by_one() -> None:
    """The delivery batcher (groupcommit.py): a batch whose transaction fails is run again
    one delivery at a time; the bad one gets its exception, the others their outcome."""
    from postbus.mailbox_store.groupcommit import _Batcher
    from postbus.mailbox_store.outcomes import DeliverOutcome

    runs: list[list[str]] = []

    async def run(jobs: list[Any]) -> list[DeliverOutcome]:
        runs.append([j.queue_id for j in jobs])
        if any(j.queue_id == "bad" for j in jobs):
            raise Refused("bad")
        return [DeliverOutcome("delivered", uid=i + 1) for i in range(len(jobs))]

    b = _Batcher(run)
    jobs = [SimpleNamespace(queue_id=q) for q in ("a", "bad", "c")]
    got = await asyncio.gather(*(b.submit(j) for j in jobs), return_exceptions=True)  # type: ignore[arg-type]
    assert runs[0] == ["a", "bad", "c"] and sorted(runs[1:]) == [["a"], ["bad"], ["c"]]
    assert isinstance(got[1], Refused)
    assert [g.status for g in (got[0], got[2])] == ["delivered", "delivered"]  # type: ignore[union-attr]
