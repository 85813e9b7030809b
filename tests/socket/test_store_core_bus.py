"""mailbox-store through the real bus and blob store: the delivery consumer (DeliverLocal in,
message stored, delivery event and mailbox.changed out), the store RPCs, and blob GC."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
import pytest_asyncio
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine
from test_store_core_contract import add_account

from postbus.kit.blob import BlobNotFound, BlobStore, StoreBodies, blob_key
from postbus.kit.bus import Bus, Delivery, RemoteError
from postbus.kit.settings import CommonSettings
from postbus.mailbox_store import db
from postbus.mailbox_store.blobgc import collect
from postbus.mailbox_store.delivery import Deliverer
from postbus.mailbox_store.models import Blob
from postbus.mailbox_store.repository import Repository
from postbus.mailbox_store.settings import Settings
from postbus.mailbox_store.storeapi import StoreApi
from postbus.proto.mail import (
    DELIVER_LOCAL,
    DELIVERY_EVENT,
    MAILBOX_CHANGED,
    DeliverLocal,
    DeliveryEvent,
    MailboxChanged,
)
from postbus.proto.store import (
    STORE_APPEND,
    STORE_COPY,
    STORE_EXPUNGE,
    STORE_FETCH,
    STORE_FLAGS,
    STORE_MAILBOX_CREATE,
    STORE_MAILBOX_LIST,
    STORE_MAILBOX_STATUS,
    STORE_POP3_COMMIT,
    STORE_POP3_MAILDROP,
    STORE_QUOTA,
    STORE_SEARCH,
    STORE_SELECT,
    AppendRequest,
    CopyRequest,
    ExpungeRequest,
    FetchRequest,
    MailboxCreateRequest,
    MailboxListRequest,
    MailboxRef,
    Pop3CommitRequest,
    Pop3MaildropRequest,
    QuotaRequest,
    SearchKey,
    SearchRequest,
    SelectRequest,
    StoreFlagsRequest,
)
from postbus.protocols.mime import summarize

pytestmark = pytest.mark.timeout(120)

RAW = (b"From: Bob <bob@example.net>\r\nTo: alice@example.test\r\nSubject: over the bus\r\n"
       b"Message-ID: <bus-1@example.net>\r\nDate: Thu, 26 Nov 2026 17:00:00 +0000\r\n"
       b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n"
       b"\r\nGr=C3=BC=C3=9Fe from the bus\r\n")
PREFIX = b"Return-Path: <bob@example.net>\r\nDelivered-To: alice@example.test\r\n"


@dataclass
class Env:
    bus: Bus
    blobs: BlobStore
    engine: AsyncEngine
    repo: Repository
    alice: int
    small: int
    changes: asyncio.Queue[MailboxChanged]
    events: asyncio.Queue[DeliveryEvent]


@pytest_asyncio.fixture
async def env(bus: Bus, blobs: BlobStore, common_settings: CommonSettings) -> AsyncIterator[Env]:
    settings = Settings(common=common_settings, delivery_max_attempts=2,
                        delivery_retry_base_s=0.2, verify_blob_on_delivery=True)
    engine = db.create_engine(common_settings.database_url)
    await db.migrate(engine)
    repo = Repository(engine)
    alice = await add_account(engine, "alice@example.test")
    small = await add_account(engine, "small@example.test", quota=10)
    changes: asyncio.Queue[MailboxChanged] = asyncio.Queue()
    events: asyncio.Queue[DeliveryEvent] = asyncio.Queue()

    async def on_change(c: MailboxChanged) -> None:
        await changes.put(c)

    async def on_event(d: Delivery[DeliveryEvent]) -> object:
        from postbus.kit.bus import Ack

        await events.put(d.data)
        return Ack()

    await bus.subscribe_core(MAILBOX_CHANGED, on_change)
    bus.consume(DELIVERY_EVENT, on_event, durable="test-events")  # type: ignore[arg-type]
    await StoreApi(bus, blobs, repo, settings).serve()
    Deliverer(bus, blobs, repo, settings).start()
    yield Env(bus, blobs, engine, repo, alice, small, changes, events)
    await engine.dispose()


def _deliver(qid: str, account_id: int, key: str, account: str = "alice@example.test") -> DeliverLocal:
    return DeliverLocal(
        queue_id=qid, recipient=account, account_id=account_id, account=account,
        mail_from="bob@example.net", received_at=datetime.now(UTC), blob_key=key,
        blob_size=len(RAW), prefix=PREFIX, summary=summarize(RAW), notify=["FAILURE"],
        dsn_envid="ENV1")


async def _next(q: asyncio.Queue, timeout: float = 10) -> object:  # type: ignore[type-arg]
    return await asyncio.wait_for(q.get(), timeout)


async def test_delivery_consumer_stores_and_reports(env: Env) -> None:
    key = await env.blobs.put(RAW)
    # the same queue id twice (a redelivery): stored once
    await env.bus.publish(DELIVER_LOCAL, _deliver("Q1", env.alice, key))
    await env.bus.publish(DELIVER_LOCAL, _deliver("Q1", env.alice, key))
    change = await _next(env.changes)
    assert isinstance(change, MailboxChanged)
    assert change.account_id == env.alice and change.mailbox == "INBOX" and change.exists == 1
    assert change.added[0].uid == 1 and change.uidnext == 2
    ev = await _next(env.events)
    assert isinstance(ev, DeliveryEvent)
    assert ev.kind == "delivered" and ev.queue_id == "Q1" and ev.recipient == "alice@example.test"
    await asyncio.sleep(0.5)
    info = await env.bus.request(STORE_MAILBOX_STATUS, MailboxRef(account_id=env.alice, name="INBOX"))
    assert info.messages == 1 and info.unseen == 1
    assert env.changes.empty()

    # the whole IMAP read path
    boxes = await env.bus.request(STORE_MAILBOX_LIST, MailboxListRequest(account_id=env.alice))
    assert {"INBOX", "Sent", "Trash"} <= {m.name for m in boxes.mailboxes}
    sel = await env.bus.request(STORE_SELECT, SelectRequest(account_id=env.alice,
                                                            mailbox_id=info.mailbox_id))
    assert [m.uid for m in sel.messages] == [1] and sel.mailbox.uidvalidity == info.uidvalidity
    got = await env.bus.request(STORE_FETCH, FetchRequest(account_id=env.alice,
                                                          mailbox_id=info.mailbox_id, uids=[(1, 9)]))
    meta = got.messages[0]
    assert meta.prefix == PREFIX and meta.blob_key == key and meta.size == len(PREFIX) + len(RAW)
    assert meta.summary is not None and meta.summary.subject == "over the bus"
    assert meta.prefix + await env.blobs.get(meta.blob_key) == PREFIX + RAW


async def test_over_quota_defers_then_fails_with_bounce_fields(env: Env) -> None:
    key = await env.blobs.put(RAW)
    await env.bus.publish(DELIVER_LOCAL, _deliver("Q2", env.small, key, "small@example.test"))
    first = await _next(env.events)
    second = await _next(env.events)
    assert isinstance(first, DeliveryEvent) and isinstance(second, DeliveryEvent)
    assert (first.kind, first.status, first.attempt) == ("deferred", "4.2.2", 1)
    assert first.next_attempt_at is not None
    assert (second.kind, second.status) == ("failed", "5.2.2")
    for ev in (first, second):
        assert ev.mail_from == "bob@example.net" and ev.blob_key == key
        assert ev.notify == ["FAILURE"] and ev.dsn_envid == "ENV1"
    assert (await env.repo.quota(env.small))[2] == 0


async def test_missing_blob_and_unknown_account_are_reported(env: Env) -> None:
    await env.bus.publish(DELIVER_LOCAL, _deliver("Q3", 424242, "blobs/" + "0" * 64))
    ev = await _next(env.events)
    assert isinstance(ev, DeliveryEvent)
    # the blob check comes first: deferred (4.3.0), then failed (5.3.0)
    assert (ev.kind, ev.status) == ("deferred", "4.3.0")
    ev = await _next(env.events)
    assert isinstance(ev, DeliveryEvent) and (ev.kind, ev.status) == ("failed", "5.3.0")
    key = await env.blobs.put(RAW)
    await env.bus.publish(DELIVER_LOCAL, _deliver("Q4", 424242, key))
    ev = await _next(env.events)
    assert isinstance(ev, DeliveryEvent) and (ev.kind, ev.status) == ("failed", "5.1.1")


async def test_store_rpcs_append_search_copy_pop3(env: Env) -> None:
    a = env.alice
    rep = await env.bus.request(STORE_APPEND, AppendRequest(
        account_id=a, mailbox="Drafts", flags=["\\Draft"], message=RAW.replace(b"\r\n", b"\n"),
        origin="sess-1"))
    drafts = await env.bus.request(STORE_MAILBOX_STATUS, MailboxRef(account_id=a, name="Drafts"))
    assert rep.uid == 1 and rep.uidvalidity == drafts.uidvalidity
    change = await _next(env.changes)
    assert isinstance(change, MailboxChanged) and change.origin == "sess-1"
    meta = (await env.bus.request(STORE_FETCH, FetchRequest(
        account_id=a, mailbox_id=drafts.mailbox_id, uids=[(1, 1)]))).messages[0]
    assert meta.flags == ["\\Draft"] and meta.size == len(RAW)  # stored with CRLF line ends
    with pytest.raises(RemoteError) as ei:
        await env.bus.request(STORE_APPEND, AppendRequest(account_id=a, mailbox="Nope", message=RAW))
    assert ei.value.code == "not_found"
    with pytest.raises(RemoteError) as ei:
        await env.bus.request(STORE_APPEND, AppendRequest(account_id=env.small, mailbox="INBOX",
                                                          message=RAW))
    assert ei.value.code == "over_quota"
    with pytest.raises(RemoteError) as ei:
        await env.bus.request(STORE_MAILBOX_CREATE, MailboxCreateRequest(account_id=a, name="Drafts"))
    assert ei.value.code == "exists"

    # body search reads the blob and decodes quoted-printable UTF-8
    found = await env.bus.request(STORE_SEARCH, SearchRequest(
        account_id=a, mailbox_id=drafts.mailbox_id, key=SearchKey(op="body", args=["GRÜSSE"])))
    assert found.uids == [1]
    found = await env.bus.request(STORE_SEARCH, SearchRequest(
        account_id=a, mailbox_id=drafts.mailbox_id, key=SearchKey(op="body", args=["absent"])))
    assert found.uids == []

    await env.bus.request(STORE_FLAGS, StoreFlagsRequest(
        account_id=a, mailbox_id=drafts.mailbox_id, uids=[(1, 1)], op="add", flags=["\\Seen"]))
    moved = await env.bus.request(STORE_COPY, CopyRequest(
        account_id=a, mailbox_id=drafts.mailbox_id, uids=[(1, 1)], target="INBOX", move=True))
    assert moved.source_uids == [1] and moved.target_uids == [1]
    with pytest.raises(RemoteError) as ei:
        await env.bus.request(STORE_COPY, CopyRequest(
            account_id=a, mailbox_id=drafts.mailbox_id, uids=[(1, 1)], target="Missing"))
    assert ei.value.code == "not_found"

    drop = await env.bus.request(STORE_POP3_MAILDROP, Pop3MaildropRequest(account_id=a))
    assert [m.uid for m in drop.messages] == [1] and drop.messages[0].uidl == f"{drop.uidvalidity}.1"
    await env.bus.request(STORE_POP3_COMMIT, Pop3CommitRequest(
        account_id=a, mailbox_id=drop.mailbox_id, delete_uids=[1], mode="delete"))
    assert (await env.bus.request(STORE_POP3_MAILDROP, Pop3MaildropRequest(account_id=a))).messages == []
    q = await env.bus.request(STORE_QUOTA, QuotaRequest(account_id=a))
    assert (q.used_bytes, q.limit_bytes, q.messages) == (0, None, 0)
    ex = await env.bus.request(STORE_EXPUNGE, ExpungeRequest(account_id=a, mailbox_id=drop.mailbox_id))
    assert ex.expunged == []
    with pytest.raises(RemoteError) as ei:
        await env.bus.request(STORE_SELECT, SelectRequest(account_id=a, mailbox_id=987654))
    assert ei.value.code == "not_found"


async def test_blob_gc(env: Env) -> None:
    kept = await env.blobs.put(RAW)
    gone = await env.blobs.put(RAW + b"other\r\n")
    orphan = await env.blobs.put(b"a claim-check body nobody delivered")
    inbox_msgs = []
    for qid, key in (("G1", kept), ("G2", gone)):
        d = _deliver(qid, env.alice, key)
        d.blob_size = len(await env.blobs.get(key))
        await env.bus.publish(DELIVER_LOCAL, d)
        inbox_msgs.append(await _next(env.changes))
    inbox = inbox_msgs[0].mailbox_id  # type: ignore[attr-defined]
    await env.bus.request(STORE_FLAGS, StoreFlagsRequest(
        account_id=env.alice, mailbox_id=inbox, uids=[(2, 2)], op="add", flags=["\\Deleted"]))
    await env.bus.request(STORE_EXPUNGE, ExpungeRequest(account_id=env.alice, mailbox_id=inbox))
    # inside the grace period nothing goes
    res = await collect(env.repo, env.blobs, grace_s=3600)
    assert (res.unreferenced, res.orphans) == (0, 0)
    res = await collect(env.repo, env.blobs, grace_s=0, now=datetime.now(UTC) + timedelta(seconds=5))
    assert (res.unreferenced, res.orphans) == (1, 1)
    assert await env.blobs.exists(kept)
    env.blobs.cache.discard(gone)
    env.blobs.cache.discard(orphan)
    assert not await env.blobs.exists(gone) and not await env.blobs.exists(orphan)
    async with env.engine.connect() as conn:
        keys = set((await conn.execute(select(Blob.__table__.c.key))).scalars().all())
    assert keys == {kept}


async def test_pop3_retention_pass_expunges_and_tells_imap(env: Env) -> None:
    """retention.expire_once: retrieved mail past the account's EXPIRE days is expunged and
    mailbox.changed carries the EXPUNGE to IMAP sessions, like any other removal."""
    from datetime import timedelta

    from sqlalchemy import text

    from postbus.mailbox_store import retention

    key = await env.blobs.put(RAW)
    for i in range(2):
        await env.bus.publish(DELIVER_LOCAL, _deliver(f"R{i}", env.alice, key))
        await _next(env.changes)
    async with env.engine.begin() as conn:
        await conn.execute(text("UPDATE accounts SET pop3_expire_days = 1 WHERE id = :a"),
                           {"a": env.alice})
    mid, _, msgs, _ = await env.repo.pop3_maildrop(env.alice)
    await env.repo.pop3_commit(env.alice, mid, [], "keep", seen_uids=[msgs[0].uid])
    assert await retention.expire_once(env.repo, env.bus) == 0  # not a day old yet
    later = datetime.now(UTC) + timedelta(days=1, seconds=1)
    assert await retention.expire_once(env.repo, env.bus, later) == 1
    change = await _next(env.changes)
    while not change.expunged:  # the \Seen flag of the retrieval comes first
        change = await _next(env.changes)
    assert change.account_id == env.alice and change.expunged == [msgs[0].uid]
    _, _, left, _ = await env.repo.pop3_maildrop(env.alice)
    assert [m.uid for m in left] == [msgs[1].uid]


async def test_search_past_its_budget_is_refused_with_limit(
        bus: Bus, blobs: BlobStore, common_settings: CommonSettings) -> None:
    """Issue 8.2: a text search has a budget of characters decoded and of time; past it
    the store answers ``limit`` (IMAP: NO [LIMIT]) instead of working on."""
    engine = db.create_engine(common_settings.database_url)
    await db.migrate(engine)
    repo = Repository(engine)
    a = await add_account(engine, "alice@example.test")
    settings = Settings(common=common_settings, search_text_budget=3000,
                        search_text_per_message=1000)
    await StoreApi(bus, blobs, repo, settings).serve()
    long_text = b"Subject: long\r\n\r\n" + b"lorem ipsum " * 1000 + b"needle\r\n"
    for raw in (long_text, long_text, RAW, long_text, long_text):
        await bus.request(STORE_APPEND, AppendRequest(account_id=a, mailbox="INBOX",
                                                      message=raw))
    inbox = await bus.request(STORE_MAILBOX_STATUS, MailboxRef(account_id=a, name="INBOX"))

    def search(op: str, word: str, after: int = 0) -> SearchRequest:
        return SearchRequest(account_id=a, mailbox_id=inbox.mailbox_id, after_uid=after,
                             key=SearchKey(op="and", children=[SearchKey(op=op, args=[word])]))

    # one message: 1,000 characters looked at, so the needle past them is not found
    assert (await bus.request(STORE_SEARCH, search("body", "needle", after=3))).uids == []
    assert (await bus.request(STORE_SEARCH, search("body", "lorem", after=3))).uids == [4, 5]
    with pytest.raises(RemoteError) as ei:  # five messages: over 3,000 characters
        await bus.request(STORE_SEARCH, search("text", "grüße"))
    assert ei.value.code == "limit" and "narrow" in ei.value.message
    await engine.dispose()


# ---------------------------------------------------------------- small bodies (ADR 0014)
def _inline(qid: str, account_id: int, account: str = "alice@example.test") -> DeliverLocal:
    return _deliver(qid, account_id, blob_key(RAW), account).model_copy(update={"body": RAW})


async def test_small_body_lives_in_the_blob_row_not_in_s3(
        env: Env, common_settings: CommonSettings) -> None:
    key = blob_key(RAW)
    await env.bus.publish(DELIVER_LOCAL, _inline("Q40", env.alice))
    ev = await _next(env.events)
    assert isinstance(ev, DeliveryEvent) and ev.kind == "delivered"
    env.blobs.cache.discard(key)
    with pytest.raises(BlobNotFound):
        await env.blobs.get_s3(key)  # no PUT was made
    # what imap-access and pop3-access read through, over store.bodies.v1
    readers = BlobStore(common_settings, threads=2)
    readers.inline = StoreBodies(env.bus)
    assert await readers.get(key) == RAW
    assert await readers.get_many([key, key]) == {key: RAW}
    info = await env.bus.request(STORE_MAILBOX_STATUS, MailboxRef(account_id=env.alice,
                                                                  name="INBOX"))
    assert info.size == len(PREFIX) + len(RAW)
    # the store's own readers (SEARCH) find it in the row too
    found = await env.bus.request(STORE_SEARCH, SearchRequest(
        account_id=env.alice, mailbox_id=info.mailbox_id,
        key=SearchKey(op="body", args=["GRÜSSE"])))
    assert found.uids == [1]
    # a copy shares the row; once no message holds it, GC takes the row and its body
    await env.bus.request(STORE_COPY, CopyRequest(account_id=env.alice,
                                                  mailbox_id=info.mailbox_id, uids=[(1, 1)],
                                                  target="Drafts"))
    drafts = await env.bus.request(STORE_MAILBOX_STATUS, MailboxRef(account_id=env.alice,
                                                                    name="Drafts"))
    for box in (info.mailbox_id, drafts.mailbox_id):
        await env.bus.request(STORE_FLAGS, StoreFlagsRequest(
            account_id=env.alice, mailbox_id=box, uids=[(1, 1)], op="add",
            flags=["\\Deleted"]))
        res = await collect(env.repo, env.blobs, grace_s=0,
                            now=datetime.now(UTC) + timedelta(seconds=5))
        assert res.unreferenced == 0  # still referenced (by the other copy first)
        await env.bus.request(STORE_EXPUNGE, ExpungeRequest(account_id=env.alice,
                                                            mailbox_id=box))
    res = await collect(env.repo, env.blobs, grace_s=0,
                        now=datetime.now(UTC) + timedelta(seconds=5))
    assert (res.unreferenced, res.orphans) == (1, 0)
    assert await env.repo.inline_bodies([key]) == {}


async def test_failed_small_delivery_puts_the_body_in_s3_for_the_bounce(env: Env) -> None:
    """relay quotes a bounced message from S3 (ADR 0004): a small body that came inline
    and could not be stored is put there before the failure is reported."""
    await env.bus.publish(DELIVER_LOCAL, _inline("Q41", env.small, "small@example.test"))
    first = await _next(env.events)
    second = await _next(env.events)
    assert isinstance(first, DeliveryEvent) and isinstance(second, DeliveryEvent)
    assert (first.kind, second.kind) == ("deferred", "failed")
    assert second.blob_key == blob_key(RAW)
    env.blobs.cache.discard(second.blob_key)
    assert await env.blobs.get_s3(second.blob_key) == RAW


async def test_append_body_must_match_its_key(env: Env) -> None:
    with pytest.raises(RemoteError) as ei:
        await env.bus.request(STORE_APPEND, AppendRequest(
            account_id=env.alice, mailbox="INBOX", blob_key=blob_key(b"other"), body=RAW,
            blob_size=len(RAW), summary=summarize(RAW)))
    assert ei.value.code == "invalid"
    rep = await env.bus.request(STORE_APPEND, AppendRequest(
        account_id=env.alice, mailbox="INBOX", blob_key=blob_key(RAW), body=RAW,
        blob_size=len(RAW), summary=summarize(RAW)))
    assert rep.uid == 1 and await env.repo.inline_bodies([blob_key(RAW)]) == {
        blob_key(RAW): RAW}


async def test_append_into_the_selected_mailbox_claims_recent_and_syncs_in_one_request(
        env: Env) -> None:
    """An APPEND with sync_after_uid claims \\Recent in its own transaction and answers with
    the new messages up to the UIDNEXT it claimed to, as a SELECT with claim_recent would:
    the appended message is \\Recent for this session only."""
    a = env.alice
    first = await env.bus.request(STORE_APPEND, AppendRequest(account_id=a, mailbox="INBOX",
                                                              message=RAW))
    rep = await env.bus.request(STORE_APPEND, AppendRequest(
        account_id=a, mailbox="INBOX", message=RAW + b"two\r\n", sync_after_uid=0))
    assert rep.sync is not None and rep.uid == first.uid + 1
    # both messages are new to a view that knew nothing, and both were still unclaimed
    assert [m.uid for m in rep.sync.messages] == [first.uid, rep.uid]
    assert rep.sync.recent_uid == first.uid and rep.sync.mailbox.uidnext == rep.uid + 1
    # another session selecting now finds them claimed
    other = await env.bus.request(STORE_SELECT, SelectRequest(
        account_id=a, mailbox_id=rep.sync.mailbox.mailbox_id, claim_recent=True))
    assert other.recent_uid == rep.uid + 1
    plain = await env.bus.request(STORE_APPEND, AppendRequest(account_id=a, mailbox="INBOX",
                                                              message=RAW + b"3\r\n"))
    assert plain.sync is None
