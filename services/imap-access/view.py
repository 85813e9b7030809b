"""The selected mailbox as one session sees it: message sequence numbers <-> UIDs, flags and
modseqs (RFC 3501 §2.3.1), and which messages are \\Recent to this session (§2.3.2). Pure:
no I/O. Sequence numbers change only when the session reports an EXPUNGE (§7.4.1), so the
view changes only through ``add`` and ``expunge``.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field

from postbus.proto.store import uid_ranges
from postbus.protocols.imap_parser import SeqSet

# ascending UIDs as proto.store.UidRanges (one implementation for the store and sessions)
to_ranges = uid_ranges


class BadSequence(Exception):
    """A message sequence number outside 1..EXISTS (RFC 3501 §9 seq-number)."""


def _bounds(a: int | None, b: int | None, top: int) -> tuple[int, int]:
    """One seq-range (RFC 3501 §9) as (low, high): ``*`` (None) is ``top``, and the two ends
    may come in either order ("4:2" is "2:4")."""
    lo, hi = (top if a is None else a), (top if b is None else b)
    return (hi, lo) if lo > hi else (lo, hi)


@dataclass
class MailboxView:
    mailbox_id: int
    name: str
    readonly: bool
    uidvalidity: int
    uidnext: int
    highestmodseq: int
    uids: list[int] = field(default_factory=list)  # ascending; index + 1 = sequence number
    flags: dict[int, list[str]] = field(default_factory=dict)
    modseq: dict[int, int] = field(default_factory=dict)
    # keywords the client was told of in FLAGS (RFC 3501 §7.2.6), in that order
    announced: dict[str, None] = field(default_factory=dict)
    # \Recent: a session flag, not stored with the message (RFC 3501 §2.3.2); the store
    # says which UIDs this session claimed (SelectReply.recent_uid)
    recent: set[int] = field(default_factory=set)
    # live searches (RFC 5267 §4.3): while the session keeps one, the UIDs added or whose
    # flags or modseq changed since it last looked (None: nobody is looking)
    touched: set[int] | None = None

    @property
    def exists(self) -> int:
        return len(self.uids)

    @property
    def max_uid(self) -> int:
        return self.uids[-1] if self.uids else 0

    def seq_of(self, uid: int) -> int | None:
        i = bisect_left(self.uids, uid)
        return i + 1 if i < len(self.uids) and self.uids[i] == uid else None

    def add(self, uid: int, flags: list[str], modseq: int) -> bool:
        """Append a new message (UIDs only grow); False when it is already known or would
        break the ascending order."""
        if uid <= self.max_uid:
            if uid in self.flags and modseq >= self.modseq.get(uid, 0):
                self.flags[uid] = list(flags)
                self.modseq[uid] = modseq
            return False
        self.uids.append(uid)
        self.flags[uid] = list(flags)
        self.modseq[uid] = modseq
        self.uidnext = max(self.uidnext, uid + 1)
        self.highestmodseq = max(self.highestmodseq, modseq)
        if self.touched is not None:
            self.touched.add(uid)
        return True

    def expunge(self, uid: int) -> int | None:
        """Remove a message; returns the sequence number it had (for ``* n EXPUNGE``)."""
        seq = self.seq_of(uid)
        if seq is None:
            return None
        if self.touched is not None:
            self.touched.discard(uid)
        del self.uids[seq - 1]
        self.flags.pop(uid, None)
        self.modseq.pop(uid, None)
        self.recent.discard(uid)
        return seq

    def mark_recent(self, first: int, end: int) -> None:
        """The messages of the view with ``first <= uid < end`` are \\Recent to this
        session (a claim the store granted, or EXAMINE's look at the unclaimed ones)."""
        self.recent.update(self.uids[bisect_left(self.uids, first):bisect_left(self.uids, end)])

    def shown_flags(self, uid: int) -> list[str]:
        """The flags FETCH shows: the stored ones, and \\Recent when it is recent here."""
        flags = self.flags.get(uid, [])
        return [*flags, "\\Recent"] if uid in self.recent else flags

    def set_flags(self, uid: int, flags: list[str], modseq: int) -> bool:
        """Record new flags; True when they differ from what the client was told. A state
        older than the one known (a notification overtaken by the session's own STORE
        reply) is ignored: a message's MODSEQ never goes back (RFC 7162 §3.1.3)."""
        if uid not in self.flags or (modseq and modseq < self.modseq.get(uid, 0)):
            return False
        changed = sorted(self.flags[uid]) != sorted(flags)
        if self.touched is not None and (changed or modseq > self.modseq.get(uid, 0)):
            self.touched.add(uid)
        self.flags[uid] = list(flags)
        if modseq:
            self.modseq[uid] = modseq
            self.highestmodseq = max(self.highestmodseq, modseq)
        return changed

    def resolve(self, seqset: SeqSet, uid: bool) -> list[int]:
        """The UIDs a sequence set names, ascending and unique.

        UID sets (§6.4.8) name only existing messages and never fail; ``*`` is the largest
        UID. Message sequence sets must lie in 1..EXISTS, else BadSequence."""
        if uid:
            top = self.max_uid
            out: set[int] = set()
            for a, b in seqset:
                lo, hi = _bounds(a, b, top)
                i, j = bisect_left(self.uids, lo), bisect_right(self.uids, hi)
                out.update(self.uids[i:j])
            return sorted(out)
        n = len(self.uids)
        seqs: set[int] = set()
        for a, b in seqset:
            lo, hi = _bounds(a, b, n)
            if lo < 1 or hi > n:
                raise BadSequence(f"invalid message sequence number (EXISTS is {n})")
            if hi - lo > 10_000_000:
                raise BadSequence("sequence range too large")
            seqs.update(range(lo, hi + 1))
        return [self.uids[s - 1] for s in sorted(seqs)]

    def resolve_lenient(self, seqset: SeqSet) -> list[int]:
        """Sequence numbers for SEARCH: out-of-range numbers simply match nothing."""
        n = len(self.uids)
        out: set[int] = set()
        for a, b in seqset:
            lo, hi = _bounds(a, b, n)
            lo, hi = max(lo, 1), min(hi, n)
            out.update(self.uids[lo - 1:hi])
        return sorted(out)

    def keywords(self) -> list[str]:
        seen: dict[str, None] = {}
        for fl in self.flags.values():
            for f in fl:
                if not f.startswith("\\"):
                    seen.setdefault(f, None)
        return list(seen)


