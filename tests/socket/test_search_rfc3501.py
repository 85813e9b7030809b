"""SEARCH keys whose rules RFC 3501 §6.4.4 spells out, on both implementations of the store
port: the SQL store (mailbox-store search.py, SQLite) and the in-memory one imap-access's
transcripts use (memory.py). Same messages, same keys, same answers. Cases from Dovecot's
imaptest (search-date, search-addresses, search-header)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from fetch_support import Search, search  # noqa: F401 (search: a fixture)

from postbus.proto.store import SearchKey

# imaptest's search-date.mbox: the Date: fields around two daylight-saving changes
DATES = [
    "Sat, 24 Mar 2007 23:00:00 +0200", "Sun, 25 Mar 2007 00:00:00 +0200",
    "Sun, 25 Mar 2007 01:00:00 +0200", "Sun, 25 Mar 2007 02:00:00 +0200",
    "Sun, 25 Mar 2007 04:00:00 +0300", "Sun, 25 Mar 2007 23:00:00 +0300",
    "Mon, 26 Mar 2007 00:00:00 +0300", "Sat, 27 Oct 2007 03:00:00 +0300",
    "Sun, 28 Oct 2007 00:00:00 +0300", "Sun, 28 Oct 2007 01:00:00 +0300",
    "Sun, 28 Oct 2007 02:00:00 +0300", "Sun, 28 Oct 2007 03:00:00 +0300",
    "Sun, 28 Oct 2007 03:00:00 +0200", "Sun, 28 Oct 2007 04:00:00 +0200",
    "Sun, 28 Oct 2007 23:00:00 +0200", "Mon, 29 Oct 2007 00:00:00 +0200",
]
# imaptest's search-addresses.mbox and search-header.mbox, then a message with no Date:
HEADERS = [
    "From: user-from@domain.org\r\nTo: user-to@domain.org\r\nCc: user-cc@domain.org\r\n"
    "Bcc: user-bcc@domain.org",
    "From: RealFrom <user-from@domain.org>\r\nTo: RealTo <user-to@domain.org>\r\n"
    "Cc: RealCc <user-cc@domain.org>\r\nBcc: RealBcc <user-bcc@domain.org>",
    "From: <user-from (comment)@ (comment) domain.org>\r\nTo: <user-to@domain.org>\r\n"
    "Cc: <user-cc@domain.org>\r\nBcc: <user-bcc@domain.org>",
    "From: user-from@domain.org (RealFrom)\r\nTo: user-to@domain.org (RealTo)\r\n"
    "Cc: user-cc@domain.org (RealCc)\r\nBcc: user-bcc@domain.org (RealBcc)",
    "From: user-from1@domain.org, user-from2@domain.org\r\nCc: user-cc@domain.org",
    "From: RealFrom <user-from@domain.org>\r\nTo: groupname: groupuser1@domain.org,"
    " groupuser2@domain.org;,\r\n  groupname2: groupuser3@domain.org;",
    "From: RealFrom <user-from@domain.org>\r\nTo: groupname:;",
    'From: "Joe" <joe(home)@example.com>\r\nSubject: hello beautiful world',
    "From: joe@(c)example.net\r\nX-Extra: hello beautiful header\r\nX-Extra: another one",
    "From: nodate@example.org",
]
N_DATES = len(DATES)


def corpus() -> list[tuple[bytes, datetime]]:
    out = []
    for d in DATES:  # INTERNALDATE far from the Date: field, so that it cannot decide
        out.append((f"Date: {d}\r\n\r\nbody\r\n".encode(), datetime(2020, 1, 1, tzinfo=UTC)))
    for i, h in enumerate(HEADERS):
        date = "Date: Fri, 22 Feb 2008 17:06:23 +0000\r\n" if i < len(HEADERS) - 1 else ""
        out.append((f"{date}{h}\r\n\r\nbody{i}\r\n".encode(),
                    datetime(2008, 2, 23, 1, tzinfo=UTC)))
    return out


def dates(*seqs: int) -> list[int]:
    return list(seqs)


def addrs(*seqs: int) -> list[int]:
    return [N_DATES + s for s in seqs]


K = SearchKey
D = N_DATES
CASES: list[tuple[str, SearchKey, list[int]]] = [
    # the Date: field's own date, its time and zone disregarded (RFC 3501 §6.4.4)
    ("sentbefore", K(op="sentbefore", args=["2007-03-25"]), dates(1)),
    ("sentbefore2", K(op="sentbefore", args=["2007-03-26"]), dates(1, 2, 3, 4, 5, 6)),
    ("senton", K(op="senton", args=["2007-03-25"]), dates(2, 3, 4, 5, 6)),
    ("senton2", K(op="senton", args=["2007-03-26"]), dates(7)),
    ("sentsince", K(op="sentsince", args=["2007-03-25"]),
     dates(2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16) + addrs(*range(1, 11))),
    ("senton-oct", K(op="senton", args=["2007-10-28"]), dates(9, 10, 11, 12, 13, 14, 15)),
    ("sentsince-oct", K(op="and", children=[K(op="uid", uids=[(8, D)]),
                                           K(op="sentsince", args=["2007-10-29"])]), dates(16)),
    ("not-senton", K(op="and", children=[
        K(op="uid", uids=[(1, 7)]),
        K(op="not", children=[K(op="senton", args=["2007-03-25"])])]), dates(1, 7)),
    ("not-sentsince", K(op="and", children=[
        K(op="uid", uids=[(8, D)]),
        K(op="not", children=[K(op="sentsince", args=["2007-10-28"])])]), dates(8)),
    # no Date: field: the INTERNALDATE's date
    ("sent-internaldate", K(op="senton", args=["2008-02-23"]), addrs(10)),
    # an address with comments inside it is found whole
    ("from", K(op="from", args=["user-from@domain.org"]), addrs(1, 2, 3, 4, 6, 7)),
    ("from-comment", K(op="from", args=["joe@example.com"]), addrs(8)),
    ("from-comment2", K(op="from", args=["JOE@EXAMPLE.NET"]), addrs(9)),
    ("from-realname", K(op="from", args=["realfrom"]), addrs(2, 4, 6, 7)),
    ("from-substring", K(op="from", args=["ser-fro"]), addrs(1, 2, 3, 4, 5, 6, 7)),
    ("not-from", K(op="not", children=[K(op="from", args=["joe@"])]),
     dates(*range(1, D + 1)) + addrs(1, 2, 3, 4, 5, 6, 7, 10)),
    ("to-group", K(op="to", args=["groupname"]), addrs(6, 7)),
    ("to-groupuser4", K(op="to", args=["groupuser4"]), []),
    # HEADER name "": the messages that have the field
    ("header-to", K(op="header", args=["to", ""]), addrs(1, 2, 3, 4, 6, 7)),
    ("header-cc", K(op="header", args=["cc", ""]), addrs(1, 2, 3, 4, 5)),
    ("header-bcc", K(op="header", args=["bcc", ""]), addrs(1, 2, 3, 4)),
    ("header-subject", K(op="header", args=["subject", ""]), addrs(8)),
    ("not-header-subject", K(op="and", children=[
        K(op="uid", uids=[(D + 8, D + 9)]),
        K(op="not", children=[K(op="header", args=["subject", ""])])]), addrs(9)),
    ("header-x-extra", K(op="header", args=["x-extra", ""]), addrs(9)),
    ("header-x-extra-text", K(op="header", args=["x-extra", "another"]), addrs(9)),
]


@pytest.mark.parametrize("key,want", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
async def test_search_rules(search: Search, key: SearchKey, want: list[int]) -> None:  # noqa: F811
    assert await search(key) == want
