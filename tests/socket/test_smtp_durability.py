"""'250 means durable' (ARCHITECTURE.md): smtp-ingress answers 250 only after JetStream
acked the message, with the NATS connection up. When the ack cannot come (the stream is
gone, the stream refuses, the ack never arrives) it answers 451 and nothing is stored;
every message answered 250 is in the stream. Issue 12.1: a fire-and-forget publish
passed every earlier test."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from postbus.kit.blob import BlobStore
from postbus.kit.bus import Bus
from postbus.kit.settings import CommonSettings
from postbus.kit.testing import RunningNats
from postbus.proto import ALL_STREAMS
from postbus.proto.mail import INBOUND_STREAM
from postbus.smtp_ingress.settings import Settings
from postbus.smtp_ingress.testing import DirectoryTable, RunningIngress, User, start_ingress

pytestmark = pytest.mark.timeout(60)

STREAM = INBOUND_STREAM.name
BODY = b"From: bob@example.net\r\nTo: alice@example.test\r\nSubject: hi\r\n\r\nhello\r\n"


class PausableProxy:
    """A TCP proxy in front of nats-server that can stop forwarding (the connection stays
    up, nothing reaches the server, no ack comes back) and cut every connection (what was
    held back is dropped, as in a network partition)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.forwarding = asyncio.Event()
        self.forwarding.set()
        self.conns: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _conn(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self.conns += [cw, sw]

        async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await r.read(65536):
                    await self.forwarding.wait()
                    w.write(data)
                    await w.drain()
            with contextlib.suppress(Exception):
                w.close()

        await asyncio.gather(pump(cr, sw), pump(sr, cw))

    def cut(self) -> None:
        for w in self.conns:
            with contextlib.suppress(Exception):
                w.transport.abort()
        self.conns.clear()

    async def stop(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()


@pytest_asyncio.fixture
async def proxy(nats_server: RunningNats) -> AsyncIterator[PausableProxy]:
    p = PausableProxy(int(nats_server.url.rsplit(":", 1)[1]))
    await p.start()
    yield p
    await p.stop()


@pytest_asyncio.fixture
async def ingress(bus: Bus, blobs: BlobStore, common_settings: CommonSettings,
                  proxy: PausableProxy, tmp_path: Path) -> AsyncIterator[RunningIngress]:
    """An ingress whose own NATS connection goes through the proxy; the test's ``bus``
    talks to nats-server directly."""
    assert proxy.server is not None
    port = proxy.server.sockets[0].getsockname()[1]
    own = await Bus.connect(common_settings.model_copy(
        update={"nats_url": f"nats://127.0.0.1:{port}"}), "ingress-under-test")
    s = Settings(common=common_settings, smtp_port=0, submission_port=-1, smtps_port=-1,
                 publish_timeout_s=1, resolve_cache_ttl_s=300)
    table = DirectoryTable(users={"alice@example.test": User("secret")})
    r = await start_ingress(own, blobs, s, tmp_path, table)
    yield r
    await r.ingress.stop()
    await own.close()


async def send(port: int, body: bytes = BODY) -> tuple[int, str]:
    """One SMTP transaction; the reply to the final dot."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        async def reply() -> tuple[int, str]:
            while True:
                line = (await asyncio.wait_for(r.readline(), 20)).decode()
                if line[3:4] != "-":
                    return int(line[:3]), line[4:].strip()

        assert (await reply())[0] == 220
        for cmd in ("EHLO c.example.net", "MAIL FROM:<bob@example.net>",
                    "RCPT TO:<alice@example.test>", "DATA"):
            w.write(cmd.encode() + b"\r\n")
            code, text = await reply()
            assert code in (250, 354), (cmd, code, text)
        w.write(body + b".\r\n")
        return await reply()
    finally:
        w.close()


async def stored_queue_ids(bus: Bus) -> list[str]:
    info = await bus.js.stream_info(STREAM)
    ids = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        with contextlib.suppress(Exception):
            msg = await bus.js.get_msg(STREAM, seq)
            ids.append(json.loads(msg.data)["queue_id"])
    return ids


def queue_id(text: str) -> str:
    assert "queued as" in text, text
    return text.rsplit(" ", 1)[1]


async def test_every_250_is_in_the_stream(ingress: RunningIngress, bus: Bus) -> None:
    ids = []
    for _ in range(5):
        code, text = await send(ingress.port())
        assert code == 250
        ids.append(queue_id(text))
    assert await stored_queue_ids(bus) == ids


async def test_deleted_stream_gives_451_and_stores_nothing(ingress: RunningIngress,
                                                           bus: Bus) -> None:
    await bus.js.delete_stream(STREAM)
    code, text = await send(ingress.port())
    assert (code, text[:5]) == (451, "4.3.0")
    await bus.ensure_streams(ALL_STREAMS)  # as the services do at start-up
    assert await stored_queue_ids(bus) == []
    code, text = await send(ingress.port())
    assert code == 250 and await stored_queue_ids(bus) == [queue_id(text)]


async def test_stream_that_refuses_gives_451(ingress: RunningIngress, bus: Bus) -> None:
    # a full stream that discards new messages answers the publish with an error, not an ack
    info = await bus.js.stream_info(STREAM)
    cfg = info.config
    cfg.max_msgs, cfg.discard = 1, "new"
    await bus.js.update_stream(cfg)
    code, text = await send(ingress.port())
    assert code == 250
    first = queue_id(text)
    code, text = await send(ingress.port())
    assert (code, text[:5]) == (451, "4.3.0")
    assert await stored_queue_ids(bus) == [first]


async def test_ack_that_never_comes_gives_451_and_stores_nothing(
        ingress: RunningIngress, bus: Bus, proxy: PausableProxy) -> None:
    code, text = await send(ingress.port())  # the recipient's lookup is cached now
    assert code == 250
    ids = [queue_id(text)]
    # the connection stays up (is_connected is True) but nothing reaches nats-server
    proxy.forwarding.clear()
    code, text = await send(ingress.port())
    assert (code, text[:5]) == (451, "4.3.0")
    proxy.cut()  # the partition ends with the held-back bytes lost
    proxy.forwarding.set()
    for _ in range(100):  # the ingress reconnects through the proxy
        code, text = await send(ingress.port())
        if code == 250:
            break
        await asyncio.sleep(0.1)
    assert code == 250
    assert await stored_queue_ids(bus) == [*ids, queue_id(text)]
