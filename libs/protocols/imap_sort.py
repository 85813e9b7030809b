"""IMAP SORT keys (RFC 5256, RFC 5957): base subject, address and display keys, the sent
date, and the ordering of messages by a list of sort criteria. Pure: no asyncio, no I/O.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from datetime import datetime

from postbus.protocols.mime import decode_words

__all__ = ["KEYS", "Criterion", "SortInfo", "Address", "base_subject", "base_subject_info",
           "casemap",
           "envelope_addresses", "address_key", "display_key", "sort_messages"]

# RFC 5256 §3 and RFC 5957 §3 sort keys
KEYS = frozenset({"ARRIVAL", "CC", "DATE", "FROM", "SIZE", "SUBJECT", "TO",
                  "DISPLAYFROM", "DISPLAYTO"})


@dataclass(frozen=True)
class Criterion:
    key: str  # one of KEYS
    reverse: bool = False


@dataclass(frozen=True)
class Address:
    """One ENVELOPE address (RFC 3501 §7.4.2): a group start has ``host`` None and the
    group name in ``mailbox``; a group end has ``mailbox`` and ``host`` None."""

    name: str | None
    mailbox: str | None
    host: str | None


# ---------------------------------------------------------------- collation (RFC 5051)
def casemap(s: str) -> str:
    """i;unicode-casemap (RFC 5051 §2): titlecase each character, then decompose (NFKD).
    Strings compare by the code points of the result (the order of their UTF-8 octets)."""
    return unicodedata.normalize("NFKD", "".join(ch.title() for ch in s))


# ---------------------------------------------------------------- base subject (§2.1)
_WSP = re.compile(r"[ \t\r\n]+")
_TRAILER = re.compile(r"(?:\(fwd\)|[ ])\Z", re.IGNORECASE)
_BLOB = r"\[[^\[\]]*\][ ]*"
_LEADER = re.compile(rf"(?:(?:{_BLOB})*(?:re|fwd?)[ ]*(?:{_BLOB})?:|[ ])", re.IGNORECASE)
_BLOB_RE = re.compile(_BLOB)


def base_subject(subject: str) -> str:
    """The base subject of RFC 5256 §2.1 from a subject already decoded (RFC 2047) to
    Unicode. Not case-mapped: compare with ``casemap``."""
    return base_subject_info(subject)[0]


def base_subject_info(subject: str) -> tuple[str, bool]:
    """The base subject (as ``base_subject``) and whether the subject was a reply or a
    forward: whether extracting it removed a "Re:"/"Fw:"/"Fwd:" leader, a "(fwd)" trailer or
    a "[fwd: ...]" wrapper (RFC 5256 §2.1, used by THREAD=REFERENCES §4 step 5)."""
    refwd = False
    # (1) tabs and line breaks become spaces, runs of spaces one space
    s = _WSP.sub(" ", subject)
    while True:
        # (2) remove subj-trailer: "(fwd)" or a space, repeatedly
        while True:
            m = _TRAILER.search(s)
            if m is None:
                break
            refwd = refwd or m.group() != " "
            s = s[:m.start()]
        # (5) repeat (3) and (4) until neither removes anything
        while True:
            before = s
            # (3) remove subj-leader: blobs then "re"/"fw"/"fwd" and ":", or a space
            while True:
                m = _LEADER.match(s)
                if m is None or m.end() == 0:
                    break
                refwd = refwd or m.group() != " "
                s = s[m.end():]
            # (4) remove a subj-blob if what remains is not empty
            m = _BLOB_RE.match(s)
            if m is not None and m.end() < len(s):
                s = s[m.end():]
            if s == before:
                break
        # (6) "[fwd:" ... "]": take the inside and go back to (2)
        if len(s) >= 6 and s[:5].lower() == "[fwd:" and s.endswith("]"):
            s = s[5:-1]
            refwd = True
            continue
        return s, refwd


# ---------------------------------------------------------------- ENVELOPE addresses
class _EnvelopeError(ValueError):
    pass


def _parse_sexp(data: bytes) -> list[object]:
    """The values of an IMAP parenthesized list as written by ``mime.imap_string``: NIL,
    quoted strings, literals, nested lists."""
    i = 0
    n = len(data)
    stack: list[list[object]] = [[]]
    while i < n:
        c = data[i]
        if c == 0x20:
            i += 1
        elif c == 0x28:  # (
            stack.append([])
            i += 1
        elif c == 0x29:  # )
            if len(stack) < 2:
                raise _EnvelopeError("unbalanced")
            done = stack.pop()
            stack[-1].append(done)
            i += 1
        elif c == 0x22:  # "
            out = bytearray()
            i += 1
            while i < n and data[i] != 0x22:
                if data[i] == 0x5C and i + 1 < n:
                    i += 1
                out.append(data[i])
                i += 1
            i += 1
            stack[-1].append(out.decode("utf-8", "replace"))
        elif c == 0x7B:  # {n}\r\n
            j = data.index(b"}", i)
            size = int(data[i + 1:j])
            start = j + 3
            stack[-1].append(data[start:start + size].decode("utf-8", "replace"))
            i = start + size
        elif data[i:i + 3].upper() == b"NIL":
            stack[-1].append(None)
            i += 3
        else:
            raise _EnvelopeError(f"unexpected byte {c}")
    if len(stack) != 1:
        raise _EnvelopeError("unbalanced")
    return stack[0]


def envelope_addresses(envelope: str) -> dict[str, list[Address]]:
    """The from, sender, reply-to, to, cc and bcc address lists of an ENVELOPE (RFC 3501
    §7.4.2); empty lists when it cannot be read."""
    names = ("from", "sender", "reply-to", "to", "cc", "bcc")
    try:
        top = _parse_sexp(envelope.encode("utf-8"))
    except (_EnvelopeError, ValueError):
        return {k: [] for k in names}
    env = top[0] if top and isinstance(top[0], list) else []
    out: dict[str, list[Address]] = {}
    for n, k in enumerate(names, 2):
        field = env[n] if n < len(env) else None
        addrs: list[Address] = []
        if isinstance(field, list):
            for a in field:
                if isinstance(a, list) and len(a) == 4:
                    name, _, mailbox, host = (x if isinstance(x, str) else None for x in a)
                    addrs.append(Address(name, mailbox, host))
        out[k] = addrs
    return out


def address_key(addrs: list[Address]) -> str:
    """RFC 5256 §3 FROM/TO/CC: the addr-mailbox (local part) of the first address; for a
    group, as Dovecot does, the group name. Empty when there is no address."""
    if not addrs:
        return ""
    return addrs[0].mailbox or ""


def display_key(addrs: list[Address]) -> str:
    """RFC 5957 §3 DISPLAYFROM/DISPLAYTO: the decoded display name of the first address
    when present and not empty, else its addr-spec (a group: its name, as Dovecot)."""
    if not addrs:
        return ""
    a = addrs[0]
    name = decode_words(a.name).strip() if a.name else ""
    if name:
        return name
    if a.host is None:
        return a.mailbox or ""
    return f"{a.mailbox or ''}@{a.host}"


# ---------------------------------------------------------------- ordering
@dataclass(frozen=True)
class SortInfo:
    """What the sort keys of one message are computed from."""

    seq: int  # the message sequence number: ties go in its ascending order
    uid: int
    arrival: datetime  # INTERNALDATE
    sent: datetime | None  # the Date header, None when missing or unparseable
    size: int  # RFC822.SIZE
    subject: str  # decoded (RFC 2047)
    envelope: str  # ENVELOPE wire text


def _key_value(info: SortInfo, key: str, addrs: dict[str, list[Address]] | None) -> object:
    match key:
        case "ARRIVAL":
            return info.arrival.timestamp()
        case "DATE":
            # RFC 5256 §2.2: the Date header in UTC; the INTERNALDATE when it has none
            return (info.sent or info.arrival).timestamp()
        case "SIZE":
            return info.size
        case "SUBJECT":
            return casemap(base_subject(info.subject))
    assert addrs is not None
    match key:
        case "FROM":
            return casemap(address_key(addrs["from"]))
        case "TO":
            return casemap(address_key(addrs["to"]))
        case "CC":
            return casemap(address_key(addrs["cc"]))
        case "DISPLAYFROM":
            return casemap(display_key(addrs["from"]))
        case "DISPLAYTO":
            return casemap(display_key(addrs["to"]))
    raise ValueError(f"unknown sort key {key}")


class _Desc:
    """Inverts the order of a value (REVERSE of one criterion)."""

    __slots__ = ("v",)

    def __init__(self, v: object) -> None:
        self.v = v

    def __lt__(self, other: _Desc) -> bool:
        return other.v < self.v  # type: ignore[operator, no-any-return]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Desc) and self.v == other.v


def sort_messages(infos: list[SortInfo], criteria: list[Criterion]) -> list[SortInfo]:
    """The messages in the order of the criteria (RFC 5256 §3); ties, after every
    criterion, in ascending sequence number order, whatever REVERSE says."""
    need_addrs = any(c.key in ("FROM", "TO", "CC", "DISPLAYFROM", "DISPLAYTO")
                     for c in criteria)

    def key(info: SortInfo) -> tuple[object, ...]:
        addrs = envelope_addresses(info.envelope) if need_addrs else None
        vals: list[object] = []
        for c in criteria:
            v = _key_value(info, c.key, addrs)
            vals.append(_Desc(v) if c.reverse else v)
        vals.append(info.seq)
        return tuple(vals)

    return sorted(infos, key=key)
