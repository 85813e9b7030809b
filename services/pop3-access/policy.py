"""Pure decisions of a POP3 session: what CAPA lists, what UPDATE commits, how long a failed
login waits. Values in, values out; no I/O."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# a session decision; one home in kit.net (`x as x`: an explicit re-export)
from postbus.kit.net import is_loopback as is_loopback
from postbus.proto.store import Pop3CommitRequest

Pop3Policy = Literal["client", "keep", "delete"]

IMPLEMENTATION = "Postbus"


@dataclass(frozen=True)
class CapaContext:
    authenticated: bool
    secure: bool  # TLS active, or loopback, or insecure auth allowed by the operator
    tls_active: bool
    tls_available: bool
    login_delay_s: int
    policy: Pop3Policy = "client"
    expire_days: int | None = None


def expire_value(policy: Pop3Policy, expire_days: int | None) -> str:
    """RFC 2449 §6.7: ``0`` when retrieved mail is not kept, days, or NEVER."""
    if policy == "delete":
        return "0"
    if expire_days is not None:
        return str(max(expire_days, 0))
    return "NEVER"


def capabilities(c: CapaContext) -> list[str]:
    """CAPA lines (RFC 2449 §5). USER and SASL appear only where a login is allowed."""
    caps = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
    if c.authenticated:
        caps.append(f"EXPIRE {expire_value(c.policy, c.expire_days)}")
        caps.append(f"LOGIN-DELAY {c.login_delay_s}")
    else:
        # the retention differs per account: announce the default and that it varies
        caps.append("EXPIRE NEVER USER")
        caps.append(f"LOGIN-DELAY {c.login_delay_s}")
        if c.secure:
            caps.append("USER")
            caps.append("SASL PLAIN")
        if c.tls_available and not c.tls_active:
            caps.append("STLS")
        caps.append("UTF8 USER")  # RFC 6856 §2: UTF-8 user names and passwords accepted
    caps.append(f"IMPLEMENTATION {IMPLEMENTATION}")
    return caps


def commit_request(*, account_id: int, mailbox_id: int, policy: Pop3Policy,
                   deleted: set[int], retrieved: set[int], expire_days: int | None = None
                   ) -> Pop3CommitRequest | None:
    """What the UPDATE state applies (RFC 1939 §6), by the account's POP3 policy:

    - ``client``: messages the client marked with DELE are expunged;
    - ``keep``: they are hidden from later POP3 sessions and stay in the mailbox for IMAP;
    - ``delete``: every message the client DELEd or retrieved in full is expunged.

    A retention of 0 days (``EXPIRE 0``: retrieved mail is not kept) acts as ``delete``;
    longer ones are the store's to enforce. Retrieved messages are flagged \\Seen. None
    when there is nothing to apply.
    """
    mode: Literal["delete", "keep"]
    if policy == "delete" or expire_days == 0:
        uids, mode = deleted | retrieved, "delete"
    elif policy == "keep":
        uids, mode = set(deleted), "keep"
    else:
        uids, mode = set(deleted), "delete"
    if not uids and not retrieved:
        return None
    return Pop3CommitRequest(account_id=account_id, mailbox_id=mailbox_id,
                             delete_uids=sorted(uids), mode=mode,
                             seen_uids=sorted(retrieved if mode == "keep" else retrieved - uids))


def failure_delay(recent_failures: int, base_s: float, max_s: float) -> float:
    """Seconds to wait before answering a failed login: grows with recent failures."""
    return min(base_s * max(recent_failures, 1), max_s)
