"""Issue 8.3: NATS without authentication let anyone who could reach it call store.* and
directory.* for any account and relay mail as anyone. Each service now has its own user,
allowed only its subjects (libs/kit/natsauth.py), on a real nats-server."""

from __future__ import annotations

import asyncio

import nats
import pytest

from postbus.kit.bus import Bus
from postbus.kit.natsauth import GRANTS, KV, inbox_prefix
from postbus.kit.testing import RunningNats
from postbus.proto.directory import DIRECTORY_RESOLVE, ResolveRequest

pytestmark = pytest.mark.timeout(60)


async def connect_as(server: RunningNats, user: str | None) -> tuple[nats.NATS, list[str]]:
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    nc = await nats.connect(server.url, user=user, password=server.passwords.get(user or ""),
                            error_cb=on_error, allow_reconnect=False,
                            inbox_prefix=inbox_prefix(user or "anon"))
    return nc, errors


async def denied(nc: nats.NATS, errors: list[str], subject: str) -> bool:
    """Publish and see whether the server answered a permissions violation."""
    before = len(errors)
    await nc.publish(subject, b"{}")
    await nc.flush()
    for _ in range(50):
        if len(errors) > before:
            return "ermissions" in errors[-1]
        await asyncio.sleep(0.02)
    return False


async def test_no_credentials_no_connection(nats_server: RunningNats) -> None:
    with pytest.raises(Exception, match="(?i)authorization"):
        await connect_as(nats_server, None)


async def test_a_reader_cannot_queue_mail_or_look_up_addresses(nats_server: RunningNats) -> None:
    nc, errors = await connect_as(nats_server, "imap-access")
    try:
        for subject in ("mail.outbound.queued.v1", "mail.inbound.received.v1",
                        "mail.deliver.local.v1", "directory.resolve.v1",
                        "$JS.API.STREAM.PURGE.POSTBUS_INBOUND",
                        "$JS.API.STREAM.DELETE.POSTBUS_DELIVER",
                        "$JS.API.CONSUMER.CREATE.POSTBUS_INBOUND"):
            assert await denied(nc, errors, subject), subject
        # what it needs is allowed
        assert not await denied(nc, errors, "store.select.v1")
        assert not await denied(nc, errors, "directory.authenticate.v1")
        # no other service's replies can be read
        before = len(errors)
        await nc.subscribe(inbox_prefix("mailbox-store") + ".>")
        await nc.flush()
        for _ in range(50):
            if len(errors) > before:
                break
            await asyncio.sleep(0.02)
        assert len(errors) > before and "ermissions" in errors[-1], errors
    finally:
        await nc.close()


async def test_ingress_publishes_only_inbound_mail(nats_server: RunningNats) -> None:
    nc, errors = await connect_as(nats_server, "smtp-ingress")
    try:
        assert not await denied(nc, errors, "mail.inbound.received.v1")
        for subject in ("mail.outbound.queued.v1", "mail.deliver.local.v1", "store.append.v1",
                        "mailbox.changed.v1.7"):
            assert await denied(nc, errors, subject), subject
    finally:
        await nc.close()


async def test_each_service_works_with_its_own_grants(nats_server: RunningNats) -> None:
    # the store answers a directory RPC to an ingress that uses its own user
    store = await Bus.connect(nats_server.common(nats_user="mailbox-store",
                                                 nats_password=nats_server.passwords["mailbox-store"]),
                              "mailbox-store")
    ingress = await Bus.connect(nats_server.common(nats_user="smtp-ingress",
                                                   nats_password=nats_server.passwords["smtp-ingress"]),
                                "smtp-ingress")
    try:
        async def resolve(req: ResolveRequest) -> object:
            from postbus.proto.directory import ResolveReply
            return ResolveReply(status="remote", domain=req.address.rsplit("@", 1)[1])

        await store.serve(DIRECTORY_RESOLVE, resolve, queue="mailbox-store")  # type: ignore[arg-type]
        await store.nc.flush()  # the subscription is on the server before the request
        r = await ingress.request(DIRECTORY_RESOLVE, ResolveRequest(address="x@remote.test"))
        assert r.status == "remote"
        # and opens its KV buckets
        for bucket in KV["smtp-ingress"]:
            await ingress.kv(bucket)
        # and reads the depth of the work queues behind it (in-flow delay), no more
        from postbus.proto.mail import DELIVER_STREAM, INBOUND_STREAM

        await store.ensure_streams([DELIVER_STREAM])
        await ingress.ensure_streams([INBOUND_STREAM])
        assert await ingress.stream_messages(DELIVER_STREAM.name) >= 0
        assert await ingress.stream_messages(INBOUND_STREAM.name) >= 0
    finally:
        await ingress.close()
        await store.close()


def test_every_service_has_grants_and_the_buckets_match_the_code() -> None:
    from postbus.kit.topology import SERVICES
    from postbus.mailbox_store.directory_rpc import LoginThrottle
    from postbus.mime_processor.adapters import MEMO_BUCKET
    from postbus.pop3_access.settings import Settings as Pop3
    from postbus.relay.settings import Settings as Relay
    from postbus.smtp_ingress.adapters import AUTHFAIL_BUCKET, BLOCKLIST_BUCKET, LOAD_BUCKET

    assert set(GRANTS) == {s.name for s in SERVICES}
    assert set(KV["smtp-ingress"]) == {AUTHFAIL_BUCKET, BLOCKLIST_BUCKET, LOAD_BUCKET}
    assert KV["mime-processor"] == (MEMO_BUCKET,)
    assert KV["mailbox-store"] == (LoginThrottle.BUCKET,)
    assert set(KV["relay"]) == {Relay().queue_bucket, Relay().bounce_bucket}
    p = Pop3()
    assert set(KV["pop3-access"]) == {p.lock_bucket, p.auth_bucket, p.login_delay_bucket}
