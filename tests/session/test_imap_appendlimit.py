"""APPENDLIMIT (RFC 7889) in a session against the in-memory ports: the capability after
login, STATUS and LIST-STATUS, and an APPEND past the limit answered NO [TOOBIG] (with a
synchronising literal before its data, with LITERAL+ after skipping it)."""

from __future__ import annotations

from postbus.imap_access.memory import MemoryPlatform
from postbus.imap_access.session import Session, SessionConfig
from postbus.protocols.imap_parser import Limits, Receiver

LIMIT = 5000


class Out:
    def __init__(self) -> None:
        self.buf = bytearray()

    def write(self, data: bytes) -> None:
        self.buf += data

    async def drain(self) -> None:
        return None

    def take(self) -> list[bytes]:
        lines = bytes(self.buf).split(b"\r\n")[:-1]
        self.buf.clear()
        return lines


class Client:
    def __init__(self, append_limit: int | None = LIMIT) -> None:
        self.mp = MemoryPlatform()
        self.mp.add_user("alice@example.test", "secret")
        self.out = Out()
        self.session = Session(directory=self.mp, store=self.mp, blobs=self.mp,
                               changes=self.mp, out=self.out,
                               config=SessionConfig(auth_fail_delay_s=0,
                                                    append_limit=append_limit),
                               client_ip="127.0.0.1", secure=True)
        # the server's receiver bounds a literal by the same number (server.py)
        self.rx = Receiver(limits=Limits(max_line=2000, max_literal=LIMIT,
                                         max_command=2 * LIMIT))
        self.session.greeting()

    async def send(self, data: bytes) -> list[bytes]:
        self.rx.push(data)
        while (item := self.rx.next()) is not None:
            await self.session.handle(item)
        return self.out.take()


async def test_appendlimit_advertised_and_enforced() -> None:
    c = Client()
    greeting = c.out.take()[0]
    assert b"APPENDLIMIT" not in greeting  # only once logged in
    out = await c.send(b"a LOGIN alice@example.test secret\r\nb CAPABILITY\r\n")
    assert b" APPENDLIMIT=5000" in out[0] and b" APPENDLIMIT=5000 " in out[1] + b" "
    # RFC 7889 §3.1 and §3.2
    out = await c.send(b"c STATUS INBOX (APPENDLIMIT MESSAGES)\r\n"
                       b'd LIST "" INBOX RETURN (STATUS (APPENDLIMIT))\r\n')
    assert out[0] == b"* STATUS INBOX (APPENDLIMIT 5000 MESSAGES 0)"
    assert out[-2] == b"* STATUS INBOX (APPENDLIMIT 5000)" and out[-1].startswith(b"d OK")
    # RFC 7889 §4: past the limit the APPEND fails with a tagged NO [TOOBIG]; a synchronising
    # literal before its data is sent (no continuation), a LITERAL+ one after it is skipped
    out = await c.send(b"e APPEND INBOX {5001}\r\n")
    assert out == [b"e NO [TOOBIG] literal too large"]
    out = await c.send(b"f APPEND INBOX {5001+}\r\n" + b"x" * 5001 + b"\r\n")
    assert out == [b"f NO [TOOBIG] literal too large"]
    out = await c.send(b"g APPEND INBOX {5000+}\r\n" + b"y" * 5000 + b"\r\n")
    assert out[-1].startswith(b"g OK [APPENDUID")
    # other commands past the literal bound are still BAD
    out = await c.send(b"h SEARCH TEXT {5001}\r\n")
    assert out == [b"h BAD [TOOBIG] literal too large"]


async def test_no_appendlimit_without_a_limit() -> None:
    c = Client(append_limit=None)
    c.out.take()  # the greeting
    out = await c.send(b"a LOGIN alice@example.test secret\r\nb STATUS INBOX (APPENDLIMIT)\r\n")
    assert b"APPENDLIMIT" not in out[0]
    assert out[1] == b"* STATUS INBOX (APPENDLIMIT NIL)"  # RFC 7889 §5: number / nil
