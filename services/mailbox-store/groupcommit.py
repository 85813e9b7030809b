"""Delivery with group commit: concurrent ``deliver`` calls share one transaction and one
fsync (the store's SQL layer, see sqlbase.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import bindparam, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from postbus.kit.metrics import histogram
from postbus.mailbox_store.messages import _Q_INSERT, _Q_REF_BLOB, BlobRefs, MessageOps
from postbus.mailbox_store.outcomes import (
    Change,
    DeliverOutcome,
    Invalid,
    NewMessage,
)
from postbus.mailbox_store.prepared import Prepared
from postbus.mailbox_store.sqlbase import (
    DEFAULT_MAILBOXES,
    INBOX,
    MB,
    A,
    B,
    D,
    M,
    flags_from_db,
    flags_to_db,
    normalize_name,
    unseen_deleted,
)
from postbus.mailbox_store.txn import settle
from postbus.proto.store import MessageState

COMMIT_BATCH = histogram("postbus_store_delivery_batch_size", "Deliveries per group commit",
                         buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
COMMIT_SECONDS = histogram("postbus_store_delivery_commit_seconds",
                           "Time to store one group of deliveries")

# On SQLite (no round trips: it runs in this thread) a batch's statements are prepared
# once (prepared.py) and run once per account, mailbox or message: statements whose IN
# lists or VALUES rows grow with the batch are compiled anew for each batch size, which
# cost more than running the fixed ones n times (bench_store.py: 3,000 -> 4,600
# deliveries/s). PostgreSQL pays a round trip per statement, so there the batch keeps
# set-based statements (per-row statements halved its rate).
_Q_LOCK_FOR_DELIVERY = Prepared(
    select(A.c.id, A.c.enabled, A.c.quota_bytes, A.c.used_bytes)
    .where(A.c.id == bindparam("p_account")).with_for_update(), named=True)
_Q_DELIVERED = Prepared(select(D.c.queue_id).where(D.c.queue_id == bindparam("p_queue"),
                                                   D.c.account_id == bindparam("p_account")))
_Q_MAILBOX = Prepared(select(MB).where(MB.c.account_id == bindparam("p_account"),
                                       MB.c.name == bindparam("p_name")), named=True)
_Q_USAGE = Prepared(
    A.update().where(A.c.id == bindparam("p_account"))
    .values(used_bytes=A.c.used_bytes + bindparam("p_bytes"),
            message_count=A.c.message_count + bindparam("p_msgs")))
_Q_RECORD = Prepared(insert(D), column_keys=("queue_id", "account_id", "message_id",
                                              "delivered_at"))


# ---------------------------------------------------------------- group commit
@dataclass
class _DeliverJob:
    queue_id: str
    account_id: int
    mailbox: str
    msg: NewMessage


class _Batcher:
    """Collects concurrent deliveries and commits them together (one transaction, one
    fsync). A batch that fails is retried one delivery at a time, so one bad message
    only fails itself."""

    def __init__(self, run: Callable[[list[_DeliverJob]], Awaitable[list[DeliverOutcome]]],
                 max_batch: int = 64) -> None:
        self.run = run
        self.max_batch = max_batch
        self.pending: list[tuple[_DeliverJob, asyncio.Future[DeliverOutcome]]] = []
        self.worker: asyncio.Task[None] | None = None

    async def submit(self, job: _DeliverJob) -> DeliverOutcome:
        fut: asyncio.Future[DeliverOutcome] = asyncio.get_running_loop().create_future()
        self.pending.append((job, fut))
        if self.worker is None or self.worker.done():
            self.worker = asyncio.create_task(self._drain(), name="store-group-commit")
        return await fut

    async def _alone(self, job: _DeliverJob) -> DeliverOutcome:
        return (await self.run([job]))[0]

    async def _drain(self) -> None:
        while self.pending:
            batch, self.pending = self.pending[:self.max_batch], self.pending[self.max_batch:]
            live = [(j, f) for j, f in batch if not f.done()]
            if not live:
                continue
            COMMIT_BATCH.observe(len(live))
            try:
                with COMMIT_SECONDS.time():
                    outcomes = await self.run([j for j, _ in live])
            except Exception as exc:
                if len(live) == 1:
                    live[0][1].set_exception(exc)
                    continue
                for job, fut in live:  # isolate the failure
                    await settle(fut, self._alone(job))
                continue
            for (_, fut), out in zip(live, outcomes, strict=True):
                if not fut.done():
                    fut.set_result(out)


class DeliverOps(MessageOps):
    """deliver(): idempotent on (queue_id, account_id), grouped into batches."""

    def __init__(self, engine: AsyncEngine, *, delivery_batch: int = 128,
                 read_only: bool = False) -> None:
        super().__init__(engine, read_only=read_only)
        self._batcher = _Batcher(self._deliver_batch, delivery_batch)

    # ------------------------------------------------------------ delivery
    async def deliver(self, queue_id: str, account_id: int, mailbox: str, msg: NewMessage
                      ) -> DeliverOutcome:
        """Store one delivered message, idempotent on (queue_id, account_id): the
        deliveries row is written in the same transaction as the message.

        Concurrent calls are grouped into one transaction (group commit: one fsync for
        many deliveries); the result is the same as one transaction each."""
        return await self._batcher.submit(_DeliverJob(queue_id, account_id, mailbox, msg))

    async def _deliver_batch(self, jobs: list[_DeliverJob]) -> list[DeliverOutcome]:
        """Deliver a batch in one transaction with a fixed number of statements (not a
        number per message): that, not the fsync, is what bounds deliveries per second."""

        async def tx(conn: AsyncConnection) -> list[DeliverOutcome]:
            accts = await self._lock_accounts(conn, sorted({j.account_id for j in jobs}))
            done = await self._already_delivered(conn, jobs)
            boxes = await self._delivery_mailboxes(conn, jobs, set(accts))
            used = {a: r.used_bytes for a, r in accts.items()}
            outcomes: list[DeliverOutcome] = []
            placed: list[tuple[int, _DeliverJob, Any]] = []  # (index, job, mailbox row)
            for i, j in enumerate(jobs):
                acct = accts.get(j.account_id)
                if acct is None:
                    outcomes.append(DeliverOutcome("no_account"))
                    continue
                if (j.queue_id, j.account_id) in done:
                    outcomes.append(DeliverOutcome("duplicate"))
                    continue
                if not acct.enabled:
                    outcomes.append(DeliverOutcome("disabled"))
                    continue
                size = j.msg.size
                if acct.quota_bytes is not None and used[j.account_id] + size > acct.quota_bytes:
                    outcomes.append(DeliverOutcome("over_quota"))
                    continue
                used[j.account_id] += size
                done.add((j.queue_id, j.account_id))
                outcomes.append(DeliverOutcome("delivered"))
                placed.append((i, j, self._pick_mailbox(boxes, j)))
            if not placed:
                return outcomes
            # usage, exact, in this transaction
            per_acct: dict[int, tuple[int, int]] = {}
            per_box: dict[int, tuple[int, int]] = {}
            per_box_flags: dict[int, tuple[int, int]] = {}
            refs: BlobRefs = {}
            for _, j, box in placed:
                size = j.msg.size
                n, b = per_acct.get(j.account_id, (0, 0))
                per_acct[j.account_id] = (n + 1, b + size)
                n, b = per_box.get(box.id, (0, 0))
                per_box[box.id] = (n + 1, b + size)
                un, de = unseen_deleted(flags_to_db(j.msg.flags)[0])
                u0, d0 = per_box_flags.get(box.id, (0, 0))
                per_box_flags[box.id] = (u0 + un, d0 + de)
                n, _, body = refs.get(j.msg.blob_key, (0, 0, None))
                refs[j.msg.blob_key] = (n + 1, j.msg.blob_size, body or j.msg.body)
            await _Q_USAGE.many(conn, [{"p_account": a, "p_bytes": b, "p_msgs": n}
                                       for a, (n, b) in sorted(per_acct.items())])
            # UIDs: one UPDATE ... RETURNING per mailbox, in id order
            alloc: dict[int, tuple[int, int, Any]] = {}
            for box_id in sorted(per_box):
                n, b = per_box[box_id]
                alloc[box_id] = await self._allocate(conn, box_id, n, b, *per_box_flags[box_id])
            await self._ref_blobs_many(conn, refs)
            next_uid = {bid: first for bid, (first, _, _) in alloc.items()}
            values = []
            for _, j, box in placed:
                uid = next_uid[box.id]
                next_uid[box.id] = uid + 1
                values.append(self._message_values(box.id, uid, alloc[box.id][1], j.msg))
            if self.sqlite:
                ids = [(await _Q_INSERT.rows(conn, **v))[0][0] for v in values]
            else:
                ids = list((await conn.execute(insert(M).returning(
                    M.c.id, sort_by_parameter_order=True), values)).scalars().all())
            now = datetime.now(UTC)
            records = [{"queue_id": j.queue_id, "account_id": j.account_id, "message_id": mid,
                        "delivered_at": now} for (_, j, _), mid in zip(placed, ids, strict=True)]
            if self.sqlite:
                await _Q_RECORD.many(conn, records)
            else:  # one multi-row INSERT: one round trip
                await conn.execute(insert(D), records)
            # one change per delivered message (IMAP sessions see each arrival)
            seen_count: dict[int, int] = {}
            for (i, j, box), v in zip(placed, values, strict=True):
                _, modseq, row = alloc[box.id]
                k = seen_count.get(box.id, 0) + 1
                seen_count[box.id] = k
                n = per_box[box.id][0]
                exists = row.message_count - n + k
                change = Change(j.account_id, box.id, row.name, row.uidvalidity, v["uid"] + 1,
                                modseq, exists, added=[MessageState(
                                    uid=v["uid"], flags=flags_from_db(v["flags"], v["keywords"]),
                                    modseq=modseq)])
                outcomes[i] = DeliverOutcome("delivered", v["uid"], box.id, change)
            return outcomes

        return await self.write(tx)

    async def _delivery_mailboxes(self, conn: AsyncConnection, jobs: list[_DeliverJob],
                                  accounts: set[int]) -> dict[tuple[int, str], Any]:
        """The mailboxes the batch may deliver into, keyed by (account, name); INBOX and
        the default folders are created for accounts that do not have them yet."""
        wanted: dict[int, set[str]] = {}
        for j in jobs:
            if j.account_id in accounts:
                try:
                    name = normalize_name(j.mailbox or INBOX)
                except Invalid:
                    name = INBOX
                wanted.setdefault(j.account_id, {INBOX}).add(name)
        if not wanted:
            return {}

        async def load() -> dict[tuple[int, str], Any]:
            if not self.sqlite:
                names = sorted(set().union(*wanted.values()))
                return {(r.account_id, r.name): r for r in (await conn.execute(select(MB).where(
                    MB.c.account_id.in_(sorted(wanted)), MB.c.name.in_(names)))).all()}
            found = {}
            for a in sorted(wanted):
                for n in sorted(wanted[a]):
                    if (r := await _Q_MAILBOX.first(conn, p_account=a, p_name=n)) is not None:
                        found[(a, n)] = r
            return found

        boxes = await load()
        defaults = {n for n, _ in DEFAULT_MAILBOXES}
        missing = [a for a, ns in wanted.items()
                   if any((a, n) not in boxes for n in ns & defaults)]
        for a in missing:
            await self._ensure_defaults(conn, a, wanted[a] & defaults)
        return await load() if missing else boxes

    @staticmethod
    def _pick_mailbox(boxes: dict[tuple[int, str], Any], j: _DeliverJob) -> Any:
        try:
            name = normalize_name(j.mailbox or INBOX)
        except Invalid:
            name = INBOX
        box = boxes.get((j.account_id, name))
        if box is None or box.noselect:
            box = boxes[(j.account_id, INBOX)]
        return box

    async def _lock_accounts(self, conn: AsyncConnection, aids: list[int]) -> dict[int, Any]:
        """Lock the batch's accounts in id order (no deadlock between replicas)."""
        if not self.sqlite:
            return {r.id: r for r in (await conn.execute(
                select(A.c.id, A.c.enabled, A.c.quota_bytes, A.c.used_bytes)
                .where(A.c.id.in_(aids)).order_by(A.c.id).with_for_update())).all()}
        found = {}
        for aid in aids:
            if (r := await _Q_LOCK_FOR_DELIVERY.first(conn, p_account=aid)) is not None:
                found[aid] = r
        return found

    async def _already_delivered(self, conn: AsyncConnection, jobs: list[_DeliverJob]
                                 ) -> set[tuple[str, int]]:
        """The (queue id, account) pairs of the batch stored before (redeliveries)."""
        if not self.sqlite:
            return {(q, a) for q, a in (await conn.execute(
                select(D.c.queue_id, D.c.account_id).where(
                    D.c.queue_id.in_(sorted({j.queue_id for j in jobs})),
                    D.c.account_id.in_(sorted({j.account_id for j in jobs}))))).all()}
        return {(j.queue_id, j.account_id) for j in jobs
                if await _Q_DELIVERED.first(conn, p_queue=j.queue_id,
                                            p_account=j.account_id) is not None}

    async def _ref_blobs_many(self, conn: AsyncConnection, refs: BlobRefs) -> None:
        """Add references to many blobs (sorted: a stable lock order)."""
        if self.sqlite:
            await _Q_REF_BLOB.many(conn, [{"p_key": k, "p_size": refs[k][1], "p_n": refs[k][0],
                                           "p_body": refs[k][2]} for k in sorted(refs)])
            return
        rows = [{"key": k, "size": refs[k][1], "refcount": refs[k][0], "unreferenced_since": None,
                 "body": refs[k][2]} for k in sorted(refs)]
        for i in range(0, len(rows), 200):
            stmt = self._insert(B).values(rows[i:i + 200])
            await conn.execute(stmt.on_conflict_do_update(
                index_elements=["key"],
                set_={"refcount": B.c.refcount + stmt.excluded.refcount,
                      "unreferenced_since": None}))
