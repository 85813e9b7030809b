"""Store reads from SQL (ADR 0012): SELECT pages, FETCH metadata, STATUS, LIST and an
EXPUNGE with nothing to remove come from the metadata database on a read-only connection,
through the store's own read code (``postbus.mailbox_store.reads``); writes stay requests
to mailbox-store, the only writer.

Every command that reads used to be a NATS round trip to the one store process and a
queue behind its writes. A read the store would answer after its commit is visible here as
soon as the store replied (SQLite WAL or PostgreSQL, both read committed data), so a
session still sees its own writes. Anything the read-only repository cannot do (INBOX
created on an account's first use, a SELECT that claims \\Recent), a database that cannot
be opened or is at another schema revision than this code, and any database error, fall
back to the bus: the store answers as before.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from pydantic import BaseModel
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from postbus.imap_access.adapters import BusStore
from postbus.imap_access.ports import StoreError
from postbus.kit.bus import Bus
from postbus.kit.logging import get_logger
from postbus.kit.metrics import counter
from postbus.mailbox_store import db
from postbus.mailbox_store.reads import StoreReads
from postbus.mailbox_store.repository import NeedsWriter, Repository
from postbus.mailbox_store.repository import StoreError as RepoError
from postbus.proto.store import (
    ExpungeReply,
    ExpungeRequest,
    FetchReply,
    FetchRequest,
    MailboxInfo,
    MailboxListReply,
    MailboxListRequest,
    MailboxRef,
    SelectReply,
    SelectRequest,
)

log = get_logger(__name__)
READS = counter("postbus_imap_store_reads_total",
                "Store reads by imap-access, by where they were answered (sql or bus)", ["path"])
Req = TypeVar("Req", bound=BaseModel)
Rep = TypeVar("Rep", bound=BaseModel)


class SqlReadStore(BusStore):
    """The Store port: reads from SQL when the schema is the one this code knows, the rest
    (and every fallback) over the bus."""

    def __init__(self, bus: Bus, engine: AsyncEngine, *, recheck_s: float = 5.0) -> None:
        super().__init__(bus)
        self.engine = engine
        self.reads = StoreReads(Repository(engine, read_only=True))
        self.recheck_s = recheck_s
        self.ready = False  # the schema is at the revision this code expects
        self._next_check = 0.0
        # the migration this code expects, read from the scripts once (not in a command)
        self._head = db.head_revision()
        self._said = False

    async def _schema_ok(self) -> bool:
        """Checked once it matches; until then at most every ``recheck_s`` (imap-access may
        start before the store has migrated the database)."""
        if self.ready:
            return True
        now = time.monotonic()
        if now < self._next_check:
            return False
        self._next_check = now + self.recheck_s
        try:
            found = await db.schema_revision(self.engine)
        except (SQLAlchemyError, sqlite3.Error, OSError) as exc:
            self._not_yet("cannot read the database", error=str(exc))
            return False
        self.ready = found == self._head
        if self.ready:
            log.info("store reads from SQL", revision=found)
        else:
            self._not_yet("the database schema is not this code's", found=found,
                          expected=self._head)
        return self.ready

    def _not_yet(self, why: str, **kw: object) -> None:
        """Said once, not at every recheck (a database imap-access cannot reach, as a
        SQLite file in another pod, is a configuration, not an incident)."""
        if not self._said:
            self._said = True
            log.warning(f"{why}; store reads go over the bus", **kw)

    async def _read(self, local: Callable[[Req], Awaitable[Rep]],
                    remote: Callable[[Req], Awaitable[Rep]], req: Req) -> Rep:
        if await self._schema_ok():
            try:
                reply = await local(req)
            except RepoError as exc:  # the store's own answer, with its code
                READS.labels("sql").inc()
                raise StoreError(exc.code, exc.message) from exc
            except NeedsWriter:
                pass
            except (SQLAlchemyError, sqlite3.Error, OSError) as exc:
                log.warning("SQL read failed; asking the store", error=str(exc))
            else:
                READS.labels("sql").inc()
                return reply
        READS.labels("bus").inc()
        return await remote(req)

    async def mailbox_list(self, req: MailboxListRequest) -> MailboxListReply:
        return await self._read(self.reads.mailbox_list, super().mailbox_list, req)

    async def mailbox_status(self, req: MailboxRef) -> MailboxInfo:
        return await self._read(self.reads.mailbox_status, super().mailbox_status, req)

    async def select(self, req: SelectRequest) -> SelectReply:
        return await self._read(self.reads.select, super().select, req)

    async def fetch(self, req: FetchRequest) -> FetchReply:
        return await self._read(self.reads.fetch, super().fetch, req)

    async def expunge(self, req: ExpungeRequest) -> ExpungeReply:
        """Answered here only when nothing is \\Deleted (then nothing changes); else the
        store removes them and announces it."""
        return await self._read(self.reads.expunge, super().expunge, req)
