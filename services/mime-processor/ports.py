"""What the mime-processor worker talks to. Implemented over NATS/S3/DNS in ``adapters``
and ``authcheck``; in memory in the session tests."""

from __future__ import annotations

from typing import Protocol, TypeVar

from pydantic import BaseModel

from postbus.mime_processor.policy import AuthResults
from postbus.proto.base import Subject
from postbus.proto.directory import ResolveReply
from postbus.proto.mail import ClientInfo

M = TypeVar("M", bound=BaseModel)


class Directory(Protocol):
    async def resolve(self, address: str) -> ResolveReply:
        """Raise on failure (the message is retried)."""
        ...


class Blobs(Protocol):
    async def get(self, key: str) -> bytes: ...

    async def put(self, data: bytes, *, verify: bool = False) -> str: ...


class Publisher(Protocol):
    async def publish(self, subject: Subject[M], data: M, *, msg_id: str | None = None,
                      timeout: float = 5.0, **parts: str) -> int:
        """Publish durably (JetStream ack); ``msg_id`` deduplicates a retried publish."""
        ...


class Authenticator(Protocol):
    async def check(self, raw: bytes, client: ClientInfo, mail_from: str) -> AuthResults: ...


class Memo(Protocol):
    """A small shared key/value store that outlives one attempt (NATS KV)."""

    async def get(self, key: str) -> str | None: ...

    async def put(self, key: str, value: str) -> None: ...
