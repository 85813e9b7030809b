"""imap-access: ``python -m postbus.imap_access``. The only place that builds Settings and
wires the ports, the listeners and the management router."""

from __future__ import annotations

from functools import partial

from postbus.imap_access.adapters import BusChanges, BusStore, S3Blobs, store_error
from postbus.imap_access.mgmt import router
from postbus.imap_access.server import ImapServer
from postbus.imap_access.settings import Settings
from postbus.imap_access.sqlreads import SqlReadStore
from postbus.kit.blob import StoreBodies
from postbus.kit.directory import DirectoryClient
from postbus.kit.logging import get_logger
from postbus.kit.runtime import ServiceContext, main
from postbus.kit.tls import server_context
from postbus.mailbox_store import db

NAME = "imap-access"

log = get_logger("postbus.imap_access")  # __name__ is "__main__" under ``python -m``


async def setup(settings: Settings, ctx: ServiceContext) -> None:
    ctx.blobs.inline = StoreBodies(ctx.bus)  # small bodies are in the store (ADR 0014)
    blobs = S3Blobs(ctx.blobs)
    store = BusStore(ctx.bus)
    if settings.sql_reads:  # reads from SQL, writes to the store (ADR 0012)
        engine = db.create_engine(ctx.common.database_url, pool_size=settings.sql_pool_size,
                                  read_only=True)
        ctx.stack.push_async_callback(engine.dispose)
        store = SqlReadStore(ctx.bus, engine)
    server = ImapServer(settings, DirectoryClient(ctx.bus, "imap", errors=store_error),
                        store, blobs, BusChanges(ctx.bus),
                        tls=server_context(ctx.common.tls_cert, ctx.common.tls_key))
    ports = await server.start(ctx.common.bind_host, settings.imap_port, settings.imaps_port)
    log.info("imap listening", ports=ports, tls=server.tls is not None)
    ctx.on_stop(server.stop)
    ctx.checks["imap"] = server.check
    ctx.routers.append(router(server, lambda: blobs.hit_rate))


def run() -> None:
    settings = Settings()
    main(NAME, settings.common, settings.mgmt_port, partial(setup, settings))


if __name__ == "__main__":
    run()
