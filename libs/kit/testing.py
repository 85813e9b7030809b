"""Test fixtures: a real nats-server and a real SeaweedFS S3 on free ports, and the whole
platform as separate processes. Loaded as a pytest plugin by tests/conftest.py.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import pytest_asyncio

from postbus.kit import embedded
from postbus.kit.blob import BlobStore
from postbus.kit.bus import Bus
from postbus.kit.settings import CommonSettings
from postbus.kit.topology import SERVICES, ServiceSpec
from postbus.proto import ALL_STREAMS

ADMIN_TOKEN = "test-admin-token"


def examples(n: int) -> int:
    """Hypothesis ``max_examples``: ``n`` in ``make test``, ``n`` times POSTBUS_FUZZ_FACTOR
    in ``make fuzz`` (a longer campaign over the same properties)."""
    return n * max(1, int(os.environ.get("POSTBUS_FUZZ_FACTOR", "1")))


# property tests without their own settings: 100 examples, more under `make fuzz`
hypothesis.settings.register_profile("postbus", max_examples=examples(100))
hypothesis.settings.load_profile("postbus")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Under CI (CI=true) a skipped real-client test fails the run: `make clients` installs
    them there, so a skip means a client went missing, not an optional extra."""
    outcome = yield
    report = outcome.get_result()
    if (report.skipped and os.environ.get("CI", "").lower() == "true"
            and item.get_closest_marker("clients") is not None):
        report.outcome = "failed"
        report.longrepr = f"real-client test skipped under CI: {report.longrepr}"


@dataclass
class Infra:
    nats_url: str
    s3_endpoint: str


class RunningNats:
    def __init__(self, root: Path, *, max_payload: int | None = None, auth: bool = True) -> None:
        """``max_payload``: the server's limit (default: NatsSpec's); nats-server's own
        default, 1 MiB, is what a production cluster may run with. ``auth``: as `postbus
        run` has it, one user per service with its permissions (kit.natsauth), and an
        unrestricted ``admin`` for the test itself (``common()``)."""
        from postbus.kit.natsauth import authorization_block

        self.spec = embedded.NatsSpec(embedded.free_port(), root / "nats")
        if max_payload is not None:
            self.spec.max_payload = max_payload
        self.passwords = {s.name: secrets.token_urlsafe(18) for s in SERVICES} if auth else {}
        self.admin_password = secrets.token_urlsafe(18) if auth else None
        if auth:
            self.spec.authorization = authorization_block(
                self.passwords, admin_password=self.admin_password)
        self.proc = embedded.start(self.spec.command(), root / "nats.log")
        embedded.wait_until(self.spec.ready, 20, "nats-server", self.proc)

    @property
    def url(self) -> str:
        return self.spec.url

    def common(self, **kw: Any) -> CommonSettings:
        """Settings of a client with every permission (the test itself)."""
        creds: dict[str, Any] = ({"nats_user": "admin", "nats_password": self.admin_password}
                                 if self.admin_password else {})
        return CommonSettings(nats_url=self.url, **{**creds, **kw})

    def service_env(self, service: str) -> dict[str, str]:
        """The NATS credentials of one service, as its environment."""
        if service not in self.passwords:
            return {}
        return {"POSTBUS_NATS_USER": service, "POSTBUS_NATS_PASSWORD": self.passwords[service]}

    def stop(self) -> None:
        embedded.stop(self.proc)

    def restart(self) -> None:
        self.stop()
        self.proc = embedded.start(self.spec.command(), self.spec.store_dir.parent / "nats.log")
        embedded.wait_until(self.spec.ready, 20, "nats-server", self.proc)


class RunningS3:
    def __init__(self, root: Path) -> None:
        # every test has its own bucket: do not let the volume count depend on free disk
        self.spec = embedded.S3Spec(embedded.free_port(), root / "s3", max_volumes=2000)
        self.proc = embedded.start(self.spec.command(), root / "s3.log")
        embedded.wait_until(self.spec.ready, 60, "seaweedfs", self.proc)
        self._client: Any = None

    def drop_bucket(self, name: str) -> None:
        """Delete a test's bucket with its objects (SeaweedFS drops the whole collection
        and frees its volumes; without this a long session runs out of volumes)."""
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError

        if self._client is None:
            self._client = boto3.client(
                "s3", endpoint_url=self.endpoint, region_name="us-east-1",
                aws_access_key_id=self.spec.access_key,
                aws_secret_access_key=self.spec.secret_key)
        try:
            self._client.delete_bucket(Bucket=name)
        except (BotoCoreError, ClientError):
            pass  # never created by the test, or already gone

    @property
    def endpoint(self) -> str:
        return self.spec.endpoint

    def stop(self) -> None:
        embedded.stop(self.proc, timeout=2.0)  # test data is disposable; weed takes ~10 s otherwise


@pytest.fixture(scope="session")
def infra_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="postbus-test-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_server(infra_root: Path) -> Iterator[RunningS3]:
    """One SeaweedFS for the session (it takes seconds to start); tests use their own bucket."""
    s3 = RunningS3(infra_root)
    yield s3
    s3.stop()


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[RunningNats]:
    """A fresh nats-server with JetStream per test (starts in milliseconds)."""
    n = RunningNats(tmp_path)
    yield n
    n.stop()


@pytest.fixture
def common_settings(nats_server: RunningNats, s3_server: RunningS3,
                    tmp_path: Path) -> Iterator[CommonSettings]:
    settings = nats_server.common(
        s3_endpoint=s3_server.endpoint,
        s3_bucket="t-" + uuid.uuid4().hex[:12],
        database_url=f"sqlite:///{tmp_path / 'store.db'}",
        admin_token=ADMIN_TOKEN,
        admin_token_file=tmp_path / "admin-token",
        blob_cache_mb=64,
    )
    yield settings
    s3_server.drop_bucket(settings.s3_bucket)


@pytest_asyncio.fixture
async def bus(common_settings: CommonSettings) -> AsyncIterator[Bus]:
    b = await Bus.connect(common_settings, "test")
    await b.ensure_streams(ALL_STREAMS)
    yield b
    await b.close()


@pytest_asyncio.fixture
async def blobs(common_settings: CommonSettings) -> AsyncIterator[BlobStore]:
    store = BlobStore(common_settings, threads=8)
    await store.ensure_bucket()
    yield store
    await store.close()


# ---------------------------------------------------------------- the whole platform
@dataclass
class Platform:
    """Every service as its own process, on free ports, against given NATS and S3."""

    root: Path
    common_env: dict[str, str]
    nats: RunningNats | None = None
    ports: dict[str, dict[str, int]] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    token: str = ADMIN_TOKEN

    def port(self, service: str, listener: str = "mgmt_port") -> int:
        return self.ports[service][listener]

    def api(self, service: str) -> str:
        return f"http://127.0.0.1:{self.port(service)}"

    def env_for(self, spec: ServiceSpec) -> dict[str, str]:
        env = dict(self.common_env)
        if self.nats is not None:
            env.update(self.nats.service_env(spec.name))
        for key, port in self.ports[spec.name].items():
            env[spec.env_prefix + key.upper()] = str(port)
        return env

    def start_service(self, spec: ServiceSpec) -> None:
        self.procs[spec.name] = embedded.start(
            [sys.executable, "-m", spec.module], self.root / f"{spec.name}.log", self.env_for(spec))

    def wait_ready(self, name: str, timeout: float = 60) -> None:
        url = self.api(name) + "/readyz"

        def ready() -> bool:
            with urllib.request.urlopen(url, timeout=1) as r:
                return bool(r.status == 200)

        try:
            embedded.wait_until(ready, timeout, name, self.procs[name])
        except Exception as exc:
            raise RuntimeError(f"{exc}\n--- {name}.log ---\n{self.log(name)[-4000:]}") from exc

    def log(self, name: str) -> str:
        p = self.root / f"{name}.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()


def start_platform(root: Path, nats: RunningNats | str, s3_endpoint: str, *,
                   extra_env: dict[str, str] | None = None,
                   services: tuple[ServiceSpec, ...] = SERVICES) -> Platform:
    from postbus.kit.tls import self_signed

    root.mkdir(parents=True, exist_ok=True)
    cert, key = root / "tls.crt", root / "tls.key"
    self_signed(cert, key)
    nats_url = nats if isinstance(nats, str) else nats.url
    env = {
        "POSTBUS_NATS_URL": nats_url,
        "POSTBUS_S3_ENDPOINT": s3_endpoint,
        "POSTBUS_S3_BUCKET": "e2e-" + uuid.uuid4().hex[:10],
        "POSTBUS_DATABASE_URL": f"sqlite:///{root / 'store.db'}",
        "POSTBUS_ADMIN_TOKEN": ADMIN_TOKEN,
        "POSTBUS_TLS_CERT": str(cert),
        "POSTBUS_TLS_KEY": str(key),
        "POSTBUS_LOG_LEVEL": os.environ.get("POSTBUS_TEST_LOG_LEVEL", "INFO"),
        **(extra_env or {}),
    }
    plat = Platform(root, env, None if isinstance(nats, str) else nats)
    for spec in services:
        plat.ports[spec.name] = {"mgmt_port": embedded.free_port(),
                                 **{k: embedded.free_port() for k in spec.listeners}}
    try:
        for spec in services:
            plat.start_service(spec)
        for spec in services:
            plat.wait_ready(spec.name)
    except BaseException:
        plat.stop()
        raise
    return plat


@pytest.fixture
def platform(nats_server: RunningNats, s3_server: RunningS3, tmp_path: Path) -> Iterator[Platform]:
    plat = start_platform(tmp_path / "platform", nats_server, s3_server.endpoint)
    yield plat
    plat.stop()
    s3_server.drop_bucket(plat.common_env["POSTBUS_S3_BUCKET"])


def wait_for(pred: Callable[[], object], timeout: float = 10.0, interval: float = 0.05) -> None:
    """Poll a condition in a test (a real system settles asynchronously)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last: {last!r})")
