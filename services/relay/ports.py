"""What the relay worker talks to, as typing.Protocol ports, and the values they exchange.

No nats, no sockets here: adapters.py implements these over DNS and SMTP; the bus and the
blob store come from postbus.kit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from postbus.relay.policy import Hop


@dataclass(frozen=True)
class Route:
    """Hosts to try, in order."""

    hops: list[Hop]


@dataclass(frozen=True)
class NoRoute:
    """No host for the domain: permanent (NXDOMAIN, null MX) or temporary (DNS timeout)."""

    permanent: bool
    status: str  # enhanced status, e.g. "5.1.10" (RFC 7505 §4.2), "4.4.3"
    detail: str


class Destinations(Protocol):
    async def route(self, domain: str) -> Route | NoRoute: ...


@dataclass(frozen=True)
class RcptSpec:
    address: str
    notify: Sequence[str] = ()
    orcpt: str | None = None


@dataclass(frozen=True)
class Envelope:
    mail_from: str
    recipients: list[RcptSpec]
    size: int
    body_type: Literal["7BIT", "8BITMIME", "BINARYMIME"] = "7BIT"
    smtputf8: bool = False
    dsn_envid: str | None = None
    dsn_ret: Literal["FULL", "HDRS"] | None = None


@dataclass(frozen=True)
class RcptResult:
    outcome: Literal["relayed", "deferred", "failed"]
    status: str  # enhanced status code
    reply: str  # "550 5.1.1 no such user" or a local reason ("connect to ...: refused")
    remote_mta: str | None = None
    remote_dsn: bool = False  # the next hop took over DSN duties (it advertised DSN)


@dataclass
class AttemptResult:
    results: dict[str, RcptResult] = field(default_factory=dict)  # by address as given
    tls: str | None = None  # the cipher used with the host that answered, if any
    reusable: bool = False  # the session may carry another transaction (connection cache)


class Transport(Protocol):
    async def send(self, hops: list[Hop], env: Envelope, body: bytes) -> AttemptResult: ...
