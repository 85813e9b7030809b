"""The directory: domains, accounts and aliases in SQL, and the ``directory.*`` RPCs that
smtp-ingress, imap-access and pop3-access ask (proto/directory.py).

Nothing is cached by default: every replica reads the database on each request, so a
password change, a disabled account or a new alias takes effect at once on every replica
(an optional resolve TTL cache trades that for speed). A resolve is two indexed queries.
Failed logins are counted per (user, client IP) in a NATS KV bucket all replicas share.
HTTPException never appears here (see mgmt.py).

This module only re-exports the names importers use. The directory is split by layer:
directory_rules.py (address and domain rules, errors, result values; pure),
directory_sql_admin.py and directory_sql.py (``DirectorySql``: every directory query,
administration and lookups) and directory_rpc.py
(``Directory``: the bus handlers, ``LoginThrottle``, ``serve_directory``).
"""

from __future__ import annotations

from postbus.mailbox_store.directory_rpc import (
    LOGINS,
    QUEUE_GROUP,
    RESOLVES,
    Directory,
    LoginThrottle,
    serve_directory,
)
from postbus.mailbox_store.directory_rules import (
    MAX_DOMAIN,
    MAX_LOCAL,
    POP3_POLICIES,
    AccountInfo,
    AliasInfo,
    Conflict,
    DirectoryError,
    DomainInfo,
    Exists,
    Invalid,
    NotFound,
    Pop3Policy,
    base_local,
    fold_local,
    normalize_domain,
    split_address,
)
from postbus.mailbox_store.directory_sql import (
    RESOLVE_CACHE,
    RESOLVE_CACHE_MAX,
    DirectorySql,
    release_blobs,
)

__all__ = [
    "LOGINS", "MAX_DOMAIN", "MAX_LOCAL", "POP3_POLICIES", "QUEUE_GROUP", "RESOLVES",
    "RESOLVE_CACHE", "RESOLVE_CACHE_MAX", "AccountInfo", "AliasInfo", "Conflict", "Directory",
    "DirectoryError", "DirectorySql", "DomainInfo", "Exists", "Invalid", "LoginThrottle",
    "NotFound", "Pop3Policy", "base_local", "fold_local", "normalize_domain", "release_blobs",
    "serve_directory", "split_address",
]
