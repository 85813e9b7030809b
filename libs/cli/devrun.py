"""`postbus run` (what `make run` calls): the whole platform on one machine.

Starts an embedded nats-server (JetStream, fsync before ack) and SeaweedFS S3 unless
POSTBUS_NATS_URL / POSTBUS_S3_ENDPOINT point elsewhere, then every service as its own
process with SQLite under .run/. Restarts a process that dies, with backoff, as Kubernetes
would; stops everything on Ctrl-C or SIGTERM within 15 s.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from postbus.kit import embedded
from postbus.kit.natsauth import authorization_block
from postbus.kit.settings import ensure_admin_token, write_private
from postbus.kit.tls import self_signed
from postbus.kit.topology import SERVICES, ServiceSpec

console = Console(highlight=False)

PIDS_FILE: Path | None = None  # <run dir>/pids.json: what runs now, for operators and tests
STOP_GRACE_S = 10.0  # services get this long after SIGTERM; the whole stop stays under 15 s


@dataclass
class Child:
    name: str
    cmd: list[str]
    log: Path
    env: dict[str, str]
    ready_url: str | None = None
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    backoff_s: float = 1.0
    next_start: float = 0.0
    started_at: float = 0.0
    ready: bool = False
    extra: dict[str, str] = field(default_factory=dict)

    def start(self) -> None:
        self.proc = embedded.start(self.cmd, self.log, self.env)
        self.started_at = time.monotonic()
        self.ready = False
        if PIDS_FILE is not None:
            pids = json.loads(PIDS_FILE.read_text()) if PIDS_FILE.exists() else {}
            pids[self.name] = self.proc.pid
            PIDS_FILE.write_text(json.dumps(pids))

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def is_ready(self) -> bool:
        if self.ready_url is None:
            return self.alive()
        try:
            with urllib.request.urlopen(self.ready_url, timeout=1) as r:
                return bool(r.status == 200)
        except Exception:
            return False


def _port(env: dict[str, str], name: str, default: int) -> int:
    return int(env.get(name, default))


def _stable_ports(path: Path, names: list[str]) -> dict[str, int]:
    """Internal SeaweedFS ports: chosen once, then reused so its metadata stays valid."""
    try:
        ports = {k: int(v) for k, v in json.loads(path.read_text()).items()}
        if sorted(ports) == sorted(names):
            return ports
    except (OSError, ValueError):
        pass
    ports = {n: embedded.free_port() for n in names}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(ports))
    return ports


def plan(run_dir: Path, env: dict[str, str]) -> tuple[list[Child], list[Child], dict[str, str]]:
    """Build the infrastructure and service processes to start, and the shared env."""
    run_dir = run_dir.resolve()
    logs = run_dir / "logs"
    infra: list[Child] = []
    common: dict[str, str] = {}

    nats_users: dict[str, str] = {}
    if not env.get("POSTBUS_NATS_URL"):
        # one NATS user per service, allowed only its subjects (kit.natsauth, issue 8.3)
        creds = _secrets(run_dir / "nats-credentials.json", [s.name for s in SERVICES] + ["admin"])
        nats_users = {s.name: creds[s.name] for s in SERVICES}
        nats = embedded.NatsSpec(_port(env, "POSTBUS_EMBEDDED_NATS_PORT", 4333), run_dir / "nats",
                                 authorization=authorization_block(
                                     nats_users, admin_password=creds["admin"]))
        infra.append(Child("nats", nats.command(), logs / "nats.log", {}, extra={"url": nats.url}))
        common["POSTBUS_NATS_URL"] = nats.url
    if not env.get("POSTBUS_S3_ENDPOINT"):
        p = _stable_ports(run_dir / "s3-ports.json", ["master", "volume", "filer"])
        # keys made for this machine, not the well-known defaults
        keys = _secrets(run_dir / "s3-credentials.json", ["access_key", "secret_key"])
        access = env.get("POSTBUS_S3_ACCESS_KEY") or keys["access_key"]
        secret = env.get("POSTBUS_S3_SECRET_KEY") or keys["secret_key"]
        s3 = embedded.S3Spec(_port(env, "POSTBUS_EMBEDDED_S3_PORT", 8333), run_dir / "s3",
                             access_key=access, secret_key=secret,
                             master_port=p["master"], volume_port=p["volume"], filer_port=p["filer"])
        common["POSTBUS_S3_ACCESS_KEY"], common["POSTBUS_S3_SECRET_KEY"] = access, secret
        infra.append(Child("s3", s3.command(), logs / "s3.log", {}, extra={"url": s3.endpoint}))
        common["POSTBUS_S3_ENDPOINT"] = s3.endpoint
    if not env.get("POSTBUS_DATABASE_URL"):
        common["POSTBUS_DATABASE_URL"] = f"sqlite:///{run_dir / 'postbus.db'}"
    if not env.get("POSTBUS_ADMIN_TOKEN"):
        common["POSTBUS_ADMIN_TOKEN"] = ensure_admin_token(run_dir / "admin-token")
    if not env.get("POSTBUS_TLS_CERT"):
        cert, key = run_dir / "tls" / "cert.pem", run_dir / "tls" / "key.pem"
        self_signed(cert, key, env.get("POSTBUS_HOSTNAME", "localhost"))
        common["POSTBUS_TLS_CERT"], common["POSTBUS_TLS_KEY"] = str(cert), str(key)

    services: list[Child] = []
    for spec in SERVICES:
        mgmt = _port(env, spec.env_prefix + "MGMT_PORT", spec.mgmt_port)
        own = ({"POSTBUS_NATS_USER": spec.name, "POSTBUS_NATS_PASSWORD": nats_users[spec.name]}
               if nats_users else {})
        services.append(Child(
            spec.name, [sys.executable, "-m", spec.module], logs / f"{spec.name}.log",
            {**common, **own}, ready_url=f"http://127.0.0.1:{mgmt}/readyz",
        ))
    return infra, services, common


def _secrets(path: Path, names: list[str]) -> dict[str, str]:
    """Random secrets kept in ``path`` (0600): made once, the same at every start."""
    try:
        known = json.loads(path.read_text())
        if all(isinstance(known.get(n), str) and known[n] for n in names):
            return {n: known[n] for n in names}
    except (OSError, ValueError):
        pass
    made = {n: secrets.token_urlsafe(24) for n in names}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_private(path, json.dumps(made, indent=2).encode())
    return made


def _endpoints(env: dict[str, str], common: dict[str, str]) -> Table:
    t = Table(title="Postbus is running", show_lines=False)
    t.add_column("service")
    t.add_column("listens")
    t.add_column("management API")

    def listeners(spec: ServiceSpec) -> str:
        return ", ".join(f"{k.removesuffix('_port')} 127.0.0.1:{_port(env, spec.env_prefix + k.upper(), v)}"
                         for k, v in spec.listeners.items()) or "-"

    for spec in SERVICES:
        mgmt = _port(env, spec.env_prefix + "MGMT_PORT", spec.mgmt_port)
        t.add_row(spec.name, listeners(spec), f"http://127.0.0.1:{mgmt}/api/v1  (/docs)")
    merged = {**env, **common}
    t.add_row("nats", merged["POSTBUS_NATS_URL"], "")
    t.add_row("s3", merged["POSTBUS_S3_ENDPOINT"], "")
    return t


def run(run_dir: Path = Path(".run")) -> int:
    global PIDS_FILE
    env = dict(os.environ)
    # the database (password hashes), message bodies, logs and secrets live here: nothing
    # in it is for other users of the machine, from the first file on (issue 8.9)
    os.umask(0o077)
    run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    run_dir.chmod(0o700)
    PIDS_FILE = run_dir.resolve() / "pids.json"
    PIDS_FILE.unlink(missing_ok=True)
    infra, services, common = plan(run_dir, env)
    children = infra + services
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    def stop_all() -> None:
        console.print("[bold]stopping[/bold] ...")
        deadline = time.monotonic() + STOP_GRACE_S
        for group in (services, infra):  # services first, so they drain into live NATS
            for c in group:
                if c.alive():
                    assert c.proc is not None
                    c.proc.terminate()
            for c in group:
                if c.proc is None:
                    continue
                try:
                    c.proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    c.proc.kill()
                    c.proc.wait(2)
            deadline = time.monotonic() + 3.0
        console.print("stopped.")

    busy = [c for c in infra if embedded.port_open(int(c.extra["url"].rsplit(":", 1)[1]))]
    if busy:
        for c in busy:
            console.print(f"[red]the embedded {c.name} port is in use ({c.extra['url']}): another "
                          f"`postbus run`? Stop it, or set POSTBUS_EMBEDDED_{c.name.upper()}_PORT.[/red]")
        return 1
    for c in infra:
        c.start()
    if infra:
        console.print("starting embedded " + " and ".join(c.name for c in infra) + " ...")
    for c in infra:
        try:
            url = c.extra["url"]
            if c.name == "nats":
                port = int(url.rsplit(":", 1)[1])
                embedded.wait_until(functools.partial(embedded.port_open, port), 30, "nats", c.proc)
            else:
                embedded.wait_until(functools.partial(_http_up, url), 90, "seaweedfs", c.proc)
        except Exception as exc:
            console.print(f"[red]{c.name} did not start: {exc}; see {c.log}[/red]")
            stop_all()
            return 1

    for c in services:
        c.start()
    deadline = time.monotonic() + 120
    while not all(c.is_ready() for c in services):
        if stopping:
            stop_all()
            return 0
        if time.monotonic() > deadline:
            late = [c.name for c in services if not c.is_ready()]
            console.print(f"[red]not ready after 120 s: {', '.join(late)}; logs in {run_dir / 'logs'}[/red]")
            stop_all()
            return 1
        supervise(children)
        time.sleep(0.3)

    console.print(_endpoints(env, common))
    # the token itself stays out of terminals, scrollback and CI logs
    console.print(f"admin token: in {run_dir / 'admin-token'} (the postbus CLI reads it there)"
                  if "POSTBUS_ADMIN_TOKEN" in common else "admin token: from POSTBUS_ADMIN_TOKEN",
                  soft_wrap=True)
    console.print(f"logs: {run_dir / 'logs'}/<service>.log    Ctrl-C stops everything")

    while not stopping:
        supervise(children)
        time.sleep(0.2)
    stop_all()
    return 0


def supervise(children: list[Child]) -> None:
    """Restart every child that exited, with exponential backoff (1 s, 2 s, ... 30 s)."""
    now = time.monotonic()
    for c in children:
        if c.alive():
            if now - c.started_at > 60:
                c.backoff_s = 1.0  # healthy for a minute: forget earlier crashes
            continue
        if c.next_start == 0.0:
            code = c.proc.returncode if c.proc else None
            c.next_start = now + c.backoff_s
            console.print(f"[yellow]{c.name} exited (code {code}); restarting in "
                          f"{c.backoff_s:.0f} s (log: {c.log})[/yellow]")
            c.backoff_s = min(c.backoff_s * 2, 30.0)
        elif now >= c.next_start:
            c.restarts += 1
            c.next_start = 0.0
            c.start()
            console.print(f"{c.name} restarted (restart #{c.restarts})")


def _http_up(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=0.5)
    except urllib.error.HTTPError:
        return True
    except Exception:
        return False
    return True
