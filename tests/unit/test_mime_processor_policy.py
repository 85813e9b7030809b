"""mime-processor's pure policy: routing, trace prefix, Authentication-Results, DMARC."""

from __future__ import annotations

import pytest

from postbus.mime_processor import policy
from postbus.mime_processor.policy import (
    AuthResults,
    DkimResult,
    DmarcResult,
    SpfResult,
)
from postbus.proto.directory import AccountRef, ResolveReply
from postbus.proto.mail import ClientInfo, Recipient

A1 = AccountRef(account_id=1, address="alice@example.test")
A2 = AccountRef(account_id=2, address="bob@example.test")


def test_plan_routes_fan_out_dedupe_and_failures() -> None:
    rcpts = [Recipient(address=a, notify=["FAILURE"]) for a in (
        "team@example.test", "alice@example.test", "nobody@example.test", "off@example.test",
        "x@remote.example", "X@remote.example", "empty@example.test")]
    replies = [
        ResolveReply(status="local", accounts=[A1, A2]),
        ResolveReply(status="local", accounts=[A1]),
        ResolveReply(status="unknown"),
        ResolveReply(status="disabled", accounts=[A2]),
        ResolveReply(status="remote"),
        ResolveReply(status="remote"),
        ResolveReply(status="local", accounts=[]),
    ]
    plan = policy.plan_routes(rcpts, replies, relay_allowed=True)
    assert [(t.account.account_id, t.recipient.address) for t in plan.local] == [
        (1, "team@example.test"), (2, "team@example.test")]
    assert [r.address for r in plan.remote] == ["x@remote.example"]
    assert [(f.recipient.address, f.status) for f in plan.failed] == [
        ("nobody@example.test", "5.1.1"), ("off@example.test", "5.2.1"),
        ("empty@example.test", "5.1.1")]
    assert plan.failed[0].detail.startswith("550 5.1.1 <nobody@example.test>")
    assert [(r.address, len(a)) for r, a in plan.expanded] == [("team@example.test", 2)]


def test_remote_without_relay_right_is_5_7_1() -> None:
    plan = policy.plan_routes([Recipient(address="x@remote.example")],
                              [ResolveReply(status="remote")], relay_allowed=False)
    assert plan.remote == [] and plan.failed[0].status == "5.7.1"


def test_may_relay() -> None:
    assert policy.may_relay(ClientInfo(ip="203.0.113.9", auth_user="a@example.test"), [])
    assert not policy.may_relay(ClientInfo(ip="127.0.0.1"), [])  # loopback is not trusted
    assert policy.may_relay(ClientInfo(ip="10.1.2.3"), ["bogus", "10.0.0.0/8"])
    assert policy.may_relay(ClientInfo(ip="2001:db8::5"), ["2001:db8::/32"])
    assert not policy.may_relay(ClientInfo(ip="not-an-ip"), ["0.0.0.0/0"])


def test_trace_prefix_cannot_inject_headers() -> None:
    assert policy.trace_prefix("a@b.example", "c@d.example") == (
        b"Return-Path: <a@b.example>\r\nDelivered-To: c@d.example\r\n")
    assert policy.trace_prefix("", "c@d.example").startswith(b"Return-Path: <>\r\n")
    assert b"\r\nX-Evil" not in policy.trace_prefix("a@b\r\nX-Evil: 1", "c@d")


def test_subject_token() -> None:
    assert policy.subject_token("Q1a-b_c") == "Q1a-b_c"
    assert policy.subject_token("a.b *>") == "a_b___"
    assert policy.subject_token("") == "_"


def test_auth_results_value_rfc8601() -> None:
    r = AuthResults(
        SpfResult("pass", "user@sender.example", "mx.sender.example"),
        [DkimResult("pass", "sender.example", "@sender.example", "sel1"),
         DkimResult("fail", "other.example", comment="body hash (mismatch)")],
        DmarcResult("pass", "sender.example", "reject"))
    assert policy.auth_results_value("mx.example.test", r) == (
        "mx.example.test;\r\n\tspf=pass smtp.mailfrom=user@sender.example;\r\n"
        "\tdkim=pass header.d=sender.example header.i=@sender.example header.s=sel1;\r\n"
        "\tdkim=fail (body hash [mismatch]) header.d=other.example;\r\n"
        "\tdmarc=pass (p=reject) header.from=sender.example")
    none = AuthResults(SpfResult("temperror", "", "helo.example", "DNS timeout"), [],
                       DmarcResult("none"))
    assert policy.auth_results_value("h", none) == (
        "h;\r\n\tspf=temperror (DNS timeout) smtp.helo=helo.example;\r\n\tdkim=none;\r\n\tdmarc=none")
    odd = AuthResults(SpfResult("fail", 'we"ird x@y.example'), [], DmarcResult("none"))
    assert 'smtp.mailfrom="we\\"ird x@y.example"' in policy.auth_results_value("h", odd)


def test_prepend_strips_forged_results_with_our_id_only() -> None:
    raw = (b"Received: from x\r\nAuthentication-Results: MX.example.test; spf=pass\r\n"
           b"\tsmtp.mailfrom=forged@example.org\r\nAuthentication-Results: other.example; dkim=pass\r\n"
           b"Subject: hi\r\n\r\nAuthentication-Results: mx.example.test; in the body\r\n")
    out = policy.prepend_auth_results(raw, "mx.example.test; spf=none", "mx.example.test")
    assert out == (b"Authentication-Results: mx.example.test; spf=none\r\n"
                   b"Received: from x\r\nAuthentication-Results: other.example; dkim=pass\r\n"
                   b"Subject: hi\r\n\r\nAuthentication-Results: mx.example.test; in the body\r\n")
    untouched = b"Subject: x\r\n\r\nbody"
    assert policy.strip_forged(untouched, "mx") is untouched


def test_dmarc_record_and_alignment() -> None:
    assert policy.parse_dmarc_record("v=spf1 -all") is None
    rec = policy.parse_dmarc_record("v=DMARC1; p=reject; sp=quarantine; adkim=s")
    assert rec is not None and rec["p"] == "reject" and rec["adkim"] == "s"
    assert policy.parse_dmarc_record("v=DMARC1; p=bogus") == {"v": "DMARC1", "p": "none"}
    assert policy.org_domain("a.b.example.com") == "example.com"
    assert policy.org_domain("mail.example.co.uk") == "example.co.uk"
    assert policy.aligned("mail.example.com", "example.com", strict=False)
    assert not policy.aligned("mail.example.com", "example.com", strict=True)

    spf_ok = SpfResult("pass", "bounce@mail.example.com")
    dkim_other = [DkimResult("pass", "esp.example")]
    assert policy.evaluate_dmarc("example.com", rec, False, spf_ok, dkim_other).result == "pass"
    strict = policy.parse_dmarc_record("v=DMARC1; p=reject; aspf=s")
    assert strict is not None
    r = policy.evaluate_dmarc("example.com", strict, False, spf_ok, dkim_other)
    assert (r.result, r.policy) == ("fail", "reject")
    sub = policy.evaluate_dmarc("news.example.com", rec, True, SpfResult("fail"), [])
    assert (sub.result, sub.policy) == ("fail", "quarantine")
    dk = policy.evaluate_dmarc("example.com", rec, False, SpfResult("fail"),
                               [DkimResult("pass", "example.com")])
    assert dk.result == "pass"


def test_from_domain() -> None:
    assert policy.from_domain(b"From: \"A, B\" <a@Example.COM>\r\n\r\n") == "example.com"
    assert policy.from_domain(b"Subject: none\r\n\r\n") is None
    assert policy.from_domain(b"From: undisclosed\r\n\r\n") is None


@pytest.mark.parametrize("forged", [
    b"Authentication-Results:\r\n mx.example.test; dkim=pass header.d=bank.example\r\n",  # folded
    b"Authentication-Results : mx.example.test; dkim=pass\r\n",  # obsolete "Name :" form
    b"AUTHENTICATION-RESULTS:\tMX.EXAMPLE.TEST.; dkim=pass\r\n",  # case, trailing dot
    b"Authentication-Results: (a (nested) comment) mx.example.test 1; dkim=pass\r\n",
    b"Authentication-Results: mx.example.test\r\n\t; spf=pass\r\n",  # id alone on line one
])
def test_every_spelling_of_a_forged_field_is_removed(forged: bytes) -> None:
    # issue 8.7: a folded copy and a "Name :" spelling passed the filter
    raw = b"Received: from x\r\n" + forged + b"Subject: hi\r\n\r\nbody\r\n"
    assert policy.strip_forged(raw, "mx.example.test") == (
        b"Received: from x\r\nSubject: hi\r\n\r\nbody\r\n")
    other = raw.replace(b"mx.example.test", b"other.example").replace(b"MX.EXAMPLE.TEST", b"OTHER")
    assert policy.strip_forged(other, "mx.example.test") == other
