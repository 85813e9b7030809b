"""Settings shared by every service: infrastructure endpoints and credentials.

Every value is an environment variable with the prefix ``POSTBUS_``. A service's own
settings class nests ``CommonSettings`` as ``common`` and reads
``POSTBUS_<SERVICE>_<NAME>`` for its own fields. Build settings once, in ``__main__``.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="POSTBUS_", extra="ignore")

    # NATS
    nats_url: str = "nats://127.0.0.1:4333"
    nats_user: str | None = None
    nats_password: str | None = None
    # the CA that signed NATS's certificate, for tls:// URLs (None: the system's CAs)
    nats_tls_ca: Path | None = None
    # relay to address literals of non-public addresses ([127.0.0.1], [10.0.0.5],
    # [169.254.169.254]): off, it is a way into the cluster for anyone who may relay
    allow_private_address_literals: bool = False
    # /docs and /redoc on the management APIs (their scripts come from a CDN); Kubernetes
    # turns them off, /openapi.json stays
    api_docs: bool = True
    stream_replicas: int = 1

    # S3
    s3_endpoint: str = "http://127.0.0.1:8333"
    s3_access_key: str = "postbus"
    s3_secret_key: str = "postbus-secret"
    s3_bucket: str = "postbus"
    s3_region: str = "us-east-1"
    blob_cache_mb: int = 256
    # read every blob back after writing it and compare its hash before answering (an
    # S3 that acknowledges writes it has not made durable is caught; costs one GET per PUT)
    blob_verify_after_write: bool = False

    # SQL (only mailbox-store uses it)
    database_url: str = "sqlite:///.run/postbus.db"

    # Management APIs
    admin_token: str | None = None
    admin_token_file: Path = Path(".run/admin-token")
    bind_host: str = "127.0.0.1"

    # SMTP -> NATS claim check (ARCHITECTURE.md "Contracts")
    inline_threshold: int = 128 * 1024
    # a message body of at most this many bytes is kept in the store's blob row instead
    # of in S3 (no PUT to deliver or APPEND it, no GET to read it; ADR 0014); 0: never.
    # 32 KiB holds 87 % of imaptest's stress mailbox (16 KiB: 48 %)
    inline_body_max: int = Field(default=32 * 1024, ge=0, le=64 * 1024)

    # TLS for every listener that offers it (STARTTLS and implicit TLS);
    # `postbus run` generates a self-signed pair into .run/ when none is given
    tls_cert: Path | None = None
    tls_key: Path | None = None

    # Logging
    log_level: str = "INFO"
    log_format: str = Field(default="console", pattern="^(console|json)$")

    # Host name used in greetings, Received headers and DSNs
    hostname: str = "localhost"

    # Networks (CIDR) whose mail may be relayed to remote recipients without AUTH. Empty by
    # default; loopback is not trusted (ARCHITECTURE.md "Security baseline"). smtp-ingress
    # decides at RCPT and mime-processor checks again, so both read this one variable.
    # Environment: comma-separated ("10.0.0.0/8,192.0.2.7") or a JSON list.
    trusted_networks: Annotated[list[str], NoDecode] = Field(default_factory=list)

    @field_validator("trusted_networks", mode="before")
    @classmethod
    def _split_networks(cls, v: object) -> object:
        if isinstance(v, str):
            v = v.strip()
            if v.startswith("["):
                v = json.loads(v)
            else:
                v = [x.strip() for x in v.split(",") if x.strip()]
        if isinstance(v, list):
            for item in v:  # a typo must stop the service, not silently trust nobody
                ipaddress.ip_network(str(item).strip(), strict=False)
        return v

    def resolved_admin_token(self) -> str | None:
        """The admin token from the environment, else from the token file, else None."""
        if self.admin_token:
            return self.admin_token
        try:
            token = self.admin_token_file.read_text().strip()
        except OSError:
            return None
        return token or None


def ensure_admin_token(path: Path) -> str:
    """Read the token in ``path``, creating a random one (mode 0600) when absent."""
    try:
        token = path.read_text().strip()
        if token:
            return token
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    write_private(path, (token + "\n").encode())
    return token


def write_private(path: Path, data: bytes) -> None:
    """Write a secret file readable by its owner only from the first byte (created 0600,
    not chmod-ed after: there is no moment when another user could open it)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an existing file keeps its old mode through O_CREAT
        os.write(fd, data)
    finally:
        os.close(fd)
