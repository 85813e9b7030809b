"""Test helpers for smtp-ingress: a directory responder on the real bus, served from a
table, and an in-process ingress on free ports wired to the real bus and S3."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from postbus.kit.blob import BlobStore
from postbus.kit.bus import Bus, Delivery
from postbus.kit.tls import self_signed, server_context
from postbus.proto.directory import (
    DIRECTORY_AUTHENTICATE,
    DIRECTORY_RESOLVE,
    AccountRef,
    AuthReply,
    AuthRequest,
    ResolveReply,
    ResolveRequest,
)
from postbus.proto.mail import MAIL_RECEIVED, MailReceived
from postbus.smtp_ingress.__main__ import wire
from postbus.smtp_ingress.adapters import KvBlockList, KvLoadShare
from postbus.smtp_ingress.server import Ingress
from postbus.smtp_ingress.settings import Settings


@dataclass
class User:
    password: str
    status: str = "local"  # or "disabled"
    send_as: list[str] = field(default_factory=list)


@dataclass
class DirectoryTable:
    domains: set[str] = field(default_factory=lambda: {"example.test"})
    users: dict[str, User] = field(default_factory=dict)
    resolves: int = 0

    async def resolve(self, req: ResolveRequest) -> ResolveReply:
        self.resolves += 1
        addr = req.address.lower()
        domain = addr.rpartition("@")[2]
        if domain not in self.domains:
            return ResolveReply(status="remote", domain=domain)
        user = self.users.get(addr)
        if user is None:
            return ResolveReply(status="unknown", domain=domain)
        if user.status == "disabled":
            return ResolveReply(status="disabled", domain=domain)
        idx = sorted(self.users).index(addr) + 1
        return ResolveReply(status="local", domain=domain,
                            accounts=[AccountRef(account_id=idx, address=addr)])

    async def authenticate(self, req: AuthRequest) -> AuthReply:
        user = self.users.get(req.username.lower())
        if user is None or user.password != req.password or req.service != "smtp":
            return AuthReply(ok=False, reason="invalid")
        return AuthReply(ok=True, account_id=1, address=req.username.lower(),
                         send_as=user.send_as or [req.username.lower()])


async def serve_directory(bus: Bus, table: DirectoryTable) -> None:
    await bus.serve(DIRECTORY_RESOLVE, table.resolve, queue="test-directory")
    await bus.serve(DIRECTORY_AUTHENTICATE, table.authenticate, queue="test-directory")


@dataclass
class RunningIngress:
    ingress: Ingress
    settings: Settings
    table: DirectoryTable
    blocklist: KvBlockList
    cert: Path
    share: KvLoadShare | None = None

    def port(self, listener: str = "mx") -> int:
        return self.ingress.ports[listener]

    def client_tls(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.cert))
        ctx.check_hostname = False
        return ctx


async def start_ingress(bus: Bus, blobs: BlobStore, settings: Settings, tmp: Path,
                        table: DirectoryTable | None = None) -> RunningIngress:
    table = table or DirectoryTable()
    if "spool_dir" not in settings.model_fields_set:
        settings = settings.model_copy(update={"spool_dir": tmp / "spool"})
    await serve_directory(bus, table)
    cert, key = tmp / "tls.crt", tmp / "tls.key"
    self_signed(cert, key)
    w = await wire(settings, bus, blobs, server_context(cert, key), blocklist_refresh_s=0.5)
    return RunningIngress(w.ingress, settings, table, w.blocklist, cert, w.share)


class Inbox:
    """Pulls MAIL_RECEIVED from the real stream with a durable consumer."""

    def __init__(self, bus: Bus) -> None:
        self.queue: asyncio.Queue[MailReceived] = asyncio.Queue()

        async def handler(d: Delivery[MailReceived]) -> object:
            from postbus.kit.bus import Ack

            await self.queue.put(d.data)
            return Ack()

        bus.consume(MAIL_RECEIVED, handler, durable="smtp-test")  # type: ignore[arg-type]

    async def get(self, timeout: float = 10) -> MailReceived:
        return await asyncio.wait_for(self.queue.get(), timeout)

    async def empty_for(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self.queue.get(), seconds)
            return False
        except TimeoutError:
            return True
