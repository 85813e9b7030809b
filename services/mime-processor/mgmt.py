"""Management API of mime-processor (mounted under /api/v1 behind the admin token)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request

from postbus.mime_processor.settings import Settings
from postbus.mime_processor.worker import Stats
from postbus.proto.mail import MessageSummary
from postbus.protocols.mime import summarize

MAX_SUMMARIZE_BYTES = 50 * 1024 * 1024


def router(stats: Stats, settings: Settings) -> APIRouter:
    r = APIRouter(prefix="/mime", tags=["mime-processor"])

    @r.get("/stats")
    async def get_stats() -> dict[str, Any]:
        """Messages processed by this replica, by outcome, route and authentication result."""
        return {**stats.as_dict(), "auth_checks": settings.auth_checks,
                "authserv_id": settings.authserv_id or settings.common.hostname}

    @r.get("/failures")
    async def get_failures(
        limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    ) -> list[dict[str, Any]]:
        """The most recent processing failures (each one was retried), newest first."""
        return [{"queue_id": f.queue_id, "at": f.at.isoformat(), "reason": f.reason,
                 "attempt": f.attempt} for f in list(stats.failures)[:limit]]

    @r.post("/summarize", response_model=MessageSummary, response_model_by_alias=True)
    async def post_summarize(request: Request) -> MessageSummary:
        """The MessageSummary (ENVELOPE, BODYSTRUCTURE, part offsets) of a raw message sent
        as the request body: what IMAP will show for it."""
        body = await request.body()
        if len(body) > MAX_SUMMARIZE_BYTES:
            raise HTTPException(413, "message too large")
        return summarize(body)

    return r
