"""Store API contracts (served by mailbox-store) for the access services.

Everything addresses a mailbox by ``mailbox_id`` once it has been looked up by name, so a
rename never confuses a session. UID sets travel as inclusive ``[first, last]`` ranges;
``*`` is resolved by the caller against its snapshot.

No NATS message may exceed the server's max_payload (1 MB by default in nats-server). Replies
that grow with the mailbox are paged by the store: SELECT, SEARCH and the POP3 maildrop by
``after_uid`` / ``limit`` (ask again after the last UID while ``more``), EXPUNGE by ``limit``
(ask again while ``more``). Replies that grow with the request's UID set (FETCH, STORE,
COPY) are bounded by the caller, which sends sets of a few thousand UIDs at most.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Literal

from pydantic import Field

from postbus.proto.base import B64Bytes, Model, Rpc
from postbus.proto.mail import MessageSummary

UidRanges = list[tuple[int, int]]


def uid_ranges(uids: Iterable[int]) -> UidRanges:
    """UIDs (any order, repeats allowed) as ascending inclusive [first, last] ranges."""
    out: UidRanges = []
    for u in sorted(set(uids)):
        if out and u == out[-1][1] + 1:
            out[-1] = (out[-1][0], u)
        else:
            out.append((u, u))
    return out

# the most a paged reply carries, well under nats-server's default max_payload of 1 MiB
PAGE_BYTES = 512 * 1024


# ---------------------------------------------------------------- mailboxes
class MailboxInfo(Model):
    mailbox_id: int
    name: str  # full path, "/" delimited, "INBOX" for the inbox
    special_use: str | None = None  # "\\Sent", "\\Drafts", "\\Trash", "\\Junk", "\\Archive"
    attributes: list[str] = Field(default_factory=list)  # "\\HasChildren", "\\Noselect"...
    subscribed: bool = False
    uidvalidity: int
    uidnext: int
    highestmodseq: int
    messages: int
    unseen: int
    recent: int = 0  # messages no session has been told about yet (STATUS RECENT)
    size: int = 0  # octets
    deleted: int = 0  # messages with \Deleted


class MailboxListRequest(Model):
    account_id: int
    subscribed_only: bool = False


class MailboxListReply(Model):
    mailboxes: list[MailboxInfo]


STORE_MAILBOX_LIST = Rpc("store.mailbox.list.v1", MailboxListRequest, MailboxListReply,
                         "Every mailbox of an account with its status counters")


class MailboxRef(Model):
    account_id: int
    name: str


STORE_MAILBOX_STATUS = Rpc("store.mailbox.status.v1", MailboxRef, MailboxInfo,
                           "Status of one mailbox by name; error not_found")


class MailboxCreateRequest(Model):
    account_id: int
    name: str
    special_use: str | None = None


STORE_MAILBOX_CREATE = Rpc("store.mailbox.create.v1", MailboxCreateRequest, MailboxInfo,
                           "Create a mailbox (and missing parents); error exists/invalid")


class Ok(Model):
    ok: bool = True


STORE_MAILBOX_DELETE = Rpc("store.mailbox.delete.v1", MailboxRef, Ok,
                           "Delete a mailbox and its messages; INBOX cannot be deleted")


class MailboxRenameRequest(Model):
    account_id: int
    old: str
    new: str


STORE_MAILBOX_RENAME = Rpc("store.mailbox.rename.v1", MailboxRenameRequest, Ok,
                           "Rename with children; renaming INBOX moves its messages (RFC 3501 §6.3.5)")


class SubscribeRequest(Model):
    account_id: int
    name: str
    subscribed: bool


STORE_MAILBOX_SUBSCRIBE = Rpc("store.mailbox.subscribe.v1", SubscribeRequest, Ok,
                              "Subscribe or unsubscribe (the name need not exist)")


# ---------------------------------------------------------------- select / snapshot
class MessageState(Model):
    uid: int
    flags: list[str] = Field(default_factory=list)
    modseq: int


class SelectRequest(Model):
    account_id: int
    mailbox_id: int = 0
    # or by name (SELECT's first page: one round trip); the reply's mailbox says which
    name: str | None = None
    after_uid: int = 0  # page: UIDs greater than this
    limit: int = 5000
    changed_since: int | None = None  # only messages with modseq > this (CONDSTORE/QRESYNC)
    # \Recent (RFC 3501 §2.3.2): take the messages no session has been told about yet (up
    # to the reply's mailbox.uidnext) for this session; at most one session gets each.
    # SELECT and a selected session's look at new messages do; EXAMINE does not
    claim_recent: bool = False


class SelectReply(Model):
    mailbox: MailboxInfo
    messages: list[MessageState]  # ascending UID
    more: bool = False
    vanished: UidRanges = Field(default_factory=list)  # with changed_since: expunged since
    # UIDs from this one up to mailbox.uidnext are \Recent for this session: with
    # claim_recent the ones it claimed (mailbox.uidnext when another session had claimed
    # them first), without it the ones not claimed yet. None: a store that does not say
    recent_uid: int | None = None


STORE_SELECT = Rpc("store.select.v1", SelectRequest, SelectReply,
                   "Snapshot of UIDs, flags and modseqs (paged)")


# ---------------------------------------------------------------- fetch metadata
class MessageMeta(Model):
    uid: int
    flags: list[str]
    modseq: int
    internaldate: datetime
    size: int  # len(prefix) + blob_size: the RFC822.SIZE clients see
    blob_key: str
    blob_size: int
    prefix: B64Bytes = b""
    summary: MessageSummary | None = None


class FetchRequest(Model):
    account_id: int
    mailbox_id: int
    uids: UidRanges
    with_summary: bool = True


class FetchReply(Model):
    messages: list[MessageMeta]


STORE_FETCH = Rpc("store.fetch.v1", FetchRequest, FetchReply,
                  "Metadata for a UID set in one round trip (bodies come from S3)")


# ---------------------------------------------------------------- small bodies
# x inline_body_max (at most 64 KiB): 512 KiB of bodies, about 700 KB as JSON, under the
# 1 MiB max_payload a production NATS may have
BODIES_MAX_KEYS = 8


class BodiesRequest(Model):
    """Bodies by blob key; the store answers with those kept in its rows (ADR 0014), the
    rest are in S3."""

    keys: list[str] = Field(max_length=BODIES_MAX_KEYS)


class BodiesReply(Model):
    bodies: dict[str, B64Bytes]


STORE_BODIES = Rpc("store.bodies.v1", BodiesRequest, BodiesReply,
                   "Small message bodies kept in the store instead of S3")


# ---------------------------------------------------------------- flags
class StoreFlagsRequest(Model):
    account_id: int
    mailbox_id: int
    uids: UidRanges
    op: Literal["set", "add", "remove"]
    flags: list[str]
    unchanged_since: int | None = None  # RFC 7162 UNCHANGEDSINCE
    origin: str | None = None


class StoreFlagsReply(Model):
    updated: list[MessageState]
    modified: list[int] = Field(default_factory=list)  # UIDs that failed UNCHANGEDSINCE


STORE_FLAGS = Rpc("store.flags.v1", StoreFlagsRequest, StoreFlagsReply,
                  "Set, add or remove flags on a UID set")


# ---------------------------------------------------------------- copy / move
class CopyRequest(Model):
    account_id: int
    mailbox_id: int
    uids: UidRanges
    target: str  # mailbox name
    move: bool = False
    origin: str | None = None


class CopyReply(Model):
    uidvalidity: int  # of the target
    source_uids: list[int]
    target_uids: list[int]


STORE_COPY = Rpc("store.copy.v1", CopyRequest, CopyReply,
                 "Copy or move (RFC 6851) messages; error not_found (TRYCREATE), over_quota")


# ---------------------------------------------------------------- append
class AppendMessage(Model):
    """A message of a MULTIAPPEND after the first (RFC 3502), with the fields that
    AppendRequest has for its first."""

    flags: list[str] = Field(default_factory=list)
    internaldate: datetime | None = None
    message: B64Bytes | None = None
    blob_key: str | None = None
    blob_size: int | None = Field(default=None, ge=0)
    summary: MessageSummary | None = None
    body: B64Bytes | None = None


class AppendRequest(Model):
    account_id: int
    mailbox: str
    flags: list[str] = Field(default_factory=list)
    internaldate: datetime | None = None
    message: B64Bytes | None = None  # the literal, when small
    blob_key: str | None = None  # or already uploaded to S3 by the caller
    # with blob_key, what imap-access sends: the uploaded bytes were CRLF-normalised and
    # summarised by the caller, and the store takes both as given, as it takes a
    # delivery's from mime-processor (the store then only writes rows)
    blob_size: int | None = Field(default=None, ge=0)
    summary: MessageSummary | None = None
    # with blob_key, instead of an upload: the (small) bytes under that key, which the
    # store keeps in its blob row rather than in S3 (ADR 0014)
    body: B64Bytes | None = None
    origin: str | None = None
    # MULTIAPPEND (RFC 3502 §3): the messages after this one, appended with it in one
    # transaction (all or none) at consecutive UIDs
    more: list[AppendMessage] = Field(default_factory=list)
    # the caller has this mailbox selected read-write and knows its UIDs up to this one:
    # the store claims \Recent up to the new UIDNEXT in the APPEND's transaction and
    # answers with the messages after it in ``sync`` (what a STORE_SELECT with
    # claim_recent would give: one write and one round trip instead of two)
    sync_after_uid: int | None = Field(default=None, ge=0)


class AppendReply(Model):
    uidvalidity: int
    uid: int  # the (first) message's
    uids: list[int] = Field(default_factory=list)  # with ``more``: every message's, in order
    # with sync_after_uid: the first page of the selected view's new messages, up to the
    # UIDNEXT the claim reached (mailbox.uidnext), recent_uid the first one claimed
    sync: SelectReply | None = None


STORE_APPEND = Rpc("store.append.v1", AppendRequest, AppendReply,
                   "Append a client-provided message; error not_found, over_quota")


# ---------------------------------------------------------------- expunge
class ExpungeRequest(Model):
    account_id: int
    mailbox_id: int
    uids: UidRanges | None = None  # None: every \Deleted message; else only these (UID EXPUNGE)
    origin: str | None = None
    limit: int = 20_000  # at most this many messages per call (one transaction), lowest UIDs first


class ExpungeReply(Model):
    expunged: list[int]
    highestmodseq: int
    more: bool = False  # the limit was reached: call again for the rest


STORE_EXPUNGE = Rpc("store.expunge.v1", ExpungeRequest, ExpungeReply,
                    "Remove \\Deleted messages (all, or within a UID set; at most limit a call)")


# ---------------------------------------------------------------- search
class SearchKey(Model):
    """One node of a search program (RFC 3501 §6.4.4).

    ``op`` is one of: all, and, or, not, uid, flag, unflag (flag absent), header, from, to,
    cc, bcc, subject, body, text, before, on, since, sentbefore, senton, sentsince,
    larger, smaller, modseq. ``args`` holds the operand(s) as strings; ``children`` the
    sub-keys of and/or/not; ``uids`` the ranges of a uid key.
    """

    op: str
    args: list[str] = Field(default_factory=list)
    uids: UidRanges = Field(default_factory=list)
    children: list[SearchKey] = Field(default_factory=list)


class SearchRequest(Model):
    account_id: int
    mailbox_id: int
    key: SearchKey
    charset: str = "UTF-8"
    after_uid: int = 0  # page: matches with UIDs greater than this
    limit: int = 20_000


class SearchReply(Model):
    uids: list[int]  # ascending
    highestmodseq: int = 0  # of the matched messages of this page (RFC 7162 SEARCH MODSEQ)
    more: bool = False  # more matches after uids[-1]


STORE_SEARCH = Rpc("store.search.v1", SearchRequest, SearchReply,
                   "Evaluate a search program in the store (SQL first, body text last; paged)",
                   timeout_s=30.0)


# ---------------------------------------------------------------- quota
class QuotaRequest(Model):
    account_id: int


class QuotaReply(Model):
    used_bytes: int
    limit_bytes: int | None  # None: unlimited
    messages: int


STORE_QUOTA = Rpc("store.quota.v1", QuotaRequest, QuotaReply, "Storage used and the limit")


# ---------------------------------------------------------------- POP3 maildrop
class Pop3Message(Model):
    uid: int
    uidl: str  # stable across sessions, replicas and restarts
    size: int  # octets as RETR sends them (CRLF line ends, before byte-stuffing)
    blob_key: str
    prefix: B64Bytes = b""


class Pop3MaildropRequest(Model):
    account_id: int
    after_uid: int = 0  # page: UIDs greater than this
    limit: int = 1000


class Pop3MaildropReply(Model):
    mailbox_id: int
    uidvalidity: int
    messages: list[Pop3Message]  # the INBOX minus messages hidden from POP3, ascending UID
    more: bool = False  # more messages after messages[-1].uid


STORE_POP3_MAILDROP = Rpc("store.pop3.maildrop.v1", Pop3MaildropRequest, Pop3MaildropReply,
                          "INBOX as a POP3 maildrop, fixed for the session (paged)")


class Pop3CommitRequest(Model):
    """A commit naming very many UIDs is sent as several, each one transaction (a failure
    halfway is RFC 1939 §6's "some deleted messages not removed")."""

    account_id: int
    mailbox_id: int
    delete_uids: list[int]
    mode: Literal["delete", "keep"]  # delete: expunge; keep: hide from POP3, keep for IMAP
    seen_uids: list[int] = Field(default_factory=list)  # RETR'd messages, flagged \Seen


STORE_POP3_COMMIT = Rpc("store.pop3.commit.v1", Pop3CommitRequest, Ok,
                        "Apply the UPDATE state of a POP3 session (RFC 1939 §6)")


SearchKey.model_rebuild()
