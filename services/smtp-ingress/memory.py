"""In-memory ports for smtp-ingress session tests (transcripts, properties): a directory
answered from a table (testing.DirectoryTable), a queue and a blob store that keep what
they get, counters; and ``Conversation``, a session driven without a socket.

No sockets, no nats, no boto3.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import BinaryIO, Protocol

from postbus.proto.directory import AuthReply, AuthRequest, ResolveReply, ResolveRequest
from postbus.proto.mail import MailReceived
from postbus.protocols.smtp import Receiver
from postbus.smtp_ingress.ports import Unavailable
from postbus.smtp_ingress.session import Session, Shared
from postbus.smtp_ingress.settings import Settings


class Table(Protocol):
    """What testing.DirectoryTable answers (the directory RPCs, in process)."""

    async def resolve(self, req: ResolveRequest) -> ResolveReply: ...

    async def authenticate(self, req: AuthRequest) -> AuthReply: ...


class MemoryDirectory:
    def __init__(self, table: Table) -> None:
        self.table = table
        self.down = False

    async def resolve(self, address: str) -> ResolveReply:
        if self.down:
            raise Unavailable("directory down")
        return await self.table.resolve(ResolveRequest(address=address))

    async def authenticate(self, username: str, password: str, client_ip: str) -> AuthReply:
        if self.down:
            raise Unavailable("directory down")
        return await self.table.authenticate(AuthRequest(username=username, password=password,
                                                         service="smtp", client_ip=client_ip))


class MemoryQueue:
    def __init__(self) -> None:
        self.messages: list[MailReceived] = []
        self.down = False

    async def publish(self, msg: MailReceived) -> None:
        if self.down:
            raise Unavailable("queue down")
        self.messages.append(msg)


class MemoryBodies:
    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}

    async def put_file(self, head: bytes, file: BinaryIO) -> str:
        data = head + file.read()
        key = "blobs/" + hashlib.sha256(data).hexdigest()
        self.blobs[key] = data
        return key


class MemoryCounters:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    async def get(self, key: str) -> int:
        return self.counts.get(key, 0)

    async def incr(self, key: str) -> int:
        self.counts[key] = self.counts.get(key, 0) + 1
        return self.counts[key]

    async def reset(self, key: str) -> None:
        self.counts.pop(key, None)


def memory_shared(settings: Settings, table: Table, spool_dir: Path) -> Shared:
    """A ``Shared`` on in-memory ports, its spool in ``spool_dir`` (created)."""
    if "spool_dir" not in settings.model_fields_set:
        settings = settings.model_copy(update={"spool_dir": spool_dir})
    shared = Shared(settings, directory=MemoryDirectory(table), queue=MemoryQueue(),
                    bodies=MemoryBodies(), auth_failures=MemoryCounters())
    shared.spool.prepare()
    return shared


class Conversation:
    """A session and its receiver driven as server.py drives them, without a socket: bytes
    in, reply bytes out (for transcripts and properties)."""

    def __init__(self, session: Session, receiver: Receiver) -> None:
        self.session = session
        self.receiver = receiver
        self.closed = False

    async def feed(self, data: bytes) -> bytes:
        """Feed ``data``; returns every reply it brings, in order."""
        out: list[bytes] = []
        items = self.receiver.feed(data)
        while items and not self.closed:
            for item in items:
                reply = await self.session.handle(item)
                out.append(reply.data)
                if reply.close:
                    self.closed = True
                    self.session.close()
                    break
                if reply.read_data:
                    self.receiver.start_data()
                elif reply.read_chunk is not None:
                    self.receiver.start_chunk(reply.read_chunk)
                elif reply.starttls:
                    self.receiver.discard()  # RFC 3207 §4.2: nothing sent before counts
                    self.session.tls_started("TLSv1.3 with cipher TEST (256/256 bits)")
            else:
                items = self.receiver.feed(b"")
        return b"".join(out)
