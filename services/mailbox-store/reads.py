"""The store's read requests as plain calls on a repository: SELECT pages, FETCH metadata,
STATUS, LIST, and an EXPUNGE that finds nothing to remove. ``StoreApi`` serves them over
NATS; imap-access runs the same code on a read-only repository of its own (ADR 0012), so
both answer alike by construction.

A read that would write (INBOX created on an account's first use, a SELECT that claims
\\Recent) raises ``NeedsWriter`` on a read-only repository; the caller then asks the store.
"""

from __future__ import annotations

from postbus.mailbox_store.repository import Change, Repository
from postbus.proto.store import (
    ExpungeReply,
    ExpungeRequest,
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
# the most a page of UIDs may hold, whatever the request asks: 40,000 UIDs of up to 10
# digits stay under PAGE_BYTES
MAX_UID_PAGE = 40_000


class StoreReads:
    def __init__(self, repo: Repository, *, max_uid_page: int = MAX_UID_PAGE) -> None:
        self.repo = repo
        self.max_uid_page = max_uid_page  # tests make pages small to see them followed

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

    async def expunge_change(self, req: ExpungeRequest) -> tuple[ExpungeReply, Change | None]:
        """EXPUNGE, and the change to announce. With nothing \\Deleted it is a read (so
        imap-access answers it); otherwise a write, NeedsWriter on a read-only repository."""
        expunged, hms, change, more = await self.repo.expunge(
            req.account_id, req.mailbox_id, req.uids, limit=min(req.limit, self.max_uid_page))
        return ExpungeReply(expunged=expunged, highestmodseq=hms, more=more), change

    async def expunge(self, req: ExpungeRequest) -> ExpungeReply:
        return (await self.expunge_change(req))[0]
