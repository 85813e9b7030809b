"""imap-access through its real adapters: store and directory RPCs over a real nats-server
(answered by the in-memory store as a responder), bodies from a real SeaweedFS through the
kit BlobStore, IDLE woken by mailbox.changed on core NATS. mailbox-store itself is not used."""

from __future__ import annotations

import asyncio
import imaplib
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from imapclient import IMAPClient
from prometheus_client import REGISTRY

from postbus.imap_access.adapters import BusChanges, BusStore, S3Blobs, store_error
from postbus.imap_access.memory import MemoryPlatform
from postbus.imap_access.ports import StoreError
from postbus.imap_access.server import ImapServer
from postbus.imap_access.settings import Settings
from postbus.kit.blob import BlobStore
from postbus.kit.bus import Bus, RemoteError
from postbus.kit.directory import DirectoryClient
from postbus.kit.settings import CommonSettings
from postbus.proto import directory as d
from postbus.proto import store as s
from postbus.proto.mail import MAILBOX_CHANGED, MailboxChanged

pytestmark = pytest.mark.timeout(120)

MSG = b"From: bob@example.net\r\nSubject: over the bus\r\n\r\nbody from S3\r\n"


async def serve_memory(bus: Bus, mp: MemoryPlatform) -> None:
    """Answer the directory and store RPCs from the in-memory platform, as mailbox-store
    would: StoreError becomes an RpcError with the same code."""

    def wrap(fn: Callable[[Any], Awaitable[Any]], reply: Callable[[Any], Any] | None = None
             ) -> Callable[[Any], Awaitable[Any]]:
        async def handler(req: Any) -> Any:
            try:
                out = await fn(req)
            except StoreError as exc:
                raise RemoteError(exc.code, exc.message) from exc
            return reply(out) if reply else out
        return handler

    async def auth(req: d.AuthRequest) -> d.AuthReply:
        assert req.service == "imap"
        return await mp.authenticate(req.username, req.password, req.client_ip)

    ok: Callable[[Any], Any] = lambda _: s.Ok()  # noqa: E731
    await bus.serve(d.DIRECTORY_AUTHENTICATE, auth, queue="t")
    for rpc, fn, rep in [
        (s.STORE_MAILBOX_LIST, mp.mailbox_list, None), (s.STORE_MAILBOX_STATUS, mp.mailbox_status, None),
        (s.STORE_MAILBOX_CREATE, mp.mailbox_create, None), (s.STORE_MAILBOX_DELETE, mp.mailbox_delete, ok),
        (s.STORE_MAILBOX_RENAME, mp.mailbox_rename, ok), (s.STORE_MAILBOX_SUBSCRIBE, mp.mailbox_subscribe, ok),
        (s.STORE_SELECT, mp.select, None), (s.STORE_FETCH, mp.fetch, None), (s.STORE_FLAGS, mp.flags, None),
        (s.STORE_COPY, mp.copy, None), (s.STORE_APPEND, mp.append, None),
        (s.STORE_EXPUNGE, mp.expunge, None), (s.STORE_SEARCH, mp.search, None),
        (s.STORE_QUOTA, mp.quota, None),
    ]:
        await bus.serve(rpc, wrap(fn, rep), queue="t")  # type: ignore[arg-type]


async def test_imap_over_nats_and_s3(bus: Bus, blobs: BlobStore,
                                     common_settings: CommonSettings) -> None:
    mp = MemoryPlatform()
    account = mp.add_user("alice@example.test", "secret")
    loop = asyncio.get_running_loop()

    def publish(ev: MailboxChanged) -> None:
        loop.create_task(bus.publish_core(MAILBOX_CHANGED, ev, account_id=str(ev.account_id)))

    mp.listeners.setdefault(account, []).append(publish)
    key = await blobs.put(MSG)
    blobs.cache.discard(key)  # the first FETCH must go to S3
    mp.deliver(account, MSG, notify=False)
    await serve_memory(bus, mp)

    s3blobs = S3Blobs(blobs)
    server = ImapServer(Settings(common=common_settings, auth_fail_delay_s=0),
                        DirectoryClient(bus, "imap", errors=store_error), BusStore(bus),
                        s3blobs, BusChanges(bus))
    [port] = await server.start("127.0.0.1", 0, None)

    async def deliver_later() -> None:
        for _ in range(500):  # once the client is in IDLE (poll, do not sleep)
            if any(s.idling for s in server.sessions.values()):
                break
            await asyncio.sleep(0.01)
        raw = b"Subject: pushed\r\n\r\nnew\r\n"
        await blobs.put(raw)
        mp.deliver(account, raw)

    async def lost() -> None:
        mp.deliver(account, b"Subject: lost\r\n\r\nnot in S3\r\n")

    def client() -> list[Any]:
        with imaplib.IMAP4("127.0.0.1", port) as m:
            with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
                m.login("alice@example.test", "nope")
        with IMAPClient("127.0.0.1", port=port, ssl=False, timeout=10) as c:
            c.login("alice@example.test", "secret")
            with pytest.raises(Exception, match="NONEXISTENT"):
                c.select_folder("Nope")
            c.select_folder("INBOX")
            body = c.fetch([1], ["BODY[]"])[1][b"BODY[]"]
            again = c.fetch([1], ["BODY.PEEK[TEXT]"])[1][b"BODY[TEXT]"]
            c.idle()
            asyncio.run_coroutine_threadsafe(deliver_later(), loop)
            responses = c.idle_check(timeout=10)
            c.idle_done()
            pushed = c.fetch([2], ["BODY[]"])[2][b"BODY[]"]
            with pytest.raises(Exception, match="TRYCREATE"):
                c.copy([1], "Missing")
            # a message whose body never reached S3: NO [UNAVAILABLE], the session goes on
            asyncio.run_coroutine_threadsafe(lost(), loop).result(10)
            c.noop()
            with pytest.raises(Exception, match="UNAVAILABLE"):
                c.fetch([3], ["BODY[]"])
            assert c.fetch([1], ["BODY[]"])[1][b"BODY[]"] == MSG
            return [body, again, responses, pushed]

    try:
        body, again, responses, pushed = await asyncio.to_thread(client)
    finally:
        await server.stop()
    assert body == MSG
    assert again == b"body from S3\r\n"
    assert (2, b"EXISTS") in responses
    assert pushed.startswith(b"Subject: pushed")
    assert s3blobs.misses >= 1 and s3blobs.hits >= 1
    ratio = REGISTRY.get_sample_value("postbus_imap_blob_cache_hit_ratio")
    assert ratio is not None and 0 < ratio < 1
