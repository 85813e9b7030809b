"""Ports over the platform: the store over NATS request/reply (``postbus.proto.store``; the
directory is the kit's DirectoryClient, with ``store_error`` for its errors), bodies from
S3 through the kit's BlobStore (with its LRU), mailbox changes from core NATS."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel

from postbus.imap_access.ports import StoreError, Unsubscribe
from postbus.kit.blob import BlobNotFound, BlobStore, BlobUnavailable
from postbus.kit.bus import Bus, BusUnavailable, RemoteError, raising
from postbus.kit.logging import get_logger
from postbus.kit.metrics import counter, gauge
from postbus.proto.base import Rpc
from postbus.proto.mail import MAILBOX_CHANGED, MailboxChanged
from postbus.proto.store import (
    STORE_APPEND,
    STORE_COPY,
    STORE_EXPUNGE,
    STORE_FETCH,
    STORE_FLAGS,
    STORE_MAILBOX_CREATE,
    STORE_MAILBOX_DELETE,
    STORE_MAILBOX_LIST,
    STORE_MAILBOX_RENAME,
    STORE_MAILBOX_STATUS,
    STORE_MAILBOX_SUBSCRIBE,
    STORE_QUOTA,
    STORE_SEARCH,
    STORE_SELECT,
    AppendReply,
    AppendRequest,
    CopyReply,
    CopyRequest,
    ExpungeReply,
    ExpungeRequest,
    FetchReply,
    FetchRequest,
    MailboxCreateRequest,
    MailboxInfo,
    MailboxListReply,
    MailboxListRequest,
    MailboxRef,
    MailboxRenameRequest,
    QuotaReply,
    QuotaRequest,
    SearchReply,
    SearchRequest,
    SelectReply,
    SelectRequest,
    StoreFlagsReply,
    StoreFlagsRequest,
    SubscribeRequest,
)

log = get_logger(__name__)
BLOB_CACHE = counter("postbus_imap_blob_cache_total", "Message body lookups by imap-access",
                     ["result"])
BLOB_HIT_RATIO = gauge("postbus_imap_blob_cache_hit_ratio",
                       "Share of message body lookups served from the in-memory cache")

Req = TypeVar("Req", bound=BaseModel)
Rep = TypeVar("Rep", bound=BaseModel)


def store_error(exc: BusUnavailable | RemoteError) -> StoreError:
    """A bus error as the ports' StoreError (the kit's DirectoryClient takes this as
    ``errors``): the responder's code, or ``unavailable`` when nobody answered."""
    if isinstance(exc, RemoteError):
        return StoreError(exc.code, exc.message)
    return StoreError("unavailable", str(exc))


async def _call(bus: Bus, rpc: Rpc[Req, Rep], req: Req) -> Rep:
    with raising(store_error):
        return await bus.request(rpc, req)


class BusStore:
    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    async def mailbox_list(self, req: MailboxListRequest) -> MailboxListReply:
        return await _call(self.bus, STORE_MAILBOX_LIST, req)

    async def mailbox_status(self, req: MailboxRef) -> MailboxInfo:
        return await _call(self.bus, STORE_MAILBOX_STATUS, req)

    async def mailbox_create(self, req: MailboxCreateRequest) -> MailboxInfo:
        return await _call(self.bus, STORE_MAILBOX_CREATE, req)

    async def mailbox_delete(self, req: MailboxRef) -> None:
        await _call(self.bus, STORE_MAILBOX_DELETE, req)

    async def mailbox_rename(self, req: MailboxRenameRequest) -> None:
        await _call(self.bus, STORE_MAILBOX_RENAME, req)

    async def mailbox_subscribe(self, req: SubscribeRequest) -> None:
        await _call(self.bus, STORE_MAILBOX_SUBSCRIBE, req)

    async def select(self, req: SelectRequest) -> SelectReply:
        return await _call(self.bus, STORE_SELECT, req)

    async def fetch(self, req: FetchRequest) -> FetchReply:
        return await _call(self.bus, STORE_FETCH, req)

    async def flags(self, req: StoreFlagsRequest) -> StoreFlagsReply:
        return await _call(self.bus, STORE_FLAGS, req)

    async def copy(self, req: CopyRequest) -> CopyReply:
        return await _call(self.bus, STORE_COPY, req)

    async def append(self, req: AppendRequest) -> AppendReply:
        return await _call(self.bus, STORE_APPEND, req)

    async def expunge(self, req: ExpungeRequest) -> ExpungeReply:
        return await _call(self.bus, STORE_EXPUNGE, req)

    async def search(self, req: SearchRequest) -> SearchReply:
        return await _call(self.bus, STORE_SEARCH, req)

    async def quota(self, req: QuotaRequest) -> QuotaReply:
        return await _call(self.bus, STORE_QUOTA, req)


class S3Blobs:
    """Bodies from S3 through the kit's BlobStore and its in-memory LRU."""

    def __init__(self, blobs: BlobStore) -> None:
        self.blobs = blobs
        self.hits = 0
        self.misses = 0
        BLOB_HIT_RATIO.set_function(lambda: self.hit_rate or 0.0)

    async def get_many(self, keys: list[str]) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        missing: list[str] = []
        for k in dict.fromkeys(keys):
            v = self.blobs.cache.get(k)
            if v is None:
                missing.append(k)
            else:
                out[k] = v
        self.hits += len(out)
        self.misses += len(missing)
        if out:
            BLOB_CACHE.labels("hit").inc(len(out))
        if missing:
            BLOB_CACHE.labels("miss").inc(len(missing))
            try:  # the small ones, from the store in one request (ADR 0014)
                out |= await self.blobs.get_inline(missing)
            except BlobUnavailable as exc:
                log.warning("inline bodies unavailable", error=str(exc))
            missing = [k for k in missing if k not in out]
            got = await asyncio.gather(*(self.blobs.get_s3(k) for k in missing),
                                       return_exceptions=True)
            for k, res in zip(missing, got, strict=True):
                if isinstance(res, bytes):
                    out[k] = res
                elif isinstance(res, BlobNotFound | BlobUnavailable):
                    # the session answers NO [UNAVAILABLE] for these, the rest is served
                    log.warning("blob fetch failed", key=k, error=str(res))
                else:
                    raise res
        return out

    async def put(self, data: bytes) -> str:
        try:
            return await self.blobs.put(data)
        except BlobUnavailable as exc:
            raise StoreError("unavailable", str(exc)) from exc

    @property
    def hit_rate(self) -> float | None:
        total = self.hits + self.misses
        return self.hits / total if total else None


class BusChanges:
    """One core-NATS subscription per account, shared by all its sessions."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._subs: dict[int, tuple[Any, list[Callable[[MailboxChanged], None]]]] = {}

    async def subscribe(self, account_id: int,
                        callback: Callable[[MailboxChanged], None]) -> Unsubscribe:
        entry = self._subs.get(account_id)
        if entry is None:
            callbacks: list[Callable[[MailboxChanged], None]] = []

            async def on_change(ev: MailboxChanged) -> None:
                for cb in list(callbacks):
                    cb(ev)

            callbacks.append(callback)
            self._subs[account_id] = (None, callbacks)
            sub = await self.bus.subscribe_core(MAILBOX_CHANGED, on_change,
                                                account_id=str(account_id))
            self._subs[account_id] = (sub, callbacks)
        else:
            entry[1].append(callback)

        async def unsubscribe() -> None:
            e = self._subs.get(account_id)
            if e is None:
                return
            if callback in e[1]:
                e[1].remove(callback)
            if not e[1]:
                del self._subs[account_id]
                if e[0] is not None:
                    await e[0].unsubscribe()

        return unsubscribe
