"""End-to-end benchmark: SMTP accept → mime-processor → mailbox-store → visible over IMAP.

    python tests/bench/bench_e2e.py [--messages 2000] [--concurrency 20] [--size 2048]

Starts a real nats-server, SeaweedFS and every service as its own process (like `make run`),
then reports the pipeline throughput (messages/s until the last one is in the mailbox) and the
single-message delivery latency (250 → visible in IMAP STATUS on an open session), as medians over repeated runs.
"""

from __future__ import annotations

import argparse
import asyncio
import imaplib
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from postbus.kit.testing import RunningNats, RunningS3, start_platform


async def smtp_send(port: int, rcpt: str, body: bytes) -> None:
    r, w = await asyncio.open_connection("127.0.0.1", port)

    async def reply() -> bytes:
        while True:
            line = await r.readline()
            if line[3:4] != b"-":
                return line

    await reply()
    for cmd in (b"EHLO bench\r\n", b"MAIL FROM:<bench@example.net>\r\n", f"RCPT TO:<{rcpt}>\r\n".encode(), b"DATA\r\n"):
        w.write(cmd)
        await w.drain()
        await reply()
    w.write(body + b".\r\nQUIT\r\n")
    await w.drain()
    line = await reply()
    assert line.startswith(b"250"), line
    w.close()


def message(size: int, i: int) -> bytes:
    head = (f"From: bench@example.net\r\nTo: alice@example.test\r\nSubject: bench {i}\r\n"
            f"Message-ID: <bench-{i}@example.net>\r\n\r\n").encode()
    line = b"x" * 76 + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


class ImapCounter:
    """One logged-in IMAP connection asked for STATUS INBOX (MESSAGES): polling must not pay
    a login (an Argon2 verification) each time, or it takes CPU from the pipeline it times."""

    def __init__(self, port: int) -> None:
        self.conn = imaplib.IMAP4("127.0.0.1", port)
        self.conn.login("alice@example.test", "secret")

    def __call__(self) -> int:
        typ, data = self.conn.status("INBOX", "(MESSAGES)")
        assert typ == "OK", data
        return int(data[0].split(b"MESSAGES ")[1].rstrip(b")"))

    def close(self) -> None:
        self.conn.logout()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=20)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="postbus-bench-"))
    nats, s3 = RunningNats(root), RunningS3(root)
    plat = start_platform(root / "platform", nats.url, s3.endpoint,
                          extra_env={"POSTBUS_LOG_LEVEL": "WARNING"})
    try:
        async with httpx.AsyncClient(base_url=plat.api("mailbox-store") + "/api/v1",
                                     headers={"Authorization": f"Bearer {plat.token}"}) as api:
            (await api.post("/domains", json={"name": "example.test"})).raise_for_status()
            (await api.post("/users", json={"address": "alice@example.test",
                                            "password": "secret"})).raise_for_status()
        smtp = plat.port("smtp-ingress", "smtp_port")
        imap_count = ImapCounter(plat.port("imap-access", "imap_port"))

        async def wait_until_count(n: int, interval: float) -> None:
            """Poll IMAP STATUS until the mailbox holds ``n`` messages (at most 10 minutes)."""
            deadline = time.monotonic() + 600
            while await asyncio.to_thread(imap_count) < n:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"fewer than {n} messages delivered")
                await asyncio.sleep(interval)

        latencies = []
        for i in range(20):
            before = imap_count()
            t0 = time.perf_counter()
            await smtp_send(smtp, "alice@example.test", message(args.size, i))
            await wait_until_count(before + 1, 0.005)
            latencies.append(time.perf_counter() - t0)

        rates = []
        for run in range(args.runs):
            before = imap_count()

            async def one(i: int, sem: asyncio.Semaphore) -> None:
                async with sem:
                    await smtp_send(smtp, "alice@example.test", message(args.size, i))

            t0 = time.perf_counter()
            sem = asyncio.Semaphore(args.concurrency)
            await asyncio.gather(*(one(i, sem) for i in range(args.messages)))
            accepted = time.perf_counter() - t0
            await wait_until_count(before + args.messages, 0.05)
            total = time.perf_counter() - t0
            rates.append(args.messages / total)
            print(f"run {run + 1}: accepted {args.messages / accepted:.0f} msg/s, "
                  f"delivered {args.messages / total:.0f} msg/s")

        result = {
            "messages": args.messages, "concurrency": args.concurrency, "size": args.size,
            "pipeline_msgs_per_s_median": round(statistics.median(rates), 1),
            "delivery_latency_ms_median": round(statistics.median(latencies) * 1000, 1),
            "delivery_latency_ms_p90": round(sorted(latencies)[int(len(latencies) * 0.9) - 1] * 1000, 1),
        }
        print(json.dumps(result, indent=2))
        out = Path("bench-results")
        await asyncio.to_thread(out.mkdir, exist_ok=True)
        await asyncio.to_thread((out / "e2e.json").write_text, json.dumps(result, indent=2))
    finally:
        plat.stop()
        nats.stop()
        s3.stop()


if __name__ == "__main__":
    asyncio.run(main())
