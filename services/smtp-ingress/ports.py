"""What the SMTP sessions need from the outside world, as typing.Protocols.

Implementations: adapters.py (NATS, S3, NATS KV). No imports of nats or boto3 here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO, Protocol

from postbus.proto.directory import AuthReply, ResolveReply
from postbus.proto.mail import MailReceived


class Unavailable(Exception):
    """A dependency (directory, queue, blob store, KV) did not answer; reply 4xx."""


class Directory(Protocol):
    async def resolve(self, address: str) -> ResolveReply: ...

    async def authenticate(self, username: str, password: str, client_ip: str) -> AuthReply: ...


class Queue(Protocol):
    async def publish(self, msg: MailReceived) -> None:
        """Return only once the message is durable (JetStream ack); else raise Unavailable."""
        ...


class Backlog(Protocol):
    async def depth(self) -> int:
        """Accepted messages not yet delivered or queued for relay (the work queues'
        depth); raises Unavailable."""
        ...


class Bodies(Protocol):
    async def put_file(self, head: bytes, file: BinaryIO) -> str:
        """Store ``head`` and then ``file`` (from its position) content-addressed, streamed
        (the file may be far larger than this process should hold); returns the key.
        Raises Unavailable."""
        ...


class Counters(Protocol):
    """Shared counters that expire a window after their last increment."""

    async def get(self, key: str) -> int: ...

    async def incr(self, key: str) -> int: ...

    async def reset(self, key: str) -> None: ...


class LoadShare(Protocol):
    """Per-IP connection counts of the other replicas (open, and opened in the last
    minute), so per-IP limits hold across replicas without a KV write per connection."""

    def remote(self, ip: str) -> tuple[int, int]: ...


@dataclass(frozen=True)
class BlockEntry:
    network: str
    reason: str = ""
    added_at: str = ""


class BlockList(Protocol):
    def blocked(self, ip: str) -> bool:
        """Synchronous: answered from this replica's copy, kept current by a watch."""
        ...

    async def add(self, entry: BlockEntry) -> None: ...

    async def remove(self, network: str) -> bool: ...

    def entries(self) -> list[BlockEntry]: ...
