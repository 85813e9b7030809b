"""CONTEXT=SEARCH's pure parts (libs/protocols/imap_context.py, RFC 5267 §4): PARTIAL
ranges and their responses (§4.4, imaptest's search-partial and sort-partial cases), the
live result set and its ADDTO/REMOVEFROM lines (§4.3, as Dovecot writes them), and the
grammar of RETURN (UPDATE / PARTIAL) and CANCELUPDATE (§5)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postbus.protocols import imap_parser as p
from postbus.protocols.imap_context import ResultSet, partial_data, take_partial, update_line


@pytest.mark.parametrize(("text", "rng"), [
    ("1:1", (1, 1)), ("2:4", (2, 4)),
    ("4:2", (2, 4)),  # given high to low: put in order (imaptest search-partial, Dovecot)
    ("1:4294967295", (1, 4294967295)),
    ("1", None), ("1:*", None), ("*:1", None), ("0:5", None), ("5:0", None),
    ("-1:-5", None),  # RFC 9394's negative ranges are another extension
    ("1:4294967296", None), (":", None), ("1:2:3", None), ("١:٢", None),
])
def test_partial_range_grammar(text: str, rng: tuple[int, int] | None) -> None:
    assert p.parse_partial(text) == rng


# imaptest search-partial: five messages, then "1:2,4:5"
@pytest.mark.parametrize(("nums", "rng", "data"), [
    ([1, 2, 3, 4, 5], (1, 1), "PARTIAL (1:1 1)"),
    ([1, 2, 3, 4, 5], (2, 4), "PARTIAL (2:4 2:4)"),
    ([1, 2, 3, 4, 5], (1, 6), "PARTIAL (1:6 1:5)"),
    ([1, 2, 3, 4, 5], (6, 6), "PARTIAL (6:6 NIL)"),
    ([1, 2, 4, 5], (1, 3), "PARTIAL (1:3 1:2,4)"),
    ([1, 2, 4, 5], (2, 3), "PARTIAL (2:3 2,4)"),
    ([1, 2, 4, 5], (2, 10), "PARTIAL (2:10 2,4:5)"),
    ([], (1, 10), "PARTIAL (1:10 NIL)"),
])
def test_partial_of_a_search(nums: list[int], rng: tuple[int, int], data: str) -> None:
    assert partial_data(rng, take_partial(nums, rng), ordered=False) == data


# imaptest sort-partial: a SORT result keeps its order (REVERSE ARRIVAL with a tie)
@pytest.mark.parametrize(("nums", "rng", "data"), [
    ([5, 3, 4, 2, 1], (2, 4), "PARTIAL (2:4 3:4,2)"),
    ([5, 3, 4, 2, 1], (1, 6), "PARTIAL (1:6 5,3:4,2,1)"),
    ([1, 2, 3, 4, 5], (2, 4), "PARTIAL (2:4 2:4)"),
])
def test_partial_of_a_sort(nums: list[int], rng: tuple[int, int], data: str) -> None:
    assert partial_data(rng, take_partial(nums, rng), ordered=True) == data


@given(st.lists(st.integers(1, 200), unique=True), st.integers(1, 300), st.integers(1, 300))
def test_partial_is_a_window_of_the_result(nums: list[int], a: int, b: int) -> None:
    lo, hi = min(a, b), max(a, b)
    part = take_partial(nums, (lo, hi))
    assert part == [n for i, n in enumerate(nums, 1) if lo <= i <= hi]


def test_update_lines_as_dovecot_writes_them() -> None:
    # RFC 5267 §4.3: position 0 for a SEARCH; REMOVEFROM before ADDTO in one response
    assert update_line("A1", False, [], [1, 2, 4]) == '* ESEARCH (TAG "A1") ADDTO (0 1:2,4)'
    assert update_line("A1", True, [7], [9, 10]) == (
        '* ESEARCH (TAG "A1") UID REMOVEFROM (0 7) ADDTO (0 9:10)')
    assert update_line("A1", True, [], []) == ""


def test_result_set_update_and_discard() -> None:
    r = ResultSet([5, 1, 3, 3])
    assert list(r) == [1, 3, 5] and len(r) == 3 and 3 in r and 4 not in r and "3" not in r
    # 3, 4 and 5 were searched again: 4 matches now, 3 and 5 no longer
    assert r.update([3, 4, 5], [4]) == ([4], [3, 5])
    assert list(r) == [1, 4]
    # a match outside the result is added even when it was not among the checked ones
    assert r.update([], [9]) == ([9], [])
    assert r.discard(4) and not r.discard(4)
    assert list(r) == [1, 9]


@given(st.sets(st.integers(1, 500)), st.sets(st.integers(1, 500)), st.data())
def test_result_set_update_equals_set_arithmetic(before: set[int], checked: set[int],
                                                 data: st.DataObject) -> None:
    matching = data.draw(st.sets(st.sampled_from(sorted(checked)))) if checked else set()
    r = ResultSet(before)
    added, removed = r.update(checked, matching)
    after = (before - checked) | matching
    assert list(r) == sorted(after)
    assert added == sorted(after - before) and removed == sorted(before - after)


@pytest.mark.parametrize(("line", "expected"), [
    (b"a SEARCH RETURN (UPDATE) ALL\r\n", (("UPDATE",), None)),
    (b"a SEARCH RETURN (CONTEXT UPDATE COUNT) ALL\r\n", (("CONTEXT", "UPDATE", "COUNT"), None)),
    (b"a SEARCH RETURN (PARTIAL 4:2) ALL\r\n", (("PARTIAL",), (2, 4))),
    (b"a UID SEARCH RETURN (update partial 1:500) UNDELETED\r\n", (("UPDATE", "PARTIAL"),
                                                                    (1, 500))),
    (b"a SORT RETURN (PARTIAL 1:5) (ARRIVAL) UTF-8 ALL\r\n", (("PARTIAL",), (1, 5))),
])
def test_return_options(line: bytes, expected: tuple[tuple[str, ...], object]) -> None:
    cmd = p.parse_command(line)
    assert isinstance(cmd, p.Search | p.Sort), cmd
    assert (cmd.return_opts, cmd.partial) == expected


@pytest.mark.parametrize(("line", "reason"), [
    (b"a SEARCH RETURN (PARTIAL 1) ALL\r\n", "partial range"),
    (b"a SEARCH RETURN (PARTIAL 1:*) ALL\r\n", "partial range"),
    (b"a SEARCH RETURN (PARTIAL *:1) ALL\r\n", "partial range"),
    (b"a SEARCH RETURN (PARTIAL) ALL\r\n", "expected"),
    (b"a SEARCH RETURN (PARTIAL 1:2 PARTIAL 3:4) ALL\r\n", "twice"),
    (b"a SEARCH RETURN (UPDATE UPDATE) ALL\r\n", "twice"),
    (b"a SEARCH RETURN (ALL PARTIAL 1:2) ALL\r\n", "conflicts with ALL"),
    (b"a SORT RETURN (UPDATE) (ARRIVAL) UTF-8 ALL\r\n", "return option"),  # no CONTEXT=SORT
    (b"a CANCELUPDATE\r\n", "needs a tag"),
    (b"a CANCELUPDATE A1\r\n", "string"),  # §5: quoted
])
def test_bad_return_options(line: bytes, reason: str) -> None:
    bad = p.parse_command(line)
    assert isinstance(bad, p.Bad) and reason.lower() in bad.reason.lower(), bad


def test_cancelupdate_grammar() -> None:
    assert p.parse_command(b'a CANCELUPDATE "B01" "B02"\r\n') == p.CancelUpdate(
        "a", ("B01", "B02"))
