"""Relay decisions as pure functions: transport map, MX ordering (RFC 5321 §5.1, RFC 7505),
retry schedule, reply classification, bounce suppression (RFC 3461). No I/O.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal


# ---------------------------------------------------------------- transport map
@dataclass(frozen=True)
class Hop:
    """One host to try, in order; ``host`` may be a name or an IP literal."""

    host: str
    port: int
    preference: int = 0
    name: str | None = None  # the MX name a resolved address belongs to (TLS SNI, Remote-MTA)

    @property
    def label(self) -> str:
        return self.name or self.host


def parse_transport_map(text: str, *, default_port: int = 25) -> dict[str, Hop]:
    """``"example.net=127.0.0.1:2626,*=[::1]:2727"`` -> {domain: Hop}; domains lower-case.

    ``*`` is the wildcard for every other domain; ``.example.net`` matches sub-domains.
    Raises ValueError on a malformed entry (a settings error should stop start-up).
    """
    out: dict[str, Hop] = {}
    for raw in re.split(r"[,\s]+", text.strip()):
        if not raw:
            continue
        domain, sep, target = raw.partition("=")
        if not sep or not domain or not target:
            raise ValueError(f"transport map entry {raw!r}: expected domain=host[:port]")
        out[domain.strip().lower()] = parse_hostport(target.strip(), default_port)
    return out


def parse_hostport(target: str, default_port: int) -> Hop:
    m = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?", target)
    if m:
        return Hop(m.group(1), int(m.group(2) or default_port))
    host, sep, port = target.rpartition(":")
    if sep and port.isdigit() and host and ":" not in host:
        return Hop(host, int(port))
    if not target or target.count(":") == 1:
        raise ValueError(f"bad host:port {target!r}")
    return Hop(target, default_port)


def transport_for(domain: str, table: dict[str, Hop]) -> Hop | None:
    """The override for ``domain``: exact, then parent ``.suffix`` entries, then ``*``."""
    d = domain.lower().rstrip(".")
    if d in table:
        return table[d]
    parts = d.split(".")
    for i in range(1, len(parts)):
        hop = table.get("." + ".".join(parts[i:]))
        if hop is not None:
            return hop
    return table.get("*")


# ---------------------------------------------------------------- MX (RFC 5321 §5.1)
@dataclass(frozen=True)
class MxRecord:
    preference: int
    exchange: str  # without the trailing dot; "" for the root (null MX)


@dataclass(frozen=True)
class NullMx:
    """RFC 7505: the domain accepts no mail."""


def order_mx(records: Sequence[MxRecord], rng: random.Random | None = None) -> list[MxRecord] | NullMx:
    """Lowest preference first, hosts of equal preference shuffled (RFC 5321 §5.1).

    A single MX whose exchange is the root is a null MX (RFC 7505 §3); an empty list means
    there was no MX record and the caller uses the domain itself (implicit MX).
    """
    if any(r.exchange in ("", ".") for r in records):
        if len(records) == 1 and records[0].preference == 0:
            return NullMx()
        # a root exchange next to real ones is invalid; ignore the root entry (RFC 7505 §3)
        records = [r for r in records if r.exchange not in ("", ".")]
    r = rng or random.Random()
    buckets: dict[int, list[MxRecord]] = {}
    for rec in records:
        buckets.setdefault(rec.preference, []).append(rec)
    out: list[MxRecord] = []
    for pref in sorted(buckets):
        group = list(buckets[pref])
        r.shuffle(group)
        out.extend(group)
    seen: set[str] = set()
    uniq = []
    for rec in out:
        key = rec.exchange.lower()
        if key not in seen:
            seen.add(key)
            uniq.append(rec)
    return uniq


# ---------------------------------------------------------------- retry schedule
DEFAULT_SCHEDULE: tuple[float, ...] = (60, 300, 900, 1800, 3600, 7200, 14400)


def parse_schedule(text: str) -> tuple[float, ...]:
    """``"1m,5m,15m,1h"`` or ``"60,300"`` -> seconds; s/m/h/d suffixes allowed."""
    units = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
    out: list[float] = []
    for part in re.split(r"[,\s]+", text.strip()):
        if not part:
            continue
        m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd]?)", part.lower())
        if not m:
            raise ValueError(f"bad retry interval {part!r}")
        value = float(m.group(1)) * units[m.group(2)]
        if value <= 0:
            raise ValueError(f"retry interval must be positive: {part!r}")
        out.append(value)
    if not out:
        raise ValueError("empty retry schedule")
    return tuple(out)


def retry_delay(attempts: int, schedule: Sequence[float] = DEFAULT_SCHEDULE) -> float:
    """The wait after the ``attempts``-th failed attempt (1-based); the last step repeats."""
    if attempts < 1:
        return 0.0
    return float(schedule[min(attempts, len(schedule)) - 1])


@dataclass(frozen=True)
class NextAttempt:
    at: datetime


@dataclass(frozen=True)
class Expired:
    """The message is older than the maximum queue lifetime: give up (bounce)."""


def after_deferral(attempts: int, queued_at: datetime, now: datetime, *,
                   schedule: Sequence[float], max_age_s: float) -> NextAttempt | Expired:
    """When to try again after a temporary failure, or Expired once the queue lifetime is
    used up. The last attempt is placed at the deadline rather than past it."""
    deadline = queued_at + timedelta(seconds=max_age_s)
    if now >= deadline:
        return Expired()
    nxt = now + timedelta(seconds=retry_delay(attempts, schedule))
    return NextAttempt(min(nxt, deadline))


# ---------------------------------------------------------------- outcomes
Outcome = Literal["relayed", "deferred", "failed"]


def classify(code: int) -> Outcome:
    """RFC 5321 §4.2.1: 2yz done, 4yz transient (try later), 5yz permanent. Anything else
    (no reply, a garbled one) is transient."""
    if 200 <= code < 300:
        return "relayed"
    if 500 <= code < 600:
        return "failed"
    return "deferred"


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".")


def group_by_domain(addresses: Iterable[str]) -> dict[str, list[str]]:
    """Recipients per destination domain, first-seen order, each address once."""
    out: dict[str, list[str]] = {}
    seen: set[str] = set()
    for a in addresses:
        if a.lower() in seen:
            continue
        seen.add(a.lower())
        out.setdefault(domain_of(a), []).append(a)
    return out


# ---------------------------------------------------------------- DSN suppression (RFC 3461)
def wants_failure_dsn(mail_from: str, is_bounce: bool, notify: Sequence[str]) -> bool:
    """Bounce only a message that is not itself a bounce (null reverse-path, RFC 5321 §4.5.5)
    and whose NOTIFY, when given, asks for FAILURE (RFC 3461 §4.1; the default is failures)."""
    if is_bounce or not mail_from.strip("<> "):
        return False
    n = {x.upper() for x in notify}
    if "NEVER" in n:
        return False
    return not n or "FAILURE" in n


def wants_delay_dsn(mail_from: str, is_bounce: bool, notify: Sequence[str]) -> bool:
    """Delay warnings only when NOTIFY explicitly includes DELAY."""
    if is_bounce or not mail_from.strip("<> "):
        return False
    return "DELAY" in {x.upper() for x in notify}


def wants_success_dsn(mail_from: str, is_bounce: bool, notify: Sequence[str]) -> bool:
    """A "relayed" DSN when NOTIFY includes SUCCESS and the next hop does not speak DSN
    (RFC 3461 §4.2, §6.2.1)."""
    if is_bounce or not mail_from.strip("<> "):
        return False
    return "SUCCESS" in {x.upper() for x in notify}


# ---------------------------------------------------------------- names on the bus
def kv_key(queue_id: str) -> str:
    """A JetStream KV key (``[-/_=.a-zA-Z0-9]``) for a queue id."""
    return re.sub(r"[^A-Za-z0-9_\-=]", "_", queue_id) or "_"


def subject_token(value: str) -> str:
    """One NATS subject token (no dots, spaces or wildcards); same rule as mime-processor."""
    return re.sub(r"[^A-Za-z0-9_\-]", "_", value) or "_"
