"""kit.bus and kit.blob against a real nats-server and a real SeaweedFS."""

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from postbus.kit.blob import BlobNotFound, BlobStore, blob_key
from postbus.kit.bus import Ack, Bus, Delivery, RemoteError, Retry
from postbus.kit.settings import CommonSettings
from postbus.proto.directory import DIRECTORY_RESOLVE, ResolveReply, ResolveRequest
from postbus.proto.mail import MAIL_RECEIVED, BodyRef, ClientInfo, MailReceived, Recipient


def _msg(qid: str) -> MailReceived:
    return MailReceived(queue_id=qid, received_at=datetime.now(UTC), client=ClientInfo(ip="127.0.0.1"),
                        mail_from="a@b.test", rcpt_to=[Recipient(address="c@d.test")],
                        body=BodyRef(size=5, inline=b"hello"))


async def test_publish_dedup_and_consume_with_retry(bus: Bus) -> None:
    seq1 = await bus.publish(MAIL_RECEIVED, _msg("Q1"), msg_id="Q1")
    seq2 = await bus.publish(MAIL_RECEIVED, _msg("Q1"), msg_id="Q1")
    assert seq1 == seq2  # same message id inside the duplicate window: stored once
    await bus.publish(MAIL_RECEIVED, _msg("Q2"), msg_id="Q2")

    seen: list[tuple[str, int]] = []
    done = asyncio.Event()

    async def handler(d: Delivery[MailReceived]) -> Ack | Retry:
        seen.append((d.data.queue_id, d.num_delivered))
        assert d.data.body.inline == b"hello"
        if d.data.queue_id == "Q2" and d.num_delivered == 1:
            return Retry(0.1)
        if len(seen) >= 3:
            done.set()
        return Ack()

    bus.consume(MAIL_RECEIVED, handler, durable="t")
    await asyncio.wait_for(done.wait(), 10)
    assert sorted(seen) == [("Q1", 1), ("Q2", 1), ("Q2", 2)]


async def test_request_reply_and_errors(bus: Bus) -> None:
    async def resolve(req: ResolveRequest) -> ResolveReply:
        if req.address == "boom@x":
            raise RemoteError("invalid", "no")
        return ResolveReply(status="unknown", domain=req.address.split("@")[1])

    await bus.serve(DIRECTORY_RESOLVE, resolve, queue="q")
    rep = await bus.request(DIRECTORY_RESOLVE, ResolveRequest(address="a@example.test"))
    assert rep.status == "unknown" and rep.domain == "example.test"
    with pytest.raises(RemoteError) as ei:
        await bus.request(DIRECTORY_RESOLVE, ResolveRequest(address="boom@x"))
    assert ei.value.code == "invalid"


async def test_blob_roundtrip_content_addressed(blobs: BlobStore) -> None:
    key = await blobs.put(b"message bytes", verify=True)
    assert key == blob_key(b"message bytes") and key.startswith("blobs/")
    blobs.cache.discard(key)
    assert await blobs.get(key) == b"message bytes"
    assert await blobs.exists(key)
    keys = [b.key async for b in blobs.list()]
    assert key in keys
    await blobs.delete(key)
    with pytest.raises(BlobNotFound):
        await blobs.get(key)


async def test_verify_after_write_follows_the_setting(common_settings: CommonSettings) -> None:
    def gets() -> float:
        return REGISTRY.get_sample_value("postbus_s3_seconds_count", {"op": "get"}) or 0.0

    for verify, extra_gets in ((False, 0), (True, 1)):
        store = BlobStore(common_settings.model_copy(update={"blob_verify_after_write": verify}))
        await store.ensure_bucket()
        before = gets()
        await store.put(f"verify={verify}".encode())
        assert gets() - before == extra_gets
        await store.close()


@pytest.mark.parametrize("size", [100_000, 12 * 1024 * 1024 + 7])  # one PUT; three parts
async def test_put_file_stores_head_and_the_rest_of_the_file(blobs: BlobStore, tmp_path: Path,
                                                             size: int) -> None:
    head = b"Received: from x by y\r\n"
    content = (bytes(range(256)) * (size // 256 + 1))[:size]
    path = tmp_path / "spool"
    path.write_bytes(b"skipped" + content)
    with path.open("rb") as f:
        f.seek(7)  # from the file's position
        key = await blobs.put_file(f, head=head, verify=True)
    assert key == blob_key(head + content)
    assert blobs.cache.get(key) is None  # a spooled body is not kept in memory
    assert await blobs.get(key) == head + content
