"""Prepared statements (services/mailbox-store/prepared.py) give what SQLAlchemy's own
execution gives, on SQLite and PostgreSQL: the same rows and types (datetimes, booleans,
bytes), literals bound in the statement, named rows, row counts, executemany, and they
run inside the transaction SQLAlchemy began (a rollback undoes them)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import bindparam, func, insert, select, update
from test_store_core_contract import BACKENDS, add_account, drop, make_engine

from postbus.mailbox_store.prepared import Prepared
from postbus.mailbox_store.sqlbase import A, B, uid_bounds


@pytest.fixture(params=BACKENDS)
async def engine(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    eng, schema, _ = await make_engine(request.param, tmp_path)
    yield eng
    await drop(request.param, eng, schema)


async def test_rows_match_sqlalchemy(engine) -> None:  # type: ignore[no-untyped-def]
    aid = await add_account(engine, "alice@example.test")
    when = datetime(2026, 12, 3, 7, 30, 1, 250000, tzinfo=UTC)
    async with engine.begin() as conn:
        await conn.execute(insert(B).values(key="k1", size=3, refcount=1,
                                            unreferenced_since=when))
    # a literal inside the statement (substr's 1, the concatenated "-"), a boolean, a datetime
    stmt = select(A.c.id, A.c.enabled, func.substr(A.c.address, 1, 5).concat("-"),
                  B.c.unreferenced_since, B.c.size).join_from(A, B, A.c.id > 0).where(
        A.c.id == bindparam("p_id"), B.c.key == bindparam("p_key"))
    prepared = Prepared(stmt, named=True)
    async with engine.connect() as conn:
        await conn.begin()
        want = [tuple(r) for r in (await conn.execute(stmt, {"p_id": aid, "p_key": "k1"})).all()]
        got = await prepared.rows(conn, p_id=aid, p_key="k1")
    assert got == want
    row = got[0]
    assert row.enabled is True and row.size == 3
    assert row.unreferenced_since.replace(tzinfo=UTC) == when


async def test_writes_counts_many_and_rollback(engine) -> None:  # type: ignore[no-untyped-def]
    await add_account(engine, "alice@example.test")
    add = Prepared(insert(B), column_keys=("key", "size", "refcount"))
    bump = Prepared(update(B).where(B.c.key == bindparam("p_key"))
                    .values(refcount=B.c.refcount + bindparam("p_n")))
    async with engine.begin() as conn:
        await add.many(conn, [{"key": f"k{i}", "size": i, "refcount": 1} for i in range(5)])
        assert await bump.run(conn, p_key="k3", p_n=4) == 1
        assert await bump.run(conn, p_key="nope", p_n=4) == 0
    async with engine.connect() as conn:
        await conn.begin()
        await bump.run(conn, p_key="k1", p_n=100)
        await conn.rollback()  # the prepared write was inside SQLAlchemy's transaction
    async with engine.connect() as conn:
        counts = dict((await conn.execute(select(B.c.key, B.c.refcount))).all())
    assert counts == {"k0": 1, "k1": 1, "k2": 1, "k3": 5, "k4": 1}


async def test_mailbox_query_with_exists_columns(engine) -> None:  # type: ignore[no-untyped-def]
    from postbus.mailbox_store.repository import Repository

    aid = await add_account(engine, "alice@example.test")
    repo = Repository(engine)
    await repo.ensure_defaults(aid)
    await repo.create_mailbox(aid, "Work/Projects")
    info = await repo.status(aid, "Work")
    assert "\\HasChildren" in info.attributes and info.messages == 0
    assert [i.name for i in await repo.list_mailboxes(aid)] == sorted(
        ["INBOX", "Drafts", "Sent", "Trash", "Junk", "Archive", "Work", "Work/Projects"])


def test_uid_bounds() -> None:
    assert uid_bounds([[3, 9]])[:2] == (3, 9)
    lo, hi, inside = uid_bounds([[5, 5], [1, 2], [9, 10]])  # type: ignore[misc]
    assert (lo, hi) == (1, 10)
    assert [u for u in range(0, 12) if inside(u)] == [1, 2, 5, 9, 10]
    assert uid_bounds([[1, 1], [5000, 5000]]) is None  # too wide a span: use uid_filter
    lo, hi, inside = uid_bounds([])  # type: ignore[misc]
    assert lo > hi and not inside(1)
