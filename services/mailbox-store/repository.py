"""IMAP state in SQL: mailboxes, messages, flags, MODSEQ, expunge log, blob references, quota.

The same behaviour on SQLite and PostgreSQL. Every write is one transaction that first
locks the account row (PostgreSQL: ``SELECT ... FOR UPDATE``; SQLite: one writer, group
commits under ``BEGIN IMMEDIATE``, txn.py), so writes to one account are serialized, UIDs are handed
out in commit order (``UPDATE mailboxes SET uidnext = uidnext + n ... RETURNING``) and
locks are always taken in the same order (account, mailbox, blobs sorted by key).
Imports SQLAlchemy; never nats or boto3.

This module only assembles ``Repository`` and re-exports the names importers use. The SQL
is in the layer modules, each class built on the one before: sqlbase.py (tables, errors,
helpers, ``RepoBase``) -> messages.py -> groupcommit.py -> mailboxes.py -> flags.py ->
search.py -> pop3.py; the directory's SQL is in directory_sql_admin.py and directory_sql.py.
reads.py answers the read requests from it, for the store and for imap-access (ADR 0012).
"""

from __future__ import annotations

from postbus.mailbox_store.outcomes import (
    Change,
    Conflict,
    DeliverOutcome,
    Exists,
    Invalid,
    Limit,
    NeedsWriter,
    NewMessage,
    NotFound,
    OverQuota,
    StoreError,
)
from postbus.mailbox_store.pop3 import Pop3Ops
from postbus.mailbox_store.search import BLOB_OPS, BLOB_SEARCH_BATCH, parse_search_date
from postbus.mailbox_store.sqlbase import (
    ANY_UID,
    DEFAULT_MAILBOXES,
    DELETED,
    DELIMITER,
    INBOX,
    MAX_NAME,
    MAX_RANGES_IN_SQL,
    MAX_UIDS_IN_LIST,
    SEEN,
    SPECIAL_USES,
    flags_from_db,
    flags_to_db,
    make_state,
    normalize_name,
    parents_of,
    trusted_model,
    uid_filter,
    unseen_deleted,
    utc,
)

__all__ = [
    "ANY_UID", "BLOB_OPS", "BLOB_SEARCH_BATCH", "DEFAULT_MAILBOXES", "DELETED", "DELIMITER",
    "INBOX", "MAX_NAME", "MAX_RANGES_IN_SQL", "MAX_UIDS_IN_LIST", "SEEN", "SPECIAL_USES",
    "Change", "Conflict", "DeliverOutcome", "Exists", "Invalid", "Limit", "NeedsWriter", "NewMessage",
    "NotFound", "OverQuota", "Repository", "StoreError", "flags_from_db", "flags_to_db",
    "make_state", "normalize_name", "parents_of", "parse_search_date",
    "trusted_model", "uid_filter", "unseen_deleted", "utc",
]


class Repository(Pop3Ops):
    """The store's IMAP and POP3 state: every operation of the layer modules above."""
