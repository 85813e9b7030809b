"""mime-processor against a real nats-server and a real SeaweedFS: inline and claim-check
messages in, DeliverLocal / OutboundQueued / events out of the streams, blobs in S3,
redelivery without duplicates; and the service as its own process."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from postbus.kit.blob import BlobStore
from postbus.kit.bus import Bus
from postbus.kit.settings import CommonSettings
from postbus.kit.testing import ADMIN_TOKEN, RunningNats, RunningS3, start_platform, wait_for
from postbus.kit.topology import BY_NAME
from postbus.mime_processor.service import Running, start
from postbus.mime_processor.settings import Settings
from postbus.proto.directory import DIRECTORY_RESOLVE, AccountRef, ResolveReply, ResolveRequest
from postbus.proto.mail import (
    DELIVER_LOCAL,
    DELIVERY_EVENT,
    MAIL_RECEIVED,
    OUTBOUND_QUEUED,
    BodyRef,
    ClientInfo,
    DeliverLocal,
    DeliveryEvent,
    MailReceived,
    OutboundQueued,
    Recipient,
)

ALICE = AccountRef(account_id=11, address="alice@example.test")
BOB = AccountRef(account_id=12, address="bob@example.test")
TABLE = {
    "alice@example.test": ResolveReply(status="local", accounts=[ALICE]),
    "team@example.test": ResolveReply(status="local", accounts=[ALICE, BOB]),
}
BODY = (b"Received: from mx.sender.example ([198.51.100.7]) by mx.example.test\r\n"
        b"From: Carol <carol@sender.example>\r\nTo: team@example.test\r\nSubject: socket test\r\n"
        b"Message-ID: <s1@sender.example>\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: multipart/alternative; boundary=b1\r\n\r\n"
        b"--b1\r\nContent-Type: text/plain\r\n\r\nhello\r\n--b1\r\nContent-Type: text/html\r\n\r\n"
        b"<p>hello</p>\r\n--b1--\r\n")


async def serve_directory(bus: Bus) -> None:
    async def resolve(req: ResolveRequest) -> ResolveReply:
        if req.address in TABLE:
            return TABLE[req.address]
        dom = req.address.rsplit("@", 1)[-1]
        return ResolveReply(status="unknown" if dom == "example.test" else "remote", domain=dom)

    await bus.serve(DIRECTORY_RESOLVE, resolve, queue="directory")


def mail(qid: str, rcpts: list[str], body: BodyRef, **client: Any) -> MailReceived:
    return MailReceived(queue_id=qid, received_at=datetime.now(UTC),
                        client=ClientInfo(ip="198.51.100.7", helo="mx.sender.example", **client),
                        mail_from="carol@sender.example",
                        rcpt_to=[Recipient(address=a, notify=["FAILURE"]) for a in rcpts],
                        body=body)


async def stream_count(bus: Bus, stream: str) -> int:
    return int((await bus.js.stream_info(stream)).state.messages)


async def settled(bus: Bus) -> None:
    """Every inbound message processed and acked (a work queue drops acked messages)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if await stream_count(bus, "POSTBUS_INBOUND") == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("inbound messages were not all processed")


async def pull_all(bus: Bus, pattern: str, stream: str, durable: str) -> list[bytes]:
    sub = await bus.js.pull_subscribe(pattern, durable=durable, stream=stream)
    out: list[bytes] = []
    while True:
        try:
            msgs = await sub.fetch(100, timeout=0.5)
        except Exception:  # fetch timeout: nothing more
            return out
        for m in msgs:
            out.append(m.data)
            await m.ack()


@pytest.fixture
def silent_dns() -> Iterator[int]:
    """A UDP port that never answers: every DNS lookup times out (the sandbox has no DNS)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    yield s.getsockname()[1]
    s.close()


@pytest_asyncio.fixture
async def worker(bus: Bus, blobs: BlobStore, common_settings: CommonSettings,
                 silent_dns: int) -> AsyncIterator[Running]:
    await serve_directory(bus)
    settings = Settings(common=common_settings, authserv_id="mx.example.test",
                        dns_nameservers=["127.0.0.1"], dns_port=silent_dns, dns_timeout_s=0.2,
                        auth_budget_s=0.5, concurrency=4)
    running = start(settings, bus, blobs)
    yield running
    await running.close()


async def test_inline_and_claim_check_through_the_streams(
        bus: Bus, blobs: BlobStore, worker: Running) -> None:
    # MX mail, inline: alias fan-out, an unknown user, a remote address (must not relay)
    mx = mail("SOCK1", ["team@example.test", "alice@example.test", "ghost@example.test",
                        "x@remote.example"], BodyRef(size=len(BODY), inline=BODY))
    await bus.publish(MAIL_RECEIVED, mx, msg_id="SOCK1")
    # authenticated submission, claim check: the body went to S3 first
    big = BODY + b"x" * 200_000 + b"\r\n"
    claim = await blobs.put(big)
    sub = mail("SOCK2", ["alice@example.test", "y@remote.example"],
               BodyRef(size=len(big), blob_key=claim), listener="submission",
               auth_user="alice@example.test")
    await bus.publish(MAIL_RECEIVED, sub, msg_id="SOCK2")
    await settled(bus)

    assert await stream_count(bus, "POSTBUS_DELIVER") == 3  # 11+12 for SOCK1, 11 for SOCK2
    assert await stream_count(bus, "POSTBUS_OUTBOUND") == 1  # SOCK2 only

    # redelivery of the same message (e.g. the ack was lost): nothing new downstream
    await bus.publish(MAIL_RECEIVED, mx, msg_id="SOCK1-redelivered")
    await bus.publish(MAIL_RECEIVED, sub, msg_id="SOCK2-redelivered")
    await settled(bus)
    assert await stream_count(bus, "POSTBUS_DELIVER") == 3
    assert await stream_count(bus, "POSTBUS_OUTBOUND") == 1
    assert worker.worker.stats.processed == 4

    deliveries = [DeliverLocal.model_validate_json(d) for d in await pull_all(
        bus, DELIVER_LOCAL.pattern, "POSTBUS_DELIVER", "t-store")]
    by = {(d.queue_id, d.account_id): d for d in deliveries}
    assert set(by) == {("SOCK1", 11), ("SOCK1", 12), ("SOCK2", 11)}
    d1 = by[("SOCK1", 12)]
    assert d1.recipient == "team@example.test" and d1.account == "bob@example.test"
    assert d1.prefix == b"Return-Path: <carol@sender.example>\r\nDelivered-To: bob@example.test\r\n"
    assert d1.summary.subject == "socket test"
    assert [p.section for p in d1.summary.parts] == ["", "1", "2"]

    blobs.cache.discard(d1.blob_key)  # read it back from S3 itself
    stored = await blobs.get(d1.blob_key)
    assert stored.startswith(b"Authentication-Results: mx.example.test;\r\n\tspf=temperror")
    assert stored.endswith(BODY) and len(stored) == d1.blob_size
    assert d1.auth_results and "dmarc=" in d1.auth_results
    part2 = d1.summary.parts[2]
    assert stored[part2.body_start:part2.end] == b"<p>hello</p>"

    d2 = by[("SOCK2", 11)]
    assert d2.blob_key == claim and d2.auth_results is None  # submission: unchanged bytes

    [out] = [OutboundQueued.model_validate_json(d) for d in await pull_all(
        bus, OUTBOUND_QUEUED.pattern, "POSTBUS_OUTBOUND", "t-relay")]
    assert (out.queue_id, [r.address for r in out.recipients], out.blob_key) == (
        "SOCK2", ["y@remote.example"], claim)

    events = [DeliveryEvent.model_validate_json(d) for d in await pull_all(
        bus, DELIVERY_EVENT.pattern, "POSTBUS_EVENTS", "t-events")]
    kinds = sorted((e.queue_id, e.kind, e.recipient or "", e.status or "") for e in events)
    assert kinds == [
        ("SOCK1", "expanded", "team@example.test", ""),
        ("SOCK1", "failed", "ghost@example.test", "5.1.1"),
        ("SOCK1", "failed", "x@remote.example", "5.7.1"),
        ("SOCK1", "received", "", ""),
        ("SOCK2", "received", "", ""),
    ]
    ghost = next(e for e in events if e.recipient == "ghost@example.test")
    assert ghost.blob_key == d1.blob_key and ghost.mail_from == "carol@sender.example"
    assert ghost.notify == ["FAILURE"]


async def test_directory_down_then_up_retries(bus: Bus, blobs: BlobStore,
                                              common_settings: CommonSettings) -> None:
    settings = Settings(common=common_settings, auth_checks=False, concurrency=2)
    running = start(settings, bus, blobs)
    try:
        await bus.publish(MAIL_RECEIVED, mail("SOCK3", ["alice@example.test"],
                                              BodyRef(size=len(BODY), inline=BODY)))
        for _ in range(200):
            if running.worker.stats.failures:
                break
            await asyncio.sleep(0.05)
        assert running.worker.stats.failures  # no responders: retried, not acked
        assert await stream_count(bus, "POSTBUS_INBOUND") == 1
        await serve_directory(bus)
        for _ in range(150):  # the retry delay is 2 s
            if not await stream_count(bus, "POSTBUS_INBOUND"):
                break
            await asyncio.sleep(0.1)
        assert await stream_count(bus, "POSTBUS_DELIVER") == 1
    finally:
        await running.close()


def test_service_process_serves_mgmt_api(nats_server: RunningNats, s3_server: RunningS3,
                                         tmp_path: Path) -> None:
    plat = start_platform(tmp_path / "p", nats_server, s3_server.endpoint,
                          extra_env={"POSTBUS_MIME_PROCESSOR_AUTH_CHECKS": "false"},
                          services=(BY_NAME["mime-processor"],))
    try:
        api = plat.api("mime-processor")

        def get(path: str, token: str | None = ADMIN_TOKEN) -> Any:
            req = urllib.request.Request(api + path)
            if token:
                req.add_header("Authorization", f"Bearer {token}")
            with urllib.request.urlopen(req, timeout=5) as r:
                return json.loads(r.read())

        stats = get("/api/v1/mime/stats")
        assert stats["processed"] == 0 and stats["auth_checks"] is False
        with pytest.raises(urllib.error.HTTPError) as ei:
            get("/api/v1/mime/stats", token=None)
        assert ei.value.code == 401
        req = urllib.request.Request(api + "/api/v1/mime/summarize", data=BODY, method="POST")
        req.add_header("Authorization", f"Bearer {ADMIN_TOKEN}")
        with urllib.request.urlopen(req, timeout=5) as r:
            summary = json.loads(r.read())
        assert summary["subject"] == "socket test" and summary["from"].startswith("Carol")
        assert get("/api/v1/mime/failures") == []
        with urllib.request.urlopen(api + "/metrics", timeout=5) as r:
            assert b"postbus_mime_processing_seconds" in r.read()

        async def publish_one() -> None:
            common = nats_server.common()
            bus = await Bus.connect(common, "test-publisher")
            try:
                await serve_directory(bus)
                await bus.publish(MAIL_RECEIVED, mail("SOCK4", ["nobody@example.test"],
                                                      BodyRef(size=len(BODY), inline=BODY)))
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline:
                    if get("/api/v1/mime/stats")["processed"] == 1:
                        return
                    await asyncio.sleep(0.1)
            finally:
                await bus.close()

        asyncio.run(publish_one())
        wait_for(lambda: get("/api/v1/mime/stats")["routes"].get("failed") == 1)
    finally:
        plat.stop()
