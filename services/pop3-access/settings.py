"""Settings of pop3-access: env prefix ``POSTBUS_POP3_ACCESS_``. Built once, in ``__main__``."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from postbus.kit.settings import CommonSettings


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="POSTBUS_POP3_ACCESS_", extra="ignore")

    common: CommonSettings = Field(default_factory=CommonSettings)

    mgmt_port: int = 8106
    pop3_port: int = 2110
    pop3s_port: int = 2995  # implicit TLS; not opened without a certificate
    # where the POP3 listeners bind; None: the common bind_host
    listen_host: str | None = None

    # RFC 1939 §3: an inactivity autologout timer of at least 10 minutes
    idle_timeout_s: float = 600.0
    # hard bound on one connection, however busy
    session_timeout_s: float = 4 * 3600.0
    # a connection is closed after this many bad or refused commands, or commands in all
    max_bad_commands: int = 20
    max_commands: int = 200_000
    # concurrent connections from one client address on this replica
    max_connections_per_ip: int = 50

    # maildrop lock (one session per maildrop across replicas), JetStream KV with expiry
    lock_bucket: str = "pop3-locks"
    lock_ttl_s: float = 60.0  # refreshed every third of it while the session lives

    # failed-login throttling: counters per client IP and per account name, in KV
    auth_bucket: str = "pop3-auth-failures"
    auth_failure_window_s: float = 900.0
    auth_failure_delay_s: float = 1.0  # delay after a failure, times recent failures
    auth_failure_delay_max_s: float = 8.0
    max_auth_failures_ip: int = 30
    max_auth_failures_account: int = 10
    max_auth_failures_session: int = 3  # then the connection is closed

    # RFC 2449 §6.5 LOGIN-DELAY: minimum seconds between two logins of one account (0: none)
    login_delay_s: int = 0
    login_delay_bucket: str = "pop3-login-delay"

    # plaintext USER/PASS and AUTH before TLS from non-loopback clients (ARCHITECTURE.md
    # "Security baseline": off)
    allow_insecure_auth: bool = False
    # loopback connections count as secure, as Dovecot does; turn off where a sidecar or
    # proxy on the same host connects for remote clients
    loopback_is_secure: bool = True
    # HAProxy PROXY v1/v2 header first on every connection (behind a load balancer that
    # sends it): only for ports the balancer alone can reach; 995 takes it before TLS
    proxy_protocol: bool = False
    proxy_protocol_timeout_s: float = 5.0

    # message bodies fetched ahead of the client's RETR, and the store RPC timeout
    prefetch: int = 16
    # blobs kept ready to send (CRLF, byte-stuffed) on top of the kit's raw blob LRU
    prepared_cache_mb: int = 128
    store_timeout_s: float = 15.0
