"""``python -m postbus.pop3_access`` as its own process on free ports, against a real NATS and
S3, with a small directory/store responder served from the test on the same bus."""

from __future__ import annotations

import asyncio
import json
import poplib
import ssl
import urllib.request
from pathlib import Path

from postbus.kit.blob import BlobStore
from postbus.kit.bus import Bus
from postbus.kit.settings import CommonSettings
from postbus.kit.testing import ADMIN_TOKEN, RunningNats, RunningS3, start_platform
from postbus.kit.topology import BY_NAME
from postbus.pop3_access.memory import MemoryDirectory, MemoryMaildrops, serve_on_bus


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as r:
        return bytes(r.read())


async def test_service_process_serves_pop3_and_pop3s(
        bus: Bus, blobs: BlobStore, common_settings: CommonSettings,
        nats_server: RunningNats, s3_server: RunningS3, tmp_path: Path) -> None:
    directory, store = MemoryDirectory(), MemoryMaildrops()
    acc = directory.add("bob@example.test", "pw", 3, policy="keep", expire_days=14)
    body = b"Subject: hi\r\n\r\nfrom S3\r\n"
    await blobs.put(body)
    store.deliver(acc.account_id, body)

    await serve_on_bus(bus, directory, store)

    plat = await asyncio.to_thread(
        start_platform, tmp_path / "plat", nats_server, s3_server.endpoint,
        extra_env={"POSTBUS_S3_BUCKET": common_settings.s3_bucket},
        services=(BY_NAME["pop3-access"],))
    try:
        port = plat.port("pop3-access", "pop3_port")
        tls_port = plat.port("pop3-access", "pop3s_port")

        def clients() -> tuple[list[str], list[bytes], list[str], dict[str, object]]:
            p = poplib.POP3("127.0.0.1", port, timeout=10)
            assert p.getwelcome().startswith(b"+OK")
            p.user("bob@example.test")
            p.pass_("pw")
            caps = [" ".join([k, *v]) for k, v in p.capa().items()]
            lines = p.retr(1)[1]
            p.dele(1)
            p.quit()
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            s = poplib.POP3_SSL("127.0.0.1", tls_port, context=ctx, timeout=10)
            s.user("bob@example.test")
            s.pass_("pw")
            after = [x.decode() for x in s.list()[1]]
            s.quit()
            req = urllib.request.Request(plat.api("pop3-access") + "/api/v1/pop3/stats",
                                         headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
            with urllib.request.urlopen(req, timeout=5) as r:
                stats = json.loads(r.read())
            return caps, lines, after, stats

        caps, lines, after, stats = await asyncio.to_thread(clients)
        assert "EXPIRE 14" in caps and "LOGIN-DELAY 0" in caps
        assert lines == [b"Subject: hi", b"", b"from S3"]
        assert after == []  # policy keep: hidden from POP3 ...
        assert [m.hidden for m in store.mailbox(3).messages] == [True]  # ... kept for IMAP
        assert stats["logins_ok"] == 2 and stats["retrieved"] == 1
        metrics = await asyncio.to_thread(_get, plat.api("pop3-access") + "/metrics")
        assert b"postbus_pop3_logins_total" in metrics
    finally:
        await asyncio.to_thread(plat.stop)
