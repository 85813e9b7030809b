"""mailbox-store as its own process (migrations, wiring, token check) administered with the
`postbus` CLI, and its directory answering over NATS."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

import typer
from typer.testing import CliRunner, Result

from postbus.cli import admin
from postbus.kit.bus import Bus
from postbus.kit.testing import ADMIN_TOKEN, RunningNats, RunningS3, start_platform
from postbus.kit.topology import BY_NAME
from postbus.mailbox_store.importexport import read_mbox
from postbus.proto.directory import (
    DIRECTORY_AUTHENTICATE,
    DIRECTORY_RESOLVE,
    AuthRequest,
    ResolveRequest,
)


def _cli(url: str, *args: str, code: int = 0) -> Result:
    app = typer.Typer()
    admin.register(app)
    res = CliRunner().invoke(app, list(args), env={"POSTBUS_API_URL": url,
                                                   "POSTBUS_ADMIN_TOKEN": ADMIN_TOKEN})
    assert res.exit_code == code, (args, res.output, res.exception)
    return res


async def test_store_process_with_cli(nats_server: RunningNats, s3_server: RunningS3,
                                      bus: Bus, tmp_path: Path) -> None:
    plat = await asyncio.to_thread(start_platform, tmp_path / "p", nats_server,
                                   s3_server.endpoint, services=(BY_NAME["mailbox-store"],))
    try:
        url = plat.api("mailbox-store")

        def run(*args: str, code: int = 0) -> Any:
            return asyncio.to_thread(_cli, url, *args, code=code)

        await run("domain", "add", "example.test")
        await run("user", "add", "alice@example.test", "-p", "s3cret", "--quota", "10M")
        await run("alias", "add", "info@example.test", "alice@example.test")

        r = await bus.request(DIRECTORY_RESOLVE, ResolveRequest(address="Info+x@EXAMPLE.test"))
        assert r.status == "local" and r.accounts[0].address == "alice@example.test"
        a = await bus.request(DIRECTORY_AUTHENTICATE,
                              AuthRequest(username="alice@example.test", password="s3cret",
                                          service="smtp"))
        assert a.ok and a.send_as == ["alice@example.test", "info@example.test"]

        mbox = tmp_path / "in.mbox"
        mbox.write_bytes(b"".join(
            f"From x@example.net Mon Jan  1 00:00:0{i} 2024\nSubject: p{i}\n\n>From body {i}\n\n"
            .encode() for i in range(5)))
        res = await run("import", "alice@example.test", str(mbox))
        assert "imported 5 messages" in res.output
        res = await run("export", "alice@example.test")
        back = list(read_mbox(io.BytesIO(res.stdout_bytes)))
        assert [b.raw.split(b"\r\n\r\n", 1)[1] for b in back] == [
            f"From body {i}\r\n".encode() for i in range(5)]
        await run("user", "disable", "alice@example.test")
        r = await bus.request(DIRECTORY_RESOLVE, ResolveRequest(address="alice@example.test"))
        assert r.status == "disabled"
    finally:
        await asyncio.to_thread(plat.stop)
