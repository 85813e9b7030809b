"""In-memory implementations of the POP3 ports, for session tests, socket tests and the
benchmark. Behave like the real store: UIDLs stable, commit applies delete/keep modes."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from postbus.kit.bus import Bus
from postbus.pop3_access.policy import Pop3Policy
from postbus.pop3_access.ports import Unavailable
from postbus.proto.directory import DIRECTORY_AUTHENTICATE, AuthReply, AuthRequest
from postbus.proto.store import (
    STORE_POP3_COMMIT,
    STORE_POP3_MAILDROP,
    Ok,
    Pop3CommitRequest,
    Pop3MaildropReply,
    Pop3MaildropRequest,
    Pop3Message,
)
from postbus.protocols.served import retr_octets


@dataclass
class MemoryAccount:
    account_id: int
    address: str
    password: str
    policy: Pop3Policy = "client"
    expire_days: int | None = None
    disabled: bool = False


class MemoryDirectory:
    def __init__(self) -> None:
        self.accounts: dict[str, MemoryAccount] = {}
        self.calls = 0
        self.services: list[str] = []  # the service each login over the bus named
        self.down = False

    def add(self, address: str, password: str, account_id: int | None = None, *,
            policy: Pop3Policy = "client", expire_days: int | None = None) -> MemoryAccount:
        acc = MemoryAccount(account_id or len(self.accounts) + 1, address.lower(), password,
                            policy, expire_days)
        self.accounts[acc.address] = acc
        return acc

    async def authenticate(self, username: str, password: str, client_ip: str) -> AuthReply:
        self.calls += 1
        if self.down:
            raise Unavailable("directory down")
        acc = self.accounts.get(username.lower())
        if acc is None or acc.password != password:
            return AuthReply(ok=False, reason="invalid")
        if acc.disabled:
            return AuthReply(ok=False, reason="disabled")
        return AuthReply(ok=True, account_id=acc.account_id, address=acc.address,
                         pop3_policy=acc.policy,
                         pop3_expire_days=acc.expire_days)


@dataclass
class StoredMessage:
    uid: int
    blob: bytes
    prefix: bytes = b""
    hidden: bool = False  # hidden from POP3 ("keep" mode), still there for IMAP
    seen: bool = False
    size: int = 0  # RETR octets, computed once at delivery as a store would
    blob_key: str = ""


@dataclass
class MemoryMailbox:
    mailbox_id: int
    uidvalidity: int
    messages: list[StoredMessage] = field(default_factory=list)
    uidnext: int = 1


class MemoryMaildrops:
    """A store with one INBOX per account; bodies kept by content hash as in S3."""

    def __init__(self) -> None:
        self.mailboxes: dict[int, MemoryMailbox] = {}
        self.blobs: dict[str, bytes] = {}
        self.commits: list[Pop3CommitRequest] = []
        self.body_calls = 0
        self.prefetched: list[str] = []
        self.down = False

    def mailbox(self, account_id: int) -> MemoryMailbox:
        if account_id not in self.mailboxes:
            self.mailboxes[account_id] = MemoryMailbox(account_id * 10, 1000 + account_id)
        return self.mailboxes[account_id]

    def deliver(self, account_id: int, blob: bytes, prefix: bytes = b"") -> int:
        box = self.mailbox(account_id)
        uid = box.uidnext
        box.uidnext += 1
        key = "blobs/" + hashlib.sha256(blob).hexdigest()
        self.blobs[key] = blob
        box.messages.append(StoredMessage(uid, blob, prefix, size=retr_octets(prefix, blob),
                                          blob_key=key))
        return uid

    def visible(self, account_id: int) -> list[StoredMessage]:
        return [m for m in self.mailbox(account_id).messages if not m.hidden]

    async def open(self, account_id: int) -> Pop3MaildropReply:
        if self.down:
            raise Unavailable("store down")
        box = self.mailbox(account_id)
        return Pop3MaildropReply(mailbox_id=box.mailbox_id, uidvalidity=box.uidvalidity, messages=[
            Pop3Message(uid=m.uid, uidl=f"{box.uidvalidity:x}.{m.uid:x}", size=m.size,
                        blob_key=m.blob_key, prefix=m.prefix)
            for m in box.messages if not m.hidden])

    async def commit(self, request: Pop3CommitRequest) -> None:
        if self.down:
            raise Unavailable("store down")
        self.commits.append(request)
        box = self.mailboxes[request.account_id]
        assert box.mailbox_id == request.mailbox_id
        doomed = set(request.delete_uids)
        for m in box.messages:
            if m.uid in request.seen_uids:
                m.seen = True
            if m.uid in doomed and request.mode == "keep":
                m.hidden = True
        if request.mode == "delete":
            box.messages = [m for m in box.messages if m.uid not in doomed]

    async def blob(self, message: Pop3Message) -> bytes:
        self.body_calls += 1
        if self.down:
            raise Unavailable("blob store down")
        blob = self.blobs.get(message.blob_key)
        if blob is None:
            raise Unavailable(f"no blob {message.blob_key}")
        return blob

    def prefetch(self, messages: Sequence[Pop3Message]) -> None:
        self.prefetched.extend(m.blob_key for m in messages)


class MemoryLease:
    def __init__(self, locks: MemoryLocks, account_id: int) -> None:
        self._locks = locks
        self.account_id = account_id
        self.released = False
        self._lost = False

    @property
    def lost(self) -> bool:
        return self._lost

    async def release(self) -> None:
        if not self.released:
            self.released = True
            if self._locks.held.get(self.account_id) is self:
                del self._locks.held[self.account_id]


class MemoryLocks:
    def __init__(self) -> None:
        self.held: dict[int, MemoryLease] = {}
        self.holders: dict[int, str] = {}

    async def acquire(self, account_id: int, holder: str) -> MemoryLease | None:
        if account_id in self.held:
            return None
        lease = MemoryLease(self, account_id)
        self.held[account_id] = lease
        self.holders[account_id] = holder
        return lease


class MemoryThrottle:
    def __init__(self, login_delay_s: float = 0) -> None:
        self.ip: dict[str, int] = {}
        self.account: dict[str, int] = {}
        self.login_delay_s = login_delay_s
        self.last_login: dict[int, float] = {}
        self._lock = asyncio.Lock()

    async def failures(self, client_ip: str, username: str) -> tuple[int, int]:
        return self.ip.get(client_ip, 0), self.account.get(username.lower(), 0)

    async def record_failure(self, client_ip: str, username: str) -> None:
        self.ip[client_ip] = self.ip.get(client_ip, 0) + 1
        self.account[username.lower()] = self.account.get(username.lower(), 0) + 1

    async def record_success(self, client_ip: str, username: str) -> None:
        self.account.pop(username.lower(), None)

    async def login_allowed(self, account_id: int) -> bool:
        if self.login_delay_s <= 0:
            return True
        now = time.monotonic()
        last = self.last_login.get(account_id)
        if last is not None and now - last < self.login_delay_s:
            return False
        self.last_login[account_id] = now
        return True


async def serve_on_bus(bus: Bus, directory: MemoryDirectory, maildrops: MemoryMaildrops) -> None:
    """Answer the directory login and the POP3 maildrop RPCs from memory, so a real
    pop3-access process can run without mailbox-store (socket tests, the benchmark)."""

    async def authenticate(req: AuthRequest) -> AuthReply:
        directory.services.append(req.service)
        return await directory.authenticate(req.username, req.password, req.client_ip or "")

    async def maildrop(req: Pop3MaildropRequest) -> Pop3MaildropReply:
        return await maildrops.open(req.account_id)

    async def commit(req: Pop3CommitRequest) -> Ok:
        await maildrops.commit(req)
        return Ok()

    await bus.serve(DIRECTORY_AUTHENTICATE, authenticate, queue="directory")
    await bus.serve(STORE_POP3_MAILDROP, maildrop, queue="store")
    await bus.serve(STORE_POP3_COMMIT, commit, queue="store")
