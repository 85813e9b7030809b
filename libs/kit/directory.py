"""The directory's client: the ``directory.*`` requests of mailbox-store (ADR 0009) as every
service asks them, with a short cache of resolve answers. Uses kit.bus only."""

from __future__ import annotations

from typing import Literal

from postbus.kit.bus import Bus, ErrorMap, raising
from postbus.kit.expiring import ExpiringLRU
from postbus.proto.directory import (
    DIRECTORY_AUTHENTICATE,
    DIRECTORY_RESOLVE,
    DIRECTORY_SEND_AS,
    AuthReply,
    AuthRequest,
    ResolveReply,
    ResolveRequest,
    SendAsRequest,
)

Service = Literal["smtp", "imap", "pop3", "api"]


class DirectoryClient:
    """``resolve``, ``authenticate`` (as ``service``) and ``send_as`` over the bus.

    Raises the bus's errors (BusUnavailable, RemoteError), or what ``errors`` makes of
    them, so a port whose failures have their own type can take this client directly.
    A resolve answer is kept ``resolve_ttl_s`` (0: not at all) for at most
    ``resolve_cache_size`` addresses, whatever their case.
    """

    def __init__(self, bus: Bus, service: Service | None = None, *,
                 resolve_ttl_s: float = 0.0, resolve_cache_size: int = 10_000,
                 timeout_s: float | None = None, errors: ErrorMap | None = None) -> None:
        self.bus = bus
        self.service = service
        self.resolve_ttl_s = resolve_ttl_s
        self.timeout_s = timeout_s
        self.errors = errors
        self._resolved: ExpiringLRU[str, ResolveReply] = ExpiringLRU(resolve_cache_size)

    async def resolve(self, address: str) -> ResolveReply:
        key = address.lower()
        hit = self._resolved.get(key)
        if hit is not None:
            return hit
        with raising(self.errors):
            reply = await self.bus.request(DIRECTORY_RESOLVE, ResolveRequest(address=address),
                                           timeout=self.timeout_s)
        if self.resolve_ttl_s > 0:
            self._resolved.put(key, reply, self.resolve_ttl_s)
        return reply

    async def authenticate(self, username: str, password: str,
                           client_ip: str | None) -> AuthReply:
        """ok=False (never an error) for bad credentials; reason "throttled" when the
        directory's own login throttle refused to check."""
        if self.service is None:
            raise ValueError("a DirectoryClient without a service name cannot authenticate")
        with raising(self.errors):
            return await self.bus.request(DIRECTORY_AUTHENTICATE, AuthRequest(
                username=username, password=password, service=self.service,
                client_ip=client_ip), timeout=self.timeout_s)

    async def send_as(self, account_id: int) -> list[str]:
        """The addresses the account may send as (its own and aliases to it)."""
        with raising(self.errors):
            reply = await self.bus.request(DIRECTORY_SEND_AS,
                                           SendAsRequest(account_id=account_id),
                                           timeout=self.timeout_s)
        return reply.addresses
