"""The store's SQL layer, base: tables, prebuilt statements, limits, pure helpers, and
``RepoBase`` (transactions, account and mailbox rows, INBOX on first use). Errors and
result records are in outcomes.py.

``Repository`` (repository.py) is one chain of classes, each module's on the one before:
sqlbase -> messages -> groupcommit -> mailboxes -> flags -> search -> pop3. Those modules
and directory_sql_admin.py / directory_sql.py are the only places in mailbox-store that
query mail data (db.py and txn.py only set up engines and transactions; models.py is the
schema).
"""

from __future__ import annotations

import contextlib
import functools
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

from pydantic import BaseModel
from sqlalchemy import (
    ColumnElement,
    Table,
    bindparam,
    case,
    exists,
    false,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from postbus.kit.logging import get_logger
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
from postbus.mailbox_store.outcomes import (
    Conflict,
    Invalid,
    NeedsWriter,
    NotFound,
    OverQuota,
)
from postbus.mailbox_store.prepared import Prepared
from postbus.mailbox_store.txn import Writer
from postbus.proto.store import MailboxInfo, MessageState

log = get_logger(__name__)

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
# STATUS RECENT: the messages no session has claimed yet (uid >= recent_uid). Usually none,
# and then the CASE answers without reading a message; otherwise a range of the
# (mailbox_id, uid) index, as long as the unclaimed tail (a mailbox never selected: all)
RECENT_COUNT = case((MB.c.recent_uid >= MB.c.uidnext, 0), else_=select(func.count()).where(
    M.c.mailbox_id == MB.c.id, M.c.uid >= MB.c.recent_uid).scalar_subquery()).label("recent")
_MB_WITH_INFO = select(
    MB,
    RECENT_COUNT,
    exists().where(_CHILD.c.account_id == MB.c.account_id,
                   func.substr(_CHILD.c.name, 1, func.length(MB.c.name) + 1)
                   == MB.c.name.concat(DELIMITER)).label("has_children"),
    exists().where(S.c.account_id == MB.c.account_id, S.c.name == MB.c.name).label("subscribed"),
).where(MB.c.account_id == bindparam("account_id"))
_Q_MB_INFO_BY_NAME = Prepared(_MB_WITH_INFO.where(MB.c.name == bindparam("name")), named=True)
_Q_MB_INFO_BY_ID = Prepared(_MB_WITH_INFO.where(MB.c.id == bindparam("mailbox_id")), named=True)
_MB_BY_NAME = select(MB).where(MB.c.account_id == bindparam("account_id"),
                               MB.c.name == bindparam("name"))
_MB_BY_ID = select(MB).where(MB.c.id == bindparam("mailbox_id"),
                             MB.c.account_id == bindparam("account_id"))
_Q_MB_BY_NAME = {lock: Prepared(_MB_BY_NAME.with_for_update() if lock else _MB_BY_NAME,
                                named=True) for lock in (False, True)}
_Q_MB_BY_ID = {lock: Prepared(_MB_BY_ID.with_for_update() if lock else _MB_BY_ID, named=True)
               for lock in (False, True)}
_Q_MAILBOXES = Prepared(select(MB).where(MB.c.account_id == bindparam("account_id"))
                        .order_by(MB.c.name), named=True)
# LIST: the rows with their STATUS RECENT count (a row for ``_info``)
Q_MAILBOXES_INFO = Prepared(select(MB, RECENT_COUNT).where(
    MB.c.account_id == bindparam("account_id")).order_by(MB.c.name), named=True)
_Q_LOCK_ACCOUNT = Prepared(
    select(A.c.id, A.c.enabled, A.c.quota_bytes, A.c.used_bytes, A.c.message_count)
    .where(A.c.id == bindparam("account_id")).with_for_update(), named=True)
_Q_CHARGE = Prepared(update(A).where(A.c.id == bindparam("p_account")).values(
    used_bytes=A.c.used_bytes + bindparam("p_bytes"),
    message_count=A.c.message_count + bindparam("p_msgs")))
INBOX = "INBOX"
# INBOX and the RFC 6154 special-use folders every account has (created at account creation
# by the directory, or lazily here on first use)
DEFAULT_MAILBOXES: tuple[tuple[str, str | None], ...] = (
    ("INBOX", None), ("Drafts", "\\Drafts"), ("Sent", "\\Sent"), ("Trash", "\\Trash"),
    ("Junk", "\\Junk"), ("Archive", "\\Archive"),
)
SPECIAL_USES = frozenset(s for _, s in DEFAULT_MAILBOXES if s) | {"\\All", "\\Flagged"}
MAX_NAME = 1024
# per account and per message: every one of them is a row or a word in every FETCH FLAGS
MAX_MAILBOXES = 2000
MAX_KEYWORDS = 100
MAX_KEYWORD_LEN = 100
SEEN = FLAG_BITS["\\Seen"]
DELETED = FLAG_BITS["\\Deleted"]
_FLAG_BY_LOWER = {k.lower(): (k, v) for k, v in FLAG_BITS.items()}
# RFC 3501 §9 atom-specials forbidden in a keyword (flag-keyword = atom)
_KEYWORD_RE = re.compile(r'^[^\x00-\x20\x7f(){%*"\\\]]+$')
# OR clauses per statement before falling back to a bounding range + filter in Python
MAX_RANGES_IN_SQL = 100
# a UID set of several ranges with at most this many UIDs is sent as one IN list
MAX_UIDS_IN_LIST = 2000


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
        elif f and len(f) <= MAX_KEYWORD_LEN and _KEYWORD_RE.match(f):
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


def uid_bounds(ranges: Sequence[Sequence[int]]
               ) -> tuple[int, int, Callable[[int], bool]] | None:
    """The lowest and highest UID of a set and an exact test for it, when reading every
    row between the two costs about what reading the set does: one range, or several
    spanning at most MAX_UIDS_IN_LIST UIDs. None otherwise (use ``uid_filter``). Lets
    the hot statements keep one fixed shape (``uid BETWEEN``) and be prepared once."""
    rs = _clean_ranges(ranges)
    if not rs:
        return 1, 0, lambda _u: False
    lo, hi = rs[0][0], rs[-1][1]
    if len(rs) == 1:
        return lo, hi, ANY_UID
    if hi - lo >= MAX_UIDS_IN_LIST:
        return None
    wanted = frozenset(u for a, b in rs for u in range(a, b + 1))
    return lo, hi, wanted.__contains__


def _check_count(rows: Sequence[Any], max_messages: int | None) -> None:
    """Refuse, before changing anything, a request whose answer would be too large to send
    (the caller sends its UID set in smaller parts)."""
    if max_messages is not None and len(rows) > max_messages:
        raise Invalid(f"{len(rows)} messages in one request; send at most {max_messages}")


_FAST = _fast_model_works()


# ---------------------------------------------------------------- the repository
class RepoBase:
    """Transactions, account and mailbox rows, INBOX and the default folders: what every
    other part of the repository builds on."""

    def __init__(self, engine: AsyncEngine, *, read_only: bool = False) -> None:
        self.engine = engine
        self.sqlite = engine.dialect.name == "sqlite"
        self.read_only = read_only  # a reader beside the store: every write is NeedsWriter
        self._writer = Writer(engine)
        self._has_inbox: set[int] = set()  # accounts known to have their INBOX
        self._insert = sqlite_dialect.insert if self.sqlite else pg_dialect.insert

    # ------------------------------------------------------------ transactions
    @contextlib.asynccontextmanager
    async def _read(self) -> AsyncIterator[AsyncConnection]:
        """A read transaction: one snapshot for every statement in it, also for the
        prepared ones, which SQLAlchemy does not see (so it would not begin one first)."""
        async with self.engine.connect() as conn:
            await conn.begin()
            yield conn

    async def write(self, fn: Callable[[AsyncConnection], Awaitable[T]], attempts: int = 5) -> T:
        """Run ``fn`` in a write transaction (group-committed on SQLite, see txn.py);
        returns once the change is committed."""
        if self.read_only:
            raise NeedsWriter("a write, and this repository only reads")
        return await self._writer.write(fn, attempts)

    # ------------------------------------------------------------ account + mailbox rows
    async def _lock_account(self, conn: AsyncConnection, account_id: int) -> Any:
        row = await _Q_LOCK_ACCOUNT.first(conn, account_id=account_id)
        if row is None:
            raise NotFound(f"no account {account_id}")
        return row

    async def _charge(self, conn: AsyncConnection, acct: Any, nbytes: int, nmsgs: int,
                      *, enforce: bool = True) -> None:
        """Add to the account's usage (same transaction as the change); refuse over quota."""
        if (enforce and nbytes > 0 and acct.quota_bytes is not None
                and acct.used_bytes + nbytes > acct.quota_bytes):
            raise OverQuota(f"quota of {acct.quota_bytes} bytes exceeded")
        await _Q_CHARGE.run(conn, p_account=acct.id, p_bytes=nbytes, p_msgs=nmsgs)

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
        return await _Q_MAILBOXES.rows(conn, account_id=account_id)

    async def _mailbox_by_name(self, conn: AsyncConnection, account_id: int, name: str,
                               *, lock: bool = False) -> Any:
        return await _Q_MB_BY_NAME[lock].first(conn, account_id=account_id, name=name)

    async def _mailbox_by_id(self, conn: AsyncConnection, account_id: int, mailbox_id: int,
                             *, lock: bool = False) -> Any:
        row = await _Q_MB_BY_ID[lock].first(conn, mailbox_id=mailbox_id, account_id=account_id)
        if row is None:
            raise NotFound(f"no mailbox {mailbox_id}")
        return row

    async def _mailbox_with_info(self, conn: AsyncConnection, account_id: int, *,
                                 name: str | None = None, mailbox_id: int | None = None
                                 ) -> tuple[Any, MailboxInfo] | None:
        """A mailbox row and its MailboxInfo in one query, by name or by id; None if absent."""
        if name is not None:
            row = await _Q_MB_INFO_BY_NAME.first(conn, account_id=account_id, name=name)
        else:
            row = await _Q_MB_INFO_BY_ID.first(conn, account_id=account_id, mailbox_id=mailbox_id)
        if row is None:
            return None
        return row, self._info(row, bool(row.has_children), bool(row.subscribed))

    async def _create_mailbox_row(self, conn: AsyncConnection, account_id: int, name: str,
                                  special_use: str | None = None, subscribe: bool = False) -> Any:
        uv = await self._next_uidvalidity(conn)
        await conn.execute(insert(MB).values(
            account_id=account_id, name=name, special_use=special_use, uidvalidity=uv,
            uidnext=1, recent_uid=1, highestmodseq=1, noselect=False, message_count=0, total_size=0,
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
    def _info(self, row: Any, has_children: bool, subscribed: bool) -> MailboxInfo:
        """``row``: a mailbox row with its ``recent`` count (RECENT_COUNT)."""
        attrs = ["\\HasChildren" if has_children else "\\HasNoChildren"]
        if row.noselect:
            attrs.append("\\Noselect")
        return MailboxInfo(
            mailbox_id=row.id, name=row.name, special_use=row.special_use, attributes=attrs,
            subscribed=subscribed, uidvalidity=row.uidvalidity, uidnext=row.uidnext,
            highestmodseq=row.highestmodseq, messages=row.message_count, unseen=row.unseen_count,
            recent=row.recent, size=row.total_size, deleted=row.deleted_count)
