"""The store's SQL engine (SQLite in the loop's thread, or PostgreSQL via asyncpg), its migrations
(Alembic, applied at start-up) and the readiness check.

Only this module, the repositories and the migrations touch SQLAlchemy engines.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from postbus.kit.logging import get_logger
from postbus.mailbox_store import sqlite_inline  # registers sqlite+postbus

HERE = Path(__file__).resolve().parent
ALEMBIC_INI = HERE / "alembic.ini"
MIGRATIONS = HERE / "migrations"

# pg_advisory_lock key for "running migrations" (any constant shared by every replica)
MIGRATION_LOCK_KEY = 0x706F_7374_6275_73  # "postbus"
# execution option asking for BEGIN IMMEDIATE on SQLite (a write transaction)
IMMEDIATE = "postbus_sqlite_immediate"
_jobs_log = get_logger("postbus.mailbox_store.jobs")


def normalize_url(url: str) -> str:
    """Accept the plain driver-less spellings and pick the async drivers."""
    for plain in ("postgresql://", "postgres://", "postgresql+psycopg2://", "postgresql+psycopg://"):
        if url.startswith(plain):
            return "postgresql+asyncpg://" + url[len(plain):]
    for plain in ("sqlite://", "sqlite+aiosqlite://", "sqlite+pysqlite://"):
        if url.startswith(plain):
            # SQLite runs in the loop's thread (sqlite_inline, ADR 0006)
            return "sqlite+postbus://" + url[len(plain):]
    return url


def is_sqlite(engine: AsyncEngine | AsyncConnection | Connection) -> bool:
    return engine.dialect.name == "sqlite"


def create_engine(url: str, *, pool_size: int = 10, sqlite_synchronous: str = "FULL",
                  echo: bool = False, connect_args: dict[str, Any] | None = None,
                  read_only: bool = False) -> AsyncEngine:
    """An engine with the right connection set-up for the dialect.

    SQLite (run in the loop's thread, see sqlite_inline): WAL (readers never block the
    writer), waits for another writer done by sqlite_inline without blocking the loop,
    foreign keys on, and explicit transaction control so a write
    transaction starts with ``BEGIN IMMEDIATE`` (it takes the write lock up front instead
    of failing to upgrade a read lock later).

    ``read_only``: a reader beside the store (imap-access, ADR 0012) that must never write:
    SQLite opens the file with ``mode=ro`` (and never creates it), PostgreSQL sessions run
    with ``default_transaction_read_only``.
    """
    url = normalize_url(url)
    kw: dict[str, Any] = {"echo": echo, "pool_pre_ping": True}
    if url.startswith("sqlite"):
        path = url.split("///", 1)[1] if "///" in url else ""
        if read_only and path and path != ":memory:" and not path.startswith("file:"):
            url = f"{url.split('///', 1)[0]}///file:{Path(path).resolve()}?mode=ro&uri=true"
        elif path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        kw["pool_pre_ping"] = False
    elif read_only and url.startswith("postgresql+asyncpg"):
        connect_args = {**(connect_args or {}), "server_settings": {
            **(connect_args or {}).get("server_settings", {}),
            "default_transaction_read_only": "on"}}
    # connections beyond pool_size are closed when returned: for SQLite each one is a file
    # open and four PRAGMAs, so under load a small pool reconnects all the time
    kw.update(pool_size=pool_size, max_overflow=pool_size)
    if connect_args:
        kw["connect_args"] = {**kw.get("connect_args", {}), **connect_args}
    engine = create_async_engine(url, **kw)
    if engine.dialect.name == "sqlite":
        sync = sqlite_synchronous.upper()
        if sync not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"sqlite synchronous must be OFF/NORMAL/FULL/EXTRA, not {sync}")

        @event.listens_for(engine.sync_engine, "connect")
        def _on_connect(dbapi_conn: Any, _rec: Any) -> None:
            dbapi_conn.isolation_level = None  # we emit BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=0")  # sqlite_inline waits, off the loop
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute(f"PRAGMA synchronous={sync}")
            cur.close()

        @event.listens_for(engine.sync_engine, "begin")
        def _on_begin(conn: Connection) -> None:
            immediate = bool(conn.get_execution_options().get(IMMEDIATE))
            dbapi = conn.connection.dbapi_connection
            if isinstance(dbapi, sqlite_inline.AdaptedConnection):
                dbapi.begin(immediate)
            else:
                conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


# ---------------------------------------------------------------- migrations
# Alembic keeps its context in module globals: one migration at a time per process (a lock
# per event loop, as tests run one loop per test)
_MIGRATE_LOCKS: dict[int, asyncio.Lock] = {}


def _migrate_lock() -> asyncio.Lock:
    loop = asyncio.get_running_loop()
    return _MIGRATE_LOCKS.setdefault(id(loop), asyncio.Lock())


def _alembic_config(connection: Connection | None = None) -> Any:
    from alembic.config import Config

    cfg = Config(str(ALEMBIC_INI))
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def _upgrade(connection: Connection, revision: str = "head") -> None:
    import logging

    # alembic logs every plugin it loads (at import) at INFO; keep WARNING and up
    logging.getLogger("alembic").setLevel(logging.WARNING)
    from alembic import command

    command.upgrade(_alembic_config(connection), revision)


async def migrate(engine: AsyncEngine, revision: str = "head") -> None:
    """``alembic upgrade head`` on this engine.

    On PostgreSQL an advisory lock makes replicas that start together take turns: the
    first applies the migrations, the others then find nothing left to do.
    """
    async with _migrate_lock(), engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            await conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": MIGRATION_LOCK_KEY})
            await conn.commit()
            try:
                await conn.run_sync(_upgrade, revision)
                await conn.commit()
            finally:
                await conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": MIGRATION_LOCK_KEY})
                await conn.commit()
        else:
            # one writer at a time across processes: take the write lock up front
            await conn.execution_options(**{IMMEDIATE: True})
            await conn.run_sync(_upgrade, revision)
            await conn.commit()


@contextlib.asynccontextmanager
async def leader(engine: AsyncEngine, key: int) -> AsyncIterator[bool]:
    """True when this replica may run a job only one replica should run at a time (blob
    GC): a PostgreSQL session advisory lock, held for the block. SQLite (replicas on one
    machine): an exclusive flock on a file beside the database."""
    if engine.dialect.name != "postgresql":
        path = engine.url.database
        if not path or path == ":memory:":
            yield True
            return
        fd = os.open(f"{path}.leader-{key:x}", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
        return
    async with engine.connect() as conn:
        got = bool((await conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key})).scalar())
        await conn.commit()
        try:
            yield got
        finally:
            if got:
                await conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                await conn.commit()


async def run_periodically(engine: AsyncEngine, lock_key: int, interval_s: float,
                           job: Callable[[], Awaitable[object]], what: str) -> None:
    """Run ``job`` every ``interval_s`` on the one replica that holds ``lock_key``; a failed
    pass is logged and retried at the next interval."""
    while True:
        try:
            async with leader(engine, lock_key) as lead:
                if lead:
                    await job()
        except asyncio.CancelledError:
            raise
        except Exception:
            _jobs_log.exception(f"{what} failed; next pass later")
        await asyncio.sleep(interval_s)


def head_revision() -> str:
    """The migration this code expects the schema to be at (Alembic's head)."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    if head is None:
        raise RuntimeError("no migrations")
    return head


async def schema_revision(engine: AsyncEngine) -> str | None:
    """The migration the database is at; None before the first one ran."""
    async with engine.connect() as conn:
        try:
            return (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalar()
        except Exception:  # no table yet: the store has not migrated
            return None


async def check(engine: AsyncEngine) -> None:
    """Readiness: the database answers ``SELECT 1``."""
    async with engine.connect() as conn:
        await asyncio.wait_for(conn.execute(text("SELECT 1")), 5)


@contextlib.asynccontextmanager
async def open_database(url: str, *, pool_size: int = 10, sqlite_synchronous: str = "FULL",
                        run_migrations: bool = True) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(url, pool_size=pool_size, sqlite_synchronous=sqlite_synchronous)
    try:
        if run_migrations:
            await migrate(engine)
        yield engine
    finally:
        await engine.dispose()
