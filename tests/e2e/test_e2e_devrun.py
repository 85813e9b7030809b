"""`postbus run` (make run): starts everything, serves the first mail to swaks and curl,
brings a killed service back on its own, and stops cleanly on SIGTERM within 15 s."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from postbus.kit.embedded import free_port
from postbus.kit.testing import wait_for
from postbus.kit.topology import SERVICES

pytestmark = pytest.mark.timeout(400)

BIN = Path(sys.executable).parent


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
            return bool(r.status == 200)
    except Exception:
        return False


class Running:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = {**os.environ, "POSTBUS_RUN_DIR": str(root / "run"),
                    "POSTBUS_EMBEDDED_NATS_PORT": str(free_port()),
                    "POSTBUS_EMBEDDED_S3_PORT": str(free_port())}
        for k in [k for k in self.env if k.startswith("POSTBUS_") and k.endswith(("_URL", "_ENDPOINT"))]:
            del self.env[k]
        self.ports: dict[str, dict[str, int]] = {}
        for spec in SERVICES:
            ports = {"mgmt_port": free_port(), **{k: free_port() for k in spec.listeners}}
            self.ports[spec.name] = ports
            for k, v in ports.items():
                self.env[spec.env_prefix + k.upper()] = str(v)
        self.env["POSTBUS_API_URL"] = f"http://127.0.0.1:{self.ports['mailbox-store']['mgmt_port']}"
        self.out = open(root / "postbus-run.out", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen([str(BIN / "postbus"), "run"], env=self.env, cwd=root,
                                     stdout=self.out, stderr=subprocess.STDOUT, start_new_session=True)

    def pids(self) -> dict[str, int]:
        return json.loads((self.root / "run" / "pids.json").read_text())

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "postbus"), *args], env=self.env, cwd=self.root,
                              capture_output=True, text=True, timeout=60)

    def output(self) -> str:
        return (self.root / "postbus-run.out").read_text(errors="replace")


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    r = Running(tmp_path)
    try:
        wait_for(lambda: all(ready(p["mgmt_port"]) for p in r.ports.values()) or r.proc.poll() is not None,
                 timeout=180, interval=0.5)
        assert r.proc.poll() is None, r.output()
        wait_for(lambda: "admin token" in r.output(), timeout=10)
        yield r
    finally:
        if r.proc.poll() is None:
            os.killpg(r.proc.pid, signal.SIGKILL)
        r.out.close()


@pytest.mark.skipif(not (shutil.which("swaks") and shutil.which("curl")), reason="needs swaks and curl")
def test_make_run_first_mail_kill_and_stop(running: Running) -> None:
    out = running.output()
    assert str(running.ports["smtp-ingress"]["smtp_port"]) in out
    run = running.root / "run"
    token = (run / "admin-token").read_text().strip()
    assert token and token not in out and str(run / "admin-token") in out  # issue 8.9 (low)
    # issue 8.9: nothing under .run is for other users, secrets 0600 from the start
    assert run.stat().st_mode & 0o777 == 0o700
    for secret in ("admin-token", "postbus.db", "tls/key.pem"):
        assert (run / secret).stat().st_mode & 0o077 == 0, secret
    for p in run.rglob("*"):
        assert p.stat().st_mode & 0o007 == 0, f"{p} is readable by others"
    # issue 8.3: NATS users and S3 keys made for this machine, kept private
    nats_creds = json.loads((run / "nats-credentials.json").read_text())
    s3_creds = json.loads((run / "s3-credentials.json").read_text())
    assert set(nats_creds) == {s.name for s in SERVICES} | {"admin"}
    assert s3_creds["access_key"] != "postbus" and len(s3_creds["secret_key"]) >= 24
    nats_port = int(running.env["POSTBUS_EMBEDDED_NATS_PORT"])
    with socket.create_connection(("127.0.0.1", nats_port), timeout=5) as s:
        s.recv(4096)  # INFO
        s.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\nPING\r\n')
        assert b"Authorization Violation" in s.recv(4096)  # nobody gets in without a user

    assert running.cli("domain", "add", "example.test").returncode == 0
    res = running.cli("user", "add", "alice@example.test", "--password", "secret")
    assert res.returncode == 0, res.stdout + res.stderr

    smtp = running.ports["smtp-ingress"]["smtp_port"]
    swaks = subprocess.run(["swaks", "--server", f"127.0.0.1:{smtp}", "--to", "alice@example.test",
                            "--from", "bob@example.net", "--header", "Subject: hello from swaks"],
                           capture_output=True, text=True, timeout=60)
    assert swaks.returncode == 0, swaks.stdout
    assert "250 2.0.0" in swaks.stdout

    imap = running.ports["imap-access"]["imap_port"]

    def fetched() -> str:
        r = subprocess.run(["curl", "-s", f"imap://127.0.0.1:{imap}/INBOX;UID=1",
                            "-u", "alice@example.test:secret"], capture_output=True, text=True, timeout=30)
        return r.stdout

    wait_for(lambda: "hello from swaks" in fetched(), timeout=30, interval=0.5)

    # kill -9 one service: the supervisor notices and brings it back
    victim = "mime-processor"
    old = running.pids()[victim]
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: running.pids()[victim] != old, timeout=30, interval=0.2)
    wait_for(lambda: ready(running.ports[victim]["mgmt_port"]), timeout=60, interval=0.5)
    assert "mime-processor exited" in running.output()

    # mail still flows through the restarted service
    swaks = subprocess.run(["swaks", "--server", f"127.0.0.1:{smtp}", "--to", "alice@example.test",
                            "--from", "bob@example.net", "--header", "Subject: after restart"],
                           capture_output=True, text=True, timeout=60)
    assert swaks.returncode == 0
    imap_uid2 = lambda: subprocess.run(  # noqa: E731
        ["curl", "-s", f"imap://127.0.0.1:{imap}/INBOX;UID=2", "-u", "alice@example.test:secret"],
        capture_output=True, text=True, timeout=30).stdout
    wait_for(lambda: "after restart" in imap_uid2(), timeout=30, interval=0.5)

    # SIGTERM stops everything within 15 s
    children = list(running.pids().values())
    started = time.monotonic()
    running.proc.send_signal(signal.SIGTERM)
    running.proc.wait(20)
    assert time.monotonic() - started < 15
    assert running.proc.returncode == 0
    for pid in children:
        try:
            os.kill(pid, 0)
            alive = True
        except ProcessLookupError:
            alive = False
        assert not alive, f"child {pid} still running"
