"""What never changes about a stored message, kept by imap-access: INTERNALDATE, size, blob
key, trace prefix and MIME structure. Pure (no I/O).

Dovecot answers FETCH from its index; we asked mailbox-store for every FETCH, a quarter of
all store calls under imaptest. An entry is keyed by account, mailbox id, UIDVALIDITY and
UID: a UID is never given twice in a mailbox of one UIDVALIDITY (RFC 3501 §2.3.1.1), and
UIDVALIDITY values are never reused, so an entry can only ever describe one message and
needs no invalidation. Flags and MODSEQ are not kept here: they come from the session's
view. Bounded by an estimate of the bytes held, least recently used first out.
"""

from __future__ import annotations

from collections import OrderedDict

from postbus.kit.metrics import counter
from postbus.proto.store import MessageMeta

Key = tuple[int, int, int, int]  # account, mailbox id, UIDVALIDITY, UID
LOOKUPS = counter("postbus_imap_meta_cache_total", "Message metadata looked up in imap-access",
                  ["result"])


def _weight(m: MessageMeta) -> int:
    w = 300 + len(m.prefix) + len(m.blob_key)
    s = m.summary
    if s is not None:
        w += (len(s.envelope) + len(s.body) + len(s.bodystructure) + 120 * len(s.parts)
              + len(s.subject) + len(s.from_) + len(s.to) + len(s.cc) + len(s.bcc))
    return w


class MetaCache:
    def __init__(self, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self.used = 0
        self._d: OrderedDict[Key, tuple[MessageMeta, int]] = OrderedDict()

    def get(self, key: Key, with_summary: bool) -> MessageMeta | None:
        """The cached metadata; None when absent, or without the summary asked for."""
        hit = self._d.get(key)
        if hit is None or (with_summary and hit[0].summary is None):
            LOOKUPS.labels("miss").inc()
            return None
        self._d.move_to_end(key)
        LOOKUPS.labels("hit").inc()
        return hit[0]

    def put(self, key: Key, meta: MessageMeta) -> None:
        old = self._d.pop(key, None)
        if old is not None:
            self.used -= old[1]
        w = _weight(meta)
        if w > self.max_bytes // 4:
            return
        self._d[key] = (meta, w)
        self.used += w
        while self.used > self.max_bytes and self._d:
            _, (_, ow) = self._d.popitem(last=False)
            self.used -= ow
