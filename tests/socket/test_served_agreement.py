"""IMAP RFC822.SIZE, POP3 LIST and the bytes each serves agree, for every shape of line end a
message can arrive with (issue 11 item 3): the real IMAP and POP3 sessions over the store
port of every flavour (the in-memory stores, and mailbox-store over a real nats-server on
SQLite and PostgreSQL: ``test_store_port_contract``). The message served is the trace
prefix, then the blob with CRLF line ends (ADR 0002, ``protocols.served``); POP3 sends the
same bytes and ends an unterminated last line (RFC 1939 §3), and counts that CRLF in LIST.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest
import test_store_port_contract as contract
from test_store_port_contract import Backend

from postbus.imap_access.memory import MemoryPlatform
from postbus.imap_access.session import Session as ImapSession
from postbus.imap_access.session import SessionConfig
from postbus.pop3_access.memory import MemoryLocks, MemoryThrottle
from postbus.pop3_access.session import Limits, Peer
from postbus.pop3_access.session import Session as Pop3Session
from postbus.proto.directory import AuthReply
from postbus.proto.store import AppendRequest
from postbus.protocols import pop3
from postbus.protocols.imap_parser import Receiver
from postbus.protocols.served import normalize_crlf, served

pytestmark = [pytest.mark.timeout(180), pytest.mark.asyncio(loop_scope="module")]
# the contract suite's store of every flavour (module-scoped: one per flavour here too)
backend = contract.backend

PREFIX = b"Return-Path: <bob@example.net>\r\nDelivered-To: alice@example.test\r\n"
HEAD = b"From: bob@example.net\r\nSubject: shapes\r\n"
SHAPES = {
    "crlf": HEAD + b"\r\nline one\r\nline two\r\n",
    "bare LF": b"From: bob@example.net\nSubject: shapes\n\nline one\nline two\n",
    "bare CR": HEAD + b"\r\nline one\rline two\r\n",
    "bare CR last": HEAD + b"\r\nline one\r",
    "mixed": b"From: bob@example.net\r\nSubject: shapes\n\r\none\r\rtwo\n.three\r\n\n",
    "no final line end": HEAD + b"\r\nline one\r\nlast",
    "bare LF, no final line end": HEAD + b"\nline one\nlast",
    "empty body": HEAD + b"\r\n",
    "header only, no line end": b"Subject: shapes",
    "empty": b"",
}


class Out(bytearray):
    """Where the IMAP session writes: every byte, kept."""

    write = bytearray.extend

    async def drain(self) -> None:
        return None


class OneUser:
    """The directory of both sessions: one account, any password."""

    def __init__(self, account: int) -> None:
        self.account = account

    async def authenticate(self, username: str, password: str,
                           client_ip: str | None) -> AuthReply:
        return AuthReply(ok=True, account_id=self.account, address=username)


class Imap:
    def __init__(self, b: Backend, account: int) -> None:
        self.out = Out()
        self.session = ImapSession(directory=OneUser(account), store=b.store, blobs=b.blobs,
                                   changes=b.changes, out=self.out,
                                   config=SessionConfig(auth_fail_delay_s=0), secure=True)
        self.rx = Receiver(max_line=2000, max_literal=1 << 20)
        self.n = 0

    async def cmd(self, line: bytes) -> bytes:
        self.n += 1
        tag = b"t%d" % self.n
        self.rx.push(tag + b" " + line + b"\r\n")
        while (item := self.rx.next()) is not None:
            await self.session.handle(item)
        out = bytes(self.out)
        self.out.clear()
        assert re.search(rb"(^|\r\n)" + tag + rb" OK ", out), out
        return out

    async def append(self, raw: bytes) -> None:
        await self.cmd(b"APPEND INBOX {%d+}\r\n" % len(raw) + raw)

    async def messages(self) -> list[tuple[int, bytes, int]]:
        """(RFC822.SIZE, BODY[], BINARY.SIZE[]) of every message in INBOX, in UID order."""
        await self.cmd(b"SELECT INBOX")
        out = await self.cmd(b"UID FETCH 1:* (RFC822.SIZE BODY.PEEK[] BINARY.SIZE[])")
        found = []
        for m in re.finditer(rb"\* \d+ FETCH \(", out):
            rest = out[m.end():]
            size = int(re.search(rb"RFC822\.SIZE (\d+)", rest).group(1))  # type: ignore[union-attr]
            lit = re.search(rb"BODY\[\] \{(\d+)\}\r\n", rest)
            assert lit is not None, rest[:200]
            body = rest[lit.end():lit.end() + int(lit.group(1))]
            binary = int(re.search(rb"BINARY\.SIZE\[\] (\d+)", rest).group(1))  # type: ignore[union-attr]
            found.append((size, body, binary))
        return found


async def pop3_messages(b: Backend, account: int) -> list[tuple[int, bytes]]:
    """(LIST size, RETR octets unstuffed) of every message, by message number."""

    async def no_sleep(_s: float) -> None:
        return None

    s = Pop3Session(directory=OneUser(account), maildrops=b.maildrops, locks=MemoryLocks(),
                    throttle=MemoryThrottle(), peer=Peer("127.0.0.1", False, False),
                    limits=Limits(), sleep=no_sleep, session_id="served")
    assert (await s.handle(pop3.User("alice@example.test"))).data.startswith(b"+OK")
    assert (await s.handle(pop3.Pass("x"))).data.startswith(b"+OK")
    listing = (await s.handle(pop3.List())).data.split(b"\r\n")
    assert listing[0].startswith(b"+OK") and listing[-2:] == [b".", b""]
    sizes = [int(line.split()[1]) for line in listing[1:-2]]
    out = []
    for n, size in enumerate(sizes, 1):
        reply = (await s.handle(pop3.Retr(n))).data
        first, _, rest = reply.partition(b"\r\n")
        assert first == b"+OK %d octets" % size and rest.endswith(b".\r\n")
        text = rest[:-3]  # CRLF text, or nothing at all (RFC 1939 §3)
        assert not text or text.endswith(b"\r\n")
        unstuffed = re.sub(rb"(^|\r\n)\.", rb"\1", text)
        out.append((size, unstuffed))
    await s.handle(pop3.Quit())
    return out


async def test_imap_and_pop3_sizes_and_bytes_agree_for_every_line_end(backend: Backend) -> None:
    b = backend
    account = await b.new_account()
    imap = Imap(b, account)
    await imap.cmd(b"LOGIN alice@example.test x")
    raws = list(SHAPES.values())
    # delivery: mime-processor normalizes, the store keeps the prefix beside the blob
    for raw in raws:
        await b.deliver(account, normalize_crlf(raw), PREFIX)
        if isinstance(b.store, MemoryPlatform):  # its POP3 maildrops are a store of their own
            b.store.deliver(account, normalize_crlf(raw), prefix=PREFIX)
    # APPEND through the IMAP session (imap-access normalizes and uploads), then an APPEND
    # literal handed to the store as is (the store normalizes)
    for raw in raws:
        await imap.append(raw)
    for raw in raws:
        await b.store.append(AppendRequest(
            account_id=account, mailbox="INBOX", flags=[], message=raw,
            internaldate=datetime(2026, 12, 3, tzinfo=UTC)))
    # and a blob uploaded as it came, with nothing else: the store reads and normalizes it
    for raw in raws:
        await b.store.append(AppendRequest(
            account_id=account, mailbox="INBOX", flags=[], blob_key=await b.blobs.put(raw),
            internaldate=datetime(2026, 12, 3, tzinfo=UTC)))
    want = ([served(PREFIX, normalize_crlf(r)) for r in raws]
            + [normalize_crlf(r) for r in raws] * 3)

    got_imap = await imap.messages()
    assert [body for _, body, _ in got_imap] == want
    assert all(body.count(b"\r") == body.count(b"\n") == body.count(b"\r\n")
               for _, body, _ in got_imap)  # CRLF line ends only (RFC 3501 §2.3.1)
    wrong = [(name, size, binary, len(body))
             for name, (size, body, binary) in zip(list(SHAPES) * 4, got_imap, strict=True)
             if not size == binary == len(body)]
    assert wrong == []  # RFC822.SIZE is the size of what BODY[] and BINARY[] serve

    got_pop3 = await pop3_messages(b, account)
    # the in-memory POP3 store has only the deliveries; the SQL store has every message
    assert len(got_pop3) == (len(raws) if isinstance(b.store, MemoryPlatform) else len(want))
    wrong = []
    for name, (size, text), (imap_size, body, _) in zip(list(SHAPES) * 4, got_pop3, got_imap,
                                                        strict=False):
        ended = body if not body or body.endswith(b"\r\n") else body + b"\r\n"
        if not (size == len(text) and text == ended
                and size == imap_size + len(ended) - len(body)):
            wrong.append((name, size, len(text), imap_size))
    assert wrong == []  # POP3 serves IMAP's bytes, its last line ended, and LIST counts them
