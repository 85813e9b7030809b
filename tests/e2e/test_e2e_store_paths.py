"""The real mailbox-store behind IMAP, POP3 and submission (issue 12.5): most IMAP and POP3
behaviour is pinned against in-memory stand-ins; these paths go through every service as a
process, over the bus with the services' own NATS users, into SQL and S3."""

from __future__ import annotations

import imaplib
import poplib
import smtplib
import ssl

import httpx
import pytest

from postbus.kit.testing import Platform, wait_for

pytestmark = pytest.mark.timeout(300)


def msg(subject: str, body: str = "hello") -> bytes:
    return (f"From: Carol <carol@example.net>\r\nTo: someone@example.test\r\n"
            f"Subject: {subject}\r\nMessage-ID: <{subject.replace(' ', '-')}@example.net>\r\n"
            f"\r\n{body}\r\n").encode()


def provision(plat: Platform) -> None:
    auth = {"Authorization": f"Bearer {plat.token}"}
    with httpx.Client(base_url=plat.api("mailbox-store") + "/api/v1", headers=auth,
                      timeout=30) as c:
        c.post("/domains", json={"name": "example.test"}).raise_for_status()
        for user, policy in (("alice", "client"), ("bob", "keep")):
            c.post("/users", json={"address": f"{user}@example.test", "password": "secret",
                                   "pop3_policy": policy}).raise_for_status()


def mx(plat: Platform, rcpt: str, body: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", plat.port("smtp-ingress", "smtp_port"), timeout=10) as s:
        s.sendmail("carol@example.net", [rcpt], body)


def imap(plat: Platform, user: str = "alice@example.test") -> imaplib.IMAP4:
    m = imaplib.IMAP4("127.0.0.1", plat.port("imap-access", "imap_port"))
    m.login(user, "secret")
    return m


def count(plat: Platform, user: str, mailbox: str = "INBOX") -> int:
    m = imap(plat, user)
    try:
        typ, data = m.status(mailbox, "(MESSAGES)")
        return int(data[0].split(b"MESSAGES ")[1].rstrip(b")"))
    finally:
        m.logout()


def pop3(plat: Platform, user: str) -> poplib.POP3:
    p = poplib.POP3("127.0.0.1", plat.port("pop3-access", "pop3_port"), timeout=10)
    p.user(user)
    p.pass_("secret")
    return p


def test_submission_pop3_modes_and_imap_through_the_real_store(platform: Platform) -> None:
    provision(platform)

    # submission with AUTH (STARTTLS on 587-style port), to a local recipient
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", platform.port("smtp-ingress", "submission_port"),
                      timeout=10) as s:
        s.starttls(context=ctx)
        s.login("alice@example.test", "secret")
        s.sendmail("alice@example.test", ["bob@example.test"], msg("submitted"))
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            s.sendmail("alice@example.test", ["nobody@example.test"], msg("nobody"))
    for i in range(3):
        mx(platform, "alice@example.test", msg(f"mx {i}", body=f"needle {i}"))
    wait_for(lambda: count(platform, "alice@example.test") == 3
             and count(platform, "bob@example.test") == 1, timeout=60)

    # POP3, client policy: DELE then RSET keeps everything; DELE then QUIT expunges
    p = pop3(platform, "alice@example.test")
    assert p.stat()[0] == 3
    p.dele(1)
    assert p.stat()[0] == 2
    p.rset()
    assert p.stat()[0] == 3
    p.quit()
    assert count(platform, "alice@example.test") == 3
    p = pop3(platform, "alice@example.test")
    p.dele(3)
    p.quit()
    wait_for(lambda: count(platform, "alice@example.test") == 2, timeout=10)

    # POP3, keep policy: DELE hides the message from POP3, IMAP still has it
    p = pop3(platform, "bob@example.test")
    assert p.stat()[0] == 1
    p.dele(1)
    p.quit()
    p = pop3(platform, "bob@example.test")
    assert p.stat()[0] == 0
    p.quit()
    assert count(platform, "bob@example.test") == 1

    # IMAP: APPEND, STORE, SEARCH, COPY, MOVE, EXPUNGE; a second session sees each change
    m = imap(platform)
    other = imap(platform)
    try:
        typ, data = m.append("INBOX", "(\\Flagged)", None, msg("appended", "haystack"))
        assert typ == "OK" and b"APPENDUID" in data[0]
        m.select("INBOX")
        # \Recent (RFC 3501 §2.3.2): no session had seen these; the first SELECT claims them
        assert m.response("RECENT")[1] == [b"3"]
        assert m.search(None, "ALL")[1] == [b"1 2 3"]
        assert m.search(None, "NEW")[1] == [b"1 2 3"]
        assert m.search(None, "FLAGGED")[1] == [b"3"]
        # delivery order is not arrival order (mime-processor works in parallel): ask first
        typ, data = m.fetch("1:2", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        left = [x[1].strip() for x in data if isinstance(x, tuple)]
        assert len(left) == 2 and all(s.startswith(b"Subject: mx ") for s in left)
        second = left[1].split(b": ", 1)[1].decode()
        assert m.search(None, "SUBJECT", f'"{second}"')[1] == [b"2"]
        needle = "needle " + second[-1]
        assert m.search(None, "BODY", f'"{needle}"')[1] == [b"2"]  # text from S3
        assert m.search(None, "BODY", "needle")[1] == [b"1 2"]
        m.store("1", "+FLAGS", "(\\Seen $Important)")
        other.select("INBOX", readonly=True)
        assert other.response("RECENT")[1] == [b"0"]  # m was told first
        typ, data = other.fetch("1", "(FLAGS)")
        assert b"$Important" in data[0] and b"\\Seen" in data[0]
        m.create("Work")
        assert m.copy("1", "Work")[0] == "OK"
        assert m._simple_command("MOVE", "2", "Work")[0] == "OK"  # RFC 6851
        assert m.response("EXPUNGE")[1] == [b"2"]  # MOVE expunges from the source
        typ, data = m.status("Work", "(MESSAGES)")
        assert data == [b"Work (MESSAGES 2)"]
        m.store("1", "+FLAGS", "(\\Deleted)")
        typ, data = m.expunge()
        assert data == [b"1"]
        typ, data = m.search(None, "ALL")
        assert data == [b"1"]  # only the appended one is left in INBOX
        # MOVE into the selected mailbox (RFC 6851): a new UID, the old one expunged, at once
        assert m._simple_command("MOVE", "1", "INBOX")[0] == "OK"
        assert m.response("EXPUNGE")[1] == [b"1"]
        assert m.search(None, "RECENT")[1] == [b"1"]
        typ, data = m.fetch("1", "(UID FLAGS)")
        assert b"UID 5 " in data[0] and b"\\Recent" in data[0] and b"\\Deleted" not in data[0]
        typ, data = other.status("INBOX", "(MESSAGES)")
        assert data == [b"INBOX (MESSAGES 1)"]
        typ, data = other.select("Work")
        assert data == [b"2"]
        typ, data = other.fetch("1:2", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        subjects = sorted(x[1].strip() for x in data if isinstance(x, tuple))
        assert subjects == sorted(left)
        # a large APPEND (past what imap-access summarises itself) is summarised by the store
        big = (b"From: a@example.net\r\nSubject: big\r\nMIME-Version: 1.0\r\n"
               b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
               b"Content-Type: text/plain\r\n\r\n" + b"y" * 200_000 + b"\r\n--b\r\n"
               b"Content-Type: text/html\r\n\r\n<p>z</p>\r\n--b--\r\n")
        assert m.append("Work", None, None, big)[0] == "OK"
        m.select("Work")
        typ, data = m.fetch("3", "(RFC822.SIZE BODYSTRUCTURE ENVELOPE)")
        assert f"RFC822.SIZE {len(big)} ".encode() in data[0]
        assert b'("text" "html"' in data[0] and b'"mixed"' in data[0] and b'"big"' in data[0]
    finally:
        m.logout()
        other.logout()
