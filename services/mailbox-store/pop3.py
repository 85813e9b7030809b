"""Quota, the POP3 maildrop, and what blob GC and retention ask of SQL (the store's SQL
layer, see sqlbase.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Literal

from sqlalchemy import ColumnElement, and_, delete, false, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from postbus.mailbox_store.outcomes import (
    Change,
    NotFound,
)
from postbus.mailbox_store.search import SearchOps
from postbus.mailbox_store.sqlbase import (
    INBOX,
    MB,
    SEEN,
    A,
    B,
    D,
    M,
    flags_from_db,
    trusted_model,
    utc,
)
from postbus.proto.store import MessageState, Pop3Message


class Pop3Ops(SearchOps):
    """QUOTA, POP3 maildrop / commit / expiry, blob GC support."""

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

    async def forget_blob(self, key: str, older_than: datetime) -> Literal["s3", "inline"] | None:
        """Delete the blob row if it is still unreferenced: "s3" when the S3 object may go
        now, "inline" when the body went with the row (ADR 0014), None when it was kept."""
        gone = (B.c.key == key, B.c.refcount <= 0, B.c.unreferenced_since < utc(older_than))

        async def tx(conn: AsyncConnection) -> Literal["s3", "inline"] | None:
            # (SQLite answered DELETE ... RETURNING body IS NULL with false for a NULL body)
            in_s3 = (await conn.execute(select(B.c.body.is_(None)).where(*gone))).scalar()
            if in_s3 is None or not (await conn.execute(delete(B).where(*gone))).rowcount:
                return None
            return "s3" if in_s3 else "inline"

        return await self.write(tx)

    async def prune_deliveries(self, older_than: datetime) -> int:
        """Forget idempotency rows older than any redelivery can be (they only guard
        against a DeliverLocal coming twice)."""

        async def tx(conn: AsyncConnection) -> int:
            res = await conn.execute(delete(D).where(D.c.delivered_at < utc(older_than)))
            return int(res.rowcount or 0)

        return await self.write(tx)

    async def inline_bodies(self, keys: Sequence[str]) -> dict[str, bytes]:
        """The bodies of those of ``keys`` that are kept in their rows (ADR 0014)."""
        if not keys:
            return {}
        async with self._read() as conn:
            return {k: bytes(b) for k, b in (await conn.execute(
                select(B.c.key, B.c.body).where(B.c.key.in_(sorted(set(keys))),
                                                B.c.body.is_not(None)))).all()}

    async def known_blobs(self, keys: Sequence[str]) -> set[str]:
        if not keys:
            return set()
        async with self._read() as conn:
            return set((await conn.execute(select(B.c.key).where(B.c.key.in_(list(keys)))))
                       .scalars().all())
