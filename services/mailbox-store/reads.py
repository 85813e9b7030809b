"""The store's read requests as plain calls on a repository: SELECT pages, FETCH metadata,
STATUS and LIST. ``StoreApi`` serves them over NATS; imap-access runs the same code on a
read-only repository of its own (ADR 0012), so both answer alike by construction.

A read that would write (INBOX created on an account's first use, a SELECT that claims
\\Recent) raises ``NeedsWriter`` on a read-only repository; the caller then asks the store.
"""

from __future__ import annotations

from postbus.mailbox_store.repository import Repository
from postbus.proto.store import (
    FetchReply,
    FetchRequest,
    MailboxInfo,
    MailboxListReply,
    MailboxListRequest,
    MailboxRef,
    SelectReply,
    SelectRequest,
)

# SELECT snapshots: about 45 octets a message (UID, flags, MODSEQ), so 10,000 is ~450 KB
MAX_SELECT_PAGE = 10_000


class StoreReads:
    def __init__(self, repo: Repository) -> None:
        self.repo = repo

    async def mailbox_list(self, req: MailboxListRequest) -> MailboxListReply:
        return MailboxListReply(mailboxes=await self.repo.list_mailboxes(
            req.account_id, req.subscribed_only))

    async def mailbox_status(self, req: MailboxRef) -> MailboxInfo:
        return await self.repo.status(req.account_id, req.name)

    async def select(self, req: SelectRequest) -> SelectReply:
        info, msgs, more, vanished, recent_uid = await self.repo.select(
            req.account_id, req.mailbox_id, name=req.name, after_uid=req.after_uid,
            limit=max(1, min(req.limit, MAX_SELECT_PAGE)), changed_since=req.changed_since,
            claim_recent=req.claim_recent)
        return SelectReply(mailbox=info, messages=msgs, more=more, vanished=vanished,
                           recent_uid=recent_uid)

    async def fetch(self, req: FetchRequest) -> FetchReply:
        return FetchReply(messages=await self.repo.fetch(
            req.account_id, req.mailbox_id, req.uids, req.with_summary))
