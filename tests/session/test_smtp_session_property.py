"""Properties of the SMTP session driven through its receiver (part of ``make fuzz``): any
sequence of commands, message data, BDAT chunks and junk gives well-formed replies and no
exception, the same replies however the input is split into reads (chunk-splitting
invariance), and every message byte it held is given back at the end."""

from __future__ import annotations

import asyncio
import re
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from postbus.kit.settings import CommonSettings
from postbus.kit.testing import examples
from postbus.smtp_ingress.memory import Conversation, memory_shared
from postbus.smtp_ingress.session import Peer, Session, receiver_for
from postbus.smtp_ingress.settings import Settings
from postbus.smtp_ingress.testing import DirectoryTable, User

PLAIN_OK = "AGFsaWNlQGV4YW1wbGUudGVzdABzZWNyZXQ="  # alice@example.test / secret

LINES = st.sampled_from([
    "EHLO c.example.net", "HELO c.example.net", "EHLO", "MAIL FROM:<bob@example.net>",
    "MAIL FROM:<alice@example.test> SIZE=100", "MAIL FROM:<> BODY=8BITMIME SMTPUTF8",
    "MAIL FROM:<jörg@example.net>", "MAIL FROM:bad", "RCPT TO:<alice@example.test>",
    "RCPT TO:<nobody@example.test>", "RCPT TO:<x@remote.example> NOTIFY=NEVER",
    "RCPT TO:<Postmaster>", "RCPT TO:<a%b@example.test>", "DATA", "DATA x", "RSET", "NOOP",
    "VRFY x", "EXPN x", "HELP", "STARTTLS", "AUTH PLAIN " + PLAIN_OK, "AUTH PLAIN", PLAIN_OK,
    "AUTH LOGIN", "YWxpY2VAZXhhbXBsZS50ZXN0", "c2VjcmV0", "*", "AUTH FOO", "QUIT", "JUNK",
    "BDAT x", "", "\x00",
]).map(lambda s: s.encode() + b"\r\n")
BODIES = st.sampled_from([
    b"Subject: x\r\n\r\nhello\r\n.\r\n", b".\r\n", b"..dot\r\n.\r\n", b"bare\nLF\r\n.\r\n",
    b"x" * 1200 + b"\r\n.\r\n", b"a\r\n" * 300 + b".\r\n", b"smuggle\n.\nNOOP\r\n.\r\n",
])
CHUNKS = st.tuples(st.binary(max_size=40), st.booleans()).map(
    lambda t: f"BDAT {len(t[0])}{' LAST' if t[1] else ''}\r\n".encode() + t[0])
PARTS = st.one_of(LINES, LINES, LINES, BODIES, CHUNKS, st.binary(max_size=80))
QUEUED = re.compile(rb"queued as \w+")
REPLY = re.compile(rb"^[2-5]\d\d[ -]")


async def converse(stream_pieces: list[bytes], listener: str, tls: bool, spool: Path) -> bytes:
    table = DirectoryTable(users={"alice@example.test": User("secret")})
    s = Settings(common=CommonSettings(hostname="mx.test"), max_message_size=2000,
                 max_line_length=500, max_command_length=200, max_unknown_commands=30)
    shared = memory_shared(s, table, spool)

    async def no_sleep(_: float) -> None:
        return None

    session = Session(shared, Peer("192.0.2.1", 1, listener, "TLSv1.3" if tls else None, True),
                      sleep=no_sleep)
    conv = Conversation(session, receiver_for(shared.settings))
    out = [session.greeting()]
    for piece in stream_pieces:
        if conv.closed:
            break
        out.append(await conv.feed(piece))
    session.close()
    sp = shared.spool
    assert sp.memory.used == 0 and sp.disk.used == 0 and sp.open_files == 0
    return QUEUED.sub(b"queued as Q", b"".join(out))


def split(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(stream) + 1) for c in cuts})
    return [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]


def turns(parts: list[bytes]) -> list[bytes]:
    """The stream as the client's turns: a client waits for the answer to STARTTLS (and
    then starts TLS), so what it sends after it is never in the same read."""
    out, cur = [], b""
    for part in parts:
        cur += part
        if part == b"STARTTLS\r\n":
            out.append(cur)
            cur = b""
    return [*out, cur]


@settings(max_examples=examples(150), deadline=None)
@given(st.lists(PARTS, max_size=30), st.lists(st.integers(min_value=0, max_value=10_000),
                                              max_size=20),
       st.sampled_from(["mx", "submission", "smtps"]), st.booleans())
def test_same_replies_however_the_input_is_split(parts: list[bytes], cuts: list[int],
                                                 listener: str, tls: bool) -> None:
    segments = turns(parts)
    pieces = [p for seg in segments for p in split(seg, cuts)]
    octets = [seg[i:i + 1] for seg in segments for i in range(len(seg))]
    with tempfile.TemporaryDirectory() as tmp:
        whole = asyncio.run(converse(segments, listener, tls, Path(tmp) / "a"))
        split_anyhow = asyncio.run(converse(pieces, listener, tls, Path(tmp) / "b"))
        bytewise = asyncio.run(converse(octets, listener, tls, Path(tmp) / "c"))
    assert split_anyhow == whole
    assert bytewise == whole
    for line in whole.split(b"\r\n")[:-1]:
        assert REPLY.match(line) or line == b"334 " or line.startswith(b"334 "), line
