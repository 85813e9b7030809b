"""relay: ``python -m postbus.relay``. The only place that builds Settings and wires the
worker, its transport, the queue gauge and the management router."""

from __future__ import annotations

from functools import partial

from postbus.kit.runtime import ServiceContext, main
from postbus.relay.adapters import SmtpTransport
from postbus.relay.mgmt import router
from postbus.relay.service import gauge_loop, start
from postbus.relay.settings import Settings

NAME = "relay"


async def setup(settings: Settings, ctx: ServiceContext) -> None:
    worker = await start(settings, ctx.bus, ctx.blobs)
    ctx.routers.append(router(worker))
    if isinstance(worker.transport, SmtpTransport):
        ctx.on_stop(worker.transport.close)
    ctx.add_task(gauge_loop(worker, settings.queue_gauge_interval_s), "relay-queue-gauge")


def run() -> None:
    settings = Settings()
    main(NAME, settings.common, settings.mgmt_port, partial(setup, settings))


if __name__ == "__main__":
    run()
