"""The work behind mailbox-store's import and export routes (mgmt.py): archives read and
stored in batches (blobs to S3 in parallel, rows through the repository), mailboxes
streamed out as mboxrd, and change notifications for IMAP sessions.

Raises the repository's and directory's errors; mgmt.py turns them into HTTP statuses.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

from pydantic import BaseModel, Field

from postbus.kit.blob import BlobStore
from postbus.kit.bus import Bus
from postbus.kit.logging import get_logger
from postbus.kit.metrics import counter
from postbus.mailbox_store import repository as store
from postbus.mailbox_store.delivery import publish_change
from postbus.mailbox_store.directory import AccountInfo, Directory
from postbus.mailbox_store.importexport import (
    FormatError,
    ImportedMessage,
    mbox_entry,
    read_archive,
)
from postbus.mailbox_store.repository import Change, NewMessage, Repository, StoreError
from postbus.proto.store import MessageMeta
from postbus.protocols.mime import summarize
from postbus.protocols.served import served

log = get_logger(__name__)

IMPORTED = counter("postbus_store_imported_messages_total", "Messages imported", ["outcome"])
IMPORT_BATCH = 32  # messages parsed, summarized and uploaded to S3 concurrently...
IO_BATCH_BYTES = 32 * 1024 * 1024  # ...or fewer when they are large (export: read at once)
EXPORT_PAGE = 200


class ImportReport(BaseModel):
    mailbox: str
    format: str
    imported: int
    failed: int
    bytes: int
    first_uid: int | None = Field(description="in ``mailbox``")
    last_uid: int | None
    mailboxes: dict[str, int] = Field(default_factory=dict,
                                      description="messages per mailbox (Maildir++ folders)")
    errors: list[str] = Field(default_factory=list, description="the first 50 problems")
    stopped: str | None = Field(default=None, description="why the import ended early")


# ---------------------------------------------------------------- the service behind routes
class MailAdmin:
    def __init__(self, directory: Directory, repo: Repository, blobs: BlobStore,
                 bus: Bus | None) -> None:
        self.dir = directory
        self.repo = repo
        self.blobs = blobs
        self.bus = bus

    async def notify(self, change: Change | None) -> None:
        """Tell IMAP sessions (IDLE) what changed; best effort, after the commit, in parts
        when large (an import or a deleted mailbox of 100,000 messages), as every other
        writer of the store does."""
        if self.bus is not None:
            await publish_change(self.bus, change, origin="mgmt")

    async def mailbox_id(self, account_id: int, name: str) -> tuple[int, str]:
        info = await self.repo.status(account_id, name)
        return info.mailbox_id, info.name

    async def _prepare(self, m: ImportedMessage) -> NewMessage:
        summary = await asyncio.to_thread(summarize, m.raw)
        key = await self.blobs.put(m.raw)
        return NewMessage(blob_key=key, blob_size=len(m.raw), summary=summary,
                          flags=m.flags, internaldate=m.internaldate)

    async def import_file(self, account: AccountInfo, mailbox: str, fmt: str, path: str,
                          *, max_message: int) -> ImportReport:
        """Store every message of the spooled upload in ``mailbox`` (created if missing),
        in file order: blobs content-addressed in S3, rows through the repository.
        Maildir++ sub-folders go to mailboxes of the same name (below ``mailbox`` unless
        that is INBOX), created when missing."""
        names: dict[str, str] = {}

        async def ensure(wanted: str) -> str:
            if wanted not in names:
                try:
                    _, names[wanted] = await self.mailbox_id(account.id, wanted)
                except store.NotFound:
                    names[wanted] = (await self.repo.create_mailbox(account.id, wanted)).name
            return names[wanted]

        name = store.normalize_name(mailbox)  # created with its first message, not before
        rep = ImportReport(mailbox=name, format=fmt, imported=0, failed=0, bytes=0,
                           first_uid=None, last_uid=None)
        it = read_archive(fmt, path, max_message=max_message)

        async def load() -> _Batch:
            """The next messages of the file, summarized and in S3 (blob puts in parallel)."""
            batch: list[ImportedMessage] = []
            error, end, size = None, False, 0
            try:
                while len(batch) < IMPORT_BATCH and size < IO_BATCH_BYTES:
                    m = await asyncio.to_thread(next, it, None)
                    if m is None:
                        end = True
                        break
                    batch.append(m)
                    size += len(m.raw)
            except FormatError as exc:
                error, end = str(exc), True
            prepared = await asyncio.gather(*(self._prepare(m) for m in batch),
                                            return_exceptions=True)
            return _Batch(batch, list(prepared), error, end)

        current = await load()
        if current.error and not current.messages:
            raise store.Invalid(current.error)  # 422 at the API
        nxt: asyncio.Task[_Batch] | None = None
        try:
            while True:
                # pipeline: the next batch is read and uploaded while this one is committed
                nxt = None if current.end else asyncio.create_task(load())
                stop = await self._commit(account, current, ensure, name, rep)
                if current.error and not rep.stopped:
                    rep.stopped = current.error
                if stop or nxt is None:
                    if nxt is not None:
                        nxt.cancel()
                        with contextlib.suppress(asyncio.CancelledError, Exception):
                            await nxt
                    break
                current = await nxt
        finally:  # the client went away, or an error: stop reading ahead
            if nxt is not None and not nxt.done():
                nxt.cancel()
        IMPORTED.labels("ok").inc(rep.imported)
        IMPORTED.labels("failed").inc(rep.failed)
        log.info("import", account=account.address, mailbox=name, format=fmt,
                 imported=rep.imported, failed=rep.failed, stopped=rep.stopped)
        return rep

    async def _commit(self, account: AccountInfo, current: _Batch,
                      ensure: Callable[[str], Awaitable[str]], name: str,
                      rep: ImportReport) -> bool:
        """Append one batch, consecutive messages of one mailbox in one transaction; on a
        refusal, one at a time so only the bad message fails (and over quota, as many as
        fit). Returns True when the import must stop (over quota)."""
        items: list[tuple[ImportedMessage, NewMessage, str]] = []
        for m, p in zip(current.messages, current.prepared, strict=True):
            if isinstance(p, BaseException):
                rep.failed += 1
                _note(rep, f"{m.source}: {type(p).__name__}: {p}")
                continue
            try:
                target = await ensure(name)
                if m.folder:  # a Maildir++ sub-folder, below the target unless INBOX
                    target = await ensure(m.folder if name == "INBOX" else f"{name}/{m.folder}")
            except StoreError as exc:
                rep.failed += 1
                _note(rep, f"{m.source}: {exc.message}")
                continue
            items.append((m, p, target))

        def record(p: NewMessage, target: str, uid: int) -> None:
            rep.imported += 1
            rep.bytes += p.blob_size
            rep.mailboxes[target] = rep.mailboxes.get(target, 0) + 1
            if target == names_main:
                rep.first_uid = rep.first_uid or uid
                rep.last_uid = uid

        names_main = await ensure(name) if items else name
        for target, grouped in itertools.groupby(items, key=lambda it: it[2]):
            group = list(grouped)
            try:
                _, uids, change = await self.repo.append_many(account.id, target,
                                                              [p for _, p, _ in group])
            except StoreError:
                pass  # retried one by one below
            else:
                for (_, p, _), uid in zip(group, uids, strict=True):
                    record(p, target, uid)
                await self.notify(change)
                continue
            for m, p, _ in group:
                try:
                    _, uid, change = await self.repo.append(account.id, target, p)
                except store.OverQuota as exc:
                    rep.failed += 1
                    rep.stopped = f"{m.source}: {exc.message}"
                    return True
                except StoreError as exc:
                    rep.failed += 1
                    _note(rep, f"{m.source}: {exc.message}")
                    continue
                record(p, target, uid)
                await self.notify(change)
        return False

    async def export_mbox(self, account_id: int, mailbox_id: int) -> AsyncIterator[bytes]:
        after = 0
        while True:
            _, states, more, _, _ = await self.repo.select(account_id, mailbox_id,
                                                           after_uid=after, limit=EXPORT_PAGE)
            if not states:
                return
            metas = await self.repo.fetch(account_id, mailbox_id,
                                          [(states[0].uid, states[-1].uid)], with_summary=False)
            for group in _by_bytes(metas, IO_BATCH_BYTES):
                bodies = await self.blobs.get_many([m.blob_key for m in group])
                for m in group:
                    yield mbox_entry(served(m.prefix, bodies[m.blob_key]), m.internaldate,
                                     m.flags)
            after = states[-1].uid
            if not more:
                return


@dataclass
class _Batch:
    messages: list[ImportedMessage]
    prepared: list[NewMessage | BaseException]
    error: str | None  # the file went bad after these messages
    end: bool


def _by_bytes(metas: list[MessageMeta], budget: int) -> Iterator[list[MessageMeta]]:
    """Consecutive groups of messages whose sizes add up to at most ``budget`` (at least
    one message each), so a page of large messages is not all in memory at once."""
    group: list[MessageMeta] = []
    used = 0
    for m in metas:
        if group and used + m.size > budget:
            yield group
            group, used = [], 0
        group.append(m)
        used += m.size
    if group:
        yield group


def _note(rep: ImportReport, err: str) -> None:
    if len(rep.errors) < 50:
        rep.errors.append(err[:500])
