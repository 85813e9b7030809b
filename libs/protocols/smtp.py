"""Pure SMTP codecs (RFC 5321, 1870, 1652, 3030, 3461, 6531, 2034): the ``Receiver`` (command
lines, DATA and BDAT chunks from bytes, however they are split), paths, ESMTP parameters,
the DATA reader (end-of-data detection, smuggling checks, dot-unstuffing, chunk by chunk),
enhanced codes.

Bytes and strings in, values out. No asyncio, no nats, no boto3.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from postbus.protocols import smtp_replies as rp
from postbus.protocols.lines import LineBuffer, LineItem, TooLong

# ---------------------------------------------------------------- enhanced status codes
# RFC 2034 §4: every reply except the greeting, HELO/EHLO and 334 challenges carries one.
_DEFAULT_ENHANCED: dict[str, str] = {
    "211": "2.0.0", "214": "2.0.0", "220": "2.0.0", "221": "2.0.0", "235": "2.7.0",
    "250": "2.0.0", "251": "2.1.5", "252": "2.5.0", "354": "",
    "421": "4.3.2", "432": "4.7.12", "450": "4.2.0", "451": "4.3.0", "452": "4.3.1",
    "454": "4.7.0", "455": "4.5.4",
    "500": "5.5.2", "501": "5.5.4", "502": "5.5.1", "503": "5.5.1", "504": "5.5.4",
    "521": "5.3.2", "530": "5.7.0", "534": "5.7.9", "535": "5.7.8", "538": "5.7.11",
    "550": "5.1.1", "551": "5.1.6", "552": "5.3.4", "553": "5.1.3", "554": "5.6.0",
    "555": "5.5.4",
}
_HAS_ENHANCED = re.compile(r"^[245]\d\d[ -][245]\.\d{1,3}\.\d{1,3}(?: |$)")


def with_enhanced_code(reply: str) -> str:
    """Insert a default enhanced status code into a reply line that has none (a safety net:
    every reply in smtp_replies carries its own). Lines with one are returned as they are."""
    if len(reply) < 3 or _HAS_ENHANCED.match(reply):
        return reply
    code = reply[:3]
    enh = _DEFAULT_ENHANCED.get(code)
    if not enh:
        return reply
    sep = reply[3:4] or " "
    text = reply[4:]
    return f"{code}{sep}{enh} {text}".rstrip()


# ---------------------------------------------------------------- paths (RFC 5321 §4.1.2)
class PathError(ValueError):
    """A path that is not a syntactically valid reverse-path or forward-path."""


_ATEXT = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*$")
_DOMAIN = re.compile(
    r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
_ADDR_LITERAL = re.compile(r"^\[(?:IPv6:[0-9A-Fa-f:.]+|\d{1,3}(?:\.\d{1,3}){3})\]$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ROUTE = re.compile(r"^@[^,:<>]+(?:,@[^,:<>]+)*:")


@dataclass(frozen=True)
class Path:
    """One parsed path. ``address`` is ``local@domain`` with the route stripped
    ("" for the null reverse-path). The flags tell policy about open-relay tricks."""

    address: str
    local: str = ""
    domain: str = ""
    had_route: bool = False  # "<@hop:user@domain>" (RFC 5321 §4.1.1.3: ignore the route)
    quoted_local: bool = False
    utf8: bool = False

    @property
    def relay_trick(self) -> bool:
        """Forms that old MTAs routed onwards: percent hack, bang paths, quoted or extra @."""
        return (self.had_route or self.quoted_local
                or any(c in self.local for c in "%!@"))


def _is_utf8_atext(s: str) -> bool:
    # RFC 6531 §3.3: atext =/ UTF8-non-ascii
    return all(ord(c) > 127 or _ATEXT.match(c) or c == "." for c in s) and bool(s) \
        and not s.startswith(".") and not s.endswith(".") and ".." not in s


def _valid_domain(d: str, utf8: bool) -> bool:
    if _ADDR_LITERAL.match(d):
        return True
    if not d or len(d) > 255:
        return False
    if utf8 and not d.isascii():
        try:
            d = d.encode("idna").decode("ascii")
        except UnicodeError:
            return False
    return bool(_DOMAIN.match(d))


def parse_path(text: str, *, allow_null: bool, utf8: bool = False) -> tuple[Path, str]:
    """Parse ``<path> [params]``; returns the path and the rest (the parameters).

    Raises PathError for anything that is not a valid path. ``local@domain`` without
    angle brackets is tolerated (many clients send it), as Postfix does.
    """
    text = text.lstrip(" ")
    if text.startswith("<"):
        end = _closing_bracket(text)
        inner, rest = text[1:end], text[end + 1:]
        if rest and not rest.startswith(" "):
            raise PathError("junk after path")
    else:
        inner, _, rest = text.partition(" ")
    rest = rest.strip(" ")
    if inner == "":
        if allow_null:
            return Path(""), rest
        raise PathError("empty path")
    if _CONTROL.search(inner):
        raise PathError("control character in path")
    ascii_only = inner.isascii()
    if not ascii_only and not utf8:
        raise PathError("8-bit address without SMTPUTF8")
    had_route = False
    m = _ROUTE.match(inner)
    if m:
        had_route = True
        inner = inner[m.end():]
    if "@" not in inner:
        raise PathError("no domain in address")
    local, _, domain = inner.rpartition("@")
    quoted = False
    if local.startswith('"'):
        if len(local) < 2 or not local.endswith('"'):
            raise PathError("unterminated quoted local part")
        body = local[1:-1]
        if re.search(r'(?<!\\)"', body):
            raise PathError("bad quoted local part")
        quoted = True
        plain = re.sub(r"\\(.)", r"\1", body)
    else:
        plain = local
        if "@" in local:
            # user@remote@local: not a valid dot-string; flagged as a relay trick
            parts = local.split("@")
            if not all(_ATEXT.match(p) or (utf8 and _is_utf8_atext(p)) for p in parts):
                raise PathError("bad local part")
        elif not (_ATEXT.match(local) or (utf8 and _is_utf8_atext(local))):
            raise PathError("bad local part")
    if len(plain) > 64 * 4 or not plain and not quoted:
        raise PathError("local part too long or empty")
    if not _valid_domain(domain, utf8):
        raise PathError("bad domain")
    return Path(f"{local}@{domain}", plain, domain.lower(), had_route, quoted, not ascii_only), rest


def _closing_bracket(text: str) -> int:
    in_quote = escaped = False
    for i, c in enumerate(text):
        if i == 0:
            continue
        if escaped:
            escaped = False
        elif c == "\\" and in_quote:
            escaped = True
        elif c == '"':
            in_quote = not in_quote
        elif c == ">" and not in_quote:
            return i
    raise PathError("missing '>'")


# ---------------------------------------------------------------- ESMTP parameters
class ParamError(ValueError):
    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


_KEYWORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")


def parse_params(rest: str) -> dict[str, str | None]:
    """``KEY=value KEY2`` -> {"KEY": "value", "KEY2": None} (RFC 5321 §4.1.2 esmtp-param)."""
    out: dict[str, str | None] = {}
    for item in rest.split():
        key, eq, value = item.partition("=")
        if not _KEYWORD.match(key) or (eq and not value):
            raise ParamError(rp.R501_BAD_PARAMETER.format(item[:40]))
        k = key.upper()
        if k in out:
            raise ParamError(rp.R501_DUPLICATE_PARAMETER.format(k))
        out[k] = value if eq else None
    return out


def xtext_decode(s: str) -> str:
    """RFC 3461 §4: "+XX" is a hex-encoded octet."""
    out = bytearray()
    i = 0
    raw = s.encode("utf-8", "surrogateescape")
    while i < len(raw):
        b = raw[i]
        if b == 0x2B:  # '+'
            hx = raw[i + 1:i + 3]
            if len(hx) != 2 or not re.fullmatch(rb"[0-9A-F]{2}", hx):
                raise ParamError(rp.R501_BAD_XTEXT)
            out.append(int(hx, 16))
            i += 3
        elif b < 33 or b > 126 or b == 0x3D:
            raise ParamError(rp.R501_BAD_XTEXT_CHAR)
        else:
            out.append(b)
            i += 1
    return out.decode("utf-8", "replace")


@dataclass(frozen=True)
class MailParams:
    size: int | None = None
    body: str = "7BIT"
    smtputf8: bool = False
    ret: str | None = None
    envid: str | None = None
    auth: str | None = None


def mail_params(params: dict[str, str | None], *, max_size: int, utf8_enabled: bool = True) -> MailParams:
    """Validate MAIL FROM parameters; raises ParamError with the reply to send."""
    p = dict(params)
    size: int | None = None
    if "SIZE" in p:
        v = p.pop("SIZE")
        if v is None or not v.isdigit() or len(v) > 20:
            raise ParamError(rp.R501_BAD_SIZE)
        size = int(v)
        if max_size and size > max_size:  # RFC 1870 §6
            raise ParamError(rp.R552_TOO_BIG)
    body = "7BIT"
    if "BODY" in p:
        v = (p.pop("BODY") or "").upper()
        if v not in ("7BIT", "8BITMIME"):  # BINARYMIME is not advertised
            raise ParamError(rp.R501_BAD_BODY)
        body = v
    smtputf8 = False
    if "SMTPUTF8" in p:
        if p.pop("SMTPUTF8") is not None:
            raise ParamError(rp.R501_SMTPUTF8_VALUE)
        if not utf8_enabled:
            raise ParamError(rp.R555_SMTPUTF8)
        smtputf8 = True
    ret = None
    if "RET" in p:
        v = (p.pop("RET") or "").upper()
        if v not in ("FULL", "HDRS"):
            raise ParamError(rp.R501_BAD_RET)
        ret = v
    envid = None
    if "ENVID" in p:
        v = p.pop("ENVID")
        if not v or len(v) > 100:  # RFC 3461 §4.4: at most 100 characters
            raise ParamError(rp.R501_BAD_ENVID)
        envid = xtext_decode(v)
    auth = None
    if "AUTH" in p:  # RFC 4954 §5: accepted and recorded only
        auth = p.pop("AUTH")
    if p:
        raise ParamError(rp.R555_MAIL_PARAMETER.format(next(iter(p))))
    return MailParams(size, body, smtputf8, ret, envid, auth)


NOTIFY_VALUES = ("NEVER", "SUCCESS", "FAILURE", "DELAY")


@dataclass(frozen=True)
class RcptParams:
    notify: tuple[str, ...] = ()
    orcpt: str | None = None


def rcpt_params(params: dict[str, str | None]) -> RcptParams:
    p = dict(params)
    notify: tuple[str, ...] = ()
    if "NOTIFY" in p:
        v = (p.pop("NOTIFY") or "").upper()
        items = tuple(x for x in v.split(","))
        if not items or any(x not in NOTIFY_VALUES for x in items) or len(set(items)) != len(items):
            raise ParamError(rp.R501_BAD_NOTIFY)
        if "NEVER" in items and len(items) > 1:  # RFC 3461 §4.1
            raise ParamError(rp.R501_NOTIFY_NEVER)
        notify = items
    orcpt = None
    if "ORCPT" in p:
        v = p.pop("ORCPT") or ""
        addr_type, semi, addr = v.partition(";")
        if not semi or not addr_type or not addr or len(v) > 500:
            raise ParamError(rp.R501_BAD_ORCPT)
        orcpt = f"{addr_type.lower()};{xtext_decode(addr)}"
    if p:
        raise ParamError(rp.R555_RCPT_PARAMETER.format(next(iter(p))))
    return RcptParams(notify, orcpt)


# ---------------------------------------------------------------- DATA (RFC 5321 §4.1.1.4, §4.5.2)
END_OF_DATA = b"\r\n.\r\n"


@dataclass(frozen=True)
class DataProblem:
    reply: str
    reason: str


R550_BARE_LF = DataProblem(rp.R550_BARE_LF, "bare_crlf")
R500_LINE_TOO_LONG = DataProblem(rp.R500_DATA_LINE_TOO_LONG, "line_too_long")
R552_TOO_BIG = DataProblem(rp.R552_TOO_BIG, "too_big")


@dataclass
class MessageCheck:
    """What DATA and BDAT refuse in the message octets, however they are split: bare CR or
    bare LF (RFC 5321 §2.3.8: what SMTP smuggling is made of; a well-behaved client never
    sends them) and a line over ``max_line`` octets without its CRLF (RFC 5321 §4.5.3.1.6,
    0: no limit). DATA feeds it the un-stuffed body (``DataReader``), BDAT every chunk of
    the message (RFC 3030 §2); it keeps a few counters, never the octets."""

    max_line: int = 0
    _cr: int = 0
    _lf: int = 0
    _crlf: int = 0
    _last_cr: bool = False  # the octets so far end in CR: an LF next makes a CRLF pair
    _line: int = 0  # octets of the current line so far, a CR at its end included
    _long: bool = False

    def feed(self, out: bytes) -> None:
        if not out:
            return
        self._cr += out.count(b"\r")
        self._lf += out.count(b"\n")
        self._crlf += out.count(b"\r\n") + (self._last_cr and out[0] == 0x0A)
        self._last_cr = out[-1] == 0x0D
        if self.max_line and not self._long:
            self._check_lines(out)

    def _check_lines(self, out: bytes) -> None:
        # Lines are split at LF and lose one octet for their CR: when a line ends in a bare
        # LF instead, the message is refused for that anyway.
        first = out.find(b"\n")
        if first < 0:
            self._line += len(out)
            return
        last = out.rfind(b"\n")
        limit = self.max_line + 1  # with its CR
        if (self._line + first > limit
                or last - first - 1 > limit
                and max(map(len, out[first + 1:last].split(b"\n"))) > limit):
            self._long = True
        self._line = len(out) - last - 1

    def problem(self) -> DataProblem | None:
        """Once the message is complete: bare CR/LF first, then line length (an unended
        last line, which BDAT allows, counts too), or None."""
        if not self._cr == self._lf == self._crlf:
            return R550_BARE_LF
        if self._long or self.max_line and self._line > self.max_line:
            return R500_LINE_TOO_LONG
        return None


@dataclass
class DataReader:
    """The data of one DATA command, read chunk by chunk and handed on as it comes: the
    caller never needs the whole message in memory (issue 8.6).

    ``feed`` returns the un-stuffed body octets each chunk completes, and the bytes after
    <CRLF>.<CRLF> once it is found. The stream is read as if it started with CRLF (the one
    that ended the DATA command), so an empty message (".\\r\\n" at once) is found too.
    Only <CRLF>.<CRLF> ends the data; "\\n.\\n", "\\r.\\r", "\\n.\\r\\n" and friends stay
    inside and make ``problem`` answer 550: bare CR and bare LF are what SMTP smuggling is
    made of, and a well-behaved client never sends them (RFC 5321 §2.3.8), so they are
    refused rather than normalised. ``max_line`` counts octets without CRLF after removing
    a stuffed dot (RFC 5321 §4.5.3.1.6); ``max_size`` counts un-stuffed octets. Past
    ``max_size``, or after ``drop``, the data is discarded but still read to its end (RFC
    5321 §4.2.5: the reply comes after the whole message).

    Between chunks it keeps six octets (the two before the undecided ones, for
    dot-stuffing and CRLF pairs, and four that may start the terminator) and a few
    counters, so the outcome is the same however the stream is split.
    """

    max_size: int = 0  # 0: no limit
    max_line: int = 0  # 0: no limit
    size: int = 0  # un-stuffed body octets so far
    done: bool = False
    overflow: bool = False  # over ``max_size``: the data is being discarded
    dropped: bool = False  # told to discard (``drop``): the receiver has no room for it
    _ctx: bytes = b"\r\n"  # the last two octets handed on (the stream starts after CRLF)
    _pending: bytes = b""  # at most four octets that may start the terminator
    _check: MessageCheck = field(init=False)

    def __post_init__(self) -> None:
        self._check = MessageCheck(self.max_line)

    def feed(self, chunk: bytes) -> tuple[bytes, bytes | None]:
        """Add a chunk; returns (body octets it completes, the bytes after the end of data
        or None while the end is not found)."""
        w = self._ctx + self._pending + chunk
        idx = w.find(END_OF_DATA)
        if idx >= 0:
            cut, rest = idx + 2, w[idx + 5:]  # the body keeps its last CRLF
            self.done = True
        else:
            cut, rest = max(2, len(w) - 4), None
        out = self._take(w, cut)
        self._ctx, self._pending = w[cut - 2:cut], w[cut:] if rest is None else b""
        return out, rest

    def _take(self, w: bytes, cut: int) -> bytes:
        """The body octets ``w[2:cut]`` un-stuffed; ``w[:2]`` were handed on before."""
        if cut <= 2 or self.overflow or self.dropped:
            return b""
        if w.find(b"\r\n.", 0, cut) < 0:
            out = w[2:cut]
        else:  # a removed dot is always past w[:2]: the pattern is three octets long
            out = w[:cut].replace(b"\r\n.", b"\r\n")[2:]
        self.size += len(out)
        if self.max_size and self.size > self.max_size:
            self.overflow = True  # nothing more is checked: too big is the answer
            return b""
        self._check.feed(out)
        return out

    def drop(self) -> None:
        """Hand on nothing more of this message (but go on looking for its end)."""
        self.dropped = True

    def problem(self) -> DataProblem | None:
        """Once ``done``: why the message must be refused, or None. Size first, then bare
        CR/LF, then line length (``dropped`` is the receiver's to answer)."""
        if self.overflow:
            return R552_TOO_BIG
        return self._check.problem()


# ---------------------------------------------------------------- BDAT (RFC 3030 §2)
_BDAT = re.compile(r"^(\d{1,18})(?: +(LAST))? *$", re.IGNORECASE)


def parse_bdat(arg: str | None) -> tuple[int, bool] | None:
    """``BDAT <size> [LAST]`` -> (size, last), or None for bad syntax."""
    m = _BDAT.match(arg or "")
    if not m:
        return None
    return int(m.group(1)), m.group(2) is not None


# ---------------------------------------------------------------- the receiver (sans-I/O)
# RFC 5321 §4.5.3.1.4: a command line is at most 512 octets with CRLF; ESMTP parameters
# (§4.5.3.1.1) make it longer, so the limit is the caller's (a setting, 2048 by default).
MAX_COMMAND_LINE = 2048
# Items one ``feed`` returns at most; the rest stays buffered for the next ``feed(b"")``.
MAX_ITEMS = 64


_Item = LineItem


@dataclass(frozen=True)
class Helo(_Item):
    """HELO (``extended`` False) or EHLO; ``host`` may be empty (answered 501)."""

    host: str
    extended: bool


@dataclass(frozen=True)
class Mail(_Item):
    arg: str  # "FROM:<path> params", parsed by the session (it knows about EHLO)


@dataclass(frozen=True)
class Rcpt(_Item):
    arg: str


@dataclass(frozen=True)
class Data(_Item):
    arg: str


@dataclass(frozen=True)
class Bdat(_Item):
    """``BDAT <size> [LAST]`` (RFC 3030 §2); ``size`` None when the syntax is bad."""

    size: int | None
    last: bool = False


@dataclass(frozen=True)
class Rset(_Item):
    arg: str


@dataclass(frozen=True)
class Noop(_Item):
    pass


@dataclass(frozen=True)
class Quit(_Item):
    pass


@dataclass(frozen=True)
class Vrfy(_Item):
    arg: str


@dataclass(frozen=True)
class Expn(_Item):
    pass


@dataclass(frozen=True)
class Help(_Item):
    pass


@dataclass(frozen=True)
class StartTls(_Item):
    arg: str


@dataclass(frozen=True)
class Auth(_Item):
    arg: str  # "mechanism [initial-response]" (RFC 4954 §4)


@dataclass(frozen=True)
class Unknown(_Item):
    verb: str


@dataclass(frozen=True)
class Bad(_Item):
    """A line that is no command: ``SYNTAX`` (not a verb, or a NUL) or ``TOO_LONG``."""

    reason: str


TOO_LONG = "line too long"
SYNTAX = "syntax error"


@dataclass(frozen=True)
class Body(_Item):
    """Message octets: un-stuffed DATA octets, or BDAT chunk octets, as they come."""

    data: bytes


@dataclass(frozen=True)
class Overflow(_Item):
    """The DATA went past the size limit: from here on it is read and discarded."""


@dataclass(frozen=True)
class DataEnd(_Item):
    """<CRLF>.<CRLF> was read; ``problem`` says why the message must be refused, if it must."""

    problem: DataProblem | None


@dataclass(frozen=True)
class ChunkEnd(_Item):
    """The last octet of a BDAT chunk was read."""


Command = (Helo | Mail | Rcpt | Data | Bdat | Rset | Noop | Quit | Vrfy | Expn | Help | StartTls
           | Auth | Unknown)
Item = Command | Bad | Body | Overflow | DataEnd | ChunkEnd

def parse_command(line: bytes) -> Command | Bad:
    """One command line (without its line end): the verb up to the first space, the argument
    stripped (RFC 5321 §4.1.1: verbs are case-insensitive)."""
    verb_bytes, _, arg_bytes = line.partition(b" ")
    try:
        verb = verb_bytes.upper().decode("ascii")
    except UnicodeDecodeError:
        verb = ""
    if not verb.isalpha() or b"\x00" in line:
        return Bad(SYNTAX, raw=line)
    arg = arg_bytes.strip().decode("utf-8", "surrogateescape")
    match verb:
        case "HELO" | "EHLO":
            return Helo(arg, verb == "EHLO", raw=line)
        case "MAIL":
            return Mail(arg, raw=line)
        case "RCPT":
            return Rcpt(arg, raw=line)
        case "DATA":
            return Data(arg, raw=line)
        case "BDAT":
            parsed = parse_bdat(arg)
            return Bdat(*parsed, raw=line) if parsed else Bdat(None, raw=line)
        case "RSET":
            return Rset(arg, raw=line)
        case "NOOP":
            return Noop(raw=line)
        case "QUIT":
            return Quit(raw=line)
        case "VRFY":
            return Vrfy(arg, raw=line)
        case "EXPN":
            return Expn(raw=line)
        case "HELP":
            return Help(raw=line)
        case "STARTTLS":
            return StartTls(arg, raw=line)
        case "AUTH":
            return Auth(arg, raw=line)
    return Unknown(verb, raw=line)


class Receiver:
    """SMTP input from bytes (RFC 5321 §2.4, §4.1.1.4; RFC 3030 §2). No I/O.

    Three modes: command lines (the default), DATA (``start_data``, until <CRLF>.<CRLF>,
    through ``DataReader``) and one BDAT chunk (``start_chunk``, exactly that many octets).
    Only the session knows whether DATA or BDAT begins (a 503 leaves the receiver reading
    lines), so ``feed`` stops after every DATA, BDAT and STARTTLS command and keeps the rest;
    the caller handles what it got, switches the mode if it must, and calls ``feed(b"")``
    for the rest. Bytes in, the same items out however the input is split.

    Bounded: a command line longer than ``max_line`` is reported once as ``Bad(TOO_LONG)``
    as soon as it is too long (not when it ends) and discarded up to its LF; message octets
    are handed on as they come, never gathered; one ``feed`` returns at most ``max_items``
    items (call ``feed(b"")`` for more), so junk is not multiplied into objects.
    """

    def __init__(self, *, max_line: int = MAX_COMMAND_LINE, max_size: int = 0,
                 max_data_line: int = 0, max_items: int = MAX_ITEMS) -> None:
        self.max_line = max_line
        self.max_items = max_items  # per feed: a read of empty lines is not 8,000 objects
        self.max_size = max_size  # DATA: un-stuffed octets (RFC 1870), 0: no limit
        self.max_data_line = max_data_line  # DATA: RFC 5321 §4.5.3.1.6, 0: no limit
        self._lines = LineBuffer(max_line)
        self._buf = self._lines.buf  # what is not handed on yet: a line, DATA or a chunk
        self._data: DataReader | None = None
        self._chunk = -1  # octets of the BDAT chunk still to come; -1: not in a chunk

    @property
    def mode(self) -> str:
        return "data" if self._data is not None else "chunk" if self._chunk >= 0 else "command"

    def start_data(self) -> None:
        """The session answered 354: what follows is message data."""
        self._data = DataReader(max_size=self.max_size, max_line=self.max_data_line)

    def start_chunk(self, size: int) -> None:
        """A BDAT command was taken: the next ``size`` octets are its chunk."""
        self._chunk = size

    def pending(self) -> int:
        """Octets buffered and not yet handed on (STARTTLS must see none: RFC 3207 §4.2)."""
        return len(self._buf)

    def discard(self) -> None:
        """Forget what is buffered (plaintext pipelined after STARTTLS, CVE-2011-0411)."""
        self._lines.clear()

    def feed(self, data: bytes) -> list[Item]:
        """Buffer ``data``; return the items it completes, in order, up to and including the
        first DATA, BDAT or STARTTLS command and at most ``max_items``; ``feed(b"")`` gives
        the next ones. Junk comes back as ``Bad``, never raised."""
        out: list[Item] = []
        if data and not self._buf and self._data is not None:
            self._feed_data(self._data, data, out)  # message data: handed on without a copy
        elif data and not self._buf and 0 < len(data) <= self._chunk:
            self._chunk -= len(data)
            out.append(Body(data))
            if self._chunk == 0:
                self._chunk = -1
                out.append(ChunkEnd())
        else:
            self._buf += data
        while self._buf and len(out) < self.max_items:
            if self._data is not None:
                chunk = bytes(self._buf)
                self._buf.clear()
                self._feed_data(self._data, chunk, out)
            elif self._chunk >= 0:
                self._feed_chunk(out)
            else:
                step = self._feed_line(out)
                if step is None:  # no whole line yet
                    break
                if step:
                    return out
        if self._chunk == 0:  # "BDAT 0 LAST": a chunk of nothing ends at once
            self._chunk = -1
            out.append(ChunkEnd())
        return out

    def _feed_line(self, out: list[Item]) -> bool | None:
        """One line from the buffer: None when it holds no whole line, True when ``feed``
        must stop after it (DATA, BDAT, STARTTLS)."""
        line = self._lines.next()  # the CR, if any, counts (as asyncio's readuntil)
        if line is None:
            return None
        if isinstance(line, TooLong):
            out.append(Bad(TOO_LONG))  # answered now, not when the client ends the line
            return False
        item = parse_command(line.rstrip(b"\r"))
        out.append(item)
        return isinstance(item, Data | Bdat | StartTls)

    def _feed_data(self, reader: DataReader, chunk: bytes, out: list[Item]) -> None:
        was_over = reader.overflow
        got, rest = reader.feed(chunk)
        if got:
            out.append(Body(got))
        if reader.overflow and not was_over:
            out.append(Overflow())
        if rest is not None:
            self._data = None
            self._buf += rest
            out.append(DataEnd(reader.problem()))

    def _feed_chunk(self, out: list[Item]) -> None:
        n = min(self._chunk, len(self._buf))
        if n:
            out.append(Body(bytes(self._buf[:n])))
            del self._buf[:n]
            self._chunk -= n
        if self._chunk == 0:
            self._chunk = -1
            out.append(ChunkEnd())
