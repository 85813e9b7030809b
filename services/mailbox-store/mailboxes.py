"""Mailboxes in SQL: LIST, STATUS, CREATE, DELETE, RENAME, SUBSCRIBE (the store's SQL layer,
see sqlbase.py).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import bindparam, delete, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from postbus.mailbox_store.groupcommit import DeliverOps
from postbus.mailbox_store.outcomes import (
    Change,
    Exists,
    Invalid,
    Limit,
    NotFound,
)
from postbus.mailbox_store.prepared import Prepared
from postbus.mailbox_store.sqlbase import (
    DELIMITER,
    INBOX,
    MAX_MAILBOXES,
    MB,
    Q_MAILBOXES_INFO,
    SPECIAL_USES,
    M,
    S,
    X,
    normalize_name,
    parents_of,
)
from postbus.proto.store import MailboxInfo

_Q_SUBSCRIBED = Prepared(select(S.c.name).where(S.c.account_id == bindparam("account_id")))


class MailboxOps(DeliverOps):
    """Mailbox rows and subscriptions."""

    # ------------------------------------------------------------ mailbox info
    async def _subscribed(self, conn: AsyncConnection, account_id: int) -> set[str]:
        return {r[0] for r in await _Q_SUBSCRIBED.rows(conn, account_id=account_id)}

    async def list_mailboxes(self, account_id: int, subscribed_only: bool = False) -> list[MailboxInfo]:
        await self._ensure_inbox(account_id)
        async with self._read() as conn:
            rows = await Q_MAILBOXES_INFO.rows(conn, account_id=account_id)
            subs = await self._subscribed(conn, account_id)
        names = {r.name for r in rows}
        # every name's parents, once: testing each mailbox against every other one was
        # quadratic (2,000 mailboxes, 4 million comparisons in the store's loop per LIST)
        parents = {p for n in names for p in parents_of(n)}
        out = [self._info(r, r.name in parents, r.name in subs) for r in rows]
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
            have = (await conn.execute(select(func.count()).select_from(MB).where(
                MB.c.account_id == account_id))).scalar() or 0
            if have + len(parents_of(name)) + 1 > MAX_MAILBOXES:
                raise Limit(f"at most {MAX_MAILBOXES} mailboxes per account")
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
            uidnext=inbox.uidnext, recent_uid=inbox.recent_uid, highestmodseq=inbox.highestmodseq,
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
