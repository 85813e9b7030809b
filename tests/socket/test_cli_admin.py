"""`postbus domain|user|alias|mailbox|import|export` (typer) against a real uvicorn server on
port 0 serving mailbox-store's management router, with real SQL, S3 and NATS."""

from __future__ import annotations

import asyncio
import contextlib
import io
import mailbox
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
import typer
import uvicorn
from store_dir_support import open_db
from typer.testing import CliRunner

from postbus.cli import admin
from postbus.kit.blob import BlobStore
from postbus.kit.bus import Bus
from postbus.kit.mgmt import create_app
from postbus.kit.testing import ADMIN_TOKEN
from postbus.mailbox_store.directory import Directory, serve_directory
from postbus.mailbox_store.importexport import read_mbox
from postbus.mailbox_store.mgmt import router
from postbus.mailbox_store.passwords import Passwords, fast_hasher
from postbus.mailbox_store.repository import Repository


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # leave pytest's signal handlers alone
        yield


@dataclass
class Cli:
    url: str
    directory: Directory
    app: typer.Typer

    async def run(self, *args: str, code: int = 0, token: str = ADMIN_TOKEN,
                  stdin: bytes | None = None) -> str:
        runner = CliRunner()
        env = {"POSTBUS_API_URL": self.url, "POSTBUS_ADMIN_TOKEN": token,
               "POSTBUS_RUN_DIR": "/nonexistent", "COLUMNS": "200"}
        res = await asyncio.to_thread(runner.invoke, self.app, list(args), env=env,
                                      input=stdin)
        out = res.stdout + (res.stderr if res.stderr_bytes is not None else "")
        assert res.exit_code == code, (args, res.exit_code, out, res.exception)
        return out

    async def run_bytes(self, *args: str) -> bytes:
        runner = CliRunner()
        env = {"POSTBUS_API_URL": self.url, "POSTBUS_ADMIN_TOKEN": ADMIN_TOKEN}
        res = await asyncio.to_thread(runner.invoke, self.app, list(args), env=env)
        assert res.exit_code == 0, (res.output, res.exception)
        return res.stdout_bytes


@pytest_asyncio.fixture
async def cli(tmp_path: Path, bus: Bus, blobs: BlobStore) -> AsyncIterator[Cli]:
    async for sm in open_db("sqlite", tmp_path):
        repo = Repository(sm.kw["bind"])
        d = await serve_directory(bus, sm, passwords=Passwords(fast_hasher()), repo=repo)
        app = create_app("mailbox-store", checks={}, token_source=lambda: ADMIN_TOKEN,
                         routers=[router(sm, blobs, bus, repo, directory=d)])
        server = _Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None,
                                        access_log=False, lifespan="off"))
        task = asyncio.create_task(server.serve())
        while not server.started:  # noqa: ASYNC110 (uvicorn offers no event)
            await asyncio.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        tapp = typer.Typer(no_args_is_help=True)
        admin.register(tapp)
        try:
            yield Cli(f"http://127.0.0.1:{port}", d, tapp)
        finally:
            server.should_exit = True
            await task


async def test_domain_user_alias_commands(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(admin, "PAGE", 1)  # `user list` must follow every page
    assert "added" in await cli.run("domain", "add", "Example.TEST")
    assert "exists" in await cli.run("domain", "add", "example.test", code=1)
    assert "invalid domain" in await cli.run("domain", "add", "nodots", code=1)
    out = await cli.run("domain", "list")
    assert "example.test" in out and "case-insensitive" in out

    out = await cli.run("user", "add", "alice@example.test", "--password", "pw1", "--quota", "1M")
    assert "created" in out and "1.0 MiB" in out
    assert "does not exist" in await cli.run("user", "add", "bob@nowhere.test", "-p", "x", code=1)
    assert "not a size" in await cli.run("user", "add", "bob@example.test", "-p", "x",
                                         "--quota", "lots", code=2)
    # no password and no terminal: a usage error, not a hang
    await cli.run("user", "add", "bob@example.test", code=2)
    await cli.run("user", "add", "bob@example.test", "-p", "pw")
    out = await cli.run("user", "list")
    assert "alice@example.test" in out and "bob@example.test" in out

    await cli.run("user", "passwd", "alice@example.test", "--password", "pw2")
    assert not (await cli.directory.authenticate("alice@example.test", "pw1")).ok
    assert (await cli.directory.authenticate("alice@example.test", "pw2")).ok
    await cli.run("user", "disable", "alice@example.test")
    assert (await cli.directory.authenticate("alice@example.test", "pw2")).reason == "disabled"
    await cli.run("user", "enable", "alice@example.test")
    assert (await cli.directory.authenticate("alice@example.test", "pw2")).ok
    assert "unlimited" in await cli.run("user", "quota", "alice@example.test", "unlimited")
    await cli.run("user", "pop3", "alice@example.test", "delete", "--expire-days", "3")
    out = await cli.run("user", "show", "alice@example.test")
    assert "expire after 3 days" in out and "unlimited" in out
    assert '"pop3_policy": "delete"' in await cli.run("user", "show", "alice@example.test",
                                                      "--json")

    await cli.run("alias", "add", "team@example.test", "alice@example.test", "bob@example.test")
    out = await cli.run("alias", "list")
    assert "team@example.test" in out and "bob@example.test" in out
    await cli.run("alias", "set", "team@example.test", "bob@example.test")
    r = await cli.directory.resolve("team@example.test")
    assert [a.address for a in r.accounts] == ["bob@example.test"]
    await cli.run("alias", "delete", "team@example.test")
    assert "does not exist" in await cli.run("alias", "delete", "team@example.test", code=1)

    await cli.run("domain", "catch-all", "example.test", "bob@example.test")
    assert (await cli.directory.resolve("x@example.test")).status == "local"
    await cli.run("domain", "catch-all", "example.test", "--clear")
    assert (await cli.directory.resolve("x@example.test")).status == "unknown"

    out = await cli.run("mailbox", "list", "alice@example.test")
    assert "INBOX" in out and "\\Sent" in out

    await cli.run("user", "delete", "bob@example.test", code=2)  # asks for --yes
    await cli.run("user", "delete", "bob@example.test", "--yes")
    await cli.run("domain", "delete", "example.test", code=1)  # alice is still there
    await cli.run("domain", "delete", "example.test", "--force")
    assert "[]" in await cli.run("domain", "list", "--json")


async def test_errors_and_exit_codes(cli: Cli) -> None:
    assert "refused (401)" in await cli.run("domain", "list", token="wrong", code=1)
    await cli.run("domain", code=2)  # no sub-command: usage
    await cli.run("user", "quota", code=2)  # missing arguments
    bad = Cli("http://127.0.0.1:9", cli.directory, cli.app)  # nothing listens on port 9
    assert "cannot reach" in await bad.run("domain", "list", code=1)


async def test_import_export(cli: Cli, tmp_path: Path) -> None:
    await cli.run("domain", "add", "example.test")
    await cli.run("user", "add", "alice@example.test", "-p", "pw")
    src = tmp_path / "in.mbox"
    box = mailbox.mbox(str(src))
    for i in range(30):
        m = mailbox.mboxMessage(f"From: s{i}@example.net\nSubject: cli {i}\n\n"
                                f"{'x' * 2000}\nFrom line {i}\n")
        if i == 0:
            m.set_flags("RF")
        box.add(m)
    box.flush()
    box.close()
    out = await cli.run("import", "alice@example.test", str(src))
    assert "imported 30 messages" in out and "UIDs 1-30" in out

    md = mailbox.Maildir(str(tmp_path / "Maildir"))
    for i in range(3):
        mm = mailbox.MaildirMessage(f"Subject: md {i}\n\nhello {i}\n")
        mm.set_subdir("cur")
        mm.set_flags("S")
        md.add(mm)
    md.add_folder("Sent").add(mailbox.MaildirMessage("Subject: sent\n\nout\n"))
    out = await cli.run("import", "alice@example.test", str(tmp_path / "Maildir"),
                        "--mailbox", "Old")
    assert "imported 4 messages" in out and "into Old" in out and "Old/Sent: 1" in out
    eml = tmp_path / "one.eml"
    eml.write_bytes(b"Subject: single\r\n\r\nhi\r\n")
    assert "imported 1 messages" in await cli.run("import", "alice@example.test", str(eml))
    assert "422" in await cli.run("import", "alice@example.test", str(eml), "--format", "mbox",
                                  code=1)
    assert "must be" in await cli.run("import", "alice@example.test", str(eml), "-f", "pst",
                                      code=2)

    out = await cli.run("mailbox", "list", "alice@example.test")
    assert "Old" in out

    data = await cli.run_bytes("export", "alice@example.test")
    msgs = list(read_mbox(io.BytesIO(data)))
    assert len(msgs) == 31
    assert b"Subject: cli 0\r\n" in msgs[0].raw and msgs[0].flags == ["\\Seen", "\\Flagged"]
    assert msgs[5].raw.endswith(b"From line 5\r\n")
    target = tmp_path / "out.mbox"
    out = await cli.run("export", "alice@example.test", "-m", "Old", "-o", str(target))
    assert "exported" in out
    assert [m.flags for m in read_mbox(io.BytesIO(target.read_bytes()))] == [["\\Seen"]] * 3
    assert "404" in await cli.run("export", "ghost@example.test", code=1)


@pytest.mark.parametrize("text,want", [("500", 500), ("2k", 2048), ("1.5M", 1572864),
                                       ("2GiB", 2 * 1024 ** 3), ("unlimited", None), ("0", 0)])
def test_parse_size(text: str, want: int | None) -> None:
    assert admin.parse_size(text) == want
