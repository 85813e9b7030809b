"""MIME structure of a stored message, as IMAP sees it (RFC 3501 §6.4.5, §7.4.2; RFC 2045-2047).

Pure: bytes in, values out; no asyncio, nats or boto3. ``summarize`` never raises: anything
it cannot make sense of is shown as text/plain, as Dovecot does. Byte offsets come from our
own boundary scanner (RFC 2046 §5.1.1), never from a re-serialised ``email`` object.

Wire text (``envelope``/``body``/``bodystructure``) is a ``str``; write it to the client
encoded as UTF-8: literal lengths ``{n}`` count the UTF-8 octets.
"""

from __future__ import annotations

import binascii
import codecs
import email.utils
import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from postbus.proto.mail import MessageSummary, PartSpan
from postbus.protocols.served import ends_crlf, normalize_crlf  # normalize_crlf: re-exported

__all__ = [
    "summarize", "header_fields", "section_bytes", "parse_headers", "header_block_end",
    "decode_words", "decode_bytes", "parse_tree", "Entity", "unfold", "parse_section",
    "normalize_crlf", "Section", "imap_string", "MAX_DEPTH", "MAX_PARTS", "binary_section",
    "binary_to_base64", "UnknownCTE",
]

# Dovecot bounds nesting too (message-parser: max_nested_mime_parts=100, max_total=10000);
# beyond our bounds a part is shown as text/plain and not descended into.
MAX_DEPTH = 40
MAX_PARTS = 5000
MAX_HEADER_FIELDS = 2000
MAX_PARAMS = 100  # per Content-Type / Content-Disposition

_FIELD_NAME = re.compile(rb"([!-9;-~]+)[ \t]*:")
_WSP = b" \t"


# ---------------------------------------------------------------- header parsing
def header_block_end(raw: bytes, start: int, end: int) -> int:
    """Offset where the body of the entity at ``raw[start:end]`` begins: just after the first
    empty line (CRLF or bare LF line ends); ``end`` when there is no empty line."""
    if start >= end:
        return end
    if raw.startswith(b"\r\n", start, end):
        return start + 2
    if raw[start] == 0x0A:
        return start + 1
    a = raw.find(b"\n\r\n", start, end)
    b = raw.find(b"\n\n", start, end if a < 0 else a + 2)  # only an earlier one matters
    if a < 0 and b < 0:
        return end
    if b < 0 or (0 <= a < b):
        return a + 3
    return b + 2


def parse_headers(block: bytes) -> list[tuple[str, bytes]]:
    """Header fields of a header block as (lower-case name, raw value with folding kept).

    Lines that are neither a field nor a continuation (e.g. an mbox ``From `` line) are
    skipped, as are continuation lines that follow them.
    """
    out: list[tuple[str, bytes]] = []
    cur_name: str | None = None
    cur: list[bytes] = []
    for line in block.split(b"\n"):
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            continue
        if line[0] in _WSP:
            if cur_name is not None:
                cur.append(b"\r\n" + line)
            continue
        if cur_name is not None:
            out.append((cur_name, b"".join(cur)))
            cur_name = None
            if len(out) >= MAX_HEADER_FIELDS:
                return out
        m = _FIELD_NAME.match(line)
        if m is None:
            continue
        cur_name = m.group(1).decode("ascii").lower()
        cur = [line[m.end():]]
    if cur_name is not None:
        out.append((cur_name, b"".join(cur)))
    return out


def unfold(value: bytes) -> str:
    """Unfold (RFC 5322 §2.2.3: drop CRLF, keep the WSP) and trim; 8-bit as UTF-8."""
    v = value.replace(b"\r", b"").replace(b"\n", b"").strip(b" \t")
    return v.decode("utf-8", errors="replace").replace("\x00", "")


# RFC 2047 §2: encoded-word = "=?" charset ["*" language (RFC 2231 §5)] "?" B|Q "?" text "?="
_ENCODED_WORD = re.compile(r"=\?([^?\s*]+)(?:\*[^?\s]*)?\?([bBqQ])\?([^?\s]*)\?=")
# codecs that are not charsets of mail, and whose decoders cost more than linear time
_NOT_CHARSETS = frozenset({"punycode", "idna"})


def decode_bytes(data: bytes, charset: str) -> str:
    """Bytes in a MIME charset to text: unknown or unusable charsets as UTF-8; never raises."""
    cs = charset.strip().lower() or "us-ascii"
    try:
        name = codecs.lookup(cs).name
    except LookupError:
        name = "utf-8"
    if name in _NOT_CHARSETS or name == "ascii":
        name = "utf-8"  # us-ascii text with 8-bit octets: UTF-8 is the likelier guess
    try:
        return data.decode(name, errors="replace")
    except (LookupError, TypeError, ValueError):  # a codec that is not a text encoding
        return data.decode("utf-8", errors="replace")


def _word_bytes(enc: str, text: str) -> bytes | None:
    data = text.encode("ascii", "replace")
    try:
        if enc in "bB":
            return binascii.a2b_base64(data + b"=" * (-len(data) % 4))
        return binascii.a2b_qp(data, header=True)
    except (binascii.Error, ValueError):
        return None


def decode_words(text: str) -> str:
    """Decode RFC 2047 encoded-words for searching and display, in time linear in the text
    (``email.header.decode_header`` is quadratic: 80,000 words took 7 s). Whitespace between
    adjacent encoded-words is dropped (§6.2); adjacent words in one charset are decoded
    together, so a character split across them survives. Never raises."""
    if "=?" not in text:
        return text
    out: list[str] = []
    run = bytearray()  # bytes of adjacent encoded-words in one charset
    run_cs = ""
    pos = 0
    adjacent = False
    for m in _ENCODED_WORD.finditer(text):
        data = _word_bytes(m.group(2), m.group(3))
        if data is None:
            continue  # not decodable: left as it stands
        between = text[pos:m.start()]
        cs = m.group(1).lower()
        if not (adjacent and not between.strip(" \t\r\n")) or cs != run_cs:
            if run:
                out.append(decode_bytes(bytes(run), run_cs))
                run.clear()
            if not (adjacent and not between.strip(" \t\r\n")):
                out.append(between)
        run_cs = cs
        run += data
        pos = m.end()
        adjacent = True
    if run:
        out.append(decode_bytes(bytes(run), run_cs))
    out.append(text[pos:])
    return "".join(out)


# ---------------------------------------------------------------- IMAP strings
def imap_string(s: str | None) -> str:
    """An IMAP nstring (RFC 3501 §4.3, §9): NIL, a quoted string, or a literal when the text
    has CR, LF or 8-bit characters (length in UTF-8 octets)."""
    if s is None:
        return "NIL"
    if len(s) <= 64:
        return _imap_string_short(s)
    return _imap_string(s)


@functools.lru_cache(maxsize=4096)
def _imap_string_short(s: str) -> str:  # type names, parameters, short addresses recur
    return _imap_string(s)


def _imap_string(s: str) -> str:
    s = s.replace("\x00", "")
    if s.isascii() and "\r" not in s and "\n" not in s:
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{{{len(s.encode('utf-8'))}}}\r\n{s}"


# ---------------------------------------------------------------- structured fields
def _skip_comment(s: str, i: int) -> tuple[int, str]:
    """s[i] == '('; return the index after the (nested) comment and its text."""
    depth, j, buf = 0, i, []
    while j < len(s):
        c = s[j]
        if c == "\\" and j + 1 < len(s):
            buf.append(s[j + 1])
            j += 2
            continue
        if c == "(":
            depth += 1
            if depth > 1:
                buf.append(c)
        elif c == ")":
            depth -= 1
            if depth == 0:
                return j + 1, "".join(buf)
            buf.append(c)
        else:
            buf.append(c)
        j += 1
    return j, "".join(buf)


def _read_quoted(s: str, i: int) -> tuple[int, str]:
    """s[i] == '"'; return the index after the closing quote and the unescaped content."""
    j, buf = i + 1, []
    while j < len(s):
        c = s[j]
        if c == "\\" and j + 1 < len(s):
            buf.append(s[j + 1])
            j += 2
            continue
        if c == '"':
            return j + 1, "".join(buf)
        buf.append(c)
        j += 1
    return j, "".join(buf)


_TSPECIALS = set('()<>@,;:\\"/[]?= \t')


def _parse_params(s: str, i: int) -> list[tuple[str, str]]:
    """RFC 2045 §5.1 parameters after the media type, with RFC 2231 continuations merged."""
    raw: list[tuple[str, str]] = []
    n = len(s)
    while i < n:
        c = s[i]
        if c in " \t;":
            i += 1
            continue
        if c == "(":
            i, _ = _skip_comment(s, i)
            continue
        j = i
        while j < n and s[j] not in "=;" and s[j] not in " \t":
            j += 1
        name = s[i:j]
        while j < n and s[j] in " \t":
            j += 1
        if j >= n or s[j] != "=":
            i = j + 1 if j < n and s[j] != ";" else j
            continue  # a parameter without a value: skipped
        j += 1
        while j < n and s[j] in " \t":
            j += 1
        if j < n and s[j] == '"':
            j, value = _read_quoted(s, j)
        else:
            k = j
            while k < n and s[k] not in "; \t(":
                k += 1
            value = s[j:k]
            j = k
        if name:
            raw.append((name, value))
            if len(raw) >= MAX_PARAMS:
                break
        i = j
    return _merge_rfc2231(raw)


_RFC2231_KEY = re.compile(r"^([^*]*)\*(?:([0-9]*)(\*?))?$")


def _merge_rfc2231(params: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Join RFC 2231 §3-4 parameters (``name*``, ``name*0*``, ``name*1``) into one, as
    Dovecot shows them: the plain parameters first, in order, then one ``name*`` (any
    segment encoded) or ``name`` per group, sorted by name. An encoded group that starts
    unencoded gets an empty ``''`` charset and language, and its unencoded segments have
    ``%`` escaped; a group with a missing index is shown segment by segment."""
    if not any("*" in k for k, _ in params):
        return params
    plain: list[tuple[str, str]] = []
    segs: list[tuple[str, int, bool, str]] = []  # name, index, encoded, value
    for k, v in params:
        m = _RFC2231_KEY.match(k)
        if m is None:
            plain.append((k, v))
            continue
        idx = int(m.group(2)) if m.group(2) else 0
        encoded = not m.group(2) or bool(m.group(3))  # "name*" is encoded, index 0
        segs.append((m.group(1), idx, encoded, v))
    segs.sort(key=lambda t: (t[0], t[1]))
    out = plain
    i = 0
    while i < len(segs):
        j = i
        while j < len(segs) and segs[j][0].lower() == segs[i][0].lower():
            j += 1
        group = segs[i:j]
        i = j
        if any(g[1] != n for n, g in enumerate(group)):
            out += [(f"{n}*{x}*" if enc else f"{n}*{x}", v) for n, x, enc, v in group]
            continue
        any_enc = any(g[2] for g in group)
        value = "''" if any_enc and not group[0][2] else ""
        value += "".join(v if enc or not any_enc else v.replace("%", "%25")
                         for _, _, enc, v in group)
        out.append((group[0][0] + ("*" if any_enc else ""), value))
    return out


def _parse_content_type(value: str) -> tuple[str, str, list[tuple[str, str]]] | None:
    """type, subtype, params of a Content-Type value; None when it is not valid."""
    i, n = 0, len(value)
    while i < n and (value[i] in " \t" or value[i] == "("):
        if value[i] == "(":
            i, _ = _skip_comment(value, i)
        else:
            i += 1
    j = i
    while j < n and value[j] not in _TSPECIALS:
        j += 1
    typ = value[i:j]
    while j < n and value[j] in " \t":
        j += 1
    if not typ or j >= n or value[j] != "/":
        return None
    j += 1
    while j < n and value[j] in " \t":
        j += 1
    k = j
    while k < n and value[k] not in _TSPECIALS:
        k += 1
    sub = value[j:k]
    if not sub:
        return None
    return typ, sub, _parse_params(value, k)


def _parse_disposition(value: str) -> tuple[str, list[tuple[str, str]]] | None:
    i, n = 0, len(value)
    while i < n and value[i] in " \t":
        i += 1
    j = i
    while j < n and value[j] not in _TSPECIALS:
        j += 1
    if j == i:
        return None
    return value[i:j], _parse_params(value, j)


def _first_token(value: str) -> str:
    v = value.strip()
    if "(" in v:
        v = v.split("(", 1)[0].strip()
    return v.split()[0] if v.split() else ""


# ---------------------------------------------------------------- addresses (RFC 5322 §3.4)
@dataclass(frozen=True)
class _Addr:
    name: str | None
    adl: str | None
    mailbox: str | None
    host: str | None


_ADDR_SPECIALS = set('()<>@,;:"[]')


def _tokenize(s: str) -> list[tuple[str, str]]:
    """Tokens: ('atom', text), ('q', quoted text), ('c', comment), ('d', [literal]), (special, '')."""
    toks: list[tuple[str, str]] = []
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c in " \t\r\n":
            i += 1
        elif c == '"':
            i, t = _read_quoted(s, i)
            toks.append(("q", t))
        elif c == "(":
            i, t = _skip_comment(s, i)
            toks.append(("c", t))
        elif c == "[":
            j = s.find("]", i)
            j = n if j < 0 else j + 1
            toks.append(("d", s[i:j]))
            i = j
        elif c in _ADDR_SPECIALS:
            toks.append((c, ""))
            i += 1
        else:
            j = i
            while j < n and s[j] not in _ADDR_SPECIALS and s[j] not in " \t\r\n":
                j += 1
            toks.append(("atom", s[i:j]))
            i = j
    return toks


def _quote_local(t: tuple[str, str]) -> str:
    return '"' + t[1].replace("\\", "\\\\").replace('"', '\\"') + '"' if t[0] == "q" else t[1]


class _AddrParser:
    def __init__(self, toks: list[tuple[str, str]]) -> None:
        self.t = toks
        self.i = 0

    def peek(self) -> str | None:
        return self.t[self.i][0] if self.i < len(self.t) else None

    def parse_list(self, in_group: bool = False) -> list[_Addr]:
        out: list[_Addr] = []
        while self.i < len(self.t):
            k = self.peek()
            if k == ",":
                self.i += 1
                continue
            if k == ";":
                if in_group:
                    return out
                self.i += 1
                continue
            out.extend(self.parse_one(in_group))
            if len(out) > 10000:
                break
        return out

    def parse_one(self, in_group: bool) -> list[_Addr]:
        words: list[tuple[str, str]] = []
        comments: list[str] = []
        while self.i < len(self.t):
            kind, text = self.t[self.i]
            if kind in ("atom", "q", "d", "@"):
                words.append((kind, text))
                self.i += 1
            elif kind == "c":
                if words:  # a comment before the address is not its name (Dovecot)
                    comments.append(text)
                self.i += 1
            elif kind == "<":
                self.i += 1
                return [self.angle(_phrase(words))]
            elif kind == ":" and not in_group:
                self.i += 1
                members = self.parse_list(in_group=True)
                if self.peek() == ";":
                    self.i += 1
                name = _phrase(words) or ""
                return [_Addr(None, None, name, None), *members, _Addr(None, None, None, None)]
            elif kind in (",", ";", ":", ">"):
                if kind in (":", ">"):
                    self.i += 1
                    continue
                break
            else:
                self.i += 1
        if not words:
            return []
        return [_addr_spec(words, comments[-1].strip() if comments else None)]

    def angle(self, name: str | None) -> _Addr:
        adl_parts: list[str] = []
        # obs-route: "@a,@b:" before the addr-spec (RFC 5322 §4.4)
        if self.peek() == "@":
            save = self.i
            cur = ""
            # a route is a few tokens; bounded so "<@<@<@..." cannot go quadratic
            while self.i < len(self.t) and self.i - save < 64 and self.peek() not in (":", ">"):
                kind, text = self.t[self.i]
                if kind == "@":
                    cur += "@"
                elif kind == ",":
                    adl_parts.append(cur)
                    cur = ""
                elif kind in ("atom", "d"):
                    cur += text
                self.i += 1
            if self.peek() == ":":
                adl_parts.append(cur)
                self.i += 1
            else:
                self.i = save
                adl_parts = []
        words: list[tuple[str, str]] = []
        while self.i < len(self.t) and self.peek() != ">":
            kind, text = self.t[self.i]
            if kind in ("atom", "q", "d", "@"):
                words.append((kind, text))
            elif kind in (",", ";") and not any(k == "@" for k, _ in words):
                break  # unterminated "<" : stop at the list separator
            self.i += 1
        if self.peek() == ">":
            self.i += 1
        a = _addr_spec(words, None)
        adl = ",".join(p for p in adl_parts if p) or None
        return _Addr(name, adl, a.mailbox, a.host)


def _phrase(words: list[tuple[str, str]]) -> str | None:
    parts = [t for k, t in words if k in ("atom", "q", "d")]
    return " ".join(parts) if parts else None


def _addr_spec(words: list[tuple[str, str]], comment: str | None) -> _Addr:
    at = next((n for n, (k, _) in enumerate(words) if k == "@"), None)
    if at is None:
        local_toks, dom_toks = words, []
    else:
        local_toks, dom_toks = words[:at], words[at + 1:]
    local = "".join(_quote_local(t) for t in local_toks if t[0] != "@")
    host = "".join(t for k, t in dom_toks if k in ("atom", "d"))
    # Dovecot's markers for a missing part: a NIL host would read as group syntax
    return _Addr(comment or None, None, local or "MISSING_MAILBOX", host or "MISSING_DOMAIN")


def _parse_addresses(value: str) -> list[_Addr]:
    try:
        return _AddrParser(_tokenize(value)).parse_list()
    except Exception:
        return []


def _addr_list(value: str | None) -> str:
    if value is None:
        return "NIL"
    addrs = _parse_addresses(value)
    if not addrs:
        return "NIL"
    return "(" + "".join(
        f"({imap_string(_no_tabs(a.name))} {imap_string(a.adl)} {imap_string(a.mailbox)} "
        f"{imap_string(a.host)})" for a in addrs) + ")"


def _no_tabs(s: str | None) -> str | None:
    """Text for people (a subject, a display name) with each TAB as a space, as Dovecot's
    ENVELOPE writes it (a folded ``\r\n\t`` unfolds to one space)."""
    return s if s is None or "\t" not in s else s.replace("\t", " ")


# ---------------------------------------------------------------- the entity tree
@dataclass
class Entity:
    header_start: int
    body_start: int
    end: int
    headers: list[tuple[str, bytes]]
    typ: str = "text"
    sub: str = "plain"
    params: list[tuple[str, str]] = field(default_factory=lambda: [("charset", "us-ascii")])
    children: list[Entity] = field(default_factory=list)
    message: Entity | None = None  # message/rfc822: the encapsulated message
    _first: dict[str, bytes] | None = None

    def header(self, name: str) -> str | None:
        """The first field of that name, unfolded; None when absent."""
        if self._first is None:
            self._first = {}
            for k, val in self.headers:
                self._first.setdefault(k, val)
        v = self._first.get(name)
        return None if v is None else unfold(v)

    @property
    def is_multipart(self) -> bool:
        return self.typ.lower() == "multipart"

    @property
    def is_rfc822(self) -> bool:
        return self.message is not None


class _PartBudget:
    def __init__(self) -> None:
        self.parts = 0


def _split_multipart(raw: bytes, start: int, end: int, boundary: bytes
                     ) -> tuple[list[tuple[int, int, int | None]], int | None]:
    """Ranges of the body parts between ``--boundary`` delimiter lines (RFC 2046 §5.1.1),
    and where the close delimiter line ends (None: there is none).

    Each range is ``(start, end, lb)``: ``end`` is where the next delimiter begins and
    ``lb`` the length of the line break just before it, which belongs to the delimiter
    unless the part ends in a delimiter line of its own (``_parse_entity`` decides). A
    missing close delimiter ends the last part at ``end`` (``lb`` None: the caller's own
    trailing line break, if any, is the part's to settle).
    """
    delim = b"--" + boundary
    dl = len(delim)
    parts: list[tuple[int, int, int | None]] = []
    cur: int | None = None
    pos = start
    while pos < end:
        i = raw.find(delim, pos, end)
        if i < 0:
            break
        if i != start and raw[i - 1] != 0x0A:
            pos = i + 1
            continue
        after = i + dl
        close = raw.startswith(b"--", after, end)
        if not close and after < end and raw[after] not in b" \t\r\n":
            pos = i + 1  # a longer boundary that merely starts with ours
            continue
        nl = raw.find(b"\n", after, end)
        line_end = end if nl < 0 else nl + 1
        if cur is not None:
            pe = i
            if pe > cur and raw[pe - 1] == 0x0A:
                pe -= 1
                if pe > cur and raw[pe - 1] == 0x0D:
                    pe -= 1
            parts.append((cur, i, i - pe))
        if close:
            return parts, line_end
        cur = line_end
        pos = line_end
        if len(parts) > MAX_PARTS:
            break
    if cur is not None:
        parts.append((cur, end, None))
    return parts, None


def _parse_entity(raw: bytes, start: int, end: int, digest: bool, depth: int,
                  budget: _PartBudget, lb: int = 0) -> Entity:
    """The entity at ``raw[start:end]``. ``lb``: the length of the line break that ends the
    range just before a delimiter of the enclosing multipart. It is the delimiter's (RFC
    2046 §5.1.1) unless it ends the close delimiter line of a multipart inside it; then it
    stays, as Dovecot's parser keeps it (the entity's ``end`` tells which)."""
    body_start = header_block_end(raw, start, end)
    if lb and body_start == end:
        # no body: the line break before the delimiter is the delimiter's, even when it
        # ends the header's empty line (Dovecot: the MIME header then has no empty line)
        end = body_start = end - lb
        lb = 0
    headers = parse_headers(raw[start:body_start])
    e = Entity(start, body_start, end, headers)
    budget.parts += 1
    ct = e.header("content-type")
    parsed = _parse_content_type(ct) if ct is not None else None
    if parsed is None:
        if digest:  # RFC 2046 §5.1.5
            e.typ, e.sub, e.params = "message", "rfc822", []
    else:
        e.typ, e.sub, e.params = parsed
        if e.typ.lower() == "text" and not any(k.lower() == "charset" for k, _ in e.params):
            e.params = [*e.params, ("charset", "us-ascii")]  # RFC 2045 §5.2 default, last
    t, s = e.typ.lower(), e.sub.lower()
    deep = depth >= MAX_DEPTH or budget.parts >= MAX_PARTS
    e.end = end - lb  # a leaf's body ends before the delimiter's line break
    if t == "multipart":
        boundary = next((v for k, v in e.params if k.lower() == "boundary"), "")
        if not boundary or deep:
            e.typ, e.sub, e.params = "text", "plain", [("charset", "us-ascii")]
            return e
        ranges, close_end = _split_multipart(raw, body_start, end,
                                             boundary.encode("utf-8", "replace"))
        if not ranges:
            ranges = [(e.end, e.end, 0)]  # no delimiter at all: one empty part, as Dovecot
        for ps, pe, plb in ranges:
            if budget.parts >= MAX_PARTS:
                break
            if plb is None:  # the unclosed last part ends where we end
                plb = lb if ps < pe else 0
            e.children.append(_parse_entity(raw, ps, pe, s == "digest", depth + 1, budget,
                                            plb))
        if not e.children:
            e.typ, e.sub, e.params = "text", "plain", [("charset", "us-ascii")]
        elif close_end is not None:
            # the line break after the close delimiter is its line's, not the epilogue's
            e.end = end if close_end == end else end - lb
        elif ranges[-1][2] is None and len(e.children) == len(ranges):
            e.end = e.children[-1].end  # unclosed: the last part settled it
    elif t == "message" and s == "rfc822":
        if deep:
            e.typ, e.sub, e.params = "text", "plain", [("charset", "us-ascii")]
            return e
        e.message = _parse_entity(raw, body_start, end, False, depth + 1, budget, lb)
        e.end = e.message.end
        if lb and header_block_end(raw, body_start, end) == end:
            # the message inside is a header the delimiter cuts short: its last line break
            # is not its own but stays in this part's body, as Dovecot counts it
            e.end = end
    return e


# ---------------------------------------------------------------- IMAP structures
def _params(params: list[tuple[str, str]]) -> str:
    if not params:
        return "NIL"
    return "(" + " ".join(f"{imap_string(k)} {imap_string(v)}" for k, v in params) + ")"


def _envelope(e: Entity) -> str:
    h = {}
    for k, v in e.headers:
        if k not in h:
            h[k] = unfold(v)
    frm = h.get("from")

    def defaulted(name: str) -> str:
        v = h.get(name)
        # RFC 3501 §7.4.2: absent or empty Sender/Reply-To take the From value
        return _addr_list(frm if v is None or not v.strip() else v)

    return "({} {} {} {} {} {} {} {} {} {})".format(
        imap_string(h.get("date")), imap_string(_no_tabs(h.get("subject"))),
        _addr_list(frm), defaulted("sender"), defaulted("reply-to"),
        _addr_list(h.get("to")), _addr_list(h.get("cc")), _addr_list(h.get("bcc")),
        imap_string(h.get("in-reply-to")), imap_string(h.get("message-id")))


def _lines(raw: bytes, start: int, end: int) -> int:
    return raw.count(b"\n", start, end)


def _struct(raw: bytes, e: Entity) -> tuple[str, str]:
    """(BODYSTRUCTURE, BODY) of an entity, built in one walk."""
    if e.is_multipart:
        kids = [_struct(raw, c) for c in e.children]
        sub = imap_string(e.sub)
        return (f"({''.join(k[0] for k in kids)} {sub} {_params(e.params)} {_ext_tail(e)})",
                f"({''.join(k[1] for k in kids)} {sub})")
    cte = e.header("content-transfer-encoding")
    enc = _first_token(cte) if cte else ""
    if enc and any(c in _TSPECIALS or not c.isascii() or not c.isprintable() for c in enc):
        enc = ""  # RFC 2045 §6.1: not a token; shown as the default
    size = e.end - e.body_start
    out = (f"({imap_string(e.typ)} {imap_string(e.sub)} {_params(e.params)} "
           f"{imap_string(e.header('content-id'))} {imap_string(e.header('content-description'))} "
           f"{imap_string(enc or '7bit')} {size}")
    ext_out = out
    if e.message is not None:
        env = _envelope(e.message)
        inner_ext, inner = _struct(raw, e.message)
        lines = _lines(raw, e.body_start, e.end)
        out += f" {env} {inner} {lines}"
        ext_out += f" {env} {inner_ext} {lines}"
    elif e.typ.lower() == "text":
        lines_s = f" {_lines(raw, e.body_start, e.end)}"
        out += lines_s
        ext_out += lines_s
    md5 = e.header("content-md5")
    ext_out += " " + imap_string(md5 or None) + " " + _ext_tail(e)
    return ext_out + ")", out + ")"


def _ext_tail(e: Entity) -> str:
    """body-fld-dsp SP body-fld-lang SP body-fld-loc (RFC 3501 §9)."""
    dsp = "NIL"
    cd = e.header("content-disposition")
    if cd:
        d = _parse_disposition(cd)
        if d is not None:
            dsp = f"({imap_string(d[0])} {_params(d[1])})"
    lang = "NIL"
    cl = e.header("content-language")
    if cl:
        langs = [x.strip() for x in re.sub(r"\([^)]*\)", "", cl).split(",") if x.strip()]
        if langs:  # always a list, as Dovecot writes it
            lang = "(" + " ".join(imap_string(x) for x in langs) + ")"
    loc = e.header("content-location")
    # RFC 2557 §4.4.2 (RFC 2017 §3.1): whitespace inside a folded URL is not part of it
    loc_s = imap_string(re.sub(r"\s+", "", loc)) if loc else "NIL"
    return f"{dsp} {lang} {loc_s}"


def _spans(root: Entity) -> list[PartSpan]:
    spans = [PartSpan(section="", header_start=root.header_start, body_start=root.body_start,
                      end=root.end, content_type="message/rfc822", is_message_rfc822=True)]

    def emit(sec: str, e: Entity) -> None:
        spans.append(PartSpan(section=sec, header_start=e.header_start, body_start=e.body_start,
                              end=e.end, content_type=f"{e.typ}/{e.sub}".lower(),
                              is_message_rfc822=e.message is not None))

    def message(m: Entity, prefix: str) -> None:
        def join(n: int) -> str:
            return f"{prefix}.{n}" if prefix else str(n)

        if m.is_multipart:
            for n, c in enumerate(m.children, 1):
                emit(join(n), c)
                part(c, join(n))
        else:  # RFC 3501 §6.4.5: a non-multipart message's body is part 1
            emit(join(1), m)
            part(m, join(1))

    def part(e: Entity, sec: str) -> None:
        if e.is_multipart:
            for n, c in enumerate(e.children, 1):
                emit(f"{sec}.{n}", c)
                part(c, f"{sec}.{n}")
        elif e.message is not None:
            message(e.message, sec)

    message(root, "")
    return spans


def _search_text(e: Entity, name: str) -> str:
    vals = [unfold(v) for k, v in e.headers if k == name]
    return decode_words(", ".join(vals)) if vals else ""


def _date(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        d = email.utils.parsedate_to_datetime(value)
    except Exception:
        return None
    if d is None:
        return None
    if d.tzinfo is None:
        d = d.replace(tzinfo=UTC)
    return d


# a summary is stored with every message and sent in batches of 100 in one NATS reply (1 MiB):
# 2 KiB keeps some 40 ids, the nearest ancestors, which is what threading links by
MAX_THREAD_FIELD = 2 * 1024


def thread_field(value: str | None) -> str:
    """A References or In-Reply-To value as THREAD reads it: "" when absent; past
    MAX_THREAD_FIELD characters only its last message ids (the nearest ancestors, which
    RFC 5256 §4 step 1.A links last), so one header cannot bloat every summary."""
    if value is None:
        return ""
    if len(value) <= MAX_THREAD_FIELD:
        return value
    tail = value[-MAX_THREAD_FIELD:]
    return tail[tail.find("<"):] if "<" in tail else ""


def parse_tree(raw: bytes) -> Entity:
    """The MIME entity tree of a message, bounded by MAX_DEPTH and MAX_PARTS."""
    return _parse_entity(raw, 0, len(raw), False, 0, _PartBudget())


def _summary(raw: bytes) -> MessageSummary:
    root = parse_tree(raw)
    bodystructure, body = _struct(raw, root)
    mid = root.header("message-id")
    return MessageSummary(
        envelope=_envelope(root),
        bodystructure=bodystructure,
        body=body,
        parts=_spans(root),
        subject=_search_text(root, "subject"),
        **{"from": _search_text(root, "from")},
        to=_search_text(root, "to"),
        cc=_search_text(root, "cc"),
        bcc=_search_text(root, "bcc"),
        message_id=mid.strip() if mid else "",
        date=_date(root.header("date")),
        header_bytes=root.body_start,
        ends_crlf=ends_crlf(raw),
        references=thread_field(root.header("references")),
        in_reply_to=thread_field(root.header("in-reply-to")),
        thread_fields=True,
    )


def summarize(raw: bytes) -> MessageSummary:
    """ENVELOPE, BODY, BODYSTRUCTURE, part offsets and SEARCH fields of one message.

    Never raises: a message we cannot parse at all is shown as one text/plain body.
    """
    raw = bytes(raw)
    try:
        return _summary(raw)
    except Exception:  # a last resort; the parser is written not to get here
        n, lines = len(raw), raw.count(b"\n")
        basic = f'"text" "plain" ("charset" "us-ascii") NIL NIL "7bit" {n} {lines}'
        return MessageSummary(
            ends_crlf=ends_crlf(raw),
            envelope="(NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL)",
            bodystructure=f"({basic} NIL NIL NIL NIL)",
            body=f"({basic})",
            parts=[PartSpan(section="", header_start=0, body_start=0, end=n),
                   PartSpan(section="1", header_start=0, body_start=0, end=n)],
        )


# ---------------------------------------------------------------- FETCH helpers
def header_fields(raw_header: bytes, names: Iterable[str | bytes], negate: bool = False) -> bytes:
    """BODY[HEADER.FIELDS (names)] / HEADER.FIELDS.NOT (RFC 3501 §6.4.5): the matching fields
    with their continuation lines, in message order and original bytes, then a blank line,
    unless the message has no body and no blank line (§6.4.5: then no header fetch has one,
    and the fields are as they stand)."""
    wanted = {(n.decode("ascii", "replace") if isinstance(n, bytes) else n).lower()
              for n in names}
    out: list[bytes] = []
    keep = False
    for line in raw_header.splitlines(keepends=True):
        if line in (b"\r\n", b"\n"):
            break  # the end of the header block
        if line[:1] in (b" ", b"\t"):
            if keep:
                out.append(line)
            continue
        m = _FIELD_NAME.match(line)
        if m is None:
            keep = False
            continue
        name = m.group(1).decode("ascii").lower()
        keep = (name in wanted) != negate
        if keep:
            out.append(line)
    else:
        return b"".join(out)  # no blank line ends the header block
    if out and not out[-1].endswith(b"\n"):
        out[-1] += b"\r\n"
    out.append(b"\r\n")
    return b"".join(out)


@dataclass(frozen=True)
class Section:
    """A parsed section-spec: ``part`` ("" or "1.2"), ``text`` ("", "HEADER", "TEXT", "MIME",
    "HEADER.FIELDS", "HEADER.FIELDS.NOT") and ``fields`` for HEADER.FIELDS."""

    part: str
    text: str
    fields: tuple[str, ...] = ()


_SECTION = re.compile(
    r"^((?:[1-9][0-9]*)(?:\.[1-9][0-9]*)*)?\.?"
    r"(HEADER\.FIELDS\.NOT|HEADER\.FIELDS|HEADER|TEXT|MIME)?\s*(?:\((.*)\))?$",
    re.IGNORECASE | re.DOTALL)


def parse_section(spec: str) -> Section | None:
    """Parse the inside of ``BODY[...]``; None when it is not a valid section-spec."""
    s = spec.strip()
    m = _SECTION.match(s)
    if m is None:
        return None
    part, text, flist = m.group(1) or "", (m.group(2) or "").upper(), m.group(3)
    if not text and s.endswith("."):
        return None
    if part and s[len(part):len(part) + 1] not in ("", ".") or (not part and s.startswith(".")):
        return None
    if part and text and s[len(part)] != ".":
        return None
    if part == "" and text == "MIME":
        return None  # RFC 3501 §9: MIME needs a part number
    if text.startswith("HEADER.FIELDS"):
        if flist is None:
            return None
        names = tuple(x.strip('"') for x in flist.split() if x.strip('"'))
        if not names:
            return None
        return Section(part, text, names)
    if flist is not None:
        return None
    return Section(part, text)


def _find_part(parts: Sequence[PartSpan], section: str) -> PartSpan | None:
    """The part a section number names. Besides the parts of the summary: ``n.1`` of a
    part ``n`` that is neither multipart nor message/rfc822 is ``n`` itself (RFC 3501
    §6.4.5: a non-multipart entity's body is its part 1; Dovecot answers so), when ``n``
    is a multipart's child. A single-part message's "1" (top level or inside a
    message/rfc822 part) is that message's body already and has no "1.1" (Dovecot: NIL)."""
    p = next((x for x in parts if x.section == section), None)
    if p is not None or not section.endswith(".1"):
        return p
    leaf_sec = section[:-2]
    q = next((x for x in parts if x.section == leaf_sec), None)
    if q is None or q.is_message_rfc822 or q.content_type.startswith("multipart/"):
        return None
    up_sec = leaf_sec.rpartition(".")[0]
    up = next((x for x in parts if x.section == up_sec), None)
    if up is None:
        return None
    # the body of the enclosing message starts where a single-part message's "1" starts;
    # a multipart's child starts after a delimiter line, never there
    if q.header_start == (up.body_start if up_sec else up.header_start):
        return None
    return q


def section_bytes(raw: bytes, summary_or_parts: MessageSummary | Sequence[PartSpan],
                  section_spec: str | Section) -> bytes | None:
    """The bytes of ``BODY[<section_spec>]`` (e.g. "", "HEADER", "1.2", "2.MIME",
    "3.HEADER.FIELDS (From Subject)"), or None when the section does not exist or the
    spec is invalid. ``raw`` is the message the summary was computed from."""
    parts = summary_or_parts.parts if isinstance(summary_or_parts, MessageSummary) \
        else summary_or_parts
    sec = parse_section(section_spec) if isinstance(section_spec, str) else section_spec
    if sec is None:
        return None
    if sec.part == "":
        top = next((p for p in parts if p.section == ""), None)
        if top is None:
            hb = header_block_end(raw, 0, len(raw))
            msg_start, msg_body, msg_end = 0, hb, len(raw)
        else:
            msg_start, msg_body, msg_end = top.header_start, top.body_start, top.end
    else:
        p = _find_part(parts, sec.part)
        if p is None:
            return None
        if sec.text == "":
            return raw[p.body_start:p.end]
        if sec.text == "MIME":
            return raw[p.header_start:p.body_start]
        if not p.is_message_rfc822:
            return None  # HEADER/TEXT apply to a message/rfc822 part only (§6.4.5)
        msg_start, msg_end = p.body_start, p.end
        msg_body = header_block_end(raw, msg_start, msg_end)
        if msg_body == msg_end:
            # a header without a blank line: where a delimiter follows, the part's last line
            # break is not the message's (_parse_entity); the message's own span says so
            inner = next((x for x in parts if x.section == sec.part + ".1"), None)
            if inner is not None and inner.header_start == msg_start:
                msg_end = msg_body = min(msg_end, inner.end)
    match sec.text:
        case "":
            return raw[msg_start:msg_end]
        case "HEADER":
            return raw[msg_start:msg_body]
        case "TEXT":
            return raw[msg_body:msg_end]
        case "HEADER.FIELDS":
            return header_fields(raw[msg_start:msg_body], sec.fields)
        case "HEADER.FIELDS.NOT":
            return header_fields(raw[msg_start:msg_body], sec.fields, negate=True)
    return None


# ---------------------------------------------------------------- BINARY (RFC 3516)
class UnknownCTE(ValueError):
    """A part's Content-Transfer-Encoding we cannot decode (RFC 3516 §4.3: NO [UNKNOWN-CTE])."""


_B64_CHARS = re.compile(rb"[^A-Za-z0-9+/]")


def _base64_decode(data: bytes) -> bytes:
    """RFC 2045 §6.8: characters outside the alphabet are ignored; the data ends at the
    first pad (=); a dangling sixth of a group is dropped."""
    body = data.split(b"=", 1)[0]
    body = _B64_CHARS.sub(b"", body)
    if len(body) % 4 == 1:
        body = body[:-1]
    return binascii.a2b_base64(body + b"=" * (-len(body) % 4))


_QP_HEX = re.compile(rb"=([0-9A-Fa-f]{2})")


def _qp_decode(data: bytes) -> bytes:
    """RFC 2045 §6.7: trailing white space on a line is dropped, a line ending in '=' is a
    soft line break, '=XX' is an octet; any other '=' stands for itself."""
    out: list[bytes] = []
    for line in data.splitlines(keepends=True):
        content = line.rstrip(b"\r\n")
        eol = line[len(content):]
        content = content.rstrip(b" \t")
        if content.endswith(b"="):
            content, eol = content[:-1], b""
        out.append(_QP_HEX.sub(lambda m: bytes([int(m.group(1), 16)]), content) + eol)
    return b"".join(out)


def _cte(raw: bytes, start: int, end: int) -> str:
    """The Content-Transfer-Encoding token of the header block raw[start:end], lower-case."""
    v = next((val for k, val in parse_headers(raw[start:end])
              if k == "content-transfer-encoding"), None)
    return _first_token(unfold(v)).lower() if v is not None else ""


def binary_section(raw: bytes, parts: Sequence[PartSpan], part: str) -> tuple[bytes, bool]:
    """BINARY[part] (RFC 3516 §4.2): the part's body with its Content-Transfer-Encoding
    decoded, and whether anything was decoded (Dovecot then sends a literal8). The whole
    message (part "") and multipart or message/rfc822 parts, whose own encoding is an
    identity (RFC 2045 §6.4), come as they are; a part that does not exist is empty, as
    BODY[] answers it. Raises UnknownCTE for an encoding other than 7bit, 8bit, binary,
    base64 and quoted-printable."""
    if part == "":
        return raw, False
    p = _find_part(parts, part)
    if p is None:
        return b"", False
    data = raw[p.body_start:p.end]
    if p.is_message_rfc822 or p.content_type.startswith("multipart/"):
        return data, False
    cte = _cte(raw, p.header_start, p.body_start)
    if cte in ("", "7bit", "8bit", "binary"):
        return data, False
    if cte == "base64":
        return _base64_decode(data), True
    if cte == "quoted-printable":
        return _qp_decode(data), True
    raise UnknownCTE(cte)


_CTE_LINE = re.compile(rb"(?im)^content-transfer-encoding[ \t]*:[ \t]*binary[ \t]*(\r?\n|\Z)")


def binary_to_base64(raw: bytes) -> bytes:
    """A message APPENDed as a literal8 (RFC 3516 §4.4) made fit for BODY[], whose literals
    cannot carry NUL: every non-multipart part with ``Content-Transfer-Encoding: binary``
    gets that line as ``base64`` and its body base64-encoded in lines of 76, as Dovecot's
    binary converter does. BINARY[] decodes it back to the same octets."""
    edits: list[tuple[int, int, bytes]] = []

    def walk(e: Entity) -> None:
        if e.is_multipart:
            for c in e.children:
                walk(c)
            return
        m = _CTE_LINE.search(raw, e.header_start, e.body_start)
        if m is not None and (m.start() == e.header_start or raw[m.start() - 1] == 0x0A):
            body = raw[e.body_start:e.end]
            enc = binascii.b2a_base64(body, newline=False)
            lines = b"\r\n".join(enc[i:i + 76] for i in range(0, len(enc), 76))
            edits.append((m.start(), m.end(), b"Content-Transfer-Encoding: base64\r\n"))
            edits.append((e.body_start, e.end, lines))
        elif e.message is not None:
            walk(e.message)

    walk(parse_tree(raw))
    if not edits:
        return raw
    out = bytearray(raw)
    for start, end, new in sorted(edits, reverse=True):
        out[start:end] = new
    return bytes(out)
