"""Wiring: build the worker from settings and the kit's bus and blob store, start the two
consumers. ``__main__.setup`` (what ``postbus.kit.runtime`` calls) and tests call
``start``."""

from __future__ import annotations

import asyncio
import contextlib

from postbus.kit.blob import BlobStore
from postbus.kit.bus import Bus
from postbus.kit.logging import get_logger
from postbus.proto.mail import OUTBOUND_QUEUED
from postbus.relay.adapters import DnsDestinations, SmtpTransport
from postbus.relay.settings import Settings
from postbus.relay.worker import FAILED_EVENTS, RelayWorker

DURABLE = "relay"
DURABLE_FAILED = "relay-bounces"
log = get_logger(__name__)


async def build_worker(settings: Settings, bus: Bus, blobs: BlobStore) -> RelayWorker:
    # finished entries stay a while after the queue lifetime (status, late duplicates)
    queue = await bus.kv_bucket(settings.queue_bucket, ttl_s=settings.max_age_s + 7 * 86400)
    bounces = await bus.kv_bucket(settings.bounce_bucket, ttl_s=30 * 86400)
    dests = DnsDestinations(settings.transports, nameservers=settings.dns_nameservers,
                            port=settings.dns_port, timeout_s=settings.dns_timeout_s,
                            smtp_port=settings.smtp_port, max_hosts=settings.max_mx_hosts,
                            private_literals=settings.common.allow_private_address_literals)
    transport = SmtpTransport(
        ehlo_name=settings.ehlo_name, connect_timeout_s=settings.connect_timeout_s,
        command_timeout_s=settings.command_timeout_s, data_timeout_s=settings.data_timeout_s,
        starttls=settings.starttls, tls_required=settings.tls_required,
        tls_verify=settings.tls_verify, cache_idle_s=settings.connection_cache_s,
        cache_max_uses=settings.connection_reuse_max, pipelining=settings.pipelining,
        destination_concurrency=settings.destination_concurrency)
    return RelayWorker(settings, bus=bus, blobs=blobs, queue=queue, bounces=bounces,
                       destinations=dests, transport=transport)


def start_consumers(settings: Settings, bus: Bus, worker: RelayWorker) -> None:
    bus.consume(OUTBOUND_QUEUED, worker.handle, durable=DURABLE,
                concurrency=settings.concurrency, batch=max(settings.concurrency, 8),
                ack_wait_s=settings.ack_wait_s, max_ack_pending=settings.max_pending)
    if settings.bounce_foreign_failures:
        bus.consume(FAILED_EVENTS, worker.handle_failed_event, durable=DURABLE_FAILED,
                    concurrency=4, batch=16, ack_wait_s=60.0)


async def start(settings: Settings, bus: Bus, blobs: BlobStore) -> RelayWorker:
    worker = await build_worker(settings, bus, blobs)
    start_consumers(settings, bus, worker)
    return worker


async def gauge_loop(worker: RelayWorker, interval: float) -> None:
    while True:
        with contextlib.suppress(Exception):
            await worker.refresh_gauge()
        await asyncio.sleep(interval)
