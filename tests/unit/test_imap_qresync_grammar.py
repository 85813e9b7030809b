"""QRESYNC's grammar (RFC 7162 §7: SELECT's QRESYNC parameter, UID FETCH's VANISHED
modifier) and the UID-set arithmetic of VANISHED (EARLIER)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postbus.protocols import imap_parser as p
from postbus.protocols import imap_qresync as q


def test_rfc_examples_parse() -> None:
    cmd = p.parse_command(b"A03 SELECT INBOX (QRESYNC (67890007 20050715194045000 "
                          b"41,43:211,214:541))")
    assert isinstance(cmd, p.Select) and cmd.qresync == p.QResync(
        67890007, 20050715194045000, ((41, 41), (43, 211), (214, 541)))
    cmd = p.parse_command(b"B04 SELECT INBOX (QRESYNC (67890007 90060115194045000 1:29997 "
                          b"(5000,7500,9000,9990:9999 15000,22500,27000,29970,29973)))")
    assert isinstance(cmd, p.Select) and cmd.qresync is not None
    assert cmd.qresync.seq_match == (((5000, 5000), (7500, 7500), (9000, 9000), (9990, 9999)),
                                     ((15000, 15000), (22500, 22500), (27000, 27000),
                                      (29970, 29970), (29973, 29973)))
    cmd = p.parse_command(b"s100 UID FETCH 300:500 (FLAGS) (CHANGEDSINCE 12345 VANISHED)")
    assert isinstance(cmd, p.Fetch) and cmd.vanished and cmd.changedsince == 12345
    cmd = p.parse_command(b"x EXAMINE INBOX (CONDSTORE QRESYNC (1 0 (1 2)))")
    assert isinstance(cmd, p.Select) and cmd.condstore and cmd.readonly
    assert cmd.qresync == p.QResync(1, 0, None, (((1, 1),), ((2, 2),)))


@pytest.mark.parametrize("line", [
    b"a SELECT INBOX (QRESYNC (1))",            # MODSEQ is required
    b"a SELECT INBOX (QRESYNC (0 1))",          # UIDVALIDITY is nz-number
    b"a SELECT INBOX (QRESYNC (1 1 1:5 (1 2) x))",
    b"a SELECT INBOX (QRESYNC (1 1) QRESYNC (1 1))",
    b"a SELECT INBOX (FOO)",
    b"a SELECT INBOX ()",
    b"a FETCH 1 (FLAGS) (CHANGEDSINCE 1 VANISHED)",   # VANISHED only with UID FETCH
    b"a UID FETCH 1 (FLAGS) (VANISHED)",              # ... and with CHANGEDSINCE
    b"a UID FETCH 1 (FLAGS) (CHANGEDSINCE 1 CHANGEDSINCE 2)",
    b"a UID FETCH 1 (FLAGS) (CHANGEDSINCE 1 VANISHED VANISHED)",
])
def test_bad_forms_are_bad(line: bytes) -> None:
    assert isinstance(p.parse_command(line), p.Bad)


def test_range_arithmetic() -> None:
    assert q.from_seqset(((5, 3), (1, 1), (2, 2), (9, None)), star=10) == [(1, 5), (9, 10)]
    assert q.intersect([(1, 5), (8, 20)], [(3, 9), (15, 15)]) == [(3, 5), (8, 9), (15, 15)]
    assert q.without([(1, 10)], [0, 3, 4, 10, 11]) == [(1, 2), (5, 9)]
    assert q.count(((1, 3), (2, 5))) == 5 and q.count(((1, None),)) is None
    assert q.wire([(41, 41), (43, 116)]) == "41,43:116"


@given(st.sets(st.integers(1, 200)), st.sets(st.integers(1, 200)),
       st.sets(st.integers(1, 200)))
def test_range_arithmetic_agrees_with_sets(a: set[int], b: set[int], c: set[int]) -> None:
    ra = q.from_seqset(tuple((x, x) for x in a))
    rb = q.from_seqset(tuple((x, x) for x in b))
    got = q.without(q.intersect(ra, rb), sorted(c))
    assert {u for lo, hi in got for u in range(lo, hi + 1)} == (a & b) - c
    assert all(x[1] + 1 < y[0] or x[1] < y[0] for x, y in zip(got, got[1:], strict=False))


def test_long_uid_sets_are_split_into_lines_of_at_most_8000() -> None:
    ranges = [(u, u) for u in range(100_000, 300_000, 2)]  # 100,000 scattered UIDs
    sets = q.wire_sets(ranges)
    assert len(sets) > 1 and all(0 < len(s) <= 8000 for s in sets)
    assert ",".join(sets) == q.wire(ranges)
    assert q.wire_sets([(1, 5)]) == ["1:5"] and q.wire_sets([]) == []
