"""An IMAP session over the in-memory platform, driven without a socket: what the command
tests (APPENDLIMIT, CATENATE, THREAD) and the transcript runner share."""

from __future__ import annotations

from typing import Any

from postbus.imap_access.memory import MemoryPlatform
from postbus.imap_access.session import Session, SessionConfig
from postbus.protocols.imap_parser import Limits, Receiver


class Out:
    """The session's output, gathered; ``take`` hands back whole CRLF lines."""

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

    def take_lines(self) -> list[str]:
        text = self.buf.decode("utf-8", "replace")
        self.buf.clear()
        lines = text.split("\r\n")
        assert lines[-1] == "", f"output does not end with CRLF: {text!r}"
        return lines[:-1]


class Client:
    """alice (password "secret") on a fresh MemoryPlatform, greeted, not logged in.
    ``config``: SessionConfig fields; the receiver takes lines of 4,000 octets and literals
    of ``max_literal``, or ``limits``."""

    def __init__(self, *, max_literal: int = 100_000, limits: Limits | None = None,
                 **config: Any) -> None:
        self.mp = MemoryPlatform()
        self.acc = self.mp.add_user("alice@example.test", "secret")
        self.out = Out()
        self.session = Session(directory=self.mp, store=self.mp, blobs=self.mp,
                               changes=self.mp, out=self.out,
                               config=SessionConfig(**{"auth_fail_delay_s": 0, **config}),
                               client_ip="127.0.0.1", secure=True)
        self.rx = (Receiver(limits=limits) if limits is not None
                   else Receiver(max_line=4000, max_literal=max_literal))
        self.session.greeting()

    async def send(self, data: bytes) -> list[bytes]:
        self.rx.push(data)
        while (item := self.rx.next()) is not None:
            await self.session.handle(item)
        return self.out.take()
