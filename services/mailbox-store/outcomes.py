"""What the store's operations answer besides their values: the refusals (``StoreError``
with its RpcError code, and ``NeedsWriter`` for a read-only repository) and the result
records of writes (``Change``, ``DeliverOutcome``) and their input (``NewMessage``).
Pure: no SQL, no bus."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import ClassVar, Literal

from postbus.proto.base import ErrorCode
from postbus.proto.mail import MessageSummary
from postbus.proto.store import MessageState
from postbus.protocols.served import served_size


# ---------------------------------------------------------------- errors
class StoreError(Exception):
    """A refused operation; ``code`` is the RpcError code (proto/base.py ErrorCode)."""

    code: ClassVar[ErrorCode] = "internal"

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message


class NeedsWriter(Exception):  # noqa: N818 (not an error of the caller's: a routing signal)
    """A read-only repository (imap-access reading SQL, ADR 0012) reached an operation that
    writes (INBOX created on first use, a \\Recent claim): the caller asks mailbox-store,
    the only writer, instead."""


class NotFound(StoreError):
    code: ClassVar[ErrorCode] = "not_found"


class Exists(StoreError):
    code: ClassVar[ErrorCode] = "exists"


class Invalid(StoreError):
    code: ClassVar[ErrorCode] = "invalid"


class OverQuota(StoreError):
    code: ClassVar[ErrorCode] = "over_quota"


class Conflict(StoreError):
    code: ClassVar[ErrorCode] = "conflict"


class Limit(StoreError):
    """Refused because it would cost more than a bound allows (IMAP: NO [LIMIT], RFC 5530)."""

    code: ClassVar[ErrorCode] = "limit"


# ---------------------------------------------------------------- results
@dataclass
class Change:
    """What a committed write did to one mailbox, for MAILBOX_CHANGED."""

    account_id: int
    mailbox_id: int
    mailbox: str
    uidvalidity: int
    uidnext: int
    highestmodseq: int
    exists: int
    added: list[MessageState] = field(default_factory=list)
    flags: list[MessageState] = field(default_factory=list)
    expunged: list[int] = field(default_factory=list)
    message_ids: list[int] = field(default_factory=list)  # row ids of added (single insert)
    # an APPEND that claimed \Recent (append_many claim_recent): the first UID it claimed
    recent_from: int | None = None


@dataclass
class DeliverOutcome:
    status: Literal["delivered", "duplicate", "over_quota", "disabled", "no_account"]
    uid: int | None = None
    mailbox_id: int | None = None
    change: Change | None = None


@dataclass
class NewMessage:
    """A message to insert: the blob is already in S3, or ``body`` holds its bytes, to be
    kept in the blob's row (a small one, ADR 0014)."""

    blob_key: str
    blob_size: int
    summary: MessageSummary
    prefix: bytes = b""
    flags: Sequence[str] = ()
    internaldate: datetime | None = None
    body: bytes | None = None

    @property
    def size(self) -> int:
        """The RFC822.SIZE clients see (ADR 0002)."""
        return served_size(self.prefix, self.blob_size)
