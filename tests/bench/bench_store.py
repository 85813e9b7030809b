"""Benchmark of the mailbox-store repository: deliveries per second into one mailbox, and
SELECT / FETCH FLAGS / STATUS / STORE / SEARCH on a 100,000-message mailbox.

    python tests/bench/bench_store.py [--messages 100000] [--deliveries 5000]

SQLite always; PostgreSQL too when POSTBUS_TEST_POSTGRES_URL is set (a fresh schema,
dropped afterwards). Prints medians, writes bench-results/store.json.

``--rpc-messages`` (100,000; 0 skips): the store RPCs of a mailbox that size over a
nats-server with its default max_payload (1 MiB), through pop3-access's store adapter and
the imap-access server (the checks of tests/socket/test_store_large_mailbox.py, with the
store's real page sizes): every reply complete, none over the limit, and how long each took.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import insert, text

from postbus.mailbox_store import db
from postbus.mailbox_store.models import Account, Domain
from postbus.mailbox_store.repository import NewMessage, Repository
from postbus.proto.store import SearchKey
from postbus.protocols.mime import summarize

ROOT = Path(__file__).resolve().parents[2]
PG_URL = os.environ.get("POSTBUS_TEST_POSTGRES_URL")


def message(i: int) -> NewMessage:
    raw = (f"From: Sender {i % 97} <s{i % 97}@example.net>\r\nTo: alice@example.test\r\n"
           f"Subject: bench message {i}\r\nMessage-ID: <b{i}@example.net>\r\n"
           f"Date: Thu, 26 Nov 2026 17:00:00 +0000\r\n\r\n" + "x" * 2000 + "\r\n").encode()
    return NewMessage("blobs/" + hashlib.sha256(raw).hexdigest(), len(raw), summarize(raw),
                      prefix=b"Delivered-To: alice@example.test\r\n")


async def setup(backend: str, tmp: Path) -> tuple[Any, Repository, int, Callable[[], Awaitable[None]]]:
    if backend == "sqlite":
        engine = db.create_engine(f"sqlite:///{tmp / 'bench.db'}")
        schema = ""
    else:
        schema = "bench_" + uuid.uuid4().hex[:10]
        admin = db.create_engine(PG_URL or "")
        async with admin.begin() as c:
            await c.execute(text(f'CREATE SCHEMA "{schema}"'))
        await admin.dispose()
        engine = db.create_engine(PG_URL or "", connect_args={"server_settings": {"search_path": schema}})
    await db.migrate(engine)
    async with engine.begin() as c:
        did = (await c.execute(insert(Domain.__table__).values(
            name="example.test", local_part_case_sensitive=False)
            .returning(Domain.__table__.c.id))).scalar()
        aid = (await c.execute(insert(Account.__table__).values(
            address="alice@example.test", domain_id=did, password_hash="x", enabled=True,
            used_bytes=0, message_count=0, pop3_policy="client")
            .returning(Account.__table__.c.id))).scalar()

    async def teardown() -> None:
        await engine.dispose()
        if schema:
            admin = db.create_engine(PG_URL or "")
            async with admin.begin() as c:
                await c.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
            await admin.dispose()

    return engine, Repository(engine), int(aid), teardown


async def timed(fn: Callable[[], Awaitable[Any]], rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - t)
    return out


async def bench(backend: str, n_messages: int, n_deliveries: int, rounds: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-store-"))
    engine, repo, aid, teardown = await setup(backend, tmp)
    res: dict[str, Any] = {"backend": backend}
    try:
        await repo.ensure_defaults(aid)
        msgs = [message(i) for i in range(512)]

        # ---- deliveries per second (concurrent, as the consumer runs them)
        rates = []
        for r in range(rounds):
            sem = asyncio.Semaphore(64)

            async def one(i: int, r: int = r, sem: asyncio.Semaphore = sem) -> None:
                async with sem:
                    out = await repo.deliver(f"R{r}-{i}", aid, "INBOX", msgs[i % len(msgs)])
                    assert out.status == "delivered"

            t = time.perf_counter()
            await asyncio.gather(*(one(i) for i in range(n_deliveries)))
            rates.append(n_deliveries / (time.perf_counter() - t))
        res["deliveries_per_s"] = statistics.median(rates)

        # ---- a big mailbox: filled with bulk APPENDs of 5,000 (the population is not measured)
        big = (await repo.create_mailbox(aid, "Big")).mailbox_id

        async def fill() -> None:
            left = n_messages
            while left:
                k = min(5000, left)
                batch = [msgs[i % len(msgs)] for i in range(k)]

                async def tx(conn: Any, batch: list[NewMessage] = batch) -> None:
                    acct = await repo._lock_account(conn, aid)
                    box = await repo._mailbox_by_id(conn, aid, big)
                    await repo._insert_messages(conn, acct, box, batch)

                await repo.write(tx)
                left -= k

        t = time.perf_counter()
        await fill()
        res["fill_s"] = time.perf_counter() - t

        async def select_all() -> None:
            after, total = 0, 0
            while True:
                _, page, more, _, _ = await repo.select(aid, big, after_uid=after, limit=5000)
                total += len(page)
                if not more:
                    break
                after = page[-1].uid
            assert total == n_messages, total

        async def fetch_flags() -> None:
            got = await repo.fetch(aid, big, [(1, 10**9)], with_summary=False)
            assert len(got) == n_messages

        async def fetch_100_with_summary() -> None:
            got = await repo.fetch(aid, big, [(n_messages // 2, n_messages // 2 + 99)])
            assert len(got) == 100

        async def status() -> None:
            info = await repo.status(aid, "Big")
            assert info.messages == n_messages

        async def store_seen_all() -> None:
            await repo.store_flags(aid, big, [(1, 10**9)], "add", ["\\Seen"])
            await repo.store_flags(aid, big, [(1, 10**9)], "remove", ["\\Seen"])

        async def search_subject() -> None:
            uids, _, _ = await repo.search(aid, big, SearchKey(op="and", children=[
                SearchKey(op="from", args=["s42@"]), SearchKey(op="unflag", args=["\\Seen"])]))
            assert uids

        for name, fn, k in (("select_100k_s", select_all, rounds),
                            ("fetch_flags_100k_s", fetch_flags, rounds),
                            ("fetch_100_with_summary_s", fetch_100_with_summary, rounds),
                            ("status_100k_s", status, rounds),
                            ("store_seen_100k_add_and_remove_s", store_seen_all, max(1, rounds // 2)),
                            ("search_from_unseen_100k_s", search_subject, rounds)):
            res[name] = statistics.median(await timed(fn, k))
    finally:
        await teardown()
    return res


async def bench_consumer(n: int, concurrency: int) -> float:
    """Deliveries per second through the real delivery consumer: DeliverLocal messages
    queued on a real nats-server (JetStream, fsync before ack), consumed, stored in SQLite,
    a delivery event published for each."""
    from postbus.kit.blob import BlobStore
    from postbus.kit.bus import Bus
    from postbus.kit.settings import CommonSettings
    from postbus.kit.testing import RunningNats
    from postbus.mailbox_store.delivery import Deliverer
    from postbus.mailbox_store.settings import Settings
    from postbus.proto import ALL_STREAMS
    from postbus.proto.mail import DELIVER_LOCAL, DeliverLocal

    tmp = Path(tempfile.mkdtemp(prefix="bench-store-bus-"))
    nats = RunningNats(tmp)
    engine, repo, aid, teardown = await setup("sqlite", tmp)
    common = CommonSettings(nats_url=nats.url, database_url=f"sqlite:///{tmp / 'bench.db'}")
    bus = await Bus.connect(common, "bench")
    blobs = BlobStore(common)  # not contacted: verify_blob_on_delivery is off
    try:
        await bus.ensure_streams(ALL_STREAMS)
        await repo.ensure_defaults(aid)
        m = message(1)
        now = datetime.now(UTC)
        for i in range(n):
            await bus.publish(DELIVER_LOCAL, DeliverLocal(
                queue_id=f"B{i}", recipient="alice@example.test", account_id=aid,
                account="alice@example.test", received_at=now, blob_key=m.blob_key,
                blob_size=m.blob_size, prefix=m.prefix, summary=m.summary))
        t = time.perf_counter()
        Deliverer(bus, blobs, repo, Settings(common=common, delivery_concurrency=concurrency)).start()
        while (await repo.quota(aid))[2] < n:
            await asyncio.sleep(0.05)
            if time.perf_counter() - t > 300:
                raise TimeoutError("consumer did not finish")
        return n / (time.perf_counter() - t)
    finally:
        await bus.close()
        await blobs.close()
        await teardown()
        nats.stop()


async def bench_rpc_pages(n: int) -> dict[str, float]:
    """The large-mailbox checks of the socket tests on ``n`` messages (SQLite)."""
    sys.path.insert(0, str(ROOT / "tests" / "socket"))
    import test_store_large_mailbox as large

    from postbus.kit.blob import BlobStore
    from postbus.kit.bus import Bus
    from postbus.kit.settings import CommonSettings
    from postbus.kit.testing import RunningNats, RunningS3

    tmp = Path(tempfile.mkdtemp(prefix="bench-store-rpc-"))
    nats = RunningNats(tmp, max_payload=large.MIB)
    s3 = RunningS3(tmp)
    common = CommonSettings(nats_url=nats.url, s3_endpoint=s3.endpoint, s3_bucket="bench",
                            database_url=f"sqlite:///{tmp / 'dir.db'}")
    bus = await Bus.connect(common, "bench")
    blobs = BlobStore(common)
    try:
        await blobs.ensure_bucket()
        res: dict[str, float] = {}
        t = time.perf_counter()
        async with large.large_mailbox(tmp, bus, blobs, common, n) as (repo, aid):
            res["fill_s"] = time.perf_counter() - t
            res |= await large.check_pop3(bus, blobs, repo, aid, n)
            res |= await large.check_imap(bus, blobs, common, repo, aid, n)
        return res
    finally:
        await bus.close()
        await blobs.close()
        s3.stop()
        nats.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--deliveries", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--consumer", type=int, default=3000, help="messages through the consumer (0: skip)")
    ap.add_argument("--concurrency", type=int, default=128)
    ap.add_argument("--rpc-messages", type=int, default=100_000,
                    help="mailbox size for the store RPCs over a 1 MiB NATS (0: skip)")
    args = ap.parse_args()
    from postbus.kit import logging as klog

    klog.configure("WARNING", "console", service="bench-store")
    backends = ["sqlite"] + (["postgresql"] if PG_URL else [])
    results = {"messages": args.messages, "deliveries": args.deliveries, "rounds": args.rounds,
               "backends": []}
    for b in backends:
        r = asyncio.run(bench(b, args.messages, args.deliveries, args.rounds))
        results["backends"].append(r)
        print(f"[{b}] deliveries/s (median of {args.rounds}): {r['deliveries_per_s']:.0f}")
        for k, v in r.items():
            if k.endswith("_s") and k != "deliveries_per_s":
                print(f"[{b}] {k}: {v:.3f}")
    if args.consumer:
        rates = [asyncio.run(bench_consumer(args.consumer, args.concurrency)) for _ in range(args.rounds)]
        results["consumer_deliveries_per_s"] = statistics.median(rates)
        print(f"[sqlite] consumer deliveries/s via NATS (median of {args.rounds}, "
              f"concurrency {args.concurrency}): {results['consumer_deliveries_per_s']:.0f}")
    if args.rpc_messages:
        rpc = asyncio.run(bench_rpc_pages(args.rpc_messages))
        results["rpc_1mib_nats"] = {"messages": args.rpc_messages, **rpc}
        for k, v in rpc.items():
            print(f"[sqlite] {args.rpc_messages} messages over 1 MiB NATS, {k}: {v:.2f}")
    out = ROOT / "bench-results" / "store.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
