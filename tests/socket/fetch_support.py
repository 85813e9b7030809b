"""One corpus in both implementations of the store port (the in-memory store the session
tests use, and the SQL store on SQLite), read back as FETCH metadata or SEARCHed: for the
tests that check SORT's and THREAD's inputs and SEARCH's rules agree between them. The
``fetch`` and ``search`` fixtures load the requesting test module's ``corpus()``."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from test_store_core_contract import add_account, drop, make_engine, new_message

from postbus.imap_access.memory import MemoryPlatform
from postbus.mailbox_store.repository import Repository
from postbus.mailbox_store.storeapi import eval_leaves
from postbus.proto.store import FetchRequest, MessageMeta, SearchKey, SearchRequest

Fetch = Callable[[], Awaitable[list[MessageMeta]]]
Search = Callable[[SearchKey], Awaitable[list[int]]]


@dataclass(frozen=True)
class CorpusStore:
    fetch: Fetch  # the FETCH metadata of all of the corpus
    search: Search  # the UIDs a SEARCH key matches


@contextlib.asynccontextmanager
async def corpus_store(kind: str, tmp_path: Path, corpus: Sequence[tuple[bytes, datetime]]
                       ) -> AsyncIterator[CorpusStore]:
    """``corpus`` (message, INTERNALDATE) delivered to alice's INBOX in the ``kind`` store
    ("memory" or "sqlite")."""
    whole = [(1, 1000)]
    if kind == "memory":
        mp = MemoryPlatform()
        acc = mp.add_user("alice@example.test", "secret")
        for raw, when in corpus:
            mp.deliver(acc, raw, internaldate=when)
        box = mp.boxes[acc]["INBOX"].id

        async def memory_fetch() -> list[MessageMeta]:
            req = FetchRequest(account_id=acc, mailbox_id=box, uids=whole)
            return (await mp.fetch(req)).messages

        async def memory_search(key: SearchKey) -> list[int]:
            req = SearchRequest(account_id=acc, mailbox_id=box, key=key)
            return (await mp.search(req)).uids

        yield CorpusStore(memory_fetch, memory_search)
        return
    engine, target, _ = await make_engine("sqlite", tmp_path)
    account = await add_account(engine, "alice@example.test")
    repo = Repository(engine)
    blobs: dict[str, bytes] = {}
    for i, (raw, when) in enumerate(corpus):
        m = new_message(raw, internaldate=when)
        blobs[m.blob_key] = raw
        await repo.deliver(f"Q{i}", account, "INBOX", m)
    inbox = (await repo.status(account, "INBOX")).mailbox_id

    async def sql_fetch() -> list[MessageMeta]:
        return await repo.fetch(account, inbox, whole)

    async def matcher(rows: list[Any], leaves: list[tuple[str, SearchKey]]
                      ) -> dict[int, dict[int, bool]]:
        return {row.uid: eval_leaves(bytes(row.prefix or b"") + blobs[row.blob_key], leaves)[0]
                for row in rows}

    async def sql_search(key: SearchKey) -> list[int]:
        return (await repo.search(account, inbox, key, matcher))[0]

    try:
        yield CorpusStore(sql_fetch, sql_search)
    finally:
        await drop("sqlite", engine, target)


@pytest_asyncio.fixture(params=["memory", "sqlite"])
async def fetch(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Fetch]:
    async with corpus_store(request.param, tmp_path, request.module.corpus()) as s:
        yield s.fetch


@pytest_asyncio.fixture(params=["memory", "sqlite"])
async def search(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Search]:
    async with corpus_store(request.param, tmp_path, request.module.corpus()) as s:
        yield s.search
