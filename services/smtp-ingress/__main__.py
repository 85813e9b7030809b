"""smtp-ingress: ``python -m postbus.smtp_ingress``. The only place that builds Settings and
wires the ports (directory, queue, bodies, counters, block list, load share), the
listeners and the management router."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from functools import partial

from postbus.kit.blob import BlobStore
from postbus.kit.bus import Bus
from postbus.kit.counters import KvCounters
from postbus.kit.directory import DirectoryClient
from postbus.kit.runtime import ServiceContext, main
from postbus.kit.tls import server_context
from postbus.smtp_ingress import mgmt
from postbus.smtp_ingress.adapters import (
    AUTHFAIL_BUCKET,
    BusQueue,
    KvBlockList,
    KvLoadShare,
    S3Bodies,
    StreamBacklog,
    unavailable,
)
from postbus.smtp_ingress.server import Ingress
from postbus.smtp_ingress.settings import Settings

NAME = "smtp-ingress"


@dataclass
class Wired:
    ingress: Ingress
    blocklist: KvBlockList
    share: KvLoadShare | None


async def wire(settings: Settings, bus: Bus, blobs: BlobStore, tls: ssl.SSLContext | None, *,
               blocklist_refresh_s: float = 2.0) -> Wired:
    """The Ingress on its adapters, listening (``setup`` and smtp_ingress.testing)."""
    blocklist = KvBlockList(bus, refresh_s=blocklist_refresh_s)
    await blocklist.refresh()
    share = (KvLoadShare(bus, interval_s=settings.limits_share_interval_s)
             if settings.limits_share_interval_s > 0 else None)
    ingress = Ingress(
        settings,
        directory=DirectoryClient(bus, "smtp", resolve_ttl_s=settings.resolve_cache_ttl_s,
                                  resolve_cache_size=settings.resolve_cache_size,
                                  errors=unavailable),
        queue=BusQueue(bus, timeout_s=settings.publish_timeout_s),
        bodies=S3Bodies(blobs),
        auth_failures=await KvCounters.open(bus, AUTHFAIL_BUCKET, settings.auth_fail_window_s,
                                            errors=unavailable),
        blocklist=blocklist,
        tls_context=tls,
        load_share=share,
        backlog=StreamBacklog(bus),
    )
    await ingress.start()
    return Wired(ingress, blocklist, share)


async def setup(settings: Settings, ctx: ServiceContext) -> None:
    w = await wire(settings, ctx.bus, ctx.blobs,
                   server_context(ctx.common.tls_cert, ctx.common.tls_key))
    ingress, blocklist, share = w.ingress, w.blocklist, w.share

    async def listening() -> None:
        if not ingress.servers or not all(s.is_serving() for s in ingress.servers):
            raise RuntimeError("SMTP listeners not serving")

    ctx.checks["smtp"] = listening
    ctx.add_task(blocklist.run(), "smtp-blocklist-refresh")
    if share is not None:
        ctx.add_task(share.run(ingress.load_snapshot), "smtp-limits-share")
        ctx.on_stop(share.withdraw)
    ctx.routers.append(mgmt.router(ingress))
    ctx.on_stop(ingress.stop)


def run() -> None:
    settings = Settings()
    main(NAME, settings.common, settings.mgmt_port, partial(setup, settings))


if __name__ == "__main__":
    run()
