"""The NATS bus: typed publish/consume on JetStream, request/reply, KV buckets.

The only module that imports nats. Payloads are the pydantic models from ``postbus.proto``,
JSON on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.kv import KeyValue
from pydantic import BaseModel, ValidationError

from postbus.kit.logging import get_logger
from postbus.kit.metrics import counter, histogram
from postbus.kit.settings import CommonSettings
from postbus.proto.base import ErrorCode, Rpc, RpcError, Stream, Subject

M = TypeVar("M", bound=BaseModel)
Req = TypeVar("Req", bound=BaseModel)
Rep = TypeVar("Rep", bound=BaseModel)

log = get_logger(__name__)

ERROR_HEADER = "Postbus-Error"
# a busy consumer's fetch waits at most this long for more than what is waiting already
BUSY_WAIT_S = 0.005

BUS_HANDLED = counter("postbus_bus_messages_total", "Work-queue messages handled",
                      ["subject", "outcome"])
RPC_HANDLED = counter("postbus_rpc_requests_total", "Requests served", ["subject", "outcome"])
RPC_LATENCY = histogram("postbus_rpc_seconds", "Time to serve one request", ["subject"])


# ---------------------------------------------------------------- outcomes of a work item
@dataclass(frozen=True)
class Ack:
    """The effect is durable; remove the message from the work queue."""


@dataclass(frozen=True)
class Retry:
    """Try again later (nak with a delay)."""

    delay_s: float = 5.0
    reason: str = ""


@dataclass(frozen=True)
class Reject:
    """Never retry (term); the handler has already reported why (e.g. a delivery event)."""

    reason: str = ""


Outcome = Ack | Retry | Reject


class BusUnavailable(Exception):
    """NATS or JetStream did not acknowledge in time; nothing is known to be queued."""


class RemoteError(Exception):
    """A responder answered with an ``RpcError``."""

    def __init__(self, code: ErrorCode, message: str = "") -> None:
        super().__init__(f"{code}: {message}")
        self.code: ErrorCode = code
        self.message = message


ErrorMap = Callable[[BusUnavailable | RemoteError], Exception]
"""What a service makes of a bus error: its own port's exception type (the kit's clients
raise the bus's errors as they are when given none)."""


@contextlib.contextmanager
def raising(errors: ErrorMap | None) -> Iterator[None]:
    """Let BusUnavailable and RemoteError through, or raise ``errors(exc)`` from them."""
    try:
        yield
    except (BusUnavailable, RemoteError) as exc:
        if errors is None:
            raise
        raise errors(exc) from exc


def encode(model: BaseModel) -> bytes:
    return model.model_dump_json(by_alias=True).encode()


@dataclass
class Delivery(Generic[M]):
    """One work-queue message, decoded, with how often it has been delivered."""

    data: M
    num_delivered: int
    msg: Msg

    async def in_progress(self) -> None:
        """Extend the ack deadline during long work."""
        await self.msg.in_progress()


class Bus:
    def __init__(self, nc: NATS, settings: CommonSettings) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream(timeout=10)
        self.settings = settings
        self._tasks: list[asyncio.Task[None]] = []
        self._subs: list[Any] = []
        self._closing = asyncio.Event()
        self._inflight: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------ lifecycle
    @classmethod
    async def connect(cls, settings: CommonSettings, name: str) -> Bus:
        async def on_error(exc: Exception) -> None:
            log.warning("nats error", error=str(exc))

        async def on_disconnect() -> None:
            log.warning("nats disconnected")

        async def on_reconnect() -> None:
            log.info("nats reconnected")

        from postbus.kit.natsauth import inbox_prefix

        tls = None
        if settings.nats_tls_ca is not None:
            import ssl

            tls = ssl.create_default_context(cafile=str(settings.nats_tls_ca))
        nc = await nats.connect(
            servers=[u.strip() for u in settings.nats_url.split(",")],
            tls=tls,
            name=name,
            # replies to this client only: its NATS user may read no other inbox
            inbox_prefix=inbox_prefix(name),
            user=settings.nats_user,
            password=settings.nats_password,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            connect_timeout=5,
            error_cb=on_error,
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
        )
        return cls(nc, settings)

    async def close(self) -> None:
        """Stop consumers and responders, finish in-flight handlers briefly, flush, close.

        Not ``drain()``: it waits on every subscription's queue (request inboxes, KV
        watchers) and can hang; our handlers are already stopped, so flush + close suffices.
        """
        self._closing.set()
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._inflight:
            await asyncio.wait(list(self._inflight), timeout=5)
        with contextlib.suppress(Exception):
            await self.nc.flush(timeout=2)
        if not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await self.nc.close()

    async def check(self) -> None:
        """Readiness: the connection is up and JetStream answers."""
        if not self.nc.is_connected:
            raise BusUnavailable("not connected to NATS")
        await self.js.account_info()

    # ------------------------------------------------------------ streams
    async def stream_messages(self, name: str) -> int:
        """How many messages a stream holds now (for a work queue: not yet acknowledged)."""
        try:
            info = await self.js.stream_info(name)
        except (nats.errors.Error, OSError) as exc:
            raise BusUnavailable(f"stream info {name}: {exc}") from exc
        return int(info.state.messages)

    async def ensure_streams(self, streams: list[Stream]) -> None:
        """Create or update each stream (idempotent, safe from many replicas at once)."""
        for s in streams:
            cfg = StreamConfig(
                name=s.name,
                subjects=list(s.subjects),
                retention=RetentionPolicy(s.retention),
                storage=StorageType.FILE,
                num_replicas=self.settings.stream_replicas,
                max_age=s.max_age_s or None,
                max_msgs_per_subject=s.max_msgs_per_subject,
                duplicate_window=s.duplicate_window_s,
                description=s.description or None,
            )
            try:
                await self.js.add_stream(cfg)
            except nats.js.errors.BadRequestError:
                await self.js.update_stream(cfg)

    # ------------------------------------------------------------ JetStream publish
    async def publish(self, subject: Subject[M], data: M, *, msg_id: str | None = None,
                      timeout: float = 5.0, **parts: str) -> int:
        """Publish to JetStream and wait for the ack; returns the stream sequence.

        ``msg_id`` deduplicates a retried publish within the stream's duplicate window.
        Raises BusUnavailable when no ack arrives.
        """
        name = subject.format(**parts) if parts else subject.name
        headers = {"Nats-Msg-Id": msg_id} if msg_id else None
        try:
            ack = await self.js.publish(name, encode(data), timeout=timeout, headers=headers)
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            raise BusUnavailable(str(exc) or type(exc).__name__) from exc
        return int(ack.seq)

    async def publish_core(self, subject: Subject[M], data: M, **parts: str) -> None:
        """Fire-and-forget on core NATS (e.g. mailbox.changed)."""
        name = subject.format(**parts) if parts else subject.name
        with contextlib.suppress(nats.errors.Error):
            await self.nc.publish(name, encode(data))

    # ------------------------------------------------------------ work queues
    def consume(
        self,
        subject: Subject[M],
        handler: Callable[[Delivery[M]], Awaitable[Outcome]],
        *,
        durable: str,
        concurrency: int = 8,
        batch: int = 32,
        ack_wait_s: float = 60.0,
        max_deliver: int = -1,
        max_ack_pending: int | None = None,
    ) -> None:
        """Run a durable pull consumer; each message's handler returns an Outcome.

        An exception in the handler is logged and the message retried (never acked).
        ``max_ack_pending`` (default ``max(concurrency * 4, batch)``) bounds the messages
        delivered but not yet acked, including those waiting out a ``Retry`` delay: a queue
        that holds deferred work for hours (the relay) needs it large.
        """
        assert subject.stream is not None, f"{subject.name} is not on a stream"
        stream = subject.stream.name

        async def run() -> None:
            sem = asyncio.Semaphore(concurrency)
            cfg = ConsumerConfig(
                durable_name=durable,
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                ack_wait=ack_wait_s,
                max_deliver=max_deliver,
                max_ack_pending=max_ack_pending or max(concurrency * 4, batch),
                filter_subject=subject.pattern,
            )
            psub = None
            # nats-py's fetch(n) returns at once what is waiting, but when nothing is, its
            # lingering pull waits until n messages came or the timeout ran out: at 300
            # messages a second each one sat up to a second, and the unacked backlog made
            # smtp-ingress slow its clients (in_flow_delay). So: idle, wait for one message;
            # busy, take what is there and wait at most BUSY_WAIT_S for more.
            busy = False
            while not self._closing.is_set():
                try:
                    if psub is None:
                        psub = await self.js.pull_subscribe(
                            subject.pattern, durable=durable, stream=stream, config=cfg)
                    msgs = await (psub.fetch(batch, timeout=BUSY_WAIT_S) if busy
                                  else psub.fetch(1, timeout=1.0))
                    busy = True
                except (TimeoutError, nats.errors.TimeoutError):
                    busy = False
                    continue
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # reconnecting, stream missing briefly...
                    log.warning("consumer fetch failed", subject=subject.name, error=str(exc))
                    psub = None
                    await asyncio.sleep(1.0)
                    continue
                for m in msgs:
                    # the semaphore bounds concurrency; fetching goes on while a batch runs
                    await sem.acquire()
                    t = asyncio.create_task(self._handle(subject, m, handler, sem))
                    self._inflight.add(t)
                    t.add_done_callback(self._inflight.discard)

        self._tasks.append(asyncio.create_task(run(), name=f"consume:{subject.name}"))

    async def _handle(self, subject: Subject[M], m: Msg,
                      handler: Callable[[Delivery[M]], Awaitable[Outcome]],
                      sem: asyncio.Semaphore) -> None:
        try:
            try:
                data = subject.model.model_validate_json(m.data)
            except ValidationError as exc:
                log.error("undecodable message rejected", subject=m.subject, error=str(exc))
                BUS_HANDLED.labels(subject.name, "invalid").inc()
                await m.term()
                return
            try:
                outcome = await handler(Delivery(data, m.metadata.num_delivered, m))
            except Exception:
                log.exception("handler failed; will retry", subject=m.subject)
                outcome = Retry(5.0, "exception")
            match outcome:
                case Ack():
                    # fire-and-forget, not ack_sync: a lost ack means a redelivery, which
                    # every handler absorbs (idempotency keys), and waiting for the
                    # server's confirmation held a concurrency slot for a round trip
                    await m.ack()
                    BUS_HANDLED.labels(subject.name, "ack").inc()
                case Retry(delay_s=delay):
                    await m.nak(delay=delay)
                    BUS_HANDLED.labels(subject.name, "retry").inc()
                case Reject(reason=reason):
                    log.warning("message rejected", subject=m.subject, reason=reason)
                    await m.term()
                    BUS_HANDLED.labels(subject.name, "reject").inc()
        except Exception:
            log.exception("ack failed", subject=m.subject)
        finally:
            sem.release()

    async def read_stream(self, subject: Subject[M], *, limit: int = 1000,
                          **parts: str) -> list[tuple[int, M]]:
        """The messages stored on a stream under ``subject`` (``parts`` fill placeholders,
        missing ones are wildcards), oldest first, with their stream sequences; for
        management listings, not hot paths. Undecodable messages are skipped."""
        assert subject.stream is not None, f"{subject.name} is not on a stream"
        import re

        filt = re.sub(r"\{([^}]+)\}", lambda m: parts.get(m.group(1), "*"), subject.name)
        out: list[tuple[int, M]] = []
        seq = 1
        while len(out) < limit:
            try:
                raw = await self.js.get_msg(subject.stream.name, seq, subject=filt, next=True)
            except nats.js.errors.NotFoundError:
                break
            except (TimeoutError, nats.errors.Error) as exc:
                raise BusUnavailable(f"read {filt}: {exc or type(exc).__name__}") from exc
            if raw.seq is None:
                break
            seq = int(raw.seq) + 1
            try:
                out.append((int(raw.seq), subject.model.model_validate_json(raw.data or b"")))
            except ValidationError:
                log.warning("undecodable stream message skipped", subject=filt, seq=raw.seq)
        return out

    # ------------------------------------------------------------ request / reply
    async def request(self, rpc: Rpc[Req, Rep], data: Req, *, timeout: float | None = None) -> Rep:
        """Send a request; returns the reply model or raises RemoteError/BusUnavailable."""
        try:
            msg = await self.nc.request(rpc.name, encode(data), timeout=timeout or rpc.timeout_s)
        except nats.errors.NoRespondersError as exc:
            raise BusUnavailable(f"no responders for {rpc.name}") from exc
        except (TimeoutError, nats.errors.Error) as exc:
            raise BusUnavailable(f"{rpc.name}: {exc or type(exc).__name__}") from exc
        if msg.headers and msg.headers.get(ERROR_HEADER):
            err = RpcError.model_validate_json(msg.data)
            raise RemoteError(err.code, err.message)
        return rpc.reply.model_validate_json(msg.data)

    async def serve(self, rpc: Rpc[Req, Rep], handler: Callable[[Req], Awaitable[Rep]],
                    *, queue: str) -> None:
        """Answer requests in a queue group; RemoteError raised by the handler is sent back
        as an RpcError, any other exception as ``internal`` (and logged), a reply larger
        than the server's max_payload as ``too_large`` (and logged)."""

        async def on_msg(msg: Msg) -> None:
            started = time.perf_counter()
            try:
                req = rpc.request.model_validate_json(msg.data)
                reply: BaseModel = await handler(req)
                headers = None
                outcome = "ok"
            except ValidationError as exc:
                reply, headers, outcome = RpcError(code="invalid", message=str(exc)), {ERROR_HEADER: "1"}, "invalid"
            except RemoteError as exc:
                reply, headers, outcome = RpcError(code=exc.code, message=exc.message), {ERROR_HEADER: "1"}, exc.code
            except Exception as exc:
                log.exception("request handler failed", subject=rpc.name)
                reply, headers, outcome = RpcError(code="internal", message=type(exc).__name__), {ERROR_HEADER: "1"}, "internal"
            data = encode(reply)
            if len(data) > self.nc.max_payload:
                # NATS would refuse it and the caller would only see a timeout
                log.error("reply exceeds the NATS max_payload", subject=rpc.name,
                          size=len(data), max_payload=self.nc.max_payload)
                data, headers, outcome = encode(RpcError(
                    code="too_large", message=f"reply of {len(data)} bytes exceeds the NATS "
                    f"max_payload of {self.nc.max_payload}")), {ERROR_HEADER: "1"}, "too_large"
            RPC_HANDLED.labels(rpc.name, outcome).inc()
            RPC_LATENCY.labels(rpc.name).observe(time.perf_counter() - started)
            if msg.reply:
                with contextlib.suppress(nats.errors.Error):
                    await self.nc.publish(msg.reply, data, headers=headers)

        # each request runs in its own task so one slow request does not block the rest
        async def spawn(msg: Msg) -> None:
            t = asyncio.create_task(on_msg(msg))
            self._inflight.add(t)
            t.add_done_callback(self._inflight.discard)

        self._subs.append(await self.nc.subscribe(rpc.name, queue=queue, cb=spawn))

    async def subscribe_core(self, subject: Subject[M], handler: Callable[[M], Awaitable[None]],
                             **parts: str) -> Any:
        """Subscribe (no queue group) to a core subject; returns the subscription."""
        name = subject.format(**parts) if parts else subject.pattern

        async def on_msg(msg: Msg) -> None:
            try:
                await handler(subject.model.model_validate_json(msg.data))
            except Exception:
                log.exception("core subscriber failed", subject=msg.subject)

        sub = await self.nc.subscribe(name, cb=on_msg)
        return sub

    # ------------------------------------------------------------ KV
    async def kv(self, bucket: str, *, ttl_s: float | None = None, history: int = 1) -> KeyValue:
        """Open (creating if needed) a JetStream key-value bucket."""
        try:
            return await self.js.key_value(bucket)
        except nats.js.errors.BucketNotFoundError:
            from nats.js.api import KeyValueConfig

            return await self.js.create_key_value(KeyValueConfig(
                bucket=bucket, ttl=ttl_s, history=history,
                replicas=self.settings.stream_replicas))

    async def kv_bucket(self, bucket: str, *, ttl_s: float | None = None,
                        history: int = 1) -> KvBucket:
        """A KV bucket behind a small nats-free API (create-if-absent, compare-and-set)."""
        return KvBucket(await self.kv(bucket, ttl_s=ttl_s, history=history))


@dataclass(frozen=True)
class KvEntry:
    key: str
    value: bytes
    revision: int


class KvBucket:
    """Compare-and-set operations on one KV bucket, for locks and counters across replicas.

    Every method answers None/False for "someone else got there first" and raises
    BusUnavailable when NATS does not answer.
    """

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def create(self, key: str, value: bytes) -> int | None:
        """Write ``key`` only if it is absent (or deleted/expired); its revision, else None."""
        try:
            return int(await self.kv.create(key, value))
        except nats.js.errors.KeyWrongLastSequenceError:
            return None
        except (TimeoutError, nats.errors.Error) as exc:
            raise BusUnavailable(f"kv create {key}: {exc or type(exc).__name__}") from exc

    async def update(self, key: str, value: bytes, last: int) -> int | None:
        """Write ``key`` only if its revision is still ``last``; the new revision, else None."""
        try:
            return int(await self.kv.update(key, value, last=last))
        except nats.js.errors.KeyWrongLastSequenceError:
            return None
        except (TimeoutError, nats.errors.Error) as exc:
            raise BusUnavailable(f"kv update {key}: {exc or type(exc).__name__}") from exc

    async def get(self, key: str) -> KvEntry | None:
        try:
            e = await self.kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        except (TimeoutError, nats.errors.Error) as exc:
            raise BusUnavailable(f"kv get {key}: {exc or type(exc).__name__}") from exc
        if e.value is None:
            return None
        return KvEntry(key, bytes(e.value), int(e.revision or 0))

    async def delete(self, key: str, last: int | None = None) -> bool:
        """Delete ``key`` (only at revision ``last`` when given); False when it had moved on."""
        try:
            await self.kv.delete(key, last=last)
            return True
        except nats.js.errors.KeyWrongLastSequenceError:
            return False
        except nats.js.errors.APIError as exc:
            if exc.err_code in (10071, 10164):  # wrong last sequence
                return False
            raise BusUnavailable(f"kv delete {key}: {exc}") from exc
        except (TimeoutError, nats.errors.Error) as exc:
            raise BusUnavailable(f"kv delete {key}: {exc or type(exc).__name__}") from exc

    async def incr_below(self, key: str, limit: int, attempts: int = 20) -> int | None:
        """Add one to the counter at ``key`` unless it holds ``limit`` or more already: the
        new count, or None at the limit. Compare-and-set, so callers racing each other
        never both take the last unit (a read-then-write would let them)."""
        for _ in range(attempts):
            e = await self.get(key)
            try:
                n = int(e.value) if e is not None else 0
            except ValueError:
                n = 0
            if n >= limit:
                return None
            rev = (await self.create(key, b"1") if e is None
                   else await self.update(key, str(n + 1).encode(), e.revision))
            if rev is not None:
                return n + 1
        raise BusUnavailable(f"kv {key}: too much contention")

    async def entries(self) -> list[KvEntry]:
        """Every live key with its value (for management listings; not for hot paths)."""
        try:
            keys = await self.kv.keys()
        except nats.js.errors.NoKeysError:
            return []
        except (TimeoutError, nats.errors.Error) as exc:
            raise BusUnavailable(f"kv keys: {exc or type(exc).__name__}") from exc
        out: list[KvEntry] = []
        for k in keys:
            e = await self.get(k)
            if e is not None:
                out.append(e)
        return out
