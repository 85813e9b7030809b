"""Building blocks of the bus contracts: streams, subjects and request/reply pairs.

Pure declarations (pydantic only); no nats import. See STYLE.md "One subject, declared once".
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Annotated, Any, Generic, Literal, TypeVar, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    PlainSerializer,
    PlainValidator,
    WithJsonSchema,
    field_validator,
)

M = TypeVar("M", bound=BaseModel)
Req = TypeVar("Req", bound=BaseModel)
Rep = TypeVar("Rep", bound=BaseModel)


def _b64_in(v: object) -> bytes:
    if isinstance(v, bytes | bytearray | memoryview):
        return bytes(v)  # built in Python: raw bytes
    if isinstance(v, str):
        return base64.b64decode(v, validate=True)  # from JSON: base64 text
    raise ValueError("expected bytes or base64 text")


B64Bytes = Annotated[
    bytes,
    PlainValidator(_b64_in),
    PlainSerializer(lambda b: base64.b64encode(b).decode("ascii"), when_used="json"),
    WithJsonSchema({"type": "string", "contentEncoding": "base64"}),
]
"""Raw bytes in Python, base64 text in JSON."""


class Model(BaseModel):
    """Base of every wire model: unknown fields are ignored so a newer publisher
    (which may only add fields with defaults) never breaks an older subscriber."""

    model_config = ConfigDict(extra="ignore", frozen=False)


@dataclass(frozen=True)
class Stream:
    """A JetStream stream, created idempotently by the services at start-up."""

    name: str
    subjects: tuple[str, ...]
    retention: Literal["workqueue", "limits", "interest"] = "workqueue"
    max_age_s: float = 0  # 0 = unlimited
    max_msgs_per_subject: int = -1
    duplicate_window_s: float = 120.0
    description: str = ""


@dataclass(frozen=True)
class Subject(Generic[M]):
    """A subject and the one model its payload carries.

    ``name`` may contain ``{placeholders}`` (e.g. ``mail.events.v1.{queue_id}.{kind}``);
    ``format`` fills them and ``pattern`` gives the wildcard for subscribers.
    """

    name: str
    model: type[M]
    stream: Stream | None = None
    description: str = ""

    def format(self, **parts: str) -> str:
        return self.name.format(**parts)

    @property
    def pattern(self) -> str:
        import re

        return re.sub(r"\{[^}]+\}", "*", self.name)


@dataclass(frozen=True)
class Rpc(Generic[Req, Rep]):
    """A request/reply subject (core NATS, served by a queue group)."""

    name: str
    request: type[Req]
    reply: type[Rep]
    description: str = ""
    timeout_s: float = 5.0


ErrorCode = Literal["not_found", "exists", "invalid", "over_quota", "conflict", "limit",
                    "unavailable", "too_large", "internal"]
"""Why a request failed: the closed set every hop passes on unchanged (the store's
StoreError, RpcError on the bus, RemoteError, imap-access's StoreError, the session's
response code). ``not_found``: no such mailbox, message or account (IMAP: NONEXISTENT, or
TRYCREATE for a COPY/APPEND target); ``exists``: the name is taken (ALREADYEXISTS);
``invalid``: a request the store will not carry out as asked (CANNOT); ``over_quota``
(OVERQUOTA); ``conflict``: a concurrent change, try again (INUSE); ``limit``: over a bound
of the server (LIMIT, RFC 5530); ``unavailable``: nobody answered, or S3 did not
(UNAVAILABLE); ``too_large``: the reply would exceed the NATS max_payload; ``internal``: a
bug (SERVERBUG)."""
ERROR_CODES: frozenset[str] = frozenset(get_args(ErrorCode))


class RpcError(Model):
    """What a responder sends back instead of its reply model when it fails.

    Carried with the header ``Postbus-Error: 1``; ``code`` is machine-readable, one of
    ``ErrorCode``. A code this build does not know (a newer responder's) reads as
    ``internal``, so a new code never makes the error itself unreadable.
    """

    code: ErrorCode
    message: str = ""

    @field_validator("code", mode="before")
    @classmethod
    def _known(cls, v: Any) -> Any:
        return v if v in ERROR_CODES else "internal"


@dataclass(frozen=True)
class Registry:
    streams: list[Stream] = field(default_factory=list)
    subjects: list[Subject[Any]] = field(default_factory=list)
    rpcs: list[Rpc[Any, Any]] = field(default_factory=list)
