"""In-memory implementations of the imap-access ports (directory, store, blobs, changes):
for session tests, socket tests and benchmarks, and as a readable statement of what the
session expects from the store. Not used by the running service.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime

from postbus.imap_access.ports import StoreError, Unsubscribe
from postbus.proto.directory import AuthReply
from postbus.proto.mail import MailboxChanged, MessageChange
from postbus.proto.store import (
    AppendReply,
    AppendRequest,
    CopyReply,
    CopyRequest,
    ExpungeReply,
    ExpungeRequest,
    FetchReply,
    FetchRequest,
    MailboxCreateRequest,
    MailboxInfo,
    MailboxListReply,
    MailboxListRequest,
    MailboxRef,
    MailboxRenameRequest,
    MessageMeta,
    MessageState,
    QuotaReply,
    QuotaRequest,
    SearchKey,
    SearchReply,
    SearchRequest,
    SelectReply,
    SelectRequest,
    StoreFlagsReply,
    StoreFlagsRequest,
    SubscribeRequest,
)
from postbus.protocols import mime
from postbus.protocols.searchtext import address_text, compare_dates, written_date


@dataclass
class _Msg:
    uid: int
    blob_key: str
    blob_size: int
    flags: list[str]
    modseq: int
    internaldate: datetime
    prefix: bytes = b""


@dataclass
class _Box:
    id: int
    name: str
    uidvalidity: int
    special_use: str | None = None
    subscribed: bool = False
    uidnext: int = 1
    recent_uid: int = 1  # \Recent: UIDs from here up were claimed by no session yet
    highestmodseq: int = 1
    msgs: dict[int, _Msg] = field(default_factory=dict)  # insertion order = UID order


def _in(uid: int, ranges: list[tuple[int, int]]) -> bool:
    return any(a <= uid <= b for a, b in ranges)


class MemoryPlatform:
    """Accounts, mailboxes, messages and blobs in dicts; implements Directory, Store, Blobs
    and Changes (``changes`` is itself, the same object serves all four ports)."""

    def __init__(self) -> None:
        self.users: dict[str, tuple[str, int]] = {}  # address -> (password, account id)
        self.boxes: dict[int, dict[str, _Box]] = {}
        self.blobs: dict[str, bytes] = {}
        self.summaries: dict[str, object] = {}
        self.listeners: dict[int, list[Callable[[MailboxChanged], None]]] = {}
        self._ids = 0
        self._uidvalidity = 1000
        self.limit_bytes: int | None = None
        self.auth_calls = 0
        self.puts = 0  # bodies uploaded through the Blobs port (large APPENDs)
        self.serve_summaries = True  # False: like a store row without a summary
        self.dangling: dict[int, set[str]] = {}  # subscribed names with no mailbox
        # smaller STORE_SELECT / STORE_SEARCH / STORE_EXPUNGE pages than asked for
        self.page_limit: int | None = None

    # ------------------------------------------------------------ provisioning
    def add_user(self, address: str, password: str) -> int:
        self._ids += 1
        account = self._ids
        self.users[address.lower()] = (password, account)
        self.boxes[account] = {}
        self._new_box(account, "INBOX", subscribed=True)
        for name, use in (("Sent", "\\Sent"), ("Drafts", "\\Drafts"), ("Trash", "\\Trash"),
                          ("Junk", "\\Junk")):
            self._new_box(account, name, use, subscribed=True)
        return account

    def _new_box(self, account: int, name: str, special_use: str | None = None,
                 subscribed: bool = False) -> _Box:
        self._ids += 1
        self._uidvalidity += 1
        box = _Box(self._ids, name, self._uidvalidity, special_use, subscribed)
        self.boxes[account][name] = box
        return box

    def deliver(self, account: int, raw: bytes, mailbox: str = "INBOX",
                flags: list[str] | None = None, prefix: bytes = b"",
                internaldate: datetime | None = None, notify: bool = True) -> int:
        key = "blobs/" + hashlib.sha256(raw).hexdigest()
        self.blobs[key] = raw
        box = self.boxes[account][mailbox]
        box.highestmodseq += 1
        uid = box.uidnext
        box.uidnext += 1
        box.msgs[uid] = _Msg(uid, key, len(raw), list(flags or []), box.highestmodseq,
                             internaldate or datetime(2026, 11, 26, 12, 0, tzinfo=UTC), prefix)
        if notify:
            self._publish(account, box, added=[MessageChange(uid=uid, modseq=box.highestmodseq,
                                                              flags=list(flags or []))])
        return uid

    def _publish(self, account: int, box: _Box, *, added: list[MessageChange] | None = None,
                 flags: list[MessageChange] | None = None, expunged: list[int] | None = None,
                 origin: str | None = None) -> None:
        ev = MailboxChanged(account_id=account, mailbox_id=box.id, mailbox=box.name,
                            uidvalidity=box.uidvalidity, uidnext=box.uidnext,
                            highestmodseq=box.highestmodseq, exists=len(box.msgs),
                            added=added or [], flags=flags or [], expunged=expunged or [],
                            origin=origin)
        for cb in list(self.listeners.get(account, [])):
            cb(ev)

    def _box(self, account: int, name: str) -> _Box:
        box = self.boxes.get(account, {}).get(name)
        if box is None:
            raise StoreError("not_found", name)
        return box

    def _box_by_id(self, account: int, mailbox_id: int) -> _Box:
        for b in self.boxes.get(account, {}).values():
            if b.id == mailbox_id:
                return b
        raise StoreError("not_found", str(mailbox_id))

    def _info(self, b: _Box) -> MailboxInfo:
        return MailboxInfo(
            mailbox_id=b.id, name=b.name, special_use=b.special_use, subscribed=b.subscribed,
            uidvalidity=b.uidvalidity, uidnext=b.uidnext, highestmodseq=b.highestmodseq,
            messages=len(b.msgs), unseen=sum(1 for m in b.msgs.values() if "\\Seen" not in m.flags),
            recent=sum(1 for u in b.msgs if u >= b.recent_uid),
            size=sum(m.blob_size + len(m.prefix) for m in b.msgs.values()),
            deleted=sum(1 for m in b.msgs.values() if "\\Deleted" in m.flags))

    # ------------------------------------------------------------ Directory
    async def authenticate(self, username: str, password: str,
                           client_ip: str | None) -> AuthReply:
        self.auth_calls += 1
        u = self.users.get(username.lower())
        if u is None or u[0] != password:
            return AuthReply(ok=False, reason="invalid")
        return AuthReply(ok=True, account_id=u[1], address=username.lower())

    # ------------------------------------------------------------ Blobs
    async def get_many(self, keys: list[str]) -> dict[str, bytes]:
        return {k: self.blobs[k] for k in keys if k in self.blobs}

    async def put(self, data: bytes) -> str:
        key = "blobs/" + hashlib.sha256(data).hexdigest()
        self.blobs[key] = data
        self.puts += 1
        return key

    # ------------------------------------------------------------ Changes
    async def subscribe(self, account_id: int,
                        callback: Callable[[MailboxChanged], None]) -> Unsubscribe:
        self.listeners.setdefault(account_id, []).append(callback)

        async def unsubscribe() -> None:
            cbs = self.listeners.get(account_id, [])
            if callback in cbs:
                cbs.remove(callback)

        return unsubscribe

    # ------------------------------------------------------------ Store: mailboxes
    async def mailbox_list(self, req: MailboxListRequest) -> MailboxListReply:
        boxes = self.boxes.get(req.account_id, {})
        out = [self._info(b) for b in boxes.values() if b.subscribed or not req.subscribed_only]
        if req.subscribed_only:  # like mailbox-store: subscriptions to names that do not exist
            out += [MailboxInfo(mailbox_id=0, name=n, attributes=["\\NonExistent"],
                                subscribed=True, uidvalidity=0, uidnext=0, highestmodseq=0,
                                messages=0, unseen=0)
                    for n in sorted(self.dangling.get(req.account_id, set()) - set(boxes))]
        return MailboxListReply(mailboxes=out)

    async def mailbox_status(self, req: MailboxRef) -> MailboxInfo:
        return self._info(self._box(req.account_id, req.name))

    async def mailbox_create(self, req: MailboxCreateRequest) -> MailboxInfo:
        boxes = self.boxes[req.account_id]
        if req.name in boxes:
            raise StoreError("exists", req.name)
        parts = req.name.split("/")
        if "" in parts:  # like mailbox-store's normalize_name
            raise StoreError("invalid", "mailbox name has an empty level")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent not in boxes:
                self._new_box(req.account_id, parent)
        return self._info(self._new_box(req.account_id, req.name, req.special_use))

    async def mailbox_delete(self, req: MailboxRef) -> None:
        if req.name == "INBOX":
            raise StoreError("invalid", "INBOX cannot be deleted")
        self._box(req.account_id, req.name)
        del self.boxes[req.account_id][req.name]

    async def mailbox_rename(self, req: MailboxRenameRequest) -> None:
        boxes = self.boxes[req.account_id]
        src = self._box(req.account_id, req.old)
        if req.new in boxes:
            raise StoreError("exists", req.new)
        if req.old == "INBOX":
            new = self._new_box(req.account_id, req.new)
            new.msgs, src.msgs = src.msgs, {}
            new.uidnext, new.recent_uid = src.uidnext, src.recent_uid
            return
        for name in [n for n in boxes if n == req.old or n.startswith(req.old + "/")]:
            b = boxes.pop(name)
            b.name = req.new + name[len(req.old):]
            boxes[b.name] = b

    async def mailbox_subscribe(self, req: SubscribeRequest) -> None:
        b = self.boxes.get(req.account_id, {}).get(req.name)
        if b is not None:
            b.subscribed = req.subscribed
        else:  # the name need not exist (RFC 3501 §6.3.6)
            names = self.dangling.setdefault(req.account_id, set())
            (names.add if req.subscribed else names.discard)(req.name)

    # ------------------------------------------------------------ Store: messages
    async def select(self, req: SelectRequest) -> SelectReply:
        b = (self._box(req.account_id, req.name) if req.name is not None
             else self._box_by_id(req.account_id, req.mailbox_id))
        msgs = [m for u, m in b.msgs.items() if u > req.after_uid
                and (req.changed_since is None or m.modseq > req.changed_since)]
        limit = min(req.limit, self.page_limit or req.limit)
        page = msgs[:limit]
        # like mailbox-store: a claim takes what no session has claimed, up to UIDNEXT
        recent_uid = b.recent_uid
        if req.claim_recent:
            recent_uid = min(b.recent_uid, b.uidnext)
            b.recent_uid = max(b.recent_uid, b.uidnext)
        return SelectReply(mailbox=self._info(b), more=len(msgs) > limit,
                           messages=[MessageState(uid=m.uid, flags=list(m.flags),
                                                  modseq=m.modseq) for m in page],
                           recent_uid=recent_uid)

    def _meta(self, m: _Msg, with_summary: bool) -> MessageMeta:
        summary = None
        if with_summary and self.serve_summaries:
            summary = self.summaries.get(m.blob_key)
            if summary is None:
                summary = mime.summarize(self.blobs[m.blob_key])
                self.summaries[m.blob_key] = summary
        return MessageMeta(uid=m.uid, flags=list(m.flags), modseq=m.modseq,
                           internaldate=m.internaldate, size=len(m.prefix) + m.blob_size,
                           blob_key=m.blob_key, blob_size=m.blob_size, prefix=m.prefix,
                           summary=summary)  # type: ignore[arg-type]

    async def fetch(self, req: FetchRequest) -> FetchReply:
        b = self._box_by_id(req.account_id, req.mailbox_id)
        out: list[MessageMeta] = []
        for lo, hi in req.uids:
            if hi - lo < len(b.msgs):
                out.extend(self._meta(b.msgs[u], req.with_summary)
                           for u in range(lo, hi + 1) if u in b.msgs)
            else:
                out.extend(self._meta(m, req.with_summary) for u, m in b.msgs.items()
                           if lo <= u <= hi)
        return FetchReply(messages=sorted(out, key=lambda m: m.uid))

    async def flags(self, req: StoreFlagsRequest) -> StoreFlagsReply:
        b = self._box_by_id(req.account_id, req.mailbox_id)
        updated, modified, changes = [], [], []
        for u, m in b.msgs.items():
            if not _in(u, req.uids):
                continue
            if req.unchanged_since is not None and m.modseq > req.unchanged_since:
                modified.append(u)
                continue
            if req.op == "set":
                new = list(dict.fromkeys(req.flags))
            elif req.op == "add":
                new = m.flags + [f for f in req.flags if f not in m.flags]
            else:
                new = [f for f in m.flags if f not in req.flags]
            if set(new) != set(m.flags):  # like mailbox-store: only what changed
                b.highestmodseq += 1
                m.flags, m.modseq = new, b.highestmodseq
                changes.append(MessageChange(uid=u, modseq=m.modseq, flags=list(new)))
                updated.append(MessageState(uid=u, flags=list(m.flags), modseq=m.modseq))
        if changes:
            self._publish(req.account_id, b, flags=changes, origin=req.origin)
        return StoreFlagsReply(updated=updated, modified=modified)

    async def copy(self, req: CopyRequest) -> CopyReply:
        src = self._box_by_id(req.account_id, req.mailbox_id)
        dst = self._box(req.account_id, req.target)
        s_uids, t_uids, added = [], [], []
        for u, m in list(src.msgs.items()):
            if not _in(u, req.uids):
                continue
            dst.highestmodseq += 1
            nu = dst.uidnext
            dst.uidnext += 1
            dst.msgs[nu] = _Msg(nu, m.blob_key, m.blob_size, list(m.flags), dst.highestmodseq,
                                m.internaldate, m.prefix)
            s_uids.append(u)
            t_uids.append(nu)
            added.append(MessageChange(uid=nu, modseq=dst.highestmodseq, flags=list(m.flags)))
        # like mailbox-store: one change, then the other (a MOVE into the source mailbox
        # itself adds the new UIDs and expunges the old ones at once)
        if req.move and s_uids:
            src.highestmodseq += 1
            for u in s_uids:
                del src.msgs[u]
        if added:
            self._publish(req.account_id, dst, added=added, origin=req.origin)
        if req.move and s_uids:
            self._publish(req.account_id, src, expunged=s_uids, origin=req.origin)
        return CopyReply(uidvalidity=dst.uidvalidity, source_uids=s_uids, target_uids=t_uids)

    async def append(self, req: AppendRequest) -> AppendReply:
        box = self._box(req.account_id, req.mailbox)
        raw = req.message if req.message is not None else self.blobs.get(req.blob_key or "")
        if raw is None:
            raise StoreError("invalid", "no message")
        if self.limit_bytes is not None:
            used = sum(m.blob_size for bx in self.boxes[req.account_id].values()
                       for m in bx.msgs.values())
            if used + len(raw) > self.limit_bytes:
                raise StoreError("over_quota", "quota exceeded")
        uid = self.deliver(req.account_id, raw, req.mailbox, req.flags,
                           internaldate=req.internaldate)
        return AppendReply(uidvalidity=box.uidvalidity, uid=uid)

    async def expunge(self, req: ExpungeRequest) -> ExpungeReply:
        b = self._box_by_id(req.account_id, req.mailbox_id)
        gone = sorted(u for u, m in b.msgs.items() if "\\Deleted" in m.flags
                      and (req.uids is None or _in(u, req.uids)))
        limit = max(1, min(req.limit, self.page_limit or req.limit))
        more = len(gone) > limit
        gone = gone[:limit]
        if gone:
            b.highestmodseq += 1
            for u in gone:
                del b.msgs[u]
            self._publish(req.account_id, b, expunged=gone, origin=req.origin)
        return ExpungeReply(expunged=gone, highestmodseq=b.highestmodseq, more=more)

    async def search(self, req: SearchRequest) -> SearchReply:
        b = self._box_by_id(req.account_id, req.mailbox_id)
        hits = sorted((m for m in b.msgs.values() if m.uid > req.after_uid
                       and self._match(m, req.key)), key=lambda m: m.uid)
        limit = max(1, min(req.limit, self.page_limit or req.limit))
        page = hits[:limit]
        return SearchReply(uids=[m.uid for m in page], more=len(hits) > limit,
                           highestmodseq=max((m.modseq for m in page), default=0))

    def _match(self, m: _Msg, k: SearchKey) -> bool:
        a = k.args
        match k.op:
            case "all":
                return True
            case "and":
                return all(self._match(m, c) for c in k.children)
            case "or":
                return any(self._match(m, c) for c in k.children)
            case "not":
                return not all(self._match(m, c) for c in k.children)
            case "uid":
                return _in(m.uid, k.uids)
            case "flag":
                return a[0].lower() in (f.lower() for f in m.flags)
            case "unflag":
                return a[0].lower() not in (f.lower() for f in m.flags)
            case "larger":
                return m.blob_size + len(m.prefix) > int(a[0])
            case "smaller":
                return m.blob_size + len(m.prefix) < int(a[0])
            case "modseq":
                return m.modseq >= int(a[0])
            case "before" | "on" | "since":
                d, ref = m.internaldate.date(), date.fromisoformat(a[0])
                return {"before": d < ref, "on": d == ref, "since": d >= ref}[k.op]
        raw = m.prefix + self.blobs[m.blob_key]
        hdr = raw[:mime.header_block_end(raw, 0, len(raw))]
        fields = mime.parse_headers(hdr)

        def header(name: str) -> str:
            return " ".join(v.decode("utf-8", "replace") for n, v in fields if n == name)

        needle = (a[-1] if a else "").lower()
        match k.op:
            case "header":
                return needle in header(a[0].lower()).lower() if needle else any(
                    n == a[0].lower() for n, _ in fields)
            case "from" | "to" | "cc" | "bcc":
                return needle in address_text(mime.decode_words(header(k.op))).lower()
            case "subject":
                return needle in mime.decode_words(header(k.op)).lower()
            case "body":
                return needle in raw[len(hdr):].decode("utf-8", "replace").lower()
            case "text":
                return needle in raw.decode("utf-8", "replace").lower()
            case "sentbefore" | "senton" | "sentsince":
                # the Date: field's date as written; without one the INTERNALDATE's (as the
                # store does)
                d = written_date(header("date")) or m.internaldate.date()
                return compare_dates(k.op, d, date.fromisoformat(a[0]))
        raise StoreError("invalid", f"unknown search key {k.op}")

    async def quota(self, req: QuotaRequest) -> QuotaReply:
        msgs = [m for b in self.boxes.get(req.account_id, {}).values() for m in b.msgs.values()]
        return QuotaReply(used_bytes=sum(m.blob_size for m in msgs), limit_bytes=self.limit_bytes,
                          messages=len(msgs))
