"""Runs every tests/transcripts/smtp/*.txt against a Session with in-memory ports, driven
through the Receiver as server.py drives it.

Format: ``C: line`` is sent (CRLF appended); ``C< b"python bytes"`` is sent as it is (BDAT
chunks, bare line ends, pipelined groups; ``+`` and ``* N`` allowed); each ``S: line`` must be
the next reply line exactly, ``S~ regex`` must match it fully (transcript_support). Directives:

    @settings KEY=VALUE ...          Settings for the next sessions (ints, floats, true/false)
    @user ADDRESS PASSWORD [send_as=A,B] [disabled]
    @domain DOMAIN                   a hosted domain (example.test is one already)
    @peer IP [listener=mx|submission|smtps] [tls] [no-tls]   the next session's client
    @session                         start a new session (its greeting is the next S: line)
    @closed                          the server closed the connection after the last reply
    @queued N                        messages queued so far
    @message N FIELD VALUE           a field of queued message N (1-based): from, to, size,
                                     listener, auth, body-ends (a bytes literal), envid, ret
    @down directory|queue            the port stops answering (Unavailable)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from transcript_support import Transcript, literal_bytes

from postbus.kit.settings import CommonSettings
from postbus.smtp_ingress.memory import (
    Conversation,
    MemoryDirectory,
    MemoryQueue,
    memory_shared,
)
from postbus.smtp_ingress.session import Peer, Session, Shared, receiver_for
from postbus.smtp_ingress.settings import Settings
from postbus.smtp_ingress.testing import DirectoryTable, User

DIR = Path(__file__).resolve().parents[1] / "transcripts" / "smtp"
FILES = sorted(DIR.glob("*.txt"))


def _value(v: str) -> object:
    if v in ("true", "false"):
        return v == "true"
    for kind in (int, float):
        try:
            return kind(v)
        except ValueError:
            pass
    return v


class Runner(Transcript):
    def __init__(self, name: str, tmp: Path) -> None:
        super().__init__(name)
        self.tmp = tmp
        self.table = DirectoryTable(domains={"example.test"})
        self.settings: dict[str, object] = {}
        self.peer = ("127.0.0.1", "mx", False, True)
        self.shared: Shared | None = None
        self.conv: Conversation | None = None
        self.sleeps: list[float] = []

    async def sleep(self, s: float) -> None:
        self.sleeps.append(s)

    def _shared(self) -> Shared:
        if self.shared is None:
            common = CommonSettings(hostname="mx.test")
            self.shared = memory_shared(Settings(common=common, **self.settings),  # type: ignore[arg-type]
                                        self.table, self.tmp / "spool")
        return self.shared

    async def start(self) -> None:
        if self.conv is not None:
            self.conv.session.close()
        shared = self._shared()
        ip, listener, tls, available = self.peer
        session = Session(shared, Peer(ip, 40000, listener, "TLSv1.3" if tls else None,
                                       available), sleep=self.sleep)
        self.conv = Conversation(session, receiver_for(shared.settings))
        self.pending = session.greeting().split(b"\r\n")[:-1]

    async def send(self, lineno: int, data: bytes) -> None:
        if self.conv is None:
            self.fail(lineno, "no @session")
        if self.conv.closed:
            self.fail(lineno, "connection already closed")
        if self.pending:
            self.fail(lineno, f"unread reply lines: {self.pending!r}")
        out = await self.conv.feed(data)
        self.pending += out.split(b"\r\n")[:-1]

    def queue(self) -> MemoryQueue:
        q = self._shared().queue
        assert isinstance(q, MemoryQueue)
        return q

    async def directive(self, lineno: int, text: str) -> None:
        words = text.split()
        cmd = words[0]
        if cmd == "@settings":
            if self.shared is not None:
                self.fail(lineno, "@settings after the first @session")
            self.settings.update({k: _value(v) for k, v in (w.split("=", 1) for w in words[1:])})
        elif cmd == "@user":
            opts = dict(w.split("=", 1) for w in words[3:] if "=" in w)
            self.table.users[words[1].lower()] = User(
                words[2], status="disabled" if "disabled" in words[3:] else "local",
                send_as=opts["send_as"].split(",") if "send_as" in opts else [])
        elif cmd == "@domain":
            self.table.domains.add(words[1])
        elif cmd == "@peer":
            opts = dict(w.split("=", 1) for w in words[2:] if "=" in w)
            self.peer = (words[1], opts.get("listener", "mx"), "tls" in words[2:],
                         "no-tls" not in words[2:])
        elif cmd == "@session":
            await self.start()
        elif cmd == "@closed":
            self.expect_closed(lineno, self.conv is not None and self.conv.closed)
        elif cmd == "@queued":
            if len(self.queue().messages) != int(words[1]):
                self.fail(lineno, f"expected {words[1]} queued, got {len(self.queue().messages)}")
        elif cmd == "@message":
            msg = self.queue().messages[int(words[1]) - 1]
            field, want = words[2], text.split(None, 3)[3]
            values: dict[str, Callable[[], object]] = {
                "from": lambda: msg.mail_from,
                "to": lambda: ",".join(r.address for r in msg.rcpt_to),
                "listener": lambda: msg.client.listener,
                "auth": lambda: msg.client.auth_user,
                "envid": lambda: msg.dsn_envid,
                "ret": lambda: msg.dsn_ret,
                "body-ends": lambda: (msg.body.inline or b"").endswith(literal_bytes(want)),
            }
            got = values[field]()
            if field == "body-ends":
                if got is not True:
                    self.fail(lineno, f"body does not end with {want}: {msg.body.inline!r}")
            elif str(got) != want:
                self.fail(lineno, f"{field}: expected {want!r}, got {got!r}")
        elif cmd == "@down":
            sh = self._shared()
            port = {"directory": sh.directory, "queue": sh.queue}[words[1]]
            assert isinstance(port, MemoryDirectory | MemoryQueue)
            port.down = True
        else:
            self.fail(lineno, f"unknown directive {cmd}")


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
async def test_transcript(path: Path, tmp_path: Path) -> None:
    r = Runner(path.name, tmp_path)
    await r.play(path)
    if r.conv is not None:
        r.conv.session.close()
    sp = r._shared().spool
    assert sp.memory.used == 0 and sp.disk.used == 0 and sp.open_files == 0


def test_there_are_transcripts() -> None:
    assert len(FILES) >= 8
