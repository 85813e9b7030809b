"""CONTEXT=SEARCH (RFC 5267 §4): PARTIAL ranges of a result (their grammar is in
imap_parser), and the live results of SEARCH RETURN (UPDATE) with the ADDTO/REMOVEFROM
responses they produce. Pure: no asyncio, no I/O; the session decides when to search again.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, insort
from collections.abc import Iterable, Iterator, Sequence

from postbus.protocols.imap_wire import ordered_seqset, seqset

__all__ = ["ResultSet", "partial_data", "take_partial", "update_line"]

# past this many changes at once the result is rebuilt instead of edited in place
_REBUILD_AT = 64


def take_partial(nums: Sequence[int], rng: tuple[int, int]) -> list[int]:
    """The results at positions ``lo..hi`` (1-based, both included) of a result in answer
    order (RFC 5267 §4.4): fewer when the result is shorter, none past its end."""
    lo, hi = rng
    return list(nums[lo - 1:hi])


def partial_data(rng: tuple[int, int], part: list[int], ordered: bool) -> str:
    """``PARTIAL (lo:hi set)`` of an ESEARCH response (RFC 5267 §4.4), NIL when no result
    lies in the range. A SEARCH result is ascending; a SORT result (``ordered``) keeps its
    order, runs of ascending numbers written as ranges (as ESORT's ALL, §3.2)."""
    if not part:
        shown = "NIL"
    else:
        shown = ordered_seqset(part) if ordered else seqset(part)
    return f"PARTIAL ({rng[0]}:{rng[1]} {shown})"


def update_line(tag: str, uid: bool, removed: Sequence[int], added: Sequence[int]) -> str:
    """One ESEARCH response with the changes of a live result (RFC 5267 §4.3): REMOVEFROM
    then ADDTO, as Dovecot sends them. The position is 0: a SEARCH result has no order
    (§4.3 gives positions a meaning only for SORT). Empty when nothing changed."""
    if not removed and not added:
        return ""
    parts = [f'* ESEARCH (TAG "{tag}")'] + (["UID"] if uid else [])
    if removed:
        parts.append(f"REMOVEFROM (0 {seqset(removed)})")
    if added:
        parts.append(f"ADDTO (0 {seqset(added)})")
    return " ".join(parts)


class ResultSet:
    """The UIDs a live search matches (RFC 5267 §4.3), ascending, four octets each."""

    def __init__(self, uids: Iterable[int] = ()) -> None:
        self._uids = array("I", sorted(set(uids)))

    def __len__(self) -> int:
        return len(self._uids)

    def __iter__(self) -> Iterator[int]:
        return iter(self._uids)

    def __contains__(self, uid: object) -> bool:
        if not isinstance(uid, int):
            return False
        i = bisect_left(self._uids, uid)
        return i < len(self._uids) and self._uids[i] == uid

    def discard(self, uid: int) -> bool:
        """Forget an expunged message; True when it was in the result."""
        i = bisect_left(self._uids, uid)
        if i < len(self._uids) and self._uids[i] == uid:
            del self._uids[i]
            return True
        return False

    def update(self, checked: Iterable[int], matching: Iterable[int]
               ) -> tuple[list[int], list[int]]:
        """The messages ``checked`` were searched again and ``matching`` (a subset) match
        now: apply that, and return the UIDs (added, removed), ascending."""
        match = set(matching)
        added = sorted(u for u in match if u not in self)
        removed = sorted(u for u in set(checked) if u not in match and u in self)
        if len(added) + len(removed) > _REBUILD_AT:
            gone = set(removed)
            merged = sorted({u for u in self._uids if u not in gone} | set(added))
            self._uids = array("I", merged)
        else:
            for u in removed:
                self.discard(u)
            for u in added:
                insort(self._uids, u)
        return added, removed
