"""A stored message as every reader serves it (ADR 0002): line ends made CRLF on every way in,
then the per-recipient trace prefix followed by the shared blob, and its size for IMAP
(RFC822.SIZE) and POP3 (LIST, STAT); and the dot-stuffed wire form that SMTP DATA and POP3
RETR send. Pure: bytes in, values out; imports nothing of Postbus.
"""

from __future__ import annotations

import re

__all__ = ["normalize_crlf", "ends_crlf", "crlf_text", "served", "served_size", "retr_text",
           "retr_octets", "dot_stuffed", "wire_form"]

_LINE_END = re.compile(rb"\r?\n|\r")
CRLF = b"\r\n"


def normalize_crlf(raw: bytes) -> bytes:
    """Bare LF and bare CR line ends to CRLF, as IMAP requires (RFC 3501 §2.3.1: sizes count
    CRLF). Every way into the store (delivery, APPEND, import) stores these bytes and
    summarizes them, so that the sizes below match what is served."""
    crlf = raw.count(CRLF)
    if raw.count(b"\n") == crlf and raw.count(b"\r") == crlf:  # already CRLF throughout
        return raw
    return _LINE_END.sub(CRLF, raw)


def ends_crlf(blob: bytes) -> bool:
    """The blob is empty or its last line is ended: POP3 sends it as it is (else RETR adds
    a CRLF, RFC 1939 §3, and LIST counts it; ``MessageSummary.ends_crlf``)."""
    return not blob or blob.endswith(CRLF)


def crlf_text(raw: bytes) -> bytes:
    """``raw`` with every line end CRLF and the last line ended, as a dot-terminated
    multi-line body needs it (RFC 5321 §4.1.1.4, RFC 1939 §3). Empty stays empty."""
    data = normalize_crlf(raw)
    return data if ends_crlf(data) else data + CRLF


def served(prefix: bytes, blob: bytes) -> bytes:
    """The message IMAP serves (BODY[], RFC822, BINARY[]) and export writes: the trace
    prefix, then the blob (ADR 0002). Never serve the blob alone."""
    return prefix + blob


def served_size(prefix: bytes, blob_size: int) -> int:
    """RFC822.SIZE of the served message: ``len(served(prefix, blob))`` without the blob."""
    return len(prefix) + blob_size


def retr_text(prefix: bytes, blob: bytes) -> bytes:
    """What POP3's RETR sends for the message, before byte-stuffing: the served message with
    every line end CRLF and the last line ended (RFC 1939 §3)."""
    return crlf_text(served(prefix, blob))


def retr_octets(prefix: bytes, blob: bytes) -> int:
    """The size LIST and STAT report: octets of ``retr_text``, before byte-stuffing and
    without the terminating ``.`` line (RFC 1939 §11). For a normalized blob and a prefix of
    whole CRLF lines this is ``served_size`` plus 2 when not ``ends_crlf(blob)``."""
    return len(retr_text(prefix, blob))


def dot_stuffed(text: bytes) -> bytes:
    """CRLF ``text`` with one more ``.`` before every line that starts with one, so that no
    line of it reads as the terminator (SMTP RFC 5321 §4.5.2, POP3 RFC 1939 §3)."""
    out = text.replace(b"\r\n.", b"\r\n..")
    if out.startswith(b"."):
        out = b"." + out
    return out


def wire_form(body: bytes) -> bytes:
    """``body`` as sent after DATA's 354 (RFC 5321 §4.5.2, §4.1.1.4): every line end CRLF,
    the last line ended, leading dots doubled, then the ``.`` line. An empty body is the
    ``.`` line alone."""
    return dot_stuffed(crlf_text(body)) + b".\r\n"
