"""THREAD's inputs (the summary's Message-ID, subject and Date, INTERNALDATE) as both
implementations of the store port answer FETCH metadata: the SQL store (SQLite) and the
in-memory one the session tests use. Same messages, same threads (RFC 5256 §3, §4); the
References and In-Reply-To fields come from the message itself, as the session reads them
from the blob."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from fetch_support import Fetch, fetch  # noqa: F401 (fetch: a fixture)

from postbus.proto.store import MessageMeta
from postbus.protocols.imap_thread import ThreadInfo, thread, thread_headers, thread_lists

HEADERS = [
    # a thread with a folded References field, a reply by In-Reply-To only, a duplicate
    # Message-ID, a reply to a message not in the mailbox, an encoded subject, no Date
    "Message-ID: <1@x.example>\r\nSubject: plans\r\nDate: Fri, 22 Feb 2008 10:00:00 +0000",
    "Message-ID:\r\n <2@x.example>\r\nSubject: Re: plans\r\nReferences: <1@x.example>\r\n"
    "Date: Fri, 22 Feb 2008 11:00:00 +0000",
    "Message-ID: <3@x.example>\r\nSubject: =?utf-8?q?Re=3A_plans?=\r\n"
    "References: <1@x.example>\r\n <2@x.example>\r\nDate: Fri, 22 Feb 2008 12:00:00 +0000",
    "Message-ID: <4@x.example>\r\nSubject: Re: plans\r\nIn-Reply-To: <1@x.example>\r\n"
    "Date: Fri, 22 Feb 2008 10:30:00 +0000",
    "Message-ID: <2@x.example>\r\nSubject: other\r\nDate: Fri, 22 Feb 2008 09:00:00 +0000",
    "Message-ID: <6@x.example>\r\nSubject: Fwd: other\r\nReferences: <gone@x.example>",
]
T0 = datetime(2008, 2, 22, 8, 0, tzinfo=UTC)


def corpus() -> list[tuple[bytes, datetime]]:
    return [(f"{h}\r\n\r\nbody {i}\r\n".encode(), T0 + timedelta(minutes=13 * i))
            for i, h in enumerate(HEADERS)]


def infos(metas: list[MessageMeta]) -> list[ThreadInfo]:
    raws = [raw for raw, _ in corpus()]
    out = []
    for n, m in enumerate(metas, 1):
        assert m.summary is not None
        refs, irt = thread_headers(raws[n - 1])
        out.append(ThreadInfo(seq=n, uid=m.uid, sent=m.summary.date or m.internaldate,
                              subject=m.summary.subject, message_id=m.summary.message_id,
                              references=refs, in_reply_to=irt))
    return out


# sent dates: 10:00, 11:00, 12:00, 10:30, 09:00, and 6 has none: INTERNALDATE 09:05.
# REFERENCES: 2 and 3 hang under 1 by References, 4 by In-Reply-To; 5 repeats 2's id and
# gets one of its own; 6's parent is missing, and it is a forward of 5's subject (§4 step 5)
THREADS = [
    ("REFERENCES", "(5 6)(1 (4)(2 3))"),
    ("ORDEREDSUBJECT", "(5 6)(1 (4)(2)(3))"),
]


@pytest.mark.parametrize("alg,want", THREADS, ids=[t[0] for t in THREADS])
async def test_threads_agree(fetch: Fetch, alg: str, want: str) -> None:  # noqa: F811
    metas = await fetch()
    assert [m.uid for m in metas] == [1, 2, 3, 4, 5, 6]
    assert thread_lists(thread(alg, infos(metas)), uid=False) == want
