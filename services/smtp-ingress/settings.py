"""smtp-ingress settings: environment variables ``POSTBUS_SMTP_INGRESS_<NAME>``.

Built once in ``__main__``; tests build ``Settings(...)`` directly.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from postbus.kit.settings import CommonSettings


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="POSTBUS_SMTP_INGRESS_", extra="ignore")

    common: CommonSettings = Field(default_factory=CommonSettings)

    # listeners (names as in postbus.kit.topology); 0 = pick a free port, -1 = off
    mgmt_port: int = 8101
    smtp_port: int = 2525
    submission_port: int = 2587
    smtps_port: int = 2465
    listen_host: str | None = None  # default: common.bind_host

    # PROXY protocol v1/v2 in front of every listener (HAProxy, a cloud load balancer)
    proxy_protocol: bool = False
    proxy_protocol_timeout_s: float = 5.0

    # message limits
    max_message_size: int = 25 * 1024 * 1024  # SIZE (RFC 1870), 552 5.3.4
    # refuse MAIL FROM in a hosted domain from clients that are neither authenticated nor
    # trusted (mail from our own domains comes through submission); off by default, as
    # forwarders and mailing lists legitimately send with our users' addresses
    reject_unauthenticated_local_senders: bool = False
    # message bytes (DATA and BDAT) all sessions of a replica hold in memory at once: each
    # body up to the inline threshold (common.inline_threshold); past the threshold, or
    # when this is used up, a body goes to a file in spool_dir (issue 8.6)
    data_bytes_in_flight: int = 96 * 1024 * 1024
    # where bodies are spooled while they are read (created at start, 0700, and refused
    # when someone else owns it; the files have no name, so nothing is left behind), and
    # how many bytes all sessions may have there at once; past it a message is read to
    # its end and answered 451 4.3.1. On Kubernetes, a directory inside an emptyDir.
    spool_dir: Path = Field(default_factory=lambda: Path(
        tempfile.gettempdir()) / f"postbus-smtp-ingress-spool-{os.getuid()}")
    spool_max_bytes: int = 1024 * 1024 * 1024
    # spooled bodies uploaded to S3 at once (each streams with about 15 MiB of buffers)
    spool_uploads: int = 2
    max_recipients: int = 100  # RFC 5321 §4.5.3.1.8 asks for at least 100; 452 4.5.3
    max_line_length: int = 998  # RFC 5321 §4.5.3.1.6: 1000 octets with CRLF
    max_command_length: int = 2048  # RFC 5321 §4.5.3.1.4 (512) + ESMTP parameters
    max_commands: int = 1000  # per session
    max_unknown_commands: int = 10  # per session, then 421
    # timeouts (RFC 5321 §4.5.3.2.7: at least 5 minutes idle)
    idle_timeout_s: float = 300.0
    session_timeout_s: float = 1800.0

    # connection limits, summed over replicas through NATS KV (see adapters.KvLoadShare)
    max_connections: int = 2000
    max_connections_per_ip: int = 50
    connection_rate_per_ip: int = 0  # new connections per minute; 0 = no limit (as Postfix)
    # replicas exchange their per-IP counts through NATS KV this often (0 = do not share)
    limits_share_interval_s: float = 1.0

    # AUTH throttling, counted in NATS KV so every replica sees the same numbers
    auth_fail_limit_ip: int = 10
    auth_fail_limit_account: int = 5
    auth_fail_window_s: float = 900.0

    # directory answers cached in this process for a short time (the RCPT hot path)
    resolve_cache_ttl_s: float = 5.0
    resolve_cache_size: int = 10000

    publish_timeout_s: float = 5.0

    # in-flow delay, as Postfix's in_flow_delay: while more accepted messages than this wait
    # for mime-processor and the store (the work queues' depth), each MAIL FROM waits
    # (depth - threshold) * per_message, at most max, so intake follows delivery and the
    # queue, hence the latency from 250 to the mailbox, stays bounded. 0 turns it off.
    # 100: on a quiet machine bench-e2e delivered 191/s at 100, 142/s at 50 and 131/s at 20
    # (the consumers need that much queued work to batch); 20 halves the 250 -> IDLE EXISTS
    # median (97 vs 195 ms) at that cost. Runs on a loaded machine had hidden the difference.
    # 1 ms a message: the depth is read every flow_poll_s, and at 10 ms a depth of 150 held
    # every MAIL FROM for half a second until the next reading, so intake swung between
    # stalled and free: 292 delivered/s against 502 with no delay; at 1 ms 445-465/s, the
    # 250 -> IDLE EXISTS p99 205-258 ms (no delay: 335) (docs/benchmarks.md)
    flow_backlog_threshold: int = 100
    flow_delay_per_message_s: float = 0.001
    flow_delay_max_s: float = 1.0
    flow_poll_s: float = 0.25

    # forward-confirmed reverse DNS of the client for the Received header and ClientInfo
    # (system resolver, off the command path; off by default: one PTR + A lookup per connection)
    reverse_dns: bool = False
    reverse_dns_timeout_s: float = 3.0

    @property
    def host(self) -> str:
        return self.listen_host or self.common.bind_host
