"""Directory and management benchmark (mailbox-store, directory side).

    python tests/bench/bench_store_dir.py [--requests 3000] [--concurrency 32] [--repeats 3]
                                          [--messages 1000]

Starts a nats-server and SeaweedFS on 127.0.0.1 and a SQLite database in a temp dir (and
PostgreSQL too when POSTBUS_TEST_POSTGRES_URL is set), then measures:
1. DIRECTORY_RESOLVE over NATS (a mix of account, alias, sub-address, catch-all-less
   unknown and remote addresses): requests/s and median latency at ``--concurrency``.
2. DIRECTORY_AUTHENTICATE with the production Argon2id parameters: logins/s, median latency.
3. POST /users/{a}/import of an mbox of ``--messages`` 2 KB messages through the real app
   (S3 puts, summaries, repository appends): messages/s.
Medians of the repeats; results in bench-results/store_dir.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from postbus.kit.blob import BlobStore
from postbus.kit.bus import Bus
from postbus.kit.mgmt import create_app
from postbus.kit.settings import CommonSettings
from postbus.kit.testing import RunningNats, RunningS3
from postbus.mailbox_store import db
from postbus.mailbox_store.directory import serve_directory
from postbus.mailbox_store.mgmt import router
from postbus.mailbox_store.repository import Repository
from postbus.proto import ALL_STREAMS
from postbus.proto.directory import (
    DIRECTORY_AUTHENTICATE,
    DIRECTORY_RESOLVE,
    AuthRequest,
    ResolveRequest,
)

TOKEN = "bench"


async def _rate(n: int, concurrency: int, one: Any) -> tuple[float, float]:
    """Run ``one(i)`` n times with bounded concurrency: (per second, median latency ms)."""
    lat: list[float] = []
    sem = asyncio.Semaphore(concurrency)

    async def run(i: int) -> None:
        async with sem:
            t = time.perf_counter()
            await one(i)
            lat.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    await asyncio.gather(*(run(i) for i in range(n)))
    return n / (time.perf_counter() - t0), statistics.median(lat) * 1000


def _mbox(n: int) -> bytes:
    body = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 30 + "\n")
    return b"".join(
        (f"From bench@example.net Mon Jan  1 00:00:00 2024\nFrom: Bench <bench@example.net>\n"
         f"To: alice@example.test\nSubject: bench {i}\nMessage-ID: <b{i}@example.net>\n\n"
         f"{body}\n").encode() for i in range(n))


async def bench_backend(name: str, url: str, common: CommonSettings, args: argparse.Namespace
                        ) -> dict[str, Any]:
    engine = db.create_engine(url)
    await db.migrate(engine)
    sm = db.sessionmaker(engine)
    repo = Repository(engine)
    bus = await Bus.connect(common, "bench")
    await bus.ensure_streams(ALL_STREAMS)
    blobs = BlobStore(common)
    await blobs.ensure_bucket()
    try:
        d = await serve_directory(bus, sm, repo=repo)
        await d.create_domain("example.test")
        await d.create_account("alice@example.test", "pw")
        await d.create_account("bob@example.test", "pw")
        await d.create_alias("team@example.test", ["alice@example.test", "bob@example.test"])
        for i in range(200):
            await d.create_account(f"user{i}@example.test", "pw")
        addrs = ["alice@example.test", "team@example.test", "bob+tag@Example.TEST",
                 "nobody@example.test", "someone@remote.test", "user17@example.test"]

        async def resolve(i: int) -> None:
            await bus.request(DIRECTORY_RESOLVE, ResolveRequest(address=addrs[i % len(addrs)]))

        async def login(i: int) -> None:
            r = await bus.request(DIRECTORY_AUTHENTICATE,
                                  AuthRequest(username="alice@example.test", password="pw"),
                                  timeout=30)
            assert r.ok

        app = create_app("mailbox-store", checks={}, token_source=lambda: TOKEN,
                         routers=[router(sm, blobs, bus, repo, directory=d)])
        data = _mbox(args.messages)
        res: dict[str, list[float]] = {"resolve_per_s": [], "resolve_ms": [], "login_per_s": [],
                                       "login_ms": [], "import_msgs_per_s": []}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://b",
                                     headers={"Authorization": f"Bearer {TOKEN}"},
                                     timeout=600) as c:
            await _rate(200, args.concurrency, resolve)  # warm-up
            for rep in range(args.repeats):
                ps, ms = await _rate(args.requests, args.concurrency, resolve)
                res["resolve_per_s"].append(ps)
                res["resolve_ms"].append(ms)
                ps, ms = await _rate(24, 8, login)
                res["login_per_s"].append(ps)
                res["login_ms"].append(ms)
                t0 = time.perf_counter()
                r = await c.post("/api/v1/users/alice@example.test/import",
                                 params={"format": "mbox", "mailbox": f"Bench{rep}"},
                                 content=data)
                r.raise_for_status()
                assert r.json()["imported"] == args.messages, r.json()
                res["import_msgs_per_s"].append(args.messages / (time.perf_counter() - t0))
        out = {k: round(statistics.median(v), 1) for k, v in res.items()}
        print(f"{name}: " + ", ".join(f"{k}={v}" for k, v in out.items()), flush=True)
        return out
    finally:
        await bus.close()
        await blobs.close()
        await engine.dispose()


async def main() -> dict[str, Any]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--messages", type=int, default=1000)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-store-dir-"))
    nats, s3 = RunningNats(root), RunningS3(root)
    results: dict[str, Any] = {"args": vars(args)}
    try:
        common = CommonSettings(nats_url=nats.url, s3_endpoint=s3.endpoint,
                                s3_bucket="bench-" + uuid.uuid4().hex[:8])
        results["sqlite"] = await bench_backend(
            "sqlite", f"sqlite:///{root / 'dir.db'}", common, args)
        pg = os.environ.get("POSTBUS_TEST_POSTGRES_URL")
        if pg:
            from sqlalchemy import text
            from sqlalchemy.ext.asyncio import create_async_engine

            base = db.normalize_url(pg)
            name = "bench_" + uuid.uuid4().hex[:8]
            admin = create_async_engine(base, isolation_level="AUTOCOMMIT")
            async with admin.connect() as conn:
                await conn.execute(text(f'CREATE DATABASE "{name}"'))
            try:
                results["postgres"] = await bench_backend(
                    "postgres", base.rsplit("/", 1)[0] + "/" + name, common, args)
            finally:
                async with admin.connect() as conn:
                    await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                await admin.dispose()
    finally:
        nats.stop()
        s3.stop()
    return results


if __name__ == "__main__":
    res = asyncio.run(main())
    Path("bench-results").mkdir(exist_ok=True)
    Path("bench-results/store_dir.json").write_text(json.dumps(res, indent=2) + "\n")
    sys.exit(0)
