"""End-to-end benchmark: SMTP accept → mime-processor → mailbox-store → visible over IMAP,
side by side with a bare aiosmtpd that only discards (the anchor), in the same run.

    python tests/bench/bench_e2e.py [--messages 3000] [--concurrency 20] [--size 2048] [--runs 3]

Starts a real nats-server, SeaweedFS and every service as its own process (like `make run`)
and a bare aiosmtpd. Each run sends the same messages with the same client to both,
interleaved: the anchor's accept rate, and Postbus's delivered rate (until IMAP STATUS counts
them all). Meanwhile a probe account gets one message every 200 ms and an IMAP IDLE on its
INBOX times each 250 to its EXISTS. Prints medians, the ratio delivered/anchor, the CPU per
delivered message of every process and their peak RSS; writes bench-results/e2e.json.
"""

from __future__ import annotations

import argparse
import asyncio
import imaplib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from proc_support import cpu_seconds, rss_mb

from postbus.kit.testing import RunningNats, RunningS3, start_platform

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


async def smtp_send(port: int, rcpt: str, body: bytes) -> None:
    r, w = await asyncio.open_connection("127.0.0.1", port)

    async def reply() -> bytes:
        while True:
            line = await r.readline()
            if line[3:4] != b"-":
                return line

    await reply()
    for cmd in (b"EHLO bench\r\n", b"MAIL FROM:<bench@example.net>\r\n",
                f"RCPT TO:<{rcpt}>\r\n".encode(), b"DATA\r\n"):
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
    a login each time, or it takes CPU from the pipeline it times."""

    def __init__(self, port: int, user: str = "alice@example.test") -> None:
        self.conn = imaplib.IMAP4("127.0.0.1", port)
        self.conn.login(user, "secret")

    def __call__(self) -> int:
        typ, data = self.conn.status("INBOX", "(MESSAGES)")
        assert typ == "OK", data
        return int(data[0].split(b"MESSAGES ")[1].rstrip(b")"))

    def close(self) -> None:
        self.conn.logout()


class IdleProbe:
    """An IMAP IDLE on the probe account's INBOX: times each 250 to its ``* n EXISTS``."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.latencies: list[float] = []

    async def run(self, smtp: int, stop: asyncio.Event) -> None:
        r, w = await asyncio.open_connection("127.0.0.1", self.port)

        async def until(prefix: bytes, suffix: bytes = b"") -> bytes:
            while True:
                line = await r.readline()
                if not line:
                    raise ConnectionError("closed")
                if line.startswith(prefix) and line.rstrip().endswith(suffix):
                    return line

        await until(b"* OK")
        w.write(b"a LOGIN probe@example.test secret\r\nb SELECT INBOX\r\nc IDLE\r\n")
        await until(b"+ ")
        i = 0
        while not stop.is_set():
            i += 1
            await smtp_send(smtp, "probe@example.test", message(2048, -i))
            t0 = time.perf_counter()
            # "* n EXISTS" only: other untagged lines (the "* n RECENT" that follows it)
            # would end the wait for the next message at once
            await asyncio.wait_for(until(b"* ", b" EXISTS"), 30)
            self.latencies.append(time.perf_counter() - t0)
            await asyncio.sleep(0.2)
        w.write(b"DONE\r\nd LOGOUT\r\n")
        w.close()


def start_bare(tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    port_file = tmp / "bare.port"
    proc = subprocess.Popen([sys.executable, str(HERE / "bench_smtp.py"), "serve-bare",
                             str(port_file)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    for _ in range(200):
        if port_file.exists() and port_file.read_text().strip():
            return proc, int(port_file.read_text())
        time.sleep(0.05)
    raise RuntimeError("bare aiosmtpd did not start")


async def send_all(port: int, n: int, size: int, concurrency: int, offset: int) -> float:
    """Send n messages over ``concurrency`` sessions (new connection each); seconds taken."""
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            await smtp_send(port, "alice@example.test", message(size, offset + i))

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    return time.perf_counter() - t0


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=20)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="postbus-bench-"))
    nats, s3 = RunningNats(root), RunningS3(root)
    plat = start_platform(root / "platform", nats, s3.endpoint,
                          extra_env={"POSTBUS_LOG_LEVEL": "WARNING"})
    bare, bare_port = start_bare(root)
    try:
        async with httpx.AsyncClient(base_url=plat.api("mailbox-store") + "/api/v1",
                                     headers={"Authorization": f"Bearer {plat.token}"}) as api:
            (await api.post("/domains", json={"name": "example.test"})).raise_for_status()
            for user in ("alice", "probe"):
                (await api.post("/users", json={"address": f"{user}@example.test",
                                                "password": "secret"})).raise_for_status()
        smtp = plat.port("smtp-ingress", "smtp_port")
        imap = plat.port("imap-access", "imap_port")
        imap_count = ImapCounter(imap)
        pids = {n: p.pid for n, p in plat.procs.items()}
        pids.update({"nats-server": nats.proc.pid, "seaweedfs": s3.proc.pid})
        peak = dict.fromkeys(pids, 0.0)

        async def wait_until_count(n: int) -> None:
            deadline = time.monotonic() + 600
            while await asyncio.to_thread(imap_count) < n:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"fewer than {n} messages delivered")
                for name, pid in pids.items():
                    peak[name] = max(peak[name], rss_mb(pid))
                await asyncio.sleep(0.05)

        await send_all(smtp, 200, args.size, args.concurrency, 10**6)  # warm up
        await wait_until_count(200)
        rows = []
        latencies: list[float] = []
        for run in range(args.runs):
            bare_s = await send_all(bare_port, args.messages, args.size, args.concurrency, 0)
            before = imap_count()
            cpu0 = {n: cpu_seconds(p) for n, p in pids.items()}
            probe = IdleProbe(imap)
            stop = asyncio.Event()
            probing = asyncio.create_task(probe.run(smtp, stop))
            t0 = time.perf_counter()
            accept_s = await send_all(smtp, args.messages, args.size, args.concurrency,
                                      run * args.messages)
            await wait_until_count(before + args.messages)
            total = time.perf_counter() - t0
            stop.set()
            await probing
            latencies += probe.latencies
            cpu = {n: round((cpu_seconds(p) - cpu0[n]) / args.messages * 1000, 3)
                   for n, p in pids.items()}
            row = {"bare_accepted_per_s": round(args.messages / bare_s, 1),
                   "accepted_per_s": round(args.messages / accept_s, 1),
                   "delivered_per_s": round(args.messages / total, 1),
                   "cpu_ms_per_message": cpu}
            row["ratio"] = round(row["delivered_per_s"] / row["bare_accepted_per_s"], 3)
            rows.append(row)
            print(f"run {run + 1}: bare aiosmtpd {row['bare_accepted_per_s']}/s; postbus "
                  f"accepted {row['accepted_per_s']}/s, delivered {row['delivered_per_s']}/s; "
                  f"ratio {row['ratio']}", flush=True)
        imap_count.close()
        lat = sorted(latencies)
        result = {
            "messages": args.messages, "concurrency": args.concurrency, "size": args.size,
            "runs": rows,
            "bare_accepted_per_s_median": statistics.median(r["bare_accepted_per_s"] for r in rows),
            "delivered_per_s_median": statistics.median(r["delivered_per_s"] for r in rows),
            "ratio_median": statistics.median(r["ratio"] for r in rows),
            "idle_latency_ms_p50": round(lat[len(lat) // 2] * 1000, 1) if lat else None,
            "idle_latency_ms_p99": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000, 1)
            if lat else None,
            "idle_probes": len(lat),
            "cpu_ms_per_message_median": {
                n: statistics.median(r["cpu_ms_per_message"][n] for r in rows) for n in pids},
            "peak_rss_mb": {n: round(v, 1) for n, v in peak.items()},
        }
        print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
        out = ROOT / "bench-results"
        out.mkdir(exist_ok=True)
        (out / "e2e.json").write_text(json.dumps(result, indent=2))
    finally:
        bare.terminate()
        plat.stop()
        nats.stop()
        s3.stop()


if __name__ == "__main__":
    os.environ.setdefault("POSTBUS_LOG_LEVEL", "WARNING")
    asyncio.run(main())
