"""IMAP state in SQL: mailboxes, messages, flags, MODSEQ, expunge log, blob references, quota.

The same behaviour on SQLite and PostgreSQL. Every write is one transaction that first
locks the account row (PostgreSQL: ``SELECT ... FOR UPDATE``; SQLite: one writer, group
commits under ``BEGIN IMMEDIATE``, txn.py), so writes to one account are serialized, UIDs are handed
out in commit order (``UPDATE mailboxes SET uidnext = uidnext + n ... RETURNING``) and
locks are always taken in the same order (account, mailbox, blobs sorted by key).
Imports SQLAlchemy; never nats or boto3.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypeVar, cast

from pydantic import BaseModel
from sqlalchemy import (
    ColumnElement,
    Table,
    and_,
    bindparam,
    case,
    delete,
    exists,
    false,
    func,
    insert,
    literal,
    not_,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from postbus.kit.logging import get_logger
from postbus.kit.metrics import histogram
from postbus.mailbox_store.models import (
    FLAG_BITS,
    Account,
    Blob,
    Counter,
    Delivery,
    Expunged,
    Mailbox,
    Message,
    Subscription,
)
from postbus.mailbox_store.txn import Writer
from postbus.proto.mail import MessageSummary
from postbus.proto.store import MailboxInfo, MessageMeta, MessageState, Pop3Message, SearchKey

log = get_logger("postbus.mailbox_store.repository")
COMMIT_BATCH = histogram("postbus_store_delivery_batch_size", "Deliveries per group commit",
                         buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
COMMIT_SECONDS = histogram("postbus_store_delivery_commit_seconds",
                           "Time to store one group of deliveries")

T = TypeVar("T")
PM = TypeVar("PM", bound=BaseModel)

A = cast(Table, Account.__table__)
MB = cast(Table, Mailbox.__table__)
M = cast(Table, Message.__table__)
X = cast(Table, Expunged.__table__)
B = cast(Table, Blob.__table__)
D = cast(Table, Delivery.__table__)
S = cast(Table, Subscription.__table__)
C = cast(Table, Counter.__table__)


DELIMITER = "/"

# Hot lookups built once, with bound parameters: building a statement and its cache key
# cost more than running it (SQLite answers in microseconds).
_CHILD = MB.alias("child")
_MB_WITH_INFO = select(
    MB,
    exists().where(_CHILD.c.account_id == MB.c.account_id,
                   func.substr(_CHILD.c.name, 1, func.length(MB.c.name) + 1)
                   == MB.c.name.concat(DELIMITER)).label("has_children"),
    exists().where(S.c.account_id == MB.c.account_id, S.c.name == MB.c.name).label("subscribed"),
).where(MB.c.account_id == bindparam("account_id"))
_Q_MB_INFO_BY_NAME = _MB_WITH_INFO.where(MB.c.name == bindparam("name"))
_Q_MB_INFO_BY_ID = _MB_WITH_INFO.where(MB.c.id == bindparam("mailbox_id"))
_Q_MB_BY_NAME = select(MB).where(MB.c.account_id == bindparam("account_id"),
                                 MB.c.name == bindparam("name"))
_Q_MB_BY_ID = select(MB).where(MB.c.id == bindparam("mailbox_id"),
                               MB.c.account_id == bindparam("account_id"))
INBOX = "INBOX"
# INBOX and the RFC 6154 special-use folders every account has (created at account creation
# by the directory, or lazily here on first use)
DEFAULT_MAILBOXES: tuple[tuple[str, str | None], ...] = (
    ("INBOX", None), ("Drafts", "\\Drafts"), ("Sent", "\\Sent"), ("Trash", "\\Trash"),
    ("Junk", "\\Junk"), ("Archive", "\\Archive"),
)
SPECIAL_USES = frozenset(s for _, s in DEFAULT_MAILBOXES if s) | {"\\All", "\\Flagged"}
MAX_NAME = 1024
SEEN = FLAG_BITS["\\Seen"]
DELETED = FLAG_BITS["\\Deleted"]
_FLAG_BY_LOWER = {k.lower(): (k, v) for k, v in FLAG_BITS.items()}
# RFC 3501 §9 atom-specials forbidden in a keyword (flag-keyword = atom)
_KEYWORD_RE = re.compile(r'^[^\x00-\x20\x7f(){%*"\\\]]+$')
# OR clauses per statement before falling back to a bounding range + filter in Python
MAX_RANGES_IN_SQL = 100
# a UID set of several ranges with at most this many UIDs is sent as one IN list
MAX_UIDS_IN_LIST = 2000
# candidates of a paged body search whose blobs are read before the page is checked
BLOB_SEARCH_BATCH = 500


# ---------------------------------------------------------------- errors
class StoreError(Exception):
    """A refused operation; ``code`` is the RpcError code (proto/base.py)."""

    code = "internal"

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message


class NotFound(StoreError):
    code = "not_found"


class Exists(StoreError):
    code = "exists"


class Invalid(StoreError):
    code = "invalid"


class OverQuota(StoreError):
    code = "over_quota"


class Conflict(StoreError):
    code = "conflict"


class Limit(StoreError):
    """Refused because it would cost more than a bound allows (IMAP: NO [LIMIT], RFC 5530)."""

    code = "limit"


# ---------------------------------------------------------------- results
@dataclass
class Change:
    """What a committed write did to one mailbox, for MAILBOX_CHANGED."""

    account_id: int
    mailbox_id: int
    mailbox: str
    uidvalidity: int
    uidnext: int
    highestmodseq: int
    exists: int
    added: list[MessageState] = field(default_factory=list)
    flags: list[MessageState] = field(default_factory=list)
    expunged: list[int] = field(default_factory=list)
    message_ids: list[int] = field(default_factory=list)  # row ids of added (single insert)


@dataclass
class DeliverOutcome:
    status: Literal["delivered", "duplicate", "over_quota", "disabled", "no_account"]
    uid: int | None = None
    mailbox_id: int | None = None
    change: Change | None = None


@dataclass
class NewMessage:
    """A message to insert: the blob is already in S3."""

    blob_key: str
    blob_size: int
    summary: MessageSummary
    prefix: bytes = b""
    flags: Sequence[str] = ()
    internaldate: datetime | None = None


# ---------------------------------------------------------------- helpers
def utc(dt: datetime) -> datetime:
    """Aware UTC (SQLite gives naive datetimes back; we always store UTC)."""
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def flags_to_db(flags: Iterable[str]) -> tuple[int, str]:
    """System flags to bits, keywords to a sorted space-separated string.
    ``\\Recent`` and unknown ``\\`` flags are ignored (IMAP4rev2 dropped \\Recent)."""
    bits, kws = 0, set()
    for f in flags:
        known = _FLAG_BY_LOWER.get(f.lower())
        if known:
            bits |= known[1]
        elif f.startswith("\\"):
            continue
        elif f and _KEYWORD_RE.match(f):
            kws.add(f)
        else:
            raise Invalid(f"not a valid flag: {f!r}")
    return bits, " ".join(sorted(kws))


def unseen_deleted(bits: int) -> tuple[int, int]:
    """This message's contribution to the mailbox's unseen and deleted counters."""
    return (0 if bits & SEEN else 1), (1 if bits & DELETED else 0)


def _fast_model(cls: type[PM], values: dict[str, Any]) -> PM:
    """A pydantic model from trusted values (rows we just read) without validation;
    ``values`` must hold every field. ~20x faster than model_construct, which matters for
    100,000-message replies; checked against model_construct at import (see below)."""
    obj = cls.__new__(cls)
    object.__setattr__(obj, "__dict__", values)
    object.__setattr__(obj, "__pydantic_fields_set__", set(values))
    object.__setattr__(obj, "__pydantic_extra__", None)
    object.__setattr__(obj, "__pydantic_private__", None)
    return obj


def _fast_model_works() -> bool:
    try:
        probe: dict[str, Any] = {"uid": 1, "flags": ["\\Seen"], "modseq": 2}
        fast = _fast_model(MessageState, dict(probe))
        slow = MessageState.model_validate(probe)
        return fast.model_dump_json() == slow.model_dump_json() and fast.uid == 1
    except Exception:
        return False


def trusted_model(cls: type[PM], values: dict[str, Any]) -> PM:
    """A reply model from values we just read from SQL: the fast path when it was found to
    work at import, else pydantic's model_construct (also without validation)."""
    return _fast_model(cls, values) if _FAST else cls.model_construct(**values)


def make_state(uid: int, flags: list[str], modseq: int) -> MessageState:
    return trusted_model(MessageState, {"uid": uid, "flags": flags, "modseq": modseq})


def flags_from_db(bits: int, keywords: str) -> list[str]:
    return list(_flags_tuple(bits, keywords))


@functools.lru_cache(maxsize=4096)
def _flags_tuple(bits: int, keywords: str) -> tuple[str, ...]:
    out = [name for name, b in FLAG_BITS.items() if bits & b]
    if keywords:
        out.extend(keywords.split(" "))
    return tuple(out)


def normalize_name(name: str) -> str:
    """Canonical mailbox name: INBOX case-insensitive (RFC 3501 §5.1), "/" delimited,
    a trailing delimiter dropped (§6.3.3); empty levels, wildcards and controls refused."""
    if name.endswith(DELIMITER):
        name = name[:-1]
    if not name or len(name) > MAX_NAME:
        raise Invalid("mailbox name is empty or too long")
    parts = name.split(DELIMITER)
    if any(p == "" for p in parts):
        raise Invalid("mailbox name has an empty level")
    if any(ch in name for ch in "*%") or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in name):
        raise Invalid("mailbox name contains a wildcard or a control character")
    if parts[0].upper() == INBOX:
        parts[0] = INBOX
    return DELIMITER.join(parts)


def parents_of(name: str) -> list[str]:
    parts = name.split(DELIMITER)
    return [DELIMITER.join(parts[:i]) for i in range(1, len(parts))]


def ranges_to_list(uids: Iterable[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for u in sorted(set(uids)):
        if out and u == out[-1][1] + 1:
            out[-1] = (out[-1][0], u)
        else:
            out.append((u, u))
    return out


def _search_page(found: list[tuple[int, int]], limit: int | None
                 ) -> tuple[list[int], int, bool]:
    """(uids, highest modseq, more) of the first ``limit`` of (uid, modseq) matches."""
    more = limit is not None and len(found) > limit
    if more:
        found = found[:limit]
    return [u for u, _ in found], max((m for _, m in found), default=0), more


def _clean_ranges(ranges: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    out = []
    for r in ranges:
        if len(r) != 2:
            raise Invalid("a UID range is [first, last]")
        a, b = int(r[0]), int(r[1])
        if a > b:
            a, b = b, a
        if b < 1:
            continue
        out.append((max(a, 1), b))
    # merge overlaps so the SQL stays small
    out.sort()
    merged: list[tuple[int, int]] = []
    for a, b in out:
        if merged and a <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
        else:
            merged.append((a, b))
    return merged


def ANY_UID(_uid: int) -> bool:
    """The Python test ``uid_filter`` gives when its SQL is exact (nothing left to check)."""
    return True


def uid_filter(ranges: Sequence[Sequence[int]]) -> tuple[ColumnElement[bool], Callable[[int], bool]]:
    """SQL for "uid in these ranges", plus an exact Python test when the SQL is only a
    bounding range (too many ranges for one statement)."""
    rs = _clean_ranges(ranges)
    if not rs:
        return false(), lambda _u: False
    if len(rs) > 1 and sum(b - a + 1 for a, b in rs) <= MAX_UIDS_IN_LIST:
        # one expanding IN parameter: the statement compiles once whatever the set
        return M.c.uid.in_([u for a, b in rs for u in range(a, b + 1)]), ANY_UID
    if len(rs) <= MAX_RANGES_IN_SQL:
        conds = [M.c.uid == a if a == b else M.c.uid.between(a, b) for a, b in rs]
        return or_(*conds), ANY_UID
    lo, hi = rs[0][0], rs[-1][1]

    def inside(u: int) -> bool:
        import bisect

        i = bisect.bisect_right(rs, (u, float("inf"))) - 1
        return i >= 0 and rs[i][0] <= u <= rs[i][1]

    return M.c.uid.between(lo, hi), inside


def _check_count(rows: Sequence[Any], max_messages: int | None) -> None:
    """Refuse, before changing anything, a request whose answer would be too large to send
    (the caller sends its UID set in smaller parts)."""
    if max_messages is not None and len(rows) > max_messages:
        raise Invalid(f"{len(rows)} messages in one request; send at most {max_messages}")


# ---------------------------------------------------------------- group commit
@dataclass
class _DeliverJob:
    queue_id: str
    account_id: int
    mailbox: str
    msg: NewMessage


class _Batcher:
    """Collects concurrent deliveries and commits them together (one transaction, one
    fsync). A batch that fails is retried one delivery at a time, so one bad message
    only fails itself."""

    def __init__(self, run: Callable[[list[_DeliverJob]], Awaitable[list[DeliverOutcome]]],
                 max_batch: int = 64) -> None:
        self.run = run
        self.max_batch = max_batch
        self.pending: list[tuple[_DeliverJob, asyncio.Future[DeliverOutcome]]] = []
        self.worker: asyncio.Task[None] | None = None

    async def submit(self, job: _DeliverJob) -> DeliverOutcome:
        fut: asyncio.Future[DeliverOutcome] = asyncio.get_running_loop().create_future()
        self.pending.append((job, fut))
        if self.worker is None or self.worker.done():
            self.worker = asyncio.create_task(self._drain(), name="store-group-commit")
        return await fut

    async def _drain(self) -> None:
        while self.pending:
            batch, self.pending = self.pending[:self.max_batch], self.pending[self.max_batch:]
            live = [(j, f) for j, f in batch if not f.done()]
            if not live:
                continue
            COMMIT_BATCH.observe(len(live))
            try:
                with COMMIT_SECONDS.time():
                    outcomes = await self.run([j for j, _ in live])
            except Exception as exc:
                if len(live) == 1:
                    live[0][1].set_exception(exc)
                    continue
                for job, fut in live:  # isolate the failure
                    try:
                        out = (await self.run([job]))[0]
                    except Exception as one_exc:
                        if not fut.done():
                            fut.set_exception(one_exc)
                    else:
                        if not fut.done():
                            fut.set_result(out)
                continue
            for (_, fut), out in zip(live, outcomes, strict=True):
                if not fut.done():
                    fut.set_result(out)


_FAST = _fast_model_works()


# ---------------------------------------------------------------- the repository
class Repository:
    def __init__(self, engine: AsyncEngine, *, delivery_batch: int = 128) -> None:
        self.engine = engine
        self.sqlite = engine.dialect.name == "sqlite"
        self._writer = Writer(engine)
        self._has_inbox: set[int] = set()  # accounts known to have their INBOX
        self._insert = sqlite_dialect.insert if self.sqlite else pg_dialect.insert
        self._batcher = _Batcher(self._deliver_batch, delivery_batch)

    # ------------------------------------------------------------ transactions
    @contextlib.asynccontextmanager
    async def _read(self) -> AsyncIterator[AsyncConnection]:
        async with self.engine.connect() as conn:
            yield conn

    async def write(self, fn: Callable[[AsyncConnection], Awaitable[T]], attempts: int = 5) -> T:
        """Run ``fn`` in a write transaction (group-committed on SQLite, see txn.py);
        returns once the change is committed."""
        return await self._writer.write(fn, attempts)

    # ------------------------------------------------------------ account + mailbox rows
    async def _lock_account(self, conn: AsyncConnection, account_id: int) -> Any:
        row = (await conn.execute(
            select(A.c.id, A.c.enabled, A.c.quota_bytes, A.c.used_bytes, A.c.message_count)
            .where(A.c.id == account_id).with_for_update())).first()
        if row is None:
            raise NotFound(f"no account {account_id}")
        return row

    async def _charge(self, conn: AsyncConnection, acct: Any, nbytes: int, nmsgs: int,
                      *, enforce: bool = True) -> None:
        """Add to the account's usage (same transaction as the change); refuse over quota."""
        if (enforce and nbytes > 0 and acct.quota_bytes is not None
                and acct.used_bytes + nbytes > acct.quota_bytes):
            raise OverQuota(f"quota of {acct.quota_bytes} bytes exceeded")
        await conn.execute(update(A).where(A.c.id == acct.id).values(
            used_bytes=A.c.used_bytes + nbytes, message_count=A.c.message_count + nmsgs))

    async def _next_uidvalidity(self, conn: AsyncConnection) -> int:
        """Strictly increasing across every mailbox ever created, near the clock
        (RFC 3501 §2.3.1.1: a recreated name gets a greater UIDVALIDITY)."""
        now = max(1, int(time.time()))
        cur = (await conn.execute(
            select(C.c.value).where(C.c.name == "uidvalidity").with_for_update())).scalar()
        if cur is None:
            floor = (await conn.execute(select(func.max(MB.c.uidvalidity)))).scalar() or 0
            value = max(now, floor + 1)
            await conn.execute(self._insert(C).values(name="uidvalidity", value=value)
                               .on_conflict_do_update(index_elements=["name"],
                                                      set_={"value": value}))
        else:
            value = max(now, int(cur) + 1)
            await conn.execute(update(C).where(C.c.name == "uidvalidity").values(value=value))
        if value > 0xFFFFFFFF:
            raise Conflict("UIDVALIDITY space exhausted")
        return value

    async def _mailbox_rows(self, conn: AsyncConnection, account_id: int) -> list[Any]:
        return list((await conn.execute(
            select(MB).where(MB.c.account_id == account_id).order_by(MB.c.name))).all())

    async def _mailbox_by_name(self, conn: AsyncConnection, account_id: int, name: str,
                               *, lock: bool = False) -> Any:
        q = _Q_MB_BY_NAME.with_for_update() if lock else _Q_MB_BY_NAME
        return (await conn.execute(q, {"account_id": account_id, "name": name})).first()

    async def _mailbox_by_id(self, conn: AsyncConnection, account_id: int, mailbox_id: int,
                             *, lock: bool = False) -> Any:
        q = _Q_MB_BY_ID.with_for_update() if lock else _Q_MB_BY_ID
        row = (await conn.execute(q, {"mailbox_id": mailbox_id, "account_id": account_id})).first()
        if row is None:
            raise NotFound(f"no mailbox {mailbox_id}")
        return row

    async def _mailbox_with_info(self, conn: AsyncConnection, account_id: int, *,
                                 name: str | None = None, mailbox_id: int | None = None
                                 ) -> tuple[Any, MailboxInfo] | None:
        """A mailbox row and its MailboxInfo in one query, by name or by id; None if absent."""
        if name is not None:
            row = (await conn.execute(_Q_MB_INFO_BY_NAME,
                                      {"account_id": account_id, "name": name})).first()
        else:
            row = (await conn.execute(_Q_MB_INFO_BY_ID,
                                      {"account_id": account_id, "mailbox_id": mailbox_id})).first()
        if row is None:
            return None
        children = {row.name + DELIMITER} if row.has_children else set()
        return row, self._info(row, children, {row.name} if row.subscribed else set())

    async def _create_mailbox_row(self, conn: AsyncConnection, account_id: int, name: str,
                                  special_use: str | None = None, subscribe: bool = False) -> Any:
        uv = await self._next_uidvalidity(conn)
        await conn.execute(insert(MB).values(
            account_id=account_id, name=name, special_use=special_use, uidvalidity=uv,
            uidnext=1, highestmodseq=1, noselect=False, message_count=0, total_size=0,
            unseen_count=0, deleted_count=0))
        if subscribe:
            await conn.execute(self._insert(S).values(account_id=account_id, name=name)
                               .on_conflict_do_nothing())
        return await self._mailbox_by_name(conn, account_id, name)

    async def _ensure_defaults(self, conn: AsyncConnection, account_id: int,
                               only: set[str] | None = None) -> None:
        """In a write transaction. Without ``only``: on first use (no INBOX yet) create INBOX
        and the special-use folders. With ``only``: create those of the named default
        folders that are missing (mail filed into "Junk" after the user deleted it); a
        folder the user deleted is not brought back otherwise."""
        rows = await self._mailbox_rows(conn, account_id)
        have = {r.name for r in rows}
        have_special = {r.special_use for r in rows}
        first_use = INBOX not in have
        if only is None and not first_use:
            return
        for name, special in DEFAULT_MAILBOXES:
            if only is not None and not first_use and name not in only:
                continue
            if name in have or (special and special in have_special):
                continue
            await self._create_mailbox_row(conn, account_id, name, special, subscribe=True)

    async def ensure_defaults(self, account_id: int) -> None:
        async def tx(conn: AsyncConnection) -> None:
            await self._lock_account(conn, account_id)
            await self._ensure_defaults(conn, account_id)

        await self.write(tx)

    async def _ensure_inbox(self, account_id: int) -> None:
        """Create INBOX and the default folders on an account's first use. INBOX cannot be
        deleted or renamed away (RFC 3501 §6.3.4), so once seen it is remembered."""
        if account_id in self._has_inbox:
            return
        async with self._read() as conn:
            row = await self._mailbox_by_name(conn, account_id, INBOX)
            exists_ = row is not None or (await conn.execute(
                select(A.c.id).where(A.c.id == account_id))).first() is not None
        if not exists_:
            raise NotFound(f"no account {account_id}")
        if row is None:
            await self.ensure_defaults(account_id)
        if len(self._has_inbox) > 100_000:
            self._has_inbox.clear()
        self._has_inbox.add(account_id)

    # ------------------------------------------------------------ mailbox info
    def _info(self, row: Any, names: set[str], subscribed: set[str]) -> MailboxInfo:
        prefix = row.name + DELIMITER
        has_children = any(n.startswith(prefix) for n in names)
        attrs = ["\\HasChildren" if has_children else "\\HasNoChildren"]
        if row.noselect:
            attrs.append("\\Noselect")
        return MailboxInfo(
            mailbox_id=row.id, name=row.name, special_use=row.special_use, attributes=attrs,
            subscribed=row.name in subscribed, uidvalidity=row.uidvalidity, uidnext=row.uidnext,
            highestmodseq=row.highestmodseq, messages=row.message_count, unseen=row.unseen_count,
            size=row.total_size, deleted=row.deleted_count)

    async def _subscribed(self, conn: AsyncConnection, account_id: int) -> set[str]:
        return {r[0] for r in (await conn.execute(
            select(S.c.name).where(S.c.account_id == account_id))).all()}

    async def list_mailboxes(self, account_id: int, subscribed_only: bool = False) -> list[MailboxInfo]:
        await self._ensure_inbox(account_id)
        async with self._read() as conn:
            rows = await self._mailbox_rows(conn, account_id)
            subs = await self._subscribed(conn, account_id)
        names = {r.name for r in rows}
        out = [self._info(r, names, subs) for r in rows]
        if subscribed_only:
            out = [i for i in out if i.subscribed]
            # a subscription may name a mailbox that does not exist (RFC 3501 §6.3.6)
            for name in sorted(subs - names):
                out.append(MailboxInfo(mailbox_id=0, name=name, attributes=["\\NonExistent"],
                                       subscribed=True, uidvalidity=0, uidnext=0,
                                       highestmodseq=0, messages=0, unseen=0))
        return out

    async def status(self, account_id: int, name: str) -> MailboxInfo:
        name = normalize_name(name)
        if name == INBOX:
            await self._ensure_inbox(account_id)
        async with self._read() as conn:
            found = await self._mailbox_with_info(conn, account_id, name=name)
        if found is None:
            if name == INBOX:
                self._has_inbox.discard(account_id)  # the account was deleted meanwhile
            raise NotFound(f"no mailbox {name}")
        return found[1]

    # ------------------------------------------------------------ create / delete / rename
    async def create_mailbox(self, account_id: int, name: str,
                             special_use: str | None = None) -> MailboxInfo:
        name = normalize_name(name)
        if special_use is not None and special_use not in SPECIAL_USES:
            raise Invalid(f"unknown special-use attribute {special_use}")

        async def tx(conn: AsyncConnection) -> MailboxInfo:
            await self._lock_account(conn, account_id)
            await self._ensure_defaults(conn, account_id)
            row = await self._mailbox_by_name(conn, account_id, name)
            if row is not None and not row.noselect:
                raise Exists(f"mailbox {name} exists")
            for parent in parents_of(name):
                if await self._mailbox_by_name(conn, account_id, parent) is None:
                    await self._create_mailbox_row(conn, account_id, parent)
            if row is not None:  # a \Noselect placeholder becomes a real mailbox again
                await conn.execute(update(MB).where(MB.c.id == row.id).values(
                    noselect=False, special_use=special_use or row.special_use))
                row = await self._mailbox_by_name(conn, account_id, name)
            else:
                await self._create_mailbox_row(conn, account_id, name, special_use)
            found = await self._mailbox_with_info(conn, account_id, name=name)
            assert found is not None
            return found[1]

        return await self.write(tx)

    async def delete_mailbox(self, account_id: int, name: str) -> Change | None:
        """RFC 3501 §6.3.4: INBOX cannot be deleted; a mailbox with children loses its
        messages and becomes \\Noselect; deleting a \\Noselect one with children is refused."""
        name = normalize_name(name)
        if name == INBOX:
            raise Invalid("INBOX cannot be deleted")

        async def tx(conn: AsyncConnection) -> Change | None:
            acct = await self._lock_account(conn, account_id)
            row = await self._mailbox_by_name(conn, account_id, name, lock=True)
            if row is None:
                raise NotFound(f"no mailbox {name}")
            child = (await conn.execute(select(MB.c.id).where(
                MB.c.account_id == account_id,
                MB.c.name.startswith(name + DELIMITER, autoescape=True)).limit(1))).first()
            if child is not None and row.noselect:
                raise Invalid(f"{name} has children and is already \\Noselect")
            change = await self._remove_messages(conn, acct, row, None)
            if child is not None:
                await conn.execute(update(MB).where(MB.c.id == row.id).values(noselect=True))
            else:
                await conn.execute(delete(X).where(X.c.mailbox_id == row.id))
                await conn.execute(delete(MB).where(MB.c.id == row.id))
            return change

        return await self.write(tx)

    async def rename_mailbox(self, account_id: int, old: str, new: str) -> Change | None:
        """RFC 3501 §6.3.5: children move along; renaming INBOX moves its messages to a new
        mailbox and leaves INBOX empty. Returns the INBOX change in that case."""
        old, new = normalize_name(old), normalize_name(new)
        if old == new:
            raise Exists(f"mailbox {new} exists")
        if new == INBOX or new.startswith(old + DELIMITER):
            raise Invalid(f"cannot rename {old} to {new}")

        async def tx(conn: AsyncConnection) -> Change | None:
            await self._lock_account(conn, account_id)
            await self._ensure_defaults(conn, account_id)
            src = await self._mailbox_by_name(conn, account_id, old, lock=True)
            if src is None:
                raise NotFound(f"no mailbox {old}")
            if await self._mailbox_by_name(conn, account_id, new) is not None:
                raise Exists(f"mailbox {new} exists")
            for parent in parents_of(new):
                if await self._mailbox_by_name(conn, account_id, parent) is None:
                    await self._create_mailbox_row(conn, account_id, parent)
            if old == INBOX:
                return await self._rename_inbox(conn, account_id, src, new)
            children = (await conn.execute(select(MB.c.id, MB.c.name).where(
                MB.c.account_id == account_id,
                MB.c.name.startswith(old + DELIMITER, autoescape=True)))).all()
            for _cid, cname in children:
                clash = await self._mailbox_by_name(conn, account_id, new + cname[len(old):])
                if clash is not None:
                    raise Exists(f"mailbox {clash.name} exists")
            await conn.execute(update(MB).where(MB.c.id == src.id).values(name=new))
            for cid, cname in children:
                await conn.execute(update(MB).where(MB.c.id == cid).values(
                    name=new + cname[len(old):]))
            # subscriptions follow the rename
            subs = (await conn.execute(select(S.c.name).where(
                S.c.account_id == account_id,
                or_(S.c.name == old, S.c.name.startswith(old + DELIMITER, autoescape=True))))).all()
            for (sname,) in subs:
                await conn.execute(delete(S).where(S.c.account_id == account_id, S.c.name == sname))
                await conn.execute(self._insert(S).values(
                    account_id=account_id, name=new + sname[len(old):]).on_conflict_do_nothing())
            return None

        return await self.write(tx)

    async def _rename_inbox(self, conn: AsyncConnection, account_id: int, inbox: Any,
                            new: str) -> Change:
        target = await self._create_mailbox_row(conn, account_id, new)
        # the messages keep their UIDs: the new mailbox has its own UIDVALIDITY
        await conn.execute(update(M).where(M.c.mailbox_id == inbox.id).values(mailbox_id=target.id))
        await conn.execute(update(MB).where(MB.c.id == target.id).values(
            uidnext=inbox.uidnext, highestmodseq=inbox.highestmodseq,
            message_count=inbox.message_count, total_size=inbox.total_size,
            unseen_count=inbox.unseen_count, deleted_count=inbox.deleted_count))
        moved = [r[0] for r in (await conn.execute(
            select(M.c.uid).where(M.c.mailbox_id == target.id))).all()]
        modseq = inbox.highestmodseq + 1
        await conn.execute(update(MB).where(MB.c.id == inbox.id).values(
            highestmodseq=modseq, message_count=0, total_size=0, unseen_count=0, deleted_count=0))
        await self._log_expunged(conn, inbox.id, moved, modseq)
        return Change(account_id, inbox.id, INBOX, inbox.uidvalidity, inbox.uidnext, modseq, 0,
                      expunged=moved)

    async def subscribe(self, account_id: int, name: str, subscribed: bool) -> None:
        name = normalize_name(name)

        async def tx(conn: AsyncConnection) -> None:
            await self._lock_account(conn, account_id)
            await self._ensure_defaults(conn, account_id)
            if subscribed:
                await conn.execute(self._insert(S).values(account_id=account_id, name=name)
                                   .on_conflict_do_nothing())
            else:
                await conn.execute(delete(S).where(S.c.account_id == account_id, S.c.name == name))

        await self.write(tx)

    # ------------------------------------------------------------ inserting messages
    async def _ref_blobs(self, conn: AsyncConnection, refs: dict[str, tuple[int, int]]) -> None:
        """Add references: {key: (count, size)}; sorted so concurrent writers lock in order."""
        for key in sorted(refs):
            n, size = refs[key]
            stmt = self._insert(B).values(key=key, size=size, refcount=n, unreferenced_since=None)
            await conn.execute(stmt.on_conflict_do_update(
                index_elements=["key"],
                set_={"refcount": B.c.refcount + n, "unreferenced_since": None}))

    async def _unref_blobs(self, conn: AsyncConnection, refs: dict[str, int]) -> None:
        now = datetime.now(UTC)
        for key in sorted(refs):
            n = refs[key]
            await conn.execute(update(B).where(B.c.key == key).values(
                refcount=case((B.c.refcount > n, B.c.refcount - n), else_=0),
                unreferenced_since=case((B.c.refcount > n, None), else_=now)))

    async def _allocate(self, conn: AsyncConnection, mailbox_id: int, n: int, nbytes: int,
                        unseen: int = 0, deleted: int = 0) -> tuple[int, int, Any]:
        """Reserve ``n`` UIDs and one MODSEQ for ``n`` new messages of ``nbytes``; returns
        (first uid, modseq, the new row). The row lock taken here is held until commit, so
        UIDs become visible in order."""
        row = (await conn.execute(
            update(MB).where(MB.c.id == mailbox_id)
            .values(uidnext=MB.c.uidnext + n, highestmodseq=MB.c.highestmodseq + 1,
                    message_count=MB.c.message_count + n, total_size=MB.c.total_size + nbytes,
                    unseen_count=MB.c.unseen_count + unseen,
                    deleted_count=MB.c.deleted_count + deleted)
            .returning(MB.c.uidnext, MB.c.highestmodseq, MB.c.uidvalidity, MB.c.name,
                       MB.c.message_count, MB.c.total_size))).first()
        if row is None:
            raise NotFound(f"no mailbox {mailbox_id}")
        return row.uidnext - n, row.highestmodseq, row

    def _message_values(self, mailbox_id: int, uid: int, modseq: int, m: NewMessage) -> dict[str, Any]:
        bits, kws = flags_to_db(m.flags)
        s = m.summary
        return {
            "mailbox_id": mailbox_id, "uid": uid, "modseq": modseq, "flags": bits,
            "keywords": kws, "internaldate": utc(m.internaldate or datetime.now(UTC)),
            "size": len(m.prefix) + m.blob_size, "blob_key": m.blob_key, "prefix": m.prefix,
            "summary": s.model_dump_json(by_alias=True), "subject": s.subject[:2000],
            "from_addr": s.from_[:2000], "to_addr": s.to[:4000], "cc_addr": s.cc[:4000],
            "bcc_addr": s.bcc[:4000], "message_id_hdr": s.message_id[:1000],
            "sent_date": utc(s.date) if s.date else None, "pop3_hidden": False,
            "pop3_pad": 0 if s.ends_crlf else 2,
        }

    async def _insert_messages(self, conn: AsyncConnection, acct: Any, mbox: Any,
                               msgs: Sequence[NewMessage], *, enforce_quota: bool = True
                               ) -> tuple[list[int], Change]:
        if mbox.noselect:
            raise NotFound(f"{mbox.name} is \\Noselect")
        total = sum(len(m.prefix) + m.blob_size for m in msgs)
        await self._charge(conn, acct, total, len(msgs), enforce=enforce_quota)
        values_flags = [flags_to_db(m.flags)[0] for m in msgs]
        unseen = sum(unseen_deleted(b)[0] for b in values_flags)
        deleted = sum(unseen_deleted(b)[1] for b in values_flags)
        first, modseq, row = await self._allocate(conn, mbox.id, len(msgs), total, unseen, deleted)
        refs: dict[str, tuple[int, int]] = {}
        for m in msgs:
            n, _ = refs.get(m.blob_key, (0, m.blob_size))
            refs[m.blob_key] = (n + 1, m.blob_size)
        await self._ref_blobs(conn, refs)
        values = [self._message_values(mbox.id, first + i, modseq, m) for i, m in enumerate(msgs)]
        if len(values) == 1:
            ids = [(await conn.execute(insert(M).values(values[0]).returning(M.c.id))).scalar_one()]
        else:
            await conn.execute(insert(M), values)
            ids = []
        uids = [first + i for i in range(len(msgs))]
        added = [MessageState(uid=v["uid"], flags=flags_from_db(v["flags"], v["keywords"]),
                              modseq=modseq) for v in values]
        change = Change(acct.id, mbox.id, row.name, row.uidvalidity, row.uidnext, modseq,
                        row.message_count, added=added)
        change.message_ids = ids
        return uids, change

    async def deliver(self, queue_id: str, account_id: int, mailbox: str, msg: NewMessage
                      ) -> DeliverOutcome:
        """Store one delivered message, idempotent on (queue_id, account_id): the
        deliveries row is written in the same transaction as the message.

        Concurrent calls are grouped into one transaction (group commit: one fsync for
        many deliveries); the result is the same as one transaction each."""
        return await self._batcher.submit(_DeliverJob(queue_id, account_id, mailbox, msg))

    async def _deliver_batch(self, jobs: list[_DeliverJob]) -> list[DeliverOutcome]:
        """Deliver a batch in one transaction with a fixed number of statements (not a
        number per message): that, not the fsync, is what bounds deliveries per second."""

        async def tx(conn: AsyncConnection) -> list[DeliverOutcome]:
            aids = sorted({j.account_id for j in jobs})
            # lock every account of the batch in one order: no deadlock between replicas
            accts = {r.id: r for r in (await conn.execute(
                select(A.c.id, A.c.enabled, A.c.quota_bytes, A.c.used_bytes)
                .where(A.c.id.in_(aids)).order_by(A.c.id).with_for_update())).all()}
            done = {(q, a) for q, a in (await conn.execute(
                select(D.c.queue_id, D.c.account_id).where(
                    D.c.queue_id.in_(sorted({j.queue_id for j in jobs})),
                    D.c.account_id.in_(aids)))).all()}
            boxes = await self._delivery_mailboxes(conn, jobs, set(accts))
            used = {a: r.used_bytes for a, r in accts.items()}
            outcomes: list[DeliverOutcome] = []
            placed: list[tuple[int, _DeliverJob, Any]] = []  # (index, job, mailbox row)
            for i, j in enumerate(jobs):
                acct = accts.get(j.account_id)
                if acct is None:
                    outcomes.append(DeliverOutcome("no_account"))
                    continue
                if (j.queue_id, j.account_id) in done:
                    outcomes.append(DeliverOutcome("duplicate"))
                    continue
                if not acct.enabled:
                    outcomes.append(DeliverOutcome("disabled"))
                    continue
                size = len(j.msg.prefix) + j.msg.blob_size
                if acct.quota_bytes is not None and used[j.account_id] + size > acct.quota_bytes:
                    outcomes.append(DeliverOutcome("over_quota"))
                    continue
                used[j.account_id] += size
                done.add((j.queue_id, j.account_id))
                outcomes.append(DeliverOutcome("delivered"))
                placed.append((i, j, self._pick_mailbox(boxes, j)))
            if not placed:
                return outcomes
            # usage, exact, in this transaction
            per_acct: dict[int, tuple[int, int]] = {}
            per_box: dict[int, tuple[int, int]] = {}
            per_box_flags: dict[int, tuple[int, int]] = {}
            refs: dict[str, tuple[int, int]] = {}
            for _, j, box in placed:
                size = len(j.msg.prefix) + j.msg.blob_size
                n, b = per_acct.get(j.account_id, (0, 0))
                per_acct[j.account_id] = (n + 1, b + size)
                n, b = per_box.get(box.id, (0, 0))
                per_box[box.id] = (n + 1, b + size)
                un, de = unseen_deleted(flags_to_db(j.msg.flags)[0])
                u0, d0 = per_box_flags.get(box.id, (0, 0))
                per_box_flags[box.id] = (u0 + un, d0 + de)
                n, _ = refs.get(j.msg.blob_key, (0, 0))
                refs[j.msg.blob_key] = (n + 1, j.msg.blob_size)
            await conn.execute(
                update(A).where(A.c.id == bindparam("aid")).values(
                    used_bytes=A.c.used_bytes + bindparam("nb"),
                    message_count=A.c.message_count + bindparam("nm")),
                [{"aid": a, "nb": b, "nm": n} for a, (n, b) in sorted(per_acct.items())])
            # UIDs: one UPDATE ... RETURNING per mailbox, in id order
            alloc: dict[int, tuple[int, int, Any]] = {}
            for box_id in sorted(per_box):
                n, b = per_box[box_id]
                alloc[box_id] = await self._allocate(conn, box_id, n, b, *per_box_flags[box_id])
            await self._ref_blobs_many(conn, refs)
            next_uid = {bid: first for bid, (first, _, _) in alloc.items()}
            values = []
            for _, j, box in placed:
                uid = next_uid[box.id]
                next_uid[box.id] = uid + 1
                values.append(self._message_values(box.id, uid, alloc[box.id][1], j.msg))
            ids = (await conn.execute(
                insert(M).returning(M.c.id, sort_by_parameter_order=True), values)).scalars().all()
            now = datetime.now(UTC)
            await conn.execute(insert(D), [
                {"queue_id": j.queue_id, "account_id": j.account_id, "message_id": mid,
                 "delivered_at": now} for (_, j, _), mid in zip(placed, ids, strict=True)])
            # one change per delivered message (IMAP sessions see each arrival)
            seen_count: dict[int, int] = {}
            for (i, j, box), v in zip(placed, values, strict=True):
                _, modseq, row = alloc[box.id]
                k = seen_count.get(box.id, 0) + 1
                seen_count[box.id] = k
                n = per_box[box.id][0]
                exists = row.message_count - n + k
                change = Change(j.account_id, box.id, row.name, row.uidvalidity, v["uid"] + 1,
                                modseq, exists, added=[MessageState(
                                    uid=v["uid"], flags=flags_from_db(v["flags"], v["keywords"]),
                                    modseq=modseq)])
                outcomes[i] = DeliverOutcome("delivered", v["uid"], box.id, change)
            return outcomes

        return await self.write(tx)

    async def _delivery_mailboxes(self, conn: AsyncConnection, jobs: list[_DeliverJob],
                                  accounts: set[int]) -> dict[tuple[int, str], Any]:
        """The mailboxes the batch may deliver into, keyed by (account, name); INBOX and
        the default folders are created for accounts that do not have them yet."""
        wanted: dict[int, set[str]] = {}
        for j in jobs:
            if j.account_id in accounts:
                try:
                    name = normalize_name(j.mailbox or INBOX)
                except Invalid:
                    name = INBOX
                wanted.setdefault(j.account_id, {INBOX}).add(name)
        if not wanted:
            return {}
        names = set().union(*wanted.values())

        async def load() -> dict[tuple[int, str], Any]:
            rows = (await conn.execute(select(MB).where(
                MB.c.account_id.in_(sorted(wanted)), MB.c.name.in_(sorted(names))))).all()
            return {(r.account_id, r.name): r for r in rows}

        boxes = await load()
        defaults = {n for n, _ in DEFAULT_MAILBOXES}
        missing = [a for a, ns in wanted.items()
                   if any((a, n) not in boxes for n in ns & defaults)]
        for a in missing:
            await self._ensure_defaults(conn, a, wanted[a] & defaults)
        return await load() if missing else boxes

    @staticmethod
    def _pick_mailbox(boxes: dict[tuple[int, str], Any], j: _DeliverJob) -> Any:
        try:
            name = normalize_name(j.mailbox or INBOX)
        except Invalid:
            name = INBOX
        box = boxes.get((j.account_id, name))
        if box is None or box.noselect:
            box = boxes[(j.account_id, INBOX)]
        return box

    async def _ref_blobs_many(self, conn: AsyncConnection, refs: dict[str, tuple[int, int]]) -> None:
        """Add references to many blobs in one statement (sorted: a stable lock order)."""
        rows = [{"key": k, "size": refs[k][1], "refcount": refs[k][0], "unreferenced_since": None}
                for k in sorted(refs)]
        for i in range(0, len(rows), 200):
            stmt = self._insert(B).values(rows[i:i + 200])
            await conn.execute(stmt.on_conflict_do_update(
                index_elements=["key"],
                set_={"refcount": B.c.refcount + stmt.excluded.refcount,
                      "unreferenced_since": None}))

    async def append(self, account_id: int, mailbox: str, msg: NewMessage) -> tuple[int, int, Change]:
        """APPEND: returns (uidvalidity, uid, change); not_found (TRYCREATE) / over_quota."""
        uv, uids, change = await self.append_many(account_id, mailbox, [msg])
        return uv, uids[0], change

    async def append_many(self, account_id: int, mailbox: str, msgs: Sequence[NewMessage]
                          ) -> tuple[int, list[int], Change]:
        """Several messages in one transaction (MULTIAPPEND, RFC 3502; imports): all or
        none, consecutive UIDs. Returns (uidvalidity, uids, change)."""
        name = normalize_name(mailbox)
        if not msgs:
            raise Invalid("nothing to append")

        async def tx(conn: AsyncConnection) -> tuple[int, list[int], Change]:
            acct = await self._lock_account(conn, account_id)
            mbox = await self._mailbox_by_name(conn, account_id, name)
            if mbox is None and name in {n for n, _ in DEFAULT_MAILBOXES}:
                await self._ensure_defaults(conn, account_id, {name})
                mbox = await self._mailbox_by_name(conn, account_id, name)
            if mbox is None:
                raise NotFound(f"no mailbox {name}")
            uids, change = await self._insert_messages(conn, acct, mbox, msgs)
            return mbox.uidvalidity, uids, change

        return await self.write(tx)

    # ------------------------------------------------------------ select / fetch
    async def select(self, account_id: int, mailbox_id: int = 0, *, name: str | None = None,
                     after_uid: int = 0, limit: int = 5000, changed_since: int | None = None
                     ) -> tuple[MailboxInfo, list[MessageState], bool, list[tuple[int, int]]]:
        """A page of a mailbox's snapshot, by id or by ``name`` (Invalid when the named
        mailbox is \\Noselect, so IMAP can say CANNOT rather than NONEXISTENT)."""
        limit = max(1, min(limit, 50_000))
        if name is not None:
            name = normalize_name(name)
            if name == INBOX:
                await self._ensure_inbox(account_id)
        async with self._read() as conn:
            found = await self._mailbox_with_info(conn, account_id, name=name,
                                                  mailbox_id=mailbox_id)
            if found is None:
                raise NotFound(f"no mailbox {name if name is not None else mailbox_id}")
            row, info = found
            if row.noselect:
                if name is not None:
                    raise Invalid(f"{row.name} cannot be selected (\\Noselect)")
                raise NotFound(f"{row.name} is \\Noselect")
            mailbox_id = row.id
            q = (select(M.c.uid, M.c.flags, M.c.keywords, M.c.modseq)
                 .where(M.c.mailbox_id == mailbox_id, M.c.uid > after_uid))
            if changed_since is not None:
                q = q.where(M.c.modseq > changed_since)
            rows = (await conn.execute(q.order_by(M.c.uid).limit(limit + 1))).all()
            vanished: list[tuple[int, int]] = []
            if changed_since is not None and after_uid == 0:
                gone = (await conn.execute(select(X.c.uid).where(
                    X.c.mailbox_id == mailbox_id, X.c.modseq > changed_since))).scalars().all()
                vanished = ranges_to_list(gone)
        more = len(rows) > limit
        # rows straight from SQL: no validation needed (model_construct is ~10x faster)
        msgs = [make_state(r[0], flags_from_db(r[1], r[2]), r[3]) for r in rows[:limit]]
        return info, msgs, more, vanished

    async def fetch(self, account_id: int, mailbox_id: int, uids: Sequence[Sequence[int]],
                    with_summary: bool = True) -> list[MessageMeta]:
        cond, inside = uid_filter(uids)
        cols = [M.c.uid, M.c.flags, M.c.keywords, M.c.modseq, M.c.internaldate, M.c.size,
                M.c.blob_key, M.c.prefix]
        if with_summary:
            cols.append(M.c.summary)
        async with self._read() as conn:
            await self._mailbox_by_id(conn, account_id, mailbox_id)
            rows = (await conn.execute(select(*cols).where(M.c.mailbox_id == mailbox_id, cond)
                                       .order_by(M.c.uid))).all()
        out = []
        # rows as plain tuples: attribute access on a Row costs more than the rest per row
        for uid, bits, kws, modseq, idate, size, blob_key, raw_prefix, *summary in map(
                tuple, rows):
            if not inside(uid):
                continue
            prefix = bytes(raw_prefix or b"")
            values = {
                "uid": uid, "flags": flags_from_db(bits, kws), "modseq": modseq,
                "internaldate": utc(idate), "size": size, "blob_key": blob_key,
                "blob_size": size - len(prefix), "prefix": prefix,
                "summary": MessageSummary.model_validate_json(summary[0]) if with_summary else None}
            out.append(trusted_model(MessageMeta, values))
        return out

    # ------------------------------------------------------------ flags
    async def store_flags(self, account_id: int, mailbox_id: int, uids: Sequence[Sequence[int]],
                          op: Literal["set", "add", "remove"], flags: Sequence[str],
                          unchanged_since: int | None = None, *,
                          max_messages: int | None = None
                          ) -> tuple[list[MessageState], list[int], Change | None]:
        """STORE: every changed message gets the new MODSEQ (RFC 7162 §3.1.3); messages whose
        MODSEQ is above UNCHANGEDSINCE are left alone and reported as modified."""
        bits, kws = flags_to_db(flags)
        kwset = set(kws.split()) if kws else set()
        cond, inside = uid_filter(uids)
        # one UPDATE for the whole set when SQL can express the change exactly
        one_statement = inside is ANY_UID and (op == "set" or not kwset)

        async def tx(conn: AsyncConnection) -> tuple[list[MessageState], list[int], Change | None]:
            await self._lock_account(conn, account_id)
            mbox = await self._mailbox_by_id(conn, account_id, mailbox_id, lock=True)
            # rows as plain tuples: attribute access on a Row costs more than the rest per row
            rows = [r for r in map(tuple, (await conn.execute(
                select(M.c.id, M.c.uid, M.c.flags, M.c.keywords, M.c.modseq)
                .where(M.c.mailbox_id == mailbox_id, cond).order_by(M.c.uid))).all())
                if inside(r[1])]
            _check_count(rows, max_messages)
            modified: list[int] = []
            todo: list[tuple[int, int, int, str]] = []  # id, uid, new bits, new keywords
            old: dict[int, int] = {}
            empty: set[str] = set()
            for mid, uid, cur_bits, cur_kws, cur_modseq in rows:
                if unchanged_since is not None and cur_modseq > unchanged_since:
                    modified.append(uid)
                    continue
                old[mid] = cur_bits
                if not cur_kws and not kwset:  # the common case: system flags only
                    nb = bits if op == "set" else (
                        cur_bits | bits if op == "add" else cur_bits & ~bits)
                    if nb != cur_bits:
                        todo.append((mid, uid, nb, ""))
                    continue
                cur_kw = set(cur_kws.split()) if cur_kws else empty
                if op == "set":
                    nb, nk = bits, kwset
                elif op == "add":
                    nb, nk = cur_bits | bits, cur_kw | kwset
                else:
                    nb, nk = cur_bits & ~bits, cur_kw - kwset
                if nb != cur_bits or nk != cur_kw:
                    todo.append((mid, uid, nb, " ".join(sorted(nk))))
            if not todo:
                return [], modified, None
            modseq = mbox.highestmodseq + 1
            du = sum(unseen_deleted(b)[0] for _, _, b, _ in todo) - sum(
                unseen_deleted(old[mid])[0] for mid, _, _, _ in todo)
            dd = sum(unseen_deleted(b)[1] for _, _, b, _ in todo) - sum(
                unseen_deleted(old[mid])[1] for mid, _, _, _ in todo)
            await conn.execute(update(MB).where(MB.c.id == mailbox_id).values(
                highestmodseq=modseq, unseen_count=MB.c.unseen_count + du,
                deleted_count=MB.c.deleted_count + dd))
            if one_statement and len(todo) > 50:
                stmt = update(M).where(M.c.mailbox_id == mailbox_id, cond)
                if unchanged_since is not None:
                    stmt = stmt.where(M.c.modseq <= unchanged_since)
                if op == "add":
                    stmt = stmt.where(M.c.flags.op("&")(bits) != bits).values(
                        flags=M.c.flags.op("|")(bits), modseq=modseq)
                elif op == "remove":
                    stmt = stmt.where(M.c.flags.op("&")(bits) != 0).values(
                        flags=M.c.flags.op("&")(~bits), modseq=modseq)
                else:
                    stmt = stmt.where(or_(M.c.flags != bits, M.c.keywords != kws)).values(
                        flags=bits, keywords=kws, modseq=modseq)
                res = await conn.execute(stmt)
                if res.rowcount != len(todo):  # cannot happen under the account lock
                    raise Conflict("concurrent flag change; retry")
            else:
                await self._bulk_update_flags(conn, todo, modseq)
            updated = [make_state(u, flags_from_db(b, k), modseq) for _, u, b, k in todo]
            change = Change(account_id, mailbox_id, mbox.name, mbox.uidvalidity, mbox.uidnext,
                            modseq, mbox.message_count, flags=updated)
            return updated, modified, change

        return await self.write(tx)

    async def _bulk_update_flags(self, conn: AsyncConnection,
                                 todo: Sequence[tuple[int, int, int, str]], modseq: int) -> None:
        # group by the new value: "+FLAGS \\Seen" on 100,000 messages is a few statements
        groups: dict[tuple[int, str], list[int]] = {}
        for mid, _uid, b, k in todo:
            groups.setdefault((b, k), []).append(mid)
        for (b, k), ids in groups.items():
            for i in range(0, len(ids), 900):
                await conn.execute(update(M).where(M.c.id.in_(ids[i:i + 900])).values(
                    flags=b, keywords=k, modseq=modseq))

    # ------------------------------------------------------------ expunge / remove
    async def _log_expunged(self, conn: AsyncConnection, mailbox_id: int, uids: Sequence[int],
                            modseq: int) -> None:
        if uids:
            await conn.execute(insert(X), [{"mailbox_id": mailbox_id, "uid": u, "modseq": modseq}
                                           for u in uids])

    async def _remove_messages(self, conn: AsyncConnection, acct: Any, mbox: Any,
                               where: ColumnElement[bool] | None,
                               keep: Callable[[int], bool] = ANY_UID) -> Change | None:
        """Delete messages of one mailbox matching ``where`` (all when None) and ``keep``;
        log them for VANISHED, release blob references, credit the quota."""
        return (await self._remove_page(conn, acct, mbox, where, keep))[0]

    async def _remove_page(self, conn: AsyncConnection, acct: Any, mbox: Any,
                           where: ColumnElement[bool] | None,
                           keep: Callable[[int], bool] = ANY_UID, limit: int | None = None
                           ) -> tuple[Change | None, bool]:
        """``_remove_messages`` for at most ``limit`` of them, lowest UIDs first; also says
        whether more remain (SQL does the LIMIT when ``where`` alone selects the rows)."""
        q = select(M.c.id, M.c.uid, M.c.blob_key, M.c.size, M.c.flags).where(
            M.c.mailbox_id == mbox.id)
        if where is not None:
            q = q.where(where)
        q = q.order_by(M.c.uid)
        if limit is not None and keep is ANY_UID:
            q = q.limit(limit + 1)
        rows = [r for r in (await conn.execute(q)).all() if keep(r.uid)]
        more = limit is not None and len(rows) > limit
        return await self._remove_rows(conn, acct, mbox, rows[:limit] if more else rows), more

    async def _remove_rows(self, conn: AsyncConnection, acct: Any, mbox: Any,
                           rows: Sequence[Any]) -> Change | None:
        if not rows:
            return None
        ids = [r.id for r in rows]
        for i in range(0, len(ids), 900):
            await conn.execute(delete(M).where(M.c.id.in_(ids[i:i + 900])))
        refs: dict[str, int] = {}
        for r in rows:
            refs[r.blob_key] = refs.get(r.blob_key, 0) + 1
        await self._unref_blobs(conn, refs)
        total = sum(r.size for r in rows)
        await self._charge(conn, acct, -total, -len(rows), enforce=False)
        modseq = mbox.highestmodseq + 1
        unseen = sum(unseen_deleted(r.flags)[0] for r in rows)
        deleted = sum(unseen_deleted(r.flags)[1] for r in rows)
        await conn.execute(update(MB).where(MB.c.id == mbox.id).values(
            highestmodseq=modseq, message_count=MB.c.message_count - len(rows),
            total_size=MB.c.total_size - total, unseen_count=MB.c.unseen_count - unseen,
            deleted_count=MB.c.deleted_count - deleted))
        uids = [r.uid for r in rows]
        await self._log_expunged(conn, mbox.id, uids, modseq)
        return Change(acct.id, mbox.id, mbox.name, mbox.uidvalidity, mbox.uidnext, modseq,
                      mbox.message_count - len(rows), expunged=uids)

    async def expunge(self, account_id: int, mailbox_id: int,
                      uids: Sequence[Sequence[int]] | None = None, *, limit: int | None = None
                      ) -> tuple[list[int], int, Change | None, bool]:
        """Remove \\Deleted messages (all, or only within ``uids``: UID EXPUNGE, RFC 4315),
        at most ``limit`` of them, lowest UIDs first. Returns (expunged UIDs, HIGHESTMODSEQ,
        change, more): with ``more``, other \\Deleted messages of the set remain."""
        deleted = M.c.flags.op("&")(DELETED) != 0
        if uids is None:
            where, keep = deleted, ANY_UID
        else:
            cond, keep = uid_filter(uids)
            where = and_(deleted, cond)
        if limit is not None:
            limit = max(1, limit)

        async def tx(conn: AsyncConnection) -> tuple[list[int], int, Change | None, bool]:
            acct = await self._lock_account(conn, account_id)
            mbox = await self._mailbox_by_id(conn, account_id, mailbox_id, lock=True)
            change, more = await self._remove_page(conn, acct, mbox, where, keep, limit)
            if change is None:
                return [], mbox.highestmodseq, None, False
            return change.expunged, change.highestmodseq, change, more

        return await self.write(tx)

    # ------------------------------------------------------------ copy / move
    async def copy(self, account_id: int, mailbox_id: int, uids: Sequence[Sequence[int]],
                   target: str, move: bool = False, *, max_messages: int | None = None
                   ) -> tuple[int, list[int], list[int], list[Change]]:
        """COPY / MOVE (RFC 6851: copy and expunge in one transaction). Returns the target's
        UIDVALIDITY, source and target UIDs (COPYUID, RFC 4315) and the changes."""
        target = normalize_name(target)
        cond, inside = uid_filter(uids)

        async def tx(conn: AsyncConnection) -> tuple[int, list[int], list[int], list[Change]]:
            acct = await self._lock_account(conn, account_id)
            src = await self._mailbox_by_id(conn, account_id, mailbox_id, lock=True)
            dst = await self._mailbox_by_name(conn, account_id, target)
            if dst is None and target in {n for n, _ in DEFAULT_MAILBOXES}:
                await self._ensure_defaults(conn, account_id, {target})
                dst = await self._mailbox_by_name(conn, account_id, target)
            if dst is None or dst.noselect:
                raise NotFound(f"no mailbox {target}")
            rows = [r for r in (await conn.execute(
                select(M).where(M.c.mailbox_id == mailbox_id, cond).order_by(M.c.uid))).all()
                if inside(r.uid)]
            _check_count(rows, max_messages)
            if not rows:
                return dst.uidvalidity, [], [], []
            if move and dst.id == src.id:
                raise Invalid("cannot move messages into the same mailbox")
            n = len(rows)
            total = sum(r.size for r in rows)
            # a move within the account does not change its usage
            await self._charge(conn, acct, 0 if move else total, 0 if move else n)
            unseen = sum(unseen_deleted(r.flags)[0] for r in rows)
            deleted = sum(unseen_deleted(r.flags)[1] for r in rows)
            first, modseq, drow = await self._allocate(conn, dst.id, n, total, unseen, deleted)
            values = []
            for i, r in enumerate(rows):
                v = {c: getattr(r, c) for c in r._fields if c != "id"}
                v.update(mailbox_id=dst.id, uid=first + i, modseq=modseq, pop3_hidden=False,
                         pop3_retrieved_at=None)
                values.append(v)
            if not move:
                refs: dict[str, tuple[int, int]] = {}
                for r in rows:
                    k, _ = refs.get(r.blob_key, (0, 0))
                    refs[r.blob_key] = (k + 1, r.size - len(r.prefix or b""))
                await self._ref_blobs(conn, refs)
            await conn.execute(insert(M), values)
            target_uids = [first + i for i in range(n)]
            dst_count = drow.message_count
            changes = [Change(account_id, dst.id, drow.name, drow.uidvalidity, drow.uidnext,
                              modseq, dst_count,
                              added=[MessageState(uid=v["uid"],
                                                  flags=flags_from_db(v["flags"], v["keywords"]),
                                                  modseq=modseq) for v in values])]
            if move:
                src = await self._mailbox_by_id(conn, account_id, mailbox_id)
                ids = [r.id for r in rows]
                for i in range(0, n, 900):
                    await conn.execute(delete(M).where(M.c.id.in_(ids[i:i + 900])))
                smodseq = src.highestmodseq + 1
                await conn.execute(update(MB).where(MB.c.id == src.id).values(
                    highestmodseq=smodseq, message_count=MB.c.message_count - n,
                    total_size=MB.c.total_size - total, unseen_count=MB.c.unseen_count - unseen,
                    deleted_count=MB.c.deleted_count - deleted))
                source = [r.uid for r in rows]
                await self._log_expunged(conn, src.id, source, smodseq)
                changes.append(Change(account_id, src.id, src.name, src.uidvalidity, src.uidnext,
                                      smodseq, src.message_count - n, expunged=source))
            return drow.uidvalidity, [r.uid for r in rows], target_uids, changes

        return await self.write(tx)

    # ------------------------------------------------------------ search
    async def search(self, account_id: int, mailbox_id: int, key: SearchKey,
                     body_matcher: Callable[[list[Any], list[tuple[str, SearchKey]]],
                                            Awaitable[dict[int, dict[int, bool]]]] | None = None,
                     *, after_uid: int = 0, limit: int | None = None
                     ) -> tuple[list[int], int, bool]:
        """Evaluate a search program: SQL for everything but body/text/unknown-header keys,
        which ``body_matcher`` checks on the SQL candidates only (reading their blobs last).
        Returns matching UIDs after ``after_uid`` (ascending, at most ``limit``), the highest
        MODSEQ among them, and whether more matches follow (a page)."""
        compiler = _SearchCompiler()
        full = compiler.compile(key)
        if limit is not None:
            limit = max(1, limit)
        async with self._read() as conn:
            await self._mailbox_by_id(conn, account_id, mailbox_id)
            base = and_(M.c.mailbox_id == mailbox_id, M.c.uid > after_uid)
            if not compiler.blob_leaves and not compiler.uid_leaves:
                q = select(M.c.uid, M.c.modseq).where(base, full).order_by(M.c.uid)
                if limit is not None:
                    q = q.limit(limit + 1)
                found = [(r[0], r[1]) for r in (await conn.execute(q)).all()]
                return _search_page(found, limit)
            superset = compiler.bound(key, positive=True)
            leaf_cols = [case((expr, 1), else_=0).label(f"l{i}")
                         for i, expr in enumerate(compiler.sql_leaves)]
            rows = (await conn.execute(
                select(M.c.uid, M.c.modseq, M.c.blob_key, M.c.prefix, M.c.size, *leaf_cols)
                .where(base, superset).order_by(M.c.uid))).all()
        if not rows:
            return [], 0, False
        if compiler.blob_leaves and body_matcher is None:
            raise Invalid("body search is not available")
        # blobs are read a batch at a time, and no further than the page needs
        step = len(rows) if limit is None or not compiler.blob_leaves else BLOB_SEARCH_BATCH
        found = []
        for i in range(0, len(rows), step):
            batch = rows[i:i + step]
            blob_results = (await body_matcher(list(batch), compiler.blob_leaves)
                            if compiler.blob_leaves and body_matcher else {})
            for r in batch:
                sql_vals = [bool(getattr(r, f"l{j}")) for j in range(len(compiler.sql_leaves))]
                if compiler.evaluate(key, sql_vals, blob_results.get(r.uid, {}), r.uid):
                    found.append((r.uid, r.modseq))
            if limit is not None and len(found) > limit:
                break
        return _search_page(found, limit)

    # ------------------------------------------------------------ quota
    async def quota(self, account_id: int) -> tuple[int, int | None, int]:
        async with self._read() as conn:
            row = (await conn.execute(select(A.c.used_bytes, A.c.quota_bytes, A.c.message_count)
                                      .where(A.c.id == account_id))).first()
        if row is None:
            raise NotFound(f"no account {account_id}")
        return int(row[0]), (int(row[1]) if row[1] is not None else None), int(row[2])

    # ------------------------------------------------------------ POP3
    async def pop3_maildrop(self, account_id: int, *, after_uid: int = 0,
                            limit: int | None = None, max_bytes: int | None = None
                            ) -> tuple[int, int, list[Pop3Message], bool]:
        """The INBOX as a POP3 maildrop, paged by UID: messages after ``after_uid``, at most
        ``limit`` of them and about ``max_bytes`` as JSON. Returns (mailbox id, UIDVALIDITY,
        messages, more). UIDs only grow, so pages read in order make one consistent list."""
        await self._ensure_inbox(account_id)
        async with self._read() as conn:
            inbox = await self._mailbox_by_name(conn, account_id, INBOX)
            q = (select(M.c.uid, M.c.size, M.c.pop3_pad, M.c.blob_key, M.c.prefix)
                 .where(M.c.mailbox_id == inbox.id, M.c.pop3_hidden == false(),
                        M.c.uid > after_uid)
                 .order_by(M.c.uid))
            if limit is not None:
                limit = max(1, limit)
                q = q.limit(limit + 1)
            rows = (await conn.execute(q)).all()
        more = limit is not None and len(rows) > limit
        if more:
            rows = rows[:limit]
        msgs: list[Pop3Message] = []
        used = 0
        for r in rows:
            prefix = bytes(r.prefix or b"")
            # one Pop3Message as JSON: names, numbers and uidl, the blob key, base64 prefix
            used += 120 + len(r.blob_key) + 4 * ((len(prefix) + 2) // 3)
            if max_bytes is not None and msgs and used > max_bytes:
                more = True
                break
            values = {"uid": r.uid, "uidl": f"{inbox.uidvalidity}.{r.uid}",
                      "size": r.size + r.pop3_pad, "blob_key": r.blob_key, "prefix": prefix}
            msgs.append(trusted_model(Pop3Message, values))
        return inbox.id, inbox.uidvalidity, msgs, more

    async def pop3_commit(self, account_id: int, mailbox_id: int, delete_uids: Sequence[int],
                          mode: Literal["delete", "keep"], seen_uids: Sequence[int]) -> list[Change]:
        """The UPDATE state of RFC 1939 §6 in one transaction."""
        dels = sorted(set(delete_uids))
        seen = sorted(set(seen_uids) - (set(dels) if mode == "delete" else set()))
        now = datetime.now(UTC)

        async def tx(conn: AsyncConnection) -> list[Change]:
            acct = await self._lock_account(conn, account_id)
            mbox = await self._mailbox_by_id(conn, account_id, mailbox_id, lock=True)
            changes: list[Change] = []
            modseq = mbox.highestmodseq
            flagged: list[MessageState] = []
            if seen:
                rows = (await conn.execute(select(M.c.id, M.c.uid, M.c.flags, M.c.keywords).where(
                    M.c.mailbox_id == mailbox_id, M.c.uid.in_(seen)))).all()
                todo = [(r.id, r.uid, r.flags | SEEN, r.keywords) for r in rows
                        if not r.flags & SEEN]
                if todo:
                    modseq += 1
                    await self._bulk_update_flags(conn, todo, modseq)
                    await conn.execute(update(MB).where(MB.c.id == mailbox_id).values(
                        highestmodseq=modseq, unseen_count=MB.c.unseen_count - len(todo)))
                    flagged = [MessageState(uid=u, flags=flags_from_db(b, k), modseq=modseq)
                               for _, u, b, k in todo]
            for i in range(0, len(seen), 900):
                await conn.execute(update(M).where(
                    M.c.mailbox_id == mailbox_id, M.c.uid.in_(seen[i:i + 900]),
                    M.c.pop3_retrieved_at.is_(None)).values(pop3_retrieved_at=now))
            if dels and mode == "keep":
                for i in range(0, len(dels), 900):
                    await conn.execute(update(M).where(
                        M.c.mailbox_id == mailbox_id, M.c.uid.in_(dels[i:i + 900]))
                        .values(pop3_hidden=True))
            if flagged:
                changes.append(Change(account_id, mailbox_id, mbox.name, mbox.uidvalidity,
                                      mbox.uidnext, modseq, mbox.message_count, flags=flagged))
            if dels and mode == "delete":
                mbox = await self._mailbox_by_id(conn, account_id, mailbox_id)
                change = await self._remove_messages(conn, acct, mbox, M.c.uid.in_(dels))
                if change is not None:
                    changes.append(change)
            return changes

        return await self.write(tx)

    async def expire_pop3(self, now: datetime, batch: int = 2000) -> list[Change]:
        """Expunge INBOX messages retrieved over POP3 longer ago than their account's
        ``pop3_expire_days`` (what CAPA announces as EXPIRE), ``batch`` per transaction."""
        async with self._read() as conn:
            accounts = (await conn.execute(select(A.c.id, A.c.pop3_expire_days).where(
                A.c.pop3_expire_days.is_not(None)))).all()
        changes: list[Change] = []
        for account_id, days in accounts:
            cutoff = utc(now) - timedelta(days=days)
            where = and_(M.c.pop3_retrieved_at.is_not(None), M.c.pop3_retrieved_at <= cutoff)

            async def tx(conn: AsyncConnection, account_id: int = account_id,
                         where: ColumnElement[bool] = where) -> tuple[Change | None, bool]:
                acct = await self._lock_account(conn, account_id)
                inbox = await self._mailbox_by_name(conn, account_id, INBOX, lock=True)
                if inbox is None:
                    return None, False
                return await self._remove_page(conn, acct, inbox, where, limit=batch)

            more = True
            while more:
                try:
                    change, more = await self.write(tx)
                except NotFound:  # the account or its INBOX went away meanwhile
                    break
                if change is not None:
                    changes.append(change)
        return changes

    # ------------------------------------------------------------ blob GC support
    async def collectable_blobs(self, older_than: datetime, limit: int = 500) -> list[str]:
        async with self._read() as conn:
            return list((await conn.execute(
                select(B.c.key).where(B.c.refcount <= 0, B.c.unreferenced_since.is_not(None),
                                      B.c.unreferenced_since < utc(older_than))
                .order_by(B.c.key).limit(limit))).scalars().all())

    async def forget_blob(self, key: str, older_than: datetime) -> bool:
        """Delete the blob row if it is still unreferenced; True when the S3 object may go."""

        async def tx(conn: AsyncConnection) -> bool:
            res = await conn.execute(delete(B).where(
                B.c.key == key, B.c.refcount <= 0, B.c.unreferenced_since < utc(older_than)))
            return bool(res.rowcount)

        return await self.write(tx)

    async def prune_deliveries(self, older_than: datetime) -> int:
        """Forget idempotency rows older than any redelivery can be (they only guard
        against a DeliverLocal coming twice)."""

        async def tx(conn: AsyncConnection) -> int:
            res = await conn.execute(delete(D).where(D.c.delivered_at < utc(older_than)))
            return int(res.rowcount or 0)

        return await self.write(tx)

    async def known_blobs(self, keys: Sequence[str]) -> set[str]:
        if not keys:
            return set()
        async with self._read() as conn:
            return set((await conn.execute(select(B.c.key).where(B.c.key.in_(list(keys)))))
                       .scalars().all())


# ---------------------------------------------------------------- search compilation
_MONTHS = {m: i for i, m in enumerate(
    ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"], 1)}
_HEADER_COLUMNS = {"subject": "subject", "from": "from_addr", "to": "to_addr", "cc": "cc_addr",
                   "bcc": "bcc_addr", "message-id": "message_id_hdr"}
BLOB_OPS = {"body", "text"}


def parse_search_date(s: str) -> datetime:
    """An IMAP date (``1-Feb-1994``, RFC 3501 §9 date) or ISO ``1994-02-01``, as UTC midnight."""
    s = s.strip().strip('"')
    m = re.fullmatch(r"(\d{1,2})-([A-Za-z]{3})-(\d{4})", s)
    if m and m.group(2).lower() in _MONTHS:
        return datetime(int(m.group(3)), _MONTHS[m.group(2).lower()], int(m.group(1)), tzinfo=UTC)
    try:
        d = datetime.fromisoformat(s[:10])
    except ValueError as exc:
        raise Invalid(f"not a date: {s!r}") from exc
    return datetime(d.year, d.month, d.day, tzinfo=UTC)


class _SearchCompiler:
    """Turns a SearchKey tree into SQL; leaves SQL cannot answer (body, text, headers
    without a column) are collected for the blob pass."""

    def __init__(self) -> None:
        self.sql_leaves: list[ColumnElement[bool]] = []
        self.blob_leaves: list[tuple[str, SearchKey]] = []
        # UID sets too fragmented for one statement: SQL tests the bounding range, these
        # exact tests run on the candidate rows
        self.uid_leaves: list[tuple[ColumnElement[bool], Callable[[int], bool]]] = []
        self._leaf_index: dict[int, tuple[str, int]] = {}

    def _is_blob(self, k: SearchKey) -> bool:
        if k.op in BLOB_OPS:
            return True
        return k.op == "header" and (not k.args or k.args[0].lower() not in _HEADER_COLUMNS)

    def compile(self, k: SearchKey) -> ColumnElement[bool]:
        op = k.op.lower()
        if op == "and":
            return and_(true(), *(self.compile(c) for c in k.children))
        if op == "or":
            if not k.children:
                return false()
            return or_(*(self.compile(c) for c in k.children))
        if op == "not":
            if len(k.children) != 1:
                raise Invalid("not takes one key")
            return not_(self.compile(k.children[0]))
        if self._is_blob(k):
            self._leaf_index[id(k)] = ("blob", len(self.blob_leaves))
            self.blob_leaves.append((f"b{len(self.blob_leaves)}", k))
            return true()
        if op == "uid" and k.uids:
            expr, inside = uid_filter(k.uids)
            if inside is not ANY_UID:  # SQL only bounds the set: the exact test comes later
                self._leaf_index[id(k)] = ("uid", len(self.uid_leaves))
                self.uid_leaves.append((expr, inside))
                return true()
        else:
            expr = self._leaf(k)
        self._leaf_index[id(k)] = ("sql", len(self.sql_leaves))
        self.sql_leaves.append(expr)
        return expr

    def bound(self, k: SearchKey, *, positive: bool) -> ColumnElement[bool]:
        """SQL for the candidates query. positive: a superset of the messages that may match
        once blob and exact-UID leaves are known; not positive (under a NOT): a subset of the
        messages that surely match, so that its negation is again a superset."""
        op = k.op.lower()
        if op == "and":
            return and_(true(), *(self.bound(c, positive=positive) for c in k.children))
        if op == "or":
            if not k.children:
                return false()
            return or_(*(self.bound(c, positive=positive) for c in k.children))
        if op == "not":
            return not_(self.bound(k.children[0], positive=not positive))
        kind, i = self._leaf_index[id(k)]
        if kind == "blob":
            return true() if positive else false()
        if kind == "uid":  # may hold only inside the bounding range; holds for sure nowhere
            return self.uid_leaves[i][0] if positive else false()
        return self.sql_leaves[i]

    def evaluate(self, k: SearchKey, sql_vals: list[bool], blob_vals: dict[int, bool],
                 uid: int) -> bool:
        op = k.op.lower()
        if op == "and":
            return all(self.evaluate(c, sql_vals, blob_vals, uid) for c in k.children)
        if op == "or":
            return any(self.evaluate(c, sql_vals, blob_vals, uid) for c in k.children)
        if op == "not":
            return not self.evaluate(k.children[0], sql_vals, blob_vals, uid)
        kind, i = self._leaf_index[id(k)]
        if kind == "uid":
            return self.uid_leaves[i][1](uid)
        return sql_vals[i] if kind == "sql" else blob_vals.get(i, False)

    @staticmethod
    def _arg(k: SearchKey, n: int = 0) -> str:
        if len(k.args) <= n:
            raise Invalid(f"search key {k.op} needs an argument")
        return k.args[n]

    @staticmethod
    def _contains(col: Any, value: str) -> ColumnElement[bool]:
        if value == "":
            return true()
        return func.lower(col).contains(value.lower(), autoescape=True)

    def _leaf(self, k: SearchKey) -> ColumnElement[bool]:
        op = k.op.lower()
        date_col = func.coalesce(M.c.sent_date, M.c.internaldate)
        match op:
            case "all":
                return true()
            case "uid":  # an empty set; compile() handles the others
                return false()
            case "flag" | "unflag":
                name = self._arg(k)
                low = name.lower()
                if low == "\\recent":
                    hit: ColumnElement[bool] = false()
                elif low in _FLAG_BY_LOWER:
                    hit = M.c.flags.op("&")(_FLAG_BY_LOWER[low][1]) != 0
                else:
                    # keywords compare case-insensitively on both databases
                    hit = func.lower(literal(" ") + M.c.keywords + literal(" ")).contains(
                        f" {name.lower()} ", autoescape=True)
                return hit if op == "flag" else not_(hit)
            case "header":
                return self._contains(getattr(M.c, _HEADER_COLUMNS[self._arg(k).lower()]),
                                      self._arg(k, 1) if len(k.args) > 1 else "")
            case "from" | "to" | "cc" | "bcc" | "subject":
                return self._contains(getattr(M.c, _HEADER_COLUMNS[op]), self._arg(k))
            case "before":
                return M.c.internaldate < parse_search_date(self._arg(k))
            case "on":
                d = parse_search_date(self._arg(k))
                return and_(M.c.internaldate >= d, M.c.internaldate < d + timedelta(days=1))
            case "since":
                return M.c.internaldate >= parse_search_date(self._arg(k))
            case "sentbefore":
                return date_col < parse_search_date(self._arg(k))
            case "senton":
                d = parse_search_date(self._arg(k))
                return and_(date_col >= d, date_col < d + timedelta(days=1))
            case "sentsince":
                return date_col >= parse_search_date(self._arg(k))
            case "larger" | "smaller":
                try:
                    n = int(self._arg(k))
                except ValueError as exc:
                    raise Invalid(f"{op} needs a number") from exc
                return M.c.size > n if op == "larger" else M.c.size < n
            case "modseq":
                try:
                    n = int(self._arg(k, len(k.args) - 1))
                except ValueError as exc:
                    raise Invalid("modseq needs a number") from exc
                return M.c.modseq >= n
            case _:
                raise Invalid(f"unknown search key {k.op}")

