"""Command lines out of a byte stream, bounded: the line reading that the SMTP and POP3
receivers share. Pure: bytes in, lines out, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final


@dataclass(frozen=True)
class LineItem:
    """The base of what a receiver reads: ``raw`` is the line as received, without its line
    end (a SASL response is read from it); not compared, not shown."""

    raw: bytes = field(default=b"", compare=False, repr=False, kw_only=True)


class TooLong:
    """A line went past the bound; it is discarded up to its LF and reported once."""


TOO_LONG: Final = TooLong()


class LineBuffer:
    """Lines ending in LF (a CRLF or a bare LF). ``max_line`` bounds the octets before
    the LF, a CR included (as asyncio's ``readuntil``): a longer line comes out once as
    ``TOO_LONG``, as soon as it is longer (not when the client chooses to end it), and
    the rest of it up to its LF is dropped. ``buf`` is what is not yet a whole line; a
    receiver that also reads message octets takes them from there."""

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self.buf = bytearray()
        self._skipping = False  # inside an over-long line, discarding up to its LF

    def next(self) -> bytes | TooLong | None:
        """The next line without its LF (a CR before it is left for the caller), TOO_LONG,
        or None when ``buf`` holds no whole line."""
        buf = self.buf
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                if len(buf) > self.max_line and not self._skipping:
                    self._skipping = True
                    buf.clear()
                    return TOO_LONG
                if self._skipping:
                    buf.clear()
                return None
            line = bytes(buf[:nl])
            del buf[:nl + 1]
            if self._skipping:
                self._skipping = False
                continue
            if len(line) > self.max_line:
                return TOO_LONG
            return line

    def clear(self) -> None:
        self.buf.clear()
        self._skipping = False
