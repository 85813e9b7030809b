"""libs/protocols/pop3: command table, chunking invariance, arbitrary bytes never raise,
byte-stuffing and octet counts."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postbus.kit.testing import examples
from postbus.protocols.pop3 import (
    MAX_COMMAND_LINE,
    MAX_LINE,
    Apop,
    Auth,
    Bad,
    Capa,
    Dele,
    List,
    Noop,
    Pass,
    Quit,
    Receiver,
    Retr,
    Rset,
    Stat,
    Stls,
    Top,
    Uidl,
    Unknown,
    User,
    Utf8,
    decode_plain,
    err,
    multiline,
    ok,
    parse_line,
    retr_payload,
    stuff,
    top_payload,
)

TABLE = [
    (b"USER alice@example.test", User("alice@example.test")),
    (b"user bob", User("bob")),
    (b"PASS secret with spaces", Pass("secret with spaces")),
    (b"PASS  lead", Pass(" lead")),
    (b"QUIT", Quit()),
    (b"quit", Quit()),
    (b"STAT", Stat()),
    (b"LIST", List()),
    (b"LIST 3", List(3)),
    (b"UIDL", Uidl()),
    (b"UIDL 12", Uidl(12)),
    (b"RETR 1", Retr(1)),
    (b"DELE 2", Dele(2)),
    (b"NOOP", Noop()),
    (b"RSET", Rset()),
    (b"TOP 1 0", Top(1, 0)),
    (b"TOP 2 10", Top(2, 10)),
    (b"CAPA", Capa()),
    (b"STLS", Stls()),
    (b"UTF8", Utf8()),
    (b"AUTH", Auth()),
    (b"AUTH PLAIN", Auth("PLAIN")),
    (b"auth plain AGEAYg==", Auth("PLAIN", "AGEAYg==")),
    (b"AUTH PLAIN =", Auth("PLAIN", "=")),
    (b"APOP mrose c4c9334bac560ecc979e58001b3e22fb", Apop("mrose", "c4c9334bac560ecc979e58001b3e22fb")),
    (b"XYZZY", Unknown("XYZZY")),
    (b"", Bad("empty command")),
    (b" LIST", Bad("empty command")),
    (b"RETR", Bad("RETR needs a message number")),
    (b"DELE", Bad("DELE needs a message number")),
    (b"RETR x", Bad("invalid message number")),
    (b"RETR -1", Bad("invalid message number")),
    (b"RETR 1 2", Bad("RETR takes one message number")),
    (b"RETR 12345678901", Bad("message number too large")),
    (b"LIST \xd9\xa3", Bad("invalid message number")),  # an Arabic-Indic digit is no digit
    (b"TOP 1", Bad("TOP needs a message number and a line count")),
    (b"TOP 1 x", Bad("invalid line count")),
    (b"STAT 1", Bad("STAT takes no arguments")),
    (b"QUIT now", Bad("QUIT takes no arguments")),
    (b"USER", Bad("USER needs a name")),
    (b"USER ", Bad("USER needs a name")),
    (b"PASS", Bad("PASS needs a password")),
    (b"AUTH PLAIN a b", Bad("AUTH takes a mechanism and an initial response")),
    (b"NOOP\x00", Bad("NUL in command")),
    (b"USER \xff\xfe", Bad("command is not UTF-8")),
    (b"LIST " + b"1" * 300, Bad("line too long")),
]


@pytest.mark.parametrize(("line", "expected"), TABLE, ids=[repr(t[0][:30]) for t in TABLE])
def test_parse_table(line: bytes, expected: object) -> None:
    assert parse_line(line) == expected


def test_raw_line_is_kept_for_sasl_continuations() -> None:
    [item] = Receiver().feed(b"dGVzdAB0ZXN0AHRlc3Q=\r\n")
    assert isinstance(item, Unknown) and item.raw == b"dGVzdAB0ZXN0AHRlc3Q="


def test_line_limit_is_255_octets_with_crlf() -> None:
    # RFC 2449 §4: 255 octets including CRLF is the most a server must accept
    fits = b"USER " + b"a" * (MAX_COMMAND_LINE - 2 - 5)
    assert parse_line(fits) == User("a" * (MAX_COMMAND_LINE - 7))
    assert parse_line(fits + b"a") == Bad("line too long")


STREAM = (b"USER a\r\nPASS b c\r\nSTAT\nLIST 1\r\nRETR 2\r\nTOP 1 5\r\nBOGUS x\r\n"
          + b"X" * (MAX_LINE + 50) + b"\r\nNOOP\r\n\r\nUIDL\r\nQUIT\r\nPARTIAL")


def _feed_in(data: bytes, size: int) -> list[object]:
    r = Receiver()
    out: list[object] = []
    for i in range(0, len(data), size):
        out.extend(r.feed(data[i:i + size]))
    return out


def test_stream_result() -> None:
    out = _feed_in(STREAM, len(STREAM))
    assert out == [User("a"), Pass("b c"), Stat(), List(1), Retr(2), Top(1, 5), Unknown("BOGUS"),
                   Bad("line too long"), Noop(), Bad("empty command"), Uidl(), Quit()]


@pytest.mark.parametrize("size", [1, 2, 7, 4096])
def test_chunking_invariance(size: int) -> None:
    assert _feed_in(STREAM, size) == _feed_in(STREAM, len(STREAM))


def test_overlong_line_without_end_is_reported_once_and_skipped() -> None:
    r = Receiver()
    out = r.feed(b"A" * (MAX_LINE + 10))
    out += r.feed(b"B" * 100000)
    out += r.feed(b"C\r\nNOOP\r\n")
    assert out == [Bad("line too long"), Noop()]
    assert r.pending() == 0


def test_pending_counts_partial_line() -> None:
    r = Receiver()
    assert r.feed(b"STLS\r\nUSER x") == [Stls()]
    assert r.pending() == 6
    r.discard()
    assert r.pending() == 0 and r.feed(b"\r\n") == [Bad("empty command")]


@settings(max_examples=examples(300), deadline=None)
@given(st.binary(max_size=2000), st.lists(st.integers(1, 64), min_size=1, max_size=20))
def test_any_bytes_never_raise_and_chunking_does_not_matter(data: bytes, cuts: list[int]) -> None:
    whole = Receiver().feed(data)
    r = Receiver()
    parts: list[object] = []
    i = 0
    k = 0
    while i < len(data):
        n = cuts[k % len(cuts)]
        parts.extend(r.feed(data[i:i + n]))
        i += n
        k += 1
    assert parts == whole


@given(st.lists(st.sampled_from([b"USER ", b"PASS ", b"LIST ", b"RETR ", b"TOP ", b"AUTH ",
                                 b"1", b" ", b"\r", b"\n", b".", b"\x00", b"\xff", b"PLAIN"]),
                max_size=200))
def test_command_shaped_junk_never_raises(parts: list[bytes]) -> None:
    for item in Receiver().feed(b"".join(parts)):
        assert item is not None


# ---------------------------------------------------------------- replies and bodies
def test_reply_lines() -> None:
    assert ok() == b"+OK\r\n"
    assert ok("2 320") == b"+OK 2 320\r\n"
    assert err("maildrop locked", "IN-USE") == b"-ERR [IN-USE] maildrop locked\r\n"
    assert multiline(ok("x"), [b"1 10", b".dot"]) == b"+OK x\r\n1 10\r\n..dot\r\n.\r\n"


def test_byte_stuffing() -> None:
    assert stuff(b".a\r\nb\r\n.\r\n..c\r\n") == b"..a\r\nb\r\n..\r\n...c\r\n"
    assert retr_payload(b"x\r\n.\r\n") == b"x\r\n..\r\n.\r\n"


def test_top() -> None:
    msg = b"A: 1\r\nB: 2\r\n\r\nl1\r\n.l2\r\nl3\r\n"
    assert top_payload(msg, 0) == b"A: 1\r\nB: 2\r\n\r\n.\r\n"
    assert top_payload(msg, 2) == b"A: 1\r\nB: 2\r\n\r\nl1\r\n..l2\r\n.\r\n"
    assert top_payload(msg, 99) == retr_payload(msg)
    assert top_payload(b"A: 1\r\n", 3) == b"A: 1\r\n.\r\n"


def test_decode_plain() -> None:
    b64 = base64.b64encode(b"\x00alice\x00pw d").decode()
    creds = decode_plain(b64)
    assert creds is not None and (creds.authzid, creds.authcid, creds.password) == ("", "alice", "pw d")
    assert decode_plain("not base64!") is None
    assert decode_plain(base64.b64encode(b"alice\x00pw").decode()) is None
    assert decode_plain(base64.b64encode(b"\x00\x00pw").decode()) is None
    assert decode_plain(base64.b64encode(b"\x00a\x00\xff").decode()) is None
