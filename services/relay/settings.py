"""relay settings: environment variables ``POSTBUS_RELAY_<NAME>``.

Built once in ``__main__``; tests build ``Settings(...)`` directly.
"""

from __future__ import annotations

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from postbus.kit.settings import CommonSettings
from postbus.relay import policy


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="POSTBUS_RELAY_", extra="ignore")

    common: CommonSettings = Field(default_factory=CommonSettings)

    mgmt_port: int = 8104  # postbus.kit.topology

    # EHLO name and Reporting-MTA of DSNs; default: common.hostname
    hostname: str | None = None

    # destinations: "example.net=127.0.0.1:2626,.sub.example=host,*=smarthost:587";
    # an entry overrides DNS for its domain, "*" for every domain (a smart host)
    transport_map: str = ""
    smtp_port: int = 25  # port of MX hosts found in DNS, and of map entries without one

    # DNS (RFC 5321 §5.1); empty nameservers: /etc/resolv.conf
    dns_nameservers: list[str] = Field(default_factory=list)
    dns_port: int = 53
    dns_timeout_s: float = 3.0
    max_mx_hosts: int = 5

    # SMTP client
    connect_timeout_s: float = 30.0
    command_timeout_s: float = 60.0  # per command; RFC 5321 §4.5.3.2 asks for minutes
    data_timeout_s: float = 600.0  # for the body and its final reply
    starttls: bool = True  # opportunistic STARTTLS when offered
    tls_required: bool = False  # refuse to send in clear text (defer instead)
    tls_verify: bool = False  # verify the server certificate and name; a failure defers
    # connection cache: a session is kept this long after a transaction for the next
    # message to the same host (0 = off), and reused at most this many times
    connection_cache_s: float = 2.0
    connection_reuse_max: int = 100
    pipelining: bool = True  # MAIL and RCPTs in one write when offered (RFC 2920)
    destination_concurrency: int = 10  # sessions at once to one destination; 0 = no limit

    # queue
    concurrency: int = 20  # messages delivered at once by this replica
    ack_wait_s: float = 60.0
    max_pending: int = 100_000  # messages in flight or waiting for a retry, per replica group
    lease_s: float = 300.0  # a worker that died mid-attempt blocks a message this long
    retry_schedule: str = "1m,5m,15m,30m,1h,2h,4h"  # after each failed attempt; last repeats
    max_age_s: float = 5 * 86400.0  # queue lifetime, then bounce (RFC 5321 §4.5.4.1)
    delay_dsn_after_s: float = 4 * 3600.0  # one "delayed" DSN when NOTIFY=DELAY
    queue_bucket: str = "relay_queue"
    bounce_bucket: str = "relay_bounces"
    queue_gauge_interval_s: float = 15.0

    # bounces of failures reported by other services (mail.events.v1.*.failed)
    bounce_foreign_failures: bool = True

    @field_validator("retry_schedule")
    @classmethod
    def _schedule(cls, v: str) -> str:
        policy.parse_schedule(v)
        return v

    @field_validator("transport_map")
    @classmethod
    def _tmap(cls, v: str) -> str:
        policy.parse_transport_map(v)
        return v

    @property
    def ehlo_name(self) -> str:
        return self.hostname or self.common.hostname

    @property
    def schedule(self) -> tuple[float, ...]:
        return policy.parse_schedule(self.retry_schedule)

    @property
    def transports(self) -> dict[str, policy.Hop]:
        return policy.parse_transport_map(self.transport_map, default_port=self.smtp_port)
