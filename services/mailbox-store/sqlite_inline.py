"""SQLite for the store's async SQLAlchemy engine, run in the event loop's own thread.

aiosqlite hands every call (cursor, execute, fetch, close, commit) to a thread of its own
and waits for the answer: on a 2-core machine a mailbox STATUS of four statements took
10 ms and ``SELECT 1`` 2 ms, nearly all of it thread hand-offs, and with one writer at a
time that capped IMAP writes near 40 per second. SQLite answers an indexed query in
microseconds and commits (WAL, fsync) in a fraction of a millisecond, so here each call
runs where it is awaited. The cost: a statement blocks the loop while it runs, so queries
stay small (the store RPCs are paged).

Waiting for another writer must not block the loop (the holder may be a transaction of
this same loop): connections have no busy timeout, and a statement refused with
SQLITE_BUSY is retried after an asyncio sleep, up to ``BUSY_TIMEOUT_S``. SQLITE_BUSY_SNAPSHOT
(a read transaction that would write after another commit) is raised at once: only a new
transaction helps, which the repository's retry does.

Only the public-facing adapters of ``sqlalchemy.connectors.asyncio`` (the ones every
asyncio driver of SQLAlchemy uses) and the aiosqlite dialect's SQL behaviour are reused;
the dialect is registered as ``sqlite+postbus``. See docs/adr/0006.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Iterable, Sequence
from typing import Any, cast

from sqlalchemy.connectors.asyncio import (
    AsyncAdapt_dbapi_connection,
    AsyncAdapt_dbapi_cursor,
    AsyncAdapt_dbapi_module,
    AsyncAdapt_dbapi_ss_cursor,
    AsyncIODBAPIConnection,
)
from sqlalchemy.dialects import registry
from sqlalchemy.dialects.sqlite.aiosqlite import SQLiteDialect_aiosqlite
from sqlalchemy.util.concurrency import await_

BUSY_TIMEOUT_S = 30.0
_SQLITE_BUSY = 5


async def _retry_busy(fn: Any, *args: Any) -> Any:
    """Run ``fn`` now; while SQLite says another connection holds the lock, sleep and retry
    (the loop keeps running, so a holder in this process can finish)."""
    deadline = 0.0
    delay = 0.0005
    while True:
        try:
            return fn(*args)
        except sqlite3.OperationalError as exc:
            if getattr(exc, "sqlite_errorcode", None) != _SQLITE_BUSY:
                raise
            now = time.monotonic()
            deadline = deadline or now + BUSY_TIMEOUT_S
            if now > deadline:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)


run_busy = _retry_busy  # for prepared.py, which runs statements on sqlite3 itself


class Cursor:
    """The async cursor SQLAlchemy's asyncio adapter expects, over a sqlite3 cursor."""

    def __init__(self, cursor: sqlite3.Cursor) -> None:
        self._c = cursor

    async def __aenter__(self) -> Cursor:
        return self

    @property
    def description(self) -> Any:
        return self._c.description

    @property
    def rowcount(self) -> int:
        return self._c.rowcount

    @property
    def lastrowid(self) -> int | None:
        return self._c.lastrowid

    @property
    def arraysize(self) -> int:
        return self._c.arraysize

    @arraysize.setter
    def arraysize(self, value: int) -> None:
        self._c.arraysize = value

    async def execute(self, sql: str, parameters: Sequence[Any] | None = None) -> Cursor:
        await _retry_busy(self._c.execute, sql, parameters if parameters is not None else ())
        return self

    async def executemany(self, sql: str, seq: Iterable[Sequence[Any]]) -> Cursor:
        await _retry_busy(self._c.executemany, sql, list(seq))
        return self

    async def fetchall(self) -> list[Any]:
        return self._c.fetchall()

    async def fetchone(self) -> Any:
        return self._c.fetchone()

    async def fetchmany(self, size: int | None = None) -> list[Any]:
        return self._c.fetchmany(size if size is not None else self._c.arraysize)

    async def close(self) -> None:
        self._c.close()


class Connection:
    """The async connection SQLAlchemy's asyncio adapter expects, over sqlite3."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def cursor(self) -> Cursor:
        return Cursor(self.conn.cursor())

    @property
    def isolation_level(self) -> str | None:
        return self.conn.isolation_level

    async def commit(self) -> None:
        # the fsync of a commit (WAL, synchronous=FULL) waits for the disk: in a thread, so
        # the loop serves reads meanwhile; nothing else uses this connection until it returns
        while True:
            try:
                return await asyncio.to_thread(self.conn.commit)
            except sqlite3.OperationalError as exc:
                if getattr(exc, "sqlite_errorcode", None) != _SQLITE_BUSY:
                    raise
                await asyncio.sleep(0.001)

    async def rollback(self) -> None:
        self.conn.rollback()

    async def close(self) -> None:
        self.conn.close()

    async def create_function(self, *args: Any, **kw: Any) -> None:
        self.conn.create_function(*args, **kw)


class AdaptedConnection(AsyncAdapt_dbapi_connection):
    __slots__ = ("_adapted", "raw_sqlite")
    _cursor_cls = AsyncAdapt_dbapi_cursor
    _ss_cursor_cls = AsyncAdapt_dbapi_ss_cursor

    def __init__(self, dbapi: Module, connection: Connection) -> None:
        # Connection has what SQLAlchemy's adapter calls (cursor, commit, rollback, close),
        # not all of its AsyncIODBAPIConnection protocol, which even asks for __getattr__
        super().__init__(dbapi, cast(AsyncIODBAPIConnection, connection))
        self._adapted = connection  # self._connection, typed as what it is
        self.raw_sqlite = connection.conn  # for statements run as text (prepared.py)

    @property
    def isolation_level(self) -> str | None:
        return self._adapted.isolation_level

    @isolation_level.setter
    def isolation_level(self, value: str | None) -> None:
        # SQLAlchemy's pysqlite dialect sets "" (the legacy DEFERRED), which sqlite3 accepts
        # and typeshed's Literal for this attribute leaves out
        self.raw_sqlite.isolation_level = value  # type: ignore[assignment]

    def create_function(self, *args: Any, **kw: Any) -> None:
        await_(self._adapted.create_function(*args, **kw))

    def begin(self, immediate: bool) -> None:
        """BEGIN straight on sqlite3 (a statement through SQLAlchemy costs ten times more);
        IMMEDIATE takes the write lock up front, waiting for it off the loop."""
        await_(_retry_busy(self.raw_sqlite.execute, "BEGIN IMMEDIATE" if immediate else "BEGIN"))

    def terminate(self) -> None:
        self.raw_sqlite.close()


class Module(AsyncAdapt_dbapi_module):
    """The DBAPI module face: sqlite3's exceptions and constants, our connect()."""

    def __init__(self) -> None:
        super().__init__(sqlite3, dbapi_module=sqlite3)
        self.sqlite = sqlite3
        self.paramstyle = "qmark"
        self.has_stop = True
        for name in ("DatabaseError", "Error", "IntegrityError", "NotSupportedError",
                     "OperationalError", "ProgrammingError", "sqlite_version",
                     "sqlite_version_info", "PARSE_COLNAMES", "PARSE_DECLTYPES", "Binary"):
            setattr(self, name, getattr(sqlite3, name))

    def connect(self, *args: Any, **kw: Any) -> AdaptedConnection:
        kw.pop("async_creator_fn", None)
        kw["timeout"] = 0  # busy waits happen in _retry_busy, never in the loop's thread
        kw["check_same_thread"] = False  # a pool may close it from the GC
        return AdaptedConnection(self, Connection(sqlite3.connect(*args, **kw)))


class Dialect(SQLiteDialect_aiosqlite):
    driver = "postbus"
    supports_statement_cache = True

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.has_terminate = True

    @classmethod
    def import_dbapi(cls) -> Module:  # type: ignore[override]
        # we reuse the aiosqlite dialect's SQL, not its driver: SQLAlchemy annotates this
        # method with aiosqlite's module adapter, whose connect() returns aiosqlite's
        # connection adapter; ours has the same DBAPI face over sqlite3
        return Module()

    def retrieve_dbapi_version(self, dbapi: Any) -> Any:
        return tuple(sqlite3.sqlite_version_info)


registry.register("sqlite.postbus", __name__, "Dialect")
