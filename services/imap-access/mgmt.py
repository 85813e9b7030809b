"""Management API of imap-access (mounted under /api/v1 behind the admin token):
live sessions and counters."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel

from postbus.imap_access.server import ImapServer


class SessionOut(BaseModel):
    id: str
    user: str | None
    ip: str
    listener: str
    tls: bool
    mailbox: str | None
    since: float
    seconds: float
    commands: int


class StatsOut(BaseModel):
    sessions: int
    uptime_s: float
    commands: dict[str, dict[str, float]]
    fetch_bytes: float
    blob_cache_hit_rate: float | None


def _counter_values(metric: Any) -> dict[tuple[str, ...], float]:
    out: dict[tuple[str, ...], float] = {}
    for fam in metric.collect():
        for s in fam.samples:
            if s.name.endswith("_total"):
                out[tuple(s.labels.values())] = s.value
    return out


def router(server: ImapServer, hit_rate: Any = None) -> APIRouter:
    r = APIRouter(prefix="/imap", tags=["imap"])

    @r.get("/sessions", response_model=list[SessionOut])
    async def sessions() -> list[SessionOut]:
        """Live IMAP sessions: who, from where, which mailbox, since when."""
        now = time.time()
        return [SessionOut(id=s.info.id, user=s.info.user, ip=s.info.ip,
                           listener=s.info.listener, tls=s.info.tls, mailbox=s.info.mailbox,
                           since=s.info.since, seconds=round(now - s.info.since, 3),
                           commands=s.info.commands)
                for s in server.sessions.values()]

    @r.delete("/sessions/{session_id}", status_code=204)
    async def kick(session_id: str) -> None:
        """Disconnect one session (it gets a BYE)."""
        if not server.kick(session_id):
            raise HTTPException(404, "no such session")

    @r.get("/stats", response_model=StatsOut)
    async def stats() -> StatsOut:
        """Counters since start: commands by name and result, FETCH octets, cache hit rate."""
        from postbus.imap_access.session import COMMANDS, FETCH_BYTES

        cmds: dict[str, dict[str, float]] = {}
        for (name, result), v in _counter_values(COMMANDS).items():
            cmds.setdefault(name, {})[result] = v
        fb = sum(_counter_values(FETCH_BYTES).values())
        return StatsOut(sessions=len(server.sessions), uptime_s=time.time() - server.started,
                        commands=cmds, fetch_bytes=fb,
                        blob_cache_hit_rate=hit_rate() if hit_rate else None)

    return r
