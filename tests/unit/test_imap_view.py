"""The selected-mailbox view: sequence numbers <-> UIDs, set resolution, expunge renumbering."""

from __future__ import annotations

import pytest

from postbus.imap_access.view import BadSequence, MailboxView, to_ranges


def view(*uids: int) -> MailboxView:
    v = MailboxView(1, "INBOX", False, 7, 1, 1)
    for u in uids:
        v.add(u, [], u)
    return v


@pytest.mark.parametrize("seqset,uid,expected", [
    (((1, 1),), False, [10]),
    (((2, None),), False, [20, 30, 40]),
    (((None, 2),), False, [20, 30, 40]),  # *:2 is 2:*
    (((1, 1), (3, 4), (1, 1)), False, [10, 30, 40]),
    (((20, 30),), True, [20, 30]),
    (((15, 35),), True, [20, 30]),
    (((35, None),), True, [40]),
    (((50, None),), True, [40]),  # n:* with n > max UID still names the last message
    (((99, 100),), True, []),
])
def test_resolve(seqset: tuple, uid: bool, expected: list[int]) -> None:
    assert view(10, 20, 30, 40).resolve(seqset, uid) == expected


@pytest.mark.parametrize("seqset", [((5, 5),), ((0, 1),), ((1, 9),)])
def test_bad_sequence_numbers(seqset: tuple) -> None:
    with pytest.raises(BadSequence):
        view(10, 20, 30, 40).resolve(seqset, False)


def test_star_in_an_empty_mailbox() -> None:
    v = view()
    assert v.resolve(((1, None),), True) == []
    with pytest.raises(BadSequence):
        v.resolve(((1, None),), False)
    assert v.resolve_lenient(((1, None),)) == []


def test_expunge_renumbers() -> None:
    v = view(10, 20, 30, 40)
    assert v.expunge(20) == 2
    assert v.expunge(40) == 3
    assert v.expunge(99) is None
    assert v.uids == [10, 30] and v.seq_of(30) == 2 and v.exists == 2


def test_add_only_appends_and_updates_known() -> None:
    v = view(10, 20)
    assert v.add(30, ["\\Seen"], 5)
    assert v.uidnext == 31 and v.highestmodseq == 20
    assert not v.add(25, [], 6)  # would break the ascending order: refused
    assert not v.add(20, ["$X"], 27) and v.flags[20] == ["$X"]
    assert v.uids == [10, 20, 30]
    assert not v.add(20, [], 26) and v.flags[20] == ["$X"]  # an older state: ignored


def test_set_flags_reports_changes() -> None:
    v = view(10)
    assert v.set_flags(10, ["\\Seen"], 19)
    assert not v.set_flags(10, ["\\Seen"], 20)
    assert not v.set_flags(11, ["\\Seen"], 21)
    assert v.modseq[10] == 20


def test_a_stale_change_never_rolls_the_view_back() -> None:
    """Issue 10: the session's own STORE reply (modseq 16) came first, then the
    notification of the change before it (15); the view must keep the newer state."""
    v = view(10)
    assert v.set_flags(10, ["\\Seen", "$Done"], 16)
    assert not v.set_flags(10, ["\\Seen"], 15)
    assert v.flags[10] == ["\\Seen", "$Done"] and v.modseq[10] == 16
    assert not v.set_flags(10, ["\\Seen", "$Done"], 16)
    assert v.set_flags(10, ["$Done"], 17) and v.modseq[10] == 17


def test_to_ranges() -> None:
    assert to_ranges([1, 2, 3, 5, 7, 8]) == [(1, 3), (5, 5), (7, 8)]
    assert to_ranges([]) == []


def test_recent_is_a_session_flag_within_the_claimed_range() -> None:
    v = view(10, 20, 30, 40)
    v.flags[30] = ["\\Seen"]
    v.mark_recent(20, 40)  # a claim of [20, 40): 40 arrived after it
    assert v.recent == {20, 30}
    assert v.shown_flags(30) == ["\\Seen", "\\Recent"] and v.shown_flags(40) == []
    assert v.flags[30] == ["\\Seen"]  # never stored with the message
    v.expunge(20)
    assert v.recent == {30}
