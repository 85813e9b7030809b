"""mailbox-store's APPEND with more than one message (MULTIAPPEND, RFC 3502 §3) through the
real bus and blob store: all messages at consecutive UIDs in one transaction, or none."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import pytest_asyncio
from test_store_core_contract import add_account

from postbus.kit.blob import BlobStore
from postbus.kit.bus import Bus, RemoteError
from postbus.kit.settings import CommonSettings
from postbus.mailbox_store import db
from postbus.mailbox_store.repository import Repository
from postbus.mailbox_store.settings import Settings
from postbus.mailbox_store.storeapi import StoreApi
from postbus.proto.store import (
    STORE_APPEND,
    STORE_FETCH,
    STORE_MAILBOX_STATUS,
    AppendMessage,
    AppendRequest,
    FetchRequest,
    MailboxRef,
)

pytestmark = pytest.mark.timeout(60)


@dataclass
class Env:
    bus: Bus
    alice: int
    small: int


@pytest_asyncio.fixture
async def env(bus: Bus, blobs: BlobStore, common_settings: CommonSettings) -> AsyncIterator[Env]:
    engine = db.create_engine(common_settings.database_url)
    await db.migrate(engine)
    repo = Repository(engine)
    alice = await add_account(engine, "alice@example.test")
    small = await add_account(engine, "small@example.test", quota=100)
    await StoreApi(bus, blobs, repo, Settings(common=common_settings)).serve()
    yield Env(bus, alice, small)
    await engine.dispose()


def _msg(subject: str) -> bytes:
    return b"Subject: " + subject.encode() + b"\n\nbody\n"


async def test_all_messages_at_consecutive_uids(env: Env) -> None:
    rep = await env.bus.request(STORE_APPEND, AppendRequest(
        account_id=env.alice, mailbox="Drafts", flags=["\\Draft"], message=_msg("one"),
        more=[AppendMessage(message=_msg("two"), flags=["\\Seen"]),
              AppendMessage(message=_msg("three"))]))
    assert (rep.uid, rep.uids) == (1, [1, 2, 3])
    drafts = await env.bus.request(STORE_MAILBOX_STATUS,
                                   MailboxRef(account_id=env.alice, name="Drafts"))
    assert drafts.messages == 3
    metas = (await env.bus.request(STORE_FETCH, FetchRequest(
        account_id=env.alice, mailbox_id=drafts.mailbox_id, uids=[(1, 3)],
        with_summary=True))).messages
    assert [(m.uid, m.flags) for m in metas] == [(1, ["\\Draft"]), (2, ["\\Seen"]), (3, [])]
    assert [m.summary.subject for m in metas if m.summary] == ["one", "two", "three"]
    # one message alone answers as before: no list of UIDs
    rep = await env.bus.request(STORE_APPEND, AppendRequest(
        account_id=env.alice, mailbox="Drafts", message=_msg("four")))
    assert (rep.uid, rep.uids) == (4, [])


async def test_none_when_one_does_not_fit(env: Env) -> None:
    # RFC 3502 §3: if the server cannot append all, it appends none
    with pytest.raises(RemoteError) as ei:
        await env.bus.request(STORE_APPEND, AppendRequest(
            account_id=env.small, mailbox="INBOX", message=_msg("fits"),
            more=[AppendMessage(message=_msg("x" * 200))]))
    assert ei.value.code == "over_quota"
    inbox = await env.bus.request(STORE_MAILBOX_STATUS,
                                  MailboxRef(account_id=env.small, name="INBOX"))
    assert inbox.messages == 0
