"""CATENATE's grammar (RFC 4469 §5) and the IMAP URLs it takes (RFC 5092 §6): the URLs of
RFC 4469's example and RFC 5092's, and what is refused."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postbus.protocols import imap_parser as p
from postbus.protocols.imap_parser import MessageUrl, parse_message_url


@pytest.mark.parametrize(("url", "want"), [
    # RFC 4469 §5's example
    ("/Drafts;UIDVALIDITY=385759045/;UID=20/;section=HEADER",
     MessageUrl("Drafts", 20, 385759045, "HEADER")),
    ("/Drafts;UIDVALIDITY=385759045/;UID=20/;section=1.MIME",
     MessageUrl("Drafts", 20, 385759045, "1.MIME")),
    ("/Drafts;UIDVALIDITY=385759045/;UID=30", MessageUrl("Drafts", 30, 385759045)),
    # RFC 5092 §7's examples that name a message part
    ("imap://;AUTH=GSSAPI@minbari.example.org/gray-council/;uid=20/;section=1.2",
     MessageUrl("gray-council", 20, None, "1.2")),
    ("imap://minbari.example.org/gray-council;UIDVALIDITY=385759045/;UID=20/;PARTIAL=0.1024",
     MessageUrl("gray-council", 20, 385759045, "", (0, 1024))),
    # percent-encoded UTF-8 names and sections, a partial range without a length
    ("/%E6%97%A5%E6%9C%AC/;uid=1/;section=HEADER.FIELDS%20(From)/;partial=5",
     MessageUrl("日本", 1, None, "HEADER.FIELDS (FROM)", (5, None))),
    ("imap://alice%40example.test@host/INBOX/;uid=7",
     MessageUrl("INBOX", 7, user="alice@example.test")),
])
def test_message_urls(url: str, want: MessageUrl) -> None:
    assert parse_message_url(url) == want


@pytest.mark.parametrize("url", [
    "Drafts/;uid=1",                      # neither absolute nor an absolute path
    "/Drafts",                            # no UID: a mailbox, not a message
    "/Drafts/;uid=0",
    "/Drafts/;uid=x",
    "/Drafts;uidvalidity=0/;uid=1",
    "/Drafts/;section=1/;uid=1",          # out of order
    "/Drafts/;uid=1/;uid=2",
    "/Drafts/;uid=1/;partial=1.0",        # an empty range
    "/Drafts/;uid=1/;urlauth=anonymous",  # URLAUTH (RFC 4467) is not offered
    "/Drafts;type=list",
    "/%zz/;uid=1",
    "/%FF/;uid=1",                        # not UTF-8
    "imap://host",
    "/;uid=1",
])
def test_refused_urls(url: str) -> None:
    assert parse_message_url(url) is None


def test_append_with_catenate_parses() -> None:
    cmd = p.parse_command(b'a APPEND Drafts (\\Seen) CATENATE (URL "/Drafts/;UID=1" '
                          b"TEXT {3+}\r\nabc URL /x/;uid=2) CATENATE (TEXT {1+}\r\nz) "
                          b"(\\Answered) {2+}\r\nhi")
    assert isinstance(cmd, p.Append)
    assert cmd.flags == ("\\Seen",) and cmd.message == b""
    assert cmd.parts == (p.CatUrl("/Drafts/;UID=1"), p.CatText(b"abc"), p.CatUrl("/x/;uid=2"))
    assert cmd.more[0].parts == (p.CatText(b"z"),)
    assert cmd.more[1] == p.AppendItem(("\\Answered",), None, b"hi")


@pytest.mark.parametrize("line", [
    b"a APPEND x CATENATE ()",
    b'a APPEND x CATENATE (TEXT "quoted")',   # TEXT takes a literal only
    b"a APPEND x CATENATE (FOO 1)",
    b'a APPEND x CATENATE (URL "/x/;uid=1"',
    b'a APPEND x CATENATE (URL "/x/;uid=1")(URL "/x/;uid=1")',
    b"a APPEND x CATENATE",
])
def test_bad_catenate(line: bytes) -> None:
    assert isinstance(p.parse_command(line), p.Bad)


def test_catenate_part_count_is_bounded() -> None:
    many = b" ".join([b'URL "/x/;uid=1"'] * (p.MAX_CAT_PARTS + 1))
    bad = p.parse_command(b"a APPEND x CATENATE (" + many + b")")
    assert isinstance(bad, p.Bad) and bad.code == "LIMIT"


# ---------------------------------------------------------------- receiver
CAT_STREAM = (b'a APPEND Drafts CATENATE (URL "/Drafts/;uid=1/;section=HEADER" TEXT {12+}\r\n'
              b"\r\n--frontier URL /Drafts/;uid=2 TEXT {3}\r\nxyz) (\\Seen) {2+}\r\nhi\r\n"
              b"b THREAD REFERENCES UTF-8 ALL\r\n")


@pytest.mark.parametrize("size", [1, 2, 7, 4096])
def test_catenate_chunking_invariance(size: int) -> None:
    # a synchronising literal inside the part list waits for its continuation, as anywhere
    whole = p.Receiver().feed(CAT_STREAM)
    assert [type(x) for x in whole] == [p.Continue, p.Append, p.ThreadCmd]
    r = p.Receiver()
    got: list[object] = []
    for i in range(0, len(CAT_STREAM), size):
        got.extend(r.feed(CAT_STREAM[i:i + size]))
    assert got == whole
    cmd = whole[1]
    assert isinstance(cmd, p.Append) and cmd.parts is not None
    assert cmd.parts[1] == p.CatText(b"\r\n--frontier") and cmd.more[0].message == b"hi"


@given(st.text(max_size=80))
def test_urls_never_raise(url: str) -> None:
    parse_message_url(url)
    parse_message_url("/INBOX/;uid=1" + url)
