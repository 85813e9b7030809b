"""pop3-access: ``python -m postbus.pop3_access``. The only place that builds Settings and
wires the ports (directory, maildrops, locks, throttle), the listeners and the management
router."""

from __future__ import annotations

import uuid
from functools import partial

from postbus.kit.blob import StoreBodies
from postbus.kit.directory import DirectoryClient
from postbus.kit.runtime import ServiceContext, main
from postbus.kit.tls import server_context
from postbus.pop3_access import adapters, mgmt
from postbus.pop3_access.server import Pop3Server
from postbus.pop3_access.session import Limits, PreparedBodies
from postbus.pop3_access.settings import Settings

NAME = "pop3-access"


async def setup(settings: Settings, ctx: ServiceContext) -> None:
    replica = uuid.uuid4().hex[:8]
    locks_bucket = await ctx.bus.kv_bucket(settings.lock_bucket, ttl_s=settings.lock_ttl_s)
    auth_bucket = await ctx.bus.kv_bucket(settings.auth_bucket,
                                          ttl_s=settings.auth_failure_window_s)
    delay_bucket = (await ctx.bus.kv_bucket(settings.login_delay_bucket,
                                            ttl_s=float(settings.login_delay_s))
                    if settings.login_delay_s > 0 else None)
    locks = adapters.KvLocks(locks_bucket, ttl_s=settings.lock_ttl_s, replica=replica)
    ctx.blobs.inline = StoreBodies(ctx.bus)  # small bodies are in the store (ADR 0014)
    server = Pop3Server(
        directory=DirectoryClient(ctx.bus, "pop3", errors=adapters.unavailable),
        maildrops=adapters.StoreMaildrops(ctx.bus, ctx.blobs, timeout_s=settings.store_timeout_s),
        locks=locks,
        throttle=adapters.KvThrottle(auth_bucket, delay_bucket),
        limits=Limits(
            login_delay_s=settings.login_delay_s,
            auth_failure_delay_s=settings.auth_failure_delay_s,
            auth_failure_delay_max_s=settings.auth_failure_delay_max_s,
            max_auth_failures_ip=settings.max_auth_failures_ip,
            max_auth_failures_account=settings.max_auth_failures_account,
            max_auth_failures_session=settings.max_auth_failures_session,
            max_bad_commands=settings.max_bad_commands,
            max_commands=settings.max_commands,
            prefetch=settings.prefetch),
        ssl_context=server_context(ctx.common.tls_cert, ctx.common.tls_key),
        hostname=ctx.common.hostname,
        idle_timeout_s=settings.idle_timeout_s,
        session_timeout_s=settings.session_timeout_s,
        insecure_auth=settings.allow_insecure_auth,
        max_connections_per_ip=settings.max_connections_per_ip,
        loopback_is_secure=settings.loopback_is_secure,
        proxy_protocol=settings.proxy_protocol,
        proxy_protocol_timeout_s=settings.proxy_protocol_timeout_s,
        replica=replica,
        prepared=PreparedBodies(settings.prepared_cache_mb << 20),
    )
    host = settings.listen_host or ctx.common.bind_host
    await server.listen(host, settings.pop3_port)
    if server.ssl_context is not None:
        await server.listen(host, settings.pop3s_port, implicit_tls=True)
    ctx.on_stop(server.close)

    async def locks_ready() -> None:
        await locks_bucket.get("ready-check")

    ctx.checks["locks"] = locks_ready
    ctx.routers.append(mgmt.router(server, locks.holders))


def run() -> None:
    settings = Settings()
    main(NAME, settings.common, settings.mgmt_port, partial(setup, settings))


if __name__ == "__main__":
    run()
