"""SMTP client wire format, pure: reply parsing from a byte buffer (RFC 5321 §4.2) and the
DATA body encoding (§4.5.2). No asyncio, no sockets.
"""

from __future__ import annotations

from postbus.protocols.served import wire_form

MAX_REPLY_LINE = 4096  # RFC 5321 §4.5.3.1.5 says 512; servers send longer text
MAX_REPLY_LINES = 200


class ReplyError(ValueError):
    """The server sent something that is not an SMTP reply."""


def split_replies(buf: bytearray) -> list[tuple[int, str]]:
    """Remove every complete reply from the front of ``buf`` and return them in order as
    (code, text), the lines of a multi-line reply joined with "\\n". An incomplete reply
    stays in ``buf``. Raises ReplyError on junk or on over-long input."""
    out: list[tuple[int, str]] = []
    while True:
        pos = 0
        lines: list[bytes] = []
        complete = False
        while True:
            nl = buf.find(b"\n", pos)
            if nl < 0:
                if len(buf) - pos > MAX_REPLY_LINE:
                    raise ReplyError("reply line too long")
                break
            line = bytes(buf[pos:nl]).rstrip(b"\r")
            pos = nl + 1
            if len(line) > MAX_REPLY_LINE:
                raise ReplyError("reply line too long")
            if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b"", b" ", b"-"):
                raise ReplyError(f"not an SMTP reply: {line[:40]!r}")
            if lines and line[:3] != lines[0][:3]:
                raise ReplyError("reply code changed inside a multi-line reply")
            lines.append(line)
            if len(lines) > MAX_REPLY_LINES:
                raise ReplyError("reply has too many lines")
            if line[3:4] != b"-":
                complete = True
                break
        if not complete:
            return out
        del buf[:pos]
        text = "\n".join(ln[4:].decode("utf-8", "replace").strip() for ln in lines)
        out.append((int(lines[0][:3]), text))


def data_payload(body: bytes) -> bytes:
    """The bytes to send after a 354: the wire form of ``protocols.served`` (CRLF line ends,
    leading dots doubled, the final ``CRLF.CRLF``; RFC 5321 §4.5.2, §4.1.1.4)."""
    return wire_form(body)
