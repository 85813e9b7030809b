"""The text SEARCH looks in (libs/protocols/searchtext.py) and RFC 2047 decoding: what is
decoded, and that hostile messages cost bounded work."""

from __future__ import annotations

import base64
import email.header
from datetime import date

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postbus.kit.testing import examples
from postbus.protocols.mime import decode_bytes, decode_words
from postbus.protocols.searchtext import (
    address_text,
    compare_dates,
    header_values,
    message_text,
    written_date,
)


def _reference(text: str) -> str:
    return "".join(c.decode(cs or "us-ascii", "replace") if isinstance(c, bytes) else c
                   for c, cs in email.header.decode_header(text))


@pytest.mark.parametrize("text", [
    "Hello =?utf-8?q?W=C3=B6rld?= !",
    "=?ISO-8859-1?Q?a?= =?ISO-8859-1?Q?b?=",  # whitespace between adjacent words dropped
    "=?utf-8?b?w6k=?=",
    "=?utf-8?q?=C3?= =?utf-8?q?=A9?=",  # a character split across two words
    "=?utf-8?q?a_b?=",
    "x =?iso-8859-1?q?=E9?= =?utf-8?q?=C3=A9?= y",
    "plain text, no words",
])
def test_decode_words_agrees_with_the_standard_library(text: str) -> None:
    assert decode_words(text) == _reference(text)


def test_decode_words_edge_cases() -> None:
    assert decode_words("=?UTF-8*en?Q?hi?=") == "hi"  # RFC 2231 §5 language
    assert decode_words("=?x-unknown?q?caf=C3=A9?=") == "café"  # unknown charset: UTF-8
    assert decode_words("=?punycode?q?abc-?=") == "abc-"  # not a mail charset
    assert decode_words("=?rot13?q?abc?=") == "abc"  # not a text encoding at all


@pytest.mark.timeout(20)
def test_decode_words_is_linear() -> None:
    # email.header.decode_header took 7 s for 80,000 words and grows with the square
    words = 400_000
    text = " ".join(f"=?utf-8?q?w{i}?=" for i in range(words))
    out = decode_words(text)
    assert out.startswith("w0w1w2") and out.endswith(f"w{words - 1}")


def test_decode_bytes_never_raises() -> None:
    assert decode_bytes(b"\xe9", "iso-8859-1") == "é"
    assert decode_bytes(b"\xff", "us-ascii") == "\ufffd"
    assert decode_bytes(b"abc", "base64_codec") == "abc"


MULTI = (b"From: a@example.net\r\nSubject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n"
         b"Content-Type: multipart/mixed; boundary=XX\r\n\r\npreamble\r\n"
         b"--XX\r\nContent-Type: text/plain; charset=iso-8859-1\r\n"
         b"Content-Transfer-Encoding: quoted-printable\r\n\r\ncaf=E9 au lait\r\n"
         b"--XX\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
         + base64.encodebytes("<p>naïve</p>".encode()) +
         b"--XX\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
         + base64.encodebytes(b"secret-in-attachment") +
         b"--XX\r\nContent-Type: message/rfc822\r\n\r\nSubject: inner subject\r\n\r\ninner body\r\n"
         b"--XX--\r\n")


def test_message_text_decodes_text_parts_only() -> None:
    body = message_text(MULTI, headers=False)
    assert "café au lait" in body and "naïve" in body
    assert "inner subject" in body and "inner body" in body  # an attached message's text
    assert "secret-in-attachment" not in body  # not a text part
    assert "Grüße" not in body  # the top header is not BODY
    text = message_text(MULTI, headers=True)
    assert "subject: Grüße" in text and "café" in text  # field names lower-case


def test_header_values() -> None:
    raw = b"X-Tag: =?utf-8?q?caf=C3=A9?=\r\nX-Tag: two\r\n folded\r\n\r\nX-Tag: body\r\n"
    assert header_values(raw, "x-TAG") == ["café", "two folded"]
    assert header_values(raw, "missing") == []


def test_limit_bounds_what_is_decoded() -> None:
    big = b"Subject: s\r\nContent-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(
        b"x" * 3_000_000)
    assert len(message_text(big, headers=False, limit=1000)) == 1000
    subj = b"Subject: " + b" ".join(b"=?utf-8?q?w%d?=" % i for i in range(20_000)) + b"\r\n\r\n"
    assert len(message_text(subj, headers=True, limit=500)) <= 500
    assert sum(map(len, header_values(subj, "subject", limit=300))) <= 300


@pytest.mark.parametrize("value,want", [
    ("Sat, 24 Mar 2007 23:00:00 +0200", date(2007, 3, 24)),  # not the 24th 21:00 UTC...
    ("Mon, 26 Mar 2007 00:00:00 +0300", date(2007, 3, 26)),  # ...nor the 25th 21:00 UTC
    ("26 Mar 07 00:00 EST", date(2007, 3, 26)),  # obsolete forms (RFC 5322 §4.3)
    ("26 Mar 2007 00:00", date(2007, 3, 26)),
    ("Sun, 31 Feb 2007 00:00:00 +0200", None),
    ("yesterday", None),
    ("", None),
    (None, None),
])
def test_written_date_disregards_time_and_zone(value: str | None, want: date | None) -> None:
    assert written_date(value) == want


def test_compare_dates() -> None:
    d, ref = date(2007, 3, 25), date(2007, 3, 25)
    assert [compare_dates(op, d, ref) for op in ("sentbefore", "senton", "sentsince")] == [
        False, True, True]
    assert [compare_dates(op, d, date(2007, 3, 26)) for op in ("before", "on", "since")] == [
        True, False, False]


@pytest.mark.parametrize("value,found", [
    ("<user-from (comment)@ (comment) domain.org>", "user-from@domain.org"),
    ('"Joe" <joe(comment)@example.com>', "<joe@example.com>"),
    ("joe@(c)example.com", "joe@example.com"),
    ("user-from@domain.org (RealFrom)", "realfrom <user-from@domain.org>"),
])
def test_address_text_finds_addresses_written_with_comments(value: str, found: str) -> None:
    text = address_text(value).lower()
    assert found in text and value.lower() in text


def test_address_text_without_comments_is_the_field() -> None:
    assert address_text("Joe <joe@example.com>, ann@example.org") == (
        "Joe <joe@example.com>, ann@example.org")


@settings(max_examples=examples(300), deadline=None)
@given(st.text(max_size=300))
def test_address_text_and_written_date_never_raise(value: str) -> None:
    assert value in address_text(value)
    written_date(value)


@settings(max_examples=examples(300), deadline=None)
@given(st.binary(max_size=2000), st.booleans())
def test_any_bytes_never_raise(raw: bytes, headers: bool) -> None:
    assert len(message_text(raw, headers=headers, limit=700)) <= 700 + 100
    header_values(raw, "subject", limit=50)
