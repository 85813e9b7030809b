"""Messages in SQL: inserting and APPEND, SELECT and FETCH, EXPUNGE, COPY and MOVE
(the store's SQL layer, see sqlbase.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, bindparam, case, delete, insert, select, update
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.ext.asyncio import AsyncConnection

from postbus.mailbox_store.outcomes import (
    Change,
    Invalid,
    Limit,
    NeedsWriter,
    NewMessage,
    NotFound,
)
from postbus.mailbox_store.prepared import Prepared
from postbus.mailbox_store.sqlbase import (
    ANY_UID,
    DEFAULT_MAILBOXES,
    DELETED,
    INBOX,
    MAX_KEYWORDS,
    MB,
    B,
    M,
    RepoBase,
    X,
    _check_count,
    flags_from_db,
    flags_to_db,
    make_state,
    normalize_name,
    trusted_model,
    uid_bounds,
    uid_filter,
    unseen_deleted,
    utc,
)
from postbus.proto.mail import MessageSummary
from postbus.proto.store import MailboxInfo, MessageMeta, MessageState, uid_ranges

# ---------------------------------------------------------------- prepared statements
# the statements of APPEND, SELECT, FETCH and EXPUNGE, compiled once (prepared.py)


def _upsert_blob(dialect: str) -> Any:
    # a body already known keeps its home: a row's inline body is never replaced or dropped
    ins = (sqlite_dialect.insert if dialect == "sqlite" else pg_dialect.insert)(B).values(
        key=bindparam("p_key"), size=bindparam("p_size"), refcount=bindparam("p_n"),
        unreferenced_since=None, body=bindparam("p_body", type_=B.c.body.type))
    return ins.on_conflict_do_update(
        index_elements=["key"],
        set_={"refcount": B.c.refcount + bindparam("p_n"), "unreferenced_since": None})


# {blob key: (references added, size, the bytes when kept inline)}
BlobRefs = dict[str, tuple[int, int, bytes | None]]


_Q_REF_BLOB = Prepared(_upsert_blob)
_Q_UNREF_BLOB = Prepared(update(B).where(B.c.key == bindparam("p_key")).values(
    refcount=case((B.c.refcount > bindparam("p_n"), B.c.refcount - bindparam("p_n")), else_=0),
    unreferenced_since=case((B.c.refcount > bindparam("p_n"), None),
                            else_=bindparam("p_now", type_=B.c.unreferenced_since.type))))
_Q_ALLOCATE = Prepared(
    update(MB).where(MB.c.id == bindparam("p_mailbox"))
    .values(uidnext=MB.c.uidnext + bindparam("p_n"), highestmodseq=MB.c.highestmodseq + 1,
            message_count=MB.c.message_count + bindparam("p_n"),
            total_size=MB.c.total_size + bindparam("p_bytes"),
            unseen_count=MB.c.unseen_count + bindparam("p_unseen"),
            deleted_count=MB.c.deleted_count + bindparam("p_deleted"))
    .returning(MB.c.uidnext, MB.c.highestmodseq, MB.c.uidvalidity, MB.c.name,
               MB.c.message_count, MB.c.total_size), named=True)
_Q_REMOVED = Prepared(update(MB).where(MB.c.id == bindparam("p_mailbox")).values(
    highestmodseq=bindparam("p_modseq"), message_count=MB.c.message_count - bindparam("p_n"),
    total_size=MB.c.total_size - bindparam("p_bytes"),
    unseen_count=MB.c.unseen_count - bindparam("p_unseen"),
    deleted_count=MB.c.deleted_count - bindparam("p_deleted")))
_MESSAGE_COLUMNS = (
    "mailbox_id", "uid", "modseq", "flags", "keywords", "internaldate", "size", "blob_key",
    "prefix", "summary", "subject", "from_addr", "to_addr", "cc_addr", "bcc_addr",
    "message_id_hdr", "sent_date", "pop3_hidden", "pop3_pad")
_Q_INSERT = Prepared(insert(M).returning(M.c.id), column_keys=_MESSAGE_COLUMNS)
_Q_INSERT_MANY = Prepared(insert(M), column_keys=_MESSAGE_COLUMNS)
_PAGE = select(M.c.uid, M.c.flags, M.c.keywords, M.c.modseq).where(
    M.c.mailbox_id == bindparam("p_mailbox"), M.c.uid > bindparam("p_after"))
_Q_PAGE = Prepared(_PAGE.order_by(M.c.uid).limit(bindparam("p_limit")))
_Q_PAGE_CHANGED = Prepared(_PAGE.where(M.c.modseq > bindparam("p_since"))
                           .order_by(M.c.uid).limit(bindparam("p_limit")))
_IN_SPAN = (M.c.mailbox_id == bindparam("p_mailbox"),
            M.c.uid.between(bindparam("p_lo"), bindparam("p_hi")))
_META = (M.c.uid, M.c.flags, M.c.keywords, M.c.modseq, M.c.internaldate, M.c.size,
         M.c.blob_key, M.c.prefix)
_Q_FETCH = {False: Prepared(select(*_META).where(*_IN_SPAN).order_by(M.c.uid)),
            True: Prepared(select(*_META, M.c.summary).where(*_IN_SPAN).order_by(M.c.uid))}
_REMOVABLE = (M.c.id, M.c.uid, M.c.blob_key, M.c.size, M.c.flags)
_Q_DELETED_PAGE = Prepared(
    select(*_REMOVABLE).where(M.c.mailbox_id == bindparam("p_mailbox"),
                              M.c.flags.op("&")(DELETED) != 0)
    .order_by(M.c.uid).limit(bindparam("p_limit")), named=True)
_Q_DELETED_SPAN = Prepared(
    select(*_REMOVABLE).where(*_IN_SPAN, M.c.flags.op("&")(DELETED) != 0).order_by(M.c.uid),
    named=True)
# \Recent: the claim of a SELECT (see MessageOps.select)
_Q_RECENT_UID = Prepared(select(MB.c.recent_uid).where(MB.c.id == bindparam("p_mailbox"))
                         .with_for_update())
_Q_CLAIM_RECENT = Prepared(update(MB).where(MB.c.id == bindparam("p_mailbox"))
                           .values(recent_uid=bindparam("p_uidnext")))
_Q_DELETE_ONE = Prepared(delete(M).where(M.c.id == bindparam("p_id")))
_Q_LOG_EXPUNGED = Prepared(insert(X), column_keys=("mailbox_id", "uid", "modseq"))


class MessageOps(RepoBase):
    """Rows of messages: insert (blob references, UIDs, quota), append, select, fetch,
    expunge and remove, copy and move."""

    # ------------------------------------------------------------ inserting messages
    async def _ref_blobs(self, conn: AsyncConnection, refs: BlobRefs) -> None:
        """Add references; sorted so concurrent writers lock in order."""
        for key in sorted(refs):
            n, size, body = refs[key]
            await _Q_REF_BLOB.run(conn, p_key=key, p_size=size, p_n=n, p_body=body)

    async def _unref_blobs(self, conn: AsyncConnection, refs: dict[str, int]) -> None:
        now = datetime.now(UTC)
        for key in sorted(refs):
            await _Q_UNREF_BLOB.run(conn, p_key=key, p_n=refs[key], p_now=now)

    async def _allocate(self, conn: AsyncConnection, mailbox_id: int, n: int, nbytes: int,
                        unseen: int = 0, deleted: int = 0) -> tuple[int, int, Any]:
        """Reserve ``n`` UIDs and one MODSEQ for ``n`` new messages of ``nbytes``; returns
        (first uid, modseq, the new row). The row lock taken here is held until commit, so
        UIDs become visible in order."""
        row = await _Q_ALLOCATE.first(conn, p_mailbox=mailbox_id, p_n=n, p_bytes=nbytes,
                                      p_unseen=unseen, p_deleted=deleted)
        if row is None:
            raise NotFound(f"no mailbox {mailbox_id}")
        return row.uidnext - n, row.highestmodseq, row

    def _message_values(self, mailbox_id: int, uid: int, modseq: int, m: NewMessage) -> dict[str, Any]:
        bits, kws = flags_to_db(m.flags)
        s = m.summary
        return {
            "mailbox_id": mailbox_id, "uid": uid, "modseq": modseq, "flags": bits,
            "keywords": kws, "internaldate": utc(m.internaldate or datetime.now(UTC)),
            "size": m.size, "blob_key": m.blob_key, "prefix": m.prefix,
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
        total = sum(m.size for m in msgs)
        await self._charge(conn, acct, total, len(msgs), enforce=enforce_quota)
        values_flags = [flags_to_db(m.flags)[0] for m in msgs]
        unseen = sum(unseen_deleted(b)[0] for b in values_flags)
        deleted = sum(unseen_deleted(b)[1] for b in values_flags)
        first, modseq, row = await self._allocate(conn, mbox.id, len(msgs), total, unseen, deleted)
        refs: BlobRefs = {}
        for m in msgs:
            n, _, body = refs.get(m.blob_key, (0, m.blob_size, None))
            refs[m.blob_key] = (n + 1, m.blob_size, body or m.body)
        await self._ref_blobs(conn, refs)
        values = [self._message_values(mbox.id, first + i, modseq, m) for i, m in enumerate(msgs)]
        if len(values) == 1:
            ids = [(await _Q_INSERT.rows(conn, **values[0]))[0][0]]
        else:
            await _Q_INSERT_MANY.many(conn, values)
            ids = []
        uids = [first + i for i in range(len(msgs))]
        added = [MessageState(uid=v["uid"], flags=flags_from_db(v["flags"], v["keywords"]),
                              modseq=modseq) for v in values]
        change = Change(acct.id, mbox.id, row.name, row.uidvalidity, row.uidnext, modseq,
                        row.message_count, added=added)
        change.message_ids = ids
        return uids, change

    async def append(self, account_id: int, mailbox: str, msg: NewMessage) -> tuple[int, int, Change]:
        """APPEND: returns (uidvalidity, uid, change); not_found (TRYCREATE) / over_quota."""
        uv, uids, change = await self.append_many(account_id, mailbox, [msg])
        return uv, uids[0], change

    async def append_many(self, account_id: int, mailbox: str, msgs: Sequence[NewMessage],
                          *, claim_recent: bool = False) -> tuple[int, list[int], Change]:
        """Several messages in one transaction (MULTIAPPEND, RFC 3502; imports): all or
        none, consecutive UIDs. Returns (uidvalidity, uids, change).

        ``claim_recent``: the caller has the mailbox selected and claims \\Recent up to the
        new UIDNEXT in the same transaction, as a SELECT's claim does (``select``);
        ``change.recent_from`` is the first UID it got (the new UIDNEXT when none)."""
        name = normalize_name(mailbox)
        if not msgs:
            raise Invalid("nothing to append")
        for m in msgs:  # bounded as STORE bounds them (flags.py), or STORE could not remove one
            if len(flags_to_db(m.flags)[1].split()) > MAX_KEYWORDS:
                raise Limit(f"at most {MAX_KEYWORDS} keywords on a message")

        async def tx(conn: AsyncConnection) -> tuple[int, list[int], Change]:
            acct = await self._lock_account(conn, account_id)
            mbox = await self._mailbox_by_name(conn, account_id, name)
            if mbox is None and name in {n for n, _ in DEFAULT_MAILBOXES}:
                await self._ensure_defaults(conn, account_id, {name})
                mbox = await self._mailbox_by_name(conn, account_id, name)
            if mbox is None:
                raise NotFound(f"no mailbox {name}")
            uids, change = await self._insert_messages(conn, acct, mbox, msgs)
            if claim_recent:
                change.recent_from = await self._claim_recent_in(conn, mbox.id, change.uidnext)
            return mbox.uidvalidity, uids, change

        return await self.write(tx)

    # ------------------------------------------------------------ select / fetch
    async def select(self, account_id: int, mailbox_id: int = 0, *, name: str | None = None,
                     after_uid: int = 0, limit: int = 5000, changed_since: int | None = None,
                     claim_recent: bool = False
                     ) -> tuple[MailboxInfo, list[MessageState], bool, list[tuple[int, int]], int]:
        """A page of a mailbox's snapshot, by id or by ``name`` (Invalid when the named
        mailbox is \\Noselect, so IMAP can say CANNOT rather than NONEXISTENT), and the UID
        from which messages are \\Recent for the caller (RFC 3501 §2.3.2; up to the
        snapshot's UIDNEXT).

        With ``claim_recent`` the messages of the snapshot that no session has claimed yet
        become this caller's: recent_uid moves up to the snapshot's UIDNEXT, in a write
        transaction of its own that runs only when there is something to claim (a SELECT
        with nothing new stays one read). The claim locks the row and takes whatever is
        still unclaimed below that UIDNEXT, so of two sessions claiming at once each
        message goes to exactly one, and the later one still gets the messages the
        earlier one's snapshot did not have. Without it (EXAMINE) nothing changes."""
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
            if claim_recent and self.read_only and row.recent_uid < info.uidnext:
                raise NeedsWriter("a \\Recent claim")  # before reading a page for nothing
            mailbox_id = row.id
            if changed_since is None:
                rows = await _Q_PAGE.rows(conn, p_mailbox=mailbox_id, p_after=after_uid,
                                          p_limit=limit + 1)
            else:
                rows = await _Q_PAGE_CHANGED.rows(conn, p_mailbox=mailbox_id, p_after=after_uid,
                                                  p_since=changed_since, p_limit=limit + 1)
            vanished: list[tuple[int, int]] = []
            if changed_since is not None and after_uid == 0:
                gone = (await conn.execute(select(X.c.uid).where(
                    X.c.mailbox_id == mailbox_id, X.c.modseq > changed_since))).scalars().all()
                vanished = uid_ranges(gone)
        more = len(rows) > limit
        # rows straight from SQL: no validation needed (model_construct is ~10x faster)
        msgs = [make_state(r[0], flags_from_db(r[1], r[2]), r[3]) for r in rows[:limit]]
        recent_uid = row.recent_uid
        if claim_recent:
            recent_uid = info.uidnext
            if row.recent_uid < info.uidnext:
                recent_uid = await self._claim_recent(mailbox_id, info.uidnext)
            info.recent = 0  # every message of the snapshot has been claimed by someone now
        return info, msgs, more, vanished, recent_uid

    async def _claim_recent(self, mailbox_id: int, uidnext: int) -> int:
        """Claim the unclaimed messages below ``uidnext``; the first UID claimed (``uidnext``
        when another session has taken them all)."""

        async def tx(conn: AsyncConnection) -> int:
            return await self._claim_recent_in(conn, mailbox_id, uidnext)

        return await self.write(tx)

    async def _claim_recent_in(self, conn: AsyncConnection, mailbox_id: int, uidnext: int) -> int:
        seen = await _Q_RECENT_UID.first(conn, p_mailbox=mailbox_id)
        if seen is None or seen[0] >= uidnext:
            return uidnext
        await _Q_CLAIM_RECENT.run(conn, p_mailbox=mailbox_id, p_uidnext=uidnext)
        return int(seen[0])

    async def fetch(self, account_id: int, mailbox_id: int, uids: Sequence[Sequence[int]],
                    with_summary: bool = True) -> list[MessageMeta]:
        span = uid_bounds(uids)
        rows: Sequence[tuple[Any, ...]]
        async with self._read() as conn:
            await self._mailbox_by_id(conn, account_id, mailbox_id)
            if span is not None:
                lo, hi, inside = span
                rows = await _Q_FETCH[with_summary].rows(conn, p_mailbox=mailbox_id, p_lo=lo,
                                                         p_hi=hi)
            else:
                cond, inside = uid_filter(uids)
                cols = [*_META, M.c.summary] if with_summary else list(_META)
                rows = list(map(tuple, (await conn.execute(
                    select(*cols).where(M.c.mailbox_id == mailbox_id, cond)
                    .order_by(M.c.uid))).all()))
        out = []
        for uid, bits, kws, modseq, idate, size, blob_key, raw_prefix, *summary in rows:
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

    # ------------------------------------------------------------ expunge / remove
    async def _log_expunged(self, conn: AsyncConnection, mailbox_id: int, uids: Sequence[int],
                            modseq: int) -> None:
        await _Q_LOG_EXPUNGED.many(conn, [{"mailbox_id": mailbox_id, "uid": u, "modseq": modseq}
                                          for u in uids])

    async def _delete_ids(self, conn: AsyncConnection, ids: Sequence[int]) -> None:
        """Delete message rows by id: a few one at a time (one prepared statement), many in
        lists of 900 (SQLite's limit on parameters)."""
        if len(ids) <= 50:
            await _Q_DELETE_ONE.many(conn, [{"p_id": i} for i in ids])
            return
        for i in range(0, len(ids), 900):
            await conn.execute(delete(M).where(M.c.id.in_(ids[i:i + 900])))

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
        q = select(*_REMOVABLE).where(M.c.mailbox_id == mbox.id)
        if where is not None:
            q = q.where(where)
        q = q.order_by(M.c.uid)
        if limit is not None and keep is ANY_UID:
            q = q.limit(limit + 1)
        rows = [r for r in (await conn.execute(q)).all() if keep(r.uid)]
        return await self._remove_found(conn, acct, mbox, rows, limit)

    async def _remove_found(self, conn: AsyncConnection, acct: Any, mbox: Any,
                            rows: list[Any], limit: int | None) -> tuple[Change | None, bool]:
        more = limit is not None and len(rows) > limit
        return await self._remove_rows(conn, acct, mbox, rows[:limit] if more else rows), more

    async def _remove_rows(self, conn: AsyncConnection, acct: Any, mbox: Any,
                           rows: Sequence[Any]) -> Change | None:
        if not rows:
            return None
        await self._delete_ids(conn, [r.id for r in rows])
        refs: dict[str, int] = {}
        for r in rows:
            refs[r.blob_key] = refs.get(r.blob_key, 0) + 1
        await self._unref_blobs(conn, refs)
        total = sum(r.size for r in rows)
        await self._charge(conn, acct, -total, -len(rows), enforce=False)
        modseq = mbox.highestmodseq + 1
        unseen = sum(unseen_deleted(r.flags)[0] for r in rows)
        deleted = sum(unseen_deleted(r.flags)[1] for r in rows)
        await _Q_REMOVED.run(conn, p_mailbox=mbox.id, p_modseq=modseq, p_n=len(rows),
                             p_bytes=total, p_unseen=unseen, p_deleted=deleted)
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
        span = uid_bounds(uids) if uids is not None else None
        keep: Callable[[int], bool]
        if uids is None:
            where, keep = deleted, ANY_UID
        else:
            cond, keep = uid_filter(uids)
            where = and_(deleted, cond)
        if limit is not None:
            limit = max(1, limit)

        async def found(conn: AsyncConnection) -> list[Any]:
            """The \\Deleted messages to remove (one more than ``limit``: are there more?)."""
            if uids is None:
                return await _Q_DELETED_PAGE.rows(
                    conn, p_mailbox=mailbox_id, p_limit=1 << 62 if limit is None else limit + 1)
            assert span is not None
            lo, hi, inside = span
            return [r for r in await _Q_DELETED_SPAN.rows(conn, p_mailbox=mailbox_id, p_lo=lo,
                                                          p_hi=hi) if inside(r.uid)]

        async def tx(conn: AsyncConnection) -> tuple[list[int], int, Change | None, bool]:
            acct = await self._lock_account(conn, account_id)
            mbox = await self._mailbox_by_id(conn, account_id, mailbox_id, lock=True)
            if uids is None or span is not None:
                change, more = await self._remove_found(conn, acct, mbox, await found(conn),
                                                        limit)
            else:
                change, more = await self._remove_page(conn, acct, mbox, where, keep, limit)
            if change is None:
                return [], mbox.highestmodseq, None, False
            return change.expunged, change.highestmodseq, change, more

        if uids is None or span is not None:
            # nothing \Deleted: answered from a read, without a write transaction and its
            # fsync (half the EXPUNGEs under imaptest; imap-access answers these itself). A
            # STORE \Deleted that commits after this read is simply ordered after it.
            async with self._read() as conn:
                mbox = await self._mailbox_by_id(conn, account_id, mailbox_id)
                # the mailbox row counts its \Deleted messages: no scan for a plain EXPUNGE
                if not (mbox.deleted_count if uids is None else await found(conn)):
                    return [], mbox.highestmodseq, None, False
        return await self.write(tx)

    # ------------------------------------------------------------ copy / move
    async def copy(self, account_id: int, mailbox_id: int, uids: Sequence[Sequence[int]],
                   target: str, move: bool = False, *, max_messages: int | None = None
                   ) -> tuple[int, list[int], list[int], list[Change]]:
        """COPY / MOVE (RFC 6851: copy and expunge in one transaction). Returns the target's
        UIDVALIDITY, source and target UIDs (COPYUID, RFC 4315) and the changes. A MOVE into
        the source mailbox itself is allowed (RFC 6851 does not forbid it): the messages get
        new UIDs and the old ones are expunged, in the same transaction."""
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
                refs: BlobRefs = {}  # of rows that exist: their bodies are where they are
                for r in rows:
                    k, _, _ = refs.get(r.blob_key, (0, 0, None))
                    refs[r.blob_key] = (k + 1, r.size - len(r.prefix or b""), None)
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
