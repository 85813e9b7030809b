"""The walking skeleton: one message from SMTP to IMAP and POP3 through every service,
with the real platform (each service its own process, real nats-server, real SeaweedFS)."""

from __future__ import annotations

import poplib
import smtplib

import httpx
import pytest
from inbox_support import first_in_inbox

from postbus.kit.testing import Platform

pytestmark = pytest.mark.timeout(300)

BODY = (
    b"From: Bob <bob@example.net>\r\n"
    b"To: Alice <alice@example.test>\r\n"
    b"Subject: walking skeleton\r\n"
    b"Message-ID: <skeleton-1@example.net>\r\n"
    b"Date: Thu, 26 Nov 2026 17:00:00 +0000\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Hello Alice,\r\n"
    b"..a line that starts with a dot (stuffed on the wire)\r\n"
    b"bye\r\n"
)

TRACE = (b"received:", b"return-path:", b"delivered-to:", b"authentication-results:")


def strip_trace(raw: bytes) -> bytes:
    """Drop the trace headers the platform prepends (and their folded continuation lines)."""
    out, skipping = [], False
    lines = raw.split(b"\r\n")
    header_end = lines.index(b"")
    for i, line in enumerate(lines):
        if i < header_end:
            if line[:1] in (b" ", b"\t"):
                if skipping:
                    continue
            else:
                skipping = line.lower().startswith(TRACE)
                if skipping:
                    continue
        out.append(line)
    return b"\r\n".join(out)


def provision(plat: Platform, address: str = "alice@example.test", password: str = "secret") -> None:
    api = plat.api("mailbox-store")
    auth = {"Authorization": f"Bearer {plat.token}"}
    with httpx.Client(base_url=api, headers=auth, timeout=10) as c:
        assert c.post("/api/v1/domains", json={"name": address.split("@")[1]}).status_code == 201
        assert c.post("/api/v1/domains", json={"name": address.split("@")[1]}).status_code == 409
        assert c.post("/api/v1/users", json={"address": address, "password": password}).status_code == 201
        assert c.post("/api/v1/users", json={"address": address, "password": password}).status_code == 409
        assert c.post("/api/v1/users", json={"address": "not an address", "password": "x"}).status_code == 422
    assert httpx.post(api + "/api/v1/domains", json={"name": "x.test"}).status_code == 401


def test_one_message_smtp_to_imap_and_pop3(platform: Platform) -> None:
    provision(platform)

    with smtplib.SMTP("127.0.0.1", platform.port("smtp-ingress", "smtp_port"), timeout=10) as s:
        s.ehlo("client.example.net")
        code, resp = s.docmd("MAIL FROM:<bob@example.net>")
        assert code == 250
        code, resp = s.docmd("RCPT TO:<alice@example.test>")
        assert code == 250, resp
        code, resp = s.docmd("RCPT TO:<nobody@example.test>")
        assert code == 550, resp
        code, resp = s.data(BODY)
        assert code == 250 and b"queued as" in resp, resp

    # IMAP: LOGIN, SELECT, FETCH
    head, raw = first_in_inbox(platform, "(BODY.PEEK[] RFC822.SIZE)", timeout=30)
    assert raw.lower().startswith((b"return-path:", b"delivered-to:", b"received:"))
    assert strip_trace(raw) == BODY
    assert f"RFC822.SIZE {len(raw)}".encode() in head

    # POP3: USER, PASS, STAT, LIST, RETR, QUIT (keep mode: no DELE)
    p = poplib.POP3("127.0.0.1", platform.port("pop3-access", "pop3_port"), timeout=10)
    try:
        p.user("alice@example.test")
        p.pass_("secret")
        count, size = p.stat()
        assert count == 1
        _, listing, _ = p.list()
        assert listing == [f"1 {size}".encode()]
        _, lines, octets = p.retr(1)
        pop_raw = b"\r\n".join(lines) + b"\r\n"
        assert pop_raw == raw
        assert octets == size
    finally:
        p.quit()


def test_every_service_serves_probes_and_openapi(platform: Platform) -> None:
    for name in platform.ports:
        base = platform.api(name)
        assert httpx.get(base + "/healthz").status_code == 200
        ready = httpx.get(base + "/readyz")
        assert ready.status_code == 200, ready.text
        checks = ready.json()["checks"]
        assert {"nats", "s3"} <= set(checks)
        if name == "mailbox-store":
            assert "database" in checks
        metrics = httpx.get(base + "/metrics")
        assert metrics.status_code == 200 and "python_info" in metrics.text
        spec = httpx.get(base + "/openapi.json").json()
        assert spec["info"]["title"] == f"Postbus {name}"
