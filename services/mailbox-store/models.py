"""SQL schema of the system of record: directory (domains, accounts, aliases) and IMAP state
(mailboxes, messages, expunge log, deliveries, blob references). SQLAlchemy 2.0 declarative.

Only the store's repository and migrations import this module.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# IMAP system flags as bits (RFC 3501 §2.3.2); keywords are kept as text
FLAG_BITS: dict[str, int] = {
    "\\Seen": 1,
    "\\Answered": 2,
    "\\Flagged": 4,
    "\\Deleted": 8,
    "\\Draft": 16,
}


class Base(DeclarativeBase):
    pass


# ---------------------------------------------------------------- directory
class Domain(Base):
    __tablename__ = "domains"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(253), unique=True)  # lower-case, IDNA A-label
    # local parts compared case-insensitively unless the domain asks otherwise (RFC 5321 §2.4)
    local_part_case_sensitive: Mapped[bool] = mapped_column(Boolean, default=False)
    catch_all_account_id: Mapped[int | None] = mapped_column(
        ForeignKey("accounts.id", ondelete="SET NULL", use_alter=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Account(Base):
    __tablename__ = "accounts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    address: Mapped[str] = mapped_column(String(320), unique=True)  # canonical form
    domain_id: Mapped[int] = mapped_column(ForeignKey("domains.id", ondelete="CASCADE"), index=True)
    password_hash: Mapped[str] = mapped_column(Text)  # Argon2id
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    quota_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # None: unlimited
    used_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    message_count: Mapped[int] = mapped_column(Integer, default=0)
    pop3_policy: Mapped[str] = mapped_column(String(16), default="client")  # client|keep|delete
    pop3_expire_days: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Alias(Base):
    """One address delivering to one or more accounts."""

    __tablename__ = "aliases"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    address: Mapped[str] = mapped_column(String(320), unique=True)
    domain_id: Mapped[int] = mapped_column(ForeignKey("domains.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class AliasTarget(Base):
    __tablename__ = "alias_targets"

    alias_id: Mapped[int] = mapped_column(ForeignKey("aliases.id", ondelete="CASCADE"), primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"),
                                            primary_key=True, index=True)


# ---------------------------------------------------------------- IMAP state
class Mailbox(Base):
    __tablename__ = "mailboxes"
    __table_args__ = (UniqueConstraint("account_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(1024))  # "/" delimited; "INBOX"
    special_use: Mapped[str | None] = mapped_column(String(32), nullable=True)
    uidvalidity: Mapped[int] = mapped_column(BigInteger)
    uidnext: Mapped[int] = mapped_column(BigInteger, default=1)  # never decreases, never reused
    highestmodseq: Mapped[int] = mapped_column(BigInteger, default=1)
    # \Recent (RFC 3501 §2.3.2): UIDs from here up have not been announced to any session
    # yet; the SELECT that claims them moves it up to uidnext (messages.py, MessageOps.select)
    recent_uid: Mapped[int] = mapped_column(BigInteger, default=1, server_default="1")
    # a deleted mailbox that still has children keeps its name as \Noselect (RFC 3501 §6.3.4)
    noselect: Mapped[bool] = mapped_column(Boolean, default=False)
    # kept exact in the transaction that adds or removes messages (EXISTS without a COUNT)
    message_count: Mapped[int] = mapped_column(Integer, default=0)
    total_size: Mapped[int] = mapped_column(BigInteger, default=0)
    unseen_count: Mapped[int] = mapped_column(Integer, default=0)  # without \Seen
    deleted_count: Mapped[int] = mapped_column(Integer, default=0)  # with \Deleted
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Counter(Base):
    """Global monotonic counters (e.g. the last UIDVALIDITY handed out)."""

    __tablename__ = "store_counters"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger)


class Subscription(Base):
    """LSUB state; a subscribed name need not exist (RFC 3501 §6.3.6)."""

    __tablename__ = "subscriptions"

    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(1024), primary_key=True)


class Blob(Base):
    """A content-addressed body and how many messages reference it: in S3, or, when small,
    in ``body`` (then there is no S3 object; ADR 0014)."""

    __tablename__ = "blobs"

    key: Mapped[str] = mapped_column(String(80), primary_key=True)  # blobs/<sha256>
    size: Mapped[int] = mapped_column(BigInteger)
    refcount: Mapped[int] = mapped_column(Integer, default=0)
    # when refcount last reached 0: collected after the grace period
    unreferenced_since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    # the bytes of a small blob (at most inline_body_max), kept here instead of in S3
    body: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)


class Message(Base):
    __tablename__ = "messages"
    __table_args__ = (
        UniqueConstraint("mailbox_id", "uid"),
        Index("ix_messages_mailbox_modseq", "mailbox_id", "modseq"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    mailbox_id: Mapped[int] = mapped_column(ForeignKey("mailboxes.id", ondelete="CASCADE"))
    uid: Mapped[int] = mapped_column(BigInteger)
    modseq: Mapped[int] = mapped_column(BigInteger)
    flags: Mapped[int] = mapped_column(Integer, default=0)  # FLAG_BITS
    keywords: Mapped[str] = mapped_column(Text, default="")  # space-separated
    internaldate: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    size: Mapped[int] = mapped_column(BigInteger)  # len(prefix) + blob size
    blob_key: Mapped[str] = mapped_column(ForeignKey("blobs.key"), index=True)
    prefix: Mapped[bytes] = mapped_column(LargeBinary, default=b"")
    summary: Mapped[str] = mapped_column(Text)  # MessageSummary JSON
    # search columns (decoded header text), kept beside the summary for SQL filtering
    subject: Mapped[str] = mapped_column(Text, default="")
    from_addr: Mapped[str] = mapped_column(Text, default="")
    to_addr: Mapped[str] = mapped_column(Text, default="")
    cc_addr: Mapped[str] = mapped_column(Text, default="")
    bcc_addr: Mapped[str] = mapped_column(Text, default="")
    message_id_hdr: Mapped[str] = mapped_column(Text, default="")
    sent_date: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    pop3_hidden: Mapped[bool] = mapped_column(Boolean, default=False)
    # octets POP3 adds to end an unterminated last line: its sizes are size + pop3_pad
    pop3_pad: Mapped[int] = mapped_column(SmallInteger, default=0, server_default="0")
    # first retrieval in full over POP3 (RETR, then QUIT): the account's pop3_expire_days
    # (announced as EXPIRE, RFC 2449 §6.7) counts from here
    pop3_retrieved_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True),
                                                               nullable=True)


class Expunged(Base):
    """The expunge log: (UID, MODSEQ) so QRESYNC can report VANISHED (RFC 7162 §3.2.10)."""

    __tablename__ = "expunged"

    mailbox_id: Mapped[int] = mapped_column(ForeignKey("mailboxes.id", ondelete="CASCADE"), primary_key=True)
    uid: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    modseq: Mapped[int] = mapped_column(BigInteger, index=True)


class Delivery(Base):
    """Idempotency of local delivery: one row per (queue id, account)."""

    __tablename__ = "deliveries"

    queue_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True)
    message_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    delivered_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
