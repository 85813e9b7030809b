"""Relay benchmark: messages/s relayed from the outbound queue to a local discarding SMTP sink.

    python tests/bench/bench_relay.py [--messages 400] [--size 2048] [--runs 3]

Starts a real nats-server and SeaweedFS, a discarding aiosmtpd sink in its own process
(`python -m aiosmtpd -c aiosmtpd.handlers.Sink`) on 127.0.0.1, pre-queues messages of one
recipient each on mail.outbound.queued.v1, then starts an in-process relay worker with 1 and
with 20 concurrent deliveries and times until every recipient is relayed (KV state written,
event published, message acked). Medians over the runs; writes bench-results/relay.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client import REGISTRY

from postbus.kit import embedded
from postbus.kit.blob import BlobStore
from postbus.kit.bus import Bus
from postbus.kit.settings import CommonSettings
from postbus.kit.testing import RunningNats, RunningS3
from postbus.proto import ALL_STREAMS
from postbus.proto.mail import OUTBOUND_QUEUED, OutboundQueued, Recipient
from postbus.relay import service
from postbus.relay.settings import Settings


def attempt_seconds() -> tuple[float, float]:
    total = REGISTRY.get_sample_value("postbus_relay_attempt_seconds_sum") or 0.0
    count = REGISTRY.get_sample_value("postbus_relay_attempt_seconds_count") or 0.0
    return total, count


def relayed_count() -> float:
    return REGISTRY.get_sample_value("postbus_relay_deliveries_total", {"outcome": "relayed"}) or 0.0


def body(size: int) -> bytes:
    head = b"From: bench@example.test\r\nTo: x@example.net\r\nSubject: relay bench\r\n\r\n"
    line = b"y" * 76 + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


async def one_run(common: CommonSettings, sink_port: int, n: int, size: int,
                  concurrency: int) -> float:
    bus = await Bus.connect(common, "bench-relay")
    await bus.ensure_streams(ALL_STREAMS)
    blobs = BlobStore(common)
    await blobs.ensure_bucket()
    try:
        data = body(size) + uuid.uuid4().hex.encode() + b"\r\n"
        key = await blobs.put(data)
        now = datetime.now(UTC)
        for i in range(n):
            job = OutboundQueued(queue_id=f"B{uuid.uuid4().hex[:16].upper()}",
                                 mail_from="bench@example.test",
                                 recipients=[Recipient(address=f"r{i}@example.net")],
                                 blob_key=key, size=len(data), queued_at=now)
            await bus.publish(OUTBOUND_QUEUED, job)
        settings = Settings(common=common, transport_map=f"*=127.0.0.1:{sink_port}",
                            hostname="relay.bench", concurrency=concurrency,
                            destination_concurrency=concurrency,
                            bounce_foreign_failures=False)
        before = relayed_count()
        a_sum, a_count = attempt_seconds()
        started = time.perf_counter()
        await service.start(settings, bus, blobs)
        while relayed_count() - before < n:
            await asyncio.sleep(0.01)
            if time.perf_counter() - started > 600:
                raise RuntimeError("bench did not finish in 10 minutes")
        rate = n / (time.perf_counter() - started)
        b_sum, b_count = attempt_seconds()
        smtp_ms = 1000 * (b_sum - a_sum) / max(1.0, b_count - a_count)
        print(f"  c={concurrency}: {rate:.1f} msg/s, mean SMTP attempt {smtp_ms:.1f} ms")
        return rate
    finally:
        await bus.close()
        await blobs.close()


async def run_all(nats_url: str, s3_endpoint: str, sink_port: int,
                  args: argparse.Namespace) -> dict[str, object]:
    results: dict[str, object] = {"messages_per_run": args.messages, "size": args.size,
                                  "runs": args.runs}
    for conc in (1, 20):
        rates = []
        for _ in range(args.runs):
            common = CommonSettings(nats_url=nats_url, s3_endpoint=s3_endpoint,
                                    s3_bucket="bench-" + uuid.uuid4().hex[:8],
                                    admin_token="x", log_level="WARNING")
            rates.append(await one_run(common, sink_port, args.messages, args.size, conc))
        med = statistics.median(rates)
        results[f"concurrency_{conc}"] = {"median_msgs_per_s": round(med, 1),
                                          "runs": [round(r, 1) for r in rates]}
        print(f"concurrency {conc:>2}: median {med:8.1f} messages/s  "
              f"(runs: {', '.join(f'{r:.1f}' for r in rates)})")
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=400)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="postbus-bench-relay-"))
    nats = RunningNats(root)
    s3 = RunningS3(root)
    sink_port = embedded.free_port()
    sink = subprocess.Popen([sys.executable, "-m", "aiosmtpd", "-n", "-l",
                             f"127.0.0.1:{sink_port}", "-c", "aiosmtpd.handlers.Sink"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        embedded.wait_until(lambda: embedded.port_open(sink_port), 20, "smtp sink", sink)
        results = asyncio.run(run_all(nats.url, s3.endpoint, sink_port, args))
        out = Path("bench-results")
        out.mkdir(exist_ok=True)
        (out / "relay.json").write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {out / 'relay.json'}")
    finally:
        sink.terminate()
        sink.wait(10)
        nats.stop()
        s3.stop()


if __name__ == "__main__":
    from postbus.kit import logging as klog

    klog.configure("WARNING", "console", service="bench-relay")
    main()
