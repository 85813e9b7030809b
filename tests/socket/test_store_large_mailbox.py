"""A large mailbox over a nats-server with its default max_payload (1 MiB), as a production
cluster may run: the store replies that grow with the mailbox (POP3 maildrop, SEARCH,
EXPUNGE) come in pages, the caller-bounded ones (FETCH, STORE, COPY) in chunks, a big POP3
commit in parts, and every result is complete. Real mailbox-store (SQLite) and directory,
pop3-access's store adapter, the imap-access server and an imaplib client.

Here 6,000 messages (the maildrop alone is 1.6 MB) with small store pages, so every loop
runs; tests/bench/bench_store.py runs the same checks on 100,000 with the real page sizes.
"""

from __future__ import annotations

import asyncio
import contextlib
import imaplib
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from store_dir_support import open_db

from postbus.imap_access.adapters import BusChanges, BusStore, S3Blobs, store_error
from postbus.imap_access.server import ImapServer
from postbus.imap_access.settings import Settings as ImapSettings
from postbus.kit.blob import BlobStore
from postbus.kit.bus import Bus, RemoteError
from postbus.kit.directory import DirectoryClient
from postbus.kit.settings import CommonSettings
from postbus.kit.testing import RunningNats
from postbus.mailbox_store.directory import serve_directory
from postbus.mailbox_store.passwords import Passwords, fast_hasher
from postbus.mailbox_store.repository import NewMessage, Repository
from postbus.mailbox_store.settings import Settings as StoreSettings
from postbus.mailbox_store.storeapi import StoreApi
from postbus.pop3_access.adapters import StoreMaildrops
from postbus.proto.store import (
    PAGE_BYTES,
    STORE_FETCH,
    STORE_POP3_MAILDROP,
    STORE_SEARCH,
    FetchRequest,
    Pop3CommitRequest,
    Pop3MaildropRequest,
    SearchKey,
    SearchRequest,
)
from postbus.protocols.mime import summarize

pytestmark = pytest.mark.timeout(120)

MIB = 1024 * 1024
N = 6000
USER, PASSWORD = "alice@example.test", "secret"
PREFIX = b"Return-Path: <bob@example.net>\r\nDelivered-To: alice@example.test\r\n"


@contextlib.asynccontextmanager
async def large_mailbox(tmp: Path, bus: Bus, blobs: BlobStore, common: CommonSettings, n: int,
                        **pages: int) -> AsyncIterator[tuple[Repository, int]]:
    """mailbox-store's RPCs (``pages``: StoreApi page caps) and directory on the bus, and an
    account whose INBOX holds ``n`` messages; yields (repository, account id)."""
    async for sm in open_db("sqlite", tmp):
        repo = Repository(sm.kw["bind"])
        d = await serve_directory(bus, sm, passwords=Passwords(fast_hasher()), repo=repo)
        await d.create_domain("example.test")
        aid = (await d.create_account(USER, PASSWORD)).id
        await StoreApi(bus, blobs, repo, StoreSettings(common=common), **pages).serve()
        raws = [f"From: bob@example.net\r\nSubject: message {i}\r\n\r\nbody {i}\r\n".encode()
                for i in range(4)]
        msgs = [NewMessage(await blobs.put(raw), len(raw), summarize(raw), prefix=PREFIX)
                for raw in raws]
        for i in range(0, n, 10_000):  # bulk APPENDs of 10,000
            await repo.append_many(aid, "INBOX", [msgs[j % 4] for j in range(i, min(n, i + 10_000))])
        yield repo, aid


async def check_pop3(bus: Bus, blobs: BlobStore, repo: Repository, aid: int, n: int,
                     **adapter: int) -> dict[str, float]:
    """The maildrop through pop3-access's store adapter, then a commit of every UID;
    returns the seconds each took."""
    took: dict[str, float] = {}
    drops = StoreMaildrops(bus, blobs, **adapter)
    t = time.perf_counter()
    drop = await drops.open(aid)
    took["pop3_maildrop_s"] = time.perf_counter() - t
    assert [m.uid for m in drop.messages] == list(range(1, n + 1))
    assert drop.messages[-1].uidl == f"{drop.uidvalidity}.{n}"
    assert all(m.prefix == PREFIX for m in drop.messages)
    assert len(drop.model_dump_json()) > MIB  # what one reply would have been

    # a page is bounded by the store, whatever the request asks
    page = await bus.request(STORE_POP3_MAILDROP, Pop3MaildropRequest(account_id=aid, limit=n))
    assert page.more and 0 < len(page.model_dump_json()) <= PAGE_BYTES

    # QUIT after RETR + DELE of everything with the "keep" policy (at 100,000 messages the
    # two UID lists are 1.2 MB as one request)
    t = time.perf_counter()
    await drops.commit(Pop3CommitRequest(account_id=aid, mailbox_id=drop.mailbox_id,
                                         delete_uids=list(range(1, n + 1)), mode="keep",
                                         seen_uids=list(range(1, n + 1))))
    took["pop3_commit_keep_all_s"] = time.perf_counter() - t
    assert (await drops.open(aid)).messages == []
    info = await repo.status(aid, "INBOX")
    assert (info.messages, info.unseen) == (n, 0)
    return took


async def check_imap(bus: Bus, blobs: BlobStore, common: CommonSettings, repo: Repository,
                     aid: int, n: int) -> dict[str, float]:
    """SELECT, STORE 1:*, SEARCH, COPY 1:*, EXPUNGE of everything through the IMAP server
    on the bus; returns the seconds each took."""
    inbox = (await repo.status(aid, "INBOX")).mailbox_id
    # what the session pages or chunks, asked for at once: capped, or refused at once
    everything = await bus.request(STORE_SEARCH, SearchRequest(
        account_id=aid, mailbox_id=inbox, key=SearchKey(op="all"), limit=n))
    assert everything.more and len(everything.model_dump_json()) <= PAGE_BYTES
    with pytest.raises(RemoteError) as too_large:
        await bus.request(STORE_FETCH, FetchRequest(account_id=aid, mailbox_id=inbox,
                                                    uids=[(1, n)], with_summary=False))
    assert too_large.value.code == "too_large"  # not a timeout

    server = ImapServer(ImapSettings(common=common, auth_fail_delay_s=0),
                        DirectoryClient(bus, "imap", errors=store_error), BusStore(bus),
                        S3Blobs(blobs), BusChanges(bus))
    [port] = await server.start("127.0.0.1", 0, None)
    took: dict[str, float] = {}

    def client() -> dict[str, list[bytes]]:
        out: dict[str, list[bytes]] = {}
        with imaplib.IMAP4("127.0.0.1", port, timeout=300) as m:
            m.login(USER, PASSWORD)

            def step(name: str, command: Callable[..., tuple[str, list[bytes]]],
                     *args: str | None) -> None:
                t = time.perf_counter()
                typ, data = command(*args)
                took[f"imap_{name}_s"] = time.perf_counter() - t
                assert typ == "OK", (name, typ, data)
                out[name] = data

            step("select", m.select, "INBOX")
            step("store_1_all_flagged", m.store, "1:*", "+FLAGS.SILENT", "(\\Flagged)")
            step("search_all", m.search, None, "ALL")
            step("uid_search_flagged", m.uid, "SEARCH", "FLAGGED")
            step("copy_1_all", m.copy, "1:*", "Archive")
            out["archive"] = m.status("Archive", "(MESSAGES)")[1]
            step("store_1_all_deleted", m.store, "1:*", "+FLAGS.SILENT", "(\\Deleted)")
            step("expunge_all", m.expunge)
            out["left"] = m.select("INBOX")[1]
        return out

    try:
        out = await asyncio.to_thread(client)
    finally:
        await server.stop()
    every = " ".join(str(i) for i in range(1, n + 1)).encode()
    assert out["select"] == [str(n).encode()]
    assert out["search_all"] == [every] and out["uid_search_flagged"] == [every]
    copyuid = re.search(rb"\[COPYUID \d+ 1:(\d+) 1:(\d+)\]", out["copy_1_all"][0])
    assert copyuid and copyuid.groups() == (str(n).encode(), str(n).encode()), out["copy_1_all"]
    assert f"(MESSAGES {n})".encode() in out["archive"][0]
    assert out["expunge_all"] == [b"1"] * n  # "* 1 EXPUNGE" for each
    assert out["left"] == [b"0"]
    return took


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[RunningNats]:
    """Replaces the kit's fixture in this module: nats-server's own default max_payload."""
    n = RunningNats(tmp_path, max_payload=MIB)
    yield n
    n.stop()


@pytest_asyncio.fixture
async def store(tmp_path: Path, bus: Bus, blobs: BlobStore,
                common_settings: CommonSettings) -> AsyncIterator[tuple[Repository, int]]:
    assert bus.nc.max_payload == MIB
    # pages of 1,000 UIDs (SEARCH, EXPUNGE): the session follows six of each
    async with large_mailbox(tmp_path, bus, blobs, common_settings, N,
                             max_uid_page=1000) as (repo, aid):
        yield repo, aid


async def test_pop3_maildrop_and_commit_in_pages(bus: Bus, blobs: BlobStore,
                                                 store: tuple[Repository, int]) -> None:
    repo, aid = store
    await check_pop3(bus, blobs, repo, aid, N, commit_uids=1000)  # the commit in 6 parts


async def test_imap_select_store_search_copy_expunge_all(
        bus: Bus, blobs: BlobStore, common_settings: CommonSettings,
        store: tuple[Repository, int]) -> None:
    repo, aid = store
    await check_imap(bus, blobs, common_settings, repo, aid, N)
