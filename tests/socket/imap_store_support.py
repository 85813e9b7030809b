"""Shared by the test_imap_*_store tests: the imap-access server over the real mailbox-store
(SQLite; PostgreSQL too when POSTBUS_TEST_POSTGRES_URL is set) on a real nats-server, with
alice's INBOX holding a few plain messages, and a line-at-a-time IMAP client for it."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from store_dir_support import BACKENDS, open_db

from postbus.imap_access.adapters import BusChanges, BusStore, S3Blobs, store_error
from postbus.imap_access.server import ImapServer
from postbus.imap_access.settings import Settings as ImapSettings
from postbus.kit.blob import BlobStore
from postbus.kit.bus import Bus
from postbus.kit.directory import DirectoryClient
from postbus.kit.settings import CommonSettings
from postbus.mailbox_store.directory import serve_directory
from postbus.mailbox_store.passwords import Passwords, fast_hasher
from postbus.mailbox_store.repository import NewMessage, Repository
from postbus.mailbox_store.settings import Settings as StoreSettings
from postbus.mailbox_store.storeapi import StoreApi
from postbus.protocols.mime import summarize

USER, PASSWORD = "alice@example.test", "secret"


class Client:
    """A line-at-a-time IMAP client speaking UTF-8 (the answers it reads carry no literals);
    its tags are ``tag`` and a count."""

    def __init__(self, port: int, tag: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.rf = self.sock.makefile("rb")
        self.tag = tag
        self.n = 0
        self.rf.readline()  # greeting

    def cmd(self, text: str, status: str = "OK") -> list[str]:
        self.n += 1
        tag = f"{self.tag}{self.n}"
        self.sock.sendall(f"{tag} {text}\r\n".encode())
        lines: list[str] = []
        while True:
            line = self.rf.readline().decode("utf-8").rstrip("\r\n")
            assert line, f"connection closed after {lines}"
            lines.append(line)
            if line.startswith(tag + " "):
                assert line.startswith(f"{tag} {status}"), lines
                return lines

    def noop_until(self, want: str, never: str) -> list[str]:
        """NOOP for at most 10 s until some response matches ``want``; the ones that do.
        No response on the way may match ``never``."""
        deadline = time.monotonic() + 10
        seen: list[str] = []
        while not seen and time.monotonic() < deadline:
            lines = self.cmd("NOOP")
            assert not matching(lines, never)
            seen = matching(lines, want)
            time.sleep(0.05)
        return seen

    def close(self) -> None:
        self.cmd("LOGOUT")
        self.rf.close()
        self.sock.close()


def matching(lines: list[str], pattern: str) -> list[str]:
    return [x for x in lines if re.fullmatch(pattern, x)]


@pytest_asyncio.fixture(params=BACKENDS)
async def imap_port(request: pytest.FixtureRequest, tmp_path: Path, bus: Bus,
                    blobs: BlobStore, common_settings: CommonSettings) -> AsyncIterator[int]:
    """The port of an IMAP server over a fresh store, on each backend, in which alice's INBOX
    holds as many messages (subjects m0, m1, ...) as the test module's ``INBOX_MESSAGES``."""
    messages: int = request.module.INBOX_MESSAGES
    async for sm in open_db(request.param, tmp_path):
        repo = Repository(sm.kw["bind"])
        d = await serve_directory(bus, sm, passwords=Passwords(fast_hasher()), repo=repo)
        await d.create_domain("example.test")
        aid = (await d.create_account(USER, PASSWORD)).id
        await StoreApi(bus, blobs, repo, StoreSettings(common=common_settings)).serve()
        msgs = []
        for i in range(messages):
            raw = f"From: bob@example.net\r\nSubject: m{i}\r\n\r\nbody {i}\r\n".encode()
            msgs.append(NewMessage(await blobs.put(raw), len(raw), summarize(raw)))
        await repo.append_many(aid, "INBOX", msgs)
        server = ImapServer(ImapSettings(common=common_settings, auth_fail_delay_s=0),
                            DirectoryClient(bus, "imap", errors=store_error), BusStore(bus),
                            S3Blobs(blobs), BusChanges(bus))
        [port] = await server.start("127.0.0.1", 0, None)
        try:
            yield port
        finally:
            await server.stop()
