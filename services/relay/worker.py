"""The outbound queue: one delivery attempt per JetStream delivery, state per queue id in a
JetStream KV bucket, retries by nak(delay), DSNs for failures, delays and (when asked)
relays, and bounces for failures other services report.

Crash safety: every recipient outcome is written to KV (compare-and-set) before the
message is acked, and events and DSNs go through an outbox kept in the same KV entry, so a
new worker resumes exactly where a dead one stopped. Talks to SMTP and DNS only through
the ports in ``ports.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Literal

from pydantic import BaseModel, Field

from postbus.kit.blob import BlobNotFound, BlobStore, BlobUnavailable
from postbus.kit.bus import Ack, Bus, BusUnavailable, Delivery, KvBucket, Outcome, Retry
from postbus.kit.logging import get_logger
from postbus.kit.metrics import counter, gauge, histogram
from postbus.proto.base import Subject
from postbus.proto.mail import (
    DELIVERY_EVENT,
    EVENTS_STREAM,
    MAIL_RECEIVED,
    OUTBOUND_QUEUED,
    BodyRef,
    ClientInfo,
    DeliveryEvent,
    MailReceived,
    OutboundQueued,
    Recipient,
)
from postbus.protocols import dsn as dsnlib
from postbus.relay import policy
from postbus.relay.ports import Destinations, Envelope, NoRoute, RcptResult, RcptSpec, Transport
from postbus.relay.settings import Settings

SERVICE = "relay"
log = get_logger(__name__)

# failures reported by any service; relay skips its own (service == "relay")
FAILED_EVENTS = Subject("mail.events.v1.{queue_id}.failed", DeliveryEvent, EVENTS_STREAM,
                        "Failed recipients, to bounce")

DELIVERIES = counter("postbus_relay_deliveries_total", "Recipient outcomes of delivery attempts",
                     ["outcome"])
DSNS = counter("postbus_relay_dsn_total", "DSNs injected", ["action", "origin"])
QUEUE_SIZE = gauge("postbus_relay_queue_messages", "Messages with recipients still to deliver")
DELIVERY_LATENCY = histogram(
    "postbus_relay_delivery_seconds", "From queued to relayed, per recipient", [],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400))
ATTEMPTS = histogram("postbus_relay_attempts", "Attempts until a final outcome, per recipient",
                     [], buckets=(1, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 50))
ATTEMPT_SECONDS = histogram("postbus_relay_attempt_seconds", "One SMTP attempt to one domain")


# ---------------------------------------------------------------- state kept in KV
class RcptState(BaseModel):
    address: str
    orcpt: str | None = None
    notify: list[str] = Field(default_factory=list)
    state: Literal["pending", "relayed", "failed", "cancelled"] = "pending"
    attempts: int = 0
    status: str | None = None
    reply: str = ""
    remote_mta: str | None = None
    remote_dsn: bool = False
    last_attempt_at: datetime | None = None
    delay_notified: bool = False


class DsnRcpt(BaseModel):
    address: str
    orcpt: str | None = None
    status: str
    reply: str = ""
    remote_mta: str | None = None
    last_attempt_at: datetime | None = None


class Notice(BaseModel):
    """An effect decided and recorded, to be published (outbox)."""

    msg_id: str
    event: DeliveryEvent | None = None
    dsn_action: Literal["failed", "delayed", "relayed"] | None = None
    dsn_rcpts: list[DsnRcpt] = Field(default_factory=list)
    will_retry_until: datetime | None = None


class QueueEntry(BaseModel):
    queue_id: str
    job: OutboundQueued
    recipients: list[RcptState]
    created_at: datetime
    attempts: int = 0
    next_attempt_at: datetime | None = None
    active_seq: int = 0
    lease_owner: str | None = None
    lease_until: datetime | None = None
    cancelled: bool = False
    outbox: list[Notice] = Field(default_factory=list)

    @property
    def pending(self) -> list[RcptState]:
        return [r for r in self.recipients if r.state == "pending"]

    @property
    def done(self) -> bool:
        return not self.pending

    def rcpt(self, address: str) -> RcptState | None:
        for r in self.recipients:
            if r.address == address:
                return r
        return None


class Conflict(Exception):
    """Someone else changed the entry; the caller may try again."""


def _now() -> datetime:
    return datetime.now(UTC)


class RelayWorker:
    def __init__(self, settings: Settings, *, bus: Bus, blobs: BlobStore, queue: KvBucket,
                 bounces: KvBucket, destinations: Destinations, transport: Transport,
                 clock: Callable[[], datetime] = _now) -> None:
        self.s = settings
        self.bus = bus
        self.blobs = blobs
        self.queue = queue
        self.bounces = bounces
        self.destinations = destinations
        self.transport = transport
        self.clock = clock
        self.id = uuid.uuid4().hex[:12]
        self.schedule = settings.schedule
        self._busy: set[str] = set()
        self._locks: dict[str, asyncio.Lock] = {}
        self._last: dict[str, tuple[bytes, int]] = {}  # key -> (value, revision) we wrote

    # ------------------------------------------------------------ KV helpers
    async def load(self, queue_id: str) -> tuple[QueueEntry, int] | None:
        e = await self.queue.get(policy.kv_key(queue_id))
        if e is None:
            return None
        return QueueEntry.model_validate_json(e.value), e.revision

    async def mutate(self, queue_id: str, fn: Callable[[QueueEntry], None],
                     tries: int = 20) -> QueueEntry:
        """Read, apply ``fn``, compare-and-set; again on a conflict. ``fn`` must be safe to
        apply to a fresher entry (it sets values, it does not count on the old ones).

        The revision this worker wrote last is tried first, without a read; a conflict
        (someone else wrote since) costs one read."""
        key = policy.kv_key(queue_id)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            for _ in range(tries):
                hint = self._last.pop(key, None)
                if hint is not None:
                    entry, rev = QueueEntry.model_validate_json(hint[0]), hint[1]
                else:
                    got = await self.load(queue_id)
                    if got is None:
                        raise KeyError(queue_id)
                    entry, rev = got
                fn(entry)
                data = entry.model_dump_json().encode()
                new_rev = await self.queue.update(key, data, rev)
                if new_rev is not None:
                    self._remember(key, data, new_rev, entry)
                    return entry
                await asyncio.sleep(0.005)
        raise Conflict(queue_id)

    def _remember(self, key: str, data: bytes, rev: int, entry: QueueEntry) -> None:
        if (entry.done or entry.cancelled) and not entry.outbox:
            self._last.pop(key, None)  # finished: nothing more to write soon
            self._locks.pop(key, None)
        else:
            self._last[key] = (data, rev)

    def _new_entry(self, job: OutboundQueued) -> QueueEntry:
        return QueueEntry(
            queue_id=job.queue_id, job=job, created_at=self.clock(),
            recipients=[RcptState(address=r.address, orcpt=r.orcpt, notify=list(r.notify))
                        for r in _unique(job.recipients)])

    # ------------------------------------------------------------ the work queue handler
    async def handle(self, d: Delivery[OutboundQueued]) -> Outcome:
        job = d.data
        qid = job.queue_id
        seq = int(d.msg.metadata.sequence.stream)
        if qid in self._busy:  # our own attempt is still running (a "retry now" copy)
            return Retry(1.0, "attempt in progress")
        key = policy.kv_key(qid)
        now = self.clock()
        # the common case, a message seen for the first time: create it already leased
        entry = self._new_entry(job)
        self._take_lease(entry, seq, now)
        data = entry.model_dump_json().encode()
        rev = await self.queue.create(key, data)
        if rev is None:  # seen before: a retry, a redelivery, another replica, a duplicate
            leased = await self._lease_existing(qid, seq, now)
            if not isinstance(leased, QueueEntry):
                return leased
            entry = leased
        else:
            self._remember(key, data, rev, entry)

        self._busy.add(qid)
        beat = asyncio.create_task(self._heartbeat(d, qid))
        try:
            entry = await self._attempt(entry)
        finally:
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await beat
            self._busy.discard(qid)
        entry = await self.flush(qid)
        # the next attempt may be hours away or on another replica: keep nothing in memory
        self._last.pop(key, None)
        self._locks.pop(key, None)
        if entry.done or entry.cancelled:
            return Ack()
        wait = ((entry.next_attempt_at or self.clock()) - self.clock()).total_seconds()
        return Retry(max(0.05, wait), "deferred")

    def _take_lease(self, entry: QueueEntry, seq: int, now: datetime) -> None:
        entry.active_seq = max(entry.active_seq, seq)
        entry.lease_owner = self.id
        entry.lease_until = now + timedelta(seconds=self.s.lease_s)
        entry.attempts += 1

    async def _lease_existing(self, qid: str, seq: int, now: datetime) -> Outcome | QueueEntry:
        """Decide about a message that already has state: the entry when this worker now
        holds the lease and should attempt delivery, else the outcome to return."""
        got = await self.load(qid)
        if got is None:
            return Retry(0.2, "entry vanished")
        entry, rev = got
        if entry.outbox:  # a worker died between recording and publishing
            await self.flush(qid)
            got = await self.load(qid)
            if got is None:
                return Ack()
            entry, rev = got
        if entry.done or entry.cancelled:
            return Ack()
        if seq < entry.active_seq:
            return Ack()  # superseded by a newer copy ("retry now")
        if entry.lease_until and entry.lease_until > now:
            return Retry(max(0.2, (entry.lease_until - now).total_seconds() + 0.1), "leased")
        if entry.next_attempt_at and entry.next_attempt_at > now + timedelta(seconds=0.2):
            if seq > entry.active_seq:
                with contextlib.suppress(Conflict):
                    await self.mutate(qid, lambda e: setattr(e, "active_seq", max(e.active_seq, seq)))
            return Retry((entry.next_attempt_at - now).total_seconds(), "not yet due")
        self._take_lease(entry, seq, now)
        data = entry.model_dump_json().encode()
        new_rev = await self.queue.update(policy.kv_key(qid), data, rev)
        if new_rev is None:
            return Retry(0.2, "lost the race for the lease")
        self._remember(policy.kv_key(qid), data, new_rev, entry)
        return entry

    async def _heartbeat(self, d: Delivery[OutboundQueued], qid: str) -> None:
        """Keep the JetStream ack deadline and the KV lease ahead of a long attempt."""
        period = max(0.2, min(self.s.ack_wait_s, self.s.lease_s) / 3)
        while True:
            await asyncio.sleep(period)
            with contextlib.suppress(Exception):
                await d.in_progress()
            until = self.clock() + timedelta(seconds=self.s.lease_s)

            def extend(e: QueueEntry, until: datetime = until) -> None:
                if e.lease_owner == self.id:
                    e.lease_until = until

            with contextlib.suppress(Exception):
                await self.mutate(qid, extend)

    # ------------------------------------------------------------ one attempt
    async def _attempt(self, entry: QueueEntry) -> QueueEntry:
        """Deliver to every domain at once. Each domain's outcomes are written to KV as soon
        as they are known (a crash later must not deliver them again); the last domain's
        share the final write with the schedule."""
        job = entry.job
        attempt = entry.attempts
        pending = entry.pending
        last: dict[str, RcptResult] = {}
        try:
            body = await self.blobs.get(job.blob_key)
        except (BlobNotFound, BlobUnavailable) as exc:
            log.warning("body not available", queue_id=job.queue_id, error=str(exc))
            last = {r.address: RcptResult("deferred", "4.3.0", f"message body unavailable: {exc}")
                    for r in pending}
        else:
            by_addr = {r.address: r for r in pending}
            groups = policy.group_by_domain(r.address for r in pending)
            tasks = [asyncio.ensure_future(
                self._deliver_domain(job, domain, [by_addr[a] for a in addrs], body))
                for domain, addrs in groups.items()]
            try:
                for i, fut in enumerate(asyncio.as_completed(tasks)):
                    results = await fut
                    if i < len(tasks) - 1:
                        await self._record(job.queue_id, attempt, results)
                    else:
                        last = results
            finally:
                for t in tasks:
                    t.cancel()
        now = self.clock()

        def final(e: QueueEntry) -> None:
            self._apply_results(e, attempt, last, now)
            self._after_attempt(e, attempt)

        return await self.mutate(job.queue_id, final)

    async def _deliver_domain(self, job: OutboundQueued, domain: str, rcpts: list[RcptState],
                              body: bytes) -> dict[str, RcptResult]:
        started = time.perf_counter()
        route = await self.destinations.route(domain)
        if isinstance(route, NoRoute):
            outcome: Literal["failed", "deferred"] = "failed" if route.permanent else "deferred"
            results = {r.address: RcptResult(outcome, route.status, route.detail) for r in rcpts}
        else:
            env = Envelope(mail_from=job.mail_from,
                           recipients=[RcptSpec(r.address, tuple(r.notify), r.orcpt) for r in rcpts],
                           size=len(body), body_type=job.body_type, smtputf8=job.smtputf8,
                           dsn_envid=job.dsn_envid, dsn_ret=job.dsn_ret)
            try:
                got = await self.transport.send(route.hops, env, body)
                results = got.results
            except Exception as exc:  # a bug in the client must not lose the message
                log.exception("smtp attempt failed", queue_id=job.queue_id, domain=domain)
                results = {}
                detail = f"local error: {type(exc).__name__}"
            else:
                detail = "no reply for this recipient"
            for r in rcpts:
                results.setdefault(r.address, RcptResult("deferred", "4.3.0", detail))
        ATTEMPT_SECONDS.observe(time.perf_counter() - started)
        return results

    async def _record(self, qid: str, attempt: int, results: dict[str, RcptResult]) -> None:
        """Write final outcomes (relayed/failed) to KV at once, with their events and DSNs in
        the outbox; deferrals are settled in ``_after_attempt``."""
        now = self.clock()
        await self.mutate(qid, lambda e: self._apply_results(e, attempt, results, now))

    def _apply_results(self, e: QueueEntry, attempt: int, results: dict[str, RcptResult],
                       now: datetime) -> None:
        job = e.job
        failed_dsn: list[DsnRcpt] = []
        relayed_dsn: list[DsnRcpt] = []
        for addr, res in results.items():
            r = e.rcpt(addr)
            if r is None or r.state != "pending":
                continue
            r.attempts = attempt
            r.status, r.reply, r.remote_mta = res.status, res.reply, res.remote_mta
            r.last_attempt_at = now
            if res.outcome == "deferred":
                continue
            DELIVERIES.labels(res.outcome).inc()
            ATTEMPTS.observe(attempt)
            if res.outcome == "relayed":
                r.state, r.remote_dsn = "relayed", res.remote_dsn
                DELIVERY_LATENCY.observe(max(0.0, (now - job.queued_at).total_seconds()))
                e.outbox.append(self._event_notice(e, r, "relayed", now))
                if not res.remote_dsn and policy.wants_success_dsn(
                        job.mail_from, job.is_bounce, r.notify):
                    relayed_dsn.append(_dsn_rcpt(r))
            else:
                r.state = "failed"
                e.outbox.append(self._event_notice(e, r, "failed", now))
                if policy.wants_failure_dsn(job.mail_from, job.is_bounce, r.notify):
                    failed_dsn.append(_dsn_rcpt(r))
        self._queue_dsn(e, "failed", failed_dsn, f"{attempt}")
        self._queue_dsn(e, "relayed", relayed_dsn, f"{attempt}")

    def _after_attempt(self, e: QueueEntry, attempt: int) -> None:
        """Release the lease; schedule the next attempt or expire what is still pending."""
        if e.lease_owner == self.id:
            e.lease_owner, e.lease_until = None, None
        if e.done or e.cancelled or e.attempts != attempt:
            return
        now = self.clock()
        job = e.job
        nxt = policy.after_deferral(attempt, job.queued_at, now, schedule=self.schedule,
                                    max_age_s=self.s.max_age_s)
        if isinstance(nxt, policy.Expired):
            expired: list[DsnRcpt] = []
            for r in e.pending:
                r.state = "failed"
                r.reply = f"retries expired after {attempt} attempts; last error: {r.reply}"
                r.status = r.status if r.status and r.status.startswith("5") else "4.4.7"
                DELIVERIES.labels("expired").inc()
                ATTEMPTS.observe(attempt)
                e.outbox.append(self._event_notice(e, r, "failed", now))
                if policy.wants_failure_dsn(job.mail_from, job.is_bounce, r.notify):
                    expired.append(_dsn_rcpt(r))
            self._queue_dsn(e, "failed", expired, "expired")
            e.next_attempt_at = None
            return
        e.next_attempt_at = nxt.at
        delayed: list[DsnRcpt] = []
        age = (now - job.queued_at).total_seconds()
        for r in e.pending:
            DELIVERIES.labels("deferred").inc()
            e.outbox.append(self._event_notice(e, r, "deferred", now, next_at=nxt.at))
            if (not r.delay_notified and age >= self.s.delay_dsn_after_s
                    and policy.wants_delay_dsn(job.mail_from, job.is_bounce, r.notify)):
                r.delay_notified = True
                delayed.append(_dsn_rcpt(r))
        self._queue_dsn(e, "delayed", delayed, "delay",
                        until=job.queued_at + timedelta(seconds=self.s.max_age_s))

    def _event_notice(self, e: QueueEntry, r: RcptState, kind: Literal["relayed", "deferred", "failed"],
                      now: datetime, next_at: datetime | None = None) -> Notice:
        job = e.job
        ev = DeliveryEvent(
            queue_id=e.queue_id, kind=kind, recipient=r.address, at=now, service=SERVICE,
            status=r.status, detail=r.reply, remote_mta=r.remote_mta, attempt=r.attempts,
            next_attempt_at=next_at, mail_from=job.mail_from, blob_key=job.blob_key,
            notify=list(r.notify), orcpt=r.orcpt, dsn_envid=job.dsn_envid, dsn_ret=job.dsn_ret)
        suffix = f":{r.attempts}" if kind == "deferred" else ""
        return Notice(msg_id=f"relay:{e.queue_id}:{r.address.lower()}:{kind}{suffix}", event=ev)

    def _queue_dsn(self, e: QueueEntry, action: Literal["failed", "delayed", "relayed"],
                   rcpts: list[DsnRcpt], tag: str, until: datetime | None = None) -> None:
        if not rcpts:
            return
        names = ",".join(sorted(r.address.lower() for r in rcpts))
        digest = hashlib.sha256(names.encode()).hexdigest()[:16]
        e.outbox.append(Notice(msg_id=f"dsn:{e.queue_id}:{action}:{digest}", dsn_action=action,
                               dsn_rcpts=rcpts, will_retry_until=until))
        if action == "failed":
            now = self.clock()
            for r in rcpts:
                st = e.rcpt(r.address)
                if st is not None:
                    e.outbox.append(self._bounced_notice(e.queue_id, e.job, st, now))

    @staticmethod
    def _bounced_notice(qid: str, job: OutboundQueued, r: RcptState, now: datetime) -> Notice:
        ev = DeliveryEvent(queue_id=qid, kind="bounced", recipient=r.address, at=now,
                           service=SERVICE, status=r.status, detail="DSN sent to the sender",
                           mail_from=job.mail_from, attempt=r.attempts)
        return Notice(msg_id=f"relay:{qid}:{r.address.lower()}:bounced", event=ev)

    # ------------------------------------------------------------ the outbox
    async def flush(self, qid: str) -> QueueEntry:
        """Publish what the entry's outbox holds, then drop it from the outbox."""
        hint = self._last.get(policy.kv_key(qid))
        if hint is not None:
            entry = QueueEntry.model_validate_json(hint[0])
        else:
            got = await self.load(qid)
            if got is None:
                raise KeyError(qid)
            entry = got[0]
        done: set[str] = set()
        for n in entry.outbox:
            if n.event is not None:
                await self.bus.publish(DELIVERY_EVENT, n.event, msg_id=n.msg_id,
                                       queue_id=policy.subject_token(qid), kind=n.event.kind)
            elif n.dsn_action is not None:
                await self.send_dsn(
                    n.msg_id, sender=entry.job.mail_from, action=n.dsn_action,
                    rcpts=n.dsn_rcpts, envid=entry.job.dsn_envid, ret=entry.job.dsn_ret,
                    arrival=entry.job.queued_at, blob_key=entry.job.blob_key,
                    until=n.will_retry_until, origin="relay")
            done.add(n.msg_id)
        if not done:
            return entry
        return await self.mutate(qid, lambda e: setattr(
            e, "outbox", [n for n in e.outbox if n.msg_id not in done]))

    # ------------------------------------------------------------ DSNs
    async def send_dsn(self, dedup_id: str, *, sender: str, action: Literal["failed", "delayed", "relayed"],
                       rcpts: list[DsnRcpt], envid: str | None, ret: Literal["FULL", "HDRS"] | None,
                       arrival: datetime | None, blob_key: str | None,
                       until: datetime | None = None, origin: str) -> bool:
        """Build an RFC 3464 report and inject it as new mail from the null sender to
        ``sender``; at most once per ``dedup_id`` (KV marker + JetStream msg id)."""
        marker = hashlib.sha256(dedup_id.encode()).hexdigest()
        if await self.bounces.get(marker) is not None:
            return False
        original: bytes | None = None
        if blob_key:
            try:
                original = await self.blobs.get(blob_key)
            except BlobNotFound:
                original = None
        now = self.clock()
        report = dsnlib.Report(
            reporting_mta=self.s.ehlo_name, sender=sender, date=now, envelope_id=envid,
            arrival_date=arrival, ret=ret, original=original,
            recipients=[dsnlib.RecipientReport(
                final_recipient=r.address, action=action, status=r.status,
                original_recipient=r.orcpt, diagnostic=r.reply or None,
                remote_mta=r.remote_mta, last_attempt=r.last_attempt_at,
                will_retry_until=until) for r in rcpts])
        new_qid = "DSN" + marker[:20].upper()
        data = dsnlib.build_dsn(report, message_id=f"{new_qid}@{self.s.ehlo_name}")
        if len(data) > self.s.common.inline_threshold:
            body = BodyRef(size=len(data), blob_key=await self.blobs.put(data))
        else:
            body = BodyRef(size=len(data), inline=data)
        mail = MailReceived(
            queue_id=new_qid, received_at=now,
            # the mail system itself is the author: authenticated as MAILER-DAEMON so that
            # mime-processor may route a DSN to a remote sender (no open relay otherwise)
            client=ClientInfo(ip="127.0.0.1", helo=self.s.ehlo_name, listener="api",
                              auth_user=f"MAILER-DAEMON@{self.s.ehlo_name}"),
            mail_from="", rcpt_to=[Recipient(address=sender, notify=["NEVER"])], body=body,
            body_type="8BITMIME" if any(b > 127 for b in data) else "7BIT",
            smtputf8=not sender.isascii())
        await self.bus.publish(MAIL_RECEIVED, mail, msg_id=f"dsn:{marker}")
        await self.bounces.create(marker, new_qid.encode())
        DSNS.labels(action, origin).inc()
        log.info("dsn injected", action=action, to=sender, queue_id=new_qid, dedup=dedup_id)
        return True

    async def handle_failed_event(self, d: Delivery[DeliveryEvent]) -> Outcome:
        """Bounce a failure another service reported (ADR 0004)."""
        ev = d.data
        if ev.service == SERVICE or ev.kind != "failed" or not ev.recipient:
            return Ack()
        if not ev.mail_from or not policy.wants_failure_dsn(ev.mail_from, False, ev.notify):
            return Ack()
        age = (self.clock() - ev.at).total_seconds()
        if age > self.s.max_age_s:  # e.g. a new consumer reading an old events stream
            log.warning("failure too old to bounce", queue_id=ev.queue_id, age_s=int(age))
            return Ack()
        dedup = f"dsn:{ev.queue_id}:failed:{ev.recipient.lower()}"
        rc = DsnRcpt(address=ev.recipient, orcpt=ev.orcpt, status=ev.status or "5.0.0",
                     reply=ev.detail, remote_mta=ev.remote_mta, last_attempt_at=ev.at)
        try:
            await self.send_dsn(dedup, sender=ev.mail_from, action="failed", rcpts=[rc],
                                envid=ev.dsn_envid, ret=ev.dsn_ret, arrival=None,
                                blob_key=ev.blob_key, origin=ev.service)
        except BlobUnavailable:
            return Retry(5.0, "blob store unavailable")
        bounced = DeliveryEvent(queue_id=ev.queue_id, kind="bounced", recipient=ev.recipient,
                                at=self.clock(), service=SERVICE, status=ev.status,
                                detail=f"DSN sent for a failure reported by {ev.service}",
                                mail_from=ev.mail_from)
        await self.bus.publish(DELIVERY_EVENT, bounced,
                               msg_id=f"relay:{ev.queue_id}:{ev.recipient.lower()}:bounced",
                               queue_id=policy.subject_token(ev.queue_id), kind="bounced")
        return Ack()

    # ------------------------------------------------------------ management
    async def entries(self) -> list[QueueEntry]:
        out: list[QueueEntry] = []
        for e in await self.queue.entries():
            with contextlib.suppress(ValueError):
                out.append(QueueEntry.model_validate_json(e.value))
        return out

    async def refresh_gauge(self) -> int:
        n = sum(1 for e in await self.entries() if not e.done and not e.cancelled)
        QUEUE_SIZE.set(n)
        return n

    async def retry_now(self, qid: str) -> QueueEntry:
        """Make the message due now and hand the queue a fresh copy (the old one, nak'ed with
        a delay, is dropped when it comes back: its stream sequence is older)."""
        now = self.clock()

        def due(e: QueueEntry) -> None:
            if not e.done and not e.cancelled:
                e.next_attempt_at = now

        entry = await self.mutate(qid, due)
        if not entry.done and not entry.cancelled:
            await self.bus.publish(OUTBOUND_QUEUED, entry.job)
        return entry

    async def cancel(self, qid: str, *, bounce: bool) -> QueueEntry:
        """Give up on every pending recipient; with ``bounce`` tell the sender (RFC 3464)."""
        now = self.clock()

        def stop(e: QueueEntry) -> None:
            failed: list[DsnRcpt] = []
            for r in e.pending:
                r.state = "failed" if bounce else "cancelled"
                r.status = "5.0.0" if bounce else (r.status or "4.0.0")
                r.reply = "delivery cancelled by the postmaster"
                DELIVERIES.labels("cancelled").inc()
                e.outbox.append(self._event_notice(e, r, "failed", now))
                if bounce and policy.wants_failure_dsn(e.job.mail_from, e.job.is_bounce, r.notify):
                    failed.append(_dsn_rcpt(r))
            self._queue_dsn(e, "failed", failed, "cancel")
            e.cancelled = True
            e.next_attempt_at = None

        await self.mutate(qid, stop)
        return await self.flush(qid)

    async def history(self, qid: str, limit: int = 1000) -> list[DeliveryEvent]:
        got = await self.bus.read_stream(DELIVERY_EVENT, limit=limit,
                                         queue_id=policy.subject_token(qid))
        return [ev for _, ev in got]


def _unique(rcpts: list[Recipient]) -> list[Recipient]:
    seen: set[str] = set()
    out = []
    for r in rcpts:
        if r.address.lower() not in seen:
            seen.add(r.address.lower())
            out.append(r)
    return out


def _dsn_rcpt(r: RcptState) -> DsnRcpt:
    return DsnRcpt(address=r.address, orcpt=r.orcpt, status=r.status or "5.0.0", reply=r.reply,
                   remote_mta=r.remote_mta, last_attempt_at=r.last_attempt_at)


__all__ = ["FAILED_EVENTS", "RelayWorker", "QueueEntry", "BusUnavailable"]
