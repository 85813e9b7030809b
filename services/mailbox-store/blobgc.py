"""Blob garbage collection: S3 objects no message references any more.

Two sweeps, both after a grace period: blob rows whose refcount reached zero, and objects
under blobs/ that have no row at all (claim-check bodies never delivered, outbound-only
bodies once relay is done with them). An object rewritten recently (a new message with the
same content) is left alone: its LastModified is inside the grace period.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from postbus.kit.blob import BlobNotFound, BlobStore
from postbus.kit.logging import get_logger
from postbus.kit.metrics import counter
from postbus.mailbox_store.db import run_periodically
from postbus.mailbox_store.repository import Repository

log = get_logger(__name__)
COLLECTED = counter("postbus_store_blobs_collected_total", "Blobs deleted by GC", ["kind"])


@dataclass
class GcResult:
    unreferenced: int = 0
    orphans: int = 0


async def collect(repo: Repository, blobs: BlobStore, grace_s: float,
                  now: datetime | None = None) -> GcResult:
    """One pass of both sweeps."""
    now = now or datetime.now(UTC)
    cutoff = now - timedelta(seconds=grace_s)
    res = GcResult()
    # 1. rows unreferenced since before the cutoff
    while True:
        keys = await repo.collectable_blobs(cutoff)
        if not keys:
            break
        for key in keys:
            where = await repo.forget_blob(key, cutoff)
            if where is None:
                continue  # referenced again meanwhile
            if where == "inline" or await _delete_if_old(blobs, key, cutoff):
                res.unreferenced += 1
        if len(keys) < 500:
            break
    # 2. objects without a row, older than the cutoff
    page: list[str] = []
    async for info in blobs.list():
        if info.last_modified < cutoff:
            page.append(info.key)
        if len(page) >= 500:
            res.orphans += await _orphans(repo, blobs, page, cutoff)
            page = []
    if page:
        res.orphans += await _orphans(repo, blobs, page, cutoff)
    COLLECTED.labels("unreferenced").inc(res.unreferenced)
    COLLECTED.labels("orphan").inc(res.orphans)
    if res.unreferenced or res.orphans:
        log.info("blob gc", unreferenced=res.unreferenced, orphans=res.orphans)
    return res


async def _orphans(repo: Repository, blobs: BlobStore, keys: list[str], cutoff: datetime) -> int:
    known = await repo.known_blobs(keys)
    n = 0
    for key in keys:
        if key not in known and await _delete_if_old(blobs, key, cutoff):
            n += 1
    return n


async def _delete_if_old(blobs: BlobStore, key: str, cutoff: datetime) -> bool:
    """Delete unless the object was (re)written after the cutoff."""
    try:
        modified = await blobs.last_modified(key)
    except BlobNotFound:
        return False
    if modified >= cutoff:
        return False
    await blobs.delete(key)
    return True


GC_LOCK_KEY = 0x706F_7374_6763  # one replica collects at a time


async def run_forever(repo: Repository, blobs: BlobStore, grace_s: float, interval_s: float,
                      deliveries_keep_s: float = 30 * 86400.0) -> None:
    """Blob GC and pruning of old delivery idempotency rows, every ``interval_s``."""

    async def one_pass() -> None:
        await collect(repo, blobs, grace_s)
        pruned = await repo.prune_deliveries(
            datetime.now(UTC) - timedelta(seconds=deliveries_keep_s))
        if pruned:
            log.info("delivery records pruned", count=pruned)

    await run_periodically(repo.engine, GC_LOCK_KEY, interval_s, one_pass, "blob gc")
