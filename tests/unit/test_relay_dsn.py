"""RFC 3464 DSN builder and RFC 3461 helpers (pure)."""

from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postbus.protocols.dsn import (
    RecipientReport,
    Report,
    build_dsn,
    delivery_status,
    enhanced_status,
    header_block,
    orcpt_param,
    xtext_encode,
)

ORIGINAL = (b"From: Bob <bob@example.test>\r\nTo: carol@example.net\r\nSubject: lunch?\r\n"
            b"Message-ID: <m1@example.test>\r\n\r\nSee you at noon.\r\n-- \r\nBob\r\n")
WHEN = datetime(2026, 11, 26, 17, 0, tzinfo=UTC)


def _report(**kw: object) -> Report:
    base: dict[str, object] = dict(
        reporting_mta="mx.example.test", sender="bob@example.test", date=WHEN,
        envelope_id="ENV-1", arrival_date=WHEN, ret="FULL", original=ORIGINAL,
        recipients=[RecipientReport(
            final_recipient="carol@example.net", action="failed", status="5.1.1",
            original_recipient="rfc822;Carol@example.net",
            diagnostic="550 5.1.1 <carol@example.net>: user unknown\nsecond line",
            remote_mta="mx.example.net", last_attempt=WHEN)])
    base.update(kw)
    return Report(**base)  # type: ignore[arg-type]


def _parse(raw: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(raw, policy=email.policy.default)  # type: ignore[return-value]


def test_full_report_parses_back_as_multipart_report() -> None:
    raw = build_dsn(_report(), message_id="DSN1@mx.example.test")
    assert b"\n" not in raw.replace(b"\r\n", b"")  # CRLF only
    msg = _parse(raw)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@mx.example.test>"
    assert msg["To"] == "bob@example.test"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert "lunch?" in msg["Subject"] and msg["Subject"].startswith("Undelivered")
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "message/delivery-status", "message/rfc822"]
    assert "carol@example.net" in parts[0].get_content()
    # message/delivery-status: per-message block, then one block per recipient
    blocks = parts[1].get_payload()
    assert len(blocks) == 2
    per_msg, per_rcpt = blocks
    assert per_msg["Reporting-MTA"] == "dns; mx.example.test"
    assert per_msg["Original-Envelope-Id"] == "ENV-1"
    assert per_msg["Arrival-Date"] == "Thu, 26 Nov 2026 17:00:00 +0000"
    assert per_rcpt["Final-Recipient"] == "rfc822; carol@example.net"
    assert per_rcpt["Original-Recipient"] == "rfc822;Carol@example.net"
    assert per_rcpt["Action"] == "failed"
    assert per_rcpt["Status"] == "5.1.1"
    assert per_rcpt["Remote-MTA"] == "dns; mx.example.net"
    assert "user unknown second line" in " ".join(per_rcpt["Diagnostic-Code"].split())
    assert per_rcpt["Diagnostic-Code"].startswith("smtp; 550 5.1.1")
    assert per_rcpt["Last-Attempt-Date"] == "Thu, 26 Nov 2026 17:00:00 +0000"
    inner = parts[2].get_payload()[0]
    assert inner["Message-ID"] == "<m1@example.test>"
    assert "See you at noon." in inner.get_content()


def test_ret_hdrs_carries_only_the_header_section() -> None:
    msg = _parse(build_dsn(_report(ret="HDRS"), message_id="x@y"))
    third = list(msg.iter_parts())[2]
    assert third.get_content_type() == "text/rfc822-headers"
    text = third.get_payload(decode=True)
    assert b"Subject: lunch?" in text and b"See you at noon" not in text


def test_without_original_two_parts_and_delayed_fields() -> None:
    rep = _report(original=None, recipients=[RecipientReport(
        final_recipient="dave@example.org", action="delayed", status="4.4.1",
        diagnostic="connect to mx: refused", will_retry_until=WHEN, last_attempt=WHEN)])
    msg = _parse(build_dsn(rep, message_id="x@y"))
    parts = list(msg.iter_parts())
    assert len(parts) == 2
    assert msg["Subject"].startswith("Delayed Mail")
    rcpt = parts[1].get_payload()[1]
    assert rcpt["Action"] == "delayed" and rcpt["Will-Retry-Until"]
    assert rcpt["Original-Recipient"] is None


def test_boundary_never_appears_in_the_original() -> None:
    first = build_dsn(_report(), message_id="a@b")
    bnd = _parse(first).get_boundary()
    assert bnd
    evil = ORIGINAL + b"--" + bnd.encode() + b"\r\n"
    msg = _parse(build_dsn(_report(original=evil), message_id="a@b"))
    assert msg.get_boundary() != bnd
    assert len(list(msg.iter_parts())) == 3


def test_header_injection_and_non_ascii_are_neutralised() -> None:
    rep = _report(recipients=[RecipientReport(
        final_recipient="x@example.net\r\nBcc: evil@example.org", action="failed",
        status="5.0.0", diagnostic="550 caf\u00e9\r\nX-Injected: 1")])
    raw = build_dsn(rep, message_id="a@b")
    assert b"\r\nBcc:" not in raw and b"\r\nX-Injected" not in raw
    status = delivery_status(rep)
    assert status.isascii()


def test_eight_bit_original_gets_8bit_cte() -> None:
    orig = "Subject: caf\u00e9\r\n\r\nna\u00efve\r\n".encode()
    raw = build_dsn(_report(original=orig), message_id="a@b")
    assert b"Content-Transfer-Encoding: 8bit" in raw
    assert "na\u00efve".encode() in raw


@pytest.mark.parametrize(("value", "encoded"), [
    ("bob@example.net", "bob@example.net"),
    ("a+b=c@x", "a+2Bb+3Dc@x"),
    ("sp ace@x", "sp+20ace@x"),
    ("\u00e9@x", "+C3+A9@x"),
])
def test_xtext_encode(value: str, encoded: str) -> None:
    assert xtext_encode(value) == encoded


def test_orcpt_param() -> None:
    assert orcpt_param("rfc822;a+b@x") == "rfc822;a+2Bb@x"
    assert orcpt_param("no-type") is None
    assert orcpt_param("rfc822;") is None


@pytest.mark.parametrize(("code", "text", "status"), [
    (550, "5.1.1 no such user", "5.1.1"),
    (550, "no such user", "5.0.0"),
    (451, "4.7.1 greylisted", "4.7.1"),
    (451, "5.7.1 mismatched class", "4.0.0"),
    (250, "2.0.0 ok", "2.0.0"),
    (421, "", "4.0.0"),
    (999, "garbage", "5.0.0"),
])
def test_enhanced_status(code: int, text: str, status: str) -> None:
    assert enhanced_status(code, text) == status


def test_header_block_handles_bare_lf_and_no_body() -> None:
    assert header_block(b"A: 1\nB: 2\n\nbody") == b"A: 1\r\nB: 2\r\n"
    assert header_block(b"A: 1") == b"A: 1\r\n"


@given(st.binary(max_size=2000), st.text(max_size=200))
def test_any_original_and_diagnostic_build_a_parseable_report(orig: bytes, diag: str) -> None:
    rep = _report(original=orig, recipients=[RecipientReport(
        final_recipient="x@y", action="failed", status="5.0.0", diagnostic=diag)])
    raw = build_dsn(rep, message_id="a@b")
    msg = _parse(raw)
    assert msg.get_content_type() == "multipart/report"
    assert len(list(msg.iter_parts())) == 3
