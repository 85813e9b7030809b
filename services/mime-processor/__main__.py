"""mime-processor: ``python -m postbus.mime_processor``. The only place that builds Settings
and wires the worker, its consumer and the management router."""

from __future__ import annotations

from functools import partial

from postbus.kit.runtime import ServiceContext, main
from postbus.mime_processor.mgmt import router
from postbus.mime_processor.service import start
from postbus.mime_processor.settings import Settings

NAME = "mime-processor"


async def setup(settings: Settings, ctx: ServiceContext) -> None:
    running = start(settings, ctx.bus, ctx.blobs)
    ctx.routers.append(router(running.worker.stats, settings))
    ctx.on_stop(running.close)


def run() -> None:
    settings = Settings()
    main(NAME, settings.common, settings.mgmt_port, partial(setup, settings))


if __name__ == "__main__":
    run()
