"""The text IMAP SEARCH looks in (RFC 3501 §6.4.4 BODY, TEXT, HEADER), with bounded work.

The platform's own MIME tree (``mime.parse_tree``: bounded depth and parts), transfer
encodings undone with binascii and charsets decoded for text parts only, RFC 2047 words
decoded in linear time, and at most ``limit`` characters of one message looked at.
Pure: no asyncio, nats or boto3; never raises on message content.
"""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass, field
from datetime import date
from email.utils import getaddresses, parsedate_tz

from postbus.protocols.mime import (
    Entity,
    decode_bytes,
    decode_words,
    header_block_end,
    parse_headers,
    parse_tree,
    unfold,
)

__all__ = ["MAX_TEXT", "Text", "address_text", "compare_dates", "header_values",
           "message_text", "written_date"]

# characters of one message a search looks at (Dovecot indexes bodies for this; we read the
# blob): past this the rest of a huge text is not searched
MAX_TEXT = 4 * 1024 * 1024
_NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/]")


@dataclass
class Text:
    """Decoded pieces in message order, at most ``limit`` characters in all."""

    limit: int
    pieces: list[str] = field(default_factory=list)
    used: int = 0

    @property
    def left(self) -> int:
        return self.limit - self.used

    def add(self, s: str) -> None:
        s = s[:max(0, self.left)]
        if s:
            self.pieces.append(s)
            self.used += len(s)

    def headers(self, fields: list[tuple[str, bytes]]) -> None:
        for name, value in fields:
            if self.left <= 0:
                return
            self.add(f"{name}: {decode_words(unfold(value[:self.left]))}")

    def join(self) -> str:
        return "\n".join(self.pieces)


def _base64(data: bytes) -> bytes:
    """Lenient base64: junk ignored, a cut-off or unpadded tail decoded as far as it goes."""
    try:
        return binascii.a2b_base64(data)
    except binascii.Error:
        clean = _NOT_BASE64.sub(b"", data)
        return binascii.a2b_base64(clean[:len(clean) // 4 * 4])


def _part_text(raw: bytes, e: Entity, limit: int) -> str:
    """A text part's content: transfer encoding undone (only as much input as ``limit``
    characters can need), then its charset."""
    cte = (e.header("content-transfer-encoding") or "").strip().lower()
    start = e.body_start
    if cte == "base64":
        data = _base64(raw[start:min(e.end, start + limit * 3 // 2 + 16)])
    elif cte == "quoted-printable":
        data = binascii.a2b_qp(raw[start:min(e.end, start + limit * 3)])
    else:
        data = raw[start:min(e.end, start + limit)]
    charset = next((v for k, v in e.params if k.lower() == "charset"), "us-ascii")
    return decode_bytes(data, charset)


def _body(raw: bytes, root: Entity, out: Text) -> None:
    """Text parts and the headers of encapsulated messages, in order (no recursion)."""
    todo = [root]
    while todo and out.left > 0:
        e = todo.pop()
        if e.is_multipart:
            todo.extend(reversed(e.children))
        elif e.message is not None:
            out.headers(e.message.headers)
            todo.append(e.message)
        elif e.typ.lower() == "text":
            try:
                out.add(_part_text(raw, e, out.left))
            except (binascii.Error, ValueError):
                continue  # a broken encoding: nothing searchable in this part


def message_text(raw: bytes, *, headers: bool, limit: int = MAX_TEXT) -> str:
    """BODY (``headers=False``) or TEXT (``headers=True``) search text of a message."""
    root = parse_tree(raw)
    out = Text(limit)
    if headers:
        out.headers(root.headers)
    _body(raw, root, out)
    return out.join()


def header_values(raw: bytes, name: str, limit: int = MAX_TEXT) -> list[str]:
    """Decoded values of the message's own header fields called ``name``."""
    name = name.lower()
    left = limit
    values = []
    for n, v in parse_headers(raw[:header_block_end(raw, 0, len(raw))]):
        if n == name and left > 0:
            s = decode_words(unfold(v[:left]))[:left]
            values.append(s)
            left -= len(s)
    return values


def address_text(value: str) -> str:
    """What FROM/TO/CC/BCC look in (RFC 3501 §6.4.4): the field as written, and each address
    again as ``name <local@domain>`` with comments and folding dropped, so that an address
    written with comments inside it (``<joe (work)@ example.com>``, RFC 5322 §3.4.1 CFWS)
    is found whole, as Dovecot finds it."""
    if "(" not in value:  # nothing can split an address but a comment
        return value
    try:
        parsed = getaddresses([value])
    except Exception:  # the standard library's parser on hostile input: the text alone
        return value
    return value + "\n" + ", ".join(f"{name} <{addr}>" for name, addr in parsed if addr)


def written_date(value: str | None) -> date | None:
    """The calendar date of a Date: field as written, its time and zone disregarded
    (RFC 3501 §6.4.4 SENTBEFORE/SENTON/SENTSINCE); None when it does not parse."""
    if not value:
        return None
    try:
        t = parsedate_tz(value)
        return None if t is None else date(t[0], t[1], t[2])
    except (TypeError, ValueError, OverflowError):
        return None


def compare_dates(op: str, written: date, ref: date) -> bool:
    """BEFORE/ON/SINCE (and the SENT forms) on calendar dates (RFC 3501 §6.4.4)."""
    op = op.removeprefix("sent")
    if op == "before":
        return written < ref
    if op == "on":
        return written == ref
    return written >= ref
