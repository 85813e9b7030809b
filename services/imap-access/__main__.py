"""imap-access: `python -m postbus.imap_access`. Builds settings and adapters, starts the
listeners and the management API."""

from __future__ import annotations

from postbus.imap_access.adapters import BusChanges, BusStore, S3Blobs, store_error
from postbus.imap_access.mgmt import router
from postbus.imap_access.server import ImapServer
from postbus.imap_access.settings import Settings
from postbus.kit.blob import StoreBodies
from postbus.kit.directory import DirectoryClient
from postbus.kit.logging import get_logger
from postbus.kit.runtime import ServiceContext, main
from postbus.kit.tls import server_context

log = get_logger("postbus.imap")


def run() -> None:
    settings = Settings()

    async def setup(ctx: ServiceContext) -> None:
        ctx.blobs.inline = StoreBodies(ctx.bus)  # small bodies are in the store (ADR 0014)
        blobs = S3Blobs(ctx.blobs)
        server = ImapServer(settings, DirectoryClient(ctx.bus, "imap", errors=store_error),
                            BusStore(ctx.bus), blobs, BusChanges(ctx.bus),
                            tls=server_context(ctx.common.tls_cert, ctx.common.tls_key))
        ports = await server.start(ctx.common.bind_host, settings.imap_port,
                                   settings.imaps_port)
        log.info("imap listening", ports=ports, tls=server.tls is not None)
        ctx.on_stop(server.stop)
        ctx.checks["imap"] = server.check
        ctx.routers.append(router(server, lambda: blobs.hit_rate))

    main("imap-access", settings.common, settings.mgmt_port, setup)


if __name__ == "__main__":
    run()
