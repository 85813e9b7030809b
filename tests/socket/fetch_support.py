"""One corpus in both implementations of the store port (the in-memory store the session
tests use, and the SQL store on SQLite), read back as FETCH metadata: for the tests that
check SORT's and THREAD's inputs agree between them."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import datetime
from pathlib import Path

from test_store_core_contract import add_account, drop, make_engine, new_message

from postbus.imap_access.memory import MemoryPlatform
from postbus.mailbox_store.repository import Repository
from postbus.proto.store import FetchRequest, MessageMeta

Fetch = Callable[[], Awaitable[list[MessageMeta]]]


@contextlib.asynccontextmanager
async def corpus_fetcher(kind: str, tmp_path: Path, corpus: Sequence[tuple[bytes, datetime]]
                         ) -> AsyncIterator[Fetch]:
    """``corpus`` (message, INTERNALDATE) delivered to alice's INBOX in the ``kind`` store
    ("memory" or "sqlite"); yields a function that FETCHes the metadata of all of it."""
    whole = [(1, 1000)]
    if kind == "memory":
        mp = MemoryPlatform()
        acc = mp.add_user("alice@example.test", "secret")
        for raw, when in corpus:
            mp.deliver(acc, raw, internaldate=when)
        box = mp.boxes[acc]["INBOX"].id

        async def memory() -> list[MessageMeta]:
            req = FetchRequest(account_id=acc, mailbox_id=box, uids=whole)
            return (await mp.fetch(req)).messages

        yield memory
        return
    engine, target, _ = await make_engine("sqlite", tmp_path)
    account = await add_account(engine, "alice@example.test")
    repo = Repository(engine)
    for i, (raw, when) in enumerate(corpus):
        await repo.deliver(f"Q{i}", account, "INBOX", new_message(raw, internaldate=when))
    inbox = (await repo.status(account, "INBOX")).mailbox_id

    async def sql() -> list[MessageMeta]:
        return await repo.fetch(account, inbox, whole)

    try:
        yield sql
    finally:
        await drop("sqlite", engine, target)
