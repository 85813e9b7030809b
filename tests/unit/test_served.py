"""protocols.served: the one home of line-end normalisation and of the served message
(``prefix + blob``, ADR 0002), its IMAP size and POP3's RETR text and size."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postbus.protocols import dsn
from postbus.protocols.pop3 import stuff
from postbus.protocols.served import (
    crlf_text,
    dot_stuffed,
    ends_crlf,
    normalize_crlf,
    retr_octets,
    retr_text,
    served,
    served_size,
    wire_form,
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
    # DATA sends it as RETR does (no line here starts with a dot): every line end CRLF, the
    # last line ended, then the "." line
    assert wire_form(raw) == retr_text(b"", stored) + b".\r\n"


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


def test_dsn_and_pop3_use_the_one_rule() -> None:
    # the DSN builder's own copy was the same regex (``\r?\n|\r`` -> CRLF); it is now this
    assert dsn.normalize_crlf is normalize_crlf
    assert stuff is dot_stuffed


def test_wire_form_doubles_every_leading_dot() -> None:
    """The DATA wire form (RFC 5321 §4.5.2) of dotted lines; every shape of line end is in
    SHAPES above."""
    assert wire_form(b"a\r\n.\r\nb\r\n") == b"a\r\n..\r\nb\r\n.\r\n"  # a lone dot line
    assert wire_form(b"a\n.\nb") == b"a\r\n..\r\nb\r\n.\r\n"  # after a bare LF, unended
    assert wire_form(b"a\r\n.") == b"a\r\n..\r\n.\r\n"  # the last line, unended
    assert wire_form(b"a\r.b") == b"a\r\n..b\r\n.\r\n"  # after a bare CR
    assert wire_form(b".x\r\n..y\r\nz.\r\n") == b"..x\r\n...y\r\nz.\r\n.\r\n"
    assert wire_form(b"") == b".\r\n"
    for body in (b".x\r\n", b"a\r.b", b"a\n.\nb"):
        assert wire_form(body) == dot_stuffed(crlf_text(body)) + b".\r\n"


def _relay_wire_before_served(body: bytes) -> bytes:
    """relay/wire.py's own encoder before it went through this module."""
    text = re.sub(rb"\r\n|\r|\n", b"\r\n", body)
    if text and not text.endswith(b"\r\n"):
        text += b"\r\n"
    return re.sub(rb"(?m)^\.", b"..", text) + b".\r\n"


@given(st.binary(max_size=300))
def test_wire_form_is_what_the_relay_sent_before(body: bytes) -> None:
    out = wire_form(body)
    assert out == _relay_wire_before_served(body)
    assert (b"\r\n" + out).count(b"\r\n.\r\n") == 1  # the only terminator is the last line
