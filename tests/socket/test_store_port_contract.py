"""Contract suite of the Store port (``postbus.imap_access.ports.Store``): the same tests on
the in-memory store the IMAP session tests trust (``imap_access.memory``) and on
mailbox-store's StoreApi reached as the session reaches it, through the bus adapter
(``BusStore``) over a real nats-server, on SQLite and on PostgreSQL (when
POSTBUS_TEST_POSTGRES_URL is set); the same for the POP3 Maildrops port
(``pop3_access.memory`` and ``StoreMaildrops``). The real store is the reference: where a
memory store disagrees, the memory store is wrong (issue 11 item 2).

Errors are compared by code (``postbus.proto.base.ErrorCode``), the closed set the session
turns into IMAP response codes.
"""

from __future__ import annotations

import hashlib
import itertools
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from prometheus_client import REGISTRY
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncEngine
from test_store_core_contract import PG_URL, add_account, drop, make_engine

from postbus.imap_access.adapters import BusChanges, BusStore, S3Blobs
from postbus.imap_access.memory import MemoryPlatform
from postbus.imap_access.ports import Blobs, Changes, Store, StoreError
from postbus.imap_access.sqlreads import SqlReadStore
from postbus.kit.blob import BlobStore, StoreBodies, blob_key
from postbus.kit.bus import Bus
from postbus.kit.testing import RunningNats, RunningS3
from postbus.mailbox_store import db
from postbus.mailbox_store.models import Account
from postbus.mailbox_store.repository import NewMessage, Repository
from postbus.mailbox_store.settings import Settings
from postbus.mailbox_store.storeapi import StoreApi
from postbus.pop3_access.adapters import StoreMaildrops
from postbus.pop3_access.memory import MemoryMaildrops
from postbus.pop3_access.ports import Maildrops
from postbus.proto import ALL_STREAMS
from postbus.proto.mail import MailboxChanged
from postbus.proto.store import (
    AppendRequest,
    CopyRequest,
    ExpungeRequest,
    FetchRequest,
    MailboxCreateRequest,
    MailboxInfo,
    MailboxListRequest,
    MailboxRef,
    MailboxRenameRequest,
    MessageState,
    Pop3CommitRequest,
    QuotaRequest,
    SearchKey,
    SearchRequest,
    SelectReply,
    SelectRequest,
    StoreFlagsRequest,
    SubscribeRequest,
)
from postbus.protocols.mime import summarize
from postbus.protocols.served import retr_octets

pytestmark = [pytest.mark.timeout(180), pytest.mark.asyncio(loop_scope="module")]

# "+sqlreads": imap-access's port, reads from SQL on a read-only connection (ADR 0012),
# writes over the bus to the same StoreApi
_PG = [pytest.mark.postgres, pytest.mark.skipif(not PG_URL, reason="POSTBUS_TEST_POSTGRES_URL not set")]
FLAVOURS = ["memory", "sqlite", "sqlite+sqlreads", pytest.param("postgresql", marks=_PG),
            pytest.param("postgresql+sqlreads", marks=_PG)]
_accounts = itertools.count(1)


@dataclass
class Backend:
    """One flavour of the Store port, shared by the tests of this module."""

    flavour: str
    store: Store
    blobs: Blobs
    new_account: Callable[[], Awaitable[int]]
    set_quota: Callable[[int, int | None], Awaitable[None]]
    maildrops: Maildrops  # the POP3 port
    deliver: Callable[[int, bytes, bytes], Awaitable[int]]  # into INBOX, with a trace prefix
    changes: Changes  # mailbox.changed, for IDLE


@dataclass
class Port:
    """The Store port and one fresh account on it."""

    flavour: str
    store: Store
    blobs: Blobs
    account: int
    set_quota: Callable[[int, int | None], Awaitable[None]]

    async def box(self, name: str = "INBOX") -> MailboxInfo:
        return await self.store.mailbox_status(MailboxRef(account_id=self.account, name=name))

    async def append(self, raw: bytes, mailbox: str = "INBOX", flags: list[str] | None = None,
                     internaldate: datetime | None = None, literal: bool = False) -> int:
        """APPEND as imap-access sends it: body uploaded and summarised by the caller (or,
        with ``literal``, the bytes in the request)."""
        date = internaldate or datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
        if literal:
            req = AppendRequest(account_id=self.account, mailbox=mailbox, flags=flags or [],
                                internaldate=date, message=raw)
        else:
            req = AppendRequest(account_id=self.account, mailbox=mailbox, flags=flags or [],
                                internaldate=date, blob_key=await self.blobs.put(raw),
                                blob_size=len(raw), summary=summarize(raw))
        return (await self.store.append(req)).uid

    async def select(self, name: str = "INBOX", **kw: Any) -> SelectReply:
        return await self.store.select(SelectRequest(account_id=self.account, name=name, **kw))

    async def snapshot(self, name: str = "INBOX", **kw: Any) -> list[MessageState]:
        """Every page of a mailbox, followed by after_uid."""
        first = await self.select(name, **kw)
        out, page = list(first.messages), first
        while page.more:
            page = await self.store.select(SelectRequest(
                account_id=self.account, mailbox_id=first.mailbox.mailbox_id,
                after_uid=out[-1].uid, **kw))
            out += page.messages
        return out

    async def flags(self, mailbox_id: int, uids: list[tuple[int, int]], op: str,
                    flags: list[str], **kw: Any) -> Any:
        return await self.store.flags(StoreFlagsRequest(
            account_id=self.account, mailbox_id=mailbox_id, uids=uids, op=op,  # type: ignore[arg-type]
            flags=flags, **kw))

    async def search(self, mailbox_id: int, key: SearchKey, **kw: Any) -> list[int]:
        reply = await self.store.search(SearchRequest(account_id=self.account,
                                                      mailbox_id=mailbox_id, key=key, **kw))
        return reply.uids


def raw_message(i: int, subject: str = "", body: str = "", sender: str = "bob@example.net",
                to: str = "alice@example.test", date: str = "Thu, 26 Nov 2026 17:00:00 +0000",
                extra: str = "") -> bytes:
    return (f"From: Bob <{sender}>\r\nTo: {to}\r\nSubject: {subject or f'message {i}'}\r\n"
            f"Message-ID: <m{i}@example.net>\r\nDate: {date}\r\n{extra}\r\n"
            f"{body or f'body number {i}'}\r\n").encode()


async def code_of(aw: Awaitable[Any]) -> str:
    """The code of the StoreError the awaitable raises (fails when it succeeds)."""
    with pytest.raises(StoreError) as info:
        await aw
    return info.value.code


# ---------------------------------------------------------------- fixtures
@pytest_asyncio.fixture(scope="module", loop_scope="module", params=FLAVOURS)
async def backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                  ) -> AsyncIterator[Backend]:
    flavour: str = request.param
    if flavour == "memory":
        mp = MemoryPlatform()

        async def new_memory_account() -> int:
            return mp.add_user(f"u{next(_accounts)}@example.test", "x")

        async def memory_quota(_account: int, limit: int | None) -> None:
            mp.limit_bytes = limit

        drops = MemoryMaildrops()  # the POP3 session tests' store: its own INBOXes

        async def memory_deliver(account: int, blob: bytes, prefix: bytes) -> int:
            return drops.deliver(account, blob, prefix)

        yield Backend(flavour, mp, mp, new_memory_account, memory_quota, drops, memory_deliver,
                      mp)
        return
    root = tmp_path_factory.mktemp(flavour)
    s3: RunningS3 = request.getfixturevalue("s3_server")  # started only for SQL flavours
    nats = RunningNats(root)
    sql = flavour.split("+")[0]
    engine, target, args = await make_engine(sql, Path(root))
    common = nats.common(s3_endpoint=s3.endpoint, s3_bucket="t-" + uuid.uuid4().hex[:12],
                         database_url=f"sqlite:///{root / 'unused.db'}", blob_cache_mb=16)
    bus = await Bus.connect(common, "test")
    await bus.ensure_streams(ALL_STREAMS)
    blobs = BlobStore(common, threads=4)
    await blobs.ensure_bucket()
    repo = Repository(engine)
    readers = BlobStore(common, threads=4)  # imap/pop3-access's, wired as theirs (ADR 0014)
    readers.inline = StoreBodies(bus)
    api = StoreApi(bus, blobs, repo, Settings(common=common))
    await api.serve()

    async def sql_deliver(account: int, blob: bytes, prefix: bytes) -> int:
        # as mime-processor sends them: a small body inline for the blob row (ADR 0014)
        small = len(blob) <= common.inline_body_max
        key = blob_key(blob) if small else await blobs.put(blob)
        res = await repo.deliver(uuid.uuid4().hex, account, "INBOX", NewMessage(
            blob_key=key, blob_size=len(blob), summary=summarize(blob), prefix=prefix,
            body=blob if small else None))
        assert res.status == "delivered" and res.uid is not None, res
        return res.uid

    async def new_sql_account() -> int:
        return await add_account(engine, f"u{next(_accounts)}@example.test")

    async def sql_quota(account: int, limit: int | None) -> None:
        async with engine.begin() as conn:
            await conn.execute(update(Account.__table__).where(
                Account.__table__.c.id == account).values(quota_bytes=limit))

    store = BusStore(bus)
    reader: AsyncEngine | None = None
    if flavour.endswith("+sqlreads"):
        reader = db.create_engine(target if sql == "sqlite" else PG_URL or "",
                                  connect_args=args, read_only=True)
        store = SqlReadStore(bus, reader)
    try:
        # pages of two maildrop messages: the adapter must follow them
        yield Backend(flavour, store, S3Blobs(readers), new_sql_account, sql_quota,
                      StoreMaildrops(bus, readers, page=2), sql_deliver, BusChanges(bus))
    finally:
        if reader is not None:
            await reader.dispose()
        await bus.close()
        await blobs.close()
        await drop(sql, engine, target)
        nats.stop()
        s3.drop_bucket(common.s3_bucket)


@pytest_asyncio.fixture(loop_scope="module")
async def port(backend: Backend) -> AsyncIterator[Port]:
    account = await backend.new_account()
    yield Port(backend.flavour, backend.store, backend.blobs, account, backend.set_quota)
    await backend.set_quota(account, None)


# ---------------------------------------------------------------- mailboxes
async def test_default_mailboxes_list_and_status(port: Port) -> None:
    boxes = {b.name: b for b in (await port.store.mailbox_list(
        MailboxListRequest(account_id=port.account))).mailboxes}
    assert {"INBOX", "Drafts", "Sent", "Trash", "Junk", "Archive"} <= set(boxes)
    assert boxes["Sent"].special_use == "\\Sent" and boxes["INBOX"].special_use is None
    assert all(b.subscribed for b in boxes.values())
    assert len({b.uidvalidity for b in boxes.values()}) == len(boxes)
    inbox = await port.box("INBOX")
    assert (inbox.messages, inbox.uidnext, inbox.unseen, inbox.recent) == (0, 1, 0, 0)
    assert "\\HasNoChildren" in boxes["INBOX"].attributes
    assert (await port.box("inbox")).mailbox_id == inbox.mailbox_id  # RFC 3501 §5.1
    assert await code_of(port.box("Nope")) == "not_found"


async def test_create_rename_delete_subscribe(port: Port) -> None:
    s, a = port.store, port.account
    info = await s.mailbox_create(MailboxCreateRequest(account_id=a, name="Work/Projects/2026"))
    assert info.name == "Work/Projects/2026" and info.uidnext == 1 and info.messages == 0
    names = {b.name: b for b in (await s.mailbox_list(
        MailboxListRequest(account_id=a))).mailboxes}
    assert {"Work", "Work/Projects", "Work/Projects/2026"} <= set(names)
    assert "\\HasChildren" in names["Work"].attributes
    assert "\\HasNoChildren" in names["Work/Projects/2026"].attributes
    assert await code_of(s.mailbox_create(MailboxCreateRequest(account_id=a, name="Work"))) \
        == "exists"
    for bad in ("a//b", "/x", "x*", "y%"):
        assert await code_of(s.mailbox_create(
            MailboxCreateRequest(account_id=a, name=bad))) == "invalid", bad

    # rename carries the children; the mailbox keeps its id, UIDVALIDITY and messages
    await port.append(raw_message(1), "Work/Projects")
    before = await port.box("Work/Projects")
    await s.mailbox_rename(MailboxRenameRequest(account_id=a, old="Work", new="Job"))
    after = await port.box("Job/Projects")
    assert (after.mailbox_id, after.uidvalidity, after.messages) == \
        (before.mailbox_id, before.uidvalidity, 1)
    assert (await port.box("Job/Projects/2026")).name == "Job/Projects/2026"
    assert await code_of(port.box("Work")) == "not_found"
    assert await code_of(s.mailbox_rename(
        MailboxRenameRequest(account_id=a, old="Nope", new="Other"))) == "not_found"
    assert await code_of(s.mailbox_rename(
        MailboxRenameRequest(account_id=a, old="Job", new="Sent"))) == "exists"

    # renaming INBOX moves its messages to a new mailbox and leaves INBOX empty (§6.3.5)
    uid = await port.append(raw_message(2))
    inbox = await port.box()
    await s.mailbox_rename(MailboxRenameRequest(account_id=a, old="INBOX", new="Old"))
    old = await port.box("Old")
    assert old.messages == 1 and old.uidnext == inbox.uidnext
    assert old.highestmodseq >= max(m.modseq for m in await port.snapshot("Old"))
    assert [m.uid for m in await port.snapshot("Old")] == [uid]
    emptied = await port.box()
    assert emptied.messages == 0 and emptied.highestmodseq > inbox.highestmodseq

    # delete: INBOX never; a missing one not_found; messages go with the mailbox
    assert await code_of(s.mailbox_delete(MailboxRef(account_id=a, name="INBOX"))) == "invalid"
    assert await code_of(s.mailbox_delete(MailboxRef(account_id=a, name="Nope"))) == "not_found"
    await s.mailbox_delete(MailboxRef(account_id=a, name="Job/Projects/2026"))
    assert await code_of(port.box("Job/Projects/2026")) == "not_found"
    # a mailbox with children stays as \Noselect (RFC 3501 §6.3.4): SELECT says invalid
    await s.mailbox_delete(MailboxRef(account_id=a, name="Job"))
    job = {b.name: b for b in (await s.mailbox_list(
        MailboxListRequest(account_id=a))).mailboxes}["Job"]
    assert "\\Noselect" in job.attributes
    assert await code_of(port.select("Job")) == "invalid"
    assert (await port.box("Job/Projects")).messages == 1

    # subscriptions may name what does not exist (§6.3.6)
    await s.mailbox_subscribe(SubscribeRequest(account_id=a, name="Ghost", subscribed=True))
    await s.mailbox_subscribe(SubscribeRequest(account_id=a, name="Old", subscribed=False))
    subs = {b.name: b for b in (await s.mailbox_list(
        MailboxListRequest(account_id=a, subscribed_only=True))).mailboxes}
    assert "\\NonExistent" in subs["Ghost"].attributes and "Old" not in subs
    assert "INBOX" in subs


# ---------------------------------------------------------------- select, paging, fetch
async def test_select_pages_follow_after_uid(port: Port) -> None:
    uids = [await port.append(raw_message(i)) for i in range(7)]
    assert uids == list(range(1, 8))
    first = await port.select(limit=3)
    assert [m.uid for m in first.messages] == [1, 2, 3] and first.more
    assert first.mailbox.messages == 7 and first.mailbox.uidnext == 8
    mid = first.mailbox.mailbox_id
    second = await port.store.select(SelectRequest(account_id=port.account, mailbox_id=mid,
                                                   after_uid=3, limit=3))
    assert [m.uid for m in second.messages] == [4, 5, 6] and second.more
    last = await port.store.select(SelectRequest(account_id=port.account, mailbox_id=mid,
                                                 after_uid=6, limit=3))
    assert [m.uid for m in last.messages] == [7] and not last.more
    exact = await port.select(limit=7)
    assert len(exact.messages) == 7 and not exact.more
    assert [m.uid for m in await port.snapshot(limit=2)] == uids
    assert await code_of(port.store.select(SelectRequest(
        account_id=port.account, mailbox_id=10 ** 9))) == "not_found"
    assert await code_of(port.select("Nope")) == "not_found"


async def test_fetch_metadata(port: Port) -> None:
    raw = raw_message(1, subject="Hello fetch")
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    await port.append(raw, flags=["\\Flagged", "$Label"], internaldate=when)
    await port.append(raw_message(2), literal=True)
    mid = (await port.box()).mailbox_id
    got = (await port.store.fetch(FetchRequest(account_id=port.account, mailbox_id=mid,
                                               uids=[(1, 5)]))).messages
    assert [m.uid for m in got] == [1, 2]
    m = got[0]
    assert sorted(m.flags) == ["$Label", "\\Flagged"]
    assert m.internaldate == when and m.size == len(raw) == m.blob_size + len(m.prefix)
    assert m.blob_key == "blobs/" + hashlib.sha256(raw).hexdigest()
    assert m.summary is not None and m.summary.subject == "Hello fetch"
    assert (await port.blobs.get_many([m.blob_key]))[m.blob_key] == raw
    bare = (await port.store.fetch(FetchRequest(account_id=port.account, mailbox_id=mid,
                                                uids=[(2, 2)], with_summary=False))).messages
    assert [b.uid for b in bare] == [2] and bare[0].summary is None
    assert (await port.store.fetch(FetchRequest(account_id=port.account, mailbox_id=mid,
                                                uids=[(9, 20)]))).messages == []
    assert await code_of(port.store.fetch(FetchRequest(
        account_id=port.account, mailbox_id=10 ** 9, uids=[(1, 1)]))) == "not_found"


async def test_recent_is_claimed_once(port: Port) -> None:
    await port.append(raw_message(1))
    await port.append(raw_message(2))
    assert (await port.box()).recent == 2
    examined = await port.select(claim_recent=False)  # EXAMINE only looks
    assert examined.recent_uid == 1 and (await port.box()).recent == 2
    first = await port.select(claim_recent=True)
    assert first.recent_uid == 1 and first.mailbox.recent == 0
    assert (await port.box()).recent == 0
    again = await port.select(claim_recent=True)
    assert again.recent_uid == again.mailbox.uidnext == 3  # another session got them
    await port.append(raw_message(3))
    assert (await port.box()).recent == 1
    third = await port.select(claim_recent=True)
    assert third.recent_uid == 3


# ---------------------------------------------------------------- flags and MODSEQ
async def test_modseq_grows_with_every_change(port: Port) -> None:
    hms = (await port.box()).highestmodseq
    for i in range(4):
        await port.append(raw_message(i))
        now = (await port.box()).highestmodseq
        assert now > hms
        hms = now
    snap = await port.snapshot()
    assert all(m.modseq <= hms for m in snap)
    mid = (await port.box()).mailbox_id

    upd = await port.flags(mid, [(1, 2)], "add", ["\\Seen"])
    assert [u.uid for u in upd.updated] == [1, 2] and upd.modified == []
    assert all(u.modseq > hms and "\\Seen" in u.flags for u in upd.updated)
    box = await port.box()
    assert box.highestmodseq == max(u.modseq for u in upd.updated)
    assert box.unseen == 2
    hms = box.highestmodseq
    # a STORE that changes nothing does not move MODSEQ (RFC 7162 §3.1.3)
    noop = await port.flags(mid, [(1, 2)], "add", ["\\Seen"])
    assert noop.updated == [] and (await port.box()).highestmodseq == hms
    # CHANGEDSINCE: only what changed after
    changed = await port.snapshot(changed_since=hms - 1)
    assert [m.uid for m in changed] == [1, 2] or all(m.modseq > hms - 1 for m in changed)
    assert await port.snapshot(changed_since=hms) == []
    # set replaces, remove takes away; keywords too
    await port.flags(mid, [(3, 3)], "set", ["$Work", "\\Answered"])
    await port.flags(mid, [(3, 3)], "remove", ["\\Answered"])
    assert {m.uid: m.flags for m in await port.snapshot()}[3] == ["$Work"]

    # UNCHANGEDSINCE: messages changed after it are left alone and reported (RFC 7162)
    m4 = {m.uid: m for m in await port.snapshot()}[4]
    cond = await port.flags(mid, [(1, 4)], "add", ["\\Flagged"], unchanged_since=m4.modseq)
    assert sorted(cond.modified) == [1, 2, 3]
    assert [u.uid for u in cond.updated] == [4]
    assert "\\Flagged" not in {m.uid: m.flags for m in await port.snapshot()}[1]
    assert await code_of(port.flags(10 ** 9, [(1, 1)], "add", ["\\Seen"])) == "not_found"


async def test_expunge_and_vanished(port: Port) -> None:
    for i in range(6):
        await port.append(raw_message(i))
    mid = (await port.box()).mailbox_id
    await port.flags(mid, [(1, 2), (4, 6)], "add", ["\\Deleted"])
    box = await port.box()
    assert box.deleted == 5
    hms = box.highestmodseq
    # UID EXPUNGE: only \Deleted messages within the set (RFC 4315)
    r = await port.store.expunge(ExpungeRequest(account_id=port.account, mailbox_id=mid,
                                                uids=[(2, 4)]))
    assert r.expunged == [2, 4] and r.highestmodseq > hms and not r.more
    assert r.highestmodseq == (await port.box()).highestmodseq
    # EXPUNGE in pages of limit, lowest UIDs first
    r = await port.store.expunge(ExpungeRequest(account_id=port.account, mailbox_id=mid,
                                                limit=2))
    assert r.expunged == [1, 5] and r.more
    r = await port.store.expunge(ExpungeRequest(account_id=port.account, mailbox_id=mid))
    assert r.expunged == [6] and not r.more
    box = await port.box()
    assert (box.messages, box.deleted) == (1, 0)
    assert [m.uid for m in await port.snapshot()] == [3]
    nothing = await port.store.expunge(ExpungeRequest(account_id=port.account, mailbox_id=mid))
    assert nothing.expunged == [] and nothing.highestmodseq == box.highestmodseq
    # QRESYNC: the UIDs expunged since a MODSEQ (RFC 7162 §3.2.5.2)
    since = await port.select(changed_since=hms)
    assert since.vanished == [(1, 2), (4, 6)] and since.messages == []
    assert (await port.select(changed_since=box.highestmodseq)).vanished == []
    assert await code_of(port.store.expunge(ExpungeRequest(
        account_id=port.account, mailbox_id=10 ** 9))) == "not_found"


# ---------------------------------------------------------------- copy and move
async def test_copy_and_move_answer_copyuid(port: Port) -> None:
    when = datetime(2026, 5, 6, 7, 8, 9, tzinfo=UTC)
    for i in range(3):
        await port.append(raw_message(i), flags=["\\Seen"] if i == 1 else [], internaldate=when)
    inbox = await port.box()
    trash = await port.box("Trash")
    r = await port.store.copy(CopyRequest(account_id=port.account, mailbox_id=inbox.mailbox_id,
                                          uids=[(2, 3)], target="Trash"))
    assert r.uidvalidity == trash.uidvalidity
    assert (r.source_uids, r.target_uids) == ([2, 3], [1, 2])
    after = await port.box("Trash")
    assert after.messages == 2 and after.uidnext == 3 and after.unseen == 1
    assert after.highestmodseq > trash.highestmodseq
    copied = (await port.store.fetch(FetchRequest(account_id=port.account,
                                                  mailbox_id=trash.mailbox_id,
                                                  uids=[(1, 2)]))).messages
    assert [m.flags for m in copied] == [["\\Seen"], []]
    assert all(m.internaldate == when for m in copied)
    assert (await port.box()).messages == 3  # COPY leaves the source alone

    # MOVE: copied, then expunged from the source (RFC 6851)
    hms = (await port.box()).highestmodseq
    mv = await port.store.copy(CopyRequest(account_id=port.account,
                                           mailbox_id=inbox.mailbox_id, uids=[(1, 1)],
                                           target="Trash", move=True))
    assert (mv.source_uids, mv.target_uids) == ([1], [3])
    assert [m.uid for m in await port.snapshot()] == [2, 3]
    assert (await port.select(changed_since=hms)).vanished == [(1, 1)]

    # MOVE into the mailbox itself: new UIDs, the old ones are gone
    same = await port.store.copy(CopyRequest(account_id=port.account,
                                             mailbox_id=inbox.mailbox_id, uids=[(2, 3)],
                                             target="INBOX", move=True))
    assert (same.source_uids, same.target_uids) == ([2, 3], [4, 5])
    assert [m.uid for m in await port.snapshot()] == [4, 5]
    box = await port.box()
    assert box.messages == 2 and box.uidnext == 6

    # nothing in the set: nothing copied, still the target's UIDVALIDITY
    empty = await port.store.copy(CopyRequest(account_id=port.account,
                                              mailbox_id=inbox.mailbox_id, uids=[(90, 99)],
                                              target="Trash"))
    assert (empty.uidvalidity, empty.source_uids, empty.target_uids) == \
        (trash.uidvalidity, [], [])
    # a missing target is not_found (IMAP: NO [TRYCREATE])
    assert await code_of(port.store.copy(CopyRequest(
        account_id=port.account, mailbox_id=inbox.mailbox_id, uids=[(4, 4)],
        target="Missing"))) == "not_found"


# ---------------------------------------------------------------- search
async def test_search_keys(port: Port) -> None:
    d = datetime
    await port.append(raw_message(1, subject="Quarterly report", body="numbers inside",
                                  sender="carol@example.org", date="Mon, 02 Mar 2026 10:00:00 +0000",
                                  extra="X-Priority: 1\r\n"),
                      flags=["\\Flagged"], internaldate=d(2026, 3, 2, 10, tzinfo=UTC))
    await port.append(raw_message(2, subject="Lunch?", body="pizza at noon",
                                  to="team@example.test", date="Tue, 10 Mar 2026 12:00:00 +0000"),
                      flags=["\\Seen"], internaldate=d(2026, 3, 10, 12, tzinfo=UTC))
    await port.append(raw_message(3, subject="Re: Quarterly report",
                                  body="x" * 3000, date="Fri, 20 Mar 2026 09:00:00 +0000"),
                      flags=["\\Seen", "$Important"], internaldate=d(2026, 3, 20, 9, tzinfo=UTC))
    mid = (await port.box()).mailbox_id

    def k(op: str, *args: str, children: list[SearchKey] | None = None,
          uids: list[tuple[int, int]] | None = None) -> SearchKey:
        return SearchKey(op=op, args=list(args), children=children or [], uids=uids or [])

    cases: list[tuple[SearchKey, list[int]]] = [
        (k("all"), [1, 2, 3]),
        (k("flag", "\\Seen"), [2, 3]),
        (k("unflag", "\\Seen"), [1]),
        (k("flag", "$important"), [3]),
        (k("subject", "quarterly"), [1, 3]),
        (k("from", "carol"), [1]),
        (k("to", "team@"), [2]),
        (k("header", "X-Priority", "1"), [1]),
        (k("header", "x-priority", ""), [1]),
        (k("header", "Message-ID", "<m2@"), [2]),
        (k("body", "PIZZA"), [2]),
        (k("body", "Quarterly"), []),
        (k("text", "quarterly"), [1, 3]),
        (k("before", "2026-03-10"), [1]),
        (k("on", "2026-03-10"), [2]),
        (k("since", "2026-03-10"), [2, 3]),
        (k("sentbefore", "2026-03-10"), [1]),
        (k("senton", "2026-03-20"), [3]),
        (k("sentsince", "2026-03-10"), [2, 3]),
        (k("larger", "1000"), [3]),
        (k("smaller", "1000"), [1, 2]),
        (k("uid", uids=[(2, 3)]), [2, 3]),
        (k("and", children=[k("flag", "\\Seen"), k("subject", "report")]), [3]),
        (k("or", children=[k("from", "carol"), k("on", "2026-03-10")]), [1, 2]),
        (k("not", children=[k("flag", "\\Seen")]), [1]),
    ]
    for key, want in cases:
        assert await port.search(mid, key) == want, key
    # MODSEQ: the messages changed at or after it (RFC 7162 §3.1.5)
    upd = await port.flags(mid, [(2, 2)], "add", ["\\Answered"])
    ms = upd.updated[0].modseq
    reply = await port.store.search(SearchRequest(account_id=port.account, mailbox_id=mid,
                                                  key=k("modseq", str(ms))))
    assert reply.uids == [2] and reply.highestmodseq == ms
    # paging: after_uid and limit
    page = await port.store.search(SearchRequest(account_id=port.account, mailbox_id=mid,
                                                 key=k("all"), limit=2))
    assert page.uids == [1, 2] and page.more
    rest = await port.store.search(SearchRequest(account_id=port.account, mailbox_id=mid,
                                                 key=k("all"), after_uid=2, limit=2))
    assert rest.uids == [3] and not rest.more
    # a program the store cannot run is invalid (IMAP: NO, never a server error)
    for bad in (k("nosuchkey", "x"), k("larger", "many"), k("since", "yesterday")):
        assert await code_of(port.search(mid, bad)) == "invalid", bad
    assert await code_of(port.search(10 ** 9, k("all"))) == "not_found"


# ---------------------------------------------------------------- quota and limits
async def test_quota_and_refusals(port: Port) -> None:
    raw = raw_message(1)
    await port.append(raw)
    q = await port.store.quota(QuotaRequest(account_id=port.account))
    assert (q.used_bytes, q.messages, q.limit_bytes) == (len(raw), 1, None)
    await port.set_quota(port.account, len(raw) + 10)
    assert (await port.store.quota(QuotaRequest(account_id=port.account))).limit_bytes \
        == len(raw) + 10
    # APPEND and COPY past the quota are over_quota (IMAP: NO [OVERQUOTA]), MOVE is not
    assert await code_of(port.append(raw_message(2))) == "over_quota"
    mid = (await port.box()).mailbox_id
    assert await code_of(port.store.copy(CopyRequest(
        account_id=port.account, mailbox_id=mid, uids=[(1, 1)], target="Trash"))) == "over_quota"
    assert (await port.box("Trash")).messages == 0
    mv = await port.store.copy(CopyRequest(account_id=port.account, mailbox_id=mid,
                                           uids=[(1, 1)], target="Trash", move=True))
    assert mv.target_uids == [1]
    await port.set_quota(port.account, None)
    # APPEND into a mailbox that does not exist: not_found (IMAP: NO [TRYCREATE])
    assert await code_of(port.append(raw_message(3), "Missing")) == "not_found"
    # more keywords on a message than the store keeps: limit (IMAP: NO [LIMIT])
    trash = (await port.box("Trash")).mailbox_id
    many = [f"$k{i}" for i in range(101)]
    assert await code_of(port.flags(trash, [(1, 1)], "add", many)) == "limit"
    # a flag that is not an atom: invalid
    assert await code_of(port.flags(trash, [(1, 1)], "add", ["bad flag"])) == "invalid"
    assert (await port.store.quota(QuotaRequest(account_id=port.account))).used_bytes \
        == len(raw)
    # also on APPEND: a message with more could not even lose one of them by STORE
    assert await code_of(port.append(raw_message(4), "Trash", flags=many)) == "limit"
    await port.append(raw_message(5), "Trash", flags=many[:100])


async def test_subscriptions_outlive_mailboxes_and_default_folders_come_back(port: Port) -> None:
    s, a = port.store, port.account

    async def lsub() -> dict[str, MailboxInfo]:
        return {b.name: b for b in (await s.mailbox_list(
            MailboxListRequest(account_id=a, subscribed_only=True))).mailboxes}

    await s.mailbox_create(MailboxCreateRequest(account_id=a, name="Lists"))
    await s.mailbox_subscribe(SubscribeRequest(account_id=a, name="Lists", subscribed=True))
    await s.mailbox_delete(MailboxRef(account_id=a, name="Lists"))
    assert "\\NonExistent" in (await lsub())["Lists"].attributes  # RFC 3501 §6.3.4
    again = await s.mailbox_create(MailboxCreateRequest(account_id=a, name="Lists"))
    assert again.subscribed and "\\NonExistent" not in (await lsub())["Lists"].attributes

    # mail filed into a default folder the user deleted brings it back
    await s.mailbox_delete(MailboxRef(account_id=a, name="Junk"))
    assert await code_of(port.box("Junk")) == "not_found"
    await port.append(raw_message(1), "Junk")
    junk = await port.box("Junk")
    assert junk.special_use == "\\Junk" and junk.messages == 1
    await s.mailbox_delete(MailboxRef(account_id=a, name="Archive"))
    inbox = await port.box()
    await port.append(raw_message(2))
    r = await s.copy(CopyRequest(account_id=a, mailbox_id=inbox.mailbox_id, uids=[(1, 1)],
                                 target="Archive"))
    assert r.target_uids == [1] and (await port.box("Archive")).special_use == "\\Archive"

    # a \Noselect mailbox takes no mail and cannot be selected by id either
    await s.mailbox_create(MailboxCreateRequest(account_id=a, name="Parent/Child"))
    await s.mailbox_delete(MailboxRef(account_id=a, name="Parent"))
    parent = {b.name: b for b in (await s.mailbox_list(
        MailboxListRequest(account_id=a))).mailboxes}["Parent"]
    assert await code_of(port.append(raw_message(3), "Parent")) == "not_found"
    assert await code_of(s.copy(CopyRequest(account_id=a, mailbox_id=inbox.mailbox_id,
                                            uids=[(1, 1)], target="Parent"))) == "not_found"
    assert await code_of(s.select(SelectRequest(account_id=a,
                                                mailbox_id=parent.mailbox_id))) == "not_found"
    assert await code_of(s.mailbox_delete(MailboxRef(account_id=a, name="Parent"))) == "invalid"
    # CREATE makes the placeholder a mailbox again
    revived = await s.mailbox_create(MailboxCreateRequest(account_id=a, name="Parent"))
    assert revived.mailbox_id == parent.mailbox_id and "\\Noselect" not in revived.attributes
    assert (await port.select("Parent")).messages == []


async def test_mailbox_name_rules(port: Port) -> None:
    s, a = port.store, port.account
    await s.mailbox_create(MailboxCreateRequest(account_id=a, name="Trailing/"))
    assert (await port.box("Trailing")).name == "Trailing"  # RFC 3501 §6.3.3
    assert await code_of(s.mailbox_create(MailboxCreateRequest(
        account_id=a, name="Odd", special_use="\\Bogus"))) == "invalid"
    flagged = await s.mailbox_create(MailboxCreateRequest(account_id=a, name="Stars",
                                                          special_use="\\Flagged"))
    assert flagged.special_use == "\\Flagged"
    assert await code_of(s.mailbox_create(MailboxCreateRequest(account_id=a, name="inbox"))) \
        == "exists"
    for old, new, code in (("Stars", "Stars", "exists"), ("Stars", "Stars/Sub", "invalid"),
                           ("Stars", "INBOX", "invalid")):
        assert await code_of(s.mailbox_rename(
            MailboxRenameRequest(account_id=a, old=old, new=new))) == code, (old, new)
    await s.mailbox_rename(MailboxRenameRequest(account_id=a, old="Stars", new="Deep/Stars"))
    assert "\\HasChildren" in (await port.box("Deep")).attributes
    assert await code_of(port.box("/INBOX")) == "invalid"


async def test_flags_as_the_store_keeps_them(port: Port) -> None:
    await port.append(raw_message(1), flags=["\\seen", "\\Recent", "\\Unknown", "$Todo"])
    mid = (await port.box()).mailbox_id
    [m] = await port.snapshot()
    assert sorted(m.flags) == ["$Todo", "\\Seen"]  # \Recent is the session's, never stored
    upd = await port.flags(mid, [(1, 1)], "add", ["\\FLAGGED", "$todo2"])
    assert sorted(upd.updated[0].flags) == ["$Todo", "$todo2", "\\Flagged", "\\Seen"]
    upd = await port.flags(mid, [(1, 1)], "set", ["\\Recent"])
    assert upd.updated[0].flags == []
    assert (await port.box()).unseen == 1
    assert await code_of(port.append(raw_message(2), flags=["bad(flag"])) == "invalid"
    assert (await port.box()).messages == 1


async def test_append_literal_gets_crlf_and_counts(port: Port) -> None:
    raw = b"Subject: bare\n\nline one\nline two\n"
    await port.append(raw, literal=True, flags=["\\Deleted"])
    mid = (await port.box()).mailbox_id
    [m] = (await port.store.fetch(FetchRequest(account_id=port.account, mailbox_id=mid,
                                               uids=[(1, 1)]))).messages
    served = raw.replace(b"\n", b"\r\n")
    assert m.size == len(served)
    assert (await port.blobs.get_many([m.blob_key]))[m.blob_key] == served
    box = await port.box()
    assert (box.messages, box.unseen, box.deleted, box.size) == (1, 1, 1, len(served))


async def test_a_mailbox_id_of_another_account_is_not_found(backend: Backend) -> None:
    alice, mallory = await backend.new_account(), await backend.new_account()
    s = backend.store
    port = Port(backend.flavour, s, backend.blobs, alice, backend.set_quota)
    await port.append(raw_message(1), flags=["\\Deleted"])
    mid = (await port.box()).mailbox_id
    for call in (
        s.select(SelectRequest(account_id=mallory, mailbox_id=mid)),
        s.fetch(FetchRequest(account_id=mallory, mailbox_id=mid, uids=[(1, 1)])),
        s.flags(StoreFlagsRequest(account_id=mallory, mailbox_id=mid, uids=[(1, 1)],
                                  op="add", flags=["\\Seen"])),
        s.copy(CopyRequest(account_id=mallory, mailbox_id=mid, uids=[(1, 1)], target="INBOX")),
        s.expunge(ExpungeRequest(account_id=mallory, mailbox_id=mid)),
        s.search(SearchRequest(account_id=mallory, mailbox_id=mid, key=SearchKey(op="all"))),
    ):
        assert await code_of(call) == "not_found"
    assert (await port.box()).messages == 1 and (await port.box()).unseen == 1


async def test_changed_since_pages_and_vanished_once(port: Port) -> None:
    for i in range(5):
        await port.append(raw_message(i))
    mid = (await port.box()).mailbox_id
    hms = (await port.box()).highestmodseq
    await port.flags(mid, [(1, 2)], "add", ["\\Seen"])
    await port.flags(mid, [(3, 5)], "add", ["\\Deleted"])
    r = await port.store.expunge(ExpungeRequest(account_id=port.account, mailbox_id=mid,
                                                uids=[(3, 5)], limit=2))
    assert r.expunged == [3, 4] and r.more
    r = await port.store.expunge(ExpungeRequest(account_id=port.account, mailbox_id=mid,
                                                uids=[(3, 5)], limit=2))
    assert r.expunged == [5] and not r.more
    first = await port.select(changed_since=hms, limit=1)
    assert first.vanished == [(3, 5)]
    assert [m.uid for m in first.messages] == [1] and first.more
    rest = await port.store.select(SelectRequest(account_id=port.account, mailbox_id=mid,
                                                 changed_since=hms, after_uid=1))
    assert rest.vanished == [] and [m.uid for m in rest.messages] == [2] and not rest.more


async def test_search_decodes_what_the_client_sees(port: Port) -> None:
    qp = (b"From: =?utf-8?q?J=C3=BCrgen?= <juergen@example.de>\r\nTo: alice@example.test\r\n"
          b"Subject: =?utf-8?b?R3LDvMOfZSBhdXMgQmVybGlu?=\r\n"
          b"Date: Thu, 26 Nov 2026 17:00:00 +0000\r\nMIME-Version: 1.0\r\n"
          b"Content-Type: text/plain; charset=utf-8\r\n"
          b"Content-Transfer-Encoding: quoted-printable\r\n\r\nViele Gr=C3=BC=C3=9Fe und Sch=\r\n"
          b"=C3=B6nes Wochenende\r\n")
    b64 = (b"From: bob@example.net\r\nSubject: plain\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
           b"c2VjcmV0IHdvcmQgaW5zaWRl\r\n")
    await port.append(qp)
    await port.append(b64)
    mid = (await port.box()).mailbox_id

    def k(op: str, *args: str) -> SearchKey:
        return SearchKey(op=op, args=list(args))

    cases = [
        (k("subject", "grüße"), [1]),
        (k("header", "Subject", "Grüße aus"), [1]),
        (k("from", "jürgen"), [1]),
        (k("from", "juergen@"), [1]),
        (k("body", "grüße"), [1]),
        (k("body", "schönes"), [1]),
        (k("body", "secret word"), [2]),
        (k("text", "secret word"), [2]),
        (k("text", "jürgen"), [1]),
        (k("body", "c2VjcmV0"), []),
    ]
    wrong = [(key.op, key.args, got) for key, want in cases
             if (got := await port.search(mid, key)) != want]
    assert wrong == []


# ---------------------------------------------------------------- the POP3 maildrop port
async def test_pop3_maildrop_open_and_commit(backend: Backend) -> None:
    md, account = backend.maildrops, await backend.new_account()
    prefix = b"Return-Path: <bob@example.net>\r\nDelivered-To: alice@example.test\r\n"
    blobs = [raw_message(1), raw_message(2), b"Subject: no final line end\r\n\r\nlast"]
    uids = [await backend.deliver(account, b, prefix) for b in blobs]
    drop = await md.open(account)
    assert [m.uid for m in drop.messages] == uids == sorted(uids) and not drop.more
    uidls = [m.uidl for m in drop.messages]
    assert len(set(uidls)) == 3
    assert all(0 < len(u) <= 70 and all(0x21 <= ord(c) <= 0x7E for c in u) for u in uidls)
    # LIST sizes: octets RETR sends (CRLF line ends, the last line ended; RFC 1939 §11)
    assert [m.size for m in drop.messages] == [retr_octets(prefix, b) for b in blobs]
    assert [m.prefix for m in drop.messages] == [prefix] * 3
    assert [await md.blob(m) for m in drop.messages] == blobs
    assert [m.uidl for m in (await md.open(account)).messages] == uidls  # stable

    # UPDATE, mode keep: hidden from POP3 from now on; mode delete: gone
    await md.commit(Pop3CommitRequest(account_id=account, mailbox_id=drop.mailbox_id,
                                      delete_uids=[uids[0]], mode="keep",
                                      seen_uids=[uids[0], uids[1]]))
    after = await md.open(account)
    assert [m.uid for m in after.messages] == uids[1:]
    assert [m.uidl for m in after.messages] == uidls[1:]
    await md.commit(Pop3CommitRequest(account_id=account, mailbox_id=drop.mailbox_id,
                                      delete_uids=[uids[1]], mode="delete"))
    assert [m.uid for m in (await md.open(account)).messages] == uids[2:]
    new = await backend.deliver(account, raw_message(4), b"")
    last = await md.open(account)
    assert [m.uid for m in last.messages] == [uids[2], new] and new > uids[2]
    assert last.messages[-1].uidl not in uidls
    assert (last.mailbox_id, last.uidvalidity) == (drop.mailbox_id, drop.uidvalidity)


async def test_sets_subscriptions_and_usage_follow_changes(port: Port) -> None:
    s, a = port.store, port.account
    for i in range(5):
        await port.append(raw_message(i), flags=["$K"] if i % 2 else [])
    mid = (await port.box()).mailbox_id
    got = (await s.fetch(FetchRequest(account_id=a, mailbox_id=mid,
                                      uids=[(1, 1), (3, 3), (5, 9)]))).messages
    assert [m.uid for m in got] == [1, 3, 5]

    def k(op: str, *args: str, uids: list[tuple[int, int]] | None = None,
          children: list[SearchKey] | None = None) -> SearchKey:
        return SearchKey(op=op, args=list(args), uids=uids or [], children=children or [])

    assert await port.search(mid, k("uid", uids=[(1, 1), (4, 5)])) == [1, 4, 5]
    assert await port.search(mid, k("not", children=[k("uid", uids=[(2, 4)])])) == [1, 5]
    assert await port.search(mid, k("flag", "\\Recent")) == []
    assert await port.search(mid, k("header", "X-Absent", "")) == []
    assert await port.search(mid, k("flag", "$k")) == [2, 4]
    # COPY of a fragmented set keeps the order and the keywords
    r = await s.copy(CopyRequest(account_id=a, mailbox_id=mid, uids=[(4, 4), (1, 2)],
                                 target="Drafts"))
    assert (r.source_uids, r.target_uids) == ([1, 2, 4], [1, 2, 3])
    assert [m.flags for m in await port.snapshot("Drafts")] == [[], ["$K"], ["$K"]]

    # subscriptions follow a rename
    await s.mailbox_create(MailboxCreateRequest(account_id=a, name="Work/Sub"))
    await s.mailbox_subscribe(SubscribeRequest(account_id=a, name="Work", subscribed=True))
    await s.mailbox_subscribe(SubscribeRequest(account_id=a, name="Work/Sub", subscribed=True))
    await s.mailbox_rename(MailboxRenameRequest(account_id=a, old="Work", new="Job"))
    subs = {b.name for b in (await s.mailbox_list(
        MailboxListRequest(account_id=a, subscribed_only=True))).mailboxes}
    assert {"Job", "Job/Sub"} <= subs and not {"Work", "Work/Sub"} & subs

    # usage goes with the messages of a deleted mailbox
    used = (await s.quota(QuotaRequest(account_id=a))).used_bytes
    drafts = await port.box("Drafts")
    await s.mailbox_delete(MailboxRef(account_id=a, name="Drafts"))
    after = await s.quota(QuotaRequest(account_id=a))
    assert after.used_bytes == used - drafts.size and after.messages == 5


# ---------------------------------------------------------------- mailbox.changed
async def test_every_change_is_announced_once_with_its_origin(backend: Backend) -> None:
    import asyncio

    account = await backend.new_account()
    port = Port(backend.flavour, backend.store, backend.blobs, account, backend.set_quota)
    s = port.store
    await port.box()  # the default mailboxes exist before anyone listens
    seen: list[MailboxChanged] = []
    unsubscribe = await backend.changes.subscribe(account, seen.append)

    async def events(n: int) -> list[tuple[Any, ...]]:
        """The next ``n`` events as (mailbox, added, flags, expunged, origin, exists, MODSEQ
        and UIDNEXT right), then none more for a moment. MODSEQ right: that of the new or
        changed messages, and the last event's is the mailbox's HIGHESTMODSEQ now."""
        for _ in range(200):
            if len(seen) >= n:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        got, seen[:] = list(seen), []
        out = []
        for i, e in enumerate(got):
            now = await port.box(e.mailbox)
            changed = [c.modseq for c in e.added + e.flags]
            modseq_ok = (not changed or e.highestmodseq == max(changed)) and (
                i < len(got) - 1 or e.highestmodseq == now.highestmodseq)
            out.append((e.mailbox, [c.uid for c in e.added],
                        [(c.uid, sorted(c.flags)) for c in e.flags], e.expunged, e.origin,
                        e.exists, modseq_ok, e.uidnext == now.uidnext))
        return out

    try:
        uid = (await s.append(AppendRequest(
            account_id=account, mailbox="INBOX", message=raw_message(1), origin="s1"))).uid
        assert await events(1) == [("INBOX", [uid], [], [], "s1", 1, True, True)]
        mid = (await port.box()).mailbox_id
        await s.flags(StoreFlagsRequest(account_id=account, mailbox_id=mid, uids=[(1, 1)],
                                        op="add", flags=["\\Seen"], origin="s2"))
        assert await events(1) == [("INBOX", [], [(1, ["\\Seen"])], [], "s2", 1, True, True)]
        await s.flags(StoreFlagsRequest(account_id=account, mailbox_id=mid, uids=[(1, 1)],
                                        op="add", flags=["\\Seen"], origin="s2"))
        assert await events(0) == []  # nothing changed, nothing said
        await s.copy(CopyRequest(account_id=account, mailbox_id=mid, uids=[(1, 1)],
                                 target="INBOX", move=True, origin="s3"))
        assert await events(2) == [("INBOX", [2], [], [], "s3", 2, True, True),
                                   ("INBOX", [], [], [1], "s3", 1, True, True)]
        await s.flags(StoreFlagsRequest(account_id=account, mailbox_id=mid, uids=[(2, 2)],
                                        op="add", flags=["\\Deleted"]))
        await events(1)
        await s.expunge(ExpungeRequest(account_id=account, mailbox_id=mid, origin="s4"))
        assert await events(1) == [("INBOX", [], [], [2], "s4", 0, True, True)]
    finally:
        await unsubscribe()


# ---------------------------------------------------------------- imap-access's SQL reads
def _reads(path: str) -> float:
    return REGISTRY.get_sample_value("postbus_imap_store_reads_total", {"path": path}) or 0.0


async def test_sql_reads_come_from_sql_and_what_would_write_goes_to_the_store(port: Port) -> None:
    """ADR 0012: on a fresh account the first LIST must create INBOX, a write: the store does
    it; afterwards LIST, STATUS, SELECT (EXAMINE) and FETCH are answered from SQL, and a
    SELECT that claims \\Recent goes to the store again."""
    if not port.flavour.endswith("+sqlreads"):
        pytest.skip("imap-access's SQL reads only")
    sql, bus = _reads("sql"), _reads("bus")
    await port.store.mailbox_list(MailboxListRequest(account_id=port.account))
    assert (_reads("sql") - sql, _reads("bus") - bus) == (0, 1)  # INBOX made by the store
    inbox = await port.box("INBOX")
    uid = await port.append(raw_message(1))
    sql, bus = _reads("sql"), _reads("bus")
    boxes = (await port.store.mailbox_list(MailboxListRequest(account_id=port.account))).mailboxes
    assert "INBOX" in {b.name for b in boxes}
    status = await port.store.mailbox_status(MailboxRef(account_id=port.account, name="INBOX"))
    assert status.messages == 1 and status.uidvalidity == inbox.uidvalidity
    page = await port.store.select(SelectRequest(account_id=port.account, name="INBOX"))
    assert [m.uid for m in page.messages] == [uid]
    got = await port.store.fetch(FetchRequest(account_id=port.account,
                                              mailbox_id=page.mailbox.mailbox_id, uids=[[uid, uid]]))
    assert [m.uid for m in got.messages] == [uid]
    assert (_reads("sql") - sql, _reads("bus") - bus) == (4, 0)
    claimed = await port.store.select(SelectRequest(account_id=port.account, name="INBOX",
                                                     claim_recent=True))
    assert claimed.recent_uid == uid  # the store claimed it: \\Recent for this session
    assert (_reads("sql") - sql, _reads("bus") - bus) == (4, 1)
    with pytest.raises(StoreError) as info:  # the store's error codes, answered from SQL
        await port.store.mailbox_status(MailboxRef(account_id=port.account, name="Nope"))
    assert info.value.code == "not_found"
    assert (_reads("sql") - sql, _reads("bus") - bus) == (5, 1)


async def test_sql_reads_fall_back_to_the_store_when_the_database_cannot_be_read(
        port: Port, tmp_path: Path) -> None:
    """A database imap-access cannot open (a SQLite file in another pod) is not an error:
    every read goes to the store, and answers as it would."""
    if not port.flavour.endswith("+sqlreads"):
        pytest.skip("imap-access's SQL reads only")
    assert isinstance(port.store, SqlReadStore)
    engine = db.create_engine(f"sqlite:///{tmp_path / 'absent' / 'store.db'}", read_only=True)
    try:
        blind = SqlReadStore(port.store.bus, engine)
        sql, bus = _reads("sql"), _reads("bus")
        boxes = (await blind.mailbox_list(MailboxListRequest(account_id=port.account))).mailboxes
        assert "INBOX" in {b.name for b in boxes}
        assert (await blind.mailbox_status(MailboxRef(account_id=port.account,
                                                      name="INBOX"))).messages == 0
        assert (_reads("sql") - sql, _reads("bus") - bus) == (0, 2)
        assert not blind.ready and not (tmp_path / "absent").exists()  # read-only: not created
    finally:
        await engine.dispose()


async def test_expunge_with_nothing_deleted_is_a_read_and_with_something_the_stores(
        port: Port) -> None:
    """An EXPUNGE that finds nothing \\Deleted changes nothing, so imap-access answers it from
    SQL; one that finds some is the store's write, announced as before."""
    if not port.flavour.endswith("+sqlreads"):
        pytest.skip("imap-access's SQL reads only")
    inbox = await port.box("INBOX")
    uids = [await port.append(raw_message(i)) for i in (1, 2)]
    sql, bus = _reads("sql"), _reads("bus")
    req = ExpungeRequest(account_id=port.account, mailbox_id=inbox.mailbox_id)
    nothing = await port.store.expunge(req)
    assert (_reads("sql") - sql, _reads("bus") - bus) == (1, 0)
    assert nothing.expunged == [] and nothing.highestmodseq == (await port.box()).highestmodseq
    sql += 1  # that STATUS
    await port.store.flags(StoreFlagsRequest(account_id=port.account, mailbox_id=inbox.mailbox_id,
                                             uids=[[uids[0], uids[0]]], op="add",
                                             flags=["\\Deleted"]))
    gone = await port.store.expunge(req)
    assert gone.expunged == [uids[0]]
    assert (_reads("sql") - sql, _reads("bus") - bus) == (1, 1)
