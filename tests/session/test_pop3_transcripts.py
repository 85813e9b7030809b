"""Runs every tests/transcripts/pop3/*.txt against a Session with in-memory ports.

Format (transcript_support): ``C: line`` is sent through the Receiver, CRLF appended
(``C< b"bytes"`` as it is); each ``S: line`` must be the next reply line exactly, ``S~ regex``
must match it fully. Directives:

    @account ADDRESS PASSWORD [policy=client|keep|delete] [expire=DAYS] [id=N]
    @message ADDRESS b"python bytes literal" [prefix=b"..."]
    @peer IP [tls] [no-tls]          where the next session comes from (default 127.0.0.1)
    @session                         start a new session (its greeting is the next S: line)
    @closed                          the server closed the connection after the last reply
    @drop                            the client disconnects without QUIT
    @store ADDRESS [visible=UIDS] [hidden=UIDS] [gone=UIDS] [seen=UIDS]   (UIDS: 1,2 or -)
    @sleeps N                        login-failure delays so far
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from transcript_support import Transcript

from postbus.pop3_access.memory import (
    MemoryDirectory,
    MemoryLocks,
    MemoryMaildrops,
    MemoryThrottle,
)
from postbus.pop3_access.session import Limits, Peer, Session
from postbus.protocols.pop3 import Receiver

DIR = Path(__file__).resolve().parents[1] / "transcripts" / "pop3"
FILES = sorted(DIR.glob("*.txt"))


def _uids(v: str) -> set[int]:
    return set() if v == "-" else {int(x) for x in v.split(",")}


class Runner(Transcript):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.directory = MemoryDirectory()
        self.store = MemoryMaildrops()
        self.locks = MemoryLocks()
        self.throttle = MemoryThrottle()
        self.sleeps: list[float] = []
        self.peer = Peer("127.0.0.1", tls=False, tls_available=True)
        self.session: Session | None = None
        self.receiver = Receiver()
        self.closed = False

    async def sleep(self, s: float) -> None:
        self.sleeps.append(s)

    async def start(self) -> None:
        if self.session is not None:
            await self.session.abort()
        self.session = Session(directory=self.directory, maildrops=self.store, locks=self.locks,
                               throttle=self.throttle, peer=self.peer, session_id="t",
                               limits=Limits(max_bad_commands=18), sleep=self.sleep,
                               hostname="pop.test")
        self.receiver = Receiver()
        self.pending = self.session.greeting().split(b"\r\n")[:-1]
        self.closed = False

    async def send(self, lineno: int, data: bytes) -> None:
        if self.session is None:
            self.fail(lineno, "no @session")
        if self.closed:
            self.fail(lineno, "connection already closed")
        if self.pending:
            self.fail(lineno, f"unread reply lines: {self.pending!r}")
        for item in self.receiver.feed(data):
            reply = await self.session.handle(item)
            self.pending += reply.data.split(b"\r\n")[:-1]
            if reply.close:
                self.closed = True
            if reply.starttls:
                self.session.tls_started()

    async def directive(self, lineno: int, text: str) -> None:
        parts = text.split(None, 2)
        cmd = parts[0]
        if cmd == "@account":
            addr, pw, *opts = text.split()[1:]
            kw = dict(o.split("=", 1) for o in opts)
            self.directory.add(addr, pw, int(kw["id"]) if "id" in kw else None,
                               policy=kw.get("policy", "client"),
                               expire_days=int(kw["expire"]) if "expire" in kw else None)
        elif cmd == "@message":
            acc = self.directory.accounts[parts[1].lower()]
            rest = parts[2]
            prefix = b""
            m = re.search(r"\s+prefix=(b\".*\")$", rest)
            if m:
                prefix = ast.literal_eval(m.group(1))
                rest = rest[: m.start()]
            self.store.deliver(acc.account_id, ast.literal_eval(rest), prefix)
        elif cmd == "@peer":
            words = text.split()[1:]
            self.peer = Peer(words[0], tls="tls" in words[1:],
                             tls_available="no-tls" not in words[1:])
        elif cmd == "@session":
            await self.start()
        elif cmd == "@closed":
            self.expect_closed(lineno, self.closed)
        elif cmd == "@drop":
            assert self.session is not None
            await self.session.abort()
            self.closed = True
        elif cmd == "@store":
            acc = self.directory.accounts[parts[1].lower()]
            box = self.store.mailbox(acc.account_id)
            present = {m.uid for m in box.messages}
            for cond in text.split()[2:]:
                key, val = cond.split("=", 1)
                want = _uids(val)
                got = {"visible": {m.uid for m in box.messages if not m.hidden},
                       "hidden": {m.uid for m in box.messages if m.hidden},
                       "seen": {m.uid for m in box.messages if m.seen},
                       "gone": want - present}[key]
                if got != want:
                    self.fail(lineno, f"{key}: expected {sorted(want)}, got {sorted(got)}")
        elif cmd == "@sleeps":
            if len(self.sleeps) != int(parts[1]):
                self.fail(lineno, f"expected {parts[1]} delays, got {self.sleeps}")
        else:
            self.fail(lineno, f"unknown directive {cmd}")


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
async def test_transcript(path: Path) -> None:
    await Runner(path.name).play(path)


def test_there_are_transcripts() -> None:
    assert len(FILES) >= 8
