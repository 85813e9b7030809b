"""mime-processor settings: environment variables ``POSTBUS_MIME_PROCESSOR_<NAME>``.

Built once in ``__main__``; tests build ``Settings(...)`` directly.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from postbus.kit.settings import CommonSettings


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="POSTBUS_MIME_PROCESSOR_", extra="ignore")

    common: CommonSettings = Field(default_factory=CommonSettings)

    mgmt_port: int = 8102  # postbus.kit.topology

    # work queue
    # messages processed at once by this replica: each waits ~20-70 ms on S3, DNS and
    # JetStream acks, so 16 capped a replica near 230 messages/s
    concurrency: int = 64
    ack_wait_s: float = 60.0
    # a claim-check blob that stays missing: give up after this many deliveries and
    # report every recipient failed (relay bounces), instead of retrying forever
    missing_blob_attempts: int = 20

    # SPF / DKIM / DMARC for mail from the MX listener (RFC 7208, 6376, 7489, 8601)
    auth_checks: bool = True
    authserv_id: str | None = None  # the Authentication-Results id; default: common.hostname
    dns_nameservers: list[str] = Field(default_factory=list)  # empty: /etc/resolv.conf
    dns_port: int = 53
    dns_timeout_s: float = 1.0  # one lookup
    auth_budget_s: float = 3.0  # all lookups of one message together
    auth_threads: int = 16

    # summaries of bodies larger than this are computed in a thread, off the event loop
    summarize_inline_max: int = 512 * 1024

    recent_failures: int = 200  # kept for the management API
