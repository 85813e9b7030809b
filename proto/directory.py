"""Directory contracts (served by mailbox-store): resolve recipients, authenticate logins.

smtp-ingress, imap-access and pop3-access use only these, never the database.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from postbus.proto.base import Model, Rpc


class AccountRef(Model):
    account_id: int
    address: str  # canonical, lower-case domain
    # at or over its quota when resolved: SMTP answers 452 4.2.2 at RCPT instead of
    # accepting mail that would only bounce (backscatter)
    full: bool = False


class ResolveRequest(Model):
    address: str  # as given in RCPT TO (without angle brackets)


class ResolveReply(Model):
    """``local``: deliver to ``accounts`` (an alias may fan out to several).
    ``unknown``: the domain is ours but nobody is there (550 5.1.1).
    ``remote``: the domain is not ours (relay only when authenticated).
    ``disabled``: the account exists but does not take mail (550 5.2.1)."""

    status: Literal["local", "unknown", "remote", "disabled"]
    accounts: list[AccountRef] = Field(default_factory=list)
    domain: str = ""


DIRECTORY_RESOLVE = Rpc(
    "directory.resolve.v1", ResolveRequest, ResolveReply,
    "Resolve one recipient address (aliases, catch-all, sub-addressing)",
)


class AuthRequest(Model):
    username: str
    password: str
    service: Literal["smtp", "imap", "pop3", "api"] = "imap"
    client_ip: str | None = None


class AuthReply(Model):
    ok: bool
    account_id: int | None = None
    address: str | None = None
    reason: str | None = None  # "invalid", "disabled", "throttled"
    # addresses this account may use as envelope sender / From (own + aliases pointing at
    # it); filled in for the services that send (smtp, api), empty for imap and pop3
    send_as: list[str] = Field(default_factory=list)
    pop3_policy: Literal["client", "keep", "delete"] = "client"
    pop3_expire_days: int | None = None


DIRECTORY_AUTHENTICATE = Rpc(
    "directory.authenticate.v1", AuthRequest, AuthReply,
    "Check a login; replies ok=false (never an error) for bad credentials",
)


class SendAsRequest(Model):
    account_id: int


class SendAsReply(Model):
    addresses: list[str] = Field(default_factory=list)


DIRECTORY_SEND_AS = Rpc(
    "directory.send_as.v1", SendAsRequest, SendAsReply,
    "Addresses an account may send as (its own and aliases that deliver to it)",
)
