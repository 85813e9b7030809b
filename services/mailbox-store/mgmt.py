"""mailbox-store's management API (mounted under /api/v1 behind the admin bearer token by
the runtime): domains, users, aliases, mailboxes, messages, import and export.

The only module of the store that raises HTTPException. Directory rules live in
directory.py, IMAP state in repository.py, archive formats in importexport.py, the import
and export work behind these routes in mailadmin.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import Iterator
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
from postbus.mailbox_store.directory import (
    AccountInfo,
    AliasInfo,
    Directory,
    DirectoryError,
    DomainInfo,
    NotFound,
)
from postbus.mailbox_store.importexport import FORMATS
from postbus.mailbox_store.mailadmin import ImportReport, MailAdmin
from postbus.mailbox_store.repository import Repository, StoreError
from postbus.proto.base import ErrorCode
from postbus.protocols.served import served

log = get_logger(__name__)

# every ErrorCode a refusal carries; internal and too_large are 500 (a bug of ours)
_STATUS: dict[ErrorCode, int] = {"not_found": 404, "exists": 409, "conflict": 409,
                                 "invalid": 422, "limit": 422, "over_quota": 507,
                                 "unavailable": 503}
# an upload is spooled to a temporary file, so memory stays bounded by one message
DEFAULT_MAX_UPLOAD = 8 * 1024 * 1024 * 1024


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
        return Response(served(m.prefix, body), media_type="message/rfc822")

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
