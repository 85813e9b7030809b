"""Settings of mailbox-store (env prefix POSTBUS_MAILBOX_STORE_); built once in __main__."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from postbus.kit.settings import CommonSettings
from postbus.kit.topology import BY_NAME


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="POSTBUS_MAILBOX_STORE_", extra="ignore")

    common: CommonSettings = Field(default_factory=CommonSettings)
    mgmt_port: int = BY_NAME["mailbox-store"].mgmt_port

    # SQL
    db_pool_size: int = 20
    # SQLite PRAGMA synchronous: FULL fsyncs every commit (a delivery is acked only after it)
    sqlite_synchronous: str = "FULL"

    # local delivery (mail.deliver.local)
    # concurrent deliveries in flight: they are group-committed, so more is faster
    delivery_concurrency: int = 128
    # a delivery taken by a replica that died is handed to another after this long
    delivery_ack_wait_s: float = 60.0
    # over quota / disabled: "deferred" events and retries, then "failed" (a bounce)
    delivery_max_attempts: int = 12
    delivery_retry_base_s: float = 60.0
    delivery_retry_max_s: float = 3600.0
    # HEAD the blob in S3 before storing a delivery (it should always be there)
    verify_blob_on_delivery: bool = False

    # blob garbage collection: blobs unreferenced for longer than the grace period, and
    # S3 objects under blobs/ with no row at all (claim-check leftovers, outbound-only
    # bodies). The grace must exceed the longest time a body can wait in a queue
    # (relay retries for days), hence a week.
    blob_gc_interval_s: float = 3600.0
    blob_gc_grace_s: float = 7 * 86400.0
    # idempotency rows of local deliveries: kept longer than any redelivery can take
    deliveries_keep_s: float = 30 * 86400.0
    # how often messages past an account's POP3 retention (pop3_expire_days) are expunged
    pop3_expire_interval_s: float = 3600.0

    # STORE_SEARCH: blobs read at once for BODY/TEXT keys ...
    search_blob_concurrency: int = 16
    # ... and the message bytes every search together holds in memory
    search_bytes_in_flight: int = 64 * 1024 * 1024
    # characters of one message's text a search looks at (the rest of a huge text is not)
    search_text_per_message: int = 4 * 1024 * 1024
    # one search request (a page) may decode this much text and take this long, else it
    # is refused with NO [LIMIT] (the RPC itself times out at 30 s)
    search_text_budget: int = 256 * 1024 * 1024
    search_time_s: float = 20.0

    # directory (directory.* on NATS)
    # alice+tag@example.test delivers to alice; empty turns sub-addressing off
    subaddress_separator: str = "+"
    # resolve answers kept per replica; 0 = always ask the database. A change made through
    # another replica is seen after at most this long (the local replica drops it at once);
    # smtp-ingress keeps its answers as long (POSTBUS_SMTP_INGRESS_RESOLVE_CACHE_TTL_S).
    resolve_cache_ttl_s: float = 5.0
    # outcomes of password checks kept in memory, as Dovecot's auth_cache: a success for
    # this long, a failure for this long (a changed password never hits an entry); 0 = off
    auth_cache_ttl_s: float = 3600.0
    auth_cache_negative_ttl_s: float = 300.0
    auth_cache_size: int = 100_000
    # failed logins per account within the window before further attempts are refused
    # (shared by every replica through JetStream KV); 0 turns the throttle off
    login_max_failures: int = 10
    login_window_s: float = 900.0
