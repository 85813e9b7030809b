"""Content-addressed blob store on S3 (boto3, off the event loop) with an in-memory LRU.

The only module that imports boto3. Keys are ``blobs/<sha256>``: immutable, so the cache
never needs invalidation (ARCHITECTURE.md "Storage").
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from postbus.kit.metrics import counter, histogram
from postbus.kit.settings import CommonSettings

BLOB_PREFIX = "blobs/"
CACHE = counter("postbus_blob_cache_total", "Blob cache lookups", ["result"])
S3_LATENCY = histogram("postbus_s3_seconds", "S3 call latency", ["op"])


class BlobUnavailable(Exception):
    """S3 did not answer or refused; nothing was written."""


class BlobNotFound(KeyError):
    pass


def blob_key(data: bytes) -> str:
    return BLOB_PREFIX + hashlib.sha256(data).hexdigest()


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
        self.bucket = settings.s3_bucket
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="s3")
        self._s3: Any = boto3.session.Session().client(
            "s3",
            endpoint_url=settings.s3_endpoint,
            aws_access_key_id=settings.s3_access_key,
            aws_secret_access_key=settings.s3_secret_key,
            region_name=settings.s3_region,
            config=Config(
                s3={"addressing_style": "path"},
                max_pool_connections=threads,
                retries={"max_attempts": 3, "mode": "standard"},
                connect_timeout=3,
                read_timeout=30,
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )
        self.cache = LRU(settings.blob_cache_mb * 1024 * 1024)
        self.verify_after_write = settings.blob_verify_after_write

    async def _call(self, op: str, fn: Any, **kw: Any) -> Any:
        loop = asyncio.get_running_loop()
        with S3_LATENCY.labels(op).time():
            try:
                return await loop.run_in_executor(self._pool, partial(fn, **kw))
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                if code in ("NoSuchKey", "404", "NotFound"):
                    raise BlobNotFound(kw.get("Key", "")) from exc
                raise BlobUnavailable(f"{op}: {code or exc}") from exc
            except BotoCoreError as exc:
                raise BlobUnavailable(f"{op}: {exc}") from exc

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def ensure_bucket(self) -> None:
        try:
            await self._call("head_bucket", self._s3.head_bucket, Bucket=self.bucket)
        except (BlobNotFound, BlobUnavailable):
            try:
                await self._call("create_bucket", self._s3.create_bucket, Bucket=self.bucket)
            except BlobUnavailable as exc:
                if "BucketAlreadyOwnedByYou" not in str(exc) and "BucketAlreadyExists" not in str(exc):
                    raise

    async def check(self) -> None:
        """Readiness: the bucket answers."""
        await self._call("head_bucket", self._s3.head_bucket, Bucket=self.bucket)

    async def put(self, data: bytes, *, verify: bool | None = None) -> str:
        """Store ``data`` under its content hash (idempotent) and return the key.
        ``verify`` (default: the ``blob_verify_after_write`` setting) reads it back first."""
        key = blob_key(data)
        await self._call("put", self._s3.put_object, Bucket=self.bucket, Key=key, Body=data)
        if self.verify_after_write if verify is None else verify:
            got = await self._call("get", self._s3.get_object, Bucket=self.bucket, Key=key)
            body = await asyncio.get_running_loop().run_in_executor(self._pool, got["Body"].read)
            if blob_key(body) != key:
                raise BlobUnavailable(f"verify-after-write failed for {key}")
        self.cache.put(key, data)
        return key

    async def get(self, key: str) -> bytes:
        cached = self.cache.get(key)
        if cached is not None:
            CACHE.labels("hit").inc()
            return cached
        CACHE.labels("miss").inc()
        loop = asyncio.get_running_loop()

        def fetch() -> bytes:
            return bytes(self._s3.get_object(Bucket=self.bucket, Key=key)["Body"].read())

        with S3_LATENCY.labels("get").time():
            try:
                data = await loop.run_in_executor(self._pool, fetch)
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                if code in ("NoSuchKey", "404", "NotFound"):
                    raise BlobNotFound(key) from exc
                raise BlobUnavailable(f"get: {code}") from exc
            except BotoCoreError as exc:
                raise BlobUnavailable(f"get: {exc}") from exc
        self.cache.put(key, data)
        return data

    async def get_many(self, keys: list[str]) -> dict[str, bytes]:
        """Fetch several blobs concurrently (cache first)."""
        uniq = list(dict.fromkeys(keys))
        values = await asyncio.gather(*(self.get(k) for k in uniq))
        return dict(zip(uniq, values, strict=True))

    async def exists(self, key: str) -> bool:
        if self.cache.get(key) is not None:
            return True
        try:
            await self._call("head", self._s3.head_object, Bucket=self.bucket, Key=key)
            return True
        except BlobNotFound:
            return False

    async def last_modified(self, key: str) -> datetime:
        """When the object was last written (S3 LastModified); raises BlobNotFound."""
        head = await self._call("head", self._s3.head_object, Bucket=self.bucket, Key=key)
        modified: datetime = head["LastModified"]
        return modified

    async def delete(self, key: str) -> None:
        self.cache.discard(key)
        await self._call("delete", self._s3.delete_object, Bucket=self.bucket, Key=key)

    async def list(self, prefix: str = BLOB_PREFIX) -> AsyncIterator[BlobInfo]:
        token: str | None = None
        while True:
            kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, "MaxKeys": 1000}
            if token:
                kw["ContinuationToken"] = token
            page = await self._call("list", self._s3.list_objects_v2, **kw)
            for obj in page.get("Contents", []):
                yield BlobInfo(obj["Key"], int(obj["Size"]), obj["LastModified"])
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")
