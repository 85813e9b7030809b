"""Wiring: build the worker from settings and the kit's bus and blob store, start the
consumer. ``__main__.setup`` (what ``postbus.kit.runtime`` calls) and tests call
``start``."""

from __future__ import annotations

from dataclasses import dataclass

from postbus.kit.blob import BlobStore
from postbus.kit.bus import Bus
from postbus.kit.directory import DirectoryClient
from postbus.mime_processor.adapters import KvMemo
from postbus.mime_processor.authcheck import DnsAuthenticator
from postbus.mime_processor.settings import Settings
from postbus.mime_processor.worker import MimeWorker
from postbus.proto.mail import MAIL_RECEIVED

DURABLE = "mime-processor"


@dataclass
class Running:
    worker: MimeWorker
    authenticator: DnsAuthenticator | None

    async def close(self) -> None:
        if self.authenticator is not None:
            await self.authenticator.close()


def build_worker(settings: Settings, bus: Bus, blobs: BlobStore) -> Running:
    auth = None
    if settings.auth_checks:
        auth = DnsAuthenticator(settings.dns_nameservers, settings.dns_timeout_s,
                                settings.auth_budget_s, settings.auth_threads,
                                settings.dns_port)
    worker = MimeWorker(settings, directory=DirectoryClient(bus, timeout_s=5.0), blobs=blobs, publisher=bus,
                        authenticator=auth, memo=KvMemo(bus) if auth else None)
    return Running(worker, auth)


def start(settings: Settings, bus: Bus, blobs: BlobStore) -> Running:
    """Build the worker and run the durable pull consumer on mail.inbound.received."""
    running = build_worker(settings, bus, blobs)
    bus.consume(MAIL_RECEIVED, running.worker.handle, durable=DURABLE,
                concurrency=settings.concurrency, batch=max(settings.concurrency, 8),
                ack_wait_s=settings.ack_wait_s)
    return running
