"""smtp-ingress policy: relay decisions, sender rights, limits, queue ids, Received header."""

from __future__ import annotations

import functools
from datetime import UTC, datetime

import pytest

from postbus.proto.directory import AccountRef, ResolveReply
from postbus.protocols import smtp_replies as replies
from postbus.protocols.smtp import Path, parse_path
from postbus.smtp_ingress import policy as pol


def _reply(status: str, accounts: int = 1) -> ResolveReply:
    return ResolveReply(status=status,  # type: ignore[arg-type]
                        accounts=[AccountRef(account_id=i, address=f"u{i}@example.test")
                                  for i in range(accounts)] if status == "local" else [])


@pytest.mark.parametrize("status,may_relay,expected", [
    ("local", False, "250 2.1.5"),
    ("local", True, "250 2.1.5"),
    ("unknown", False, "550 5.1.1"),
    ("unknown", True, "550 5.1.1"),
    ("disabled", False, "550 5.2.1"),
    ("remote", False, "554 5.7.1"),
    ("remote", True, "250 2.1.5"),
])
def test_recipient_decision(status: str, may_relay: bool, expected: str) -> None:
    d = pol.recipient_decision(_reply(status), may_relay=may_relay)
    assert d.reply.startswith(expected)


def test_local_without_accounts_is_unknown() -> None:
    assert pol.recipient_decision(_reply("local", 0), may_relay=False).reply.startswith("550 5.1.1")


@pytest.mark.parametrize("addr", [
    "<bob%remote.example@example.test>", "<@example.test:bob@remote.example>",
    '<"bob@remote.example"@example.test>', "<bob@remote.example@example.test>",
    "<remote.example!bob@example.test>",
])
def test_relay_tricks_refused_unless_relay_allowed(addr: str) -> None:
    path, _ = parse_path(addr, allow_null=False)
    refusal = pol.recipient_needs_lookup(path, may_relay=False)
    assert refusal is not None and refusal.reply.startswith("554 5.7.1")
    assert pol.recipient_needs_lookup(path, may_relay=True) is None
    plain, _ = parse_path("<bob@example.test>", allow_null=False)
    assert pol.recipient_needs_lookup(plain, may_relay=False) is None


def test_may_relay_and_trusted_networks() -> None:
    nets = pol.parse_networks(["192.0.2.0/24", "2001:db8::/32"])
    assert pol.ip_in("192.0.2.9", nets) and pol.ip_in("2001:db8::1", nets)
    assert pol.ip_in("::ffff:192.0.2.9", nets)
    assert not pol.ip_in("127.0.0.1", nets) and not pol.ip_in("junk", nets)
    assert not pol.ip_in("127.0.0.1", pol.parse_networks([]))  # loopback is not trusted
    assert pol.may_relay(authenticated=False, trusted=True)
    assert pol.may_relay(authenticated=True, trusted=False)
    assert not pol.may_relay(authenticated=False, trusted=False)


def test_sender_allowed() -> None:
    send_as = ["alice@example.test", "sales@example.test"]
    assert pol.sender_allowed("alice@example.test", send_as)
    assert pol.sender_allowed("Sales@Example.TEST", send_as)
    assert pol.sender_allowed("", send_as)
    assert not pol.sender_allowed("bob@example.test", send_as)
    assert not pol.sender_allowed("alice@example.test.evil", send_as)


def test_connection_decision() -> None:
    lim = pol.ConnLimits(max_connections=10, per_ip=2, rate_per_minute=5)
    assert pol.connection_decision(total=0, from_ip=0, recent=0, limits=lim) is None
    assert pol.connection_decision(total=10, from_ip=0, recent=0, limits=lim) == replies.R421_BUSY
    assert pol.connection_decision(total=1, from_ip=2, recent=0, limits=lim) == replies.R421_TOO_MANY_CONN
    assert pol.connection_decision(total=1, from_ip=1, recent=5, limits=lim) == replies.R421_RATE
    off = pol.ConnLimits(0, 0, 0)
    assert pol.connection_decision(total=10**6, from_ip=10**6, recent=10**6, limits=off) is None


def test_rate_window_slides() -> None:
    now = [0.0]
    w = pol.RateWindow(60, clock=lambda: now[0])
    assert [w.hit("a") for _ in range(3)] == [0, 1, 2]
    assert w.hit("b") == 0
    now[0] = 61.0
    assert w.hit("a") == 0


def test_auth_throttled() -> None:
    assert not pol.auth_throttled(9, 4, ip_limit=10, account_limit=5)
    assert pol.auth_throttled(10, 0, ip_limit=10, account_limit=5)
    assert pol.auth_throttled(0, 5, ip_limit=10, account_limit=5)
    assert not pol.auth_throttled(100, 100, ip_limit=0, account_limit=0)


def test_queue_ids_sortable_unique_short() -> None:
    a = pol.new_queue_id(1_700_000_000_000, b"\x00" * 5)
    b = pol.new_queue_id(1_700_000_000_001, b"\xff" * 5)
    assert len(a) == 17 and a < b and a.isalnum() and a.isupper()
    ids = {pol.new_queue_id() for _ in range(10_000)}
    assert len(ids) == 10_000
    seq = [pol.new_queue_id(1_700_000_000_000 + i) for i in range(100)]
    assert seq == sorted(seq)


def test_received_header() -> None:
    when = datetime(2026, 11, 26, 17, 0, tzinfo=UTC)
    h = pol.received_header(helo="client.example.net\r\nX-Evil: 1", ip="192.0.2.1", rdns=None,
                            hostname="mx.example.test", esmtp=True,
                            tls="TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)",
                            auth_user="alice@example.test", utf8=False, queue_id="Q1",
                            rcpt="alice@example.test", when=when)
    text = h.decode()
    assert text.startswith("Received: from client.example.net??X-Evil: 1 ([192.0.2.1])\r\n")
    assert "\tby mx.example.test (Postbus) with ESMTPSA id Q1\r\n" in text
    assert "(using TLSv1.3 with cipher" in text and "(Authenticated sender: alice@example.test)" in text
    assert text.endswith("\tfor <alice@example.test>;\r\n\tThu, 26 Nov 2026 17:00:00 +0000\r\n")
    assert text.count("\n") == text.count("\r\n")
    plain = pol.received_header(helo=None, ip="2001:db8::1", rdns=None, hostname="h", esmtp=False,
                                tls=None, auth_user=None, utf8=False, queue_id="Q", rcpt=None,
                                when=when).decode()
    assert "from unknown ([IPv6:2001:db8::1])" in plain and "with SMTP id Q;\r\n" in plain


def test_ingress_uses_no_third_party_smtp_internals() -> None:
    """ADR 0013: smtp-ingress speaks SMTP itself (protocols.smtp + session.py); aiosmtpd
    serves only behind kit.net's PROXY header parser, through its public function."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "services" / "smtp-ingress"
    for path in root.glob("*.py"):
        text = path.read_text()
        assert "import aiosmtpd" not in text and "from aiosmtpd" not in text, path.name
        assert "._buffer" not in text and "sslproto" not in text, path.name

def test_load_snapshot_and_merge() -> None:
    snap = pol.load_snapshot({"a": 2, "b": 0}, {"a": 5, "c": 1}, top=2)
    assert snap == {"a": [2, 5], "c": [0, 1]}
    merged = pol.merge_snapshots([snap, {"a": [1, 1], "d": [3, 0]}])
    assert merged == {"a": (3, 6), "c": (0, 1), "d": (3, 0)}
    now = [0.0]
    w = pol.RateWindow(60, clock=lambda: now[0])
    w.hit("x")
    now[0] = 30.0
    w.hit("x")
    assert w.counts() == {"x": 2}
    now[0] = 70.0
    assert w.counts() == {"x": 1}


@pytest.mark.parametrize(("domain", "public"), [
    ("example.net", True), ("[8.8.8.8]", True), ("[IPv6:2001:4860:4860::8888]", True),
    ("[127.0.0.1]", False), ("[169.254.169.254]", False), ("[10.0.0.1]", False),
    ("[ipv6:::1]", False), ("[IPv6:::ffff:192.168.1.1]", False), ("[junk]", False),
])
def test_address_literals_relayed_only_to_public_addresses(domain: str, public: bool) -> None:
    # issue 8 (low): authenticated users could relay to [127.0.0.1] or the metadata service
    assert pol.literal_is_public(domain) is public
    path = Path(f"x@{domain}", "x", domain)
    refused = pol.recipient_needs_lookup(path, may_relay=True)
    assert (refused is None) is public
    assert pol.recipient_needs_lookup(path, may_relay=True, private_literals=True) is None


def test_null_sender_relays_only_locally() -> None:
    remote = ResolveReply(status="remote", domain="example.net")
    local = ResolveReply(status="local", domain="example.test")
    assert not pol.null_sender_may_relay("", remote)
    assert pol.null_sender_may_relay("", local) and pol.null_sender_may_relay("a@b.test", remote)


def test_full_mailbox_is_refused_at_rcpt() -> None:
    # issue 8 (low): over-quota mail was accepted, then bounced with its whole content
    full = ResolveReply(status="local", domain="example.test", accounts=[
        AccountRef(account_id=1, address="a@example.test", full=True)])
    assert pol.recipient_decision(full, may_relay=False) == pol.Refuse(
        replies.R452_MAILBOX_FULL, "over_quota")
    some = ResolveReply(status="local", domain="example.test", accounts=[
        AccountRef(account_id=1, address="a@example.test", full=True),
        AccountRef(account_id=2, address="b@example.test")])  # an alias: one still has room
    assert isinstance(pol.recipient_decision(some, may_relay=False), pol.Accept)


def test_in_flow_delay_is_proportional_and_bounded() -> None:
    d = functools.partial(pol.in_flow_delay, threshold=100, per_message_s=0.01, max_s=1.0)
    assert d(0) == d(100) == 0.0
    assert d(101) == pytest.approx(0.01) and d(150) == pytest.approx(0.5)
    assert d(10_000) == 1.0
    assert pol.in_flow_delay(10_000, threshold=0, per_message_s=1, max_s=1) == 0.0  # off
