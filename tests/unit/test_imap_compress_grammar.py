"""COMPRESS (RFC 4978 §5) grammar: the command, what is not one, and the same result however
the bytes arrive."""

from __future__ import annotations

import pytest

from postbus.protocols import imap_parser as p

GOOD = [
    (b"a COMPRESS DEFLATE\r\n", p.Compress("a", "DEFLATE")),
    (b"a compress deflate\r\n", p.Compress("a", "DEFLATE")),
    # an unknown mechanism parses: the session answers it BAD (RFC 4978 §3)
    (b"b COMPRESS X-LZ4\r\n", p.Compress("b", "X-LZ4")),
]

BAD = [
    b"a COMPRESS\r\n",
    b"a COMPRESS \r\n",
    b"a COMPRESS DEFLATE DEFLATE\r\n",
    b'a COMPRESS "DEFLATE"\r\n',
    b"a COMPRESS (DEFLATE)\r\n",
    b"a UID COMPRESS DEFLATE\r\n",
]


@pytest.mark.parametrize("data,expected", GOOD)
def test_compress_commands(data: bytes, expected: p.Compress) -> None:
    assert p.parse_command(data.rstrip(b"\r\n")) == expected


@pytest.mark.parametrize("data", BAD)
def test_not_compress_commands(data: bytes) -> None:
    got = p.Receiver().feed(data)
    assert len(got) == 1 and isinstance(got[0], p.Bad) and got[0].tag == "a"


@pytest.mark.parametrize("step", [1, 2, 7, 4096])
def test_chunking_invariance(step: int) -> None:
    data = b"a COMPRESS DEFLATE\r\nb NOOP\r\nc COMPRESS nope\r\n"
    rx = p.Receiver()
    got: list[object] = []
    for i in range(0, len(data), step):
        got += rx.feed(data[i:i + step])
    assert got == [p.Compress("a", "DEFLATE"), p.Noop("b"), p.Compress("c", "NOPE")]
    assert rx.pending == 0
