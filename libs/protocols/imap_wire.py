"""IMAP response encoding (RFC 3501 §4, §7, §9): strings (atom, quoted or literal),
flag lists, sequence sets, dates, and modified UTF-7 mailbox names (§5.1.3; IMAP4rev2
sends them as quoted UTF-8, RFC 9051 §5.1).

Pure: values in, bytes out; no asyncio, nats or boto3.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from datetime import UTC, datetime

from postbus.protocols.imap_parser import ASTRING_CHARS

__all__ = [
    "quoted", "literal", "string", "nstring", "astring", "flag_list", "seqset",
    "imap_datetime", "mutf7_encode", "mutf7_decode", "QUOTED_MAX",
]

QUOTED_MAX = 1024  # longer strings go as literals (clients cope better with those)
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _quotable(b: bytes, utf8: bool = False) -> bool:
    """7-bit without CR/LF/NUL; with ``utf8`` also valid UTF-8 (RFC 9051 §9: QUOTED-CHAR
    takes UTF8-2/3/4, so an IMAP4rev2 mailbox name travels quoted)."""
    if len(b) > QUOTED_MAX:
        return False
    if utf8 and not b.isascii():
        try:
            b.decode("utf-8")
        except UnicodeDecodeError:
            return False
        return all(c >= 0x80 or (0x01 <= c <= 0x7F and c not in (0x0A, 0x0D)) for c in b)
    return all(0x01 <= c <= 0x7F and c not in (0x0A, 0x0D) for c in b)


def _b(s: str | bytes) -> bytes:
    return s.encode("utf-8") if isinstance(s, str) else s


def quoted(s: str | bytes) -> bytes:
    b = _b(s)
    return b'"' + b.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def literal(s: str | bytes) -> bytes:
    b = _b(s)
    return b"{%d}\r\n" % len(b) + b


def string(s: str | bytes, utf8: bool = False) -> bytes:
    """A quoted string when it can be one (7-bit, or UTF-8 with ``utf8``; no CR/LF/NUL;
    short), else a literal."""
    b = _b(s)
    return quoted(b) if _quotable(b, utf8) else literal(b)


def nstring(s: str | bytes | None) -> bytes:
    return b"NIL" if s is None else string(s)


def astring(s: str | bytes, utf8: bool = False) -> bytes:
    """An atom when every octet is an ASTRING-CHAR (and it is not NIL), else a string
    (quoted UTF-8 allowed with ``utf8``)."""
    b = _b(s)
    if b and b.upper() != b"NIL" and all(c in ASTRING_CHARS for c in b):
        return b
    return string(b, utf8)


def flag_list(flags: Iterable[str]) -> bytes:
    return b"(" + " ".join(flags).encode("utf-8") + b")"


def seqset(nums: Iterable[int]) -> str:
    """Compress numbers into "1:3,7,9:10" (sorted, duplicates dropped)."""
    return ordered_seqset(sorted(set(nums)))


def ordered_seqset(nums: list[int]) -> str:
    """A sequence set listing ``nums`` in their own order: runs of consecutive ascending
    numbers become ranges (COPYUID's target set, RFC 4315 §3; ESORT's ALL, RFC 5267
    §3.2, as Dovecot writes them)."""
    out: list[str] = []
    i = 0
    while i < len(nums):
        j = i
        while j + 1 < len(nums) and nums[j + 1] == nums[j] + 1:
            j += 1
        out.append(str(nums[i]) if i == j else f"{nums[i]}:{nums[j]}")
        i = j + 1
    return ",".join(out)


def imap_datetime(dt: datetime) -> bytes:
    """date-time: "dd-Mon-yyyy hh:mm:ss +zzzz" (RFC 3501 §9), quoted."""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    off = dt.utcoffset()
    mins = int(off.total_seconds() // 60) if off is not None else 0
    sign = "+" if mins >= 0 else "-"
    mins = abs(mins)
    return (f'"{dt.day:2d}-{_MONTHS[dt.month - 1]}-{dt.year:04d} {dt.hour:02d}:{dt.minute:02d}:'
            f'{dt.second:02d} {sign}{mins // 60:02d}{mins % 60:02d}"').encode("ascii")


# ---------------------------------------------------------------- modified UTF-7 (§5.1.3)
def _b64(s: str) -> str:
    return base64.b64encode(s.encode("utf-16-be")).decode("ascii").rstrip("=").replace("/", ",")


def mutf7_encode(name: str) -> bytes:
    out: list[str] = []
    pending: list[str] = []
    for ch in name:
        if 0x20 <= ord(ch) <= 0x7E:
            if pending:
                out.append("&" + _b64("".join(pending)) + "-")
                pending = []
            out.append("&-" if ch == "&" else ch)
        else:
            pending.append(ch)
    if pending:
        out.append("&" + _b64("".join(pending)) + "-")
    return "".join(out).encode("ascii")


def mutf7_decode(raw: bytes) -> str:
    """Decode a modified UTF-7 name; bytes that are not valid mUTF-7 are taken as UTF-8
    (RFC 6855 clients send UTF-8). Never raises."""
    try:
        s = raw.decode("ascii")
    except UnicodeDecodeError:
        return raw.decode("utf-8", "replace")
    out: list[str] = []
    i = 0
    while i < len(s):
        ch = s[i]
        if ch != "&":
            out.append(ch)
            i += 1
            continue
        j = s.find("-", i + 1)
        if j < 0:
            return s
        chunk = s[i + 1:j]
        if chunk == "":
            out.append("&")
        else:
            b64 = chunk.replace(",", "/")
            b64 += "=" * (-len(b64) % 4)
            try:
                out.append(base64.b64decode(b64, validate=True).decode("utf-16-be"))
            except (ValueError, UnicodeDecodeError):
                return s
        i = j + 1
    return "".join(out)
