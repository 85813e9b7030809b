"""The store API (proto/store.py) served over NATS request/reply in the "mailbox-store"
queue group, for imap-access and pop3-access. Errors travel as RemoteError codes
(not_found, exists, invalid, over_quota, conflict); MAILBOX_CHANGED follows each commit.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel

from postbus.kit.blob import BlobNotFound, BlobStore, BlobUnavailable, blob_key
from postbus.kit.bus import Bus, RemoteError
from postbus.kit.flow import ByteGate
from postbus.kit.logging import get_logger
from postbus.mailbox_store.delivery import keep_body, publish_change
from postbus.mailbox_store.reads import MAX_SELECT_PAGE, MAX_UID_PAGE, StoreReads
from postbus.mailbox_store.repository import Change, Limit, NewMessage, Repository, StoreError
from postbus.mailbox_store.settings import Settings
from postbus.proto.base import Rpc
from postbus.proto.mail import MessageSummary
from postbus.proto.store import (
    PAGE_BYTES,
    STORE_APPEND,
    STORE_BODIES,
    STORE_COPY,
    STORE_EXPUNGE,
    STORE_FETCH,
    STORE_FLAGS,
    STORE_MAILBOX_CREATE,
    STORE_MAILBOX_DELETE,
    STORE_MAILBOX_LIST,
    STORE_MAILBOX_RENAME,
    STORE_MAILBOX_STATUS,
    STORE_MAILBOX_SUBSCRIBE,
    STORE_POP3_COMMIT,
    STORE_POP3_MAILDROP,
    STORE_QUOTA,
    STORE_SEARCH,
    STORE_SELECT,
    AppendMessage,
    AppendReply,
    AppendRequest,
    BodiesReply,
    BodiesRequest,
    CopyReply,
    CopyRequest,
    ExpungeReply,
    ExpungeRequest,
    MailboxCreateRequest,
    MailboxInfo,
    MailboxRef,
    MailboxRenameRequest,
    Ok,
    Pop3CommitRequest,
    Pop3MaildropReply,
    Pop3MaildropRequest,
    QuotaReply,
    QuotaRequest,
    SearchKey,
    SearchReply,
    SearchRequest,
    SelectReply,
    StoreFlagsReply,
    StoreFlagsRequest,
    SubscribeRequest,
)
from postbus.protocols.mime import summarize
from postbus.protocols.searchtext import MAX_TEXT, header_values, message_text
from postbus.protocols.served import normalize_crlf, served

log = get_logger(__name__)
QUEUE = "mailbox-store"
# POP3 messages are cut at PAGE_BYTES too (their prefixes vary)
MAX_POP3_PAGE = 5_000
# STORE answers every changed message (~45 octets), COPY two UID lists (up to ~22 octets):
# larger sets are refused before anything changes, so a reply is never lost as too large
MAX_STORE_SET = 10_000
MAX_COPY_SET = 25_000
Req = TypeVar("Req", bound=BaseModel)
Rep = TypeVar("Rep", bound=BaseModel)


class StoreApi(StoreReads):
    """Every store request over NATS; the reads are StoreReads' (shared with imap-access)."""

    def __init__(self, bus: Bus, blobs: BlobStore, repo: Repository, settings: Settings, *,
                 max_uid_page: int = MAX_UID_PAGE, max_pop3_page: int = MAX_POP3_PAGE) -> None:
        self.bus = bus
        self.blobs = blobs
        # small bodies are in the blob rows, not in S3 (ADR 0014): every reader of this
        # BlobStore in the store (search, export, the management API) finds them there
        blobs.inline = repo
        super().__init__(repo, max_uid_page=max_uid_page)
        self.settings = settings
        self.max_pop3_page = max_pop3_page
        # message bodies that searches hold in memory at once, all searches together
        self.search_gate = ByteGate(settings.search_bytes_in_flight)

    async def serve(self) -> None:
        routes: list[tuple[Rpc[Any, Any], Callable[[Any], Awaitable[Any]]]] = [
            (STORE_MAILBOX_LIST, self.mailbox_list),
            (STORE_MAILBOX_STATUS, self.mailbox_status),
            (STORE_MAILBOX_CREATE, self.mailbox_create),
            (STORE_MAILBOX_DELETE, self.mailbox_delete),
            (STORE_MAILBOX_RENAME, self.mailbox_rename),
            (STORE_MAILBOX_SUBSCRIBE, self.mailbox_subscribe),
            (STORE_SELECT, self.select),
            (STORE_FETCH, self.fetch),
            (STORE_BODIES, self.bodies),
            (STORE_FLAGS, self.flags),
            (STORE_COPY, self.copy),
            (STORE_APPEND, self.append),
            (STORE_EXPUNGE, self.expunge),
            (STORE_SEARCH, self.search),
            (STORE_QUOTA, self.quota),
            (STORE_POP3_MAILDROP, self.pop3_maildrop),
            (STORE_POP3_COMMIT, self.pop3_commit),
        ]
        for rpc, handler in routes:
            await self.bus.serve(rpc, _errors(handler), queue=QUEUE)

    # ------------------------------------------------------------ mailboxes
    async def mailbox_create(self, req: MailboxCreateRequest) -> MailboxInfo:
        return await self.repo.create_mailbox(req.account_id, req.name, req.special_use)

    async def mailbox_delete(self, req: MailboxRef) -> Ok:
        change = await self.repo.delete_mailbox(req.account_id, req.name)
        await publish_change(self.bus, change)
        return Ok()

    async def mailbox_rename(self, req: MailboxRenameRequest) -> Ok:
        change = await self.repo.rename_mailbox(req.account_id, req.old, req.new)
        await publish_change(self.bus, change)
        return Ok()

    async def mailbox_subscribe(self, req: SubscribeRequest) -> Ok:
        await self.repo.subscribe(req.account_id, req.name, req.subscribed)
        return Ok()

    # ------------------------------------------------------------ messages
    async def flags(self, req: StoreFlagsRequest) -> StoreFlagsReply:
        updated, modified, change = await self.repo.store_flags(
            req.account_id, req.mailbox_id, req.uids, req.op, req.flags, req.unchanged_since,
            max_messages=MAX_STORE_SET)
        await publish_change(self.bus, change, req.origin)
        return StoreFlagsReply(updated=updated, modified=modified)

    async def copy(self, req: CopyRequest) -> CopyReply:
        uv, src, dst, changes = await self.repo.copy(
            req.account_id, req.mailbox_id, req.uids, req.target, req.move,
            max_messages=MAX_COPY_SET)
        for c in changes:
            await publish_change(self.bus, c, req.origin)
        return CopyReply(uidvalidity=uv, source_uids=src, target_uids=dst)

    async def append(self, req: AppendRequest) -> AppendReply:
        msgs = []
        each: list[AppendRequest | AppendMessage] = [req, *req.more]
        for m in each:  # MULTIAPPEND (RFC 3502): all in one transaction
            key, size, summary, body = await self._append_body(m)
            msgs.append(NewMessage(blob_key=key, blob_size=size, summary=summary,
                                   flags=m.flags, internaldate=m.internaldate, body=body))
        claim = req.sync_after_uid is not None
        uv, uids, change = await self.repo.append_many(req.account_id, req.mailbox, msgs,
                                                       claim_recent=claim)
        await publish_change(self.bus, change, req.origin)
        sync = None
        if req.sync_after_uid is not None and change.recent_from is not None:
            sync = await self._sync_page(req.account_id, change, req.sync_after_uid)
        return AppendReply(uidvalidity=uv, uid=uids[0], uids=uids if req.more else [],
                           sync=sync)

    async def _sync_page(self, account_id: int, change: Change, after_uid: int) -> SelectReply:
        """The selected view's new messages up to the UIDNEXT the APPEND claimed to: later
        ones are not \\Recent for this caller and reach it by notification, as usual."""
        info, page, more, _, _ = await self.repo.select(
            account_id, change.mailbox_id, after_uid=after_uid,
            limit=min(self.max_uid_page, MAX_SELECT_PAGE))  # SELECT's bound, as a SELECT page
        upto = [m for m in page if m.uid < change.uidnext]
        more = more and len(upto) == len(page)
        info = info.model_copy(update={"uidnext": change.uidnext})
        return SelectReply(mailbox=info, messages=upto, more=more, recent_uid=change.recent_from)

    async def _append_body(self, req: AppendRequest | AppendMessage
                           ) -> tuple[str, int, MessageSummary, bytes | None]:
        """Blob key, size, summary and inline body of an APPEND: as imap-access sent them,
        or made here from the literal or an uploaded blob, with the CRLF line ends IMAP
        serves. A small body is kept in the blob row instead of S3 (ADR 0014)."""
        if req.body is not None:
            try:
                key, body = await keep_body(self.blobs, self.settings.common.inline_body_max,
                                            req.body, req.blob_key)
            except ValueError as exc:
                raise RemoteError("invalid", str(exc)) from exc
            summary = req.summary
            if summary is None:
                summary = await asyncio.get_running_loop().run_in_executor(
                    None, summarize, req.body)
            return key, len(req.body), summary, body
        if req.blob_key and req.summary is not None and req.blob_size is not None:
            return req.blob_key, req.blob_size, req.summary, None
        if req.message is not None:
            raw = normalize_crlf(req.message)
            if len(raw) <= self.settings.common.inline_body_max:
                summary = await asyncio.get_running_loop().run_in_executor(None, summarize, raw)
                return blob_key(raw), len(raw), summary, raw
            key = await self.blobs.put(raw)
        elif req.blob_key:
            try:
                raw = await self.blobs.get(req.blob_key)
            except BlobNotFound as exc:
                raise RemoteError("invalid", f"no blob {req.blob_key}") from exc
            key = req.blob_key
            fixed = normalize_crlf(raw)
            if fixed != raw:  # store what IMAP will serve, with CRLF line ends
                raw = fixed
                key = await self.blobs.put(raw)
        else:
            raise RemoteError("invalid", "append needs message or blob_key")
        summary = await asyncio.get_running_loop().run_in_executor(None, summarize, raw)
        return key, len(raw), summary, None

    async def bodies(self, req: BodiesRequest) -> BodiesReply:
        return BodiesReply(bodies=await self.repo.inline_bodies(req.keys))

    async def expunge(self, req: ExpungeRequest) -> ExpungeReply:
        reply, change = await self.expunge_change(req)
        await publish_change(self.bus, change, req.origin)
        return reply

    async def search(self, req: SearchRequest) -> SearchReply:
        budget = SearchBudget(text_left=self.settings.search_text_budget,
                              deadline=time.monotonic() + self.settings.search_time_s)

        async def match(rows: list[Any], leaves: list[tuple[str, SearchKey]]
                        ) -> dict[int, dict[int, bool]]:
            return await self._match_blobs(rows, leaves, budget)

        uids, top, more = await self.repo.search(
            req.account_id, req.mailbox_id, req.key, match,
            after_uid=req.after_uid, limit=min(req.limit, self.max_uid_page))
        return SearchReply(uids=uids, highestmodseq=top, more=more)

    async def _match_blobs(self, rows: list[Any], leaves: list[tuple[str, SearchKey]],
                           budget: SearchBudget) -> dict[int, dict[int, bool]]:
        """Evaluate body/text/header leaves on the candidate messages: blobs read with
        bounded concurrency and bytes in memory, text decoded in worker threads with a
        bound per message, the whole search within its time and text budget (else Limit;
        the TaskGroup cancels what is still waiting)."""
        sem = asyncio.Semaphore(self.settings.search_blob_concurrency)
        loop = asyncio.get_running_loop()
        per_message = self.settings.search_text_per_message
        results: dict[int, dict[int, bool]] = {}

        async def one(row: Any) -> None:
            async with sem, self.search_gate.hold(int(row.size or 0)):
                budget.check()
                try:
                    blob = await self.blobs.get(row.blob_key)
                except (BlobNotFound, BlobUnavailable) as exc:
                    log.warning("search could not read a blob", key=row.blob_key, error=str(exc))
                    results[row.uid] = {}
                    return
                raw = served(bytes(row.prefix or b""), blob)
                del blob
                found, used = await loop.run_in_executor(None, eval_leaves, raw, leaves,
                                                         per_message)
            budget.spend(used)
            results[row.uid] = found

        try:
            async with asyncio.TaskGroup() as tg:
                for r in rows:
                    tg.create_task(one(r))
        except* Limit as eg:
            raise eg.exceptions[0] from None
        return results

    async def quota(self, req: QuotaRequest) -> QuotaReply:
        used, limit, messages = await self.repo.quota(req.account_id)
        return QuotaReply(used_bytes=used, limit_bytes=limit, messages=messages)

    async def pop3_maildrop(self, req: Pop3MaildropRequest) -> Pop3MaildropReply:
        mid, uv, msgs, more = await self.repo.pop3_maildrop(
            req.account_id, after_uid=req.after_uid, limit=min(req.limit, self.max_pop3_page),
            max_bytes=PAGE_BYTES)
        return Pop3MaildropReply(mailbox_id=mid, uidvalidity=uv, messages=msgs, more=more)

    async def pop3_commit(self, req: Pop3CommitRequest) -> Ok:
        changes = await self.repo.pop3_commit(req.account_id, req.mailbox_id, req.delete_uids,
                                              req.mode, req.seen_uids)
        for c in changes:
            await publish_change(self.bus, c)
        return Ok()


@dataclass
class SearchBudget:
    """What one STORE_SEARCH request may spend on message text: characters decoded and
    wall time. Past either the search is refused with Limit, not left running."""

    text_left: int
    deadline: float

    def check(self) -> None:
        if time.monotonic() > self.deadline:
            raise Limit("search took too long; narrow it (fewer messages or no BODY/TEXT)")
        if self.text_left <= 0:
            raise Limit("search would read too much text; narrow it")

    def spend(self, chars: int) -> None:
        self.text_left -= chars
        self.check()


def eval_leaves(raw: bytes, leaves: list[tuple[str, SearchKey]],
                per_message: int = MAX_TEXT) -> tuple[dict[int, bool], int]:
    """Body/text/header leaves on one message: which match, and the characters decoded.
    A message the parser gives up on matches nothing; it never fails the search."""
    out: dict[int, bool] = {}
    texts: dict[str, str] = {}
    used = 0
    for i, (_name, k) in enumerate(leaves):
        op = k.op.lower()
        out[i] = False
        try:
            if op in ("body", "text"):
                if op not in texts:
                    texts[op] = message_text(raw, headers=op == "text",
                                             limit=per_message).casefold()
                    used += len(texts[op])
                out[i] = (k.args[0] if k.args else "").casefold() in texts[op]
            else:  # header with a field that has no column
                values = header_values(raw, k.args[0] if k.args else "", per_message)
                used += sum(len(v) for v in values)
                needle = (k.args[1] if len(k.args) > 1 else "").casefold()
                out[i] = any(needle in v.casefold() for v in values) if needle else bool(values)
        except Exception:
            log.exception("search could not read a message")
    return out, used


def _errors(handler: Callable[[Req], Awaitable[Rep]]) -> Callable[[Req], Awaitable[Rep]]:
    """Repository errors to RemoteError codes."""

    async def wrapped(req: Req) -> Rep:
        try:
            return await handler(req)
        except StoreError as exc:
            raise RemoteError(exc.code, exc.message) from exc
        except BlobUnavailable as exc:
            raise RemoteError("unavailable", str(exc)) from exc

    return wrapped
