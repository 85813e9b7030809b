"""Mail archive formats for the management API: an incremental mbox reader (mboxrd and
mboxo ``>From`` unescaping), an mbox writer (mboxrd quoting), a Maildir reader (a tar or zip
of ``cur/`` and ``new/``, flags from the ``:2,`` info suffix) and single ``.eml`` files.

Pure apart from reading an archive file already spooled to disk: no SQL, no S3, no NATS.
Memory is bounded by the largest single message (``max_message``), never the archive.
"""

from __future__ import annotations

import email.utils
import re
import tarfile
import time
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import BinaryIO

from postbus.protocols.served import normalize_crlf

DEFAULT_MAX_MESSAGE = 64 * 1024 * 1024
FORMATS = ("mbox", "maildir", "eml")

_QUOTED_FROM = re.compile(rb"^>+From ")
_HEADER_END = re.compile(rb"\r?\n\r?\n")


class FormatError(ValueError):
    """The upload is not in the announced format (or a message is too large)."""


@dataclass(frozen=True)
class ImportedMessage:
    raw: bytes  # CRLF line ends, as IMAP serves it (RFC 3501 §2.3.1)
    flags: list[str] = field(default_factory=list)
    internaldate: datetime | None = None
    source: str = ""  # where it came from, for error reports: "mbox #3", "cur/123:2,S"
    # Maildir++ sub-folder ("Sent", "Work/Projects") or None for the top level / INBOX
    folder: str | None = None


# ---------------------------------------------------------------- flags
def flags_from_status(headers: bytes) -> list[str]:
    """mbox ``Status:``/``X-Status:`` headers (as written by mutt, Python's mailbox) to
    IMAP flags: R -> \\Seen; A -> \\Answered, F -> \\Flagged, T -> \\Draft, D -> \\Deleted."""
    flags: list[str] = []
    for m in re.finditer(rb"(?im)^(x-)?status:[ \t]*([A-Za-z]*)", headers):
        letters = m.group(2).decode("ascii", "replace").upper()
        table = ({"A": "\\Answered", "F": "\\Flagged", "T": "\\Draft", "D": "\\Deleted"}
                 if m.group(1) else {"R": "\\Seen"})
        flags += [f for c, f in table.items() if c in letters and f not in flags]
    return flags


# Maildir info "2,<flags>" (https://cr.yp.to/proto/maildir.html): letters in ASCII order
_MAILDIR_FLAGS = {"D": "\\Draft", "F": "\\Flagged", "P": "$Forwarded", "R": "\\Answered",
                  "S": "\\Seen", "T": "\\Deleted"}


def maildir_flags(name: str) -> list[str]:
    """Flags from a Maildir file name: ``1700000000.M1P2.host:2,FS`` -> [\\Flagged, \\Seen].
    ``!`` is accepted as the separator too (used where ``:`` is not allowed in names)."""
    for sep in (":2,", "!2,"):
        if sep in name:
            info = name.rsplit(sep, 1)[1]
            return [f for c, f in _MAILDIR_FLAGS.items() if c in info]
    return []


def maildir_to_imap_flags(flags: Iterable[str]) -> str:
    """The inverse, for writing: IMAP flags -> Maildir info letters in ASCII order."""
    inv = {v: k for k, v in _MAILDIR_FLAGS.items()}
    return "".join(sorted(inv[f] for f in set(flags) if f in inv))


# ---------------------------------------------------------------- mbox reader
def _from_line_date(line: bytes) -> datetime | None:
    """``From sender Thu Nov 26 17:08:57 2026`` -> that time, as UTC (asctime has no zone)."""
    parts = line.decode("latin-1").split()
    if len(parts) >= 7:
        try:
            return datetime(*time.strptime(" ".join(parts[2:7]), "%a %b %d %H:%M:%S %Y")[:6],
                            tzinfo=UTC)
        except ValueError:
            pass
    return None


class MboxReader:
    """Feed bytes as they arrive; get whole messages back.

    A line starting with ``From `` begins a message (mboxo and mboxrd writers quote every
    such line inside a body). ``>From `` / ``>>From `` lines lose one ``>`` (mboxrd). The
    blank line a writer puts before the next ``From `` line is not part of the message.
    """

    def __init__(self, max_message: int = DEFAULT_MAX_MESSAGE) -> None:
        self.max_message = max_message
        self._buf = b""
        self._lines: list[bytes] = []
        self._size = 0
        self._from: bytes | None = None
        self._count = 0
        self._too_big = False

    def feed(self, data: bytes) -> list[ImportedMessage]:
        out: list[ImportedMessage] = []
        buf = self._buf + data if self._buf else data
        start = 0
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            self._line(buf[start:nl + 1], out)
            start = nl + 1
        self._buf = buf[start:]
        if len(self._buf) > self.max_message:
            raise FormatError(f"a line of more than {self.max_message} bytes")
        return out

    def close(self) -> list[ImportedMessage]:
        """End of input: the last message (and a final line without a newline)."""
        out: list[ImportedMessage] = []
        if self._buf:
            self._line(self._buf, out)
            self._buf = b""
        if self._from is not None:
            self._finish(out)
        elif self._count == 0:
            raise FormatError("not an mbox file: no 'From ' line")
        return out

    def _line(self, line: bytes, out: list[ImportedMessage]) -> None:
        if line.startswith(b"From "):
            if self._from is not None:
                self._finish(out)
            self._from = line
            return
        if self._from is None:
            if line.strip():
                raise FormatError("not an mbox file: it does not start with a 'From ' line")
            return  # blank lines before the first message
        if _QUOTED_FROM.match(line):
            line = line[1:]
        self._size += len(line)
        if self._size > self.max_message:
            self._too_big = True
            return
        self._lines.append(line)

    def _finish(self, out: list[ImportedMessage]) -> None:
        self._count += 1
        if self._too_big:
            raise FormatError(f"message #{self._count} is larger than {self.max_message} bytes")
        lines = self._lines
        if lines and lines[-1] in (b"\n", b"\r\n"):
            lines.pop()
        raw = normalize_crlf(b"".join(lines))
        m = _HEADER_END.search(raw)
        header = raw[:m.start()] if m else raw
        assert self._from is not None
        out.append(ImportedMessage(raw, flags_from_status(header), _from_line_date(self._from),
                                   f"mbox #{self._count}"))
        self._lines, self._size, self._from = [], 0, None


def read_mbox(fp: BinaryIO, *, chunk: int = 1 << 16,
              max_message: int = DEFAULT_MAX_MESSAGE) -> Iterator[ImportedMessage]:
    r = MboxReader(max_message)
    while data := fp.read(chunk):
        yield from r.feed(data)
    yield from r.close()


# ---------------------------------------------------------------- mbox writer
def _sender(raw: bytes) -> str:
    m = _HEADER_END.search(raw)
    header = raw[:m.start()] if m else raw[:8192]
    for pat in (rb"(?im)^return-path:[ \t]*<([^>\r\n]*)>", rb"(?im)^from:[^\r\n]*?<([^>\r\n]+)>",
                rb"(?im)^from:[ \t]*([^\s<>\"]+@[^\s<>\"]+)"):
        hit = re.search(pat, header)
        if hit and hit.group(1).strip():
            s = hit.group(1).decode("ascii", "replace").strip()
            if " " not in s:
                return s
    return "MAILER-DAEMON"


def mbox_from_line(raw: bytes, when: datetime | None) -> bytes:
    t = (when or datetime.now(UTC)).astimezone(UTC)
    return f"From {_sender(raw)} {time.asctime(t.timetuple())}\n".encode()


def mbox_entry(raw: bytes, when: datetime | None = None, flags: Iterable[str] = ()) -> bytes:
    """One message as an mboxrd entry: the ``From `` line, LF line ends, every
    ``>*From `` line quoted with one more ``>``, ``Status``/``X-Status`` from the flags
    (replacing any already there), and the blank line that ends the entry."""
    body = raw.replace(b"\r\n", b"\n")
    m = re.search(rb"\n\n", body)
    head, rest = (body[:m.start() + 1], body[m.start() + 1:]) if m else (body, b"")
    if head and not head.endswith(b"\n"):
        head += b"\n"
    head = re.sub(rb"(?im)^(x-)?status:[^\n]*\n", b"", head)
    fl = set(flags)
    status = b"RO" if "\\Seen" in fl else b"O"
    xs = "".join(c for c, f in (("A", "\\Answered"), ("F", "\\Flagged"), ("T", "\\Draft"),
                                ("D", "\\Deleted")) if f in fl)
    head += b"Status: " + status + b"\n" + (b"X-Status: " + xs.encode() + b"\n" if xs else b"")
    text = head + (rest if m else b"\n")
    text = re.sub(rb"(?m)^(>*From )", rb">\1", text)
    if not text.endswith(b"\n"):
        text += b"\n"
    return mbox_from_line(raw, when) + text + b"\n"


# ---------------------------------------------------------------- Maildir (tar / zip)
def _maildir_kind(path: str) -> str | None:
    """``cur`` or ``new`` when path is a message file of a Maildir, else None."""
    p = PurePosixPath(path.replace("\\", "/"))
    if len(p.parts) < 2 or p.parts[-2] not in ("cur", "new"):
        return None
    if p.name.startswith("."):
        return None
    return p.parts[-2]


def maildir_folder(path: str) -> str | None:
    """The Maildir++ folder of a message path (Dovecot/Courier layout): ``.Sent/cur/x`` ->
    ``Sent``, ``.Work.Projects/new/x`` -> ``Work/Projects``; top-level ``cur/x`` -> None."""
    parts = PurePosixPath(path.replace("\\", "/")).parts
    if len(parts) >= 3:
        d = parts[-3]
        if d.startswith(".") and d not in (".", "..") and len(d) > 1:
            levels = [lv for lv in d[1:].split(".") if lv]
            if levels:
                return "/".join(levels)
    return None


def _check_size(size: int, name: str, max_message: int) -> None:
    if size > max_message:
        raise FormatError(f"{name} is larger than {max_message} bytes")


def read_maildir_archive(path: str, *, max_message: int = DEFAULT_MAX_MESSAGE
                         ) -> Iterator[ImportedMessage]:
    """Messages of a Maildir packed as tar (any compression) or zip, oldest first.
    Maildir++ sub-folders (``.Sent/``, ``.Work.Projects/``) come with their ``folder``.

    Messages in ``new/`` are unseen; those in ``cur/`` carry the ``:2,`` flags of their
    name. Only the member list is held in memory, one message body at a time.
    """
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            infos = [(i, _maildir_kind(i.filename)) for i in z.infolist() if not i.is_dir()]
            entries = sorted(((i, k) for i, k in infos if k),
                             key=lambda e: (datetime(*e[0].date_time),
                                            PurePosixPath(e[0].filename).name))
            if not entries:
                raise FormatError("no Maildir messages (cur/ or new/) in the zip archive")
            for info, kind in entries:
                _check_size(info.file_size, info.filename, max_message)
                raw = z.read(info)
                flags = maildir_flags(PurePosixPath(info.filename).name) if kind == "cur" else []
                yield ImportedMessage(normalize_crlf(raw), flags,
                                      datetime(*info.date_time, tzinfo=UTC), info.filename,
                                      maildir_folder(info.filename))
        return
    try:
        tf = tarfile.open(path, mode="r:*")
    except tarfile.TarError as exc:
        raise FormatError("a Maildir upload must be a tar or zip archive") from exc
    with tf:
        members = [(m, _maildir_kind(m.name)) for m in tf.getmembers() if m.isfile()]
        chosen = sorted(((m, k) for m, k in members if k), key=lambda e: (e[0].mtime, PurePosixPath(e[0].name).name))
        if not chosen:
            raise FormatError("no Maildir messages (cur/ or new/) in the tar archive")
        for member, kind in chosen:
            _check_size(member.size, member.name, max_message)
            f = tf.extractfile(member)
            if f is None:
                continue
            raw = f.read()
            flags = maildir_flags(PurePosixPath(member.name).name) if kind == "cur" else []
            yield ImportedMessage(normalize_crlf(raw), flags,
                                  datetime.fromtimestamp(member.mtime, UTC), member.name,
                                  maildir_folder(member.name))


# ---------------------------------------------------------------- .eml
def read_eml(fp: BinaryIO, *, max_message: int = DEFAULT_MAX_MESSAGE) -> Iterator[ImportedMessage]:
    raw = fp.read(max_message + 1)
    _check_size(len(raw), "the message", max_message)
    if not raw.strip():
        raise FormatError("empty message")
    head = raw[:raw.find(b"\n\n")] if b"\n\n" in raw else raw[:4096]
    if not re.match(rb"^[!-9;-~]+:", head.replace(b"\r", b"")):
        raise FormatError("not an RFC 5322 message: it does not start with a header field")
    date = None
    hit = re.search(rb"(?im)^date:[ \t]*([^\r\n]+)", head)
    if hit:
        try:
            date = email.utils.parsedate_to_datetime(hit.group(1).decode("latin-1"))
            if date.tzinfo is None:
                date = date.replace(tzinfo=UTC)
        except (TypeError, ValueError):
            date = None
    yield ImportedMessage(normalize_crlf(raw), [], date, "eml")


def read_archive(fmt: str, path: str, *, max_message: int = DEFAULT_MAX_MESSAGE
                 ) -> Iterator[ImportedMessage]:
    """Every message of an uploaded file (already on disk) in the named format."""
    if fmt == "maildir":
        yield from read_maildir_archive(path, max_message=max_message)
        return
    if fmt not in ("mbox", "eml"):
        raise FormatError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    with open(path, "rb") as fp:
        if fmt == "mbox":
            yield from read_mbox(fp, max_message=max_message)
        else:
            yield from read_eml(fp, max_message=max_message)
