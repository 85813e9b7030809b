"""protocols.served: the one home of line-end normalisation and of the served message
(``prefix + blob``, ADR 0002), its IMAP size and POP3's RETR text and size."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postbus.protocols.pop3 import stuff
from postbus.protocols.served import (
    ends_crlf,
    normalize_crlf,
    retr_octets,
    retr_text,
    served,
    served_size,
)

PREFIX = b"Return-Path: <bob@example.net>\r\nDelivered-To: alice@example.test\r\n"

# every shape of line end a message can arrive with, and the CRLF form stored for it
SHAPES = [
    ("crlf", b"Subject: s\r\n\r\nbody\r\n", b"Subject: s\r\n\r\nbody\r\n"),
    ("bare LF", b"Subject: s\n\nbody\n", b"Subject: s\r\n\r\nbody\r\n"),
    ("bare CR", b"Subject: s\r\n\r\nbo\rdy\r\n", b"Subject: s\r\n\r\nbo\r\ndy\r\n"),
    ("bare CR last", b"Subject: s\r\n\r\nbody\r", b"Subject: s\r\n\r\nbody\r\n"),
    ("mixed", b"Subject: s\n\r\nab\r\rc\n\r\n", b"Subject: s\r\n\r\nab\r\n\r\nc\r\n\r\n"),
    ("CR LF CR", b"a\r\n\r", b"a\r\n\r\n"),
    ("no final line end", b"Subject: s\r\n\r\nlast", b"Subject: s\r\n\r\nlast"),
    ("empty body", b"Subject: s\r\n\r\n", b"Subject: s\r\n\r\n"),
    ("empty", b"", b""),
]


@pytest.mark.parametrize(("raw", "stored"), [s[1:] for s in SHAPES], ids=[s[0] for s in SHAPES])
def test_every_shape_has_one_served_form_and_size(raw: bytes, stored: bytes) -> None:
    assert normalize_crlf(raw) == stored
    for prefix in (b"", PREFIX):
        imap = served(prefix, stored)
        assert imap == prefix + stored and len(imap) == served_size(prefix, len(stored))
        pop3 = retr_text(prefix, stored)
        pad = 0 if ends_crlf(stored) else 2  # RFC 1939 §3: POP3 ends the last line
        assert pop3 == imap + b"\r\n" * (pad // 2)
        assert retr_octets(prefix, stored) == served_size(prefix, len(stored)) + pad
        # RETR normalizes what it sends, so an unnormalized blob is sent as the stored form
        assert retr_text(prefix, raw) == pop3


@given(st.binary(max_size=300))
def test_normalize_crlf_leaves_only_crlf_and_is_idempotent(data: bytes) -> None:
    norm = normalize_crlf(data)
    assert norm == re.sub(rb"\r?\n|\r", b"\r\n", data)  # the one rule, spelt out
    assert norm.count(b"\r") == norm.count(b"\n") == norm.count(b"\r\n")
    assert normalize_crlf(norm) is norm  # already CRLF: not copied


@given(st.binary(max_size=200), st.binary(max_size=300))
def test_retr_text_is_the_served_form_with_crlf_and_the_last_line_ended(
        prefix: bytes, blob: bytes) -> None:
    norm = normalize_crlf(served(prefix, blob))
    text = retr_text(prefix, blob)
    assert text == (norm if ends_crlf(norm) else norm + b"\r\n")
    assert retr_text(b"", text) == text
    assert retr_octets(prefix, blob) == len(text)
    # as pop3-access sends it in two parts, a prefix of whole lines then the prepared blob
    if not prefix or prefix.endswith(b"\n"):
        assert stuff(retr_text(prefix, b"")) + stuff(retr_text(b"", blob)) == stuff(text)
