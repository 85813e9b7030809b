"""SORT's inputs (INTERNALDATE, RFC822.SIZE, the summary's subject, Date and ENVELOPE) as
both implementations of the store port answer FETCH metadata: the SQL store (SQLite) and the
in-memory one the IMAP transcripts use. Same messages, same SORT orders (RFC 5256 §3,
RFC 5957). Messages from Dovecot's imaptest sort scripts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from fetch_support import Fetch, fetch  # noqa: F401 (fetch: a fixture)

from postbus.proto.store import MessageMeta
from postbus.protocols.imap_sort import Criterion, SortInfo, sort_messages

HEADERS = [
    "Subject: a\r\nFrom: foo bar <a@b.c>\r\nTo: user2@domain2.org\r\n"
    "Date: Fri, 22 Feb 2008 00:00:00 +0200",
    "Subject: [foo] Fwd: [bar] Re: fw: b (fWd)  (fwd)\r\nFrom: b@c.d\r\nTo: empty:;\r\n"
    "Date: Fri, 22 Feb 2008 02:00:00 +0200",
    "Subject: Re: [FWD: c]\r\nFrom: d\r\nTo: a: xx@xx.org, yy@yy.org;\r\n"
    "Cc: user2: blah@domain1.org;",
    "Subject: =?iso-8859-1?q?RE:_C?=\r\nFrom: =?iso-8859-1?q?foo_aar?= <e@f.g>\r\n"
    "Cc: user1@domain1.org\r\nDate: Fri, 22 Feb 2008 01:00:00 +0200",
    "Subject: re: [fwd: [fwd: re: [fwd: babylon]]]\r\nFrom: =?iso-8859-1?q?foo_car?= <f@g.h>"
    "\r\nTo: foo bar <user2@domain2.org>\r\nDate: garbage",
    "Subject: =?iso-8859-1?q?_?=\r\nTo: b@c.d",
]
T0 = datetime(2008, 2, 21, 23, 0, tzinfo=UTC)


def corpus() -> list[tuple[bytes, datetime]]:
    return [(f"{h}\r\n\r\n{'x' * (7 * i % 5)}\r\n".encode(), T0 + timedelta(minutes=17 * i % 60))
            for i, h in enumerate(HEADERS)]


def infos(metas: list[MessageMeta]) -> list[SortInfo]:
    out = []
    for n, m in enumerate(metas, 1):
        assert m.summary is not None
        out.append(SortInfo(seq=n, uid=m.uid, arrival=m.internaldate, sent=m.summary.date,
                            size=m.size, subject=m.summary.subject,
                            envelope=m.summary.envelope))
    return out


# subjects: a, b, c, C, babylon, "" (RFC 5256 §2.1); Date in UTC: 22:00, 00:00 next day, none
# (23:34), 23:00, garbage (23:08), none (23:25), so INTERNALDATE for 3, 5 and 6 (§2.2)
ORDERS = [
    ("SUBJECT", [6, 1, 2, 5, 3, 4]),
    ("-SUBJECT", [3, 4, 5, 2, 1, 6]),      # ties (c, C) stay in ascending order
    ("FROM", [6, 1, 2, 3, 4, 5]),          # "", a, b, d, e, f
    ("DISPLAYFROM", [6, 2, 3, 4, 1, 5]),   # "", b@c.d, d@MISSING_DOMAIN, foo aar/bar/car
    ("TO", [4, 3, 6, 2, 1, 5]),            # "", a (group), b, empty (group), user2, user2
    ("DISPLAYTO", [4, 3, 6, 2, 5, 1]),     # "", a, b@c.d, empty, foo bar, user2@domain2.org
    ("CC", [1, 2, 5, 6, 4, 3]),            # "", "", "", "", user1, user2 (group)
    ("DATE", [1, 4, 5, 6, 3, 2]),
    ("ARRIVAL", [1, 5, 2, 6, 3, 4]),       # 23:00, :08, :17, :25, :34, :51
    ("SIZE", sorted(range(1, 7), key=lambda n: (len(corpus()[n - 1][0]), n))),
]


@pytest.mark.parametrize("crit,want", ORDERS, ids=[o[0] for o in ORDERS])
async def test_sort_orders_agree(fetch: Fetch, crit: str, want: list[int]) -> None:  # noqa: F811
    metas = await fetch()
    assert [m.uid for m in metas] == [1, 2, 3, 4, 5, 6]
    c = Criterion(crit.removeprefix("-"), crit.startswith("-"))
    assert [i.seq for i in sort_messages(infos(metas), [c])] == want
