"""Ports of a POP3 session: directory, maildrop store, maildrop lock, login throttle.

typing.Protocol only; adapters.py implements them over the bus, memory.py in memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from postbus.proto.directory import AuthReply
from postbus.proto.store import Pop3CommitRequest, Pop3MaildropReply, Pop3Message


class Unavailable(Exception):
    """A dependency (directory, store, blob store, lock service) did not answer."""


class Directory(Protocol):
    async def authenticate(self, username: str, password: str, client_ip: str) -> AuthReply:
        """ok=False for bad credentials; raises Unavailable when nobody answers."""
        ...


class Maildrops(Protocol):
    async def open(self, account_id: int) -> Pop3MaildropReply:
        """The INBOX as a maildrop, fixed for the session."""
        ...

    async def commit(self, request: Pop3CommitRequest) -> None:
        """Apply the UPDATE state (RFC 1939 §6)."""
        ...

    async def blob(self, message: Pop3Message) -> bytes:
        """The stored blob of ``message`` (without its prefix), line ends untouched."""
        ...

    def prefetch(self, messages: Sequence[Pop3Message]) -> None:
        """Start fetching bodies the client is likely to ask for next; never blocks."""
        ...


class Lease(Protocol):
    @property
    def lost(self) -> bool:
        """True once the lock could not be refreshed (it may belong to someone else now)."""
        ...

    async def release(self) -> None: ...


class Locks(Protocol):
    async def acquire(self, account_id: int, holder: str) -> Lease | None:
        """The maildrop lock, or None when another session holds it."""
        ...


class Throttle(Protocol):
    async def failures(self, client_ip: str, username: str) -> tuple[int, int]:
        """Recent failed logins (from this IP, for this account name)."""
        ...

    async def record_failure(self, client_ip: str, username: str) -> None: ...

    async def record_success(self, client_ip: str, username: str) -> None: ...

    async def login_allowed(self, account_id: int) -> bool:
        """RFC 2449 §6.5 LOGIN-DELAY: False when the account logged in too recently."""
        ...
