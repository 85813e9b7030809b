"""The ``directory.*`` RPCs on the bus: handlers, the shared login throttle and
``serve_directory`` (no SQL: the lookups are directory_sql.py's).
"""

from __future__ import annotations

import contextlib

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from postbus.kit.bus import Bus, BusUnavailable, RemoteError
from postbus.kit.counters import KvCounters
from postbus.kit.logging import get_logger
from postbus.kit.metrics import counter
from postbus.mailbox_store.directory_rules import Invalid, NotFound
from postbus.mailbox_store.directory_sql import DirectorySql
from postbus.mailbox_store.passwords import Passwords
from postbus.mailbox_store.repository import Repository
from postbus.proto.directory import (
    DIRECTORY_AUTHENTICATE,
    DIRECTORY_RESOLVE,
    DIRECTORY_SEND_AS,
    AuthReply,
    AuthRequest,
    ResolveReply,
    ResolveRequest,
    SendAsReply,
    SendAsRequest,
)

log = get_logger(__name__)

RESOLVES = counter("postbus_directory_resolve_total", "Recipient lookups by outcome", ["status"])
LOGINS = counter("postbus_directory_logins_total", "Logins by service and outcome",
                 ["service", "outcome"])

QUEUE_GROUP = "mailbox-store"


class Directory(DirectorySql):
    """The directory with its bus handlers (what ``serve_directory`` answers with)."""

    # ============================================================ bus handlers
    async def handle_resolve(self, req: ResolveRequest) -> ResolveReply:
        """A malformed address is ``unknown`` (a permanent 550 5.1.1 or a bounce), never an
        error: callers treat errors as transient and would retry it forever."""
        try:
            reply = await self.resolve(req.address)
        except Invalid as exc:
            log.info("unresolvable address", address=req.address[:320], error=exc.message)
            reply = ResolveReply(status="unknown")
        RESOLVES.labels(reply.status).inc()
        return reply

    async def handle_authenticate(self, req: AuthRequest) -> AuthReply:
        throttle = self.throttle
        taken: list[str] = []  # the throttle key of this attempt, once a unit is taken

        async def gate(login: str) -> bool:
            if throttle is None:
                return True
            key = throttle.key(login, req.client_ip)
            if not await throttle.reserve(key):
                return False
            taken.append(key)
            return True

        reply = await self.authenticate(req.username, req.password, gate=gate,
                                        with_send_as=req.service in ("smtp", "api"))
        if reply.ok and taken and throttle is not None:
            await throttle.reset(taken[0])  # a success clears the account's failures
        LOGINS.labels(req.service, "ok" if reply.ok else (reply.reason or "invalid")).inc()
        log.info("login", service=req.service, client_ip=req.client_ip, ok=reply.ok,
                 reason=reply.reason, account=reply.address or req.username[:320])
        return reply

    async def handle_send_as(self, req: SendAsRequest) -> SendAsReply:
        try:
            return SendAsReply(addresses=await self.send_as(req.account_id))
        except NotFound as exc:
            raise RemoteError("not_found", exc.message) from exc


class LoginThrottle:
    """Login attempts per (account, client IP), counted in a NATS KV bucket that every
    replica shares (kit.counters). An attempt takes a unit before the password is checked
    (compare-and-set: parallel guesses cannot all slip in between a read and a write);
    after ``max_failures`` units within ``window_s`` of the last one the directory answers
    ``throttled`` without checking. A success gives them all back. The key is the
    account's canonical address (angle brackets, case, IDNA and trailing dots spell the
    same account), so no other spelling has its own allowance. If the bucket cannot be
    reached, logins are not throttled (fail open)."""

    BUCKET = "directory-login-failures"

    def __init__(self, counters: KvCounters, max_failures: int) -> None:
        self.counters = counters
        self.max_failures = max_failures

    @classmethod
    async def open(cls, bus: Bus, *, max_failures: int = 10,
                   window_s: float = 900.0) -> LoginThrottle:
        return cls(await KvCounters.open(bus, cls.BUCKET, window_s), max_failures)

    @staticmethod
    def key(login: str, client_ip: str | None) -> str:
        return f"{login}|{client_ip or ''}"

    async def reserve(self, key: str) -> bool:
        """Take one attempt; False when the allowance is used up."""
        try:
            return await self.counters.incr_below(key, self.max_failures) is not None
        except BusUnavailable as exc:
            log.warning("login throttle unavailable", error=str(exc)[:200])
            return True

    async def failures(self, key: str) -> int:
        try:
            return await self.counters.get(key)
        except BusUnavailable:
            return 0

    async def reset(self, key: str) -> None:
        with contextlib.suppress(BusUnavailable):
            await self.counters.reset(key)


async def serve_directory(bus: Bus, sessionmaker: async_sessionmaker[AsyncSession], *,
                          passwords: Passwords | None = None, subaddress_separator: str = "+",
                          repo: Repository | None = None,
                          resolve_cache_ttl_s: float = 0.0,
                          login_max_failures: int = 10,
                          login_window_s: float = 900.0) -> Directory:
    """Answer DIRECTORY_RESOLVE, DIRECTORY_AUTHENTICATE and DIRECTORY_SEND_AS in the
    ``mailbox-store`` queue group. Returns the Directory (pass it to mgmt.router).
    ``login_max_failures=0`` turns the shared login throttle off."""
    d = Directory(sessionmaker, passwords=passwords, subaddress_separator=subaddress_separator,
                  repo=repo, resolve_cache_ttl_s=resolve_cache_ttl_s)
    if login_max_failures > 0:
        d.throttle = await LoginThrottle.open(bus, max_failures=login_max_failures,
                                              window_s=login_window_s)
    await bus.serve(DIRECTORY_RESOLVE, d.handle_resolve, queue=QUEUE_GROUP)
    await bus.serve(DIRECTORY_AUTHENTICATE, d.handle_authenticate, queue=QUEUE_GROUP)
    await bus.serve(DIRECTORY_SEND_AS, d.handle_send_as, queue=QUEUE_GROUP)
    return d
