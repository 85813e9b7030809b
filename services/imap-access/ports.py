"""What an IMAP session needs from the rest of the platform, as typing.Protocol ports.

Implemented over NATS/S3 in ``adapters`` and in memory in ``memory`` (tests, benchmarks).
The session imports only this module, never nats or boto3.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from postbus.proto.base import ErrorCode
from postbus.proto.directory import AuthReply
from postbus.proto.mail import MailboxChanged
from postbus.proto.store import (
    AppendReply,
    AppendRequest,
    CopyReply,
    CopyRequest,
    ExpungeReply,
    ExpungeRequest,
    FetchReply,
    FetchRequest,
    MailboxCreateRequest,
    MailboxInfo,
    MailboxListReply,
    MailboxListRequest,
    MailboxRef,
    MailboxRenameRequest,
    QuotaReply,
    QuotaRequest,
    SearchReply,
    SearchRequest,
    SelectReply,
    SelectRequest,
    StoreFlagsReply,
    StoreFlagsRequest,
    SubscribeRequest,
)


class StoreError(Exception):
    """The store refused: ``code`` as in ``postbus.proto.base.RpcError`` (not_found, exists,
    invalid, over_quota, conflict, limit, internal...) or ``unavailable`` when nobody
    answered; the closed set ``ErrorCode``."""

    def __init__(self, code: ErrorCode, message: str = "") -> None:
        super().__init__(f"{code}: {message}")
        self.code: ErrorCode = code
        self.message = message


class Directory(Protocol):
    async def authenticate(self, username: str, password: str,
                           client_ip: str | None) -> AuthReply: ...


class Store(Protocol):
    async def mailbox_list(self, req: MailboxListRequest) -> MailboxListReply: ...
    async def mailbox_status(self, req: MailboxRef) -> MailboxInfo: ...
    async def mailbox_create(self, req: MailboxCreateRequest) -> MailboxInfo: ...
    async def mailbox_delete(self, req: MailboxRef) -> None: ...
    async def mailbox_rename(self, req: MailboxRenameRequest) -> None: ...
    async def mailbox_subscribe(self, req: SubscribeRequest) -> None: ...
    async def select(self, req: SelectRequest) -> SelectReply: ...
    async def fetch(self, req: FetchRequest) -> FetchReply: ...
    async def flags(self, req: StoreFlagsRequest) -> StoreFlagsReply: ...
    async def copy(self, req: CopyRequest) -> CopyReply: ...
    async def append(self, req: AppendRequest) -> AppendReply: ...
    async def expunge(self, req: ExpungeRequest) -> ExpungeReply: ...
    async def search(self, req: SearchRequest) -> SearchReply: ...
    async def quota(self, req: QuotaRequest) -> QuotaReply: ...


class Blobs(Protocol):
    """Immutable message bodies by key (``blobs/<sha256>``)."""

    async def get_many(self, keys: list[str]) -> dict[str, bytes]:
        """The bodies found; keys that cannot be read now are left out (the session says
        NO [UNAVAILABLE] for those messages)."""
        ...

    async def put(self, data: bytes) -> str: ...


Unsubscribe = Callable[[], Awaitable[None]]


class Changes(Protocol):
    """``mailbox.changed`` notifications of one account (best effort, for IDLE)."""

    async def subscribe(self, account_id: int,
                        callback: Callable[[MailboxChanged], None]) -> Unsubscribe: ...


class Output(Protocol):
    """Where a session writes its responses."""

    def write(self, data: bytes) -> None: ...
    async def drain(self) -> None: ...
