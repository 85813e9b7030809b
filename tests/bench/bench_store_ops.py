"""Per-operation cost of the mailbox-store repository on the small mailboxes imaptest's
default mix works on (about 30 messages each): APPEND, SELECT, FETCH metadata, STORE,
EXPUNGE, STATUS, LIST and a login's account lookup, one at a time, so each figure is the
store's own time (CPU, since SQLite runs in the loop's thread) without NATS or IMAP.

    python tests/bench/bench_store_ops.py [--rounds 2000] [--backend sqlite|postgresql]

Prints the median CPU microseconds per operation (the wait for a commit's fsync is not
counted: it is the disk's, and concurrent writers share it in a group commit) over ``--repeat`` passes; writes
bench-results/store-ops.json. PostgreSQL needs POSTBUS_TEST_POSTGRES_URL.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench_store import ROOT, message, setup

from postbus.mailbox_store import db
from postbus.mailbox_store.directory_sql import DirectorySql
from postbus.mailbox_store.passwords import Passwords


async def per_op(fn: Callable[[int], Awaitable[Any]], rounds: int) -> float:
    t = time.process_time()  # CPU of every thread: a commit's fsync wait is not counted
    for i in range(rounds):
        await fn(i)
    return (time.process_time() - t) / rounds * 1e6


async def bench(backend: str, rounds: int, repeat: int) -> dict[str, float]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-store-ops-"))
    engine, repo, aid, teardown = await setup(backend, tmp)
    try:
        await repo.ensure_defaults(aid)
        for i in range(30):
            await repo.append(aid, "INBOX", message(i))
        info, _, _, _, _ = await repo.select(aid, name="INBOX")
        mid = info.mailbox_id
        directory = DirectorySql(db.sessionmaker(engine), passwords=Passwords())
        counter = iter(range(10**9))

        async def append(i: int) -> None:
            await repo.append(aid, "Archive", message(1000 + next(counter)))

        async def select(i: int) -> None:
            await repo.select(aid, name="INBOX")

        async def fetch(i: int) -> None:
            top = (await repo.select(aid, mailbox_id=mid))[0].uidnext - 1
            await repo.fetch(aid, mid, [[max(1, top - 9), top]])

        async def store(i: int) -> None:
            top = (await repo.select(aid, mailbox_id=mid))[0].uidnext - 1
            await repo.store_flags(aid, mid, [[top - 2, top]], "add" if i % 2 else "remove",
                                   ["\\Seen", "$Bench"])

        async def expunge(i: int) -> None:
            await repo.append(aid, "INBOX", message(900000 + next(counter)))
            top = (await repo.select(aid, mailbox_id=mid))[0].uidnext - 1
            await repo.store_flags(aid, mid, [[top, top]], "add", ["\\Deleted"])
            await repo.expunge(aid, mid)

        async def status(i: int) -> None:
            await repo.status(aid, "INBOX")

        async def list_(i: int) -> None:
            await repo.list_mailboxes(aid)

        async def lookup(i: int) -> None:
            await directory.authenticate("alice@example.test", "wrong", with_send_as=False,
                                         gate=_refuse)

        ops: dict[str, Callable[[int], Awaitable[Any]]] = {
            "append": append, "select": select, "select+fetch10": fetch,
            "select+store3": store, "append+select+store+expunge": expunge,
            "status": status, "list": list_, "login lookup (throttled)": lookup}
        runs: dict[str, list[float]] = {k: [] for k in ops}
        for _ in range(repeat):
            for name, fn in ops.items():
                runs[name].append(await per_op(fn, rounds))
        return {k: round(statistics.median(v), 1) for k, v in runs.items()}
    finally:
        await teardown()


async def _refuse(_login: str) -> bool:
    return False


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--backend", default="sqlite", choices=["sqlite", "postgresql"])
    args = ap.parse_args()
    res = asyncio.run(bench(args.backend, args.rounds, args.repeat))
    for k, v in res.items():
        print(f"{k:32} {v:9.1f} us")
    out = ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    (out / "store-ops.json").write_text(json.dumps({"backend": args.backend, **res}, indent=2))


if __name__ == "__main__":
    main()
