"""Mail flow contracts: inbound, local delivery, outbound queue, delivery events, mailbox changes."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from postbus.proto.base import B64Bytes, Model, Stream, Subject
from postbus.proto.directory import ResolveReply

# ---------------------------------------------------------------- streams
INBOUND_STREAM = Stream(
    "POSTBUS_INBOUND", ("mail.inbound.>",), "workqueue",
    description="Messages accepted by smtp-ingress, waiting for mime-processor",
)
DELIVER_STREAM = Stream(
    "POSTBUS_DELIVER", ("mail.deliver.>",), "workqueue",
    description="Per-recipient local deliveries, waiting for mailbox-store",
)
OUTBOUND_STREAM = Stream(
    "POSTBUS_OUTBOUND", ("mail.outbound.>",), "workqueue",
    description="Messages for remote recipients, waiting for relay",
)
EVENTS_STREAM = Stream(
    "POSTBUS_EVENTS", ("mail.events.>",), "limits", max_age_s=30 * 86400,
    description="Delivery status of every message and recipient (kept 30 days)",
)


# ---------------------------------------------------------------- shared parts
class ClientInfo(Model):
    """Who handed the message to smtp-ingress."""

    ip: str
    port: int = 0
    helo: str | None = None
    reverse_dns: str | None = None
    listener: Literal["mx", "submission", "smtps", "api"] = "mx"
    tls: str | None = None  # e.g. "TLSv1.3 TLS_AES_256_GCM_SHA384"
    auth_user: str | None = None  # authenticated account address


class Recipient(Model):
    address: str
    orcpt: str | None = None  # RFC 3461 ORCPT, e.g. "rfc822;bob@example.net"
    notify: list[Literal["NEVER", "SUCCESS", "FAILURE", "DELAY"]] = Field(default_factory=list)
    # the directory's answer when smtp-ingress accepted the RCPT: mime-processor routes by
    # it instead of asking again (None: ask)
    resolved: ResolveReply | None = None


class BodyRef(Model):
    """The message bytes: inline when small, else a claim check to S3 (ARCHITECTURE.md)."""

    size: int
    inline: B64Bytes | None = None
    blob_key: str | None = None  # "blobs/<sha256>" when the body went to S3 first


# ---------------------------------------------------------------- mail.inbound
class MailReceived(Model):
    """smtp-ingress accepted a message (250 sent after this was acked by JetStream).

    The body already starts with the Received header smtp-ingress prepended.
    """

    queue_id: str
    received_at: datetime
    client: ClientInfo
    mail_from: str  # "" for the null reverse-path
    rcpt_to: list[Recipient]
    body: BodyRef
    body_type: Literal["7BIT", "8BITMIME", "BINARYMIME"] = "7BIT"
    smtputf8: bool = False
    dsn_envid: str | None = None
    dsn_ret: Literal["FULL", "HDRS"] | None = None


MAIL_RECEIVED = Subject(
    "mail.inbound.received.v1", MailReceived, INBOUND_STREAM,
    "A message accepted over SMTP; consumed by mime-processor (work queue)",
)


# ---------------------------------------------------------------- message summary
class PartSpan(Model):
    """Where one MIME part lies inside the blob (offsets relative to the blob start)."""

    section: str  # IMAP section number: "" for the whole message, "1", "1.2", ...
    header_start: int
    body_start: int
    end: int
    content_type: str = "text/plain"
    is_message_rfc822: bool = False


class MessageSummary(Model):
    """What IMAP needs, computed once from the blob by ``postbus.protocols.mime``.

    ``envelope``, ``body`` and ``bodystructure`` are IMAP wire text (RFC 3501 §7.4.2),
    ready to be written after ``ENVELOPE``/``BODY``/``BODYSTRUCTURE``.
    """

    envelope: str
    bodystructure: str
    body: str
    parts: list[PartSpan] = Field(default_factory=list)
    subject: str = ""
    from_: str = Field(default="", alias="from")
    to: str = ""
    cc: str = ""
    bcc: str = ""
    message_id: str = ""
    date: datetime | None = None  # the Date header, if parseable
    header_bytes: int = 0  # size of the header block incl. the blank line
    # the message is empty or its last line ends with CRLF; when not, POP3's RETR adds one
    # (RFC 1939 §3), so LIST and STAT count 2 octets more than IMAP's RFC822.SIZE
    ends_crlf: bool = True
    # THREAD=REFERENCES (RFC 5256 §4): the first References and In-Reply-To fields,
    # unfolded, "" when absent (a References past 2 KiB keeps its last ids). Summaries
    # stored before these fields existed lack them: ``thread_fields`` is False there, and
    # THREAD reads the message's header block instead
    references: str = ""
    in_reply_to: str = ""
    thread_fields: bool = False

    model_config = Model.model_config | {"populate_by_name": True}


# ---------------------------------------------------------------- mail.deliver
class DeliverLocal(Model):
    """Deliver one message to one local account (mime-processor -> mailbox-store).

    Idempotency key: (queue_id, recipient). The blob is already in S3, content-addressed,
    or, for a small message, travels here in ``body`` and is kept in the store's blob row
    (ADR 0014). ``prefix`` holds the per-recipient trace headers (Return-Path,
    Delivered-To) that are not part of the shared blob; readers show ``prefix + blob`` as
    the message.
    """

    queue_id: str
    recipient: str  # the address as given in RCPT TO
    account_id: int
    account: str  # canonical account address
    mailbox: str = "INBOX"
    mail_from: str = ""
    received_at: datetime
    blob_key: str
    blob_size: int
    prefix: B64Bytes = b""
    summary: MessageSummary
    flags: list[str] = Field(default_factory=list)
    auth_results: str | None = None  # Authentication-Results value, also in the blob
    notify: list[str] = Field(default_factory=list)  # DSN NOTIFY for this recipient
    dsn_envid: str | None = None
    body: B64Bytes | None = None  # the bytes under blob_key, when not put in S3


DELIVER_LOCAL = Subject(
    "mail.deliver.local.v1", DeliverLocal, DELIVER_STREAM,
    "One local recipient of one message; consumed by mailbox-store (work queue)",
)


# ---------------------------------------------------------------- mail.outbound
class OutboundQueued(Model):
    """A message for remote recipients (mime-processor -> relay). Keyed by queue_id."""

    queue_id: str
    mail_from: str
    recipients: list[Recipient]
    blob_key: str
    size: int
    queued_at: datetime
    dsn_envid: str | None = None
    dsn_ret: Literal["FULL", "HDRS"] | None = None
    smtputf8: bool = False
    body_type: Literal["7BIT", "8BITMIME", "BINARYMIME"] = "7BIT"
    is_bounce: bool = False  # a DSN we generated: never bounce a bounce


OUTBOUND_QUEUED = Subject(
    "mail.outbound.queued.v1", OutboundQueued, OUTBOUND_STREAM,
    "Remote recipients of one message; consumed by relay (work queue)",
)


# ---------------------------------------------------------------- mail.events
EventKind = Literal["received", "delivered", "deferred", "failed", "relayed", "bounced", "expanded"]


class DeliveryEvent(Model):
    """What became of one recipient of one message. Subject: mail.events.v1.<queue_id>.<kind>."""

    queue_id: str
    kind: EventKind
    recipient: str | None = None
    at: datetime
    service: str
    status: str | None = None  # enhanced status code, e.g. "5.1.1"
    detail: str = ""
    remote_mta: str | None = None
    attempt: int = 0
    next_attempt_at: datetime | None = None
    # enough for relay to bounce a failure it did not see itself (RFC 3464)
    mail_from: str | None = None
    blob_key: str | None = None
    notify: list[str] = Field(default_factory=list)
    orcpt: str | None = None
    dsn_envid: str | None = None
    dsn_ret: Literal["FULL", "HDRS"] | None = None


DELIVERY_EVENT = Subject(
    "mail.events.v1.{queue_id}.{kind}", DeliveryEvent, EVENTS_STREAM,
    "Delivery status, kept in the events stream for the management APIs",
)


# ---------------------------------------------------------------- mailbox.changed (core NATS)
class MessageChange(Model):
    uid: int
    modseq: int
    flags: list[str] = Field(default_factory=list)


class MailboxChanged(Model):
    """Published by mailbox-store after a commit, for IMAP IDLE and NOTIFY.

    Subject: ``mailbox.changed.v1.<account_id>``. Not durable: a session that misses one
    resynchronises from the store on its next command.
    """

    account_id: int
    mailbox_id: int
    mailbox: str
    uidvalidity: int
    uidnext: int
    highestmodseq: int
    exists: int
    added: list[MessageChange] = Field(default_factory=list)
    flags: list[MessageChange] = Field(default_factory=list)
    expunged: list[int] = Field(default_factory=list)  # UIDs
    origin: str | None = None  # session id that caused it, so it can skip its own echo


MAILBOX_CHANGED = Subject(
    "mailbox.changed.v1.{account_id}", MailboxChanged, None,
    "A mailbox changed (new, flags, expunge); core NATS, best effort",
)
