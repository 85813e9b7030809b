"""SEARCH in SQL: a SearchKey tree compiled to SQL, body and text keys checked on the
candidates' blobs, the few rows SQL cannot decide (sent dates near midnight, addresses with
comments) checked in Python on their columns (the store's SQL layer, see sqlbase.py).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, case, false, func, literal, not_, or_, select, true

from postbus.mailbox_store.flags import FlagOps
from postbus.mailbox_store.outcomes import (
    Invalid,
)
from postbus.mailbox_store.sqlbase import (
    _FLAG_BY_LOWER,
    ANY_UID,
    M,
    uid_filter,
)
from postbus.proto.store import SearchKey
from postbus.protocols.searchtext import address_text, compare_dates

# candidates of a paged body search whose blobs are read before the page is checked
BLOB_SEARCH_BATCH = 500


def _search_page(found: list[tuple[int, int]], limit: int | None
                 ) -> tuple[list[int], int, bool]:
    """(uids, highest modseq, more) of the first ``limit`` of (uid, modseq) matches."""
    more = limit is not None and len(found) > limit
    if more:
        found = found[:limit]
    return [u for u, _ in found], max((m for _, m in found), default=0), more


class SearchOps(FlagOps):
    """SEARCH, paged by UID."""

    # ------------------------------------------------------------ search
    async def search(self, account_id: int, mailbox_id: int, key: SearchKey,
                     body_matcher: Callable[[list[Any], list[tuple[str, SearchKey]]],
                                            Awaitable[dict[int, dict[int, bool]]]] | None = None,
                     *, after_uid: int = 0, limit: int | None = None
                     ) -> tuple[list[int], int, bool]:
        """Evaluate a search program: SQL for everything but body/text/unknown-header keys,
        which ``body_matcher`` checks on the SQL candidates only (reading their blobs last).
        Returns matching UIDs after ``after_uid`` (ascending, at most ``limit``), the highest
        MODSEQ among them, and whether more matches follow (a page)."""
        compiler = _SearchCompiler()
        full = compiler.compile(key)
        if limit is not None:
            limit = max(1, limit)
        async with self._read() as conn:
            await self._mailbox_by_id(conn, account_id, mailbox_id)
            base = and_(M.c.mailbox_id == mailbox_id, M.c.uid > after_uid)
            if not compiler.blob_leaves and not compiler.uid_leaves and not compiler.row_leaves:
                q = select(M.c.uid, M.c.modseq).where(base, full).order_by(M.c.uid)
                if limit is not None:
                    q = q.limit(limit + 1)
                found = [(r[0], r[1]) for r in (await conn.execute(q)).all()]
                return _search_page(found, limit)
            superset = compiler.bound(key, positive=True)
            leaf_cols = [case((expr, 1), else_=0).label(f"l{i}")
                         for i, expr in enumerate(compiler.sql_leaves)]
            row_cols = compiler.row_columns()
            rows = (await conn.execute(
                select(M.c.uid, M.c.modseq, M.c.blob_key, M.c.prefix, M.c.size, *leaf_cols,
                       *row_cols)
                .where(base, superset).order_by(M.c.uid))).all()
        if not rows:
            return [], 0, False
        if compiler.blob_leaves and body_matcher is None:
            raise Invalid("body search is not available")
        # blobs are read a batch at a time, and no further than the page needs
        step = len(rows) if limit is None or not compiler.blob_leaves else BLOB_SEARCH_BATCH
        found = []
        for i in range(0, len(rows), step):
            batch = rows[i:i + step]
            blob_results = (await body_matcher(list(batch), compiler.blob_leaves)
                            if compiler.blob_leaves and body_matcher else {})
            for r in batch:
                sql_vals = [bool(getattr(r, f"l{j}")) for j in range(len(compiler.sql_leaves))]
                sql_vals += compiler.row_values(r)
                if compiler.evaluate(key, sql_vals, blob_results.get(r.uid, {}), r.uid):
                    found.append((r.uid, r.modseq))
            if limit is not None and len(found) > limit:
                break
        return _search_page(found, limit)


# ---------------------------------------------------------------- search compilation
_MONTHS = {m: i for i, m in enumerate(
    ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"], 1)}
_HEADER_COLUMNS = {"subject": "subject", "from": "from_addr", "to": "to_addr", "cc": "cc_addr",
                   "bcc": "bcc_addr", "message-id": "message_id_hdr"}
BLOB_OPS = {"body", "text"}
# the Date: field's date as written, from the summary JSON (MessageSummary.date keeps the
# field's own zone; sent_date is that instant in UTC): a JSON key cannot occur unescaped
# inside a JSON string, so the first match is the key
_SUMMARY_DATE = re.compile(r'"date":"(\d{4})-(\d{2})-(\d{2})T')


def parse_search_date(s: str) -> datetime:
    """An IMAP date (``1-Feb-1994``, RFC 3501 §9 date) or ISO ``1994-02-01``, as UTC midnight."""
    s = s.strip().strip('"')
    m = re.fullmatch(r"(\d{1,2})-([A-Za-z]{3})-(\d{4})", s)
    if m and m.group(2).lower() in _MONTHS:
        return datetime(int(m.group(3)), _MONTHS[m.group(2).lower()], int(m.group(1)), tzinfo=UTC)
    try:
        d = datetime.fromisoformat(s[:10])
    except ValueError as exc:
        raise Invalid(f"not a date: {s!r}") from exc
    return datetime(d.year, d.month, d.day, tzinfo=UTC)


def _written_date(summary: str | None, sent_utc: Any) -> date | None:
    """The Date: field's calendar date as written (RFC 3501 §6.4.4 SENT*: time and zone
    disregarded); its UTC date if the summary does not say."""
    m = _SUMMARY_DATE.search(summary or "")
    if m:
        try:
            return date(int(m.group(1)), int(m.group(2)), int(m.group(3)))
        except ValueError:
            pass
    if isinstance(sent_utc, str):  # SQLite without type information
        sent_utc = datetime.fromisoformat(sent_utc)
    return sent_utc.date() if isinstance(sent_utc, datetime) else None


@dataclass
class _RowLeaf:
    """A leaf SQL decides for most rows: ``sure`` rows match, rows outside ``sure`` and
    ``maybe`` do not, and ``check`` decides the rest from the ``columns`` read for them."""

    sure: ColumnElement[bool]
    maybe: ColumnElement[bool]
    columns: tuple[Any, ...]
    check: Callable[..., bool]


class _SearchCompiler:
    """Turns a SearchKey tree into SQL; leaves SQL cannot answer (body, text, headers
    without a column) are collected for the blob pass, leaves it can answer for most rows
    only (``_RowLeaf``) for a check on the other rows' columns."""

    def __init__(self) -> None:
        self.sql_leaves: list[ColumnElement[bool]] = []
        self.blob_leaves: list[tuple[str, SearchKey]] = []
        # UID sets too fragmented for one statement: SQL tests the bounding range, these
        # exact tests run on the candidate rows
        self.uid_leaves: list[tuple[ColumnElement[bool], Callable[[int], bool]]] = []
        self.row_leaves: list[_RowLeaf] = []
        self._leaf_index: dict[int, tuple[str, int]] = {}

    def _is_blob(self, k: SearchKey) -> bool:
        if k.op in BLOB_OPS:
            return True
        # HEADER name "" matches the messages that have the field (RFC 3501 §6.4.4), which
        # an empty column cannot tell from an empty field: the blob decides
        return k.op == "header" and (not k.args or k.args[0].lower() not in _HEADER_COLUMNS
                                     or len(k.args) < 2 or k.args[1] == "")

    def row_columns(self) -> list[Any]:
        """The columns the row leaves read, NULL where SQL has decided."""
        cols = []
        for i, leaf in enumerate(self.row_leaves):
            undecided = and_(not_(leaf.sure), leaf.maybe)
            cols.append(case((leaf.sure, 1), else_=0).label(f"r{i}"))
            cols.extend(case((undecided, c), else_=None).label(f"r{i}c{j}")
                        for j, c in enumerate(leaf.columns))
        return cols

    def row_values(self, r: Any) -> list[bool]:
        """The row leaves' values on one row, in leaf order (they follow the SQL leaves)."""
        out = []
        for i, leaf in enumerate(self.row_leaves):
            vals = [getattr(r, f"r{i}c{j}") for j in range(len(leaf.columns))]
            out.append(bool(getattr(r, f"r{i}")) or (
                any(v is not None for v in vals) and leaf.check(*vals)))
        return out

    def compile(self, k: SearchKey) -> ColumnElement[bool]:
        op = k.op.lower()
        if op == "and":
            return and_(true(), *(self.compile(c) for c in k.children))
        if op == "or":
            if not k.children:
                return false()
            return or_(*(self.compile(c) for c in k.children))
        if op == "not":
            if len(k.children) != 1:
                raise Invalid("not takes one key")
            return not_(self.compile(k.children[0]))
        if self._is_blob(k):
            self._leaf_index[id(k)] = ("blob", len(self.blob_leaves))
            self.blob_leaves.append((f"b{len(self.blob_leaves)}", k))
            return true()
        row = self._row_leaf(k)
        if row is not None:
            self._leaf_index[id(k)] = ("row", len(self.row_leaves))
            self.row_leaves.append(row)
            return or_(row.sure, row.maybe)
        if op == "uid" and k.uids:
            expr, inside = uid_filter(k.uids)
            if inside is not ANY_UID:  # SQL only bounds the set: the exact test comes later
                self._leaf_index[id(k)] = ("uid", len(self.uid_leaves))
                self.uid_leaves.append((expr, inside))
                return true()
        else:
            expr = self._leaf(k)
        self._leaf_index[id(k)] = ("sql", len(self.sql_leaves))
        self.sql_leaves.append(expr)
        return expr

    def bound(self, k: SearchKey, *, positive: bool) -> ColumnElement[bool]:
        """SQL for the candidates query. positive: a superset of the messages that may match
        once blob and exact-UID leaves are known; not positive (under a NOT): a subset of the
        messages that surely match, so that its negation is again a superset."""
        op = k.op.lower()
        if op == "and":
            return and_(true(), *(self.bound(c, positive=positive) for c in k.children))
        if op == "or":
            if not k.children:
                return false()
            return or_(*(self.bound(c, positive=positive) for c in k.children))
        if op == "not":
            return not_(self.bound(k.children[0], positive=not positive))
        kind, i = self._leaf_index[id(k)]
        if kind == "blob":
            return true() if positive else false()
        if kind == "uid":  # may hold only inside the bounding range; holds for sure nowhere
            return self.uid_leaves[i][0] if positive else false()
        if kind == "row":
            leaf = self.row_leaves[i]
            return or_(leaf.sure, leaf.maybe) if positive else leaf.sure
        return self.sql_leaves[i]

    def evaluate(self, k: SearchKey, sql_vals: list[bool], blob_vals: dict[int, bool],
                 uid: int) -> bool:
        op = k.op.lower()
        if op == "and":
            return all(self.evaluate(c, sql_vals, blob_vals, uid) for c in k.children)
        if op == "or":
            return any(self.evaluate(c, sql_vals, blob_vals, uid) for c in k.children)
        if op == "not":
            return not self.evaluate(k.children[0], sql_vals, blob_vals, uid)
        kind, i = self._leaf_index[id(k)]
        if kind == "uid":
            return self.uid_leaves[i][1](uid)
        if kind == "row":
            return sql_vals[len(self.sql_leaves) + i]
        return sql_vals[i] if kind == "sql" else blob_vals.get(i, False)

    @staticmethod
    def _arg(k: SearchKey, n: int = 0) -> str:
        if len(k.args) <= n:
            raise Invalid(f"search key {k.op} needs an argument")
        return k.args[n]

    def _row_leaf(self, k: SearchKey) -> _RowLeaf | None:
        op = k.op.lower()
        if op in ("sentbefore", "senton", "sentsince"):
            # sent_date is the Date: field's instant in UTC, and the field's own date is
            # within a day of the UTC one (zones are less than 24 h from UTC): SQL decides
            # all but the rows a day either side of the date asked; without a Date: field
            # the INTERNALDATE's UTC date counts, as before
            d = parse_search_date(self._arg(k))
            day = timedelta(days=1)
            sent, internal = M.c.sent_date, M.c.internaldate
            has = sent.is_not(None)
            no_date = sent.is_(None)
            if op == "sentbefore":
                sure = or_(and_(no_date, internal < d), and_(has, sent < d - day))
                maybe = and_(has, sent >= d - day, sent < d + day)
            elif op == "sentsince":
                sure = or_(and_(no_date, internal >= d), and_(has, sent >= d + day))
                maybe = and_(has, sent >= d - day, sent < d + day)
            else:
                sure = and_(no_date, internal >= d, internal < d + day)
                maybe = and_(has, sent >= d - day, sent < d + 2 * day)
            ref = d.date()

            def sent_check(summary: str | None, sent_utc: Any) -> bool:
                written = _written_date(summary, sent_utc)
                return written is not None and compare_dates(op, written, ref)

            return _RowLeaf(sure, maybe, (M.c.summary, M.c.sent_date), sent_check)
        if op in ("from", "to", "cc", "bcc"):
            # the column holds the field as written; an address with a comment inside
            # (<joe (work)@ example.com>) is found in its parsed form (searchtext.address_text)
            col = getattr(M.c, _HEADER_COLUMNS[op])
            needle = self._arg(k)
            if needle == "":
                return None
            low = needle.lower()
            return _RowLeaf(self._contains(col, needle),
                            func.lower(col).contains("(", autoescape=True), (col,),
                            lambda text: low in address_text(text).lower())
        return None

    @staticmethod
    def _contains(col: Any, value: str) -> ColumnElement[bool]:
        if value == "":
            return true()
        return func.lower(col).contains(value.lower(), autoescape=True)

    def _leaf(self, k: SearchKey) -> ColumnElement[bool]:
        op = k.op.lower()
        match op:
            case "all":
                return true()
            case "uid":  # an empty set; compile() handles the others
                return false()
            case "flag" | "unflag":
                name = self._arg(k)
                low = name.lower()
                if low == "\\recent":
                    hit: ColumnElement[bool] = false()
                elif low in _FLAG_BY_LOWER:
                    hit = M.c.flags.op("&")(_FLAG_BY_LOWER[low][1]) != 0
                else:
                    # keywords compare case-insensitively on both databases
                    hit = func.lower(literal(" ") + M.c.keywords + literal(" ")).contains(
                        f" {name.lower()} ", autoescape=True)
                return hit if op == "flag" else not_(hit)
            case "header":
                return self._contains(getattr(M.c, _HEADER_COLUMNS[self._arg(k).lower()]),
                                      self._arg(k, 1) if len(k.args) > 1 else "")
            case "from" | "to" | "cc" | "bcc" | "subject":  # (addresses: see _row_leaf)
                return self._contains(getattr(M.c, _HEADER_COLUMNS[op]), self._arg(k))
            case "before":
                return M.c.internaldate < parse_search_date(self._arg(k))
            case "on":
                d = parse_search_date(self._arg(k))
                return and_(M.c.internaldate >= d, M.c.internaldate < d + timedelta(days=1))
            case "since":
                return M.c.internaldate >= parse_search_date(self._arg(k))
            case "larger" | "smaller":
                try:
                    n = int(self._arg(k))
                except ValueError as exc:
                    raise Invalid(f"{op} needs a number") from exc
                return M.c.size > n if op == "larger" else M.c.size < n
            case "modseq":
                try:
                    n = int(self._arg(k, len(k.args) - 1))
                except ValueError as exc:
                    raise Invalid("modseq needs a number") from exc
                return M.c.modseq >= n
            case _:
                raise Invalid(f"unknown search key {k.op}")
