"""Flags in SQL: STORE with MODSEQ and UNCHANGEDSINCE (the store's SQL layer, see
sqlbase.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from sqlalchemy import bindparam, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from postbus.mailbox_store.mailboxes import MailboxOps
from postbus.mailbox_store.outcomes import (
    Change,
    Conflict,
    Limit,
)
from postbus.mailbox_store.prepared import Prepared
from postbus.mailbox_store.sqlbase import (
    ANY_UID,
    MAX_KEYWORDS,
    MB,
    M,
    _check_count,
    flags_from_db,
    flags_to_db,
    make_state,
    uid_bounds,
    uid_filter,
    unseen_deleted,
)
from postbus.proto.store import MessageState

# prepared once (prepared.py): the statements of a STORE on a few messages
_FLAGGED = (M.c.id, M.c.uid, M.c.flags, M.c.keywords, M.c.modseq)
_Q_FLAGS_SPAN = Prepared(select(*_FLAGGED).where(
    M.c.mailbox_id == bindparam("p_mailbox"),
    M.c.uid.between(bindparam("p_lo"), bindparam("p_hi"))).order_by(M.c.uid))
_Q_SET_FLAGS = Prepared(update(M).where(M.c.id == bindparam("p_id")).values(
    flags=bindparam("p_flags"), keywords=bindparam("p_keywords"), modseq=bindparam("p_modseq")))
_Q_FLAGS_CHANGED = Prepared(update(MB).where(MB.c.id == bindparam("p_mailbox")).values(
    highestmodseq=bindparam("p_modseq"), unseen_count=MB.c.unseen_count + bindparam("p_unseen"),
    deleted_count=MB.c.deleted_count + bindparam("p_deleted")))


class FlagOps(MailboxOps):
    """System flags and keywords of messages."""

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
        if len(kwset) > MAX_KEYWORDS:
            raise Limit(f"at most {MAX_KEYWORDS} keywords on a message")
        cond, inside = uid_filter(uids)
        span = uid_bounds(uids)
        # one UPDATE for the whole set when SQL can express the change exactly
        one_statement = inside is ANY_UID and (op == "set" or not kwset)

        async def found(conn: AsyncConnection) -> list[tuple[int, int, int, str, int]]:
            if span is not None:
                lo, hi, test = span
                return [r for r in await _Q_FLAGS_SPAN.rows(conn, p_mailbox=mailbox_id, p_lo=lo,
                                                            p_hi=hi) if test(r[1])]
            # rows as plain tuples: attribute access on a Row costs more than the rest
            return [r for r in map(tuple, (await conn.execute(
                select(*_FLAGGED).where(M.c.mailbox_id == mailbox_id, cond)
                .order_by(M.c.uid))).all()) if inside(r[1])]

        async def tx(conn: AsyncConnection) -> tuple[list[MessageState], list[int], Change | None]:
            await self._lock_account(conn, account_id)
            mbox = await self._mailbox_by_id(conn, account_id, mailbox_id, lock=True)
            rows = await found(conn)
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
                if len(nk) > MAX_KEYWORDS:  # bounded, as the row and every FETCH FLAGS are
                    raise Limit(f"at most {MAX_KEYWORDS} keywords on a message")
                if nb != cur_bits or nk != cur_kw:
                    todo.append((mid, uid, nb, " ".join(sorted(nk))))
            if not todo:
                return [], modified, None
            modseq = mbox.highestmodseq + 1
            du = sum(unseen_deleted(b)[0] for _, _, b, _ in todo) - sum(
                unseen_deleted(old[mid])[0] for mid, _, _, _ in todo)
            dd = sum(unseen_deleted(b)[1] for _, _, b, _ in todo) - sum(
                unseen_deleted(old[mid])[1] for mid, _, _, _ in todo)
            await _Q_FLAGS_CHANGED.run(conn, p_mailbox=mailbox_id, p_modseq=modseq, p_unseen=du,
                                       p_deleted=dd)
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
        if len(todo) <= 50:  # a few: one prepared statement each
            await _Q_SET_FLAGS.many(conn, [{"p_id": mid, "p_flags": b, "p_keywords": k,
                                            "p_modseq": modseq} for mid, _, b, k in todo])
            return
        # group by the new value: "+FLAGS \\Seen" on 100,000 messages is a few statements
        groups: dict[tuple[int, str], list[int]] = {}
        for mid, _uid, b, k in todo:
            groups.setdefault((b, k), []).append(mid)
        for (b, k), ids in groups.items():
            for i in range(0, len(ids), 900):
                await conn.execute(update(M).where(M.c.id.in_(ids[i:i + 900])).values(
                    flags=b, keywords=k, modseq=modseq))
