"""Service runtime: open NATS, S3 and the service's own resources on one AsyncExitStack,
serve the management app with uvicorn in the same loop, own SIGTERM/SIGINT.

On a signal: run the stop callbacks (stop listening, hand back in-flight work), drain
NATS, close everything, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import APIRouter

from postbus.kit import logging as klog
from postbus.kit.blob import BlobStore
from postbus.kit.bus import Bus
from postbus.kit.mgmt import Check, create_app
from postbus.kit.natsauth import GRANTS
from postbus.kit.settings import CommonSettings
from postbus.proto import ALL_STREAMS

log = klog.get_logger(__name__)


@dataclass
class ServiceContext:
    name: str
    common: CommonSettings
    stack: AsyncExitStack
    bus: Bus
    blobs: BlobStore
    checks: dict[str, Check] = field(default_factory=dict)
    routers: list[APIRouter] = field(default_factory=list)
    stop_callbacks: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    def on_stop(self, cb: Callable[[], Awaitable[None]]) -> None:
        """Called first on shutdown, in reverse order of registration."""
        self.stop_callbacks.append(cb)

    def add_task(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        self.tasks.append(asyncio.create_task(coro, name=name))


Setup = Callable[[ServiceContext], Awaitable[None]]


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # the runtime owns signals
        yield


async def _retry(what: str, fn: Callable[[], Awaitable[Any]], deadline_s: float) -> Any:
    """Retry start-up dependencies (NATS, S3 not up yet) with backoff, as in Kubernetes."""
    delay, start = 0.2, time.monotonic()
    while True:
        try:
            return await fn()
        except Exception as exc:
            if time.monotonic() - start > deadline_s:
                raise
            log.warning(f"{what} not available yet; retrying", error=str(exc)[:200])
            await asyncio.sleep(delay)
            delay = min(delay * 2, 3.0)


async def run_service(name: str, common: CommonSettings, mgmt_port: int, setup: Setup) -> int:
    """Run until a signal (exit code 0) or until a task dies (exit code 1)."""
    failed = False
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async with AsyncExitStack() as stack:
        bus = await _retry("NATS", lambda: Bus.connect(common, name), 60)
        stack.push_async_callback(bus.close)
        # the streams this service uses (its NATS user may manage no other)
        streams = [st for st in ALL_STREAMS if name not in GRANTS or st.name in GRANTS[name].streams]
        await _retry("JetStream", lambda: bus.ensure_streams(streams), 60)
        blobs = BlobStore(common)
        stack.push_async_callback(blobs.close)
        await _retry("S3", blobs.ensure_bucket, 60)

        ctx = ServiceContext(name, common, stack, bus, blobs,
                             checks={"nats": bus.check, "s3": blobs.check})
        await setup(ctx)

        app = create_app(name, checks=ctx.checks, routers=ctx.routers, docs=common.api_docs,
                         token_source=common.resolved_admin_token)
        server = _Server(uvicorn.Config(app, host=common.bind_host, port=mgmt_port,
                                        log_config=None, access_log=False, lifespan="off"))
        mgmt_task = asyncio.create_task(server.serve(), name="mgmt")
        log.info("service started", mgmt=f"http://{common.bind_host}:{mgmt_port}")

        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait([stopped, mgmt_task, *ctx.tasks], return_when=asyncio.FIRST_COMPLETED)
        for t in [mgmt_task, *ctx.tasks]:
            if t.done() and not t.cancelled() and t.exception():
                log.error("task died; shutting down", task=t.get_name(), error=repr(t.exception()))
                failed = True
        log.info("stopping")
        for cb in reversed(ctx.stop_callbacks):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(cb(), 10)
        server.should_exit = True
        for t in ctx.tasks:
            t.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(mgmt_task, *ctx.tasks, return_exceptions=True), 5)
    log.info("stopped")
    return 1 if failed else 0


def main(name: str, common: CommonSettings, mgmt_port: int, setup: Setup) -> None:
    """Entry point for ``python -m postbus.<service>``."""
    klog.configure(common.log_level, common.log_format, service=name)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    raise SystemExit(asyncio.run(run_service(name, common, mgmt_port, setup)))
