"""imap-access's cache of immutable message metadata: keyed so that an entry can only
describe one message, asked-for summaries respected, and bounded."""

from __future__ import annotations

from datetime import UTC, datetime

from postbus.imap_access.metacache import MetaCache
from postbus.proto.store import MessageMeta
from postbus.protocols.mime import summarize


def meta(uid: int, with_summary: bool = False, pad: int = 0) -> MessageMeta:
    raw = b"Subject: s%d\r\n\r\n" % uid + b"x" * pad
    return MessageMeta(uid=uid, flags=[], modseq=1, internaldate=datetime.now(UTC),
                       size=len(raw), blob_key=f"blobs/{uid}", blob_size=len(raw),
                       summary=summarize(raw) if with_summary else None)


def test_hit_only_for_the_same_account_mailbox_uidvalidity_and_uid() -> None:
    c = MetaCache()
    c.put((1, 10, 500, 7), meta(7))
    assert c.get((1, 10, 500, 7), with_summary=False) is not None
    for other in ((2, 10, 500, 7), (1, 11, 500, 7), (1, 10, 501, 7), (1, 10, 500, 8)):
        assert c.get(other, with_summary=False) is None


def test_an_entry_without_summary_is_a_miss_when_one_is_asked_for() -> None:
    c = MetaCache()
    c.put((1, 1, 1, 1), meta(1))
    assert c.get((1, 1, 1, 1), with_summary=True) is None
    c.put((1, 1, 1, 1), meta(1, with_summary=True))
    hit = c.get((1, 1, 1, 1), with_summary=True)
    assert hit is not None and hit.summary is not None


def test_bounded_by_bytes_oldest_out_first() -> None:
    c = MetaCache(max_bytes=20_000)
    for uid in range(100):
        c.put((1, 1, 1, uid), meta(uid, with_summary=True))
    assert c.used <= 20_000
    assert c.get((1, 1, 1, 99), with_summary=True) is not None
    assert c.get((1, 1, 1, 0), with_summary=True) is None
