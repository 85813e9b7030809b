"""``python -m postbus.smtp_ingress``: build settings and adapters, start the listeners."""

from __future__ import annotations

from postbus.kit.counters import KvCounters
from postbus.kit.directory import DirectoryClient
from postbus.kit.runtime import ServiceContext, main
from postbus.kit.tls import server_context
from postbus.smtp_ingress.settings import Settings


async def setup_ingress(ctx: ServiceContext, settings: Settings) -> object:
    """Wire adapters and listeners into a running service context; returns the Ingress."""
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

    blocklist = KvBlockList(ctx.bus)
    await blocklist.refresh()
    share = (KvLoadShare(ctx.bus, interval_s=settings.limits_share_interval_s)
             if settings.limits_share_interval_s > 0 else None)
    ingress = Ingress(
        settings,
        directory=DirectoryClient(ctx.bus, "smtp", resolve_ttl_s=settings.resolve_cache_ttl_s,
                                  resolve_cache_size=settings.resolve_cache_size,
                                  errors=unavailable),
        queue=BusQueue(ctx.bus, timeout_s=settings.publish_timeout_s),
        bodies=S3Bodies(ctx.blobs),
        auth_failures=await KvCounters.open(ctx.bus, AUTHFAIL_BUCKET,
                                            settings.auth_fail_window_s, errors=unavailable),
        blocklist=blocklist,
        tls_context=server_context(ctx.common.tls_cert, ctx.common.tls_key),
        load_share=share,
        backlog=StreamBacklog(ctx.bus),
    )
    await ingress.start()

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
    return ingress


def run() -> None:
    settings = Settings()

    async def setup(ctx: ServiceContext) -> None:
        await setup_ingress(ctx, settings)

    main("smtp-ingress", settings.common, settings.mgmt_port, setup)


if __name__ == "__main__":
    run()
