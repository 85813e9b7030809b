"""POP3 benchmark: login latency and RETR throughput for a 1,000-message maildrop.

    python tests/bench/bench_pop3.py [--store platform|memory] [--messages 1000] [--clients 20]
                                     [--logins 50] [--runs 3]

Starts a real nats-server and SeaweedFS and runs pop3-access as its own process
(``python -m postbus.pop3_access``), so bodies travel S3 -> pop3-access (LRU cache,
fetch-ahead) -> socket. Who answers login and the maildrop RPCs:

* ``platform`` (default): the real mailbox-store (SQLite, its own process); every account is
  provisioned over the REST API and gets the maildrop by an mbox import.
* ``memory``: this process, from memory (the ceiling of pop3-access itself).

Clients are raw asyncio sockets that pipeline RETRs; each concurrent client has its own
account (the maildrop lock). Prints medians and writes bench-results/pop3[-memory].json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

from postbus.kit.blob import BlobStore
from postbus.kit.bus import Bus
from postbus.kit.settings import CommonSettings
from postbus.kit.testing import RunningNats, RunningS3, start_platform
from postbus.kit.topology import BY_NAME
from postbus.pop3_access.memory import MemoryDirectory, MemoryMaildrops, serve_on_bus
from postbus.proto import ALL_STREAMS

PREFIX = b"Return-Path: <bench@example.net>\r\nDelivered-To: user@example.test\r\n"


def make_messages(n: int, seed: int = 7) -> list[bytes]:
    """Sizes spread from 1 KiB to 64 KiB (mean about 32 KiB), text lines of 76 octets."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        size = rnd.randint(1024, 64 * 1024)
        head = (f"From: bench@example.net\r\nTo: user@example.test\r\nSubject: bench {i}\r\n"
                f"Message-ID: <pop3-bench-{i}@example.net>\r\n\r\n").encode()
        line = (f"{i:08d} " + "x" * 67).encode() + b"\r\n"
        body = (line * (size // len(line) + 1))[: max(size - len(head), 0)]
        out.append(head + body + b".starts with a dot\r\n")
    return out


class Client:
    def __init__(self, port: int) -> None:
        self.port = port

    async def connect(self) -> None:
        self.r, self.w = await asyncio.open_connection("127.0.0.1", self.port, limit=1 << 24)
        await self.line()

    async def line(self) -> bytes:
        return await self.r.readline()

    async def cmd(self, text: str) -> bytes:
        self.w.write(text.encode() + b"\r\n")
        await self.w.drain()
        return await self.line()

    async def login(self, user: str, password: str) -> None:
        self.w.write(f"USER {user}\r\nPASS {password}\r\n".encode())
        await self.w.drain()
        await self.line()
        reply = await self.line()
        assert reply.startswith(b"+OK"), reply

    async def retr_all(self, n: int, window: int = 32) -> int:
        """RETR 1..n, pipelined ``window`` deep; returns the octets received."""
        total = 0
        sent = 0
        got = 0
        while got < n:
            while sent < n and sent - got < window:
                sent += 1
                self.w.write(f"RETR {sent}\r\n".encode())
            await self.w.drain()
            data = await self.r.readuntil(b"\r\n.\r\n")
            assert data.startswith(b"+OK"), data[:100]
            total += len(data)
            got += 1
        return total

    async def quit(self) -> None:
        await self.cmd("QUIT")
        self.w.close()


Setup = tuple[int, list[str], Callable[[], Awaitable[None]]]


async def setup_memory(args: argparse.Namespace, root: Path, nats: RunningNats,
                       s3: RunningS3, messages: list[bytes]) -> Setup:
    """Directory and maildrops answered from this process, bodies in S3."""
    common = CommonSettings(nats_url=nats.url, s3_endpoint=s3.endpoint, s3_bucket="bench-pop3",
                            admin_token="bench")
    bus = await Bus.connect(common, "bench")
    await bus.ensure_streams(ALL_STREAMS)
    blobs = BlobStore(common, threads=32)
    await blobs.ensure_bucket()
    t0 = time.perf_counter()
    sem = asyncio.Semaphore(32)

    async def put(m: bytes) -> None:
        async with sem:
            await blobs.put(m)

    await asyncio.gather(*(put(m) for m in messages))
    print(f"put {len(messages)} bodies in S3 in {time.perf_counter() - t0:.1f}s")

    directory, store = MemoryDirectory(), MemoryMaildrops()
    accounts = []
    for a in range(args.clients + 1):
        acc = directory.add(f"user{a}@example.test", "pw", a + 1)
        for m in messages:  # the same bodies: content-addressed, stored once
            store.deliver(acc.account_id, m, PREFIX)
        accounts.append(acc.address)

    await serve_on_bus(bus, directory, store)
    plat = await asyncio.to_thread(
        start_platform, root / "plat", nats.url, s3.endpoint,
        extra_env={"POSTBUS_S3_BUCKET": common.s3_bucket, "POSTBUS_LOG_LEVEL": "WARNING",
                   "POSTBUS_POP3_ACCESS_PREFETCH": str(args.prefetch)},
        services=(BY_NAME["pop3-access"],))

    async def stop() -> None:
        await asyncio.to_thread(plat.stop)
        await bus.close()
        await blobs.close()

    return plat.port("pop3-access", "pop3_port"), accounts, stop


async def setup_platform(args: argparse.Namespace, root: Path, nats: RunningNats,
                         s3: RunningS3, messages: list[bytes]) -> Setup:
    """The real mailbox-store and pop3-access; maildrops filled by mbox imports."""
    from postbus.mailbox_store.importexport import mbox_entry

    plat = await asyncio.to_thread(
        start_platform, root / "plat", nats.url, s3.endpoint,
        extra_env={"POSTBUS_LOG_LEVEL": "WARNING",
                   "POSTBUS_POP3_ACCESS_PREFETCH": str(args.prefetch)},
        services=(BY_NAME["mailbox-store"], BY_NAME["pop3-access"]))
    mbox = b"".join(mbox_entry(m) for m in messages)
    accounts = [f"user{a}@example.test" for a in range(args.clients + 1)]
    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=plat.api("mailbox-store") + "/api/v1", timeout=600,
                                 headers={"Authorization": f"Bearer {plat.token}"}) as api:
        (await api.post("/domains", json={"name": "example.test"})).raise_for_status()
        sem = asyncio.Semaphore(4)

        async def provision(address: str) -> None:
            async with sem:
                (await api.post("/users", json={"address": address, "password": "pw"})
                 ).raise_for_status()
                r = await api.post(f"/users/{address}/import", params={"format": "mbox"},
                                   content=mbox, headers={"Content-Type": "application/mbox"})
                r.raise_for_status()
                assert r.json()["imported"] == len(messages), r.text

        await asyncio.gather(*(provision(a) for a in accounts))
    print(f"imported {len(messages)} messages into each of {len(accounts)} accounts "
          f"in {time.perf_counter() - t0:.1f}s")

    async def stop() -> None:
        await asyncio.to_thread(plat.stop)

    return plat.port("pop3-access", "pop3_port"), accounts, stop


async def bench(args: argparse.Namespace) -> dict[str, object]:
    root = Path(tempfile.mkdtemp(prefix="postbus-bench-pop3-"))
    nats, s3 = RunningNats(root), RunningS3(root)
    stop: Callable[[], Awaitable[None]] | None = None
    try:
        messages = make_messages(args.messages)
        setup = setup_platform if args.store == "platform" else setup_memory
        port, accounts, stop = await setup(args, root, nats, s3, messages)
        results: dict[str, object] = {"store": args.store, "messages": args.messages,
                                      "prefetch": args.prefetch,
                                      "maildrop_mb": round(sum(map(len, messages)) / 1e6, 2)}
        # login latency: connect, USER/PASS (directory RPC, KV lock, 1,000-message maildrop)
        lat = []
        for _ in range(args.logins):
            c = Client(port)
            await c.connect()
            t = time.perf_counter()
            await c.login(accounts[0], "pw")
            lat.append(time.perf_counter() - t)
            await c.quit()
            await asyncio.sleep(0.01)  # the lock is released after +OK of QUIT
        lat.sort()
        results["login_ms_median"] = round(statistics.median(lat) * 1000, 2)
        results["login_ms_p95"] = round(lat[int(len(lat) * 0.95) - 1] * 1000, 2)
        print(f"login: median {results['login_ms_median']} ms, p95 {results['login_ms_p95']} ms")

        async def one_client(user: str) -> tuple[int, float]:
            c = Client(port)
            await c.connect()
            await c.login(user, "pw")
            t = time.perf_counter()
            n = await c.retr_all(args.messages)
            dt = time.perf_counter() - t
            await c.quit()
            return n, dt

        # 1 client, cold cache (the first pass reads every body from S3)
        n, dt = await one_client(accounts[0])
        results["retr_1_cold"] = {"msgs_per_s": round(args.messages / dt, 1),
                                  "mb_per_s": round(n / dt / 1e6, 1)}
        print(f"RETR 1 client, cold cache: {results['retr_1_cold']}")

        for clients in (1, args.clients):
            runs = []
            for _ in range(args.runs):
                await asyncio.sleep(0.05)
                t = time.perf_counter()
                done = await asyncio.gather(*(one_client(accounts[i]) for i in range(clients)))
                wall = time.perf_counter() - t
                octets = sum(x[0] for x in done)
                runs.append((clients * args.messages / wall, octets / wall / 1e6))
            key = f"retr_{clients}_warm"
            results[key] = {
                "msgs_per_s": round(statistics.median(r[0] for r in runs), 1),
                "mb_per_s": round(statistics.median(r[1] for r in runs), 1),
                "runs": args.runs,
            }
            print(f"RETR {clients} concurrent client(s), warm cache: {results[key]}")
        return results
    finally:
        if stop is not None:
            await stop()
        s3.stop()
        nats.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", choices=("platform", "memory"), default="platform")
    ap.add_argument("--messages", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--logins", type=int, default=50)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prefetch", type=int, default=16, help="POSTBUS_POP3_ACCESS_PREFETCH")
    args = ap.parse_args()
    results = asyncio.run(bench(args))
    out = Path("bench-results")
    out.mkdir(exist_ok=True)
    (out / ("pop3.json" if args.store == "platform" else "pop3-memory.json")).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
