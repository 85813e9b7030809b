"""The COMPRESS=DEFLATE stream of imap-access (RFC 4978): every inflate is bounded however
much the input expands, the unconsumed rest is kept, corrupt or ended streams are errors."""

from __future__ import annotations

import zlib

import pytest

from postbus.imap_access.server import _Deflate


def _client_deflate(data: bytes, finish: bool = False) -> bytes:
    z = zlib.compressobj(wbits=-15)
    return z.compress(data) + z.flush(zlib.Z_FINISH if finish else zlib.Z_SYNC_FLUSH)


def test_inflate_is_bounded_and_loses_nothing() -> None:
    plain = b"A" * (8 * 1024 * 1024) + b"\r\n"
    d = _Deflate()
    d.push(_client_deflate(plain))
    got, batches = bytearray(), 0
    while d.more:
        out = d.inflate(65536)
        assert len(out) <= 65536
        got += out
        batches += 1
    assert bytes(got) == plain and batches >= len(plain) // 65536


@pytest.mark.parametrize("step", [1, 7, 4096])
def test_input_in_pieces(step: int) -> None:
    plain = b"a NOOP\r\n" * 1000
    data = _client_deflate(plain)
    d, got = _Deflate(), bytearray()
    for i in range(0, len(data), step):
        d.push(data[i:i + step])
        while d.more:
            got += d.inflate(100)
    assert bytes(got) == plain


def test_output_is_flushed_per_batch() -> None:
    d, client = _Deflate(), zlib.decompressobj(wbits=-15)
    for batch in (b"* OK first\r\n", b"a OK second\r\n"):
        assert client.decompress(d.deflate(batch)) == batch  # nothing held back


def test_corrupt_input_is_an_error() -> None:
    d = _Deflate()
    d.push(b"\xff\xff\xff\xff")
    with pytest.raises(zlib.error):
        d.inflate(65536)


def test_data_after_the_end_of_the_stream_is_an_error() -> None:
    d = _Deflate()
    d.push(_client_deflate(b"a LOGOUT\r\n", finish=True))
    assert d.inflate(65536) == b"a LOGOUT\r\n"
    with pytest.raises(zlib.error):
        d.push(b"x")
