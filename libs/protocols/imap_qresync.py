"""QRESYNC's UID-set arithmetic (RFC 7162 §3.2.5, §3.2.6): which expunged UIDs a client is
told of in ``VANISHED (EARLIER)``. Pure: ranges in, ranges out, never one number per UID
(an expunge log of a large mailbox is many UIDs but few ranges).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Sequence

from postbus.protocols.imap_parser import SeqSet

Ranges = list[tuple[int, int]]  # ascending, disjoint, inclusive
MAX_UID = 4294967295


def from_seqset(s: SeqSet, star: int = MAX_UID) -> Ranges:
    """A UID set as ranges. ``*`` stands for ``star``: for VANISHED (EARLIER) the client's
    ``*`` reaches past the largest UID that still exists, so the default is every UID."""
    spans = sorted((min(a, b), max(a, b)) for a, b in
                   ((star if x is None else x, star if y is None else y) for x, y in s))
    out: Ranges = []
    for lo, hi in spans:
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def intersect(a: Sequence[tuple[int, int]], b: Sequence[tuple[int, int]]) -> Ranges:
    """The UIDs in both (each ascending and disjoint)."""
    out: Ranges = []
    i = j = 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo <= hi:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def without(ranges: Sequence[tuple[int, int]], present: Sequence[int]) -> Ranges:
    """``ranges`` minus the ascending UIDs ``present`` (messages the client still sees:
    an expunge it has not been told of yet comes as a plain VANISHED later)."""
    out: Ranges = []
    for lo, hi in ranges:
        start = lo
        for u in present[bisect_left(present, lo):bisect_right(present, hi)]:
            if u > start:
                out.append((start, u - 1))
            start = u + 1
        if start <= hi:
            out.append((start, hi))
    return out


def count(s: SeqSet) -> int | None:
    """How many numbers a set names (overlaps counted once); None when it uses ``*``."""
    if any(a is None or b is None for a, b in s):
        return None
    return sum(hi - lo + 1 for lo, hi in from_seqset(s))


def wire(ranges: Sequence[tuple[int, int]]) -> str:
    """Ranges as an IMAP sequence set: ``41,43:116``."""
    return ",".join(str(lo) if lo == hi else f"{lo}:{hi}" for lo, hi in ranges)


def wire_sets(ranges: Sequence[tuple[int, int]], limit: int = 8000) -> list[str]:
    """Ranges as sequence sets of at most ``limit`` characters each, for one VANISHED
    response apiece: RFC 7162 §4 (updating RFC 2683) has clients take lines of 8,192
    octets, so a long list of scattered UIDs goes out in several responses."""
    out: list[str] = []
    cur: list[str] = []
    size = 0
    for lo, hi in ranges:
        part = str(lo) if lo == hi else f"{lo}:{hi}"
        if cur and size + 1 + len(part) > limit:
            out.append(",".join(cur))
            cur, size = [], 0
        size += len(part) + (1 if cur else 0)
        cur.append(part)
    if cur:
        out.append(",".join(cur))
    return out
