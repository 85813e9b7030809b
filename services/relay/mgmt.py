"""Management API of the relay (mounted under /api/v1 behind the admin token): the outbound
queue, one message's delivery history, retry now, cancel."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, status
from pydantic import BaseModel

from postbus.kit.bus import BusUnavailable
from postbus.proto.mail import DeliveryEvent
from postbus.relay.worker import Conflict, QueueEntry, RelayWorker


class RcptView(BaseModel):
    address: str
    state: str
    attempts: int
    status: str | None
    reply: str
    remote_mta: str | None
    last_attempt_at: datetime | None


class QueueItem(BaseModel):
    queue_id: str
    mail_from: str
    size: int
    queued_at: datetime
    attempts: int
    next_attempt_at: datetime | None
    in_progress: bool
    cancelled: bool
    done: bool
    recipients: list[RcptView]


def _view(e: QueueEntry) -> QueueItem:
    return QueueItem(
        queue_id=e.queue_id, mail_from=e.job.mail_from, size=e.job.size,
        queued_at=e.job.queued_at, attempts=e.attempts, next_attempt_at=e.next_attempt_at,
        in_progress=e.lease_owner is not None, cancelled=e.cancelled, done=e.done,
        recipients=[RcptView(address=r.address, state=r.state, attempts=r.attempts,
                             status=r.status, reply=r.reply, remote_mta=r.remote_mta,
                             last_attempt_at=r.last_attempt_at) for r in e.recipients])


def router(worker: RelayWorker) -> APIRouter:
    r = APIRouter(prefix="/queue", tags=["relay"])

    async def _get(queue_id: str) -> QueueEntry:
        try:
            got = await worker.load(queue_id)
        except BusUnavailable as exc:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from exc
        if got is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such queue id")
        return got[0]

    @r.get("", response_model=list[QueueItem])
    async def list_queue(
        all: Annotated[bool, Query(description="include finished messages (kept until the"
                                               " queue bucket's TTL)")] = False,
        limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
    ) -> list[QueueItem]:
        """Queued messages with their recipients, attempts and next attempt, oldest first."""
        try:
            entries = await worker.entries()
        except BusUnavailable as exc:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from exc
        items = [_view(e) for e in entries if all or not (e.done or e.cancelled)]
        items.sort(key=lambda i: i.queued_at)
        return items[:limit]

    @r.get("/{queue_id}", response_model=QueueItem)
    async def get_one(queue_id: str) -> QueueItem:
        """One message's queue state."""
        return _view(await _get(queue_id))

    @r.get("/{queue_id}/events", response_model=list[DeliveryEvent])
    async def events(
        queue_id: str, limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
    ) -> list[DeliveryEvent]:
        """Delivery status history of one message from the events stream (every service's
        events: received, delivered, deferred, relayed, failed, bounced), oldest first."""
        try:
            return await worker.history(queue_id, limit)
        except BusUnavailable as exc:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from exc

    @r.post("/{queue_id}/retry", response_model=QueueItem, status_code=202)
    async def retry(queue_id: str) -> QueueItem:
        """Try the pending recipients now instead of at the scheduled time."""
        e = await _get(queue_id)
        if e.done or e.cancelled:
            raise HTTPException(status.HTTP_409_CONFLICT, "nothing left to deliver")
        if e.lease_owner is not None:
            raise HTTPException(status.HTTP_409_CONFLICT, "an attempt is in progress")
        try:
            return _view(await worker.retry_now(queue_id))
        except Conflict as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, "changed concurrently") from exc

    @r.delete("/{queue_id}", response_model=QueueItem)
    async def cancel(
        queue_id: str,
        bounce: Annotated[bool, Query(description="send a failure DSN to the sender")] = False,
    ) -> QueueItem:
        """Stop delivering: every pending recipient is failed (bounced to the sender when
        ``bounce=true``, else dropped silently with a failed event)."""
        e = await _get(queue_id)
        if e.done or e.cancelled:
            raise HTTPException(status.HTTP_409_CONFLICT, "nothing left to deliver")
        try:
            return _view(await worker.cancel(queue_id, bounce=bounce))
        except Conflict as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, "changed concurrently") from exc

    return r
