"""POP3 retention: an account with ``pop3_expire_days`` announces ``EXPIRE n`` (RFC 2449
§6.7), and messages its POP3 clients retrieved in full are expunged from the INBOX n days
after their first retrieval. Messages never retrieved over POP3 are kept.
"""

from __future__ import annotations

from datetime import UTC, datetime

from postbus.kit.bus import Bus
from postbus.kit.logging import get_logger
from postbus.kit.metrics import counter
from postbus.mailbox_store.db import run_periodically
from postbus.mailbox_store.delivery import publish_change
from postbus.mailbox_store.repository import Repository

log = get_logger(__name__)
EXPIRED = counter("postbus_store_pop3_expired_total",
                  "Messages expunged by the POP3 retention period (EXPIRE)")
EXPIRE_LOCK_KEY = 0x706F_7374_6578  # one replica expires at a time


async def expire_once(repo: Repository, bus: Bus, now: datetime | None = None) -> int:
    """One pass; IMAP sessions hear of the expunges like of any other. Returns the count."""
    changes = await repo.expire_pop3(now or datetime.now(UTC))
    for change in changes:
        await publish_change(bus, change)
    n = sum(len(c.expunged) for c in changes)
    if n:
        EXPIRED.inc(n)
        log.info("pop3 retention expunged messages", count=n, accounts=len(changes))
    return n


async def run_forever(repo: Repository, bus: Bus, interval_s: float) -> None:
    await run_periodically(repo.engine, EXPIRE_LOCK_KEY, interval_s,
                           lambda: expire_once(repo, bus), "pop3 retention")
