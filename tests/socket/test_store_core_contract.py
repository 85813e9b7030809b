"""Contract suite of the store repository: the same tests on SQLite (always) and on
PostgreSQL (when POSTBUS_TEST_POSTGRES_URL is set; each test gets a fresh schema)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from sqlalchemy import insert, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from postbus.mailbox_store import db
from postbus.mailbox_store.models import Account, Blob, Domain, Message
from postbus.mailbox_store.repository import (
    MAX_RANGES_IN_SQL,
    Exists,
    Invalid,
    NewMessage,
    NotFound,
    OverQuota,
    Repository,
)
from postbus.mailbox_store.storeapi import eval_leaves
from postbus.proto.store import SearchKey
from postbus.protocols.mime import summarize
from postbus.protocols.served import retr_octets

PG_URL = os.environ.get("POSTBUS_TEST_POSTGRES_URL")
BACKENDS = ["sqlite"] + (["postgresql"] if PG_URL else [])


def raw_message(i: int, subject: str = "", body: str = "", sender: str = "bob@example.net",
                date: str = "Thu, 26 Nov 2026 17:00:00 +0000") -> bytes:
    return (f"From: Bob <{sender}>\r\nTo: alice@example.test\r\n"
            f"Subject: {subject or f'message {i}'}\r\nMessage-ID: <m{i}@example.net>\r\n"
            f"Date: {date}\r\n\r\n{body or f'body number {i}'}\r\n").encode()


def new_message(raw: bytes, flags: tuple[str, ...] = (), prefix: bytes = b"",
                internaldate: datetime | None = None) -> NewMessage:
    import hashlib

    return NewMessage(blob_key="blobs/" + hashlib.sha256(raw).hexdigest(), blob_size=len(raw),
                      summary=summarize(raw), prefix=prefix, flags=flags,
                      internaldate=internaldate)


async def make_engine(backend: str, tmp_path: Path, revision: str = "head"
                      ) -> tuple[AsyncEngine, str, dict[str, Any] | None]:
    """A migrated engine on a fresh database (SQLite file) or schema (PostgreSQL)."""
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'store.db'}"
        engine = db.create_engine(url)
        await db.migrate(engine, revision)
        return engine, url, None
    assert PG_URL
    schema = "t_" + uuid.uuid4().hex[:12]
    admin = db.create_engine(PG_URL)
    async with admin.begin() as conn:
        await conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    await admin.dispose()
    args = {"server_settings": {"search_path": schema}}
    engine = db.create_engine(PG_URL, connect_args=args)
    await db.migrate(engine, revision)
    return engine, schema, args


async def drop(backend: str, engine: AsyncEngine, schema: str) -> None:
    await engine.dispose()
    if backend == "postgresql":
        admin = db.create_engine(PG_URL or "")
        async with admin.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        await admin.dispose()


async def add_account(engine: AsyncEngine, address: str, quota: int | None = None,
                      enabled: bool = True) -> int:
    domain = address.split("@")[1]
    async with engine.begin() as conn:
        did = (await conn.execute(select(Domain.__table__.c.id).where(
            Domain.__table__.c.name == domain))).scalar()
        if did is None:
            did = (await conn.execute(insert(Domain.__table__).values(
                name=domain, local_part_case_sensitive=False).returning(Domain.__table__.c.id))).scalar()
        return int((await conn.execute(insert(Account.__table__).values(
            address=address, domain_id=did, password_hash="x", enabled=enabled, quota_bytes=quota,
            used_bytes=0, message_count=0, pop3_policy="client")
            .returning(Account.__table__.c.id))).scalar())


@dataclass
class Store:
    backend: str
    engine: AsyncEngine
    repo: Repository
    account: int
    target: str  # sqlite path or pg schema
    connect_args: dict[str, Any] | None

    async def inbox(self) -> int:
        return (await self.repo.status(self.account, "INBOX")).mailbox_id

    async def deliver(self, n: int, start: int = 0, mailbox: str = "INBOX") -> list[int]:
        uids = []
        for i in range(start, start + n):
            res = await self.repo.deliver(f"Q{i}", self.account, mailbox, new_message(raw_message(i)))
            assert res.status == "delivered", res
            uids.append(res.uid)
        return uids


@pytest_asyncio.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    engine, target, args = await make_engine(request.param, tmp_path)
    account = await add_account(engine, "alice@example.test")
    yield Store(request.param, engine, Repository(engine), account, target, args)
    await assert_counters_exact(engine)
    await drop(request.param, engine, target)


async def assert_counters_exact(engine: AsyncEngine) -> None:
    """The kept counters (mailbox EXISTS/size/unseen/deleted, account usage) equal what the
    message rows say, whatever the test did."""
    async with engine.connect() as conn:
        boxes = (await conn.execute(text(
            "SELECT b.id, b.message_count, b.total_size, b.unseen_count, b.deleted_count, "
            "count(m.id), coalesce(sum(m.size), 0), "
            "coalesce(sum(CASE WHEN m.flags & 1 = 0 THEN 1 ELSE 0 END), 0), "
            "coalesce(sum(CASE WHEN m.flags & 8 != 0 THEN 1 ELSE 0 END), 0) "
            "FROM mailboxes b LEFT JOIN messages m ON m.mailbox_id = b.id "
            "GROUP BY b.id, b.message_count, b.total_size, b.unseen_count, b.deleted_count"))).all()
        for row in boxes:
            assert tuple(row[1:5]) == tuple(row[5:9]), row
        accts = (await conn.execute(text(
            "SELECT a.id, a.used_bytes, a.message_count, "
            "(SELECT coalesce(sum(m.size), 0) FROM messages m JOIN mailboxes b ON b.id = m.mailbox_id "
            " WHERE b.account_id = a.id), "
            "(SELECT count(*) FROM messages m JOIN mailboxes b ON b.id = m.mailbox_id "
            " WHERE b.account_id = a.id) FROM accounts a"))).all()
        for row in accts:
            assert (row[1], row[2]) == (row[3], row[4]), row


# ---------------------------------------------------------------- mailboxes
async def test_default_mailboxes_created_lazily(store: Store) -> None:
    boxes = {m.name: m for m in await store.repo.list_mailboxes(store.account)}
    assert set(boxes) == {"INBOX", "Drafts", "Sent", "Trash", "Junk", "Archive"}
    assert boxes["Sent"].special_use == "\\Sent" and boxes["INBOX"].special_use is None
    assert all(m.subscribed for m in boxes.values())
    assert len({m.uidvalidity for m in boxes.values()}) == 6
    # idempotent
    await store.repo.ensure_defaults(store.account)
    assert len(await store.repo.list_mailboxes(store.account)) == 6
    assert (await store.repo.status(store.account, "inbox")).name == "INBOX"
    # a deleted default folder stays deleted...
    await store.repo.delete_mailbox(store.account, "Junk")
    await store.repo.create_mailbox(store.account, "Other")
    await store.repo.subscribe(store.account, "Other", True)
    assert "Junk" not in {m.name for m in await store.repo.list_mailboxes(store.account)}
    # ...until mail is filed into it
    res = await store.repo.deliver("QJ", store.account, "Junk", new_message(raw_message(1)))
    junk = await store.repo.status(store.account, "Junk")
    assert res.mailbox_id == junk.mailbox_id and junk.special_use == "\\Junk" and junk.messages == 1
    await store.repo.delete_mailbox(store.account, "Trash")
    uv, uid, _ = await store.repo.append(store.account, "Trash", new_message(raw_message(2)))
    assert uid == 1 and (await store.repo.status(store.account, "Trash")).uidvalidity == uv


async def test_create_with_parents_rename_with_children_and_delete(store: Store) -> None:
    r, a = store.repo, store.account
    info = await r.create_mailbox(a, "Work/Projects/2026")
    assert info.name == "Work/Projects/2026" and info.uidnext == 1
    names = {m.name: m for m in await r.list_mailboxes(a)}
    assert {"Work", "Work/Projects", "Work/Projects/2026"} <= set(names)
    assert "\\HasChildren" in names["Work"].attributes
    assert "\\HasNoChildren" in names["Work/Projects/2026"].attributes
    with pytest.raises(Exists):
        await r.create_mailbox(a, "Work/Projects")
    for bad in ("", "a//b", "/x", "x*", "y%"):
        with pytest.raises(Invalid):
            await r.create_mailbox(a, bad)
    await r.create_mailbox(a, "Trailing/")  # trailing delimiter: declares a hierarchy
    assert (await r.status(a, "Trailing")).name == "Trailing"

    # messages follow a rename, mailbox ids and UIDVALIDITY stay
    leaf = await r.status(a, "Work/Projects/2026")
    await store.deliver(2, mailbox="Work/Projects/2026")
    await r.subscribe(a, "Work/Projects", True)
    await r.rename_mailbox(a, "Work", "Jobs/Old")
    names = {m.name: m for m in await r.list_mailboxes(a)}
    assert "Work" not in names and "Work/Projects/2026" not in names
    moved = names["Jobs/Old/Projects/2026"]
    assert moved.mailbox_id == leaf.mailbox_id and moved.uidvalidity == leaf.uidvalidity
    assert moved.messages == 2
    assert "Jobs" in names  # missing parent created
    assert names["Jobs/Old/Projects"].subscribed  # subscriptions follow
    with pytest.raises(NotFound):
        await r.rename_mailbox(a, "Nope", "Other")
    with pytest.raises(Exists):
        await r.rename_mailbox(a, "Jobs", "Sent")
    with pytest.raises(Invalid):
        await r.rename_mailbox(a, "Jobs", "Jobs/Inside")

    # delete: INBOX refused; a parent keeps its name as \Noselect; leaves disappear
    with pytest.raises(Invalid):
        await r.delete_mailbox(a, "inbox")
    await r.delete_mailbox(a, "Jobs/Old/Projects")
    names = {m.name: m for m in await r.list_mailboxes(a)}
    assert "\\Noselect" in names["Jobs/Old/Projects"].attributes
    with pytest.raises(Invalid):  # \Noselect with children: refused (RFC 3501 §6.3.4)
        await r.delete_mailbox(a, "Jobs/Old/Projects")
    with pytest.raises(NotFound):
        await r.select(a, names["Jobs/Old/Projects"].mailbox_id)
    change = await r.delete_mailbox(a, "Jobs/Old/Projects/2026")
    assert change is not None and change.expunged == [1, 2]
    assert (await r.quota(a))[0] == 0
    with pytest.raises(NotFound):
        await r.delete_mailbox(a, "Jobs/Old/Projects/2026")
    # recreating a name gets a greater UIDVALIDITY (RFC 3501 §2.3.1.1)
    again = await r.create_mailbox(a, "Jobs/Old/Projects/2026")
    assert again.uidvalidity > leaf.uidvalidity
    # creating a \Noselect name makes it selectable again
    await r.create_mailbox(a, "Jobs/Old/Projects")
    assert "\\Noselect" not in (await r.status(a, "Jobs/Old/Projects")).attributes


async def test_rename_inbox_moves_messages_and_leaves_inbox_empty(store: Store) -> None:
    r, a = store.repo, store.account
    await store.deliver(3)
    before = await r.status(a, "INBOX")
    change = await r.rename_mailbox(a, "INBOX", "Old Inbox")
    assert change is not None and change.expunged == [1, 2, 3]
    inbox = await r.status(a, "INBOX")
    assert inbox.messages == 0 and inbox.mailbox_id == before.mailbox_id
    assert inbox.uidnext == before.uidnext  # UIDs are never reused
    old = await r.status(a, "Old Inbox")
    assert old.messages == 3 and old.uidvalidity != inbox.uidvalidity
    assert [m.uid for m in (await r.select(a, old.mailbox_id))[1]] == [1, 2, 3]
    assert await store.deliver(1, start=10) == [4]


async def test_subscriptions(store: Store) -> None:
    r, a = store.repo, store.account
    await r.subscribe(a, "Ghost", True)
    await r.subscribe(a, "Trash", False)
    subs = {m.name: m for m in await r.list_mailboxes(a, subscribed_only=True)}
    assert "Ghost" in subs and "\\NonExistent" in subs["Ghost"].attributes
    assert "Trash" not in subs and "INBOX" in subs
    await r.subscribe(a, "Ghost", False)
    assert "Ghost" not in {m.name for m in await r.list_mailboxes(a, subscribed_only=True)}


# ---------------------------------------------------------------- UIDs, flags, modseq
async def test_uids_strictly_ascending_never_reused(store: Store) -> None:
    r, a = store.repo, store.account
    assert await store.deliver(5) == [1, 2, 3, 4, 5]
    inbox = await store.inbox()
    await r.store_flags(a, inbox, [(4, 5)], "add", ["\\Deleted"])
    expunged, _, _, _ = await r.expunge(a, inbox)
    assert expunged == [4, 5]
    assert await store.deliver(2, start=5) == [6, 7]
    info, msgs, more, _, _ = await r.select(a, inbox)
    assert [m.uid for m in msgs] == [1, 2, 3, 6, 7] and not more
    assert info.uidnext == 8 and info.messages == 5
    # paging
    _, page, more, _, _ = await r.select(a, inbox, after_uid=2, limit=2)
    assert [m.uid for m in page] == [3, 6] and more


async def test_flags_and_modseq(store: Store) -> None:
    r, a = store.repo, store.account
    await store.deliver(4)
    inbox = await store.inbox()
    hms0 = (await r.status(a, "INBOX")).highestmodseq
    updated, modified, change = await r.store_flags(a, inbox, [(1, 2)], "add", ["\\Seen", "$Label1"])
    assert [u.uid for u in updated] == [1, 2] and modified == []
    assert set(updated[0].flags) == {"\\Seen", "$Label1"}
    m1 = updated[0].modseq
    assert m1 > hms0 and change is not None and change.highestmodseq == m1
    # no-op change: nothing updated, modseq unchanged
    updated, _, change = await r.store_flags(a, inbox, [(1, 1)], "add", ["\\Seen"])
    assert updated == [] and change is None
    updated, _, _ = await r.store_flags(a, inbox, [(1, 1)], "remove", ["$Label1"])
    assert updated[0].flags == ["\\Seen"] and updated[0].modseq > m1
    updated, _, _ = await r.store_flags(a, inbox, [(2, 2)], "set", ["\\Flagged"])
    assert updated[0].flags == ["\\Flagged"]
    # UNCHANGEDSINCE (RFC 7162 §3.1.3): message 1 changed after m1, so it is "modified"
    updated, modified, _ = await r.store_flags(a, inbox, [(1, 4)], "add", ["\\Answered"],
                                               unchanged_since=m1)
    assert modified == [1, 2] and [u.uid for u in updated] == [3, 4]
    info = await r.status(a, "INBOX")
    assert info.unseen == 3 and info.highestmodseq == updated[0].modseq
    # CONDSTORE select: only what changed since
    _, msgs, _, _, _ = await r.select(a, inbox, changed_since=m1)
    assert sorted(m.uid for m in msgs) == [1, 2, 3, 4]
    _, msgs, _, _, _ = await r.select(a, inbox, changed_since=info.highestmodseq)
    assert msgs == []
    with pytest.raises(Invalid):
        await r.store_flags(a, inbox, [(1, 1)], "add", ["bad(flag"])
    # fetch: flags, sizes, summary, internaldate
    metas = await r.fetch(a, inbox, [(1, 1), (3, 100)])
    assert [m.uid for m in metas] == [1, 3, 4]
    assert metas[0].summary is not None and metas[0].summary.subject == "message 0"
    assert metas[0].size == metas[0].blob_size and metas[0].internaldate.tzinfo is not None


async def test_fetch_many_ranges(store: Store) -> None:
    await store.deliver(30)
    inbox = await store.inbox()
    ranges = [(i, i) for i in range(1, 31, 2)] * 10  # duplicates and > MAX_RANGES_IN_SQL
    ranges += [(1000 + i, 1000 + i) for i in range(150)]
    metas = await store.repo.fetch(store.account, inbox, ranges, with_summary=False)
    assert [m.uid for m in metas] == list(range(1, 31, 2))
    assert all(m.summary is None for m in metas)


# ---------------------------------------------------------------- copy / move / expunge
async def test_copy_and_move(store: Store) -> None:
    r, a = store.repo, store.account
    await store.deliver(3)
    inbox = await store.inbox()
    await r.store_flags(a, inbox, [(2, 2)], "add", ["\\Flagged", "$Work"])
    uv, src, dst, changes = await r.copy(a, inbox, [(2, 3)], "Archive")
    archive = await r.status(a, "Archive")
    assert uv == archive.uidvalidity and src == [2, 3] and dst == [1, 2]
    assert archive.messages == 2 and len(changes) == 1 and changes[0].added[0].uid == 1
    metas = await r.fetch(a, archive.mailbox_id, [(1, 2)])
    assert set(metas[0].flags) == {"\\Flagged", "$Work"}
    used, _, count = await r.quota(a)
    assert count == 5
    # move (RFC 6851): target gets them, source loses them, in one transaction
    uv, src, dst, changes = await r.copy(a, inbox, [(1, 2)], "Trash", move=True)
    assert src == [1, 2] and dst == [1, 2]
    assert [c.mailbox for c in changes] == ["Trash", "INBOX"] and changes[1].expunged == [1, 2]
    _, msgs, _, vanished, _ = await r.select(a, inbox, changed_since=1)
    assert [m.uid for m in msgs] == [3] and vanished == [(1, 2)]
    assert (await r.quota(a)) == (used, None, 5)  # a move does not change usage
    with pytest.raises(NotFound):
        await r.copy(a, inbox, [(3, 3)], "Nowhere")
    # copy of nothing
    assert (await r.copy(a, inbox, [(50, 60)], "Trash"))[1:3] == ([], [])
    # blob references: the message copied to Archive shares the blob
    async with store.engine.connect() as conn:
        refs = dict((await conn.execute(select(Blob.__table__.c.key, Blob.__table__.c.refcount))).all())
    assert sorted(refs.values()) == [1, 2, 2]


@contextlib.contextmanager
def counted_writes(repo: Repository) -> Iterator[list[int]]:
    """Count the write transactions ``repo`` runs inside the block, in the one item of the
    list it yields."""
    writes = [0]
    write = repo.write

    async def counting(fn: Any, attempts: int = 5) -> Any:
        writes[0] += 1
        return await write(fn, attempts)

    repo.write = counting  # type: ignore[method-assign]
    try:
        yield writes
    finally:
        repo.write = write  # type: ignore[method-assign]


async def test_move_into_the_same_mailbox_is_one_transaction(store: Store) -> None:
    """RFC 6851 does not forbid MOVE into the source mailbox: new UIDs, the old ones
    expunged and logged for VANISHED, counters and usage unchanged, all in one commit."""
    r, a = store.repo, store.account
    await store.deliver(3)
    inbox = await store.inbox()
    await r.store_flags(a, inbox, [(2, 2)], "add", ["\\Seen", "$Work"])
    before = await r.status(a, "INBOX")
    used = await r.quota(a)
    with counted_writes(r) as writes:
        uv, src, dst, changes = await r.copy(a, inbox, [(1, 2)], "INBOX", move=True)
    assert writes == [1]
    assert uv == before.uidvalidity and src == [1, 2] and dst == [4, 5]
    assert [(c.mailbox, [m.uid for m in c.added], c.expunged) for c in changes] == [
        ("INBOX", [4, 5], []), ("INBOX", [], [1, 2])]
    assert changes[1].exists == 3 and changes[1].highestmodseq > changes[0].highestmodseq
    info, msgs, _, vanished, _ = await r.select(a, inbox, changed_since=before.highestmodseq)
    assert [m.uid for m in msgs] == [4, 5] and vanished == [(1, 2)]
    assert set(msgs[1].flags) == {"\\Seen", "$Work"}
    assert (info.messages, info.unseen, info.size, info.uidnext) == (
        3, before.unseen, before.size, 6)
    assert await r.quota(a) == used
    assert [m.uid for m in (await r.select(a, inbox))[1]] == [3, 4, 5]


# ---------------------------------------------------------------- \\Recent
async def test_recent_is_claimed_by_one_select(store: Store) -> None:
    """RFC 3501 §2.3.2: a message is \\Recent to the first session told about it. SELECT
    claims the unclaimed messages (writing only when there are any), EXAMINE looks without
    claiming, STATUS counts what nobody claimed."""
    r, a = store.repo, store.account
    await store.deliver(3)
    inbox = await store.inbox()

    async def select(**kw: Any) -> tuple[Any, list[int], int, int]:
        """(info, UIDs, recent_uid, write transactions it took)"""
        with counted_writes(r) as writes:
            info, msgs, _, _, recent_uid = await r.select(a, **kw)
        return info, [m.uid for m in msgs], recent_uid, writes[0]

    assert (await r.status(a, "INBOX")).recent == 3
    info, _, recent_uid, writes = await select(mailbox_id=inbox)  # EXAMINE
    assert (recent_uid, info.recent, writes) == (1, 3, 0)
    info, uids, recent_uid, writes = await select(name="INBOX", claim_recent=True)
    assert (recent_uid, info.uidnext, uids, writes) == (1, 4, [1, 2, 3], 1)
    assert info.recent == 0 and (await r.status(a, "INBOX")).recent == 0
    # a second SELECT finds nothing left to claim, and does not write
    _, _, recent_uid, writes = await select(mailbox_id=inbox, claim_recent=True)
    assert (recent_uid, writes) == (4, 0)
    await store.deliver(2, start=3)
    assert (await r.status(a, "INBOX")).recent == 2
    assert [i.recent for i in await r.list_mailboxes(a) if i.name == "INBOX"] == [2]
    _, _, recent_uid, _ = await select(mailbox_id=inbox, after_uid=3)  # EXAMINE: unclaimed
    assert recent_uid == 4
    _, uids, recent_uid, writes = await select(mailbox_id=inbox, after_uid=3,
                                               claim_recent=True)
    assert (uids, recent_uid, writes) == ([4, 5], 4, 1)
    # expunged recent messages are not counted
    await store.deliver(2, start=5)
    await r.store_flags(a, inbox, [(6, 6)], "add", ["\\Deleted"])
    await r.expunge(a, inbox)
    assert (await r.status(a, "INBOX")).recent == 1


async def test_concurrent_claims_give_each_message_to_one_session(store: Store) -> None:
    """Sessions selecting while mail arrives: every message is \\Recent to exactly one of
    them (no two claims overlap, and with a last claim nothing is left over)."""
    r, a = store.repo, store.account
    await store.deliver(1)
    inbox = await store.inbox()
    claimed: list[tuple[int, int]] = []

    async def session() -> None:
        for _ in range(5):
            info, _, _, _, recent_uid = await r.select(a, inbox, claim_recent=True)
            if recent_uid < info.uidnext:
                claimed.append((recent_uid, info.uidnext))
            await asyncio.sleep(0)

    async def mail() -> None:
        for i in range(20):
            await store.deliver(1, start=100 + i)

    await asyncio.gather(mail(), *(session() for _ in range(6)))
    info, _, _, _, recent_uid = await r.select(a, inbox, claim_recent=True)
    if recent_uid < info.uidnext:
        claimed.append((recent_uid, info.uidnext))
    uids = sorted(u for lo, hi in claimed for u in range(lo, hi))
    assert uids == list(range(1, 22)), claimed


async def test_migration_leaves_nothing_recent(tmp_path: Path) -> None:
    """Mailboxes that exist before 0004 get recent_uid = uidnext: no message becomes
    \\Recent to the first session after the upgrade."""
    for backend in BACKENDS:
        engine, target, _ = await make_engine(backend, tmp_path, revision="0003")
        try:
            aid = await add_account(engine, f"{backend}@example.test")
            async with engine.begin() as conn:
                await conn.execute(text(
                    "INSERT INTO mailboxes (account_id, name, uidvalidity, uidnext, "
                    "highestmodseq, noselect, message_count, total_size, unseen_count, "
                    "deleted_count) VALUES (:a, 'INBOX', 7, 42, 9, false, 0, 0, 0, 0)"),
                    {"a": aid})
            await db.migrate(engine)
            async with engine.connect() as conn:
                assert (await conn.execute(text("SELECT recent_uid, uidnext FROM mailboxes"))
                        ).one() == (42, 42)
            assert (await Repository(engine).status(aid, "INBOX")).recent == 0
        finally:
            await drop(backend, engine, target)


async def test_expunge_and_vanished(store: Store) -> None:
    r, a = store.repo, store.account
    await store.deliver(6)
    inbox = await store.inbox()
    hms = (await r.status(a, "INBOX")).highestmodseq
    await r.store_flags(a, inbox, [(2, 3), (5, 5)], "add", ["\\Deleted"])
    # UID EXPUNGE (RFC 4315): only within the set
    expunged, hms2, change, _ = await r.expunge(a, inbox, [(1, 2)])
    assert expunged == [2] and change is not None and change.exists == 5
    expunged, hms3, _, _ = await r.expunge(a, inbox)
    assert expunged == [3, 5] and hms3 > hms2 > hms
    assert (await r.expunge(a, inbox))[0] == []
    _, msgs, _, vanished, _ = await r.select(a, inbox, changed_since=hms)
    assert vanished == [(2, 3), (5, 5)]
    _, _, _, vanished, _ = await r.select(a, inbox, changed_since=hms2)
    assert vanished == [(3, 3), (5, 5)]
    info = await r.status(a, "INBOX")
    assert info.messages == 3 and info.deleted == 0
    used, _, count = await r.quota(a)
    assert count == 3
    async with store.engine.connect() as conn:
        zero = (await conn.execute(select(Blob.__table__.c.key).where(
            Blob.__table__.c.refcount == 0, Blob.__table__.c.unreferenced_since.is_not(None)))).all()
    assert len(zero) == 3


# ---------------------------------------------------------------- search
async def test_search(store: Store) -> None:
    r, a = store.repo, store.account
    blobs: dict[str, bytes] = {}
    specs = [
        ("Quarterly report", "the numbers are in", "carol@example.org", "Mon, 02 Nov 2026 10:00:00 +0000"),
        ("Lunch?", "pizza or sushi", "dave@example.net", "Tue, 10 Nov 2026 10:00:00 +0000"),
        ("Re: Quarterly report", "great NUMBERS", "bob@example.net", "Wed, 18 Nov 2026 10:00:00 +0000"),
    ]
    for i, (subj, body, sender, date) in enumerate(specs):
        raw = raw_message(i, subj, body, sender, date)
        m = new_message(raw, internaldate=datetime(2026, 11, 2 + 8 * i, 12, tzinfo=UTC))
        blobs[m.blob_key] = raw
        await r.deliver(f"S{i}", a, "INBOX", m)
    inbox = await store.inbox()
    await r.store_flags(a, inbox, [(2, 2)], "add", ["\\Seen", "$Food"])

    async def matcher(rows: list[Any], leaves: list[tuple[str, SearchKey]]) -> dict[int, dict[int, bool]]:
        return {row.uid: eval_leaves(bytes(row.prefix or b"") + blobs[row.blob_key], leaves)[0]
                for row in rows}

    async def q(key: SearchKey) -> list[int]:
        return (await r.search(a, inbox, key, matcher))[0]

    K = SearchKey
    assert await q(K(op="all")) == [1, 2, 3]
    assert await q(K(op="subject", args=["quarterly"])) == [1, 3]
    assert await q(K(op="from", args=["DAVE"])) == [2]
    assert await q(K(op="flag", args=["\\Seen"])) == [2]
    assert await q(K(op="unflag", args=["\\Seen"])) == [1, 3]
    assert await q(K(op="flag", args=["$Food"])) == [2]
    assert await q(K(op="flag", args=["$food"])) == [2]
    assert await q(K(op="unflag", args=["$FOOD"])) == [1, 3]
    assert await q(K(op="uid", uids=[(2, 3)])) == [2, 3]
    assert await q(K(op="since", args=["10-Nov-2026"])) == [2, 3]
    assert await q(K(op="before", args=["2026-11-10"])) == [1]
    assert await q(K(op="on", args=["18-Nov-2026"])) == [3]
    assert await q(K(op="sentbefore", args=["3-Nov-2026"])) == [1]
    assert await q(K(op="larger", args=["10"])) == [1, 2, 3]
    assert await q(K(op="smaller", args=["10"])) == []
    assert await q(K(op="header", args=["Message-ID", "m1@"])) == [2]
    assert await q(K(op="or", children=[K(op="from", args=["carol"]), K(op="flag", args=["\\Seen"])])) == [1, 2]
    assert await q(K(op="not", children=[K(op="subject", args=["report"])])) == [2]
    # body/text: SQL narrows, blobs decide
    assert await q(K(op="body", args=["numbers"])) == [1, 3]
    assert await q(K(op="and", children=[K(op="body", args=["numbers"]),
                                         K(op="from", args=["bob@"])])) == [3]
    assert await q(K(op="not", children=[K(op="body", args=["numbers"])])) == [2]
    assert await q(K(op="text", args=["dave@example.net"])) == [2]
    assert await q(K(op="body", args=["dave@example.net"])) == []
    assert await q(K(op="header", args=["X-Missing", ""])) == []
    assert await q(K(op="header", args=["Date", "18 Nov"])) == [3]
    uids, top, _ = await r.search(a, inbox, K(op="modseq", args=["1"]), matcher)
    assert uids == [1, 2, 3] and top == (await r.status(a, "INBOX")).highestmodseq
    with pytest.raises(Invalid):
        await q(K(op="since", args=["yesterday"]))
    with pytest.raises(Invalid):
        await q(K(op="frobnicate"))


async def test_search_on_a_fragmented_uid_set_is_exact(store: Store) -> None:
    """More ranges than one statement takes: SQL narrows to the bounding range, the exact
    set decides (a UID set of 150 odd UIDs must not return the even ones)."""
    r, a = store.repo, store.account
    await asyncio.gather(*(r.deliver(f"F{i}", a, "INBOX", new_message(raw_message(i)))
                           for i in range(320)))
    inbox = await store.inbox()
    odd = [(u, u) for u in range(1, 301, 2)]
    assert len(odd) > MAX_RANGES_IN_SQL
    K = SearchKey

    async def q(key: SearchKey, **kw: Any) -> list[int]:
        return (await r.search(a, inbox, key, **kw))[0]

    assert await q(K(op="uid", uids=odd)) == list(range(1, 301, 2))
    assert await q(K(op="not", children=[K(op="uid", uids=odd)])) == (
        list(range(2, 301, 2)) + list(range(301, 321)))
    await r.store_flags(a, inbox, [(1, 10)], "add", ["\\Seen"])
    assert await q(K(op="and", children=[K(op="uid", uids=odd),
                                         K(op="flag", args=["\\Seen"])])) == [1, 3, 5, 7, 9]
    # paged like any search
    first, _, more = await r.search(a, inbox, K(op="uid", uids=odd), limit=100)
    assert first == list(range(1, 201, 2)) and more
    rest, _, more = await r.search(a, inbox, K(op="uid", uids=odd), after_uid=first[-1], limit=100)
    assert rest == list(range(201, 301, 2)) and not more


async def test_oversized_store_and_copy_are_refused_before_any_change(store: Store) -> None:
    """A reply too large for NATS would be lost after the change was made: the store refuses
    such a set up front (store API limits), and the caller sends it in parts."""
    r, a = store.repo, store.account
    await store.deliver(12)
    inbox = await store.inbox()
    before = (await r.status(a, "INBOX")).highestmodseq
    with pytest.raises(Invalid):
        await r.store_flags(a, inbox, [(1, 12)], "add", ["\\Seen"], max_messages=10)
    with pytest.raises(Invalid):
        await r.copy(a, inbox, [(1, 12)], "Archive", max_messages=10)
    after = await r.status(a, "INBOX")
    assert after.highestmodseq == before and after.unseen == 12
    assert (await r.status(a, "Archive")).messages == 0
    updated, _, _ = await r.store_flags(a, inbox, [(1, 10)], "add", ["\\Seen"], max_messages=10)
    assert len(updated) == 10


# ---------------------------------------------------------------- quota
async def test_quota_accounting(store: Store) -> None:
    r = store.repo
    raw = raw_message(1)
    limit = 3 * len(raw) + 5
    a = await add_account(store.engine, "small@example.test", quota=limit)
    for i in range(3):
        assert (await r.deliver(f"QQ{i}", a, "INBOX", new_message(raw, prefix=b""))).status == "delivered"
    assert (await r.deliver("QQ9", a, "INBOX", new_message(raw))).status == "over_quota"
    assert await r.quota(a) == (3 * len(raw), limit, 3)
    inbox = (await r.status(a, "INBOX")).mailbox_id
    with pytest.raises(OverQuota):
        await r.copy(a, inbox, [(1, 1)], "Archive")
    with pytest.raises(OverQuota):
        await r.append(a, "INBOX", new_message(raw))
    # a move does not need room
    await r.copy(a, inbox, [(1, 1)], "Archive", move=True)
    await r.store_flags(a, inbox, [(2, 2)], "add", ["\\Deleted"])
    await r.expunge(a, inbox)
    assert await r.quota(a) == (2 * len(raw), limit, 2)
    assert (await r.deliver("QQ9", a, "INBOX", new_message(raw))).status == "delivered"
    disabled = await add_account(store.engine, "off@example.test", enabled=False)
    assert (await r.deliver("QD", disabled, "INBOX", new_message(raw))).status == "disabled"
    assert (await r.deliver("QD", 99999, "INBOX", new_message(raw))).status == "no_account"
    # the exact sum matches the rows
    async with store.engine.connect() as conn:
        total = (await conn.execute(text(
            "SELECT coalesce(sum(m.size), 0) FROM messages m JOIN mailboxes b ON b.id = m.mailbox_id "
            "WHERE b.account_id = :a"), {"a": a})).scalar()
    assert total == (await r.quota(a))[0]


# ---------------------------------------------------------------- POP3
async def test_pop3_maildrop_and_commit(store: Store) -> None:
    r, a = store.repo, store.account
    prefix = b"Return-Path: <bob@example.net>\r\nDelivered-To: alice@example.test\r\n"
    for i in range(4):
        await r.deliver(f"P{i}", a, "INBOX", new_message(raw_message(i), prefix=prefix))
    mid, uv, msgs, _ = await r.pop3_maildrop(a)
    assert [m.uid for m in msgs] == [1, 2, 3, 4]
    assert msgs[0].uidl == f"{uv}.1" and msgs[0].prefix == prefix
    assert msgs[0].size == len(prefix) + len(raw_message(0))
    # keep mode: hidden from POP3, still there for IMAP, \Seen where RETR'd
    await r.pop3_commit(a, mid, [1], "keep", seen_uids=[1, 2])
    _, _, msgs2, _ = await r.pop3_maildrop(a)
    assert [m.uid for m in msgs2] == [2, 3, 4]
    assert [m.uidl for m in msgs2] == [m.uidl for m in msgs[1:]]  # stable
    metas = {m.uid: m for m in await r.fetch(a, mid, [(1, 4)])}
    assert metas[1].flags == ["\\Seen"] and metas[2].flags == ["\\Seen"] and metas[3].flags == []
    # delete mode: expunged
    changes = await r.pop3_commit(a, mid, [2, 3], "delete", seen_uids=[2])
    assert any(c.expunged == [2, 3] for c in changes)
    _, _, msgs3, _ = await r.pop3_maildrop(a)
    assert [m.uid for m in msgs3] == [4]
    assert (await r.quota(a))[2] == 2


async def test_pop3_size_counts_the_crlf_retr_adds(store: Store) -> None:
    """An IMAP APPEND may end without CRLF; IMAP serves it as is, POP3 ends the line, and
    LIST must say what RETR sends (RFC 1939 §11)."""
    r, a = store.repo, store.account
    prefix = b"Delivered-To: alice@example.test\r\n"
    unterminated = b"Subject: no final CRLF\r\n\r\nlast line"
    await r.deliver("U1", a, "INBOX", new_message(unterminated, prefix=prefix))
    await r.deliver("U2", a, "INBOX", new_message(raw_message(1), prefix=prefix))
    _, _, msgs, _ = await r.pop3_maildrop(a)
    assert [m.size for m in msgs] == [retr_octets(prefix, unterminated),
                                      retr_octets(prefix, raw_message(1))]
    assert msgs[0].size == len(prefix) + len(unterminated) + 2
    metas = await r.fetch(a, await store.inbox(), [(1, 1)])
    assert metas[0].size == len(prefix) + len(unterminated)  # RFC822.SIZE: the bytes IMAP serves


async def test_pages_of_maildrop_search_and_expunge(store: Store) -> None:
    """The replies that grow with the mailbox, read in pages (proto/store.py): after_uid and
    limit (and a byte budget for the maildrop) give the same list as one unpaged call."""
    r, a = store.repo, store.account
    prefix = b"Delivered-To: alice@example.test\r\n"
    raws = [raw_message(i, body="needle" if i % 3 == 0 else "hay") for i in range(10)]
    await r.append_many(a, "INBOX", [new_message(raw, prefix=prefix) for raw in raws])
    inbox = await store.inbox()
    blobs = {new_message(raw).blob_key: raw for raw in raws}

    async def matcher(rows: list[Any], leaves: list[tuple[str, SearchKey]]) -> dict[int, dict[int, bool]]:
        return {row.uid: eval_leaves(bytes(row.prefix or b"") + blobs[row.blob_key], leaves)[0]
                for row in rows}

    _, _, whole, more = await r.pop3_maildrop(a)
    assert not more and [m.uid for m in whole] == list(range(1, 11))
    for limit, max_bytes in ((3, None), (100, 400), (1, 1)):
        pages, after = [], 0
        while True:
            _, _, page, more = await r.pop3_maildrop(a, after_uid=after, limit=limit,
                                                     max_bytes=max_bytes)
            assert page and len(page) <= limit
            pages += page
            if not more:
                break
            after = page[-1].uid
        assert pages == whole

    for key, want in ((SearchKey(op="all"), list(range(1, 11))),
                      (SearchKey(op="body", args=["needle"]), [1, 4, 7, 10])):
        got, after, top = [], 0, 0
        while True:
            uids, hms, more = await r.search(a, inbox, key, matcher, after_uid=after, limit=2)
            assert len(uids) <= 2
            got, top = got + uids, max(top, hms)
            if not more:
                break
            after = uids[-1]
        assert (got, top) == (want, (await r.status(a, "INBOX")).highestmodseq)

    await r.store_flags(a, inbox, [(2, 9)], "add", ["\\Deleted"])
    first, _, change, more = await r.expunge(a, inbox, limit=3)
    assert (first, more) == ([2, 3, 4], True) and change is not None and change.expunged == first
    rest, _, _, more = await r.expunge(a, inbox, [(1, 8)], limit=10)
    assert (rest, more) == ([5, 6, 7, 8], False)
    assert (await r.expunge(a, inbox, limit=1))[::3] == ([9], False)
    assert (await r.expunge(a, inbox, limit=1))[::3] == ([], False)
    assert (await r.status(a, "INBOX")).messages == 2


async def test_pop3_retention_expunges_retrieved_mail_after_its_days(store: Store) -> None:
    """pop3_expire_days (CAPA EXPIRE n): what POP3 retrieved goes n days after its first
    retrieval; what was never retrieved stays, and accounts without a retention are left."""
    r, a = store.repo, store.account
    bob = await add_account(store.engine, "bob@example.test")
    for acct, tag in ((a, "A"), (bob, "B")):
        for i in range(4):
            await r.deliver(f"{tag}{i}", acct, "INBOX", new_message(raw_message(i)))
    async with store.engine.begin() as conn:
        await conn.execute(text("UPDATE accounts SET pop3_expire_days = 3 WHERE id = :a"),
                           {"a": a})
    mid, _, _, _ = await r.pop3_maildrop(a)
    bob_mid, _, _, _ = await r.pop3_maildrop(bob)
    await r.pop3_commit(a, mid, [], "keep", seen_uids=[1, 2])
    await r.pop3_commit(bob, bob_mid, [], "keep", seen_uids=[1, 2])
    # a second retrieval does not restart the clock
    t0 = datetime.now(UTC)
    await r.pop3_commit(a, mid, [], "keep", seen_uids=[2, 3])
    assert await r.expire_pop3(t0 + timedelta(days=2)) == []
    changes = await r.expire_pop3(t0 + timedelta(days=3, minutes=1))
    assert [c.expunged for c in changes] == [[1, 2, 3]] and changes[0].account_id == a
    _, _, left, _ = await r.pop3_maildrop(a)
    assert [m.uid for m in left] == [4]
    assert (await r.quota(a))[2] == 1
    _, _, bobs, _ = await r.pop3_maildrop(bob)
    assert [m.uid for m in bobs] == [1, 2, 3, 4]  # no retention on bob's account
    # nothing retrieved is left to expire
    assert await r.expire_pop3(t0 + timedelta(days=30)) == []


# ---------------------------------------------------------------- delivery
async def test_idempotent_delivery(store: Store) -> None:
    r, a = store.repo, store.account
    m = new_message(raw_message(1))
    first = await r.deliver("QX", a, "INBOX", m)
    again = await r.deliver("QX", a, "INBOX", m)
    assert first.status == "delivered" and again.status == "duplicate"
    other = await add_account(store.engine, "bob@example.test")
    assert (await r.deliver("QX", other, "INBOX", m)).status == "delivered"  # another recipient
    assert (await r.status(a, "INBOX")).messages == 1
    # unknown or \Noselect target mailbox: INBOX; a missing special-use folder is created
    assert (await r.deliver("QY", a, "No/Such", m)).mailbox_id == await store.inbox()
    res = await r.deliver("QZ", a, "Junk", m)
    assert res.mailbox_id == (await r.status(a, "Junk")).mailbox_id
    async with store.engine.connect() as conn:
        assert (await conn.execute(select(Blob.__table__.c.refcount))).scalar() == 4
    # old idempotency rows can be pruned; recent ones stay
    assert await r.prune_deliveries(datetime.now(UTC) - timedelta(days=1)) == 0
    assert await r.prune_deliveries(datetime.now(UTC) + timedelta(seconds=5)) == 4


async def test_1000_concurrent_deliveries_with_redeliveries(store: Store) -> None:
    r, a = store.repo, store.account
    rng = random.Random(7)
    jobs = [f"C{i}" for i in range(1000)]
    jobs += rng.sample(jobs, 300)  # redeliveries, interleaved
    rng.shuffle(jobs)
    sem = asyncio.Semaphore(50)

    async def one(qid: str) -> str:
        async with sem:
            res = await r.deliver(qid, a, "INBOX", new_message(raw_message(int(qid[1:]))))
            return res.status

    statuses = await asyncio.gather(*(one(q) for q in jobs))
    assert statuses.count("delivered") == 1000 and statuses.count("duplicate") == 300
    inbox = await store.inbox()
    info, msgs, more, _, _ = await r.select(a, inbox, limit=5000)
    assert [m.uid for m in msgs] == list(range(1, 1001)) and not more
    assert info.messages == 1000 and info.uidnext == 1001
    assert (await r.quota(a))[2] == 1000
    async with store.engine.connect() as conn:
        n = (await conn.execute(select(Message.__table__.c.id))).all()
    assert len(n) == 1000


WORKER = textwrap.dedent("""
    import asyncio, hashlib, json, sys
    from postbus.mailbox_store import db
    from postbus.mailbox_store.repository import NewMessage, Repository
    from postbus.proto.mail import MessageSummary

    async def main(url, schema, account, prefix, n):
        args = {"server_settings": {"search_path": schema}} if schema else None
        engine = db.create_engine(url, connect_args=args)
        repo = Repository(engine)
        s = MessageSummary(envelope="NIL", bodystructure="NIL", body="NIL")
        sem = asyncio.Semaphore(8)
        order = []
        async def one(i):
            async with sem:
                raw = f"{prefix}{i}".encode()
                m = NewMessage("blobs/" + hashlib.sha256(raw).hexdigest(), len(raw), s)
                res = await repo.deliver(f"{prefix}{i}", account, "INBOX", m)
                order.append(res.uid)
        await asyncio.gather(*(one(i) for i in range(n)))
        await engine.dispose()
        print(json.dumps(order))

    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])))
""")


async def test_two_store_processes_deliver_to_one_mailbox(store: Store, tmp_path: Path) -> None:
    """Two processes (two engines) deliver into the same INBOX at once: every UID exactly
    once, and each process sees its own UIDs grow in completion order."""
    import json

    await store.repo.ensure_defaults(store.account)
    url = PG_URL if store.backend == "postgresql" else f"sqlite:///{tmp_path / 'store.db'}"
    schema = store.target if store.backend == "postgresql" else ""
    n = 150
    procs = [await asyncio.create_subprocess_exec(
        sys.executable, "-c", WORKER, url or "", schema, str(store.account), p, str(n),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE) for p in ("A", "B")]
    # an observer meanwhile: every snapshot is exactly 1..k (a UID never shows up before a
    # smaller one that commits later, so a client never misses one)
    inbox = await store.inbox()
    snapshots = 0
    while any(p.returncode is None for p in procs):
        _, msgs, _, _, _ = await store.repo.select(store.account, inbox, limit=5000)
        uids = [m.uid for m in msgs]
        assert uids == list(range(1, len(uids) + 1)), uids
        snapshots += 1
        await asyncio.sleep(0.01)
        for p in procs:
            if p.returncode is None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(p.wait()), 0.001)
    outs = [await p.communicate() for p in procs]
    assert snapshots > 0
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err.decode()[-2000:]
    orders = [json.loads(out.decode().strip().splitlines()[-1]) for out, _ in outs]
    assert sorted(orders[0] + orders[1]) == list(range(1, 2 * n + 1))
    inbox = await store.inbox()
    _, msgs, _, _, _ = await store.repo.select(store.account, inbox)
    assert [m.uid for m in msgs] == list(range(1, 2 * n + 1))
    # modseq never decreases with the UID: a later UID was committed in the same or a
    # later transaction (a group commit shares one MODSEQ)
    modseqs = [m.modseq for m in msgs]
    assert modseqs == sorted(modseqs)
    # each process got its UIDs in ascending order within each of its commits
    for order in orders:
        assert len(set(order)) == len(order)


async def test_migrations_are_idempotent_and_concurrent(store: Store) -> None:
    from alembic.script import ScriptDirectory

    await asyncio.gather(db.migrate(store.engine), db.migrate(store.engine))
    head = ScriptDirectory.from_config(db._alembic_config()).get_current_head()
    async with store.engine.connect() as conn:
        assert (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalar() == head
    await db.check(store.engine)


async def test_migrations_build_the_models_schema(store: Store) -> None:
    """A column added to models.py without a migration (or the reverse) fails here."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from postbus.mailbox_store.models import Base

    def diff(sync_conn: Any) -> list[Any]:
        return list(compare_metadata(MigrationContext.configure(sync_conn), Base.metadata))

    async with store.engine.connect() as conn:
        assert await conn.run_sync(diff) == []


def test_normalize_url() -> None:
    assert db.normalize_url("postgresql://u@h/d") == "postgresql+asyncpg://u@h/d"
    assert db.normalize_url("postgres://u@h/d") == "postgresql+asyncpg://u@h/d"
    assert db.normalize_url("sqlite:///x.db") == "sqlite+postbus:///x.db"
    assert db.normalize_url("sqlite+aiosqlite:///x.db") == "sqlite+postbus:///x.db"





async def test_bulk_flag_changes_one_statement_path(store: Store) -> None:
    r, a = store.repo, store.account
    await asyncio.gather(*(r.deliver(f"B{i}", a, "INBOX", new_message(raw_message(i)))
                           for i in range(120)))
    inbox = await store.inbox()
    await r.store_flags(a, inbox, [(1, 10)], "add", ["\\Seen", "$Old"])
    hms = (await r.status(a, "INBOX")).highestmodseq
    await r.store_flags(a, inbox, [(5, 5)], "add", ["\\Flagged"])
    updated, modified, change = await r.store_flags(a, inbox, [(1, 120)], "add", ["\\Seen"],
                                                    unchanged_since=hms)
    assert modified == [5] and [u.uid for u in updated] == list(range(11, 121))
    assert change is not None and len(change.flags) == 110
    info = await r.status(a, "INBOX")
    assert info.unseen == 0 and info.messages == 120
    updated, _, _ = await r.store_flags(a, inbox, [(1, 200)], "remove", ["\\Seen", "\\Flagged"])
    assert len(updated) == 120
    assert (await r.status(a, "INBOX")).unseen == 120
    updated, _, _ = await r.store_flags(a, inbox, [(1, 120)], "set", ["\\Deleted"])
    assert len(updated) == 120 and all(u.flags == ["\\Deleted"] for u in updated)
    metas = await r.fetch(a, inbox, [(1, 120)], with_summary=False)
    assert all(m.flags == ["\\Deleted"] and m.modseq == updated[0].modseq for m in metas)
    assert (await r.status(a, "INBOX")).deleted == 120
    assert len((await r.expunge(a, inbox))[0]) == 120


async def test_leader_lock_one_holder(store: Store) -> None:
    async with db.leader(store.engine, 4242) as first:
        assert first
        if store.backend == "postgresql":
            other = db.create_engine(PG_URL or "", connect_args=store.connect_args)
            async with db.leader(other, 4242) as second:
                assert not second
            await other.dispose()
    async with db.leader(store.engine, 4242) as again:
        assert again


async def test_first_delivery_creates_every_default_folder(store: Store) -> None:
    bob = await add_account(store.engine, "bob@example.test")
    res = await store.repo.deliver("F1", bob, "Junk", new_message(raw_message(1)))
    boxes = {m.name: m for m in await store.repo.list_mailboxes(bob)}
    assert set(boxes) == {"INBOX", "Drafts", "Sent", "Trash", "Junk", "Archive"}
    assert res.mailbox_id == boxes["Junk"].mailbox_id and boxes["Junk"].messages == 1


async def test_append_many_is_all_or_nothing(store: Store) -> None:
    r = store.repo
    raw = raw_message(1)
    a = await add_account(store.engine, "imp@example.test", quota=3 * len(raw))
    uv, uids, change = await r.append_many(a, "Archive", [new_message(raw, flags=("\\Seen",))] * 2)
    assert uids == [1, 2] and change.exists == 2 and uv == (await r.status(a, "Archive")).uidvalidity
    with pytest.raises(OverQuota):  # two more do not fit: none is stored
        await r.append_many(a, "Archive", [new_message(raw)] * 2)
    info = await r.status(a, "Archive")
    assert info.messages == 2 and info.unseen == 0 and info.uidnext == 3
    with pytest.raises(Invalid):
        await r.append_many(a, "Archive", [])


async def test_mailboxes_and_keywords_are_bounded(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 8 (low): no limit on mailboxes or keywords per account."""
    from postbus.mailbox_store import mailboxes as mbmod
    from postbus.mailbox_store.repository import Limit

    r, a = store.repo, store.account
    monkeypatch.setattr(mbmod, "MAX_MAILBOXES", 8)  # the defaults plus a couple
    await r.create_mailbox(a, "One")
    with pytest.raises(Limit):
        await r.create_mailbox(a, "Two/Three")  # a parent and a child: over the limit
    await r.deliver("K1", a, "INBOX", new_message(b"Subject: k\r\n\r\nx\r\n"))
    inbox = await store.inbox()
    many = [f"$k{i}" for i in range(101)]
    with pytest.raises(Limit):
        await r.store_flags(a, inbox, [(1, 1)], "add", many)
    await r.store_flags(a, inbox, [(1, 1)], "add", many[:100])
    with pytest.raises(Limit):  # one more on top of the hundred
        await r.store_flags(a, inbox, [(1, 1)], "add", ["$extra"])
    with pytest.raises(Exception, match="not a valid flag"):
        await r.store_flags(a, inbox, [(1, 1)], "add", ["k" * 101])
