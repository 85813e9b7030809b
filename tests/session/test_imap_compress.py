"""COMPRESS (RFC 4978 §3) answered by a session against the in-memory ports: only after
login, BAD for an unknown mechanism or where the server cannot compress, NO
[COMPRESSIONACTIVE] when a layer compresses already; the stream itself is server.py's."""

from __future__ import annotations

import imap_support

LOGIN = b"a LOGIN alice@example.test secret\r\n"


async def test_compress_once_after_login() -> None:
    c = imap_support.Client(compress_available=True)
    assert b"COMPRESS" not in c.out.take()[0]
    assert (await c.send(b"z COMPRESS DEFLATE\r\n"))[0].startswith(b"z BAD")
    assert b" COMPRESS=DEFLATE" in (await c.send(LOGIN))[-1]
    assert (await c.send(b"b COMPRESS X-LZ4\r\n"))[0].startswith(b"b BAD")
    assert not c.session.start_compress
    assert await c.send(b"c COMPRESS DEFLATE\r\n") == [b"c OK DEFLATE active"]
    assert c.session.start_compress  # the server wraps the stream after this answer
    c.session.start_compress = False
    assert (await c.send(b"d COMPRESS DEFLATE\r\n"))[0].startswith(
        b"d NO [COMPRESSIONACTIVE] DEFLATE")
    await c.send(b"e SELECT INBOX\r\n")
    assert (await c.send(b"f COMPRESS DEFLATE\r\n"))[0].startswith(b"f NO [COMPRESSIONACTIVE]")


async def test_tls_compressing_already() -> None:
    c = imap_support.Client(compress_available=True)
    c.session.compression = "TLS"
    await c.send(LOGIN)
    assert (await c.send(b"b COMPRESS DEFLATE\r\n"))[0].startswith(
        b"b NO [COMPRESSIONACTIVE] TLS")
    assert not c.session.start_compress


async def test_not_advertised_nor_accepted_without_the_server() -> None:
    c = imap_support.Client()
    assert b"COMPRESS" not in (await c.send(LOGIN))[-1]
    assert (await c.send(b"b COMPRESS DEFLATE\r\n"))[0].startswith(b"b BAD")
