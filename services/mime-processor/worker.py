"""The mime-processor worker: one MailReceived in, durable effects out, then the ack.

For each message: body (inline or claim check) -> SPF/DKIM/DMARC for MX mail ->
Authentication-Results -> final bytes to S3 (content-addressed) -> MessageSummary ->
route every recipient -> publish DeliverLocal / OutboundQueued / DeliveryEvents -> ack.
Every effect is keyed (blob by content, publishes by msg id), so a retry is harmless.
Talks to ports only.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from postbus.kit.blob import BlobNotFound, BlobUnavailable, blob_key
from postbus.kit.bus import Ack, BusUnavailable, Delivery, Outcome, Reject, RemoteError, Retry
from postbus.kit.logging import get_logger
from postbus.kit.metrics import Tally, counter, histogram
from postbus.mime_processor import policy
from postbus.mime_processor.ports import Authenticator, Blobs, Directory, Memo, Publisher
from postbus.mime_processor.settings import Settings
from postbus.proto.directory import ResolveReply
from postbus.proto.mail import (
    DELIVER_LOCAL,
    DELIVERY_EVENT,
    OUTBOUND_QUEUED,
    DeliverLocal,
    DeliveryEvent,
    EventKind,
    MailReceived,
    MessageSummary,
    OutboundQueued,
    Recipient,
)
from postbus.protocols.mime import summarize
from postbus.protocols.served import normalize_crlf

log = get_logger(__name__)
SERVICE = "mime-processor"

LATENCY = histogram("postbus_mime_processing_seconds", "Time to process one inbound message")
MESSAGES = counter("postbus_mime_messages_total", "Inbound messages by outcome", ["outcome"])
RECIPIENTS = counter("postbus_mime_recipients_total", "Recipients by route", ["route"])
AUTH = counter("postbus_mime_auth_total", "Authentication results", ["method", "result"])
PROCESSED = counter("postbus_mime_processed_total", "Inbound messages processed and handed on")


@dataclass
class Failure:
    queue_id: str
    at: datetime
    reason: str
    attempt: int


@dataclass
class Stats:
    """What this worker counted, for the management API: each count is a kit Tally, so one
    call also counts it in Prometheus."""

    processed_tally: Tally = field(default_factory=lambda: Tally(PROCESSED))
    outcome_tally: Tally = field(default_factory=lambda: Tally(MESSAGES))  # by outcome
    route_tally: Tally = field(default_factory=lambda: Tally(RECIPIENTS))  # by route
    auth_tally: Tally = field(default_factory=lambda: Tally(AUTH))  # by method, result
    failures: deque[Failure] = field(default_factory=lambda: deque(maxlen=200))

    @property
    def processed(self) -> int:
        return self.processed_tally.total()

    @property
    def outcomes(self) -> dict[str, int]:
        return self.outcome_tally.by(0)

    @property
    def routes(self) -> dict[str, int]:
        return self.route_tally.by(0)

    @property
    def auth(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {"spf": {}, "dkim": {}, "dmarc": {}}
        for (method, result), n in self.auth_tally.by(0, 1).items():
            out.setdefault(method, {})[result] = n
        return out

    def fail(self, queue_id: str, reason: str, attempt: int) -> None:
        self.failures.appendleft(Failure(queue_id, datetime.now(UTC), reason[:300], attempt))

    def as_dict(self) -> dict[str, Any]:
        return {"processed": self.processed, "outcomes": self.outcomes, "routes": self.routes,
                "auth": self.auth}


@dataclass(frozen=True)
class Processed:
    """What one message became (returned for tests and logs)."""

    blob_key: str
    summary: MessageSummary
    plan: policy.Plan
    auth_results: str | None


class MimeWorker:
    def __init__(self, settings: Settings, *, directory: Directory, blobs: Blobs,
                 publisher: Publisher, authenticator: Authenticator | None = None,
                 memo: Memo | None = None, stats: Stats | None = None) -> None:
        self.settings = settings
        self.directory = directory
        self.blobs = blobs
        self.publisher = publisher
        self.authenticator = authenticator
        self.memo = memo
        self.stats = stats or Stats(failures=deque(maxlen=settings.recent_failures))
        self.authserv_id = settings.authserv_id or settings.common.hostname
        self._fresh_auth: dict[str, str] = {}  # computed this attempt, not yet remembered

    # ------------------------------------------------------------ the bus handler
    async def handle(self, d: Delivery[MailReceived]) -> Outcome:
        return await self.handle_message(d.data, d.num_delivered)

    async def handle_message(self, m: MailReceived, attempt: int = 1) -> Outcome:
        started = time.perf_counter()
        outcome: Outcome
        try:
            await self.process(m, attempt)
            outcome = Ack()
        except BlobNotFound as exc:
            if attempt >= self.settings.missing_blob_attempts:
                outcome = await self._give_up(m, f"message body {exc} not found")
            else:
                outcome = self._retry(m, attempt, f"body blob not found yet: {exc}")
        except (BusUnavailable, RemoteError, BlobUnavailable, TimeoutError, OSError) as exc:
            outcome = self._retry(m, attempt, f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # a bug: logged with its traceback and retried, never acked
            log.exception("processing failed", queue_id=m.queue_id)
            outcome = self._retry(m, attempt, f"internal: {type(exc).__name__}: {exc}")
        fresh = self._fresh_auth.pop(m.queue_id, None)
        if fresh is not None and isinstance(outcome, Retry) and self.memo is not None:
            # the next attempt must write the same header, hence the same blob
            with contextlib.suppress(Exception):
                await self.memo.put(m.queue_id, fresh)
        name = type(outcome).__name__.lower()
        self.stats.outcome_tally.inc(name)
        LATENCY.observe(time.perf_counter() - started)
        return outcome

    def _retry(self, m: MailReceived, attempt: int, reason: str) -> Retry:
        log.warning("message will be retried", queue_id=m.queue_id, attempt=attempt,
                    reason=reason)
        self.stats.fail(m.queue_id, reason, attempt)
        return Retry(delay_s=min(2.0 ** min(attempt, 6), 60.0), reason=reason)

    async def _give_up(self, m: MailReceived, reason: str) -> Outcome:
        """The body is gone for good: every recipient failed (4.3.0 would retry forever)."""
        self.stats.fail(m.queue_id, reason, 0)
        now = datetime.now(UTC)
        try:
            await asyncio.gather(*(
                self._event(m, "failed", now, r, status="5.3.0",
                            detail=f"554 5.3.0 {reason}", blob=None,
                            ret=policy.bounce_ret(m.dsn_ret, self._vouched(m)))
                for r in m.rcpt_to))
        except (BusUnavailable, OSError) as exc:
            return self._retry(m, self.settings.missing_blob_attempts, str(exc))
        log.error("message dropped: body missing", queue_id=m.queue_id)
        return Reject(reason)

    # ------------------------------------------------------------ the work
    async def process(self, m: MailReceived, attempt: int = 1) -> Processed:
        raw = await self._body(m)
        auth_value = await self._authenticate(m, raw, attempt)
        # on all mail, submitted too: nobody outside may speak for our authserv-id
        final = policy.strip_forged(raw, self.authserv_id)
        if auth_value is not None:
            final = policy.prepend_auth_results(final, auth_value, self.authserv_id)
        # IMAP sizes and offsets count CRLF (RFC 3501 §2.3.1): bare LF and bare CR become
        # CRLF here as on every other way in (APPEND, import), so IMAP and POP3 agree
        final = normalize_crlf(final)

        summary = await self._summarize(final)
        # smtp-ingress passes what the directory said at RCPT: no second lookup
        replies = await asyncio.gather(*(self._resolve(r) for r in m.rcpt_to))
        vouched = self._vouched(m)
        plan = policy.plan_routes(m.rcpt_to, replies, vouched)

        # durable first: the body is in S3, or travels in each DeliverLocal, before anyone
        # is told about it. A small message for local recipients only is not put in S3:
        # the store keeps it in its blob row (ADR 0014); relay reads S3 for what it sends
        # and bounces, so anything with a remote or failed recipient goes there.
        key = blob_key(final)
        inline = (len(final) <= self.settings.common.inline_body_max
                  and not plan.remote and not plan.failed)
        if not inline and key != m.body.blob_key:
            key = await self.blobs.put(final)
        await self._publish(m, key, len(final), summary, plan, auth_value,
                            policy.bounce_ret(m.dsn_ret, vouched), final if inline else None)

        self.stats.processed_tally.inc()
        for route, n in (("local", len(plan.local)), ("remote", len(plan.remote)),
                         ("failed", len(plan.failed))):
            if n:
                self.stats.route_tally.inc(route, n=n)
        log.info("message processed", queue_id=m.queue_id, blob=key, local=len(plan.local),
                 remote=len(plan.remote), failed=len(plan.failed))
        return Processed(key, summary, plan, auth_value)

    async def _resolve(self, r: Recipient) -> ResolveReply:
        return r.resolved if r.resolved is not None else await self.directory.resolve(r.address)

    async def _body(self, m: MailReceived) -> bytes:
        if m.body.inline is not None:
            return m.body.inline
        if not m.body.blob_key:
            raise BlobNotFound("<no inline body and no blob key>")
        return await self.blobs.get(m.body.blob_key)

    async def _summarize(self, raw: bytes) -> MessageSummary:
        if len(raw) <= self.settings.summarize_inline_max:
            return summarize(raw)
        return await asyncio.to_thread(summarize, raw)

    async def _authenticate(self, m: MailReceived, raw: bytes, attempt: int) -> str | None:
        """SPF/DKIM/DMARC for unauthenticated mail from the MX listener only. The value is
        remembered (Memo) only when an attempt fails, and looked up only on a redelivery:
        two JetStream operations per message saved on the common path."""
        if (not self.settings.auth_checks or self.authenticator is None
                or m.client.listener != "mx" or m.client.auth_user):
            return None
        if self.memo is not None and attempt > 1:
            try:
                known = await self.memo.get(m.queue_id)
            except Exception:
                known = None
            if known is not None:
                return known
        results = await self.authenticator.check(raw, m.client, m.mail_from)
        for method, res in (("spf", results.spf.result), ("dmarc", results.dmarc.result),
                            *(("dkim", d.result) for d in results.dkim or [])):
            self.stats.auth_tally.inc(method, res)
        if not results.dkim:
            self.stats.auth_tally.inc("dkim", "none")
        value = policy.auth_results_value(self.authserv_id, results)
        self._fresh_auth[m.queue_id] = value
        return value

    async def _publish(self, m: MailReceived, key: str, size: int, summary: MessageSummary,
                       plan: policy.Plan, auth_value: str | None,
                       ret: Literal["FULL", "HDRS"] | None, body: bytes | None) -> None:
        now = datetime.now(UTC)
        qid = m.queue_id
        flat_auth = auth_value.replace("\r\n\t", " ") if auth_value else None
        jobs = [self._event(m, "received", now, None, detail=(
            f"from {m.client.ip} via {m.client.listener}"
            + (f" as {m.client.auth_user}" if m.client.auth_user else "")), blob=key, ret=ret)]
        for t in plan.local:
            dl = DeliverLocal(
                queue_id=qid, recipient=t.recipient.address, account_id=t.account.account_id,
                account=t.account.address, mail_from=m.mail_from, received_at=m.received_at,
                blob_key=key, blob_size=size,
                prefix=policy.trace_prefix(m.mail_from, t.account.address),
                summary=summary, auth_results=flat_auth, notify=list(t.recipient.notify),
                dsn_envid=m.dsn_envid, body=body)
            jobs.append(self.publisher.publish(DELIVER_LOCAL, dl,
                                               msg_id=f"{qid}:{t.account.account_id}"))
        for rcpt, accounts in plan.expanded:
            jobs.append(self._event(m, "expanded", now, rcpt, blob=key, ret=ret,
                                    detail="expanded to "
                                    + ", ".join(a.address for a in accounts)))
        if plan.remote:
            out = OutboundQueued(
                queue_id=qid, mail_from=m.mail_from, recipients=plan.remote, blob_key=key,
                size=size, queued_at=now, dsn_envid=m.dsn_envid, dsn_ret=ret,
                smtputf8=m.smtputf8, body_type=m.body_type,
                is_bounce=not m.mail_from)  # null reverse-path: never bounce it (RFC 5321 §4.5.5)
            jobs.append(self.publisher.publish(OUTBOUND_QUEUED, out, msg_id=f"{qid}:out"))
        for f in plan.failed:
            jobs.append(self._event(m, "failed", now, f.recipient, status=f.status,
                                    detail=f.detail, blob=key, ret=ret))
        # all at once; any failure raises and the whole message is retried (msg ids dedupe)
        await asyncio.gather(*jobs)

    def _vouched(self, m: MailReceived) -> bool:
        return policy.may_relay(m.client, self.settings.common.trusted_networks)

    async def _event(self, m: MailReceived, kind: EventKind, at: datetime,
                     rcpt: Recipient | None, *, status: str | None = None, detail: str = "",
                     blob: str | None, ret: Literal["FULL", "HDRS"] | None) -> int:
        ev = DeliveryEvent(
            queue_id=m.queue_id, kind=kind, recipient=rcpt.address if rcpt else None, at=at,
            service=SERVICE, status=status, detail=detail, mail_from=m.mail_from,
            blob_key=blob, notify=list(rcpt.notify) if rcpt else [],
            orcpt=rcpt.orcpt if rcpt else None, dsn_envid=m.dsn_envid, dsn_ret=ret)
        msg_id = f"{m.queue_id}:{kind}" + (f":{rcpt.address.lower()}" if rcpt else "")
        return await self.publisher.publish(
            DELIVERY_EVENT, ev, msg_id=msg_id,
            queue_id=policy.subject_token(m.queue_id), kind=kind)
