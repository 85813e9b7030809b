"""Content-addressed blob store on S3 with an in-memory LRU.

The only module that talks to S3: obstore (Rust's object_store, async, no Python threads)
for every object operation; boto3 only to create the bucket at start-up. Keys are
``blobs/<sha256>``: immutable, so the cache never needs invalidation (ARCHITECTURE.md
"Storage"). boto3 through a thread pool cost 2.3 ms of CPU per 4 KB PUT or GET and held
the GIL against the event loop; obstore 0.5 ms (ADR 0006).

Small bodies (at most ``inline_body_max``) are not in S3 but in the store's blob rows
(ADR 0014): a reader that may meet them sets ``inline`` to where they are (the store's SQL
in mailbox-store, ``store.bodies.v1`` elsewhere), and ``get``/``get_many`` look there
after the cache and before S3. A key found in S3 once is remembered, so a large body costs
no second lookup.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, BinaryIO, Protocol, TypeVar

import obstore
from obstore.store import S3Store

from postbus.kit.bus import Bus, BusUnavailable, RemoteError
from postbus.kit.metrics import counter, histogram
from postbus.kit.settings import CommonSettings
from postbus.proto.store import BODIES_MAX_KEYS, STORE_BODIES, BodiesRequest

BLOB_PREFIX = "blobs/"
PART_SIZE = 5 * 1024 * 1024  # S3's smallest multipart part (all but the last)
READ_SIZE = 1024 * 1024  # what put_file reads from its file, and verify from S3, at a time
IN_S3_KEYS = 16384  # keys remembered as in S3 (not inline): about 1.5 MB
CACHE = counter("postbus_blob_cache_total", "Blob cache lookups", ["result"])
S3_LATENCY = histogram("postbus_s3_seconds", "S3 call latency", ["op"])
T = TypeVar("T")


class BlobUnavailable(Exception):
    """S3 did not answer or refused; nothing was written."""


class BlobNotFound(KeyError):
    pass


def blob_key(data: bytes) -> str:
    return BLOB_PREFIX + hashlib.sha256(data).hexdigest()


class InlineBodies(Protocol):
    """Where small bodies are kept instead of S3 (ADR 0014). Returns those of ``keys`` it
    holds; raises BlobUnavailable when it cannot answer."""

    async def inline_bodies(self, keys: Sequence[str]) -> dict[str, bytes]: ...


@dataclass(frozen=True)
class BlobInfo:
    key: str
    size: int
    last_modified: datetime


class LRU:
    """A byte-budgeted LRU of immutable blobs."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.used = 0
        self._d: OrderedDict[str, bytes] = OrderedDict()

    def get(self, key: str) -> bytes | None:
        v = self._d.get(key)
        if v is not None:
            self._d.move_to_end(key)
        return v

    def put(self, key: str, value: bytes) -> None:
        if len(value) > self.max_bytes // 4 or key in self._d:
            return
        self._d[key] = value
        self.used += len(value)
        while self.used > self.max_bytes and self._d:
            _, old = self._d.popitem(last=False)
            self.used -= len(old)

    def discard(self, key: str) -> None:
        v = self._d.pop(key, None)
        if v is not None:
            self.used -= len(v)


class BlobStore:
    def __init__(self, settings: CommonSettings, *, threads: int = 32) -> None:
        """``threads``: how many S3 requests may be under way at once."""
        self.bucket = settings.s3_bucket
        self.settings = settings
        self._store = S3Store(
            settings.s3_bucket,
            config={"endpoint": settings.s3_endpoint,
                    "access_key_id": settings.s3_access_key,
                    "secret_access_key": settings.s3_secret_key,
                    "region": settings.s3_region,
                    "virtual_hosted_style_request": False},
            client_options={"allow_http": settings.s3_endpoint.startswith("http://"),
                            "connect_timeout": timedelta(seconds=3),
                            "timeout": timedelta(seconds=30)},
            retry_config={"max_retries": 3, "retry_timeout": timedelta(seconds=20),
                          "backoff": {"init_backoff": timedelta(milliseconds=100),
                                      "max_backoff": timedelta(seconds=2), "base": 2}},
        )
        self._limit = asyncio.Semaphore(threads)
        self.cache = LRU(settings.blob_cache_mb * 1024 * 1024)
        self.verify_after_write = settings.blob_verify_after_write
        self.inline: InlineBodies | None = None  # set by the services that may meet them
        self._in_s3: OrderedDict[str, None] = OrderedDict()  # keys S3 answered, bounded

    async def _call(self, op: str, key: str, aw: Awaitable[T]) -> T:
        async with self._limit:
            with S3_LATENCY.labels(op).time():
                try:
                    return await aw
                except FileNotFoundError as exc:
                    raise BlobNotFound(key) from exc
                except Exception as exc:  # obstore's errors: connection, 4xx/5xx, timeouts
                    raise BlobUnavailable(f"{op}: {type(exc).__name__}: {exc}"[:300]) from exc

    async def close(self) -> None:
        return None

    async def ensure_bucket(self) -> None:
        """Create the bucket when it is missing (at start-up; obstore cannot create one)."""
        try:
            await self.check()
            return
        except BlobUnavailable:
            pass
        await asyncio.to_thread(_create_bucket, self.settings)
        await self.check()

    async def check(self) -> None:
        """Readiness: the bucket answers (a list of at most one key)."""
        async def probe() -> None:
            stream = obstore.list(self._store, BLOB_PREFIX, chunk_size=1)
            async for _batch in stream:
                break

        await self._call("list", "", probe())

    async def _read(self, key: str) -> bytes:
        async def read() -> bytes:
            got = await obstore.get_async(self._store, key)
            return bytes(await got.bytes_async())

        return await self._call("get", key, read())

    async def put(self, data: bytes, *, verify: bool | None = None, cache: bool = True) -> str:
        """Store ``data`` under its content hash (idempotent) and return the key.
        ``verify`` (default: the ``blob_verify_after_write`` setting) reads it back first;
        ``cache=False`` for a writer that will not read it back (the LRU would hold it)."""
        key = blob_key(data)
        await self._call("put", key, obstore.put_async(self._store, key, data))
        await self._verify(key, verify)
        if cache:
            self.cache.put(key, data)
        return key

    async def put_file(self, file: BinaryIO, *, head: bytes = b"",
                       verify: bool | None = None) -> str:
        """Store ``head`` followed by the rest of ``file`` (from its position) under their
        content hash, as ``put`` does, without holding them in memory: hashed in a thread,
        then uploaded from the file in parts of ``PART_SIZE``, two at a time (one PUT when
        they fit in one part). For message bodies spooled to disk; never cached."""
        start = file.tell()
        digest, size = await asyncio.to_thread(_hash_file, file, head)
        key = BLOB_PREFIX + digest
        file.seek(start)

        def parts() -> Iterator[bytes]:
            yield head
            while chunk := file.read(READ_SIZE):
                yield chunk

        await self._call("put", key, obstore.put_async(
            self._store, key, parts(), use_multipart=size > PART_SIZE, chunk_size=PART_SIZE,
            max_concurrency=2))
        await self._verify(key, verify)
        return key

    async def _verify(self, key: str, verify: bool | None) -> None:
        """Read a blob just written back, streamed, and check its hash."""
        if not (self.verify_after_write if verify is None else verify):
            return

        async def digest() -> str:
            got = await obstore.get_async(self._store, key)
            h = hashlib.sha256()
            async for chunk in got.stream(min_chunk_size=READ_SIZE):
                h.update(chunk)
            return BLOB_PREFIX + h.hexdigest()

        if await self._call("get", key, digest()) != key:
            raise BlobUnavailable(f"verify-after-write failed for {key}")

    async def get(self, key: str) -> bytes:
        cached = self.cache.get(key)
        if cached is not None:
            CACHE.labels("hit").inc()
            return cached
        CACHE.labels("miss").inc()
        return (await self.get_many([key]))[key]

    async def get_many(self, keys: list[str]) -> dict[str, bytes]:
        """Fetch several blobs: cache, then one inline lookup, then S3 concurrently. When
        the inline source cannot answer, S3 still serves what it holds; a key it lacks then
        raises the inline source's BlobUnavailable (it may be inline), not BlobNotFound."""
        out: dict[str, bytes] = {}
        for k in dict.fromkeys(keys):
            v = self.cache.get(k)
            if v is not None:
                out[k] = v
        missing = [k for k in dict.fromkeys(keys) if k not in out]
        CACHE.labels("hit").inc(len(out))
        if missing:
            CACHE.labels("miss").inc(len(missing))
            unanswered: BlobUnavailable | None = None
            try:
                out |= await self.get_inline(missing)
            except BlobUnavailable as exc:
                unanswered = exc
            rest = [k for k in missing if k not in out]
            try:
                out |= dict(zip(rest, await asyncio.gather(*(self.get_s3(k) for k in rest)),
                                strict=True))
            except BlobNotFound:
                if unanswered is not None:
                    raise unanswered from None
                raise
        return out

    async def get_inline(self, keys: Sequence[str]) -> dict[str, bytes]:
        """Those of ``keys`` kept inline (ADR 0014), cached; {} without an inline source.
        Keys S3 has answered for are not asked again."""
        if self.inline is None:
            return {}
        ask = [k for k in keys if k not in self._in_s3]
        if not ask:
            return {}
        try:
            found = await self.inline.inline_bodies(ask)
        except BlobUnavailable:
            raise
        except Exception as exc:  # the store's SQL or the bus: the body cannot be read now
            raise BlobUnavailable(f"inline: {type(exc).__name__}: {exc}"[:300]) from exc
        for k, v in found.items():
            self.cache.put(k, v)
        return found

    async def get_s3(self, key: str) -> bytes:
        """From S3 (through the cache), not looking inline."""
        data = await self._read(key)
        self.cache.put(key, data)
        if self.inline is not None:
            self._in_s3[key] = None
            if len(self._in_s3) > IN_S3_KEYS:
                self._in_s3.popitem(last=False)
        return data

    async def exists(self, key: str) -> bool:
        if self.cache.get(key) is not None or await self.get_inline([key]):
            return True
        try:
            await self._call("head", key, obstore.head_async(self._store, key))
            return True
        except BlobNotFound:
            return False

    async def last_modified(self, key: str) -> datetime:
        """When the object was last written (S3 LastModified); raises BlobNotFound."""
        meta = await self._call("head", key, obstore.head_async(self._store, key))
        return meta["last_modified"]

    async def delete(self, key: str) -> None:
        self.cache.discard(key)
        try:
            await self._call("delete", key, obstore.delete_async(self._store, key))
        except BlobNotFound:
            pass  # S3 DELETE of a missing key succeeds too

    async def list(self, prefix: str = BLOB_PREFIX) -> AsyncIterator[BlobInfo]:
        stream = obstore.list(self._store, prefix, chunk_size=1000)
        while True:
            try:
                async with self._limit:
                    batch = await anext(stream)
            except StopAsyncIteration:
                return
            except Exception as exc:
                raise BlobUnavailable(f"list: {type(exc).__name__}: {exc}"[:300]) from exc
            for meta in batch:
                yield BlobInfo(meta["path"], int(meta["size"]), meta["last_modified"])


def _hash_file(file: BinaryIO, head: bytes) -> tuple[str, int]:
    """sha256 and length of ``head`` + the rest of ``file`` (read ``READ_SIZE`` at a time)."""
    h = hashlib.sha256(head)
    size = len(head)
    while chunk := file.read(READ_SIZE):
        h.update(chunk)
        size += len(chunk)
    return h.hexdigest(), size


def _create_bucket(settings: CommonSettings) -> None:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    s3: Any = boto3.session.Session().client(
        "s3", endpoint_url=settings.s3_endpoint, aws_access_key_id=settings.s3_access_key,
        aws_secret_access_key=settings.s3_secret_key, region_name=settings.s3_region,
        config=Config(s3={"addressing_style": "path"}, connect_timeout=3, read_timeout=30))
    try:
        s3.create_bucket(Bucket=settings.s3_bucket)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise BlobUnavailable(f"create_bucket: {code or exc}") from exc
    except BotoCoreError as exc:
        raise BlobUnavailable(f"create_bucket: {exc}") from exc


class StoreBodies:
    """Small bodies asked of mailbox-store over ``store.bodies.v1``: the ``inline`` source of
    the services that read messages without the store's SQL (imap-access, pop3-access;
    ADR 0014)."""

    def __init__(self, bus: Bus, *, timeout_s: float = 10.0) -> None:
        self.bus = bus
        self.timeout_s = timeout_s

    async def inline_bodies(self, keys: Sequence[str]) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for i in range(0, len(keys), BODIES_MAX_KEYS):
            try:
                reply = await self.bus.request(
                    STORE_BODIES, BodiesRequest(keys=list(keys[i:i + BODIES_MAX_KEYS])),
                    timeout=self.timeout_s)
            except (BusUnavailable, RemoteError) as exc:
                raise BlobUnavailable(f"store.bodies: {exc}"[:300]) from exc
            out |= reply.bodies
        return out
