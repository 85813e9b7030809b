"""imap-access settings: environment variables POSTBUS_IMAP_ACCESS_<NAME>."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from postbus.kit.settings import CommonSettings
from postbus.kit.topology import BY_NAME
from postbus.protocols.imap_parser import PREAUTH, Limits

_SPEC = BY_NAME["imap-access"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="POSTBUS_IMAP_ACCESS_", extra="ignore")

    common: CommonSettings = Field(default_factory=CommonSettings)
    mgmt_port: int = _SPEC.mgmt_port
    imap_port: int = _SPEC.listeners["imap_port"]
    imaps_port: int = _SPEC.listeners["imaps_port"]

    # RFC 7162 §4: at least 8192 octets per line; Dovecot's default is 64 KiB
    max_line: int = 64 * 1024
    # largest APPEND literal (message size limit)
    max_literal: int = 50 * 1024 * 1024
    # every line and literal of one command together, once logged in
    max_command: int = 51 * 1024 * 1024
    # before login (LOGIN, AUTHENTICATE, ID, STARTTLS): far less, and input past these
    # bounds closes the connection instead of being read and skipped
    preauth_max_line: int = PREAUTH.max_line
    preauth_max_literal: int = PREAUTH.max_literal
    preauth_max_command: int = PREAUTH.max_command
    # ID (RFC 2971 §3.3) may run to about 32 KiB: past preauth_max_line its tail is read
    # and dropped, up to this length of the whole line
    preauth_max_id_line: int = PREAUTH.max_id_line
    # RFC 3501 §5.4: the autologout timer is at least 30 minutes (also for IDLE, RFC 2177)
    idle_timeout_s: float = 30 * 60
    # before login a client gets less patience (Dovecot: 60 s for the greeting phase) ...
    preauth_timeout_s: float = 60
    # ... and the whole unauthenticated phase ends at this deadline, however chatty the
    # client (Dovecot's imap-login gives 3 minutes)
    preauth_deadline_s: float = 180
    # an upper bound on one connection's life (ARCHITECTURE.md: parsers bound session time)
    max_session_s: float = 24 * 3600
    auth_fail_delay_s: float = 2.0
    max_auth_failures: int = 3  # per session, then BYE
    # failed logins from one address, all its sessions together, within the window; then
    # its logins are refused without a password check (0 = no limit). The directory also
    # throttles per account and address across replicas.
    max_auth_failures_ip: int = 30
    auth_failure_window_s: float = 900.0
    max_commands: int = 1_000_000  # per session
    max_sessions: int = 10_000
    # open connections from one client address (as POP3 and SMTP have; 0 = no cap). Behind
    # a proxy every client shares its address: use PROXY protocol or raise this.
    max_connections_per_ip: int = 50
    # loopback connections count as secure (no LOGINDISABLED), as Dovecot does; turn off
    # where a sidecar or proxy on the same host connects for remote clients
    loopback_is_secure: bool = True
    # HAProxy PROXY v1/v2 header first on every connection (behind a load balancer that
    # sends it, so per-address limits see the client): only for ports the balancer alone
    # can reach. With it, 993 takes the header before the TLS handshake.
    proxy_protocol: bool = False
    proxy_protocol_timeout_s: float = 5.0
    # SELECT pages, FETCH metadata, STATUS, LIST and an EXPUNGE with nothing to remove read
    # from the metadata database (POSTBUS_DATABASE_URL) on a read-only connection instead of
    # asking mailbox-store over NATS (ADR 0012); where the database cannot be opened they go
    # to the store as before. Off by default: it moves a quarter of the store's CPU per IMAP
    # command into imap-access and saves a fifth of NATS's, but the sum is the same, so on
    # one machine it gains nothing (bench-imap-stress, 2 cores). Turn it on where
    # mailbox-store is the bound and imap-access runs as several replicas.
    sql_reads: bool = False
    sql_pool_size: int = 8  # sessions reading at once; beyond 2x this they wait
    fetch_batch: int = 250  # messages per STORE_FETCH request
    fetch_bytes_in_flight: int = 32 * 1024 * 1024  # bodies one FETCH holds in memory at once
    # immutable message metadata kept for FETCH (metacache.py), all sessions together
    meta_cache_mb: int = 64

    def limits(self, authenticated: bool) -> Limits:
        """What the receiver accepts in one command, before or after login."""
        if authenticated:
            return Limits(self.max_line, self.max_literal, self.max_command)
        return Limits(self.preauth_max_line, self.preauth_max_literal,
                      self.preauth_max_command, skip_oversized=False,
                      max_id_line=self.preauth_max_id_line)
