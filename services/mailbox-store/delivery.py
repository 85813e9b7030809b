"""Local delivery: the durable pull consumer "mailbox-store" on mail.deliver.local.

Idempotent on (queue_id, account_id) through the deliveries table (same transaction as the
message). Every outcome is reported as a delivery event; nothing is dropped silently:
over quota / disabled -> "deferred" while attempts remain, then "failed" so relay bounces.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

from postbus.kit.blob import BlobStore, BlobUnavailable, blob_key
from postbus.kit.bus import Ack, Bus, BusUnavailable, Delivery, Outcome, Retry
from postbus.kit.logging import get_logger
from postbus.kit.metrics import counter
from postbus.mailbox_store.repository import Change, NewMessage, Repository
from postbus.mailbox_store.settings import Settings
from postbus.proto.mail import (
    DELIVER_LOCAL,
    DELIVERY_EVENT,
    MAILBOX_CHANGED,
    DeliverLocal,
    DeliveryEvent,
    EventKind,
    MailboxChanged,
    MessageChange,
)

log = get_logger(__name__)
DURABLE = "mailbox-store"
SERVICE = "mailbox-store"
DELIVERIES = counter("postbus_store_deliveries_total", "Local deliveries by outcome", ["outcome"])


def mailbox_changed(change: Change, origin: str | None = None) -> MailboxChanged:
    return MailboxChanged(
        account_id=change.account_id, mailbox_id=change.mailbox_id, mailbox=change.mailbox,
        uidvalidity=change.uidvalidity, uidnext=change.uidnext,
        highestmodseq=change.highestmodseq, exists=change.exists,
        added=[MessageChange(uid=m.uid, modseq=m.modseq, flags=m.flags) for m in change.added],
        flags=[MessageChange(uid=m.uid, modseq=m.modseq, flags=m.flags) for m in change.flags],
        expunged=change.expunged, origin=origin)


CHANGE_CHUNK = 2000  # entries per MAILBOX_CHANGED message: stays far below the payload limit


async def publish_change(bus: Bus, change: Change | None, origin: str | None = None) -> None:
    """Publish after the commit; a big change (STORE 1:*) goes out in several messages."""
    if change is None:
        return
    parts = [change]
    if max(len(change.added), len(change.flags), len(change.expunged)) > CHANGE_CHUNK:
        parts = []
        for field_name in ("added", "flags", "expunged"):
            items = getattr(change, field_name)
            for i in range(0, len(items), CHANGE_CHUNK):
                part = dataclasses.replace(change, added=[], flags=[], expunged=[])
                setattr(part, field_name, items[i:i + CHANGE_CHUNK])
                parts.append(part)
    for part in parts:
        await bus.publish_core(MAILBOX_CHANGED, mailbox_changed(part, origin),
                               account_id=str(change.account_id))


async def keep_body(blobs: BlobStore, inline_max: int, body: bytes, key: str | None
                    ) -> tuple[str, bytes | None]:
    """A body sent along with its key (a small DeliverLocal or APPEND): checked against the
    key, then kept inline (returned, for the blob row) when at most ``inline_max`` bytes,
    else put in S3 here (ADR 0014). Raises ValueError when the key is not the body's."""
    actual = blob_key(body)
    if key is not None and key != actual:
        raise ValueError(f"the body sent does not match {key}")
    if len(body) <= inline_max:
        return actual, body
    return await blobs.put(body, cache=False), None


class Deliverer:
    def __init__(self, bus: Bus, blobs: BlobStore, repo: Repository, settings: Settings) -> None:
        self.bus = bus
        self.blobs = blobs
        self.repo = repo
        self.settings = settings

    def start(self) -> None:
        self.bus.consume(DELIVER_LOCAL, self.handle, durable=DURABLE,
                         concurrency=self.settings.delivery_concurrency,
                         batch=min(256, max(32, self.settings.delivery_concurrency * 2)),
                         ack_wait_s=self.settings.delivery_ack_wait_s)

    def _delay(self, attempt: int) -> float:
        s = self.settings
        return float(min(s.delivery_retry_max_s, s.delivery_retry_base_s * 2 ** max(0, attempt - 1)))

    async def _event(self, d: DeliverLocal, kind: EventKind, *, status: str | None = None,
                     detail: str = "", attempt: int = 0,
                     next_attempt_at: datetime | None = None) -> None:
        if kind == "failed" and d.body is not None:
            # relay bounces with the body read from S3 (ADR 0004); a small body that came
            # inline and was not stored is put there first (ADR 0014)
            await self.blobs.put(d.body, cache=False)
        ev = DeliveryEvent(
            queue_id=d.queue_id, kind=kind, recipient=d.recipient, at=datetime.now(UTC),
            service=SERVICE, status=status, detail=detail, attempt=attempt,
            next_attempt_at=next_attempt_at, mail_from=d.mail_from, blob_key=d.blob_key,
            notify=list(d.notify), dsn_envid=d.dsn_envid)
        # one event per (queue id, account, kind, attempt): a redelivery re-publishes the
        # same message id and JetStream keeps one copy
        await self.bus.publish(DELIVERY_EVENT, ev, msg_id=f"{d.queue_id}.{d.account_id}.{kind}.{attempt}",
                               queue_id=d.queue_id, kind=kind)

    async def _not_now(self, d: DeliverLocal, attempt: int, temp: str, perm: str,
                       detail: str) -> Outcome:
        """Over quota or disabled: deferred while attempts remain, then failed (bounce)."""
        if attempt < self.settings.delivery_max_attempts:
            delay = self._delay(attempt)
            await self._event(d, "deferred", status=temp, detail=detail, attempt=attempt,
                              next_attempt_at=datetime.now(UTC) + timedelta(seconds=delay))
            DELIVERIES.labels("deferred").inc()
            log.info("delivery deferred", queue_id=d.queue_id, account=d.account, status=temp,
                     attempt=attempt)
            return Retry(delay, detail)
        await self._event(d, "failed", status=perm, detail=detail, attempt=attempt)
        DELIVERIES.labels("failed").inc()
        log.warning("delivery failed", queue_id=d.queue_id, account=d.account, status=perm)
        return Ack()

    async def handle(self, item: Delivery[DeliverLocal]) -> Outcome:
        d = item.data
        attempt = item.num_delivered
        body: bytes | None = None
        try:
            if d.body is not None:
                _, body = await keep_body(self.blobs, self.settings.common.inline_body_max,
                                          d.body, d.blob_key)
            elif (self.settings.verify_blob_on_delivery
                  and not await self.blobs.exists(d.blob_key)):
                return await self._not_now(d, attempt, "4.3.0", "5.3.0",
                                           f"message body {d.blob_key} is missing from the blob store")
        except BlobUnavailable as exc:
            log.warning("blob store unavailable; retrying", error=str(exc))
            return Retry(5.0, "blob store unavailable")
        msg = NewMessage(blob_key=d.blob_key, blob_size=d.blob_size, summary=d.summary,
                         prefix=d.prefix, flags=d.flags, internaldate=d.received_at, body=body)
        res = await self.repo.deliver(d.queue_id, d.account_id, d.mailbox, msg)
        try:
            match res.status:
                case "delivered" | "duplicate":
                    if res.status == "delivered":
                        await publish_change(self.bus, res.change)
                        log.info("delivered", queue_id=d.queue_id, account=d.account, uid=res.uid)
                    DELIVERIES.labels(res.status).inc()
                    # also on a duplicate: the first attempt may have died before its event
                    await self._event(d, "delivered", status="2.0.0",
                                      detail=f"stored in {d.mailbox}", attempt=0)
                    return Ack()
                case "over_quota":
                    return await self._not_now(d, attempt, "4.2.2", "5.2.2", "mailbox full")
                case "disabled":
                    return await self._not_now(d, attempt, "4.2.1", "5.2.1",
                                               "mailbox disabled, not accepting messages")
                case "no_account":
                    await self._event(d, "failed", status="5.1.1", attempt=attempt,
                                      detail=f"no such account {d.account}")
                    DELIVERIES.labels("failed").inc()
                    return Ack()
        except BusUnavailable as exc:
            # the stored message is safe; the redelivery finds it and publishes the event
            log.warning("delivery event not published; will retry", error=str(exc))
            return Retry(2.0, "event not published")
        return Retry(5.0, "unexpected outcome")
