"""Pure decisions of smtp-ingress: relay policy, sender rights, limits, queue ids,
the Received header. Values in, values out; no I/O, no asyncio.
"""

from __future__ import annotations

import os
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from email.utils import format_datetime

# network rules have one home (kit.net); re-exported for the server (`x as x`: explicit)
from postbus.kit.net import ip_in as ip_in
from postbus.kit.net import literal_is_public
from postbus.kit.net import parse_networks as parse_networks
from postbus.proto.directory import ResolveReply
from postbus.protocols.smtp import Path
from postbus.protocols.smtp_replies import (
    R250_RCPT_OK,
    R421_BUSY,
    R421_RATE,
    R421_TOO_MANY_CONN,
    R451_DIRECTORY,
    R452_MAILBOX_FULL,
    R550_DISABLED,
    R550_LITERAL_DENIED,
    R550_NO_SUCH_USER,
    R554_RELAY_DENIED,
)


# ---------------------------------------------------------------- in-flow delay
def in_flow_delay(backlog: int, *, threshold: int, per_message_s: float, max_s: float) -> float:
    """Seconds a new transaction waits before its MAIL FROM is answered, when ``backlog``
    accepted messages still wait for delivery: none up to ``threshold``, then in proportion
    to the excess, at most ``max_s`` (Postfix's in_flow_delay, made proportional so intake
    settles at the delivery rate instead of stopping and starting)."""
    if threshold <= 0 or backlog <= threshold:
        return 0.0
    return min(max_s, (backlog - threshold) * per_message_s)


# ---------------------------------------------------------------- recipients
@dataclass(frozen=True)
class Accept:
    reply: str = R250_RCPT_OK


@dataclass(frozen=True)
class Refuse:
    reply: str
    reason: str


Decision = Accept | Refuse


def recipient_needs_lookup(path: Path, *, may_relay: bool, null_sender: bool = False,
                           private_literals: bool = False) -> Refuse | None:
    """Before asking the directory: refuse the open-relay tricks from anyone who may not relay
    (percent hack, bang paths, source routes, quoted or doubled local parts); and from those
    who may, an address literal that is not a public address (a way into the cluster:
    [127.0.0.1], [169.254.169.254], private ranges) unless the operator allows it."""
    if path.relay_trick and not may_relay:
        return Refuse(R554_RELAY_DENIED, "relay_trick")
    if not private_literals and not literal_is_public(path.domain):
        return Refuse(R550_LITERAL_DENIED, "private_literal")
    return None


def null_sender_may_relay(mail_from: str, reply: ResolveReply) -> bool:
    """The null reverse-path is for bounces, which only the platform itself sends: a client
    may not relay one to a remote domain (backscatter by proxy), local delivery is fine."""
    return mail_from != "" or reply.status != "remote"


def recipient_decision(reply: ResolveReply, *, may_relay: bool) -> Decision:
    """What to answer a RCPT once the directory has spoken (ARCHITECTURE.md "Security")."""
    match reply.status:
        case "local" if reply.accounts and all(a.full for a in reply.accounts):
            return Refuse(R452_MAILBOX_FULL, "over_quota")  # now, not a bounce later
        case "local":
            return Accept() if reply.accounts else Refuse(R550_NO_SUCH_USER, "unknown_user")
        case "unknown":
            return Refuse(R550_NO_SUCH_USER, "unknown_user")
        case "disabled":
            return Refuse(R550_DISABLED, "disabled")
        case "remote":
            return Accept() if may_relay else Refuse(R554_RELAY_DENIED, "relay_denied")
    return Refuse(R451_DIRECTORY, "directory")  # pragma: no cover - Literal exhausted


def may_relay(*, authenticated: bool, trusted: bool) -> bool:
    return authenticated or trusted


def sender_allowed(mail_from: str, send_as: list[str]) -> bool:
    """An authenticated user may use only its own addresses (and the null sender for
    bounces it generates). Domain part compared case-insensitively, local part exactly
    as the directory lists it but case-insensitively, as the directory canonicalises."""
    if mail_from == "":
        return True
    return mail_from.lower() in {a.lower() for a in send_as}


# ---------------------------------------------------------------- networks
# ---------------------------------------------------------------- connection limits
@dataclass(frozen=True)
class ConnLimits:
    max_connections: int
    per_ip: int
    rate_per_minute: int


def connection_decision(*, total: int, from_ip: int, recent: int, limits: ConnLimits) -> str | None:
    """None to accept, else the 421 reply (RFC 5321 §3.8: 421 and close)."""
    if limits.max_connections and total >= limits.max_connections:
        return R421_BUSY
    if limits.per_ip and from_ip >= limits.per_ip:
        return R421_TOO_MANY_CONN
    if limits.rate_per_minute and recent >= limits.rate_per_minute:
        return R421_RATE
    return None


class RateWindow:
    """Events per key in a sliding 60 s window (one replica's view; the hot path)."""

    def __init__(self, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self.clock = clock
        self._events: dict[str, deque[float]] = {}

    def hit(self, key: str) -> int:
        """Record one event; returns how many happened in the window before it."""
        now = self.clock()
        q = self._events.setdefault(key, deque())
        while q and q[0] <= now - self.window_s:
            q.popleft()
        n = len(q)
        q.append(now)
        if len(self._events) > 100_000:
            self._gc(now)
        return n

    def counts(self) -> dict[str, int]:
        """Events per key inside the window now (drops keys that fell out of it)."""
        now = self.clock()
        self._gc(now)
        cut = now - self.window_s
        return {k: sum(1 for t in q if t > cut) for k, q in self._events.items()}

    def _gc(self, now: float) -> None:
        for k in [k for k, q in self._events.items() if not q or q[-1] <= now - self.window_s]:
            del self._events[k]


def load_snapshot(open_per_ip: dict[str, int], recent_per_ip: dict[str, int],
                  top: int = 2000) -> dict[str, list[int]]:
    """What one replica tells the others: ``ip -> [open connections, connections in the
    last minute]`` for its busiest ``top`` clients (bounded under a wide attack)."""
    keys = set(open_per_ip) | set(recent_per_ip)
    rows = {k: [open_per_ip.get(k, 0), recent_per_ip.get(k, 0)] for k in keys}
    busiest = sorted(rows, key=lambda k: rows[k][0] + rows[k][1], reverse=True)[:top]
    return {k: rows[k] for k in busiest if rows[k][0] or rows[k][1]}


def merge_snapshots(snapshots: list[dict[str, list[int]]]) -> dict[str, tuple[int, int]]:
    """Sum the other replicas' snapshots per client IP."""
    out: dict[str, tuple[int, int]] = {}
    for snap in snapshots:
        for ip, (conns, recent) in snap.items():
            c, r = out.get(ip, (0, 0))
            out[ip] = (c + int(conns), r + int(recent))
    return out


def auth_throttled(ip_failures: int, account_failures: int, *, ip_limit: int,
                   account_limit: int) -> bool:
    return bool((ip_limit and ip_failures >= ip_limit)
                or (account_limit and account_failures >= account_limit))


# ---------------------------------------------------------------- queue ids
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def _b32(n: int, width: int) -> str:
    out = []
    for _ in range(width):
        out.append(_CROCKFORD[n & 31])
        n >>= 5
    return "".join(reversed(out))


def new_queue_id(now_ms: int | None = None, rand: bytes | None = None) -> str:
    """17 characters: 9 of milliseconds since 1970 (sortable until year 2527) and 8 of
    randomness (40 bits), Crockford base32, so ids sort by time and do not collide."""
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    r = int.from_bytes(rand if rand is not None else os.urandom(5), "big")
    return _b32(ms, 9) + _b32(r, 8)


# ---------------------------------------------------------------- trace header
def received_header(*, helo: str | None, ip: str, rdns: str | None, hostname: str,
                    esmtp: bool, tls: str | None, auth_user: str | None, utf8: bool,
                    queue_id: str, rcpt: str | None, when: datetime) -> bytes:
    """The Received header (RFC 5321 §4.4) with the protocol named as in RFC 3848/6531
    (ESMTP, ESMTPS, ESMTPA, ESMTPSA, UTF8SMTP...), TLS and authentication as comments."""
    proto = "SMTP" if not esmtp else ("UTF8SMTP" if utf8 else "ESMTP")
    if esmtp:
        proto += ("S" if tls else "") + ("A" if auth_user else "")
    ip_lit = f"IPv6:{ip}" if ":" in ip else ip
    src = f"from {_clean(helo or 'unknown')} ({_clean(rdns) + ' ' if rdns else ''}[{ip_lit}])"
    lines = [f"Received: {src}", f"\tby {hostname} (Postbus) with {proto} id {queue_id}"]
    if tls:
        lines.append(f"\t(using {_clean(tls)})")
    if auth_user:
        lines.append(f"\t(Authenticated sender: {_clean(auth_user)})")
    if rcpt:
        lines.append(f"\tfor <{_clean(rcpt)}>;")
    else:
        lines[-1] += ";"
    lines.append("\t" + format_datetime(when))
    text = "\r\n".join(lines) + "\r\n"
    return text.encode("utf-8", "replace")


_UNSAFE = re.compile(r"[\x00-\x1f\x7f()\\]")


def _clean(s: str) -> str:
    """No CR/LF, parentheses or control characters from the client into our header."""
    return _UNSAFE.sub("?", s[:200])
