"""smtp-ingress walking skeleton: MX accepts mail for a local recipient (resolved over the
bus), the message is in JetStream when 250 arrives."""

from __future__ import annotations

import asyncio
import smtplib
from pathlib import Path

import pytest_asyncio

from postbus.kit.blob import BlobStore
from postbus.kit.bus import Bus
from postbus.kit.settings import CommonSettings
from postbus.smtp_ingress.settings import Settings
from postbus.smtp_ingress.testing import DirectoryTable, Inbox, RunningIngress, User, start_ingress

BODY = b"From: bob@example.net\r\nTo: alice@example.test\r\nSubject: hi\r\n\r\nhello\r\n"


@pytest_asyncio.fixture
async def ing(bus: Bus, blobs: BlobStore, common_settings: CommonSettings,
              tmp_path: Path) -> RunningIngress:
    table = DirectoryTable(users={"alice@example.test": User("secret")})
    s = Settings(common=common_settings, smtp_port=0, submission_port=0, smtps_port=0)
    r = await start_ingress(bus, blobs, s, tmp_path, table)
    yield r
    await r.ingress.stop()


async def test_mx_accepts_local_recipient_after_ack(ing: RunningIngress, bus: Bus) -> None:
    inbox = Inbox(bus)

    def send() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", ing.port("mx"), timeout=10) as s:
            s.ehlo("client.example.net")
            assert s.docmd("MAIL FROM:<bob@example.net>")[0] == 250
            assert s.docmd("RCPT TO:<alice@example.test>")[0] == 250
            code, resp = s.docmd("RCPT TO:<nobody@example.test>")
            assert (code, resp[:5]) == (550, b"5.1.1"), resp
            return s.data(BODY)

    code, resp = await asyncio.to_thread(send)
    assert code == 250 and resp.startswith(b"2.0.0 Ok: queued as "), resp
    qid = resp.split()[-1].decode()
    msg = await inbox.get()
    assert msg.queue_id == qid
    assert [r.address for r in msg.rcpt_to] == ["alice@example.test"]
    assert msg.mail_from == "bob@example.net"
    assert msg.body.inline is not None and msg.body.inline.endswith(BODY)
    assert msg.body.inline.startswith(b"Received: from client.example.net")
