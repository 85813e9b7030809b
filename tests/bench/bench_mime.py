"""MIME benchmark: summarize() throughput, and the mime-processor worker end to end.

    python tests/bench/bench_mime.py [--seconds 2] [--messages 1000] [--repeats 3] [--concurrency 32]

1. ``postbus.protocols.mime.summarize`` on a 2 KB and a 100 KB multipart message
   (multipart/mixed: alternative text+html, one base64 attachment): messages/s.
2. The worker against a real nats-server and SeaweedFS (started here, 127.0.0.1 only):
   MailReceived published in advance, then messages/s until every message was processed
   and its DeliverLocal acked by JetStream (2 local recipients each, blob put to S3).
   Two modes: authenticated submission (no SPF/DKIM/DMARC), and MX mail with the checks
   against a local DNS server that answers NXDOMAIN at once (this sandbox has no DNS).
Medians of the repeats; results in bench-results/mime.json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import dns.message
import dns.rcode

from postbus.kit.blob import BlobStore
from postbus.kit.bus import Bus
from postbus.kit.settings import CommonSettings
from postbus.kit.testing import RunningNats, RunningS3
from postbus.mime_processor.service import start
from postbus.mime_processor.settings import Settings
from postbus.proto import ALL_STREAMS
from postbus.proto.directory import DIRECTORY_RESOLVE, AccountRef, ResolveReply, ResolveRequest
from postbus.proto.mail import MAIL_RECEIVED, BodyRef, ClientInfo, MailReceived, Recipient
from postbus.protocols.mime import summarize


def multipart(size: int, i: int = 0) -> bytes:
    head = (f"Received: from bench ([127.0.0.1]) by mx.example.test\r\n"
            f"From: Bench <bench@example.net>\r\nTo: alice@example.test, team@example.test\r\n"
            f"Subject: bench {i}\r\nDate: Thu, 26 Nov 2026 10:00:00 +0000\r\n"
            f"Message-ID: <bench-{i}@example.net>\r\nMIME-Version: 1.0\r\n"
            f"Content-Type: multipart/mixed; boundary=\"=_outer\"\r\n\r\n"
            f"--=_outer\r\nContent-Type: multipart/alternative; boundary=\"=_alt\"\r\n\r\n"
            f"--=_alt\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nHello,\r\nthis is {i}.\r\n"
            f"--=_alt\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>Hello, this is {i}.</p>\r\n"
            f"--=_alt--\r\n\r\n--=_outer\r\nContent-Type: application/octet-stream; name=\"a.bin\"\r\n"
            f"Content-Transfer-Encoding: base64\r\n"
            f"Content-Disposition: attachment; filename=\"a.bin\"\r\n\r\n").encode()
    tail = b"\r\n--=_outer--\r\n"
    n = max(0, size - len(head) - len(tail))
    att = base64.encodebytes(os.urandom(n * 3 // 4 + 3)).replace(b"\n", b"\r\n")[:n]
    return head + att + tail


def bench_summarize(size: int, seconds: float, repeats: int) -> float:
    msg = multipart(size)
    rates = []
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            summarize(msg)
            n += 1
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


class NxdomainDns:
    """A UDP DNS server on 127.0.0.1 that answers NXDOMAIN to every query."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self.run, daemon=True).start()

    def run(self) -> None:
        while True:
            try:
                data, addr = self.sock.recvfrom(4096)
                q = dns.message.from_wire(data)
                r = dns.message.make_response(q)
                r.set_rcode(dns.rcode.NXDOMAIN)
                self.sock.sendto(r.to_wire(), addr)
            except OSError:
                return
            except Exception:
                continue


async def bench_worker(common: CommonSettings, mode: str, messages: int, size: int,
                       run: int, dns_port: int, concurrency: int = 32) -> float:
    bus = await Bus.connect(common, f"bench-{mode}-{run}")
    await bus.ensure_streams(ALL_STREAMS)
    blobs = BlobStore(common)
    await blobs.ensure_bucket()
    accounts = {"alice@example.test": [AccountRef(account_id=1, address="alice@example.test")],
                "team@example.test": [AccountRef(account_id=1, address="alice@example.test"),
                                      AccountRef(account_id=2, address="bob@example.test")]}

    async def resolve(req: ResolveRequest) -> ResolveReply:
        return ResolveReply(status="local", accounts=accounts.get(req.address, []))

    await bus.serve(DIRECTORY_RESOLVE, resolve, queue="directory")
    # purge what earlier runs left, so counting starts at zero
    for s in ("POSTBUS_INBOUND", "POSTBUS_DELIVER"):
        await bus.js.purge_stream(s)
    mx = mode == "mx+auth"
    settings = Settings(common=common, auth_checks=mx, dns_nameservers=["127.0.0.1"],
                        dns_port=dns_port, concurrency=concurrency)
    client = (ClientInfo(ip="192.0.2.10", helo="bench.example.net", listener="mx") if mx else
              ClientInfo(ip="192.0.2.10", listener="submission", auth_user="alice@example.test"))
    now = datetime.now(UTC)
    pubs = []
    for i in range(messages):
        body = multipart(size, i * 1000 + run)
        m = MailReceived(queue_id=f"B{mode[:2]}{run}x{i}", received_at=now, client=client,
                         mail_from="bench@example.net",
                         rcpt_to=[Recipient(address="alice@example.test"),
                                  Recipient(address="team@example.test")],
                         body=BodyRef(size=len(body), inline=body))
        pubs.append(bus.publish(MAIL_RECEIVED, m))
        if len(pubs) >= 200:
            await asyncio.gather(*pubs)
            pubs = []
    await asyncio.gather(*pubs)

    t0 = time.perf_counter()
    running = start(settings, bus, blobs)
    while True:
        inbound = (await bus.js.stream_info("POSTBUS_INBOUND")).state.messages
        delivered = (await bus.js.stream_info("POSTBUS_DELIVER")).state.messages
        if inbound == 0 and delivered >= 2 * messages:
            break
        await asyncio.sleep(0.02)
    elapsed = time.perf_counter() - t0
    await running.close()
    await bus.close()
    await blobs.close()
    return messages / elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--messages", type=int, default=1000)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=32)
    args = ap.parse_args()

    results: dict[str, object] = {}
    for size in (2 * 1024, 100 * 1024):
        rate = bench_summarize(size, args.seconds, args.repeats)
        results[f"summarize_{size // 1024}k_msgs_per_s"] = round(rate, 1)
        print(f"summarize {size // 1024:>4} KB multipart: {rate:9.1f} messages/s (median)")

    root = Path(tempfile.mkdtemp(prefix="bench-mime-"))
    nats, s3 = RunningNats(root), RunningS3(root)
    dns_server = NxdomainDns()
    try:
        common = CommonSettings(nats_url=nats.url, s3_endpoint=s3.endpoint,
                                s3_bucket="bench-mime", log_level="WARNING")
        from postbus.kit import logging as klog

        klog.configure("WARNING", "console", service="bench")
        for mode in ("submission", "mx+auth"):
            rates = [asyncio.run(bench_worker(common, mode, args.messages, args.size, r,
                                              dns_server.port, args.concurrency))
                     for r in range(args.repeats)]
            med = statistics.median(rates)
            results[f"worker_{mode}_msgs_per_s"] = round(med, 1)
            print(f"worker {mode:>10} ({args.size} B, 2 local rcpts -> 2 DeliverLocal): "
                  f"{med:8.1f} messages/s (median of {[round(r) for r in rates]})")
    finally:
        nats.stop()
        s3.stop()
    results["params"] = vars(args) | {"python": sys.version.split()[0], "cpus": os.cpu_count()}
    out = Path("bench-results")
    out.mkdir(exist_ok=True)
    (out / "mime.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out / 'mime.json'}")


if __name__ == "__main__":
    main()
