"""The keys of the shared counters (kit.counters): the text that names what is counted, and its
one encoding as a NATS KV key. Pure, so a session can spell a key without importing the bus."""

from __future__ import annotations

import base64
import hashlib

__all__ = ["kv_key", "ip_key", "account_key"]

_MAX_PLAIN = 192  # octets of text kept readable in a key; longer text is hashed


def ip_key(ip: str) -> str:
    """Failed logins from one client address (smtp-ingress and pop3-access throttles)."""
    return "ip:" + ip


def account_key(name: str) -> str:
    """Failed logins for one account name as the client typed it, case folded (the same
    throttles; the directory's own throttle keys the canonical address instead)."""
    return "acct:" + name.lower()


def kv_key(text: str) -> str:
    """Any text as a valid KV key (``[-/_=.a-zA-Z0-9]``: IPv6 colons, '@', '|', CIDR
    slashes): base64url without padding, or ``=`` and its SHA-256 when the text is long
    (base64url without padding never holds a ``=``, so the two cannot collide)."""
    raw = text.encode("utf-8", "surrogateescape")
    if len(raw) > _MAX_PLAIN:
        return "=" + hashlib.sha256(raw).hexdigest()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=") or "="
