"""SMTP client wire format: reply parsing (RFC 5321 §4.2) and DATA encoding (§4.5.2)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postbus.relay.wire import MAX_REPLY_LINE, ReplyError, data_payload, split_replies

STREAM = (b"220 mx.example.net ESMTP\r\n"
          b"250-mx.example.net\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250 8BITMIME\r\n"
          b"250 2.1.0 Ok\r\n550 5.1.1 <x@y>: no\r\n354 go ahead\n"
          b"421-4.4.2 closing\r\n421 4.4.2 bye\r\n")
EXPECTED = [
    (220, "mx.example.net ESMTP"),
    (250, "mx.example.net\nPIPELINING\nSIZE 1000\n8BITMIME"),
    (250, "2.1.0 Ok"),
    (550, "5.1.1 <x@y>: no"),
    (354, "go ahead"),
    (421, "4.4.2 closing\n4.4.2 bye"),
]


@pytest.mark.parametrize("chunk", [1, 2, 7, 4096])
def test_replies_are_the_same_however_the_bytes_arrive(chunk: int) -> None:
    buf = bytearray()
    got: list[tuple[int, str]] = []
    for i in range(0, len(STREAM), chunk):
        buf += STREAM[i:i + chunk]
        got += split_replies(buf)
    assert got == EXPECTED
    assert buf == b""


def test_incomplete_reply_stays_in_the_buffer() -> None:
    buf = bytearray(b"250-first\r\n250-second\r\n")
    assert split_replies(buf) == []
    assert buf == b"250-first\r\n250-second\r\n"
    buf += b"250 last\r\n25"
    assert split_replies(buf) == [(250, "first\nsecond\nlast")]
    assert buf == b"25"


@pytest.mark.parametrize("junk", [
    b"hello\r\n", b"25\r\n", b"2500 x\r\n", b"250-a\r\n251 b\r\n", b"abc def\r\n",
    b"2" * (MAX_REPLY_LINE + 10), b"250 " + b"x" * (MAX_REPLY_LINE + 1) + b"\r\n",
    b"".join(b"250-x\r\n" for _ in range(300)),
])
def test_junk_is_a_reply_error(junk: bytes) -> None:
    with pytest.raises(ReplyError):
        split_replies(bytearray(junk))


def test_bare_code_line_is_a_reply() -> None:
    assert split_replies(bytearray(b"250\r\n")) == [(250, "")]


@given(st.binary(max_size=3000))
def test_any_bytes_parse_or_raise_reply_error(data: bytes) -> None:
    buf = bytearray(data)
    try:
        for code, _ in split_replies(buf):
            assert 0 <= code <= 999
    except ReplyError:
        pass


@pytest.mark.parametrize(("body", "wire"), [
    (b"a\r\nb\r\n", b"a\r\nb\r\n.\r\n"),
    (b"a\nb", b"a\r\nb\r\n.\r\n"),
    (b".x\r\n..y\r\nz.\r\n", b"..x\r\n...y\r\nz.\r\n.\r\n"),
    (b"a\r\n.\r\nb\r\n", b"a\r\n..\r\nb\r\n.\r\n"),
    (b"a\rb\r\n", b"a\r\nb\r\n.\r\n"),
    (b"", b".\r\n"),
])
def test_data_payload(body: bytes, wire: bytes) -> None:
    assert data_payload(body) == wire


@given(st.binary(max_size=2000))
def test_data_payload_never_ends_early(body: bytes) -> None:
    out = data_payload(body)
    assert out.endswith(b"\r\n.\r\n") or out == b".\r\n"
    # the only "CRLF . CRLF" is the terminator
    assert (b"\r\n" + out).count(b"\r\n.\r\n") == 1
