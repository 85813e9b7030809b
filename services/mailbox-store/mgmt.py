"""mailbox-store's management API (mounted under /api/v1 behind the admin bearer token by
the runtime): domains, users, aliases, mailboxes, messages, import and export.

The only module of the store that raises HTTPException. Directory rules live in
directory.py, IMAP state in repository.py, archive formats in importexport.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, HTTPException, Path, Query, Request, Response, status
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from postbus.kit.blob import BlobNotFound, BlobStore, BlobUnavailable
from postbus.kit.bus import Bus
from postbus.kit.logging import get_logger
from postbus.kit.metrics import counter
from postbus.mailbox_store import repository as store
from postbus.mailbox_store.directory import (
    AccountInfo,
    AliasInfo,
    Directory,
    DirectoryError,
    DomainInfo,
    NotFound,
)
from postbus.mailbox_store.importexport import (
    FORMATS,
    FormatError,
    ImportedMessage,
    mbox_entry,
    read_archive,
)
from postbus.mailbox_store.repository import Change, NewMessage, Repository, StoreError
from postbus.proto.mail import MAILBOX_CHANGED, MailboxChanged, MessageChange
from postbus.proto.store import MessageMeta
from postbus.protocols.mime import summarize

log = get_logger("postbus.mailbox_store.mgmt")

IMPORTED = counter("postbus_store_imported_messages_total", "Messages imported", ["outcome"])

_STATUS = {"not_found": 404, "exists": 409, "conflict": 409, "invalid": 422,
           "over_quota": 507}
# an upload is spooled to a temporary file, so memory stays bounded by one message
DEFAULT_MAX_UPLOAD = 8 * 1024 * 1024 * 1024
IMPORT_BATCH = 32  # messages parsed, summarized and uploaded to S3 concurrently...
IO_BATCH_BYTES = 32 * 1024 * 1024  # ...or fewer when they are large (export: read at once)
EXPORT_PAGE = 200


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Directory and repository refusals -> HTTP status with their message."""
    try:
        yield
    except (DirectoryError, StoreError) as exc:
        raise HTTPException(_STATUS.get(exc.code, 500), exc.message) from exc
    except BlobUnavailable as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"blob store: {exc}") from exc


# ---------------------------------------------------------------- request / response models
class DomainIn(BaseModel):
    name: str = Field(min_length=1, max_length=253, examples=["example.test"])
    local_part_case_sensitive: bool = False


class DomainPatch(BaseModel):
    """Only the fields given change; ``catch_all: null`` removes the catch-all."""

    catch_all: str | None = Field(default=None, description="account address of this domain")
    local_part_case_sensitive: bool | None = None


class DomainOut(BaseModel):
    name: str
    local_part_case_sensitive: bool
    catch_all: str | None
    accounts: int
    aliases: int
    created_at: datetime | None

    @classmethod
    def of(cls, d: DomainInfo) -> DomainOut:
        return cls(name=d.name, local_part_case_sensitive=d.local_part_case_sensitive,
                   catch_all=d.catch_all, accounts=d.accounts, aliases=d.aliases,
                   created_at=d.created_at)


Pop3Policy = Literal["client", "keep", "delete"]
Address = Annotated[str, Path(description="an email address, e.g. alice@example.test")]


class UserIn(BaseModel):
    address: str = Field(min_length=3, max_length=320, examples=["alice@example.test"])
    password: str = Field(min_length=1, max_length=1024)
    quota_bytes: int | None = Field(default=None, ge=0, description="null: unlimited")
    enabled: bool = True
    pop3_policy: Pop3Policy = "client"
    pop3_expire_days: int | None = Field(default=None, ge=0)


class UserPatch(BaseModel):
    """Only the fields given change; ``quota_bytes: null`` means unlimited."""

    password: str | None = Field(default=None, min_length=1, max_length=1024)
    enabled: bool | None = None
    quota_bytes: int | None = Field(default=None, ge=0)
    pop3_policy: Pop3Policy | None = None
    pop3_expire_days: int | None = Field(default=None, ge=0)


class Usage(BaseModel):
    used_bytes: int
    messages: int
    quota_bytes: int | None
    percent: float | None


class UserOut(BaseModel):
    id: int
    address: str
    domain: str
    enabled: bool
    quota_bytes: int | None
    pop3_policy: str
    pop3_expire_days: int | None
    usage: Usage
    created_at: datetime | None

    @classmethod
    def of(cls, a: AccountInfo) -> UserOut:
        pct = (round(100.0 * a.used_bytes / a.quota_bytes, 2) if a.quota_bytes else None)
        return cls(id=a.id, address=a.address, domain=a.domain, enabled=a.enabled,
                   quota_bytes=a.quota_bytes, pop3_policy=a.pop3_policy,
                   pop3_expire_days=a.pop3_expire_days, created_at=a.created_at,
                   usage=Usage(used_bytes=a.used_bytes, messages=a.message_count,
                               quota_bytes=a.quota_bytes, percent=pct))


class AliasIn(BaseModel):
    address: str = Field(min_length=3, max_length=320)
    targets: list[str] = Field(min_length=1, max_length=1000)


class AliasPatch(BaseModel):
    targets: list[str] = Field(min_length=1, max_length=1000)


class AliasOut(BaseModel):
    address: str
    targets: list[str]
    created_at: datetime | None

    @classmethod
    def of(cls, a: AliasInfo) -> AliasOut:
        return cls(address=a.address, targets=a.targets, created_at=a.created_at)


class MailboxIn(BaseModel):
    name: str = Field(min_length=1, max_length=1024)
    special_use: str | None = None


class MailboxOut(BaseModel):
    name: str
    special_use: str | None
    subscribed: bool
    messages: int
    unseen: int
    size: int
    uidvalidity: int
    uidnext: int


class MessageOut(BaseModel):
    uid: int
    flags: list[str]
    size: int
    internaldate: datetime
    subject: str = ""
    from_: str = Field(default="", serialization_alias="from")
    to: str = ""
    date: datetime | None = None
    message_id: str = ""
    blob_key: str = ""


class MessagePage(BaseModel):
    mailbox: str
    messages: list[MessageOut]
    next_after_uid: int | None = Field(description="pass as after_uid for the next page")


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
        """Tell IMAP sessions (IDLE) what changed; best effort, after the commit."""
        if change is None or self.bus is None:
            return
        ev = MailboxChanged(
            account_id=change.account_id, mailbox_id=change.mailbox_id, mailbox=change.mailbox,
            uidvalidity=change.uidvalidity, uidnext=change.uidnext,
            highestmodseq=change.highestmodseq, exists=change.exists,
            added=[MessageChange(uid=m.uid, modseq=m.modseq, flags=m.flags) for m in change.added],
            flags=[MessageChange(uid=m.uid, modseq=m.modseq, flags=m.flags) for m in change.flags],
            expunged=change.expunged, origin="mgmt")
        await self.bus.publish_core(MAILBOX_CHANGED, ev, account_id=str(change.account_id))

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
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, current.error)
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
                    yield mbox_entry(m.prefix + bodies[m.blob_key], m.internaldate, m.flags)
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


async def _spool(request: Request, limit: int) -> str:
    """Write the request body to a temporary file (bounded memory); return its path."""
    fd, path = tempfile.mkstemp(prefix="postbus-import-")
    size = 0
    try:
        with os.fdopen(fd, "wb") as f:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE,
                                        f"upload larger than {limit} bytes")
                await asyncio.to_thread(f.write, chunk)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    if size == 0:
        os.unlink(path)
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "empty upload")
    return path


# ---------------------------------------------------------------- the router
def router(sessionmaker: async_sessionmaker[AsyncSession], blobs: BlobStore, bus: Bus | None,
           repo: Repository, *, directory: Directory | None = None,
           max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
           max_message_bytes: int = 64 * 1024 * 1024) -> APIRouter:
    """The management routes. ``directory``: share the one serve_directory returned (same
    password hasher); otherwise one is built on ``sessionmaker``."""
    d = directory or Directory(sessionmaker, repo=repo)
    if d.repo is None:
        d.repo = repo
    admin = MailAdmin(d, repo, blobs, bus)
    r = APIRouter()

    # ------------------------------------------------------------ domains
    @r.post("/domains", status_code=201, response_model=DomainOut, tags=["domains"],
            responses={409: {"description": "exists"}, 422: {"description": "invalid name"}})
    async def create_domain(body: DomainIn) -> DomainOut:
        """Add a domain this server receives mail for."""
        with _errors():
            return DomainOut.of(await d.create_domain(
                body.name, local_part_case_sensitive=body.local_part_case_sensitive))

    @r.get("/domains", response_model=list[DomainOut], tags=["domains"])
    async def list_domains() -> list[DomainOut]:
        with _errors():
            return [DomainOut.of(x) for x in await d.list_domains()]

    @r.get("/domains/{name}", response_model=DomainOut, tags=["domains"])
    async def get_domain(name: str) -> DomainOut:
        with _errors():
            return DomainOut.of(await d.get_domain(name))

    @r.patch("/domains/{name}", response_model=DomainOut, tags=["domains"])
    async def patch_domain(name: str, body: DomainPatch) -> DomainOut:
        """Set or clear the catch-all account; change the local-part case policy."""
        kw: dict[str, Any] = {}
        if "catch_all" in body.model_fields_set:
            kw["catch_all"] = body.catch_all
        if body.local_part_case_sensitive is not None:
            kw["local_part_case_sensitive"] = body.local_part_case_sensitive
        with _errors():
            return DomainOut.of(await d.update_domain(name, **kw))

    @r.delete("/domains/{name}", status_code=204, tags=["domains"],
              responses={409: {"description": "has accounts or aliases (use force=true)"}})
    async def delete_domain(name: str, force: bool = False) -> Response:
        """Delete a domain; ``force=true`` also deletes its accounts (with their mail)
        and aliases."""
        with _errors():
            await d.delete_domain(name, force=force)
        return Response(status_code=204)

    # ------------------------------------------------------------ users
    @r.post("/users", status_code=201, response_model=UserOut, tags=["users"],
            responses={409: {"description": "exists"},
                       422: {"description": "invalid, or the domain does not exist"}})
    async def create_user(body: UserIn) -> UserOut:
        """Create an account with INBOX and the special-use folders."""
        with _errors():
            try:
                a = await d.create_account(body.address, body.password,
                                           quota_bytes=body.quota_bytes, enabled=body.enabled,
                                           pop3_policy=body.pop3_policy,
                                           pop3_expire_days=body.pop3_expire_days)
            except NotFound as exc:  # the domain: a problem of the request body, not the URL
                raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, exc.message) from exc
            return UserOut.of(a)

    @r.get("/users", response_model=list[UserOut], tags=["users"])
    async def list_users(domain: str | None = None, offset: Annotated[int, Query(ge=0)] = 0,
                         limit: Annotated[int, Query(ge=1, le=10000)] = 1000) -> list[UserOut]:
        with _errors():
            return [UserOut.of(a) for a in await d.list_accounts(domain, offset=offset,
                                                                 limit=limit)]

    @r.get("/users/{address}", response_model=UserOut, tags=["users"])
    async def get_user(address: Address) -> UserOut:
        """One account with its usage (bytes, messages, quota)."""
        with _errors():
            return UserOut.of(await d.get_account(address))

    @r.patch("/users/{address}", response_model=UserOut, tags=["users"])
    async def patch_user(address: Address, body: UserPatch) -> UserOut:
        """Change password, enabled, quota, POP3 policy; only the fields given."""
        kw: dict[str, Any] = {}
        for f in ("password", "enabled", "pop3_policy"):
            if getattr(body, f) is not None:
                kw[f] = getattr(body, f)
        for f in ("quota_bytes", "pop3_expire_days"):
            if f in body.model_fields_set:
                kw[f] = getattr(body, f)
        with _errors():
            return UserOut.of(await d.update_account(address, **kw))

    @r.delete("/users/{address}", status_code=204, tags=["users"])
    async def delete_user(address: Address) -> Response:
        """Delete an account and all its mail (blobs are collected after the grace period)."""
        with _errors():
            await d.delete_account(address)
        return Response(status_code=204)

    # ------------------------------------------------------------ aliases
    @r.post("/aliases", status_code=201, response_model=AliasOut, tags=["aliases"],
            responses={409: {"description": "exists"}, 422: {"description": "invalid"}})
    async def create_alias(body: AliasIn) -> AliasOut:
        """An address that delivers to one or more accounts (and may be sent as by them)."""
        with _errors():
            try:
                return AliasOut.of(await d.create_alias(body.address, body.targets))
            except NotFound as exc:
                raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, exc.message) from exc

    @r.get("/aliases", response_model=list[AliasOut], tags=["aliases"])
    async def list_aliases(domain: str | None = None) -> list[AliasOut]:
        with _errors():
            return [AliasOut.of(a) for a in await d.list_aliases(domain)]

    @r.get("/aliases/{address}", response_model=AliasOut, tags=["aliases"])
    async def get_alias(address: Address) -> AliasOut:
        with _errors():
            return AliasOut.of(await d.get_alias(address))

    @r.patch("/aliases/{address}", response_model=AliasOut, tags=["aliases"])
    async def patch_alias(address: Address, body: AliasPatch) -> AliasOut:
        with _errors():
            return AliasOut.of(await d.set_alias_targets(address, body.targets))

    @r.delete("/aliases/{address}", status_code=204, tags=["aliases"])
    async def delete_alias(address: Address) -> Response:
        with _errors():
            await d.delete_alias(address)
        return Response(status_code=204)

    # ------------------------------------------------------------ mailboxes
    def _mbox_out(i: Any) -> MailboxOut:
        return MailboxOut(name=i.name, special_use=i.special_use, subscribed=i.subscribed,
                          messages=i.messages, unseen=i.unseen, size=i.size,
                          uidvalidity=i.uidvalidity, uidnext=i.uidnext)

    @r.get("/users/{address}/mailboxes", response_model=list[MailboxOut], tags=["mail"])
    async def list_mailboxes(address: Address) -> list[MailboxOut]:
        """Every mailbox with its message count, unseen count and size."""
        with _errors():
            a = await d.get_account(address)
            return [_mbox_out(i) for i in await repo.list_mailboxes(a.id)
                    if "\\Noselect" not in i.attributes]

    @r.post("/users/{address}/mailboxes", status_code=201, response_model=MailboxOut,
            tags=["mail"])
    async def create_mailbox(address: Address, body: MailboxIn) -> MailboxOut:
        with _errors():
            a = await d.get_account(address)
            return _mbox_out(await repo.create_mailbox(a.id, body.name, body.special_use))

    # ------------------------------------------------------------ messages
    @r.get("/users/{address}/mailboxes/{name:path}/messages", response_model=MessagePage,
           response_model_by_alias=True, tags=["mail"])
    async def list_messages(address: Address, name: str,
                            after_uid: Annotated[int, Query(ge=0)] = 0,
                            limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> MessagePage:
        """Messages in UID order, ``limit`` at a time after ``after_uid``."""
        with _errors():
            a = await d.get_account(address)
            mid, canon = await admin.mailbox_id(a.id, name)
            _, states, more, _, _ = await repo.select(a.id, mid, after_uid=after_uid, limit=limit)
            metas = (await repo.fetch(a.id, mid, [(states[0].uid, states[-1].uid)])
                     if states else [])
        out = []
        for m in metas:
            s = m.summary
            out.append(MessageOut(uid=m.uid, flags=m.flags, size=m.size,
                                  internaldate=m.internaldate, blob_key=m.blob_key,
                                  subject=s.subject if s else "", from_=s.from_ if s else "",
                                  to=s.to if s else "", date=s.date if s else None,
                                  message_id=s.message_id if s else ""))
        return MessagePage(mailbox=canon, messages=out,
                           next_after_uid=states[-1].uid if more and states else None)

    async def _meta(address: str, name: str, uid: int) -> tuple[AccountInfo, int, Any]:
        a = await d.get_account(address)
        mid, _ = await admin.mailbox_id(a.id, name)
        metas = await repo.fetch(a.id, mid, [(uid, uid)])
        if not metas:
            raise HTTPException(404, f"no message with UID {uid} in {name}")
        return a, mid, metas[0]

    @r.get("/users/{address}/mailboxes/{name:path}/messages/{uid}", response_model=MessageOut,
           response_model_by_alias=True, tags=["mail"])
    async def get_message(address: Address, name: str, uid: int) -> MessageOut:
        with _errors():
            _, _, m = await _meta(address, name, uid)
        s = m.summary
        return MessageOut(uid=m.uid, flags=m.flags, size=m.size, internaldate=m.internaldate,
                          blob_key=m.blob_key, subject=s.subject if s else "",
                          from_=s.from_ if s else "", to=s.to if s else "",
                          date=s.date if s else None, message_id=s.message_id if s else "")

    @r.get("/users/{address}/mailboxes/{name:path}/messages/{uid}/raw", tags=["mail"],
           response_class=Response,
           responses={200: {"content": {"message/rfc822": {}}}})
    async def get_raw(address: Address, name: str, uid: int) -> Response:
        """The message as IMAP serves it: per-recipient prefix + the shared blob."""
        with _errors():
            _, _, m = await _meta(address, name, uid)
            try:
                body = await blobs.get(m.blob_key)
            except BlobNotFound as exc:
                raise HTTPException(status.HTTP_502_BAD_GATEWAY,
                                    f"blob {m.blob_key} missing from S3") from exc
        return Response(m.prefix + body, media_type="message/rfc822")

    @r.delete("/users/{address}/mailboxes/{name:path}/messages/{uid}", status_code=204,
              tags=["mail"])
    async def delete_message(address: Address, name: str, uid: int) -> Response:
        """Remove one message at once (expunged; IMAP sessions are told)."""
        with _errors():
            a, mid, _ = await _meta(address, name, uid)
            _, _, ch = await repo.store_flags(a.id, mid, [(uid, uid)], "add", ["\\Deleted"])
            await admin.notify(ch)
            _, _, ch, _ = await repo.expunge(a.id, mid, [(uid, uid)])
            await admin.notify(ch)
        return Response(status_code=204)

    # ------------------------------------------------------------ import / export
    @r.post("/users/{address}/import", response_model=ImportReport, tags=["import/export"],
            openapi_extra={"requestBody": {"required": True, "content": {
                "application/mbox": {"schema": {"type": "string", "format": "binary"}},
                "application/x-tar": {"schema": {"type": "string", "format": "binary"}},
                "application/zip": {"schema": {"type": "string", "format": "binary"}},
                "message/rfc822": {"schema": {"type": "string", "format": "binary"}}}}},
            responses={413: {"description": "upload too large"},
                       422: {"description": "not in the announced format"}})
    async def import_mail(address: Address, request: Request,
                          format: Literal["mbox", "maildir", "eml"] = "mbox",
                          mailbox: str = "INBOX") -> ImportReport:
        """Import the request body: an mbox file, a Maildir as tar/zip of cur/ and new/,
        or one .eml message. Flags come from Status/X-Status (mbox) or the ``:2,`` suffix
        (Maildir). The mailbox is created when missing."""
        assert format in FORMATS
        with _errors():
            a = await d.get_account(address)
        path = await _spool(request, max_upload_bytes)
        try:
            with _errors():
                return await admin.import_file(a, mailbox, format, path,
                                               max_message=max_message_bytes)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)

    @r.get("/users/{address}/export", tags=["import/export"], response_class=StreamingResponse,
           responses={200: {"content": {"application/mbox": {}}}})
    async def export_mail(address: Address, mailbox: str = "INBOX") -> StreamingResponse:
        """One mailbox as an mboxrd file (streamed; flags as Status/X-Status)."""
        with _errors():
            a = await d.get_account(address)
            mid, canon = await admin.mailbox_id(a.id, mailbox)
        fname = quote(f"{a.address}-{canon.replace('/', '_')}.mbox")
        return StreamingResponse(admin.export_mbox(a.id, mid), media_type="application/mbox",
                                 headers={"Content-Disposition":
                                          f"attachment; filename*=UTF-8''{fname}"})

    # registered last: its {name:path} would otherwise swallow .../messages/{uid}
    @r.delete("/users/{address}/mailboxes/{name:path}", status_code=204, tags=["mail"])
    async def delete_mailbox(address: Address, name: str) -> Response:
        """Delete a mailbox and its messages (INBOX cannot be deleted)."""
        with _errors():
            a = await d.get_account(address)
            await admin.notify(await repo.delete_mailbox(a.id, name))
        return Response(status_code=204)

    return r
