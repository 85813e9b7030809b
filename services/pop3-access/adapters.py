"""The POP3 ports over the platform: the maildrop over kit Bus.request (the directory is the
kit's DirectoryClient, with ``unavailable`` for its errors), bodies from S3 through kit
BlobStore (LRU cached, fetched ahead concurrently), the maildrop lock and the login
throttle in JetStream KV buckets with expiry (so every replica sees them)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Sequence

from postbus.kit.blob import BlobNotFound, BlobStore, BlobUnavailable
from postbus.kit.bus import Bus, BusUnavailable, KvBucket, RemoteError, raising
from postbus.kit.counter_keys import account_key, ip_key
from postbus.kit.counters import KvCounters
from postbus.kit.logging import get_logger
from postbus.pop3_access.ports import Unavailable
from postbus.proto.store import (
    STORE_POP3_COMMIT,
    STORE_POP3_MAILDROP,
    Pop3CommitRequest,
    Pop3MaildropReply,
    Pop3MaildropRequest,
    Pop3Message,
)

log = get_logger(__name__)


def unavailable(exc: BusUnavailable | RemoteError) -> Unavailable:
    """A bus error as the ports' Unavailable (the kit's clients take this as ``errors``)."""
    return Unavailable(str(exc))


class StoreMaildrops:
    """Maildrop RPCs to mailbox-store; bodies straight from S3.

    Concurrent reads of one blob share a single GET; ``prefetch`` starts GETs for the
    messages a client will most likely RETR next, bounded by ``max_inflight``.
    """

    def __init__(self, bus: Bus, blobs: BlobStore, *, timeout_s: float = 15.0,
                 max_inflight: int = 64, page: int = 1000, commit_uids: int = 20_000) -> None:
        self.bus = bus
        self.blobs = blobs
        self.timeout_s = timeout_s
        self.page = page  # maildrop messages asked per request (the store may send fewer)
        self.commit_uids = commit_uids  # UIDs per list in one commit request
        self._inflight: dict[str, asyncio.Task[bytes]] = {}
        self._sem = asyncio.Semaphore(max_inflight)

    async def open(self, account_id: int) -> Pop3MaildropReply:
        """The maildrop read page by page in UID order; UIDs only grow, so the pages make
        one list that stays fixed for the session (RFC 1939 §5)."""
        for _attempt in range(3):
            first: Pop3MaildropReply | None = None
            after = 0
            while True:
                with raising(unavailable):
                    page = await self.bus.request(STORE_POP3_MAILDROP, Pop3MaildropRequest(
                        account_id=account_id, after_uid=after, limit=self.page),
                        timeout=self.timeout_s)
                if first is None:
                    first = page
                elif (page.mailbox_id, page.uidvalidity) != (first.mailbox_id, first.uidvalidity):
                    break  # the INBOX was replaced meanwhile: read it again
                else:
                    first.messages += page.messages
                if not page.more or not page.messages or page.messages[-1].uid <= after:
                    first.more = False
                    return first
                after = page.messages[-1].uid
        raise Unavailable("the maildrop kept changing while it was read")

    async def commit(self, request: Pop3CommitRequest) -> None:
        """One request, or several when it names too many UIDs for one NATS message (a
        failure halfway leaves the rest for a later session, RFC 1939 §6)."""
        with raising(unavailable):
            for part in commit_parts(request, self.commit_uids):
                await self.bus.request(STORE_POP3_COMMIT, part, timeout=self.timeout_s)

    def _fetch(self, key: str) -> asyncio.Task[bytes]:
        task = self._inflight.get(key)
        if task is None:
            async def get() -> bytes:
                async with self._sem:
                    return await self.blobs.get(key)

            def forget(_: asyncio.Task[bytes]) -> None:
                self._inflight.pop(key, None)

            task = asyncio.create_task(get(), name=f"blob:{key[-12:]}")
            self._inflight[key] = task
            task.add_done_callback(forget)
        return task

    async def blob(self, message: Pop3Message) -> bytes:
        cached = self.blobs.cache.get(message.blob_key)
        if cached is not None:
            return cached
        try:
            return await asyncio.shield(self._fetch(message.blob_key))
        except (BlobNotFound, BlobUnavailable) as exc:
            raise Unavailable(f"{message.blob_key}: {exc}") from exc

    def prefetch(self, messages: Sequence[Pop3Message]) -> None:
        for m in messages:
            if m.blob_key in self._inflight or self.blobs.cache.get(m.blob_key) is not None:
                continue
            # a failed prefetch is retried by blob(); only mark its exception as retrieved
            self._fetch(m.blob_key).add_done_callback(_retrieve_exception)


def commit_parts(request: Pop3CommitRequest, max_uids: int) -> list[Pop3CommitRequest]:
    """``request`` split by UID into parts of at most ``max_uids`` UIDs per list."""
    if len(request.delete_uids) <= max_uids and len(request.seen_uids) <= max_uids:
        return [request]
    dels, seen = set(request.delete_uids), set(request.seen_uids)
    uids = sorted(dels | seen)
    return [request.model_copy(update={"delete_uids": [u for u in part if u in dels],
                                       "seen_uids": [u for u in part if u in seen]})
            for part in (uids[i:i + max_uids] for i in range(0, len(uids), max_uids))]


def _retrieve_exception(t: asyncio.Task[bytes]) -> None:
    if not t.cancelled():
        t.exception()


def _account_key(account_id: int) -> str:
    return f"account-{account_id}"


class KvLease:
    def __init__(self, bucket: KvBucket, key: str, value: bytes, revision: int,
                 ttl_s: float) -> None:
        self.bucket = bucket
        self.key = key
        self.value = value
        self.revision = revision
        self._lost = False
        self._task = asyncio.create_task(self._refresh(ttl_s / 3), name=f"lock:{key}")

    @property
    def lost(self) -> bool:
        return self._lost

    async def _refresh(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            try:
                rev = await self.bucket.update(self.key, self.value, self.revision)
            except BusUnavailable as exc:
                log.warning("lock refresh failed; retrying", key=self.key, error=str(exc))
                continue
            if rev is None:
                self._lost = True
                log.warning("maildrop lock lost", key=self.key)
                return
            self.revision = rev

    async def release(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        if self._lost:
            return
        self._lost = True
        with raising(unavailable):
            if await self.bucket.delete(self.key, last=self.revision):
                return
            # a refresh cancelled while its update was on the wire may have moved the
            # revision on without our knowing: the lock is still ours if it holds our value
            # (holder and time make it unique), else another session has it
            entry = await self.bucket.get(self.key)
            if entry is not None and entry.value == self.value:
                await self.bucket.delete(self.key, last=entry.revision)


class KvLocks:
    """One POP3 session per maildrop across every replica: ``create`` succeeds only when the
    key is absent; the bucket's max age expires the lock of a replica that died."""

    def __init__(self, bucket: KvBucket, *, ttl_s: float, replica: str) -> None:
        self.bucket = bucket
        self.ttl_s = ttl_s
        self.replica = replica

    async def acquire(self, account_id: int, holder: str) -> KvLease | None:
        key = _account_key(account_id)
        value = json.dumps({"replica": self.replica, "session": holder,
                            "since": time.time()}).encode()
        with raising(unavailable):
            rev = await self.bucket.create(key, value)
        if rev is None:
            return None
        return KvLease(self.bucket, key, value, rev, self.ttl_s)

    async def holders(self) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        for e in await self.bucket.entries():
            try:
                info = json.loads(e.value)
            except ValueError:
                info = {}
            out.append({"key": e.key, **info})
        return out


class KvThrottle:
    """Failed-login counters per client IP and per account name (kit.counters, keys spelt
    by kit.counter_keys as smtp-ingress's) in a KV bucket whose max age is the counting window;
    LOGIN-DELAY as one unit per account in a bucket whose max age is the delay."""

    def __init__(self, failures: KvBucket, login_delay: KvBucket | None) -> None:
        self.counters = KvCounters(failures, errors=unavailable)
        self.login_delay = (KvCounters(login_delay, errors=unavailable)
                            if login_delay is not None else None)

    async def failures(self, client_ip: str, username: str) -> tuple[int, int]:
        return (await self.counters.get(ip_key(client_ip)),
                await self.counters.get(account_key(username)))

    async def record_failure(self, client_ip: str, username: str) -> None:
        await self.counters.incr(ip_key(client_ip))
        await self.counters.incr(account_key(username))

    async def record_success(self, client_ip: str, username: str) -> None:
        key = account_key(username)
        if await self.counters.get(key):  # a read, not a delete marker, per good login
            await self.counters.reset(key)

    async def login_allowed(self, account_id: int) -> bool:
        if self.login_delay is None:
            return True
        return await self.login_delay.incr_below(_account_key(account_id), 1) is not None
