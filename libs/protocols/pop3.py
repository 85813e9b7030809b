"""POP3 wire codec (RFC 1939, RFC 2449, RFC 5034, RFC 2595, RFC 6856): commands from bytes,
replies and message bodies to bytes.

Pure: no asyncio, nats or boto3. ``Receiver.feed`` never raises; junk comes back as ``Bad``.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from postbus.protocols.lines import LineBuffer, LineItem, TooLong
from postbus.protocols.served import dot_stuffed as stuff  # byte-stuffing, RFC 1939 §3

__all__ = [
    "MAX_COMMAND_LINE", "MAX_LINE", "Command", "Bad", "Item", "Receiver", "parse_line",
    "User", "Pass", "Quit", "Stat", "List", "Retr", "Dele", "Noop", "Rset", "Top", "Uidl",
    "Capa", "Stls", "Auth", "Utf8", "Apop", "Unknown",
    "stuff", "retr_payload", "top_payload", "multiline",
    "ok", "err", "decode_plain", "PlainCredentials",
]

# RFC 2449 §4: a command line is at most 255 octets including the CRLF.
MAX_COMMAND_LINE = 255
# A SASL continuation line (RFC 5034 §4) may be longer than a command; beyond this the
# receiver discards up to the next line end and reports the line as too long.
MAX_LINE = 8192
# RFC 2449 §4: keywords are 3-4 characters, arguments at most 40 characters.
MAX_ARG = 40
# Message numbers: more digits than this cannot name a message in any maildrop.
MAX_MSG_DIGITS = 9


# ---------------------------------------------------------------- commands
_Item = LineItem


@dataclass(frozen=True)
class User(_Item):
    name: str


@dataclass(frozen=True)
class Pass(_Item):
    secret: str


@dataclass(frozen=True)
class Apop(_Item):
    name: str
    digest: str


@dataclass(frozen=True)
class Quit(_Item):
    pass


@dataclass(frozen=True)
class Stat(_Item):
    pass


@dataclass(frozen=True)
class List(_Item):
    msg: int | None = None


@dataclass(frozen=True)
class Retr(_Item):
    msg: int


@dataclass(frozen=True)
class Dele(_Item):
    msg: int


@dataclass(frozen=True)
class Noop(_Item):
    pass


@dataclass(frozen=True)
class Rset(_Item):
    pass


@dataclass(frozen=True)
class Top(_Item):
    msg: int
    lines: int


@dataclass(frozen=True)
class Uidl(_Item):
    msg: int | None = None


@dataclass(frozen=True)
class Capa(_Item):
    pass


@dataclass(frozen=True)
class Stls(_Item):
    pass


@dataclass(frozen=True)
class Auth(_Item):
    """``AUTH`` alone lists mechanisms (a pre-RFC 5034 habit some clients keep);
    ``initial`` is the base64 initial response, ``"="`` for an empty one (RFC 5034 §4)."""

    mechanism: str | None = None
    initial: str | None = None


@dataclass(frozen=True)
class Utf8(_Item):
    pass


@dataclass(frozen=True)
class Unknown(_Item):
    verb: str


@dataclass(frozen=True)
class Bad(_Item):
    """A line that is not a well-formed command; ``reason`` is for the -ERR reply."""

    reason: str


Command = (User | Pass | Apop | Quit | Stat | List | Retr | Dele | Noop | Rset | Top | Uidl
           | Capa | Stls | Auth | Utf8 | Unknown)
Item = Command | Bad


def _number(arg: str, what: str, raw: bytes) -> int | Bad:
    if not arg.isascii() or not arg.isdigit():
        return Bad(f"invalid {what}", raw=raw)
    if len(arg) > MAX_MSG_DIGITS:
        return Bad(f"{what} too large", raw=raw)
    return int(arg)


def _args(rest: str) -> list[str]:
    return rest.split()


def parse_line(line: bytes) -> Item:
    """One command line (without its line end) to a Command or Bad."""
    raw = line
    if len(line) + 2 > MAX_COMMAND_LINE:
        return Bad("line too long", raw=raw)
    if b"\x00" in line:
        return Bad("NUL in command", raw=raw)
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return Bad("command is not UTF-8", raw=raw)
    verb, _, rest = text.partition(" ")
    kw = verb.upper()
    if not kw:
        return Bad("empty command", raw=raw)
    args = _args(rest)

    def no_args(cmd: Item) -> Item:
        return cmd if not args else Bad(f"{kw} takes no arguments", raw=raw)

    def msg_arg(optional: bool) -> int | None | Bad:
        if not args:
            return None if optional else Bad(f"{kw} needs a message number", raw=raw)
        if len(args) > 1:
            return Bad(f"{kw} takes one message number", raw=raw)
        return _number(args[0], "message number", raw)

    match kw:
        case "USER":
            name = rest.strip(" ")
            if not name:
                return Bad("USER needs a name", raw=raw)
            return User(name, raw=raw)
        case "PASS":
            # RFC 1939 §7: the password may contain spaces; take the rest of the line
            if not rest:
                return Bad("PASS needs a password", raw=raw)
            return Pass(rest, raw=raw)
        case "APOP":
            if len(args) != 2:
                return Bad("APOP needs a name and a digest", raw=raw)
            return Apop(args[0], args[1], raw=raw)
        case "QUIT":
            return no_args(Quit(raw=raw))
        case "STAT":
            return no_args(Stat(raw=raw))
        case "NOOP":
            return no_args(Noop(raw=raw))
        case "RSET":
            return no_args(Rset(raw=raw))
        case "CAPA":
            return no_args(Capa(raw=raw))
        case "STLS":
            return no_args(Stls(raw=raw))
        case "UTF8":
            return no_args(Utf8(raw=raw))
        case "LIST" | "UIDL":
            n = msg_arg(optional=True)
            if isinstance(n, Bad):
                return n
            return List(n, raw=raw) if kw == "LIST" else Uidl(n, raw=raw)
        case "RETR" | "DELE":
            n = msg_arg(optional=False)
            if isinstance(n, Bad):
                return n
            assert n is not None
            return Retr(n, raw=raw) if kw == "RETR" else Dele(n, raw=raw)
        case "TOP":
            if len(args) != 2:
                return Bad("TOP needs a message number and a line count", raw=raw)
            n = _number(args[0], "message number", raw)
            if isinstance(n, Bad):
                return n
            lines = _number(args[1], "line count", raw)
            if isinstance(lines, Bad):
                return lines
            return Top(n, lines, raw=raw)
        case "AUTH":
            if not args:
                return Auth(raw=raw)
            if len(args) > 2:
                return Bad("AUTH takes a mechanism and an initial response", raw=raw)
            return Auth(args[0].upper(), args[1] if len(args) == 2 else None, raw=raw)
        case _:
            return Unknown(kw[:MAX_ARG], raw=raw)


class Receiver:
    """POP3 commands from bytes (RFC 1939). No I/O.

    Lines end with CRLF; a bare LF is accepted too. A line longer than ``MAX_LINE`` is
    discarded up to its line end and reported once as ``Bad("line too long")``.
    """

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self._max_line = max_line
        self._lines = LineBuffer(max_line + 1)  # + the CR of a CRLF

    def feed(self, data: bytes) -> list[Item]:
        """Buffer data; return every command it completes, in order.
        Junk and over-long lines come back as Bad(reason), never as exceptions."""
        out: list[Item] = []
        self._lines.buf += data
        while (line := self._lines.next()) is not None:
            if isinstance(line, bytes) and line.endswith(b"\r"):
                line = line[:-1]
            if isinstance(line, TooLong) or len(line) > self._max_line:
                out.append(Bad("line too long"))
                continue
            out.append(parse_line(line))
        return out

    def pending(self) -> int:
        """Octets buffered after the last complete line (STLS must see none: RFC 2595 §4)."""
        return len(self._lines.buf)

    def discard(self) -> None:
        self._lines.clear()


# ---------------------------------------------------------------- replies
def ok(text: str = "") -> bytes:
    return b"+OK" + ((b" " + text.encode("utf-8")) if text else b"") + b"\r\n"


def err(text: str, code: str | None = None) -> bytes:
    """``-ERR [CODE] text`` (RFC 2449 §8 response codes)."""
    prefix = f"[{code}] " if code else ""
    return b"-ERR " + (prefix + text).encode("utf-8") + b"\r\n"


def multiline(first: bytes, lines: list[bytes]) -> bytes:
    """A multi-line reply: the status line, each line byte-stuffed, then ``.``."""
    parts = [first]
    for line in lines:
        parts.append(b"." + line + b"\r\n" if line.startswith(b".") else line + b"\r\n")
    parts.append(b".\r\n")
    return b"".join(parts)


# ---------------------------------------------------------------- message bodies
# the text RETR sends, its size and its byte-stuffing come from protocols.served
# (retr_text, retr_octets, dot_stuffed, re-exported here as ``stuff``)
def retr_payload(message: bytes) -> bytes:
    """The multi-line body of a RETR reply for CRLF ``message`` (after ``+OK``)."""
    return stuff(message) + b".\r\n"


def top_payload(message: bytes, lines: int) -> bytes:
    """The header, the empty line, and the first ``lines`` lines of the body (RFC 1939 §7)."""
    end = message.find(b"\r\n\r\n")
    if end < 0:  # no body: the whole message is header
        return retr_payload(message)
    head = message[: end + 4]
    body = message[end + 4:]
    pos = 0
    for _ in range(lines):
        nl = body.find(b"\r\n", pos)
        if nl < 0:
            pos = len(body)
            break
        pos = nl + 2
    return retr_payload(head + body[:pos])


# ---------------------------------------------------------------- SASL PLAIN (RFC 4616)
@dataclass(frozen=True)
class PlainCredentials:
    authzid: str
    authcid: str
    password: str


def decode_plain(b64: str) -> PlainCredentials | None:
    """Decode a PLAIN response (``authzid NUL authcid NUL passwd``); None when malformed."""
    try:
        raw = base64.b64decode(b64.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    parts = raw.split(b"\x00")
    if len(parts) != 3:
        return None
    try:
        authzid, authcid, password = (p.decode("utf-8") for p in parts)
    except UnicodeDecodeError:
        return None
    if not authcid or not password:
        return None
    return PlainCredentials(authzid, authcid, password)
