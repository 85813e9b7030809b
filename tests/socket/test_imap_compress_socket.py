"""COMPRESS=DEFLATE (RFC 4978) through a real imap-access listener on port 0. Python's imaplib
has no COMPRESS, so a raw socket with zlib plays the client: the command's rules, traffic
larger than one read both ways, pipelined input, a corrupt stream and a decompression bomb."""

from __future__ import annotations

import base64
import os
import re
import shutil
import socket
import time
import tracemalloc
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_imap_more_clients import mutt_copy_all
from test_imap_socket import PASSWORD, USER, Running, _insecure_ctx, _start

from postbus.imap_access import server as server_mod
from postbus.imap_access.server import READ_SIZE

pytestmark = pytest.mark.timeout(60)

_LITERAL = re.compile(rb"\{(\d+)\}\r\n$")


@pytest.fixture
def imap(tmp_path: Path) -> Iterator[Running]:
    yield from _start(tmp_path)


class Client:
    """IMAP over a raw socket that can switch both directions to raw DEFLATE."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(10)
        self.buf = b""
        self.z: zlib._Compress | None = None
        self.d: zlib._Decompress | None = None
        self.received = 0  # octets off the wire (compressed when compressing)
        self.greeting = self.line()

    def send(self, data: bytes) -> None:
        if self.z is not None:
            data = self.z.compress(data) + self.z.flush(zlib.Z_SYNC_FLUSH)
        self.sock.sendall(data)

    def _more(self) -> bool:
        chunk = self.sock.recv(65536)
        if not chunk:
            return False
        self.received += len(chunk)
        self.buf += chunk if self.d is None else self.d.decompress(chunk)
        return True

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if not self._more():
                raise EOFError(self.buf)
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line + b"\r\n"

    def exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._more():
                raise EOFError(self.buf)
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def response(self, tag: bytes) -> list[bytes]:
        """Every response up to the tagged one; a literal stays inside its line."""
        out = []
        while True:
            resp = self.line()
            while m := _LITERAL.search(resp):
                resp += self.exact(int(m.group(1)))
                resp += self.line()
            out.append(resp)
            if resp.startswith(tag + b" "):
                return out

    def cmd(self, tag: bytes, text: bytes) -> list[bytes]:
        self.send(tag + b" " + text + b"\r\n")
        return self.response(tag)

    def compress(self, tag: bytes = b"z") -> None:
        self.sock.sendall(tag + b" COMPRESS DEFLATE\r\n")
        ok = self.response(tag)[-1]
        assert ok.startswith(tag + b" OK"), ok
        assert self.buf == b""  # compressed from the octet after the tagged OK
        self.z, self.d = zlib.compressobj(wbits=-15), zlib.decompressobj(wbits=-15)

    def closed(self) -> bool:
        try:
            while self._more():
                pass
        except (ConnectionError, TimeoutError):
            return False
        return True


def _login(port: int) -> Client:
    c = Client(socket.create_connection(("127.0.0.1", port)))
    assert c.cmd(b"a", b"LOGIN %s %s" % (USER.encode(), PASSWORD.encode()))[-1].startswith(b"a OK")
    return c


def _big_message() -> bytes:
    body = base64.encodebytes(os.urandom(240_000)).replace(b"\n", b"\r\n")
    msg = (b"From: Bob <bob@example.net>\r\nTo: Alice <alice@example.test>\r\n"
           b"Subject: big\r\nMIME-Version: 1.0\r\nContent-Type: application/octet-stream\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\n" + body)
    assert len(msg) > 2 * READ_SIZE
    return msg


def test_compress_rules_and_a_large_message_both_ways(imap: Running) -> None:
    c = Client(socket.create_connection(("127.0.0.1", imap.port)))
    assert b"COMPRESS=DEFLATE" not in c.greeting  # valid only once authenticated
    assert c.cmd(b"a", b"COMPRESS DEFLATE")[-1].startswith(b"a BAD")
    ok = c.cmd(b"b", b"LOGIN %s %s" % (USER.encode(), PASSWORD.encode()))[-1]
    assert b" COMPRESS=DEFLATE" in ok
    assert c.cmd(b"c", b"CAPABILITY")[0].rstrip().endswith(b"COMPRESS=DEFLATE")
    assert c.cmd(b"d", b"COMPRESS LZMA")[-1].startswith(b"d BAD")
    c.compress(b"e")
    msg = _big_message()
    c.send(b"f APPEND INBOX {%d}\r\n" % len(msg))
    assert c.line().startswith(b"+ ")
    sent_before = len(msg)
    c.send(msg + b"\r\n")
    assert c.response(b"f")[-1].startswith(b"f OK [APPENDUID ")
    sel = c.cmd(b"g", b"SELECT INBOX")
    assert b"* 2 EXISTS\r\n" in sel and sel[-1].startswith(b"g OK")
    received = c.received
    fetched = c.cmd(b"h", b"FETCH 2 (BODY.PEEK[])")
    assert fetched[0] == b"* 2 FETCH (BODY[] {%d}\r\n" % len(msg) + msg + b")\r\n"
    assert fetched[-1].startswith(b"h OK")
    assert c.received - received < sent_before  # it did travel compressed
    again = c.cmd(b"i", b"COMPRESS DEFLATE")[-1]
    assert again.startswith(b"i NO [COMPRESSIONACTIVE]")
    assert c.cmd(b"j", b"NOOP")[-1].startswith(b"j OK")
    assert c.cmd(b"k", b"LOGOUT")[0].startswith(b"* BYE")
    assert c.closed()


def test_input_sent_with_the_command_is_inflated(imap: Running) -> None:
    """A client that does not wait for the tagged OK (it should, RFC 4978 §3): what follows
    COMPRESS in the same packet is compressed and must not be read as plain text."""
    c = _login(imap.port)
    z = zlib.compressobj(wbits=-15)
    c.sock.sendall(b"b COMPRESS DEFLATE\r\n" + z.compress(b"c NOOP\r\n")
                   + z.flush(zlib.Z_SYNC_FLUSH))
    assert c.response(b"b")[-1].startswith(b"b OK")
    c.z, c.d = z, zlib.decompressobj(wbits=-15)
    c.buf = c.d.decompress(c.buf)  # the answer to c may have come with the tagged OK
    assert c.response(b"c")[-1].startswith(b"c OK")


def test_compress_over_implicit_tls(imap: Running) -> None:
    assert imap.tls_port is not None
    raw = socket.create_connection(("127.0.0.1", imap.tls_port))
    c = Client(_insecure_ctx().wrap_socket(raw, server_hostname="localhost"))
    assert c.cmd(b"a", b"LOGIN %s %s" % (USER.encode(), PASSWORD.encode()))[-1].startswith(b"a OK")
    c.compress(b"b")
    lines = c.cmd(b"c", b"SELECT INBOX")
    assert lines[-1].startswith(b"c OK")
    assert c.cmd(b"d", b"FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])")[-1].startswith(b"d OK")


def test_corrupt_stream_says_bye_and_closes(imap: Running) -> None:
    c = _login(imap.port)
    c.compress()
    c.sock.sendall(b"\xff\xff\xff\xff")  # BFINAL=1, BTYPE=11: a reserved block type
    assert c.line().startswith(b"* BYE")
    assert c.closed()


def test_decompression_bomb_stays_bounded_and_closes(imap: Running) -> None:
    """About 32 KB that inflate to 32 MB on one line: the server inflates one read's worth
    at a time, refuses the line at the line limit and closes, holding little memory."""
    c = _login(imap.port)
    c.compress()
    assert c.z is not None
    chunk = b"A" * 65536
    bomb = [c.z.compress(b"b NOOP ")] + [c.z.compress(chunk) for _ in range(512)]
    bomb.append(c.z.flush(zlib.Z_SYNC_FLUSH))
    payload = b"".join(bomb)
    assert len(payload) < 64 * 1024
    tracemalloc.start()
    try:
        started = time.monotonic()
        c.sock.sendall(payload)
        first = c.line()
        assert first.startswith(b"b BAD [TOOBIG]"), first
        assert c.line().startswith(b"* BYE")
        assert c.closed()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024  # 32 MB inflated would show here
    assert time.monotonic() - started < 10



@pytest.mark.skipif(shutil.which("mutt") is None or shutil.which("script") is None,
                    reason="mutt or script not installed")
def test_mutt_with_imap_deflate(imap: Running, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A real client (mutt, imap_deflate=yes) negotiates COMPRESS and reads the inbox."""
    started: list[object] = []

    class Spy(server_mod._Deflate):
        def __init__(self) -> None:
            super().__init__()
            started.append(self)

    monkeypatch.setattr(server_mod, "_Deflate", Spy)
    imap.deliver(b"From: Carol <carol@example.net>\r\nSubject: second\r\n\r\nmore\r\n")
    mbox = mutt_copy_all(imap, tmp_path, "set imap_deflate=yes\n")
    assert b"Subject: hello" in mbox and b"Subject: second" in mbox and b"see you." in mbox
    assert started  # mutt asked for COMPRESS DEFLATE and the stream was wrapped
