"""IMAP SORT keys (libs/protocols/imap_sort.py): RFC 5256 §2.1 base subjects, §2.2 sent
dates, §3 address keys and tie order, RFC 5957 display keys, RFC 5267 ALL sets."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postbus.protocols import mime
from postbus.protocols.imap_sort import (
    Criterion,
    SortInfo,
    address_key,
    base_subject,
    casemap,
    display_key,
    envelope_addresses,
    sort_messages,
)
from postbus.protocols.imap_wire import ordered_seqset


@pytest.mark.parametrize(("subject", "base"), [
    # RFC 5256 §2.1 steps, one by one
    ("hello", "hello"),
    ("Re: hello", "hello"),                       # (3) subj-refwd
    ("RE: hello", "hello"),
    ("Fw: hello", "hello"),
    ("FWD: hello", "hello"),
    ("Re [2]: hello", "hello"),                   # (3) a blob inside subj-refwd
    ("[list] Re: hello", "hello"),                # (3) blobs before subj-refwd
    ("[list] hello", "hello"),                    # (4) a leading blob
    ("[list]", "[list]"),                         # (4) not when nothing would remain
    ("hello (fwd)", "hello"),                     # (2) subj-trailer
    ("hello (FWD)  ", "hello"),
    ("hello\t \r\n  world", "hello world"),       # (1) whitespace runs become one space
    ("Re: Re: Fwd: hello", "hello"),              # (5) repeated
    ("[Fwd: hello]", "hello"),                    # (6) subj-fwd
    ("[fwd: Re: hello (fwd)]", "hello"),          # (6) then (2)..(5) again
    ("Ad: Re: x", "Ad: Re: x"),                   # only re/fw/fwd are leaders
    ("Re:", ""),
    ("   ", ""),
    ("", ""),
    # the subjects of Dovecot's imaptest sort-subject script
    ("[foo] Fwd: [bar] Re: fw: b (fWd)  (fwd)", "b"),
    ("Re: [FWD: c]", "c"),
    ("[xyz]", "[xyz]"),
    ("re: [fwd: [fwd: re: [fwd: babylon]]]", "babylon"),
    ("b (a)", "b (a)"),
])
def test_base_subject(subject: str, base: str) -> None:
    assert base_subject(subject) == base


@given(st.text(max_size=60))
def test_base_subject_is_idempotent_and_never_raises(s: str) -> None:
    b = base_subject(s)
    assert base_subject(b) == b or b.startswith("[")


def test_casemap_orders_case_insensitively_with_titlecase() -> None:
    # RFC 5051: titlecase, so letters sort before "[" and "_" (Dovecot: "C" < "[xyz]" < "_")
    assert casemap("c") == casemap("C")
    assert sorted(["_", "[xyz]", "c", "a"], key=casemap) == ["a", "c", "[xyz]", "_"]
    assert casemap("\u00e9") == casemap("E\u0301")  # NFKD


ENV = mime.summarize(b"From: =?iso-8859-1?q?foo_aar?= <e@f.g>\r\n"
                     b"To: a: xx@xx.org, yy@yy.org;\r\n"
                     b"Cc: user2@domain2.org (foo bar)\r\n\r\nx\r\n").envelope


def test_envelope_addresses() -> None:
    addrs = envelope_addresses(ENV)
    assert address_key(addrs["from"]) == "e"
    assert display_key(addrs["from"]) == "foo aar"          # decoded (RFC 5957 §3)
    assert address_key(addrs["to"]) == "a"                  # a group: its name, as Dovecot
    assert display_key(addrs["to"]) == "a"
    assert address_key(addrs["cc"]) == "user2"
    assert display_key(addrs["bcc"]) == ""
    assert envelope_addresses("(garbage") == {k: [] for k in (
        "from", "sender", "reply-to", "to", "cc", "bcc")}


def test_display_key_without_a_name_is_the_addr_spec() -> None:
    env = mime.summarize(b"From: b@c.d\r\n\r\n").envelope
    assert display_key(envelope_addresses(env)["from"]) == "b@c.d"


def test_envelope_literal_names() -> None:
    env = mime.summarize("From: Jürgen Ä <j@x.de>\r\n\r\n".encode()).envelope
    assert "{" in env  # 8-bit: written as a literal
    assert display_key(envelope_addresses(env)["from"]) == "Jürgen Ä"


T0 = datetime(2008, 2, 22, tzinfo=UTC)


def info(seq: int, *, arrival: int = 0, sent: datetime | None = None, size: int = 0,
         subject: str = "", header: bytes = b"") -> SortInfo:
    env = mime.summarize(header + b"\r\n").envelope
    return SortInfo(seq=seq, uid=seq * 10, arrival=T0 + timedelta(hours=arrival), sent=sent,
                    size=size, subject=subject, envelope=env)


def order(infos: list[SortInfo], *crit: str) -> list[int]:
    cs = [Criterion(c.removeprefix("-"), c.startswith("-")) for c in crit]
    return [i.seq for i in sort_messages(infos, cs)]


def test_ties_keep_ascending_sequence_even_reversed() -> None:
    msgs = [info(1, size=5), info(2, size=3), info(3, size=5), info(4, size=3)]
    assert order(msgs, "SIZE") == [2, 4, 1, 3]
    assert order(msgs, "-SIZE") == [1, 3, 2, 4]  # RFC 5256 §3: ties by sequence, ascending


def test_imaptest_sort_arrival() -> None:
    # Dovecot's sort-arrival: arrival hours 0 2 1 2 2, sizes ascending
    msgs = [info(n, arrival=a, size=n) for n, a in enumerate([0, 2, 1, 2, 2], 1)]
    assert order(msgs, "ARRIVAL") == [1, 3, 2, 4, 5]
    assert order(msgs, "-ARRIVAL") == [2, 4, 5, 3, 1]
    assert order(msgs, "ARRIVAL", "-SIZE") == [1, 3, 5, 4, 2]


def test_date_uses_utc_and_falls_back_to_internaldate() -> None:
    plus2 = timezone(timedelta(hours=2))
    msgs = [
        info(1, sent=datetime(2008, 2, 22, 1, 0, tzinfo=plus2)),   # 23:00 UTC the day before
        info(2, sent=datetime(2008, 2, 21, 23, 30, tzinfo=UTC)),
        info(3, arrival=-1),                                        # no Date: 23:00 UTC
    ]
    # RFC 5256 §2.2: compared in UTC; no Date header: the INTERNALDATE
    assert order(msgs, "DATE") == [1, 3, 2]
    assert order(msgs, "-DATE") == [2, 1, 3]


def test_imaptest_sort_addresses() -> None:
    msgs = [
        info(1, arrival=1, header=b"From: user2@domain2.org\r\nTo: foo bar <user2@domain2.org>\r\n"
                       b"Cc: user2@domain2.org (foo bar)\r\n"),
        info(2, arrival=2, header=b"From: user2@domain1.org\r\nTo: user2@domain1.org\r\n"
                       b"Cc: user2: blah@domain1.org;\r\n"),
        info(3, arrival=3, header=b"From: user1@domain1.org\r\nTo: user1@domain1.org\r\n"
                       b"Cc: user1@domain1.org\r\n"),
    ]
    for key in ("FROM", "TO", "CC"):
        assert order(msgs, key) == [3, 1, 2]
        assert order(msgs, "-" + key) == [1, 2, 3]
        assert order(msgs, key, "-ARRIVAL") == [3, 2, 1]


def test_imaptest_sort_display_to() -> None:
    tos = [b"foo bar <a@b.c>", b"b@c.d", b"d", b"=?iso-8859-1?q?foo_aar?= <e@f.g>",
           b"=?iso-8859-1?q?foo_car?= <f@g.h>", b"a: xx@xx.org, yy@yy.org;",
           b"z: aa@aa.org, bb@bb.org;", b"empty:;"]
    msgs = [info(n, header=b"To: " + t + b"\r\nFrom: " + t + b"\r\n")
            for n, t in enumerate(tos, 1)]
    assert order(msgs, "DISPLAYTO") == [6, 2, 3, 8, 4, 1, 5, 7]
    assert order(msgs, "-DISPLAYTO") == [7, 5, 1, 4, 8, 3, 2, 6]
    assert order(msgs[:5], "DISPLAYFROM") == [2, 3, 4, 1, 5]


def test_imaptest_sort_subject() -> None:
    subjects = ["a", "C", "b", "_", "[foo] Fwd: [bar] Re: fw: b (fWd)  (fwd)", "b (a)",
                "Re: [FWD: c]", "[xyz]", None, "=?iso-8859-1?q?_?=", "Re: =?utf-8?q?b?=",
                "=?iso-8859-1?q?RE:_C?=", "=?us-ascii?b?UmU6IGM=?=", "Ad: Re: Ad: Re: Ad: x",
                "re: [fwd: [fwd: re: [fwd: babylon]]]"]
    msgs = []
    for n, s in enumerate(subjects, 1):
        header = b"" if s is None else b"Subject: " + s.encode() + b"\r\n"
        sm = mime.summarize(header + b"\r\n")
        msgs.append(SortInfo(seq=n, uid=n, arrival=T0, sent=None, size=0, subject=sm.subject,
                             envelope=sm.envelope))
    assert order(msgs, "SUBJECT") == [9, 10, 1, 14, 3, 5, 11, 6, 15, 2, 7, 12, 13, 8, 4]
    assert order(msgs, "-SUBJECT") == [4, 8, 2, 7, 12, 13, 15, 6, 3, 5, 11, 14, 1, 9, 10]


@pytest.mark.parametrize(("nums", "text"), [
    ([], ""),
    ([1, 2, 3, 4, 5], "1:5"),
    ([5, 3, 4, 2, 1], "5,3:4,2,1"),   # RFC 5267 §3: in sort order; only ascending runs merge
    ([7], "7"),
])
def test_seq_order_set(nums: list[int], text: str) -> None:
    assert ordered_seqset(nums) == text
