"""protocols.lines.LineBuffer: the line reading shared by the SMTP and POP3 receivers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postbus.protocols.lines import TOO_LONG, LineBuffer, TooLong


def drain(lb: LineBuffer, data: bytes, step: int) -> list[bytes | TooLong]:
    out: list[bytes | TooLong] = []
    for i in range(0, len(data), step):
        lb.buf += data[i:i + step]
        while (line := lb.next()) is not None:
            out.append(line)
    return out


@pytest.mark.parametrize(("data", "lines"), [
    (b"a\r\nb\nc", [b"a\r", b"b"]),  # the CR is left for the caller
    (b"12345\r\n", [TOO_LONG]),  # the CR counts
    (b"1234\r\nok\n", [b"1234\r", b"ok"]),
    (b"123456789\nok\n", [TOO_LONG, b"ok"]),  # reported once, the rest dropped to its LF
    (b"\n\n", [b"", b""]),
])
@pytest.mark.parametrize("step", [1, 2, 7, 4096])
def test_lines(data: bytes, lines: list[bytes | TooLong], step: int) -> None:
    assert drain(LineBuffer(5), data, step) == lines


def test_too_long_is_said_before_the_line_ends() -> None:
    lb = LineBuffer(5)
    lb.buf += b"123456"
    assert lb.next() is TOO_LONG and not lb.buf
    lb.buf += b"789"
    assert lb.next() is None and not lb.buf  # still inside the long line
    lb.buf += b"\nok\n"
    assert lb.next() == b"ok"


@given(st.binary(max_size=200), st.integers(1, 50))
def test_splitting_never_changes_the_lines(data: bytes, step: int) -> None:
    assert drain(LineBuffer(16), data, step) == drain(LineBuffer(16), data, len(data) or 1)
