"""Shared by the test_store_dir_* / test_store_api_* / test_cli_* tests: a real SQL database
(SQLite in a temp dir; PostgreSQL too when POSTBUS_TEST_POSTGRES_URL is set), schema from
the store's own Alembic migrations, engine set-up as in production (db.py)."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from postbus.mailbox_store import db

PG_URL = os.environ.get("POSTBUS_TEST_POSTGRES_URL", "")

BACKENDS = ["sqlite", pytest.param("postgres", marks=[
    pytest.mark.postgres,
    pytest.mark.skipif(not PG_URL, reason="POSTBUS_TEST_POSTGRES_URL not set")])]


def _async_pg(url: str) -> str:
    for p in ("postgresql://", "postgres://"):
        if url.startswith(p):
            return "postgresql+asyncpg://" + url[len(p):]
    return url


async def open_db(backend: str, tmp: Path) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    """Yield a sessionmaker on a fresh, empty database; drop it afterwards."""
    if backend == "sqlite":
        # the store's own engine set-up: WAL, foreign keys, BEGIN IMMEDIATE for writes
        engine = db.create_engine(f"sqlite:///{tmp / 'dir.db'}")
        await db.migrate(engine)
        try:
            yield db.sessionmaker(engine)
        finally:
            await engine.dispose()
        return
    base = _async_pg(PG_URL)
    name = "t_" + uuid.uuid4().hex[:12]
    admin = create_async_engine(base, isolation_level="AUTOCOMMIT")
    async with admin.connect() as c:
        await c.execute(text(f'CREATE DATABASE "{name}"'))
    url = base.rsplit("/", 1)[0] + "/" + name
    engine = db.create_engine(url)
    try:
        await db.migrate(engine)
        yield db.sessionmaker(engine)
    finally:
        await engine.dispose()
        async with admin.connect() as c:
            await c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        await admin.dispose()
