"""postbus.protocols.mime: ENVELOPE/BODY/BODYSTRUCTURE against known-good IMAP output
(RFC 3501 §7.4.2 examples, Dovecot's rules), exact part offsets, FETCH section helpers,
and properties: arbitrary or mutated input never raises and stays self-consistent."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postbus.kit.testing import examples
from postbus.proto.mail import MessageSummary
from postbus.protocols.mime import (
    Section,
    UnknownCTE,
    binary_section,
    binary_to_base64,
    decode_words,
    header_fields,
    imap_string,
    normalize_crlf,
    parse_section,
    section_bytes,
    summarize,
)


# ---------------------------------------------------------------- a tiny IMAP reader (for checks)
def read_imap(text: str) -> object:
    """Parse IMAP wire text (lists, NIL, numbers, quoted strings, literals) into Python values.
    Raises on anything malformed, so the tests catch syntax errors in our output."""
    data = text.encode("utf-8")
    pos = 0

    def value() -> object:
        nonlocal pos
        c = data[pos:pos + 1]
        if c == b"(":
            pos += 1
            items: list[object] = []
            while data[pos:pos + 1] != b")":
                if data[pos:pos + 1] == b" ":
                    pos += 1
                    continue
                if pos >= len(data):
                    raise ValueError("unclosed list")
                items.append(value())
            pos += 1
            return items
        if c == b'"':
            pos += 1
            out = bytearray()
            while True:
                ch = data[pos:pos + 1]
                if not ch:
                    raise ValueError("unclosed string")
                if ch == b"\\":
                    nxt = data[pos + 1:pos + 2]
                    if nxt not in (b"\\", b'"'):
                        raise ValueError("bad escape")
                    out += nxt
                    pos += 2
                    continue
                if ch == b'"':
                    pos += 1
                    return out.decode("utf-8")
                if ch in (b"\r", b"\n") or ch[0] > 0x7F:
                    raise ValueError("CR/LF/8-bit inside a quoted string")
                out += ch
                pos += 1
        if c == b"{":
            end = data.index(b"}", pos)
            n = int(data[pos + 1:end])
            if data[end + 1:end + 3] != b"\r\n":
                raise ValueError("literal without CRLF")
            start = end + 3
            pos = start + n
            return data[start:pos].decode("utf-8")
        end = pos
        while end < len(data) and data[end:end + 1] not in b" ()":
            end += 1
        tok = data[pos:end].decode()
        pos = end
        if tok == "NIL":
            return None
        if tok.isdigit():
            return int(tok)
        raise ValueError(f"unexpected token {tok!r}")

    v = value()
    if pos != len(data):
        raise ValueError("trailing data")
    return v


def body_from_bodystructure(bs: object) -> object:
    """Drop the extension data of a parsed BODYSTRUCTURE: what BODY must be."""
    assert isinstance(bs, list)
    if bs and isinstance(bs[0], list):
        n = 0
        while isinstance(bs[n], list):
            n += 1
        kids, sub = bs[:n], bs[n]
        return [*(body_from_bodystructure(k) for k in kids), sub]
    typ = str(bs[0]).lower()
    sub = str(bs[1]).lower()
    base = bs[:7]
    if typ == "message" and sub == "rfc822":
        return [*base, bs[7], body_from_bodystructure(bs[8]), bs[9]]
    if typ == "text":
        return [*base, bs[7]]
    return base


def check_consistent(raw: bytes, s: MessageSummary) -> None:
    """Invariants every summary must satisfy."""
    read_imap(s.envelope)
    bs = read_imap(s.bodystructure)
    assert read_imap(s.body) == body_from_bodystructure(bs)
    assert s.parts and s.parts[0].section == ""
    assert s.parts[0].end == len(raw) and s.header_bytes == s.parts[0].body_start
    seen = set()
    for n, p in enumerate(s.parts):
        assert 0 <= p.header_start <= p.body_start <= p.end <= len(raw), p
        assert p.section not in seen
        seen.add(p.section)
        if p.section and n < 300:  # section_bytes looks parts up linearly
            assert section_bytes(raw, s, p.section) == raw[p.body_start:p.end]
            assert section_bytes(raw, s, p.section + ".MIME") == raw[p.header_start:p.body_start]
    assert "1" in seen


def crlf(text: str) -> bytes:
    return normalize_crlf(text.encode("utf-8"))


# ---------------------------------------------------------------- RFC 3501 examples
RFC3501_HEADER = (
    "Date: Wed, 17 Jul 1996 02:23:25 -0700 (PDT)\r\n"
    "From: Terry Gray <gray@cac.washington.edu>\r\n"
    "Subject: IMAP4rev1 WG mtg summary and minutes\r\n"
    "To: imap@cac.washington.edu\r\n"
    "cc: minutes@CNRI.Reston.VA.US, John Klensin <KLENSIN@MIT.EDU>\r\n"
    "Message-Id: <B27397-0100000@cac.washington.edu>\r\n"
    "MIME-Version: 1.0\r\n"
)


def _lines_of(total: int, count: int) -> bytes:
    """``count`` CRLF-terminated lines of ``total`` octets."""
    width = total // count
    last = total - width * (count - 1)
    out = [b"x" * (width - 2) + b"\r\n" for _ in range(count - 1)]
    out.append(b"y" * (last - 2) + b"\r\n")
    body = b"".join(out)
    assert len(body) == total and body.count(b"\n") == count
    return body


def rfc3501_message() -> bytes:
    return (RFC3501_HEADER.encode()
            + b"Content-Type: MULTIPART/MIXED; BOUNDARY=\"=_b\"\r\n\r\n"
            + b"--=_b\r\nContent-Type: TEXT/PLAIN; CHARSET=US-ASCII\r\n\r\n"
            + _lines_of(1152, 23)
            + b"\r\n--=_b\r\nContent-Type: TEXT/PLAIN; CHARSET=US-ASCII; NAME=cc.diff\r\n"
            + b"Content-ID: <960723163407.20117h@cac.washington.edu>\r\n"
            + b"Content-Description: Compiled diff\r\nContent-Transfer-Encoding: BASE64\r\n\r\n"
            + _lines_of(4554, 73)
            + b"\r\n--=_b--\r\n")


def test_rfc3501_envelope_example() -> None:
    s = summarize(rfc3501_message())
    assert s.envelope == (
        '("Wed, 17 Jul 1996 02:23:25 -0700 (PDT)" "IMAP4rev1 WG mtg summary and minutes" '
        '(("Terry Gray" NIL "gray" "cac.washington.edu")) '
        '(("Terry Gray" NIL "gray" "cac.washington.edu")) '
        '(("Terry Gray" NIL "gray" "cac.washington.edu")) '
        '((NIL NIL "imap" "cac.washington.edu")) '
        '((NIL NIL "minutes" "CNRI.Reston.VA.US")("John Klensin" NIL "KLENSIN" "MIT.EDU")) '
        'NIL NIL "<B27397-0100000@cac.washington.edu>")')
    assert s.date == datetime(1996, 7, 17, 2, 23, 25, tzinfo=timezone(timedelta(hours=-7)))
    assert s.message_id == "<B27397-0100000@cac.washington.edu>"
    assert s.subject == "IMAP4rev1 WG mtg summary and minutes"
    assert s.to == "imap@cac.washington.edu"


def test_rfc3501_body_example() -> None:
    raw = rfc3501_message()
    s = summarize(raw)
    assert s.body == (
        '(("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7bit" 1152 23)'
        '("TEXT" "PLAIN" ("CHARSET" "US-ASCII" "NAME" "cc.diff") '
        '"<960723163407.20117h@cac.washington.edu>" "Compiled diff" "BASE64" 4554 73) "MIXED")')
    check_consistent(raw, s)


# ---------------------------------------------------------------- Dovecot's rules, case by case
CASES: list[tuple[str, str, str]] = [
    (  # a plain message; sizes count CRLF
        "From: a@example.org\nContent-Type: text/plain; charset=us-ascii\n\nbody\n",
        '("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 6 1 NIL NIL NIL NIL)',
        '("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 6 1)',
    ),
    (  # no Content-Type at all: text/plain; charset=us-ascii
        "Subject: x\n\nline one\nline two\n",
        '("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 20 2 NIL NIL NIL NIL)',
        '("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 20 2)',
    ),
    (  # folded boundary parameter; the CRLF before a delimiter belongs to it
        'Content-Type: multipart/mixed; boundary="ab\n cd"\n\nprologue\n\n--ab cd\n'
        "Content-Type: text/x-custom; charset=us-ascii\n\nhi there\n\n--ab cd--\n\n",
        '(("text" "x-custom" ("charset" "us-ascii") NIL NIL "7bit" 10 1 NIL NIL NIL NIL) "mixed" '
        '("boundary" "ab cd") NIL NIL NIL)',
        '(("text" "x-custom" ("charset" "us-ascii") NIL NIL "7bit" 10 1) "mixed")',
    ),
    (  # id, description, md5, disposition params, several languages, location, escaped quote
        'Content-Type: multipart/mixed; boundary=B\n\n--B\n'
        'Content-Type: text/plain; charset=us-ascii; x="a\\"b"\n'
        "Content-ID: <id1@example.org>\nContent-MD5: Zm9vYmFy\n"
        "Content-Disposition: inline; size=3\nContent-Description: the note\n"
        "Content-Language: en, de\nContent-Location: http://example.org/n.txt\n\n"
        "abc\n--B--\n",
        '(("text" "plain" ("charset" "us-ascii" "x" "a\\"b") "<id1@example.org>" "the note" '
        '"7bit" 3 0 "Zm9vYmFy" ("inline" ("size" "3")) ("en" "de") "http://example.org/n.txt") '
        '"mixed" ("boundary" "B") NIL NIL NIL)',
        '(("text" "plain" ("charset" "us-ascii" "x" "a\\"b") "<id1@example.org>" "the note" '
        '"7bit" 3 0) "mixed")',
    ),
    (  # multipart/alternative; text without charset gets us-ascii; invalid CTE shows 7bit
        "Content-Type: multipart/alternative; boundary=alt\n\n--alt\n"
        "Content-Type: text/html\nContent-Transfer-Encoding: 8bit\n\n<p>Hi</p>\n\n--alt\n"
        "Content-Type: text/plain\nContent-Transfer-Encoding: ?bogus\n\nHi\n\n--alt--\n",
        '(("text" "html" ("charset" "us-ascii") NIL NIL "8bit" 11 1 NIL NIL NIL NIL)'
        '("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 4 1 NIL NIL NIL NIL) '
        '"alternative" ("boundary" "alt") NIL NIL NIL)',
        '(("text" "html" ("charset" "us-ascii") NIL NIL "8bit" 11 1)'
        '("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 4 1) "alternative")',
    ),
    (  # an attachment: no lines for non-text, no params -> NIL
        "Content-Type: multipart/mixed; boundary=m\n\n--m\nContent-Type: text/plain; charset=utf-8\n\n"
        "see attached\n\n--m\nContent-Type: image/png\nContent-Transfer-Encoding: base64\n"
        'Content-Disposition: attachment; filename="dot.png"\n\niVBORw0KGgo=\n--m--\n',
        '(("text" "plain" ("charset" "utf-8") NIL NIL "7bit" 14 1 NIL NIL NIL NIL)'
        '("image" "png" NIL NIL NIL "base64" 12 NIL ("attachment" ("filename" "dot.png")) NIL NIL) '
        '"mixed" ("boundary" "m") NIL NIL NIL)',
        '(("text" "plain" ("charset" "utf-8") NIL NIL "7bit" 14 1)'
        '("image" "png" NIL NIL NIL "base64" 12) "mixed")',
    ),
    (  # multipart without any delimiter: one empty text/plain part
        'Content-Type: multipart/mixed; boundary="zz"\n\n',
        '(("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0 NIL NIL NIL NIL) "mixed" '
        '("boundary" "zz") NIL NIL NIL)',
        '(("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0) "mixed")',
    ),
    (  # multipart without a boundary parameter: text/plain
        "Content-Type: multipart/mixed\n\nwhatever\n",
        '("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 10 1 NIL NIL NIL NIL)',
        '("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 10 1)',
    ),
    (  # an unparseable Content-Type: text/plain
        "Content-Type: garbage\n\nx",
        '("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 1 0 NIL NIL NIL NIL)',
        '("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 1 0)',
    ),
    (  # RFC 2231 continuations, encoded
        "Content-Type: application/pdf; name*0*=utf-8''r%C3%A9; name*1*=sum%C3%A9.pdf\n\nPDF",
        '("application" "pdf" ("name*" "utf-8\'\'r%C3%A9sum%C3%A9.pdf") NIL NIL "7bit" 3 NIL NIL NIL NIL)',
        '("application" "pdf" ("name*" "utf-8\'\'r%C3%A9sum%C3%A9.pdf") NIL NIL "7bit" 3)',
    ),
    # the rows below are what Dovecot 2.3 answers for the same message (issue 10's
    # differential test, tests/socket/test_imap_dovecot_differential.py)
    (  # the default charset comes after the parameters
        "Content-Type: text/plain; name=a\n\nx",
        '("text" "plain" ("name" "a" "charset" "us-ascii") NIL NIL "7bit" 1 0 NIL NIL NIL NIL)',
        '("text" "plain" ("name" "a" "charset" "us-ascii") NIL NIL "7bit" 1 0)',
    ),
    (  # RFC 2231: plain parameters first, then the merged ones; an encoded group that
       # starts unencoded gets '' and its unencoded segments a %-escaped %
        "Content-Type: text/plain; t*1=\"b%c\"; t*0*=us-ascii'en'a%20; x=1; f*0=\"a b\"; f*1*=%41"
        "\n\nx",
        '("text" "plain" ("x" "1" "f*" "\'\'a b%41" "t*" "us-ascii\'en\'a%20b%25c" "charset" '
        '"us-ascii") NIL NIL "7bit" 1 0 NIL NIL NIL NIL)',
        '("text" "plain" ("x" "1" "f*" "\'\'a b%41" "t*" "us-ascii\'en\'a%20b%25c" "charset" '
        '"us-ascii") NIL NIL "7bit" 1 0)',
    ),
    (  # a missing index: the segments as they are; name* alone is one encoded parameter
        "Content-Type: application/x; g*0=a; g*2=c; h*=utf-8''%41; third*x=1\n\nx",
        '("application" "x" ("third*x" "1" "g*0" "a" "g*2" "c" "h*" "utf-8\'\'%41") NIL NIL '
        '"7bit" 1 NIL NIL NIL NIL)',
        '("application" "x" ("third*x" "1" "g*0" "a" "g*2" "c" "h*" "utf-8\'\'%41") NIL NIL '
        '"7bit" 1)',
    ),
]


@pytest.mark.parametrize(("text", "bodystructure", "body"), CASES)
def test_bodystructure_table(text: str, bodystructure: str, body: str) -> None:
    raw = crlf(text)
    s = summarize(raw)
    assert s.bodystructure == bodystructure
    assert s.body == body
    check_consistent(raw, s)


FORWARD = (
    "From: outer@example.org\nTo: inner@example.net\nSubject: fwd\n"
    "Content-Type: multipart/mixed; boundary=\"outer b\"\n\n--outer b\n"
    "Content-Type: text/plain; charset=us-ascii\n\nSee attached...\n\n--outer b\n"
    "Content-Type: message/rfc822\nContent-Description: Forwarded\n\n"
    "From: sub@example.org\nTo: t1@example.org, t2@example.org\n"
    "Date: Sun, 12 Aug 2012 12:34:56 +0300\nSubject: submsg\n"
    "Content-Type: multipart/alternative; boundary=\"sub1\"\n\n"
    "Sub prologue\n--sub1\nContent-Type: text/html\nContent-Transfer-Encoding: 8bit\n\n"
    "<p>Hello world</p>\n\n--sub1\nContent-Type: text/plain\n\nHello another world\n\n"
    "--sub1--\nSub epilogue\n\n--outer b--\nepilogue\n"
)


def test_nested_message_rfc822() -> None:
    raw = crlf(FORWARD)
    s = summarize(raw)
    inner = ('("Sun, 12 Aug 2012 12:34:56 +0300" "submsg" ((NIL NIL "sub" "example.org")) '
             '((NIL NIL "sub" "example.org")) ((NIL NIL "sub" "example.org")) '
             '((NIL NIL "t1" "example.org")(NIL NIL "t2" "example.org")) NIL NIL NIL NIL)')
    assert s.bodystructure == (
        '(("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 17 1 NIL NIL NIL NIL)'
        '("message" "rfc822" NIL NIL "Forwarded" "7bit" 358 ' + inner + ' '
        '(("text" "html" ("charset" "us-ascii") NIL NIL "8bit" 20 1 NIL NIL NIL NIL)'
        '("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 21 1 NIL NIL NIL NIL) '
        '"alternative" ("boundary" "sub1") NIL NIL NIL) 20 NIL NIL NIL NIL) '
        '"mixed" ("boundary" "outer b") NIL NIL NIL)')
    check_consistent(raw, s)
    secs = {p.section: p for p in s.parts}
    assert list(secs) == ["", "1", "2", "2.1", "2.2"]
    assert secs["2"].is_message_rfc822 and secs["2"].content_type == "message/rfc822"
    assert section_bytes(raw, s, "1") == b"See attached...\r\n"
    assert section_bytes(raw, s, "2.1") == b"<p>Hello world</p>\r\n"
    assert section_bytes(raw, s, "2.2") == b"Hello another world\r\n"
    assert section_bytes(raw, s, "2.2.MIME") == b"Content-Type: text/plain\r\n\r\n"
    hdr = section_bytes(raw, s, "2.HEADER")
    assert hdr is not None and hdr.startswith(b"From: sub@example.org\r\n") and hdr.endswith(b"\r\n\r\n")
    text = section_bytes(raw, s, "2.TEXT")
    assert text is not None and text.startswith(b"Sub prologue\r\n--sub1") and text.endswith(b"Sub epilogue\r\n")
    assert section_bytes(raw, s, "2.HEADER.FIELDS (Subject)") == b"Subject: submsg\r\n\r\n"
    assert section_bytes(raw, s, "1.HEADER") is None  # not a message/rfc822 part
    assert section_bytes(raw, s, "3") is None
    assert section_bytes(raw, s, "2.3") is None


def test_single_part_message_is_part_1_and_rfc822_body_nests() -> None:
    raw = crlf("Subject: x\n\nhello\n")
    s = summarize(raw)
    assert [(p.section, p.header_start, p.body_start, p.end) for p in s.parts] == [
        ("", 0, 14, 21), ("1", 0, 14, 21)]
    assert section_bytes(raw, s, "1") == b"hello\r\n"
    assert section_bytes(raw, s, "TEXT") == b"hello\r\n"
    assert section_bytes(raw, s, "HEADER") == b"Subject: x\r\n\r\n"
    assert section_bytes(raw, s, "") == raw
    # a message/rfc822 part holding a single-part message: its body is n.1 (RFC 3501 §6.4.5)
    raw2 = crlf("Content-Type: multipart/mixed; boundary=q\n\n--q\nContent-Type: message/rfc822\n\n"
                "Subject: in\n\ninner text\n--q--\n")
    s2 = summarize(raw2)
    assert [p.section for p in s2.parts] == ["", "1", "1.1"]
    assert section_bytes(raw2, s2, "1.1") == b"inner text"
    assert section_bytes(raw2, s2, "1.TEXT") == b"inner text"
    assert section_bytes(raw2, s2, "1.HEADER") == b"Subject: in\r\n\r\n"


def test_multipart_digest_defaults_to_message_rfc822() -> None:
    raw = crlf("Content-Type: multipart/digest; boundary=d\n\n--d\n\nSubject: one\n\nfirst\n"
               "--d\n\nSubject: two\n\nsecond\n--d--\n")
    s = summarize(raw)
    tree = read_imap(s.bodystructure)
    assert isinstance(tree, list)
    assert [k[0:2] for k in tree[:2]] == [["message", "rfc822"], ["message", "rfc822"]]
    assert [p.section for p in s.parts] == ["", "1", "1.1", "2", "2.1"]
    assert section_bytes(raw, s, "2.1") == b"second"


def test_nested_multipart_sections_and_offsets() -> None:
    raw = crlf("Content-Type: multipart/mixed; boundary=o\n\n--o\n"
               "Content-Type: multipart/alternative; boundary=oo\n\n--oo\n\nplain\n--oo\n"
               "Content-Type: text/html\n\n<b>h</b>\n--oo--\n--o\n"
               "Content-Type: application/octet-stream\n\nBIN\n--o--")
    s = summarize(raw)
    got = {p.section: raw[p.body_start:p.end] for p in s.parts}
    assert got["1.1"] == b"plain" and got["1.2"] == b"<b>h</b>" and got["2"] == b"BIN"
    # the close delimiter's line break stays with it, as Dovecot keeps it (issue 10)
    assert got["1"].startswith(b"--oo\r\n") and got["1"].endswith(b"--oo--\r\n")
    assert {p.section: p.content_type for p in s.parts}["1"] == "multipart/alternative"
    check_consistent(raw, s)


def test_leaf_part_is_its_own_part_1() -> None:
    # RFC 3501 §6.4.5; Dovecot answers BODY[n.1] of a leaf n with n (issue 10)
    raw = crlf("Content-Type: multipart/mixed; boundary=o\n\n--o\nContent-Type: text/plain\n\n"
               "one\n--o\nContent-Type: message/rfc822\n\nSubject: in\n\ninner\n--o\n"
               "Content-Type: message/rfc822\n\nContent-Type: multipart/mixed; boundary=i\n\n"
               "--i\nContent-Type: text/html\n\n<p>x</p>\n--i--\n--o--\n")
    s = summarize(raw)
    assert section_bytes(raw, s, "1.1") == b"one"
    assert section_bytes(raw, s, "1.1.MIME") == section_bytes(raw, s, "1.MIME") == (
        b"Content-Type: text/plain\r\n\r\n")
    assert section_bytes(raw, s, "1.1.1") is None
    assert section_bytes(raw, s, "1.2") is None
    assert section_bytes(raw, s, "1.1.HEADER") is None
    # a message/rfc822 part's "n.1" is the body of the single-part message inside it, which
    # has no part 1 of its own
    assert section_bytes(raw, s, "2.1") == b"inner"
    assert section_bytes(raw, s, "2.1.1") is None
    # a leaf inside the multipart a message/rfc822 part holds
    assert section_bytes(raw, s, "3.1") == b"<p>x</p>"
    assert section_bytes(raw, s, "3.1.1") == b"<p>x</p>"
    # a single-part message: "1" is its body, "1.1" does not exist
    one = crlf("Subject: x\n\nhello\n")
    assert section_bytes(one, summarize(one), "1.1") is None


@pytest.mark.parametrize(("between", "part_ends_with"), [
    ("", b"--i--\r\n"),  # the close line's break is its own (Dovecot)
    ("\n", b"--i--\r\n"),  # an empty epilogue line: its break is the outer delimiter's
    ("epilogue\n", b"--i--\r\nepilogue"),
])
def test_nested_multipart_keeps_its_close_delimiter_line_break(
        between: str, part_ends_with: bytes) -> None:
    raw = crlf("Content-Type: multipart/mixed; boundary=o\n\n--o\n"
               "Content-Type: multipart/alternative; boundary=i\n\n--i\n\nplain\n--i--\n"
               + between + "--o\nContent-Type: message/rfc822\n\n"
               "Content-Type: multipart/mixed; boundary=j\n\n--j\n\ndeep\n--j--\n"
               + between + "--o--\n")
    s = summarize(raw)
    first = section_bytes(raw, s, "1")
    assert first is not None and first.endswith(part_ends_with)
    second = section_bytes(raw, s, "2")
    assert second is not None and second.endswith(part_ends_with.replace(b"--i--", b"--j--"))
    assert section_bytes(raw, s, "1.1") == b"plain"
    tree = read_imap(s.bodystructure)
    assert isinstance(tree, list) and isinstance(tree[1], list)
    assert tree[1][6] == len(second)  # the message/rfc822 part's size counts it too
    check_consistent(raw, s)


def test_message_part_holding_a_cut_header_keeps_the_line_break() -> None:
    # a message/rfc822 part whose message is a header the delimiter cuts short: Dovecot
    # counts the line break in the part's body (size, lines) but not in the message's header
    raw = crlf("Content-Type: multipart/mixed; boundary=t\n\n--t\nContent-Type: message/rfc822"
               "\n\nSubject: header only\n--t--\n")
    s = summarize(raw)
    assert section_bytes(raw, s, "1") == b"Subject: header only\r\n"
    assert section_bytes(raw, s, "1.HEADER") == b"Subject: header only"
    assert section_bytes(raw, s, "1.TEXT") == b""
    tree = read_imap(s.bodystructure)
    assert isinstance(tree, list) and isinstance(tree[0], list)
    assert tree[0][6] == 22 and tree[0][9] == 1  # size and lines
    check_consistent(raw, s)


def test_part_without_a_body_gives_the_delimiter_its_line_break() -> None:
    # as Dovecot: the line break before a delimiter is the delimiter's, even when it ends
    # the part's empty line (only a close delimiter line keeps its own, above)
    raw = crlf("Content-Type: multipart/mixed; boundary=o\n\n--o\nContent-Type: text/plain\n\n"
               "--o\nContent-Type: text/html\n--o\n\n--o--\n")
    s = summarize(raw)
    assert section_bytes(raw, s, "1") == b""
    assert section_bytes(raw, s, "1.MIME") == b"Content-Type: text/plain\r\n"
    assert section_bytes(raw, s, "2.MIME") == b"Content-Type: text/html"
    assert section_bytes(raw, s, "3.MIME") == b"" and section_bytes(raw, s, "3") == b""
    check_consistent(raw, s)


def test_lf_only_and_unterminated_and_prefix_boundary() -> None:
    # bare LF line ends work without normalisation (sizes are then raw octets)
    raw = (b"Content-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: text/plain\n\nx\ny\n"
           b"--b2 not a delimiter\n--b\n\nlast part, never closed\n")
    s = summarize(raw)
    secs = {p.section: raw[p.body_start:p.end] for p in s.parts}
    assert secs["1"] == b"x\ny\n--b2 not a delimiter"
    assert secs["2"] == b"last part, never closed\n"
    check_consistent(raw, s)


# ---------------------------------------------------------------- envelopes
def env(headers: str) -> list[object]:
    v = read_imap(summarize(crlf(headers + "\n\nbody\n")).envelope)
    assert isinstance(v, list) and len(v) == 10
    return v


def test_envelope_absent_fields_are_nil() -> None:
    assert env("X-Nothing: 1") == [None] * 10


def test_envelope_sender_reply_to_default_and_empty() -> None:
    e = env("From: a@b.example\nSender:\nReply-To: r@b.example")
    assert e[2] == e[3] == [[None, None, "a", "b.example"]]
    assert e[4] == [[None, None, "r", "b.example"]]


def test_envelope_groups_routes_comments_missing_parts() -> None:
    e = env('To: undisclosed-recipients:;\n'
            'Cc: Team: x@y.example, "Doe, J." <j@y.example>;, <@r1.example,@r2.example:d@e.example>\n'
            "Bcc: root, joe@host.example (Joe Bloggs), \"quoted local\"@q.example")
    assert e[5] == [[None, None, "undisclosed-recipients", None], [None, None, None, None]]
    assert e[6] == [[None, None, "Team", None], [None, None, "x", "y.example"],
                    ["Doe, J.", None, "j", "y.example"], [None, None, None, None],
                    [None, "@r1.example,@r2.example", "d", "e.example"]]
    assert e[7] == [[None, None, "root", "MISSING_DOMAIN"],
                    ["Joe Bloggs", None, "joe", "host.example"],
                    [None, None, '"quoted local"', "q.example"]]


def test_envelope_as_dovecot_writes_tabs_and_comments() -> None:
    # a TAB in a subject or a display name is a space (a folded CRLF TAB too); the Date
    # keeps its own; a comment names an address only once the address has begun
    e = env('Subject: a\tb\n\tc\nDate: Mon,\t1 Dec 2026 10:00:00 +0000\n'
            'From: "A\tB" <a@b.example>, (lead) c@b.example, d@b.example (one) (two), '
            'e (mid) @b.example')
    assert e[0] == "Mon,\t1 Dec 2026 10:00:00 +0000" and e[1] == "a b c"
    assert e[2] == [["A B", None, "a", "b.example"], [None, None, "c", "b.example"],
                    ["two", None, "d", "b.example"], ["mid", None, "e", "b.example"]]


def test_envelope_keeps_encoded_words_and_uses_literals_for_8bit() -> None:
    raw = crlf("From: =?utf-8?q?J=C3=B6rg?= <jorg@example.org>\n"
               "Subject: caf\u00e9 \"quoted\" \\ back\n"
               "In-Reply-To: <p@x>\n\nbody\n")
    s = summarize(raw)
    assert '(("=?utf-8?q?J=C3=B6rg?=" NIL "jorg" "example.org"))' in s.envelope
    assert "{21}\r\ncaf\u00e9 \"quoted\" \\ back" in s.envelope  # 8-bit: a literal
    e = read_imap(s.envelope)
    assert isinstance(e, list) and e[1] == 'caf\u00e9 "quoted" \\ back' and e[8] == "<p@x>"
    assert s.from_ == "J\u00f6rg <jorg@example.org>"  # decoded for SEARCH


def test_search_fields_decode_rfc2047_and_unfold() -> None:
    s = summarize(crlf("Subject: =?iso-8859-1?q?h=E9llo?=\n =?utf-8?b?d8O2cmxk?=\n"
                       "To: a@x.example\nTo: b@x.example\nDate: not a date\n\nb"))
    assert s.subject == "h\u00e9llow\u00f6rld"  # whitespace between encoded words is dropped
    assert s.to == "a@x.example, b@x.example"
    assert s.date is None
    s2 = summarize(b"Date: Thu, 26 Nov 2026 10:00:00 -0000\r\n\r\n")
    assert s2.date == datetime(2026, 11, 26, 10, 0, tzinfo=UTC)


def test_imap_string_forms() -> None:
    assert imap_string(None) == "NIL"
    assert imap_string('a"b\\c') == '"a\\"b\\\\c"'
    assert imap_string("x\r\ny") == "{4}\r\nx\r\ny"
    assert imap_string("\u00e9") == "{2}\r\n\u00e9"
    assert decode_words("no words") == "no words"
    assert decode_words("=?bogus-charset?q?abc?=") == "abc"


# ---------------------------------------------------------------- FETCH helpers
HDR = (b"From: a@example.org\r\nSubject: first\r\n line two\r\nX-Other: 1\r\n"
       b"subject: again\r\nReceived: by x\r\n\tfolded\r\n\r\n")


def test_header_fields_and_not() -> None:
    assert header_fields(HDR, ["SUBJECT"]) == (
        b"Subject: first\r\n line two\r\nsubject: again\r\n\r\n")
    assert header_fields(HDR, [b"from", "x-other"]) == b"From: a@example.org\r\nX-Other: 1\r\n\r\n"
    assert header_fields(HDR, ["Subject", "Received"], negate=True) == (
        b"From: a@example.org\r\nX-Other: 1\r\n\r\n")
    assert header_fields(HDR, ["nope"]) == b"\r\n"
    # RFC 3501 §6.4.5: no blank line in any header fetch of a message with no body and no
    # blank line; the fields as they stand
    assert header_fields(b"Subject: no newline", ["subject"]) == b"Subject: no newline"
    assert header_fields(b"Subject: a\r\nFrom: b\r\n", ["from"], negate=True) == b"Subject: a\r\n"
    assert header_fields(b"Subject: a\r\nFrom: b", ["x"], negate=True) == b"Subject: a\r\nFrom: b"
    assert header_fields(b"Subject: a\r\n", ["x"]) == b""


def test_parse_section() -> None:
    assert parse_section("") == Section("", "")
    assert parse_section("header") == Section("", "HEADER")
    assert parse_section("1.2.3") == Section("1.2.3", "")
    assert parse_section("4.MIME") == Section("4", "MIME")
    assert parse_section('2.HEADER.FIELDS.NOT ("X-A" Subject)') == Section(
        "2", "HEADER.FIELDS.NOT", ("X-A", "Subject"))
    for bad in ["MIME", "0", "1.0", "1..2", ".1", "1HEADER", "HEADER.FIELDS", "HEADER.FIELDS ()",
                "TEXT (a)", "BOGUS", "1.2.", "01"]:
        assert parse_section(bad) is None, bad


def test_section_bytes_top_level() -> None:
    raw = rfc3501_message()
    s = summarize(raw)
    assert section_bytes(raw, s, "HEADER") == raw[:s.header_bytes]
    assert section_bytes(raw, s.parts, "TEXT") == raw[s.header_bytes:]
    assert section_bytes(raw, s, "HEADER.FIELDS (Subject)") == (
        b"Subject: IMAP4rev1 WG mtg summary and minutes\r\n\r\n")
    assert section_bytes(raw, s, "2.MIME") is not None
    assert section_bytes(raw, s, "nonsense") is None


# ---------------------------------------------------------------- never raises
@settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    s = summarize(data)
    check_consistent(data, s)


FRAGMENTS = [
    b"\r\n", b"\n", b"\r", b"--b", b"--b--", b"--c", b"--c--", b": ", b";", b'"', b"(", b")",
    b"Content-Type: multipart/mixed; boundary=b\r\n",
    b"Content-Type: multipart/alternative; boundary=\"c\"\r\n",
    b"Content-Type: message/rfc822\r\n", b"Content-Type: multipart/digest; boundary=b\r\n",
    b"Content-Type: text/plain; charset*0*=utf-8''x; charset*1=y\r\n",
    b"Content-Disposition: attachment; filename=\"a\\\"b\"\r\n",
    b"Content-Language: en, (c) fr\r\n", b"From: <@a,@b:c@d>, g: h@i;, \"x\" <\r\n",
    b"To: =?utf-8?q?=C3=A9?= <x@y>\r\n", b"Subject: \xff\xfe\x00\r\n", b" folded\r\n",
    b"Date: Mon, 32 Foo 99999 99:99 +9999\r\n", b"hello world", b"\x00", b"\xe9",
]


@settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=60))
def test_mime_shaped_junk_never_raises(frags: list[bytes]) -> None:
    data = b"".join(frags)
    check_consistent(data, summarize(data))


def test_mutated_real_messages_never_raise() -> None:
    seeds = [rfc3501_message(), crlf(FORWARD)] + [crlf(c[0]) for c in CASES]
    rng = random.Random(20261126)
    for _ in range(1500):
        m = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 8)):
            op = rng.randrange(5)
            i = rng.randrange(len(m) + 1)
            if op == 0 and m:  # flip a byte
                m[min(i, len(m) - 1)] = rng.randrange(256)
            elif op == 1:  # delete a run
                del m[i:i + rng.randint(1, 40)]
            elif op == 2:  # duplicate a run
                m[i:i] = m[i:i + rng.randint(1, 80)]
            elif op == 3:  # insert MIME syntax
                m[i:i] = rng.choice(FRAGMENTS)
            else:  # truncate
                del m[i:]
        data = bytes(m)
        check_consistent(data, summarize(data))


def test_deep_nesting_is_bounded() -> None:
    depth = 300
    head = b"".join(b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i)
                    for i in range(depth))
    raw = head + b"\r\ninnermost\r\n"
    s = summarize(raw)
    check_consistent(raw, s)
    assert len(s.parts) < depth
    nested_msgs = b"Content-Type: message/rfc822\r\n\r\n" * 500 + b"\r\nend"
    check_consistent(nested_msgs, summarize(nested_msgs))


@pytest.mark.parametrize("raw", [
    b"From: " + b"<@" * 100_000 + b"\r\n\r\n",
    b"To: " + b"a," * 100_000 + b"\r\n\r\n",
    b"Subject: " + b"(" * 100_000 + b"\r\n\r\n",
    b"Content-Type: text/plain" + b"; a=b" * 50_000 + b"\r\n\r\n",
    b"Content-Type: multipart/mixed; boundary=b\r\n\r\n" + b"--b\r\n" * 50_000,
    b"X: y\r\n" * 50_000 + b"\r\n",
])
def test_pathological_input_is_bounded(raw: bytes) -> None:
    import time

    started = time.monotonic()
    s = summarize(raw)
    assert time.monotonic() - started < 5
    check_consistent(raw, s)
    tree = read_imap(s.bodystructure)
    assert isinstance(tree, list)


# ---------------------------------------------------------------- BINARY (RFC 3516)
def test_binary_section_decodes_the_part_encoding() -> None:
    # imaptest's fetch-binary-mime-base64 and -qp cases (what Dovecot answers)
    raw = crlf("Content-Type: multipart/mixed; boundary=b\n\n--b\n"
               "Content-Transfer-Encoding: base64\n\n  aGVs    \n bG8g  \n   d29y  \t \n    bGQ= \n\n"
               "--b\nContent-Transfer-Encoding: BASE64\n\nYWJjZGVmZw1oaWprbA0KbW5vCnBxcnN0dXZxeHl6\n"
               "--b\nContent-Transfer-Encoding: quoted-printable\n\nhello  \nbar=\n\nfoo\t=\nbar\n"
               "foo\t \t= \n=62\nfoo = \t\nbar\nfoo =\n=62\nfoo  \nbar=\n\nfoo_bar\n\n"
               "--b\nContent-Type: message/rfc822\nContent-Transfer-Encoding: 8bit\n\nSubject: x\n\ny\n"
               "--b\nContent-Transfer-Encoding: x-uuencode\n\nbegin\n--b--\n")
    s = summarize(raw)
    assert binary_section(raw, s.parts, "1") == (b"hello world", True)
    assert binary_section(raw, s.parts, "1.1") == (b"hello world", True)  # n.1 of a leaf
    assert binary_section(raw, s.parts, "2") == (b"abcdefg\rhijkl\r\nmno\npqrstuvqxyz", True)
    assert binary_section(raw, s.parts, "3") == (
        b"hello\r\nbar\r\nfoo\tbar\r\nfoo\t \tb\r\nfoo bar\r\nfoo b\r\nfoo\r\nbar\r\n"
        b"foo_bar\r\n", True)
    assert binary_section(raw, s.parts, "4") == (b"Subject: x\r\n\r\ny", False)
    assert binary_section(raw, s.parts, "9") == (b"", False)
    assert binary_section(raw, s.parts, "") == (raw, False)
    with pytest.raises(UnknownCTE):
        binary_section(raw, s.parts, "5")


def test_binary_parts_of_a_literal8_append_become_base64() -> None:
    body = bytes(range(256)) * 2
    raw = (b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
           b"Content-Type: application/octet-stream\r\ncontent-transfer-encoding:  Binary \r\n"
           b"X-After: 1\r\n\r\n" + body + b"\r\n--b\r\nContent-Transfer-Encoding: binary\r\n"
           b"Content-Type: multipart/mixed; boundary=c\r\n\r\n--c\r\n\r\nkept\r\n--c--\r\n"
           b"--b--\r\n")
    out = binary_to_base64(raw)
    assert b"\x00" not in out and out.count(b"Content-Transfer-Encoding: base64\r\nX-After: 1") == 1
    assert all(len(line) <= 76 for line in out.split(b"\r\n"))
    s = summarize(out)
    assert binary_section(out, s.parts, "1") == (body, True)
    # a multipart is never re-encoded (Dovecot's part_can_convert), its parts stay as they are
    assert section_bytes(out, s, "2.1") == b"kept"
    assert binary_to_base64(b"Subject: x\r\n\r\ntext\r\n") == b"Subject: x\r\n\r\ntext\r\n"
