"""mailbox-store: ``python -m postbus.mailbox_store``. The only place that builds Settings
and wires the database, the repository, the delivery consumer, the store and directory
APIs, blob GC and the management routers."""

from __future__ import annotations

from functools import partial

from postbus.kit.runtime import ServiceContext, main
from postbus.mailbox_store import db, mgmt, retention
from postbus.mailbox_store.blobgc import run_forever
from postbus.mailbox_store.delivery import Deliverer
from postbus.mailbox_store.directory import serve_directory
from postbus.mailbox_store.passwords import Passwords, VerifyCache
from postbus.mailbox_store.repository import Repository
from postbus.mailbox_store.settings import Settings
from postbus.mailbox_store.storeapi import StoreApi

NAME = "mailbox-store"


async def setup(settings: Settings, ctx: ServiceContext) -> None:
    engine = db.create_engine(settings.common.database_url, pool_size=settings.db_pool_size,
                              sqlite_synchronous=settings.sqlite_synchronous)
    ctx.stack.push_async_callback(engine.dispose)
    await db.migrate(engine)
    ctx.checks["database"] = partial(db.check, engine)

    repo = Repository(engine)
    sessions = db.sessionmaker(engine)

    # the directory (domains, accounts, aliases; directory.* RPCs) and its management API
    passwords = Passwords(cache=VerifyCache(settings.auth_cache_ttl_s,
                                            settings.auth_cache_negative_ttl_s,
                                            settings.auth_cache_size))
    directory = await serve_directory(
        ctx.bus, sessions, repo=repo, passwords=passwords,
        subaddress_separator=settings.subaddress_separator,
        resolve_cache_ttl_s=settings.resolve_cache_ttl_s,
        login_max_failures=settings.login_max_failures,
        login_window_s=settings.login_window_s)
    ctx.routers.append(mgmt.router(sessions, ctx.blobs, ctx.bus, repo, directory=directory))

    await StoreApi(ctx.bus, ctx.blobs, repo, settings).serve()
    Deliverer(ctx.bus, ctx.blobs, repo, settings).start()
    ctx.add_task(run_forever(repo, ctx.blobs, settings.blob_gc_grace_s,
                             settings.blob_gc_interval_s, settings.deliveries_keep_s), "blob-gc")
    ctx.add_task(retention.run_forever(repo, ctx.bus, settings.pop3_expire_interval_s),
                 "pop3-retention")


def run() -> None:
    settings = Settings()
    main(NAME, settings.common, settings.mgmt_port, partial(setup, settings))


if __name__ == "__main__":
    run()
