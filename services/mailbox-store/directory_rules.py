"""The directory's rules without I/O: address and domain syntax, errors, result values
(no SQL, no bus; directory_sql_admin.py, directory_sql.py and directory_rpc.py build on it).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar, Literal

import idna

from postbus.mailbox_store.models import Account
from postbus.proto.base import ErrorCode
from postbus.proto.directory import AccountRef, ResolveReply

POP3_POLICIES = ("client", "keep", "delete")
Pop3Policy = Literal["client", "keep", "delete"]

# RFC 5321 §4.5.3.1: local part <= 64 octets, domain <= 255, path <= 256 (we store 320)
MAX_LOCAL = 64
MAX_DOMAIN = 253
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
# a dot-atom local part (RFC 5322 §3.2.3) or a quoted string; no controls, no spaces unquoted
_ATOM_LOCAL = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.\-\u0080-\U0010ffff]+$")


# ---------------------------------------------------------------- errors (values for mgmt)
class DirectoryError(Exception):
    code: ClassVar[ErrorCode] = "invalid"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Invalid(DirectoryError):
    code: ClassVar[ErrorCode] = "invalid"


class NotFound(DirectoryError):
    code: ClassVar[ErrorCode] = "not_found"


class Exists(DirectoryError):
    code: ClassVar[ErrorCode] = "exists"


class Conflict(DirectoryError):
    code: ClassVar[ErrorCode] = "conflict"


# ---------------------------------------------------------------- addresses (pure)
def normalize_domain(name: str) -> str:
    """Lower-case IDNA A-label form of a domain; raises Invalid."""
    d = name.strip().rstrip(".")
    if d.startswith("[") or not d:
        raise Invalid(f"invalid domain {name!r}")
    try:
        a = idna.encode(d, uts46=True).decode("ascii").lower()
    except (idna.IDNAError, UnicodeError) as exc:
        raise Invalid(f"invalid domain {name!r}: {exc}") from exc
    labels = a.split(".")
    if len(a) > MAX_DOMAIN or len(labels) < 2 or not all(_LABEL.match(lb) for lb in labels):
        raise Invalid(f"invalid domain {name!r}")
    return a


def split_address(address: str) -> tuple[str, str]:
    """``local@domain`` (angle brackets and spaces around are tolerated) -> (local, A-label
    domain). The local part keeps its case. Raises Invalid."""
    a = address.strip()
    if a.startswith("<") and a.endswith(">"):
        a = a[1:-1].strip()
    local, sep, domain = a.rpartition("@")
    if not sep or not local or not domain:
        raise Invalid(f"invalid address {address!r}: expected local@domain")
    if len(local.encode()) > MAX_LOCAL:
        raise Invalid(f"invalid address {address!r}: local part over {MAX_LOCAL} octets")
    if local.startswith('"') and local.endswith('"') and len(local) >= 2:
        if any(ord(c) < 32 or c == "\x7f" for c in local):
            raise Invalid(f"invalid address {address!r}")
    elif (not _ATOM_LOCAL.match(local) or local.startswith(".") or local.endswith(".")
          or ".." in local):
        raise Invalid(f"invalid address {address!r}")
    return local, normalize_domain(domain)


def fold_local(local: str, case_sensitive: bool) -> str:
    return local if case_sensitive else local.lower()


def base_local(local: str, separator: str) -> str | None:
    """``alice+tag`` -> ``alice`` (RFC 5233 sub-addressing); None when there is no tag."""
    if not separator or separator not in local:
        return None
    base = local.split(separator, 1)[0]
    return base or None


# ---------------------------------------------------------------- results
@dataclass(frozen=True)
class DomainInfo:
    name: str
    local_part_case_sensitive: bool
    catch_all: str | None
    accounts: int
    aliases: int
    created_at: datetime | None


@dataclass(frozen=True)
class AccountInfo:
    id: int
    address: str
    domain: str
    enabled: bool
    quota_bytes: int | None
    used_bytes: int
    message_count: int
    pop3_policy: str
    pop3_expire_days: int | None
    created_at: datetime | None


@dataclass(frozen=True)
class AliasInfo:
    address: str
    targets: list[str] = field(default_factory=list)
    created_at: datetime | None = None


def _account_info(a: Account, domain: str) -> AccountInfo:
    return AccountInfo(a.id, a.address, domain, a.enabled, a.quota_bytes, a.used_bytes,
                       a.message_count, a.pop3_policy, a.pop3_expire_days, a.created_at)


def _reply_for(accs: Sequence[Any], dn: str) -> ResolveReply:
    """``accs``: rows or Account objects (``id``, ``address``, ``enabled``)."""
    live = [a for a in accs if a.enabled]
    if not live:
        return ResolveReply(status="disabled", domain=dn,
                            accounts=[AccountRef(account_id=a.id, address=a.address) for a in accs])
    return ResolveReply(status="local", domain=dn,
                        accounts=[AccountRef(account_id=a.id, address=a.address, full=_full(a))
                                  for a in live])


def _full(a: Any) -> bool:
    quota = getattr(a, "quota_bytes", None)
    return quota is not None and (getattr(a, "used_bytes", 0) or 0) >= quota


def _check_pop3(policy: str, days: int | None) -> None:
    if policy not in POP3_POLICIES:
        raise Invalid(f"pop3_policy must be one of {', '.join(POP3_POLICIES)}")
    if days is not None and days < 0:
        raise Invalid("pop3_expire_days must be >= 0")
