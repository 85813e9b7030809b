"""smtp-ingress as its own process (``python -m postbus.smtp_ingress``, uvloop, management
API over HTTP) driven by swaks, with the directory answered from a table on the real bus."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from postbus.kit import embedded
from postbus.kit.bus import Bus
from postbus.kit.settings import CommonSettings
from postbus.kit.testing import ADMIN_TOKEN, RunningNats
from postbus.kit.tls import self_signed
from postbus.smtp_ingress.testing import DirectoryTable, Inbox, User, serve_directory

pytestmark = [pytest.mark.clients, pytest.mark.timeout(120),
              pytest.mark.skipif(not shutil.which("swaks"), reason="swaks not installed")]


@dataclass
class Proc:
    ports: dict[str, int]
    log: Path

    def api(self) -> str:
        return f"http://127.0.0.1:{self.ports['mgmt_port']}"


@pytest_asyncio.fixture
async def service(bus: Bus, common_settings: CommonSettings, nats_server: RunningNats,
                  tmp_path: Path) -> AsyncIterator[Proc]:
    table = DirectoryTable(users={"alice@example.test": User("secret"),
                                  "bob@example.test": User("hunter2")})
    await serve_directory(bus, table)
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    self_signed(cert, key)
    ports = {k: embedded.free_port() for k in ("mgmt_port", "smtp_port", "submission_port",
                                                "smtps_port")}
    env = {**os.environ,
           "POSTBUS_NATS_URL": common_settings.nats_url,
           **nats_server.service_env("smtp-ingress"),
           "POSTBUS_S3_ENDPOINT": common_settings.s3_endpoint,
           "POSTBUS_S3_BUCKET": common_settings.s3_bucket,
           "POSTBUS_ADMIN_TOKEN": ADMIN_TOKEN,
           "POSTBUS_TLS_CERT": str(cert), "POSTBUS_TLS_KEY": str(key),
           "POSTBUS_HOSTNAME": "mx.example.test",
           "POSTBUS_TRUSTED_NETWORKS": '["192.0.2.0/24"]',
           **{"POSTBUS_SMTP_INGRESS_" + k.upper(): str(v) for k, v in ports.items()}}
    log = tmp_path / "smtp-ingress.log"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "postbus.smtp_ingress", env=env,
        stdout=log.open("wb"), stderr=asyncio.subprocess.STDOUT)
    p = Proc(ports, log)
    try:
        async with httpx.AsyncClient() as c:
            for _ in range(300):
                try:
                    if (await c.get(p.api() + "/readyz")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if proc.returncode is not None:
                    raise RuntimeError(log.read_text())
                await asyncio.sleep(0.1)
            else:
                raise TimeoutError(log.read_text())
        yield p
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 20)
    assert proc.returncode == 0, log.read_text()[-3000:]


async def swaks(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "swaks", "--timeout", "20", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace")


async def test_swaks_mx(service: Proc, bus: Bus) -> None:
    inbox = Inbox(bus)
    rc, out = await swaks("--server", f"127.0.0.1:{service.ports['smtp_port']}",
                          "--to", "alice@example.test", "--from", "someone@example.net",
                          "--header", "Subject: hi from swaks")
    assert rc == 0, out
    assert "ENHANCEDSTATUSCODES" in out and "CHUNKING" in out and "AUTH" not in out.split("STARTTLS")[0].split("EHLO")[-1]
    msg = await inbox.get()
    assert msg.client.listener == "mx" and b"Subject: hi from swaks" in msg.body.inline  # type: ignore[operator]
    assert b"by mx.example.test (Postbus) with ESMTP id " in msg.body.inline  # type: ignore[operator]

    # no open relay from loopback
    rc, out = await swaks("--server", f"127.0.0.1:{service.ports['smtp_port']}",
                          "--to", "victim@remote.example", "--from", "someone@example.net")
    assert rc != 0 and "554 5.7.1" in out



def _perl_tls() -> bool:
    import subprocess

    return subprocess.run(["perl", "-MNet::SSLeay", "-MIO::Socket::SSL", "-e", "1"],
                          capture_output=True).returncode == 0


@pytest.mark.skipif(not _perl_tls(), reason="swaks TLS needs libnet-ssleay-perl libio-socket-ssl-perl")
async def test_swaks_submission_starttls_smtps_and_mgmt(service: Proc, bus: Bus) -> None:
    inbox = Inbox(bus)
    # submission: STARTTLS + AUTH PLAIN, relaying to a remote address (uvloop + STARTTLS)
    rc, out = await swaks("--server", f"127.0.0.1:{service.ports['submission_port']}", "--tls",
                          "--auth", "PLAIN", "--auth-user", "alice@example.test",
                          "--auth-password", "secret", "--from", "alice@example.test",
                          "--to", "friend@remote.example")
    assert rc == 0, out
    msg = await inbox.get()
    assert msg.client.auth_user == "alice@example.test" and msg.client.listener == "submission"
    assert msg.client.tls

    # wrong password
    rc, out = await swaks("--server", f"127.0.0.1:{service.ports['submission_port']}", "--tls",
                          "--auth", "LOGIN", "--auth-user", "alice@example.test",
                          "--auth-password", "nope", "--to", "friend@remote.example")
    assert rc != 0 and "535 5.7.8" in out

    # implicit TLS with BDAT (swaks --tlsc, --pipeline)
    rc, out = await swaks("--server", f"127.0.0.1:{service.ports['smtps_port']}", "--tlsc",
                          "--auth", "LOGIN", "--auth-user", "bob@example.test",
                          "--auth-password", "hunter2", "--from", "bob@example.test",
                          "--to", "alice@example.test", "--pipeline")
    assert rc == 0, out
    assert (await inbox.get()).client.listener == "smtps"

    # management API over HTTP with the bearer token
    async with httpx.AsyncClient(base_url=service.api(),
                                 headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as api:
        limits = (await api.get("/api/v1/limits")).json()
        assert limits["trusted_networks"] == ["192.0.2.0/24"]
        assert limits["listeners"]["mx"] == service.ports["smtp_port"]
        counters = (await api.get("/api/v1/counters")).json()["counters"]
        assert counters["message_accepted"]["ok"] == 2
        ready = (await api.get("/readyz")).json()
        assert ready["checks"]["smtp"] == "ok", ready
        metrics = (await api.get("/metrics")).text
        assert 'postbus_smtp_messages_total{listener="submission",outcome="accepted",reason="ok"} 1.0' in metrics
