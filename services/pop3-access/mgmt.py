"""Management API of pop3-access (mounted under /api/v1 behind the admin token): live
sessions of this replica, its counters, and the maildrop lock holders of every replica."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import APIRouter, HTTPException, status

from postbus.kit.bus import BusUnavailable
from postbus.pop3_access.server import Pop3Server

LockHolders = Callable[[], Awaitable[list[dict[str, object]]]]


def router(server: Pop3Server, lock_holders: LockHolders) -> APIRouter:
    r = APIRouter(prefix="/pop3", tags=["pop3"])

    @r.get("/sessions")
    async def sessions() -> list[dict[str, object]]:
        """POP3 sessions open on this replica."""
        return [s.info() for s in list(server.sessions.values())]

    @r.delete("/sessions/{session_id}", status_code=status.HTTP_204_NO_CONTENT)
    async def kick(session_id: str) -> None:
        """Disconnect a session; nothing it marked for deletion is applied."""
        if not server.kick(session_id):
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such session")

    @r.get("/stats")
    async def stats() -> dict[str, object]:
        """Counters of this replica since it started."""
        s = server.stats
        return {
            "replica": server.replica,
            "active_sessions": len(server.sessions),
            "sessions": s.sessions,
            "logins_ok": s.logins_ok,
            "logins_failed": s.logins_failed,
            "in_use": s.in_use,
            "retrieved": s.retrieved,
            "retrieved_octets": s.retrieved_octets,
            "deleted": s.deleted,
            "commands": dict(s.commands),
        }

    @r.get("/locks")
    async def locks() -> list[dict[str, object]]:
        """Maildrop locks held now, by every replica."""
        try:
            return await lock_holders()
        except BusUnavailable as exc:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from exc

    return r
