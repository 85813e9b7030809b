"""Outbound mail through the whole platform: SMTP in from a trusted network, mime-processor
routes remote recipients to the relay, the relay delivers one to a remote aiosmtpd (through
the transport map) and bounces the other; the bounce comes back to the local sender's
mailbox as an RFC 3464 report, readable over IMAP."""

from __future__ import annotations

import email
import email.policy
import re
import smtplib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiosmtpd.controller import Controller
from inbox_support import first_in_inbox

from postbus.kit import embedded
from postbus.kit.testing import Platform, RunningNats, RunningS3, start_platform, wait_for

pytestmark = pytest.mark.timeout(300)

BODY = (b"From: Alice <alice@example.test>\r\nTo: carol@example.net, nobody@example.net\r\n"
        b"Subject: outbound e2e\r\nMessage-ID: <out-1@example.test>\r\n"
        b"Date: Thu, 26 Nov 2026 17:00:00 +0000\r\n\r\nHello out there.\r\n")


class RemoteHandler:
    def __init__(self) -> None:
        self.got: list[tuple[str, list[str], bytes]] = []

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        if address.startswith("nobody@"):
            return "550 5.1.1 <nobody@example.net>: Recipient address rejected"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.got.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
        return "250 2.0.0 queued"


@pytest.fixture
def remote() -> Iterator[tuple[int, RemoteHandler]]:
    handler = RemoteHandler()
    port = embedded.free_port()
    ctl = Controller(handler, hostname="127.0.0.1", port=port, decode_data=False)
    ctl.start()
    yield port, handler
    ctl.stop()


@pytest.fixture
def outbound_platform(nats_server: RunningNats, s3_server: RunningS3, tmp_path: Path,
                      remote: tuple[int, RemoteHandler]) -> Iterator[Platform]:
    plat = start_platform(tmp_path / "platform", nats_server, s3_server.endpoint, extra_env={
        "POSTBUS_RELAY_TRANSPORT_MAP": f"example.net=127.0.0.1:{remote[0]}",
        "POSTBUS_RELAY_RETRY_SCHEDULE": "1",
        "POSTBUS_TRUSTED_NETWORKS": "127.0.0.1/32",
    })
    yield plat
    plat.stop()


def test_relay_and_bounce_through_the_platform(outbound_platform: Platform,
                                               remote: tuple[int, RemoteHandler]) -> None:
    plat = outbound_platform
    _, handler = remote
    auth = {"Authorization": f"Bearer {plat.token}"}
    with httpx.Client(base_url=plat.api("mailbox-store"), headers=auth, timeout=10) as c:
        assert c.post("/api/v1/domains", json={"name": "example.test"}).status_code == 201
        assert c.post("/api/v1/users", json={"address": "alice@example.test",
                                             "password": "secret"}).status_code == 201

    with smtplib.SMTP("127.0.0.1", plat.port("smtp-ingress", "smtp_port"), timeout=10) as s:
        s.ehlo("client.example.test")
        code, resp = s.docmd("MAIL FROM:<alice@example.test>")
        assert code == 250, resp
        for rcpt in ("carol@example.net", "nobody@example.net"):
            code, resp = s.docmd(f"RCPT TO:<{rcpt}>")
            assert code == 250, resp
        code, resp = s.data(BODY)
        assert code == 250, resp
    m = re.search(rb"queued as (\S+)", resp)
    assert m, resp
    qid = m.group(1).decode()

    wait_for(lambda: len(handler.got) == 1, timeout=60)
    mail_from, rcpts, data = handler.got[0]
    assert mail_from == "alice@example.test" and rcpts == ["carol@example.net"]
    assert b"Hello out there." in data and b"Subject: outbound e2e" in data

    _, raw = first_in_inbox(plat, "(BODY.PEEK[])", timeout=60)
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    assert "MAILER-DAEMON@" in str(msg["From"])
    rcpt = list(msg.iter_parts())[1].get_payload()[1]
    assert rcpt["Final-Recipient"] == "rfc822; nobody@example.net"
    assert rcpt["Action"] == "failed" and rcpt["Status"] == "5.1.1"

    # the relay's management API: the message's history across services
    with httpx.Client(base_url=plat.api("relay"), headers=auth, timeout=10) as c:
        def kinds() -> list[tuple[str, str]]:
            evs = c.get(f"/api/v1/queue/{qid}/events").json()
            return [(e["recipient"], e["kind"]) for e in evs if e["service"] == "relay"]

        wait_for(lambda: ("nobody@example.net", "bounced") in kinds(), timeout=30)
        assert ("carol@example.net", "relayed") in kinds()
        assert ("nobody@example.net", "failed") in kinds()
        assert c.get("/api/v1/queue").json() == []
        metrics = httpx.get(plat.api("relay") + "/metrics").text
        assert 'postbus_relay_deliveries_total{outcome="relayed"} 1.0' in metrics

    # a bounce for a remote sender goes out through the relay again, from the null sender
    with smtplib.SMTP("127.0.0.1", plat.port("smtp-ingress", "smtp_port"), timeout=10) as s:
        s.ehlo("client.example.test")
        assert s.docmd("MAIL FROM:<bob@example.net>")[0] == 250
        assert s.docmd("RCPT TO:<nobody@example.net>")[0] == 250
        assert s.data(BODY.replace(b"alice@example.test", b"bob@example.net"))[0] == 250
    wait_for(lambda: len(handler.got) == 2, timeout=60)
    mail_from, rcpts, data = handler.got[1]
    assert mail_from in ("", "<>") and rcpts == ["bob@example.net"]  # aiosmtpd keeps "<>"
    dsn = email.message_from_bytes(data, policy=email.policy.default)
    assert dsn.get_content_type() == "multipart/report"
