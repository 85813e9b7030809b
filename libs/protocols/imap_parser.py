"""IMAP4rev1 command parser (RFC 3501 §9 grammar, LITERAL+ RFC 7888, CONDSTORE RFC 7162,
MOVE RFC 6851, UIDPLUS RFC 4315, LIST-EXTENDED RFC 5258, ID RFC 2971, ENABLE RFC 5161,
BINARY RFC 3516, MULTIAPPEND RFC 3502, APPENDLIMIT RFC 7889, SORT and THREAD RFC 5256,
CATENATE RFC 4469 with its IMAP URLs RFC 5092, SEARCHRES RFC 5182). The grammar of IMAP4rev2
(RFC 9051 §9) is a subset of it; what a rev2 session refuses the session decides.

Pure and sans-I/O: bytes in, values out. No asyncio, nats or boto3. ``Receiver.feed`` never
raises on client input: junk, over-long lines and over-sized literals come back as ``Bad``.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

__all__ = [
    "Receiver", "Continue", "RawLine", "Bad", "Command", "SeqSet", "FetchAtt", "SearchNode",
    "SAVED", "parse_command", "parse_id_prefix", "MAX_LINE", "MAX_LITERAL", "MAX_COMMAND",
    "MAX_ID_LINE",
    "Limits", "PREAUTH",
    "Capability", "Noop", "Logout", "StartTLS", "Login", "Authenticate", "Select", "Create",
    "Delete", "Rename", "Subscribe", "Unsubscribe", "ListCmd", "Status", "Append", "AppendItem",
    "CatText", "CatUrl", "CatPart", "MessageUrl", "parse_message_url", "IdCmd",
    "Enable", "Namespace", "Idle", "Check", "Close", "Unselect", "Expunge", "Search", "Sort",
    "SortKey", "ThreadCmd", "THREAD_ALGORITHMS", "Fetch",
    "StoreCmd", "Copy", "GetQuotaRoot", "GetQuota", "Compress",
]

# RFC 3501 §4: no line length limit, but RFC 7162 §4 recommends servers accept at least
# 8192 octets; we take 64 KiB (Dovecot: imap_max_line_length = 64k).
MAX_LINE = 64 * 1024
MAX_LITERAL = 64 * 1024 * 1024
# every line and literal of one command together (RFC 3501 sets none; without it 1,000
# literals of MAX_LITERAL each would be one "command")
MAX_COMMAND = MAX_LITERAL + 1024 * 1024
MAX_LITERALS_PER_COMMAND = 1000
MAX_DEPTH = 50  # nesting of search keys / parentheses

SeqSet = tuple[tuple[int | None, int | None], ...]
"""Inclusive ranges; ``None`` stands for ``*`` (RFC 3501 §9 seq-number)."""

SAVED: SeqSet = ((-1, -1),)
"""``$``, the saved search result (RFC 5182 §2.1, RFC 9051 §6.4.4.1): a whole sequence set
of its own, never part of a list; the session puts the saved messages in its place."""


# ---------------------------------------------------------------- receiver outputs
@dataclass(frozen=True)
class Continue:
    """A synchronising literal ``{n}`` is announced: the server must send ``+ ...`` before
    the client sends its ``n`` octets (RFC 3501 §7.5)."""

    size: int


@dataclass(frozen=True)
class RawLine:
    """A line read in raw mode (``expect_line``): IDLE's DONE, an AUTHENTICATE response."""

    line: bytes


@dataclass(frozen=True)
class Bad:
    """An unparseable or over-sized command: answer ``<tag> BAD [code] reason``.
    ``fatal``: the receiver stopped reading (input it will not skip): say BYE and close."""

    tag: str
    reason: str
    code: str | None = None
    fatal: bool = False
    # its command name (upper-case) where known, for the reply only: an APPEND's TOOBIG is a
    # NO (RFC 7889 §4); not part of what the refusal is
    command: str = field(default="", compare=False)
    # a SEARCH with RETURN (SAVE): answered NO (BADCHARSET), it empties "$" (RFC 9051
    # §6.4.4.1); answered BAD, it leaves it as it was
    saves: bool = field(default=False, compare=False)


@dataclass(frozen=True)
class Limits:
    """What one command may hold. ``max_command`` counts every line and literal of it.
    ``skip_oversized``: read past a refused LITERAL+ or over-long line (and go on); when
    False the refusal is a fatal ``Bad`` and nothing more is read (before login: nobody
    may make the server read megabytes it will throw away, RFC 7888 §4)."""

    max_line: int = MAX_LINE
    max_literal: int = MAX_LITERAL
    max_command: int = MAX_COMMAND
    skip_oversized: bool = True
    # an ``<tag> ID (`` line longer than max_line is still answered up to this length: the
    # first max_line octets are kept, the rest is read and dropped (0: no such exception)
    max_id_line: int = 0


# RFC 2971 §3.3: field names <= 30 octets, values <= 1024, <= 30 pairs, so a valid ID
# line is at most 30 * (32 + 1 + 1026) + 29 + 'ID ()' + tag + CRLF: under 31.2 KiB plus
# the tag. 34 KiB leaves room for a long tag and a few escaped quotes.
MAX_ID_LINE = 34 * 1024

# Before authentication a client can say little: LOGIN, AUTHENTICATE (SASL-IR tokens of a
# few KiB), ID, STARTTLS. Dovecot's imap-login disconnects past 8 KiB lines as well; only
# ID may be longer (MAX_ID_LINE), and its tail is not kept.
PREAUTH = Limits(max_line=8 * 1024, max_literal=4 * 1024, max_command=16 * 1024,
                 skip_oversized=False, max_id_line=MAX_ID_LINE)


# ---------------------------------------------------------------- commands
@dataclass(frozen=True)
class Capability:
    tag: str


@dataclass(frozen=True)
class Noop:
    tag: str


@dataclass(frozen=True)
class Logout:
    tag: str


@dataclass(frozen=True)
class StartTLS:
    tag: str


@dataclass(frozen=True)
class Login:
    tag: str
    user: bytes
    password: bytes


@dataclass(frozen=True)
class Authenticate:
    tag: str
    mechanism: str  # upper-case
    initial: bytes | None = None  # SASL-IR (RFC 4959), still base64; "=" is an empty response


@dataclass(frozen=True)
class QResync:
    """SELECT/EXAMINE's QRESYNC parameter (RFC 7162 §3.2.5): what the client last knew."""

    uidvalidity: int
    modseq: int
    known_uids: SeqSet | None = None
    # seq-match-data: message numbers and the UIDs the client had for them
    seq_match: tuple[SeqSet, SeqSet] | None = None


@dataclass(frozen=True)
class Select:
    tag: str
    mailbox: bytes
    readonly: bool = False  # EXAMINE
    condstore: bool = False
    qresync: QResync | None = None


@dataclass(frozen=True)
class Create:
    tag: str
    mailbox: bytes
    special_use: tuple[str, ...] = ()  # RFC 6154 CREATE (USE (\Sent))


@dataclass(frozen=True)
class Delete:
    tag: str
    mailbox: bytes


@dataclass(frozen=True)
class Rename:
    tag: str
    old: bytes
    new: bytes


@dataclass(frozen=True)
class Subscribe:
    tag: str
    mailbox: bytes


@dataclass(frozen=True)
class Unsubscribe:
    tag: str
    mailbox: bytes


@dataclass(frozen=True)
class ListCmd:
    tag: str
    reference: bytes
    patterns: tuple[bytes, ...]
    lsub: bool = False
    select_opts: tuple[str, ...] = ()  # upper-case, e.g. SUBSCRIBED, SPECIAL-USE
    return_opts: tuple[str, ...] = ()  # upper-case, e.g. SPECIAL-USE, SUBSCRIBED, CHILDREN


@dataclass(frozen=True)
class Status:
    tag: str
    mailbox: bytes
    items: tuple[str, ...]  # upper-case


@dataclass(frozen=True)
class CatText:
    """A TEXT part of a CATENATE (RFC 4469 §5): octets as sent."""

    data: bytes


@dataclass(frozen=True)
class CatUrl:
    """A URL part of a CATENATE (RFC 4469 §5): an IMAP URL, resolved by the session."""

    url: str


CatPart = CatText | CatUrl


@dataclass(frozen=True)
class AppendItem:
    """A message of a MULTIAPPEND after the first (RFC 3502 §6: append-message)."""

    flags: tuple[str, ...]
    date: datetime | None
    message: bytes
    binary: bool = False
    parts: tuple[CatPart, ...] | None = None  # CATENATE (RFC 4469): ``message`` is empty


@dataclass(frozen=True)
class Append:
    tag: str
    mailbox: bytes
    flags: tuple[str, ...]
    date: datetime | None
    message: bytes
    binary: bool = False  # sent as a literal8 ~{n} (RFC 3516 §4.4)
    more: tuple[AppendItem, ...] = ()  # MULTIAPPEND (RFC 3502): the messages after this one
    parts: tuple[CatPart, ...] | None = None  # CATENATE (RFC 4469): ``message`` is empty


@dataclass(frozen=True)
class IdCmd:
    tag: str
    params: tuple[tuple[str, str | None], ...] | None
    # the line passed the receiver's max_line: params are the pairs complete in the
    # kept prefix, the rest of the line was read and dropped unparsed
    truncated: bool = False


@dataclass(frozen=True)
class Enable:
    tag: str
    capabilities: tuple[str, ...]  # upper-case


@dataclass(frozen=True)
class Namespace:
    tag: str


@dataclass(frozen=True)
class Idle:
    tag: str


@dataclass(frozen=True)
class Check:
    tag: str


@dataclass(frozen=True)
class Close:
    tag: str


@dataclass(frozen=True)
class Unselect:
    tag: str


@dataclass(frozen=True)
class Expunge:
    tag: str
    uids: SeqSet | None = None  # UID EXPUNGE (RFC 4315)


@dataclass(frozen=True)
class SearchNode:
    """One search key. ``op`` as in ``postbus.proto.store.SearchKey`` plus ``seq`` (a
    message sequence set, resolved by the session); ``uid`` and ``seq`` carry ``seqset``."""

    op: str
    args: tuple[str, ...] = ()
    seqset: SeqSet = ()
    children: tuple[SearchNode, ...] = ()


@dataclass(frozen=True)
class Search:
    tag: str
    uid: bool
    charset: str | None
    program: SearchNode  # an "and" node
    # ESEARCH RETURN (...), None: plain SEARCH; MIN MAX ALL COUNT (RFC 4731), CONTEXT
    # UPDATE PARTIAL (RFC 5267 §4), upper-case, PARTIAL's range in ``partial``
    return_opts: tuple[str, ...] | None = None
    partial: tuple[int, int] | None = None


@dataclass(frozen=True)
class SortKey:
    """One sort-criterion (RFC 5256 §3, RFC 5957 §3): a key name and REVERSE."""

    key: str
    reverse: bool = False


@dataclass(frozen=True)
class Sort:
    """SORT / UID SORT (RFC 5256 §3), with ESORT's RETURN options (RFC 5267 §3)."""

    tag: str
    uid: bool
    criteria: tuple[SortKey, ...]
    charset: str
    program: SearchNode  # an "and" node
    return_opts: tuple[str, ...] | None = None  # None: a plain * SORT response
    partial: tuple[int, int] | None = None  # RETURN (PARTIAL lo:hi), RFC 5267 §4.4


@dataclass(frozen=True)
class CancelUpdate:
    """CANCELUPDATE (RFC 5267 §4.3.5): the tags of live searches to stop updating."""

    tag: str
    tags: tuple[str, ...]


@dataclass(frozen=True)
class ThreadCmd:
    """THREAD / UID THREAD (RFC 5256 §3): an algorithm, a charset and a search program."""

    tag: str
    uid: bool
    algorithm: str  # upper-case: ORDEREDSUBJECT | REFERENCES
    charset: str
    program: SearchNode  # an "and" node


@dataclass(frozen=True)
class FetchAtt:
    """``name`` upper-case: FLAGS, UID, INTERNALDATE, RFC822.SIZE, ENVELOPE, BODY,
    BODYSTRUCTURE, RFC822, RFC822.HEADER, RFC822.TEXT, MODSEQ, or BODY[] (with ``section``),
    or BINARY[] / BINARY.SIZE (RFC 3516; ``section`` holds the part number only)."""

    name: str
    section: tuple[str, str, tuple[str, ...]] | None = None  # (part, text, fields)
    partial: tuple[int, int] | None = None  # <start.count>
    peek: bool = False

    @property
    def section_text(self) -> str:
        """The section-spec as echoed in the response (``HEADER.FIELDS (A B)``)."""
        if self.section is None:
            return ""
        part, text, fields = self.section
        s = ".".join(x for x in (part, text) if x)
        if fields:
            s += " (" + " ".join(_astring_text(f) for f in fields) + ")"
        return s


@dataclass(frozen=True)
class Fetch:
    tag: str
    uid: bool
    seqset: SeqSet
    atts: tuple[FetchAtt, ...]
    changedsince: int | None = None
    macro: str | None = None  # ALL / FAST / FULL when one was used
    vanished: bool = False  # UID FETCH ... (CHANGEDSINCE n VANISHED), RFC 7162 §3.2.6


@dataclass(frozen=True)
class StoreCmd:
    tag: str
    uid: bool
    seqset: SeqSet
    mode: str  # "set" | "add" | "remove"
    silent: bool
    flags: tuple[str, ...]
    unchangedsince: int | None = None


@dataclass(frozen=True)
class Copy:
    tag: str
    uid: bool
    seqset: SeqSet
    mailbox: bytes
    move: bool = False


@dataclass(frozen=True)
class GetQuotaRoot:
    tag: str
    mailbox: bytes


@dataclass(frozen=True)
class GetQuota:
    tag: str
    root: bytes


# RFC 5465 §5 event names, as the RFC spells them (the parser matches them in any case)
NOTIFY_EVENTS = ("MessageNew", "MessageExpunge", "FlagChange", "AnnotationChange",
                 "MailboxName", "SubscriptionChange", "MailboxMetadataChange",
                 "ServerMetadataChange")
NOTIFY_FILTERS = ("selected", "selected-delayed", "inboxes", "personal", "subscribed",
                  "subtree", "mailboxes")
MAX_NOTIFY_NAMES = 1000  # mailbox names in one NOTIFY (the session allows fewer)


@dataclass(frozen=True)
class NotifyGroup:
    """One event group of NOTIFY SET (RFC 5465 §6): a mailbox filter and its events."""

    filter: str  # one of NOTIFY_FILTERS, lower-case
    mailboxes: tuple[bytes, ...] = ()  # subtree / mailboxes
    events: tuple[str, ...] = ()  # () is NONE; unknown events as the client wrote them
    fetch_atts: tuple[FetchAtt, ...] = ()  # MessageNew's, only with the selected filters


@dataclass(frozen=True)
class Compress:
    """COMPRESS (RFC 4978 §3); the session refuses any mechanism but DEFLATE with BAD."""

    tag: str
    mechanism: str  # upper-case


@dataclass(frozen=True)
class Notify:
    tag: str
    groups: tuple[NotifyGroup, ...] | None  # None: NOTIFY NONE
    status: bool = False


Command = (Capability | Noop | Logout | StartTLS | Login | Authenticate | Select | Create
           | Delete | Rename | Subscribe | Unsubscribe | ListCmd | Status | Append | IdCmd
           | Enable | Namespace | Idle | Check | Close | Unselect | Expunge | Search | Sort
           | ThreadCmd | Fetch | StoreCmd | Copy | GetQuotaRoot | GetQuota | CancelUpdate
           | Notify | Compress)


# ---------------------------------------------------------------- character classes (§9)
def _cls(chars: bytes) -> frozenset[int]:
    return frozenset(chars)


_CTL = set(range(0x00, 0x20)) | {0x7F}
_ATOM_SPECIALS = set(b'(){ %*"\\]') | _CTL
ATOM_CHARS = frozenset(set(range(0x21, 0x7F)) - _ATOM_SPECIALS)
ASTRING_CHARS = ATOM_CHARS | {ord("]")}
TAG_CHARS = ASTRING_CHARS - {ord("+")}
LIST_CHARS = ATOM_CHARS | {ord("%"), ord("*"), ord("]")}
_LONG_ID = re.compile(rb"([!-~]+) ID \(", re.IGNORECASE)
_LITERAL_AT_END = re.compile(rb"\{([0-9]{1,20})(\+?)\}\r?\n\Z")
_LITERAL = re.compile(rb"~?\{([0-9]{1,20})\+?\}\r?\n")
_DATE = re.compile(rb"([0-9]{1,2})-([A-Za-z]{3})-([0-9]{4})")
_DATE_TIME = re.compile(rb'"([ 0-9][0-9])-([A-Za-z]{3})-([0-9]{4}) ([0-9]{2}):([0-9]{2}):'
                        rb'([0-9]{2}) ([+-])([0-9]{2})([0-9]{2})"')
_SECTION_PART = re.compile(rb"([1-9][0-9]{0,8}(?:\.[1-9][0-9]{0,8}){0,49})?")
_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")


def _astring_text(s: str) -> str:
    if s and all(ord(c) in ASTRING_CHARS for c in s):
        return s
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


class ParseError(Exception):
    def __init__(self, reason: str, code: str | None = None, saves: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code
        self.saves = saves  # Bad.saves


# ---------------------------------------------------------------- receiver (framing)
class Receiver:
    """IMAP commands from bytes. No I/O.

    ``push(data)`` buffers; ``next()`` returns the next ``Command``, ``Bad``, ``Continue`` or
    ``RawLine`` (or None when more bytes are needed). ``feed(data)`` does both and returns
    everything completed. Between two ``next()`` calls the session may switch the receiver
    to raw-line mode (``expect_line``) for IDLE/AUTHENTICATE, or ``reset`` it (STARTTLS).
    """

    def __init__(self, max_line: int = MAX_LINE, max_literal: int = MAX_LITERAL,
                 max_command: int | None = None, *, limits: Limits | None = None) -> None:
        self.limits = limits or Limits(
            max_line, max_literal,
            max_command if max_command is not None else max_literal + MAX_COMMAND - MAX_LITERAL)
        self._dead = False  # a fatal Bad was returned: read nothing more
        self._buf = bytearray()
        self._out: deque[Continue | Bad | RawLine | Command] = deque()
        self._reset_command()
        self._raw = False
        self._skip_line = False  # discarding the rest of an over-long line
        self._discard = 0  # octets of a refused LITERAL+ still to discard
        self._discard_bad: Bad | None = None
        self._long_id: bytes | None = None  # kept prefix of an over-long ID line
        self._long_id_len = 0  # octets of that line read so far
        self._long_id_tail = b""  # its last octets (a literal announced at its end?)

    def _reset_command(self) -> None:
        self._parts: list[bytes] = []
        self._literal = 0  # octets of literal data expected next
        self._nliterals = 0
        self._size = 0
        self._tag = "*"

    def reset(self) -> None:
        """Drop buffered input (after STARTTLS: RFC 3501 §6.2.1, no plaintext injection)."""
        self._buf.clear()
        self._out.clear()
        self._reset_command()
        self._raw = self._skip_line = False
        self._discard = 0
        self._discard_bad = None
        self._long_id = None

    def take_pending(self) -> bytes:
        """Hand back the buffered octets not framed yet and start afresh (after COMPRESS:
        what a client sent past the command is compressed, RFC 4978 §3)."""
        data = bytes(self._buf)
        self.reset()
        return data

    def set_limits(self, limits: Limits) -> None:
        """New bounds from the next command on (after login: the authenticated ones)."""
        self.limits = limits

    def expect_line(self) -> None:
        """The next line (outside a command) is returned as ``RawLine``."""
        self._raw = True

    @property
    def pending(self) -> int:
        """Buffered octets not consumed yet."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Continue | Bad | RawLine | Command]:
        self.push(data)
        out = []
        while (item := self.next()) is not None:
            out.append(item)
        return out

    def push(self, data: bytes) -> None:
        if not self._dead:
            self._buf += data

    def next(self) -> Continue | Bad | RawLine | Command | None:
        while not self._out:
            if not self._step():
                break
        return self._out.popleft() if self._out else None

    # one step of framing; False when more input is needed
    def _step(self) -> bool:
        buf = self._buf
        if self._discard:
            n = min(self._discard, len(buf))
            del buf[:n]
            self._discard -= n
            if self._discard:
                return False
            self._skip_line = True
            return True
        if self._literal:
            if len(buf) < self._literal:
                return False
            self._parts.append(bytes(buf[:self._literal]))
            del buf[:self._literal]
            self._literal = 0
            return True
        nl = buf.find(b"\n")
        if self._long_id is not None:
            return self._step_long_id(nl)
        if self._skip_line:
            if nl < 0:
                buf.clear()
                return False
            del buf[:nl + 1]
            self._skip_line = False
            if self._discard_bad is not None:
                self._out.append(self._discard_bad)
                self._discard_bad = None
            return True
        lim = self.limits
        if (len(buf) if nl < 0 else nl + 1) > lim.max_line and self._long_id_allowed():
            self._long_id = bytes(buf[:lim.max_line])
            self._long_id_len = 0
            self._long_id_tail = b""
            return True
        head = min(200, lim.max_line)  # the same octets however the line was split
        if nl < 0:
            if len(buf) > lim.max_line:
                self._refuse(Bad(self._tag_of(bytes(buf[:head])), "line too long", "TOOBIG"))
                buf.clear()
                self._skip_line = not self._dead
            return False
        line = bytes(buf[:nl + 1])
        del buf[:nl + 1]
        if len(line) > lim.max_line:
            self._refuse(Bad(self._tag_of(line[:head]), "line too long", "TOOBIG"))
            return True
        if self._raw and not self._parts:
            self._raw = False
            self._out.append(RawLine(line.rstrip(b"\r\n")))
            return True
        if not self._parts:
            self._tag = self._tag_of(line)
        m = _LITERAL_AT_END.search(line)
        size, plus = (int(m.group(1)), bool(m.group(2))) if m else (0, False)
        if size > lim.max_literal:
            reason = "literal too large"
        elif m is not None and self._nliterals >= MAX_LITERALS_PER_COMMAND:
            reason = "too many literals"
        elif self._size + len(line) + size > lim.max_command:
            reason = "command too large"
        else:
            self._parts.append(line)
            self._size += len(line) + size
            if m is None:
                data = b"".join(self._parts)
                tag = self._tag
                self._reset_command()
                self._out.append(parse_command(data, tag))
                return True
            self._nliterals += 1
            self._literal = size
            if not plus:
                self._out.append(Continue(size))
            return True
        bad = Bad(self._tag, reason, "TOOBIG",
                  command=self._command_of(self._parts[0] if self._parts else line))
        if plus:
            # the client sends the data anyway: skip it and the rest of the command line,
            # or (before login) stop reading
            self._refuse(bad, discard=size)
        else:
            # a synchronising literal is refused before the data (RFC 3501 §7.5)
            self._reset_command()
            self._out.append(bad)
        return True

    def _long_id_allowed(self) -> bool:
        if (self.limits.max_id_line <= self.limits.max_line or self._parts or self._raw
                or (m := _LONG_ID.match(self._buf, 0, self.limits.max_line)) is None):
            return False
        return all(ch in TAG_CHARS for ch in m.group(1))

    def _step_long_id(self, nl: int) -> bool:
        """Read an over-long ID line (RFC 2971 §3.3 bounds it) up to ``max_id_line``,
        dropping what is past the kept prefix; at its end, answer it from the prefix."""
        buf = self._buf
        assert self._long_id is not None
        take = len(buf) if nl < 0 else nl + 1
        self._long_id_len += take
        self._long_id_tail = (self._long_id_tail + bytes(buf[max(0, take - 32):take]))[-32:]
        del buf[:take]
        tag = self._tag_of(self._long_id)
        if self._long_id_len > self.limits.max_id_line:
            self._long_id = None
            self._refuse(Bad(tag, "line too long", "TOOBIG"))
            self._skip_line = nl < 0 and not self._dead
            return True
        if nl < 0:
            return False
        prefix, self._long_id = self._long_id, None
        if _LITERAL_AT_END.search(self._long_id_tail):
            # a literal would follow a line we did not keep: nothing to parse it into
            self._refuse(Bad(tag, "line too long", "TOOBIG"))
        else:
            self._out.append(parse_id_prefix(prefix, tag))
        return True

    def _refuse(self, bad: Bad, discard: int = 0) -> None:
        """Refuse the command under way: skip ``discard`` octets and the rest of its line
        when the limits allow, else answer a fatal Bad and read nothing more."""
        self._reset_command()
        if not self.limits.skip_oversized:
            self._dead = True
            self._buf.clear()
            self._out.append(Bad(bad.tag, bad.reason, bad.code, fatal=True, command=bad.command))
        elif discard:
            self._discard = discard
            self._discard_bad = bad
        else:
            self._out.append(bad)

    @staticmethod
    def _command_of(line: bytes) -> str:
        """The command name of a command's first line ("UID FETCH" as FETCH), upper-case."""
        words = line.split(b" ", 3)[1:3]
        if words and words[0].upper() == b"UID":
            words = words[1:]
        name = words[0].rstrip(b"\r\n").upper() if words else b""
        return name.decode("ascii", "replace") if name.isalpha() else ""

    @staticmethod
    def _tag_of(line: bytes) -> str:
        sp = line.find(b" ")
        tag = line[:sp] if sp > 0 else b""
        if tag and all(c in TAG_CHARS for c in tag):
            return tag.decode("ascii")
        return "*"


# ---------------------------------------------------------------- cursor over one command
class _Cursor:
    def __init__(self, data: bytes) -> None:
        if data.endswith(b"\r\n"):
            data = data[:-2]
        elif data.endswith(b"\n"):
            data = data[:-1]
        self.d = data
        self.i = 0
        self.depth = 0

    def fail(self, reason: str, code: str | None = None) -> ParseError:
        return ParseError(reason, code)

    def peek(self) -> int | None:
        return self.d[self.i] if self.i < len(self.d) else None

    def at_end(self) -> bool:
        return self.i >= len(self.d)

    def end(self) -> None:
        if not self.at_end():
            raise self.fail("unexpected characters at end of command")

    def sp(self) -> None:
        if self.peek() != 0x20:
            raise self.fail("expected a space")
        self.i += 1

    def maybe(self, lit: bytes) -> bool:
        if self.d[self.i:self.i + len(lit)].upper() == lit.upper():
            self.i += len(lit)
            return True
        return False

    def expect(self, lit: bytes) -> None:
        if not self.maybe(lit):
            raise self.fail(f"expected {lit.decode()!r}")

    def chars(self, allowed: frozenset[int], what: str) -> bytes:
        j = self.i
        d = self.d
        while j < len(d) and d[j] in allowed:
            j += 1
        if j == self.i:
            raise self.fail(f"expected {what}")
        out = d[self.i:j]
        self.i = j
        return out

    def atom(self) -> str:
        return self.chars(ATOM_CHARS, "an atom").decode("ascii")

    def number(self, nz: bool = False, limit: int = 2**63 - 1) -> int:
        s = self.chars(frozenset(b"0123456789"), "a number")
        if len(s) > 20:
            raise self.fail("number too large")
        n = int(s)
        if n > limit or (nz and n == 0):
            raise self.fail("number out of range")
        return n

    def quoted(self) -> bytes:
        d = self.d
        assert d[self.i] == 0x22
        j = self.i + 1
        out = bytearray()
        while j < len(d):
            c = d[j]
            if c == 0x22:
                self.i = j + 1
                return bytes(out)
            if c == 0x5C:
                if j + 1 < len(d) and d[j + 1] in (0x22, 0x5C):
                    out.append(d[j + 1])
                    j += 2
                    continue
                raise self.fail("bad escape in quoted string")
            if c in (0x0D, 0x0A, 0x00):
                raise self.fail("CR, LF or NUL in quoted string")
            out.append(c)
            j += 1
        raise self.fail("unterminated quoted string")

    def literal(self) -> bytes:
        m = _LITERAL.match(self.d, self.i)
        if m is None:
            raise self.fail("bad literal")
        n = int(m.group(1))
        start = m.end()
        if start + n > len(self.d):
            raise self.fail("literal shorter than announced")
        self.i = start + n
        return self.d[start:start + n]

    def string(self) -> bytes:
        c = self.peek()
        if c == 0x22:
            return self.quoted()
        if c == 0x7B:
            return self.literal()
        raise self.fail("expected a string")

    def astring(self) -> bytes:
        c = self.peek()
        if c in (0x22, 0x7B):
            return self.string()
        return self.chars(ASTRING_CHARS, "a string")

    def nstring(self) -> bytes | None:
        if self.d[self.i:self.i + 3].upper() == b"NIL" and (
                self.i + 3 >= len(self.d) or self.d[self.i + 3] not in ATOM_CHARS):
            self.i += 3
            return None
        return self.string()

    def list_mailbox(self) -> bytes:
        c = self.peek()
        if c in (0x22, 0x7B):
            return self.string()
        return self.chars(LIST_CHARS, "a mailbox pattern")

    def seqset(self, saved: bool = False) -> SeqSet:
        """sequence-set (RFC 3501 §9); with ``saved`` also ``$`` (RFC 5182 §4:
        seq-last-command), returned as ``SAVED``."""
        if saved and self.peek() == 0x24:
            self.i += 1
            return SAVED
        out: list[tuple[int | None, int | None]] = []
        while True:
            a = self._seqnum()
            b = a
            if self.peek() == 0x3A:
                self.i += 1
                b = self._seqnum()
            out.append((a, b))
            if len(out) > 100_000:
                raise self.fail("sequence set too long")
            if self.peek() != 0x2C:
                return tuple(out)
            self.i += 1

    def _seqnum(self) -> int | None:
        if self.peek() == 0x2A:
            self.i += 1
            return None
        return self.number(nz=True, limit=4294967295)

    def flag(self) -> str:
        if self.peek() == 0x5C:
            self.i += 1
            if self.peek() == 0x2A:
                self.i += 1
                return "\\*"
            return "\\" + self.atom()
        return self.atom()

    def flag_list(self) -> tuple[str, ...]:
        self.expect(b"(")
        flags: list[str] = []
        while self.peek() != 0x29:
            if flags:
                self.sp()
            flags.append(self.flag())
            if self.at_end():
                raise self.fail("unterminated flag list")
        self.i += 1
        return tuple(flags)

    def paren_atoms(self) -> tuple[str, ...]:
        self.expect(b"(")
        out: list[str] = []
        while self.peek() != 0x29:
            if out:
                self.sp()
            out.append(self.atom().upper())
            if self.at_end():
                raise self.fail("unterminated list")
        self.i += 1
        return tuple(out)

    def date(self) -> str:
        """date (RFC 3501 §9) as ISO ``YYYY-MM-DD``."""
        q = self.peek() == 0x22
        if q:
            self.i += 1
        m = _DATE.match(self.d, self.i)
        if m is None:
            raise self.fail("bad date")
        self.i = m.end()
        if q:
            self.expect(b'"')
        day, mon, year = int(m.group(1)), m.group(2).decode().lower(), int(m.group(3))
        if mon not in _MONTHS:
            raise self.fail("bad month")
        try:
            return datetime(year, _MONTHS.index(mon) + 1, day).date().isoformat()
        except ValueError:
            raise self.fail("bad date") from None

    def date_time(self) -> datetime:
        """date-time: "dd-Mon-yyyy hh:mm:ss +zzzz" (RFC 3501 §9)."""
        m = _DATE_TIME.match(self.d, self.i)
        if m is None:
            raise self.fail("bad date-time")
        self.i = m.end()
        mon = m.group(2).decode().lower()
        if mon not in _MONTHS:
            raise self.fail("bad month")
        off = timedelta(hours=int(m.group(8)), minutes=int(m.group(9)))
        if m.group(7) == b"-":
            off = -off
        try:
            return datetime(int(m.group(3)), _MONTHS.index(mon) + 1, int(m.group(1)),
                            int(m.group(4)), int(m.group(5)), int(m.group(6)),
                            tzinfo=timezone(off))
        except ValueError:
            raise self.fail("bad date-time") from None


# ---------------------------------------------------------------- command grammar
def parse_command(data: bytes, tag: str | None = None) -> Command | Bad:
    """Parse one complete command (its lines and literal data, as received). Never raises."""
    c = _Cursor(data)
    try:
        t = c.chars(TAG_CHARS, "a tag").decode("ascii")
    except ParseError:
        return Bad(tag or "*", "missing or invalid tag")
    try:
        c.sp()
        name = c.atom().upper()
        uid = False
        if name == "UID":
            c.sp()
            name = c.atom().upper()
            if name not in ("FETCH", "SEARCH", "SORT", "THREAD", "STORE", "COPY", "MOVE",
                            "EXPUNGE"):
                raise c.fail(f"UID {name} is not a command")
            uid = True
        fn = _COMMANDS.get(name)
        if fn is None:
            raise c.fail(f"unknown command {name[:40]}")
        cmd = fn(c, t, uid)
        c.end()
        return cmd
    except ParseError as exc:
        return Bad(t, exc.reason, exc.code, saves=exc.saves)
    except RecursionError:
        return Bad(t, "nested too deeply")


_Parse = Callable[["_Cursor", str, bool], Command]


def _simple(cls: Callable[[str], Command]) -> _Parse:
    def parse(c: _Cursor, tag: str, uid: bool) -> Command:
        return cls(tag)
    return parse


def _login(c: _Cursor, tag: str, uid: bool) -> Login:
    c.sp()
    user = c.astring()
    c.sp()
    return Login(tag, user, c.astring())


def _authenticate(c: _Cursor, tag: str, uid: bool) -> Authenticate:
    c.sp()
    mech = c.atom().upper()
    initial = None
    if not c.at_end():
        c.sp()
        if c.maybe(b"="):
            initial = b"="
        else:
            initial = c.chars(frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                                        b"0123456789+/="), "a base64 response")
    return Authenticate(tag, mech, initial)


def _mailbox_cmd(cls: Callable[[str, bytes], Command]) -> _Parse:
    def parse(c: _Cursor, tag: str, uid: bool) -> Command:
        c.sp()
        return cls(tag, c.astring())
    return parse


def _select(readonly: bool) -> _Parse:
    def parse(c: _Cursor, tag: str, uid: bool) -> Select:
        c.sp()
        mbox = c.astring()
        condstore = False
        qresync: QResync | None = None
        if not c.at_end():
            c.sp()
            c.expect(b"(")
            while True:
                p = c.atom().upper()
                if p == "CONDSTORE" and not condstore:
                    condstore = True
                elif p == "QRESYNC" and qresync is None:
                    c.sp()
                    qresync = _qresync_param(c)
                else:
                    raise c.fail(f"unsupported select parameter {p[:40]}")
                if c.maybe(b")"):
                    break
                c.sp()
        return Select(tag, mbox, readonly, condstore, qresync)
    return parse


def _qresync_param(c: _Cursor) -> QResync:
    """"(" uidvalidity SP mod-sequence-value [SP known-uids] [SP seq-match-data] ")"
    (RFC 7162 §7)."""
    c.expect(b"(")
    uidvalidity = c.number(nz=True, limit=4294967295)
    c.sp()
    modseq = c.number()
    known: SeqSet | None = None
    match: tuple[SeqSet, SeqSet] | None = None
    if c.maybe(b" "):
        if c.peek() != 0x28:
            known = c.seqset()
            if c.maybe(b" "):
                match = _seq_match(c)
        else:
            match = _seq_match(c)
    c.expect(b")")
    return QResync(uidvalidity, modseq, known, match)


def _seq_match(c: _Cursor) -> tuple[SeqSet, SeqSet]:
    c.expect(b"(")
    seqs = c.seqset()
    c.sp()
    uids = c.seqset()
    c.expect(b")")
    return seqs, uids


def _create(c: _Cursor, tag: str, uid: bool) -> Create:
    c.sp()
    mbox = c.astring()
    use: tuple[str, ...] = ()
    if not c.at_end():
        c.sp()
        c.expect(b"(")
        c.expect(b"USE")
        c.sp()
        use = c.flag_list()
        c.expect(b")")
    return Create(tag, mbox, use)


def _rename(c: _Cursor, tag: str, uid: bool) -> Rename:
    c.sp()
    old = c.astring()
    c.sp()
    return Rename(tag, old, c.astring())


def _list(lsub: bool) -> _Parse:
    def parse(c: _Cursor, tag: str, uid: bool) -> ListCmd:
        c.sp()
        select_opts: tuple[str, ...] = ()
        if not lsub and c.peek() == 0x28:
            select_opts = c.paren_atoms()
            c.sp()
        ref = c.astring() if c.peek() != 0x22 else c.string()
        c.sp()
        pats: list[bytes] = []
        if not lsub and c.peek() == 0x28:
            c.i += 1
            while c.peek() != 0x29:
                if pats:
                    c.sp()
                pats.append(c.list_mailbox())
                if c.at_end():
                    raise c.fail("unterminated pattern list")
            c.i += 1
        else:
            pats.append(c.list_mailbox())
        ret: tuple[str, ...] = ()
        if not lsub and not c.at_end():
            c.sp()
            c.expect(b"RETURN")
            c.sp()
            ret = _return_opts(c)
        for opt in select_opts:  # RFC 5258 §3.1, RFC 6154 §3
            if opt not in ("SUBSCRIBED", "REMOTE", "RECURSIVEMATCH", "SPECIAL-USE"):
                raise c.fail(f"unsupported LIST selection option {opt[:20]}")
        if "RECURSIVEMATCH" in select_opts and not {"SUBSCRIBED", "SPECIAL-USE"} & set(
                select_opts):  # RFC 5258 §3.1: never alone, nor with REMOTE only
            raise c.fail("RECURSIVEMATCH needs another selection option")
        for opt in ret:
            if opt.split(".")[0] not in ("SUBSCRIBED", "CHILDREN", "SPECIAL-USE", "STATUS"):
                raise c.fail(f"unsupported LIST return option {opt[:20]}")
        return ListCmd(tag, ref, tuple(pats), lsub, select_opts, ret)
    return parse


def _return_opts(c: _Cursor) -> tuple[str, ...]:
    # RETURN (SPECIAL-USE CHILDREN STATUS (MESSAGES UNSEEN)): keep the option names
    c.expect(b"(")
    out: list[str] = []
    while c.peek() != 0x29:
        if out:
            c.sp()
        out.append(c.atom().upper())
        if c.peek() == 0x20 and c.d[c.i + 1:c.i + 2] == b"(":
            c.sp()
            out.extend("STATUS." + x for x in c.paren_atoms())
        if c.at_end():
            raise c.fail("unterminated RETURN list")
    c.i += 1
    return tuple(out)


def _status(c: _Cursor, tag: str, uid: bool) -> Status:
    c.sp()
    mbox = c.astring()
    c.sp()
    items = c.paren_atoms()
    if not items:
        raise c.fail("no status items")
    for it in items:
        if it not in ("MESSAGES", "RECENT", "UIDNEXT", "UIDVALIDITY", "UNSEEN",
                      "HIGHESTMODSEQ", "SIZE", "DELETED", "APPENDLIMIT"):  # RFC 7889 §3.1
            raise c.fail(f"unknown status item {it}")
    return Status(tag, mbox, items)


def _append(c: _Cursor, tag: str, uid: bool) -> Append:
    # append = "APPEND" SP mailbox 1*(SP append-message)  (RFC 3502 §6)
    c.sp()
    mbox = c.astring()
    items: list[AppendItem] = []
    while not items or not c.at_end():
        c.sp()
        flags: tuple[str, ...] = ()
        date = None
        if c.peek() == 0x28:
            flags = c.flag_list()
            c.sp()
        if c.peek() == 0x22:
            date = c.date_time()
            c.sp()
        if c.maybe(b"CATENATE "):  # RFC 4469 §5
            items.append(AppendItem(flags, date, b"", parts=_cat_parts(c)))
            continue
        binary = c.d[c.i:c.i + 2] == b"~{"  # literal8 (RFC 3516 §4.4)
        if c.peek() != 0x7B and not binary:
            raise c.fail("expected a literal")
        items.append(AppendItem(flags, date, c.literal(), binary))
    first = items[0]
    return Append(tag, mbox, first.flags, first.date, first.message, first.binary,
                  tuple(items[1:]), first.parts)


MAX_CAT_PARTS = 1000  # parts of one CATENATE (RFC 4469 sets none; each is a literal or URL)


def _cat_parts(c: _Cursor) -> tuple[CatPart, ...]:
    # "(" cat-part *(SP cat-part) ")"; cat-part = text-literal / url (RFC 4469 §5)
    c.expect(b"(")
    parts: list[CatPart] = []
    while True:
        if c.maybe(b"TEXT "):
            if c.peek() != 0x7B:
                raise c.fail("expected a literal")
            parts.append(CatText(c.literal()))
        elif c.maybe(b"URL "):
            parts.append(CatUrl(c.astring().decode("utf-8", "replace")))
        else:
            raise c.fail("expected TEXT or URL")
        if len(parts) > MAX_CAT_PARTS:
            raise c.fail("too many CATENATE parts", "LIMIT")
        if c.peek() == 0x29:
            c.i += 1
            return tuple(parts)
        c.sp()


@dataclass(frozen=True)
class MessageUrl:
    """The message or part an IMAP URL names (RFC 5092 §6 imessagepart)."""

    mailbox: str  # decoded (UTF-8)
    uid: int
    uidvalidity: int | None = None
    section: str = ""  # as in BODY[section], upper-case; "" the whole message
    partial: tuple[int, int | None] | None = None  # offset and length (RFC 5092 §6)
    user: str | None = None  # the userinfo of an absolute URL


_URL_PARAM = re.compile(r"(?i)(UIDVALIDITY|UID|SECTION|PARTIAL)=(.*)\Z", re.DOTALL)
_PCT = re.compile(r"%([0-9A-Fa-f]{2})")


def _pct_decode(s: str) -> str | None:
    if re.search(r"%(?![0-9A-Fa-f]{2})", s):
        return None
    try:
        return _PCT.sub(lambda m: chr(int(m.group(1), 16)), s).encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return None


def parse_message_url(url: str) -> MessageUrl | None:
    """A CATENATE URL (RFC 4469 §5, RFC 5092 §6): an absolute ``imap://`` URL or an absolute
    path, naming a message by mailbox, UID and optionally UIDVALIDITY, a section and a
    partial range. None when it is not one (URLAUTH-authorised URLs included: RFC 4467 is
    not offered)."""
    user: str | None = None
    if url[:7].lower() == "imap://":
        authority, slash, path = url[7:].partition("/")
        if not slash:
            return None
        if "@" in authority:
            userinfo = authority.rsplit("@", 1)[0]
            name = _pct_decode(userinfo.split(";", 1)[0])  # ";AUTH=..." dropped
            if name is None:
                return None
            user = name or None
        url = "/" + path
    if not url.startswith("/"):
        return None
    segments = url[1:].split("/;")
    head = segments[0].split(";")
    mailbox = _pct_decode(head[0])
    if not mailbox:
        return None
    params: dict[str, str] = {}
    for item in head[1:]:
        m = _URL_PARAM.match(item)
        if m is None or m.group(1).upper() != "UIDVALIDITY":
            return None
        params["UIDVALIDITY"] = m.group(2)
    order = ["UID", "SECTION", "PARTIAL"]
    for seg in segments[1:]:
        m = _URL_PARAM.match(seg)
        if m is None:
            return None
        key = m.group(1).upper()
        if key not in order:  # each at most once, in this order
            return None
        order = order[order.index(key) + 1:]
        params[key] = m.group(2)
    try:
        uid = int(params["UID"]) if params.get("UID", "").isdigit() else 0
        uidvalidity = params.get("UIDVALIDITY")
        if uid < 1 or (uidvalidity is not None and not (
                uidvalidity.isdigit() and int(uidvalidity) > 0)):
            return None
        partial: tuple[int, int | None] | None = None
        if "PARTIAL" in params:
            start, dot, length = params["PARTIAL"].partition(".")
            if not start.isdigit() or (dot and not (length.isdigit() and int(length) > 0)):
                return None
            partial = (int(start), int(length) if dot else None)
    except ValueError:
        return None
    section = _pct_decode(params.get("SECTION", ""))
    if section is None:
        return None
    return MessageUrl(mailbox, uid, int(uidvalidity) if uidvalidity else None,
                      section.upper(), partial, user)


def _id(c: _Cursor, tag: str, uid: bool, truncated: bool = False) -> IdCmd:
    c.sp()
    if c.maybe(b"NIL"):
        return IdCmd(tag, None)
    c.expect(b"(")
    params: list[tuple[str, str | None]] = []
    while c.peek() != 0x29:
        try:
            if params:
                c.sp()
            k = c.string()
            c.sp()
            v = c.nstring()
        except ParseError:
            if not truncated:
                raise
            # the pair the prefix cut (or one we cannot see whole): the rest of the line
            # was dropped unseen, so nothing after it can be checked either
            c.i = len(c.d)
            return IdCmd(tag, tuple(params), truncated)
        params.append((k.decode("utf-8", "replace")[:30],
                       None if v is None else v.decode("utf-8", "replace")[:1024]))
        if len(params) > 30:
            raise c.fail("bad ID parameter list")  # RFC 2971 §3.3: at most 30 pairs
        if c.at_end():
            if not truncated:
                raise c.fail("bad ID parameter list")
            return IdCmd(tag, tuple(params), truncated)
    c.i += 1
    return IdCmd(tag, tuple(params), truncated)


def parse_id_prefix(prefix: bytes, tag: str) -> IdCmd | Bad:
    """The kept first octets of an ID line too long to keep whole: the ID with the pairs
    complete in them (``truncated``), or Bad when even that much is not an ID command."""
    c = _Cursor(prefix.removesuffix(b"\r"))
    try:
        c.chars(TAG_CHARS, "a tag")
        c.sp()
        c.expect(b"ID")
        cmd = _id(c, tag, False, truncated=True)
        c.end()  # only a prefix that closed its list early has anything left
        return cmd
    except ParseError as exc:
        return Bad(tag, exc.reason, exc.code)


def _enable(c: _Cursor, tag: str, uid: bool) -> Enable:
    caps: list[str] = []
    while not c.at_end():
        c.sp()
        caps.append(c.atom().upper())
    if not caps:
        raise c.fail("ENABLE needs a capability")
    return Enable(tag, tuple(caps))


def _compress(c: _Cursor, tag: str, uid: bool) -> Compress:
    # RFC 4978 §5: compress = "COMPRESS" SP algorithm; algorithm = "DEFLATE"
    c.sp()
    return Compress(tag, c.atom().upper())


def _expunge(c: _Cursor, tag: str, uid: bool) -> Expunge:
    if uid:
        c.sp()
        return Expunge(tag, c.seqset(saved=True))
    return Expunge(tag)


def _copy(move: bool) -> _Parse:
    def parse(c: _Cursor, tag: str, uid: bool) -> Copy:
        c.sp()
        s = c.seqset(saved=True)
        c.sp()
        return Copy(tag, uid, s, c.astring(), move)
    return parse


def _store(c: _Cursor, tag: str, uid: bool) -> StoreCmd:
    c.sp()
    s = c.seqset(saved=True)
    c.sp()
    unchanged = None
    if c.peek() == 0x28:
        c.i += 1
        c.expect(b"UNCHANGEDSINCE")
        c.sp()
        unchanged = c.number()
        c.expect(b")")
        c.sp()
    mode = "set"
    if c.maybe(b"+"):
        mode = "add"
    elif c.maybe(b"-"):
        mode = "remove"
    c.expect(b"FLAGS")
    silent = c.maybe(b".SILENT")
    c.sp()
    if c.peek() == 0x28:
        flags = c.flag_list()
    else:
        fl = [c.flag()]
        while not c.at_end():
            c.sp()
            fl.append(c.flag())
        flags = tuple(fl)
    return StoreCmd(tag, uid, s, mode, silent, flags, unchanged)


_SIMPLE_ATTS = ("FLAGS", "UID", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODYSTRUCTURE",
                "RFC822.HEADER", "RFC822.TEXT", "RFC822", "MODSEQ", "BODY")
_MACROS = {
    "ALL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"),
    "FAST": ("FLAGS", "INTERNALDATE", "RFC822.SIZE"),
    "FULL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"),
}


def _section(c: _Cursor) -> tuple[str, str, tuple[str, ...]]:
    """section-spec inside [...] (RFC 3501 §9); the cursor is after '['."""
    m = _SECTION_PART.match(c.d, c.i)
    assert m is not None
    part = m.group(1).decode() if m.group(1) else ""
    c.i = m.end()
    text = ""
    fields: tuple[str, ...] = ()
    if part and c.peek() == 0x2E:
        c.i += 1
        if c.maybe(b"MIME"):
            text = "MIME"
        elif c.peek() not in (0x48, 0x68, 0x54, 0x74):
            raise c.fail("bad section")
    elif part and c.peek() != 0x5D:
        raise c.fail("bad section")
    if not text and c.peek() != 0x5D:
        if c.maybe(b"HEADER.FIELDS.NOT"):
            text = "HEADER.FIELDS.NOT"
        elif c.maybe(b"HEADER.FIELDS"):
            text = "HEADER.FIELDS"
        elif c.maybe(b"HEADER"):
            text = "HEADER"
        elif c.maybe(b"TEXT"):
            text = "TEXT"
        else:
            raise c.fail("bad section")
        if text.startswith("HEADER.FIELDS"):
            c.sp()
            c.expect(b"(")
            names: list[str] = []
            while c.peek() != 0x29:
                if names:
                    c.sp()
                names.append(c.astring().decode("ascii", "replace"))
                if c.at_end() or len(names) > 500:
                    raise c.fail("bad header list")
            c.i += 1
            if not names:
                raise c.fail("empty header list")
            fields = tuple(names)
    c.expect(b"]")
    return part, text, fields


def _partial(c: _Cursor) -> tuple[int, int] | None:
    """``<start.count>`` after a section, if there is one: number64 "." nz-number64
    (RFC 9051 §9 partial, Appendix D; RFC 3501 had 32-bit numbers, a subset)."""
    if c.peek() != 0x3C:
        return None
    c.i += 1
    start = c.number()
    c.expect(b".")
    count = c.number(nz=True)
    c.expect(b">")
    return start, count


def _fetch_att(c: _Cursor) -> FetchAtt:
    for name in ("BODY.PEEK[", "BODY[", "BINARY.PEEK[", "BINARY.SIZE[", "BINARY["):
        if c.maybe(name.encode()):
            if name.startswith("BINARY"):
                # section-binary = "[" [section-part] "]" (RFC 3516 §6)
                m = _SECTION_PART.match(c.d, c.i)
                assert m is not None
                c.i = m.end()
                c.expect(b"]")
                part: tuple[str, str, tuple[str, ...]] = (
                    m.group(1).decode() if m.group(1) else "", "", ())
                if name == "BINARY.SIZE[":
                    return FetchAtt("BINARY.SIZE", part)
                return FetchAtt("BINARY[]", part, _partial(c), peek=name == "BINARY.PEEK[")
            sec = _section(c)
            return FetchAtt("BODY[]", sec, _partial(c), peek=name.startswith("BODY.PEEK"))
    a = c.chars(ATOM_CHARS, "a fetch attribute").decode("ascii").upper()
    if a not in _SIMPLE_ATTS:
        raise c.fail(f"unknown fetch attribute {a[:40]}")
    return FetchAtt(a)


def _fetch(c: _Cursor, tag: str, uid: bool) -> Fetch:
    c.sp()
    s = c.seqset(saved=True)
    c.sp()
    atts: list[FetchAtt] = []
    macro = None
    if c.peek() == 0x28:
        c.i += 1
        while c.peek() != 0x29:
            if atts:
                c.sp()
            atts.append(_fetch_att(c))
            if c.at_end() or len(atts) > 100:
                raise c.fail("bad fetch attribute list")
        c.i += 1
    else:
        save = c.i
        word = c.chars(ATOM_CHARS, "a fetch attribute").decode("ascii").upper()
        if word in _MACROS:
            macro = word
            atts = [FetchAtt(x) for x in _MACROS[word]]
        else:
            c.i = save
            atts = [_fetch_att(c)]
    changedsince = None
    vanished = False
    if not c.at_end():
        c.sp()
        c.expect(b"(")
        while True:  # fetch-modifier *(SP fetch-modifier), each at most once
            if changedsince is None and c.maybe(b"CHANGEDSINCE "):
                changedsince = c.number()
            elif not vanished and c.maybe(b"VANISHED"):
                vanished = True
            else:
                raise c.fail("unknown or repeated fetch modifier")
            if c.maybe(b")"):
                break
            c.sp()
    if not atts:
        raise c.fail("no fetch attributes")
    if vanished and (not uid or changedsince is None):
        # RFC 7162 §3.2.6: only with UID FETCH, and only together with CHANGEDSINCE
        raise c.fail("VANISHED needs UID FETCH and CHANGEDSINCE")
    return Fetch(tag, uid, s, tuple(atts), changedsince, macro, vanished)


_FLAG_KEYS = {
    "ANSWERED": ("flag", "\\Answered"), "DELETED": ("flag", "\\Deleted"),
    "DRAFT": ("flag", "\\Draft"), "FLAGGED": ("flag", "\\Flagged"), "SEEN": ("flag", "\\Seen"),
    "RECENT": ("flag", "\\Recent"),
    "UNANSWERED": ("unflag", "\\Answered"), "UNDELETED": ("unflag", "\\Deleted"),
    "UNDRAFT": ("unflag", "\\Draft"), "UNFLAGGED": ("unflag", "\\Flagged"),
    "UNSEEN": ("unflag", "\\Seen"), "OLD": ("unflag", "\\Recent"),
}
_STRING_KEYS = ("BCC", "BODY", "CC", "FROM", "SUBJECT", "TEXT", "TO")
_DATE_KEYS = ("BEFORE", "ON", "SINCE", "SENTBEFORE", "SENTON", "SENTSINCE")
_ARG_KEYS = frozenset(_STRING_KEYS + _DATE_KEYS + (
    "KEYWORD", "UNKEYWORD", "LARGER", "SMALLER", "HEADER", "UID", "NOT", "OR", "MODSEQ"))


def _search_key(c: _Cursor, charset: str) -> SearchNode:
    c.depth += 1
    if c.depth > MAX_DEPTH:
        raise c.fail("search program nested too deeply")
    try:
        p = c.peek()
        if p == 0x28:
            c.i += 1
            keys = [_search_key(c, charset)]
            while c.peek() == 0x20:
                c.i += 1
                keys.append(_search_key(c, charset))
            c.expect(b")")
            return SearchNode("and", children=tuple(keys))
        if p is not None and (0x30 <= p <= 0x39 or p == 0x2A):
            return SearchNode("seq", seqset=c.seqset())
        if p == 0x24:  # "$": the saved result (RFC 5182 §2.1)
            return SearchNode("seq", seqset=c.seqset(saved=True))
        word = c.atom().upper()

        def text() -> str:
            return c.astring().decode(charset, "replace")

        if word == "ALL":
            return SearchNode("all")
        if word == "NEW":
            return SearchNode("and", children=(SearchNode("flag", ("\\Recent",)),
                                               SearchNode("unflag", ("\\Seen",))))
        if word in _FLAG_KEYS:
            op, flag = _FLAG_KEYS[word]
            return SearchNode(op, (flag,))
        if word not in _ARG_KEYS:
            raise c.fail(f"unknown search key {word[:40]}")
        c.sp()
        if word in ("KEYWORD", "UNKEYWORD"):
            return SearchNode("flag" if word == "KEYWORD" else "unflag", (c.atom(),))
        if word in _STRING_KEYS:
            return SearchNode(word.lower(), (text(),))
        if word in _DATE_KEYS:
            return SearchNode(word.lower(), (c.date(),))
        if word in ("LARGER", "SMALLER"):
            return SearchNode(word.lower(), (str(c.number(limit=2**63 - 1)),))
        if word == "HEADER":
            name = c.astring().decode("ascii", "replace")
            c.sp()
            return SearchNode("header", (name, text()))
        if word == "UID":
            return SearchNode("uid", seqset=c.seqset(saved=True))
        if word == "NOT":
            return SearchNode("not", children=(_search_key(c, charset),))
        if word == "OR":
            a = _search_key(c, charset)
            c.sp()
            return SearchNode("or", children=(a, _search_key(c, charset)))
        if word == "MODSEQ":
            if c.peek() == 0x22:  # entry-name and entry-type-req (RFC 7162 §3.1.5)
                c.quoted()
                c.sp()
                c.atom()
                c.sp()
            return SearchNode("modseq", (str(c.number()),))
        raise c.fail(f"unknown search key {word[:40]}")
    finally:
        c.depth -= 1


def _search(c: _Cursor, tag: str, uid: bool) -> Search:
    c.sp()
    ret: tuple[str, ...] | None = None
    partial = None
    if c.maybe(b"RETURN "):
        ret, partial = _search_return(c, "search")
        c.sp()
    charset = None
    if c.maybe(b"CHARSET "):
        charset = c.astring().decode("ascii", "replace").upper()
        c.sp()
    py_charset = {"UTF-8": "utf-8", "US-ASCII": "ascii"}.get(charset or "UTF-8")
    if py_charset is None:
        raise ParseError(f"unsupported charset {charset}", "BADCHARSET (UTF-8 US-ASCII)",
                         saves=ret is not None and "SAVE" in ret)
    keys = [_search_key(c, py_charset if py_charset != "ascii" else "utf-8")]
    while not c.at_end():
        c.sp()
        keys.append(_search_key(c, "utf-8"))
    return Search(tag, uid, charset, SearchNode("and", children=tuple(keys)), ret, partial)


_PARTIAL_CHARS = frozenset(b"0123456789:*-")


def parse_partial(text: str) -> tuple[int, int] | None:
    """partial-range = nz-number ":" nz-number (RFC 5267 §4.4, §5). A range given high to
    low is put in order, as Dovecot does; one number, ``*``, 0 and the negative ranges of
    RFC 9394 are None (the command is BAD)."""
    lo_s, colon, hi_s = text.partition(":")
    if not (colon and lo_s.isascii() and lo_s.isdigit() and hi_s.isascii() and hi_s.isdigit()
            ) or max(len(lo_s), len(hi_s)) > 10:
        return None
    lo, hi = int(lo_s), int(hi_s)
    if not (0 < lo <= 4294967295 and 0 < hi <= 4294967295):
        return None
    return (lo, hi) if lo <= hi else (hi, lo)


def _search_return(c: _Cursor, what: str) -> tuple[tuple[str, ...], tuple[int, int] | None]:
    """RETURN (...) of SEARCH (RFC 4731 §3.1, RFC 5267 §4) or SORT (RFC 5267 §3): the
    option names, upper-case, and PARTIAL's range. UPDATE only for SEARCH: CONTEXT=SORT is
    not offered. Repeated UPDATE or PARTIAL, or PARTIAL with ALL, is BAD (as Dovecot)."""
    allowed = ("MIN", "MAX", "ALL", "COUNT", "CONTEXT", "PARTIAL") + (
        ("UPDATE", "SAVE") if what == "search" else ())  # SAVE: RFC 5182 §2.1
    c.expect(b"(")
    opts: list[str] = []
    partial: tuple[int, int] | None = None
    while c.peek() != 0x29:
        if opts:
            c.sp()
        opt = c.atom().upper()
        if opt not in allowed:
            raise c.fail(f"unsupported {what} return option {opt[:20]}")
        if opt in ("UPDATE", "PARTIAL", "SAVE") and opt in opts:
            raise c.fail(f"{opt} given twice in the {what} return options")
        if opt == "PARTIAL":
            c.sp()
            rng = c.chars(_PARTIAL_CHARS, "a partial range").decode("ascii")
            partial = parse_partial(rng)
            if partial is None:
                raise c.fail(f"invalid partial range {rng[:24]}")
        opts.append(opt)
        if c.at_end():
            raise c.fail("unterminated return option list")
    c.i += 1
    if partial is not None and "ALL" in opts:
        raise c.fail("PARTIAL conflicts with ALL")
    return tuple(opts), partial


_SORT_KEYS = ("ARRIVAL", "CC", "DATE", "FROM", "SIZE", "SUBJECT", "TO",  # RFC 5256 §3
              "DISPLAYFROM", "DISPLAYTO")  # RFC 5957 §3


def _sort(c: _Cursor, tag: str, uid: bool) -> Sort:
    c.sp()
    ret: tuple[str, ...] | None = None
    partial = None
    if c.maybe(b"RETURN "):
        ret, partial = _search_return(c, "sort")
        c.sp()
    words = c.paren_atoms()
    if not words:
        raise c.fail("empty sort criteria")
    criteria: list[SortKey] = []
    reverse = False
    for w in words:
        if w == "REVERSE" and not reverse:
            reverse = True
            continue
        if w not in _SORT_KEYS:
            raise c.fail(f"unknown sort key {w[:20]}")
        criteria.append(SortKey(w, reverse))
        reverse = False
    if reverse:
        raise c.fail("REVERSE without a sort key")
    c.sp()
    charset = c.astring().decode("ascii", "replace").upper()  # mandatory in SORT (§4)
    py_charset = {"UTF-8": "utf-8", "US-ASCII": "utf-8"}.get(charset)
    if py_charset is None:
        raise c.fail(f"unsupported charset {charset[:40]}", "BADCHARSET (UTF-8 US-ASCII)")
    keys: list[SearchNode] = []
    while not c.at_end():
        c.sp()
        keys.append(_search_key(c, py_charset))
    if not keys:
        raise c.fail("missing search criteria")
    return Sort(tag, uid, tuple(criteria), charset, SearchNode("and", children=tuple(keys)), ret,
                partial)


THREAD_ALGORITHMS = ("ORDEREDSUBJECT", "REFERENCES")  # RFC 5256 §3


def _thread(c: _Cursor, tag: str, uid: bool) -> ThreadCmd:
    c.sp()
    algorithm = c.atom().upper()
    if algorithm not in THREAD_ALGORITHMS:
        raise c.fail(f"unknown threading algorithm {algorithm[:20]}")
    c.sp()
    charset = c.astring().decode("ascii", "replace").upper()  # mandatory, as in SORT
    if charset not in ("UTF-8", "US-ASCII"):
        raise c.fail(f"unsupported charset {charset[:40]}", "BADCHARSET (UTF-8 US-ASCII)")
    keys: list[SearchNode] = []
    while not c.at_end():
        c.sp()
        keys.append(_search_key(c, "utf-8"))
    if not keys:
        raise c.fail("missing search criteria")
    return ThreadCmd(tag, uid, algorithm, charset, SearchNode("and", children=tuple(keys)))


def _cancelupdate(c: _Cursor, tag: str, uid: bool) -> CancelUpdate:
    """CANCELUPDATE 1*(SP quoted) (RFC 5267 §5); a literal is taken too, as Dovecot does."""
    tags: list[str] = []
    while not c.at_end():
        c.sp()
        tags.append(c.string().decode("utf-8", "replace"))
        if len(tags) > 100:
            raise c.fail("too many tags")
    if not tags:
        raise c.fail("CANCELUPDATE needs a tag")
    return CancelUpdate(tag, tuple(tags))


def _notify(c: _Cursor, tag: str, uid: bool) -> Notify:
    """notify = "NOTIFY" SP (notify-set / notify-none) (RFC 5465 §8), with the rules of §5
    and §6.1 that make a request BAD: MessageNew and MessageExpunge only together,
    FlagChange and AnnotationChange only with both, one selected filter, only message
    events with it, fetch attributes only with it."""
    c.sp()
    verb = c.atom().upper()
    if verb == "NONE":
        return Notify(tag, None)
    if verb != "SET":
        raise c.fail("NOTIFY SET or NOTIFY NONE")
    c.sp()
    status = c.maybe(b"STATUS ")
    groups: list[NotifyGroup] = []
    names = 0
    while True:
        groups.append(_notify_group(c))
        names += len(groups[-1].mailboxes)
        if names > MAX_NOTIFY_NAMES or len(groups) > 100:
            raise c.fail("too many NOTIFY event groups or mailbox names")
        if c.at_end():
            break
        c.sp()
    if sum(g.filter.startswith("selected") for g in groups) > 1:
        raise c.fail("only one selected or selected-delayed filter")
    return Notify(tag, tuple(groups), status)


def _notify_group(c: _Cursor) -> NotifyGroup:
    c.expect(b"(")
    flt = c.chars(ATOM_CHARS, "a mailbox filter").decode("ascii").lower()
    if flt not in NOTIFY_FILTERS:
        raise c.fail(f"unknown NOTIFY mailbox filter {flt[:40]}")
    c.sp()
    boxes: list[bytes] = []
    if flt in ("subtree", "mailboxes"):
        if c.maybe(b"("):
            while True:
                boxes.append(c.astring())
                if len(boxes) > MAX_NOTIFY_NAMES:
                    raise c.fail("too many mailbox names")
                if c.maybe(b")"):
                    break
                c.sp()
        else:
            boxes.append(c.astring())
        c.sp()
    events: list[str] = []
    atts: list[FetchAtt] = []
    if not c.maybe(b"NONE"):
        c.expect(b"(")
        while True:
            word = c.atom()
            name = next((e for e in NOTIFY_EVENTS if e.lower() == word.lower()), word)
            if name in events:
                raise c.fail(f"{name[:40]} twice")
            events.append(name)
            if len(events) > 20:
                raise c.fail("too many events")
            if name == "MessageNew" and c.maybe(b" ("):
                while True:
                    atts.append(_fetch_att(c))
                    if len(atts) > 100:
                        raise c.fail("too many fetch attributes")
                    if c.maybe(b")"):
                        break
                    c.sp()
            if c.maybe(b")"):
                break
            c.sp()
    c.expect(b")")
    ev = set(events)
    if ("MessageNew" in ev) != ("MessageExpunge" in ev):
        raise c.fail("MessageNew and MessageExpunge go together (RFC 5465 §5)")
    if ev & {"FlagChange", "AnnotationChange"} and "MessageNew" not in ev:
        raise c.fail("FlagChange and AnnotationChange need MessageNew and MessageExpunge")
    if flt.startswith("selected") and ev & {"MailboxName", "SubscriptionChange",
                                            "MailboxMetadataChange", "ServerMetadataChange"}:
        raise c.fail("only message events with the selected filters (RFC 5465 §6.1)")
    if atts and not flt.startswith("selected"):
        raise c.fail("fetch attributes only with the selected filters (RFC 5465 §8)")
    return NotifyGroup(flt, tuple(boxes), tuple(events), tuple(atts))


_COMMANDS: dict[str, _Parse] = {
    "CAPABILITY": _simple(Capability), "NOOP": _simple(Noop), "LOGOUT": _simple(Logout),
    "STARTTLS": _simple(StartTLS), "LOGIN": _login, "AUTHENTICATE": _authenticate,
    "SELECT": _select(False), "EXAMINE": _select(True), "CREATE": _create,
    "DELETE": _mailbox_cmd(Delete), "RENAME": _rename, "SUBSCRIBE": _mailbox_cmd(Subscribe),
    "UNSUBSCRIBE": _mailbox_cmd(Unsubscribe), "LIST": _list(False), "LSUB": _list(True),
    "STATUS": _status, "APPEND": _append, "ID": _id, "ENABLE": _enable,
    "NAMESPACE": _simple(Namespace), "IDLE": _simple(Idle), "CHECK": _simple(Check),
    "CLOSE": _simple(Close), "UNSELECT": _simple(Unselect), "EXPUNGE": _expunge,
    "SEARCH": _search, "SORT": _sort, "THREAD": _thread, "FETCH": _fetch, "STORE": _store,
    "COPY": _copy(False), "MOVE": _copy(True), "GETQUOTAROOT": _mailbox_cmd(GetQuotaRoot),
    "GETQUOTA": _mailbox_cmd(GetQuota), "CANCELUPDATE": _cancelupdate, "NOTIFY": _notify,
    "COMPRESS": _compress,
}
