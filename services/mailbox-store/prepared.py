"""The store's hottest statements, compiled once per dialect and run on the driver.

Executing a SQLAlchemy Core statement builds it, computes its cache key, looks up (or
compiles) its SQL, hops into a greenlet, makes an execution context and wraps the cursor
in a Result: about 0.1 ms, where SQLite runs an indexed statement in a few microseconds.
Under imaptest's mix this was the largest single cost of mailbox-store (docs/benchmarks.md).

A ``Prepared`` statement is still written in Core next to the rest of the SQL (so it is
portable and reviewed in one place), compiled on first use for the connection's dialect,
and then run as text: on SQLite straight on the ``sqlite3`` connection (which runs in the
event loop's thread, see sqlite_inline.py, inside the transaction SQLAlchemy began), on
PostgreSQL through ``exec_driver_sql`` (asyncpg prepares and caches it). The column types'
own bind and result processors are applied, so values are the ones SQLAlchemy would give.

Only fixed-shape statements belong here: no expanding IN lists, no optional clauses.
"""

from __future__ import annotations

import sqlite3
from collections import namedtuple
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler

from postbus.mailbox_store.sqlite_inline import AdaptedConnection, run_busy

Processor = Callable[[Any], Any] | None

if TYPE_CHECKING:
    class Row(tuple[Any, ...]):
        """A result row: a tuple; a named tuple (attribute access) when the statement is
        ``named``, as a SQLAlchemy Row types its attributes."""

        def __getattr__(self, name: str) -> Any: ...
else:
    Row = tuple


class _RowClass(Protocol):
    """What we use of a ``namedtuple`` class (typeshed types it as a plain tuple type)."""

    def _make(self, iterable: Iterable[Any]) -> Row: ...


@dataclass(frozen=True)
class _Compiled:
    sql: str
    names: tuple[str, ...]  # parameter names in positional order
    fixed: dict[str, Any]  # values bound in the statement itself (literals, constants)
    binds: tuple[Processor, ...]
    results: tuple[Processor, ...]  # one per result column; None: as the driver gives it
    convert: bool  # any result processor at all
    row: Callable[..., Any] | None  # a named tuple of the result columns, when asked for

    def args(self, params: dict[str, Any]) -> list[Any]:
        if self.fixed:
            params = {**self.fixed, **params}
        return [params[n] if p is None else p(params[n])
                for n, p in zip(self.names, self.binds, strict=True)]


async def driver_execute(conn: AsyncConnection, sql: str, args: Sequence[Any] = ()) -> Any:
    """``sql`` as text on the driver: sqlite3 itself on SQLite (no SQLAlchemy execution
    context, statement cache or result wrapping), exec_driver_sql elsewhere; the cursor."""
    dbapi = conn.sync_connection.connection.dbapi_connection  # type: ignore[union-attr]
    if isinstance(dbapi, AdaptedConnection):
        return await run_busy(dbapi.raw_sqlite.execute, sql, args)
    return await conn.exec_driver_sql(sql, tuple(args))


class Prepared:
    """One Core statement with named bind parameters (``bindparam("x")``), compiled once
    per dialect. ``rows`` returns tuples (named tuples with ``named``: attribute access as
    on a SQLAlchemy Row); ``run`` returns the row count.

    ``stmt`` may be a function of the dialect's name (an upsert is a dialect's own
    construct); ``column_keys`` names the columns of an INSERT or UPDATE whose values are
    all parameters of the same names."""

    __slots__ = ("stmt", "named", "column_keys", "_by_dialect")

    def __init__(self, stmt: ClauseElement | Callable[[str], ClauseElement], *,
                 named: bool = False, column_keys: Sequence[str] | None = None) -> None:
        self.stmt = stmt
        self.named = named
        self.column_keys = list(column_keys) if column_keys is not None else None
        self._by_dialect: dict[str, _Compiled] = {}

    def compiled(self, dialect: Dialect) -> _Compiled:
        c = self._by_dialect.get(dialect.name)
        if c is None:
            c = self._by_dialect[dialect.name] = self._compile(dialect)
        return c

    def _compile(self, dialect: Dialect) -> _Compiled:
        stmt = self.stmt if isinstance(self.stmt, ClauseElement) else self.stmt(dialect.name)
        comp = stmt.compile(dialect=dialect, column_keys=self.column_keys)
        assert isinstance(comp, SQLCompiler)  # a statement, never DDL
        names = tuple(comp.positiontup or ())
        if not names and comp.binds:
            raise ValueError("Prepared needs a positional paramstyle")
        binds = tuple(comp.binds[n].type.dialect_impl(dialect).bind_processor(dialect)
                      for n in names)
        fixed = {n: comp.binds[n].effective_value for n in names if not comp.binds[n].required}
        cols = list(getattr(stmt, "exported_columns", ()))
        results = tuple(col.type.dialect_impl(dialect).result_processor(dialect, None)
                        for col in cols)
        row = (cast(_RowClass, namedtuple("Row", [str(c.key) for c in cols], rename=True))
               if self.named else None)
        return _Compiled(comp.string, names, fixed, binds, results, any(results),
                         row._make if row is not None else None)

    async def _execute(self, conn: AsyncConnection, params: dict[str, Any]) -> tuple[Any, _Compiled]:
        c = self.compiled(conn.dialect)
        return await driver_execute(conn, c.sql, c.args(params)), c

    async def rows(self, conn: AsyncConnection, **params: Any) -> list[Row]:
        cur, c = await self._execute(conn, params)
        rows: list[Row] = cur.fetchall()
        if c.convert:
            procs = c.results
            rows = [Row(v if p is None else p(v) for v, p in zip(r, procs, strict=True))
                    for r in rows]
        elif not isinstance(cur, sqlite3.Cursor):  # SQLAlchemy Rows from exec_driver_sql
            rows = [Row(r) for r in rows]
        if c.row is not None:
            return list(map(c.row, rows))
        return rows

    async def first(self, conn: AsyncConnection, **params: Any) -> Row | None:
        found = await self.rows(conn, **params)
        return found[0] if found else None

    async def run(self, conn: AsyncConnection, **params: Any) -> int:
        cur, _ = await self._execute(conn, params)
        return int(cur.rowcount)

    async def many(self, conn: AsyncConnection, params: Sequence[dict[str, Any]]) -> None:
        """The statement once per parameter set (executemany)."""
        if not params:
            return
        c = self.compiled(conn.dialect)
        args = [c.args(p) for p in params]
        dbapi = conn.sync_connection.connection.dbapi_connection  # type: ignore[union-attr]
        if isinstance(dbapi, AdaptedConnection):
            await run_busy(dbapi.raw_sqlite.executemany, c.sql, args)
        else:
            await conn.exec_driver_sql(c.sql, [tuple(a) for a in args])

