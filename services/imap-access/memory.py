"""In-memory implementations of the imap-access ports (directory, store, blobs, changes):
for session tests, socket tests and benchmarks, and as a readable statement of what the
session expects from the store. Not used by the running service.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime

from postbus.imap_access.ports import StoreError, Unsubscribe
from postbus.proto.directory import AuthReply
from postbus.proto.mail import MailboxChanged, MessageChange
from postbus.proto.store import (
    AppendMessage,
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
    uid_ranges,
)
from postbus.protocols import mime
from postbus.protocols.searchtext import (
    address_text,
    compare_dates,
    header_values,
    message_text,
    written_date,
)
from postbus.protocols.served import normalize_crlf, served, served_size

# as mailbox-store has them (sqlbase.py): the reference this store is checked against by
# tests/socket/test_store_port_contract.py
DELIMITER = "/"
DEFAULT_MAILBOXES: tuple[tuple[str, str | None], ...] = (
    ("INBOX", None), ("Sent", "\\Sent"), ("Drafts", "\\Drafts"), ("Trash", "\\Trash"),
    ("Junk", "\\Junk"), ("Archive", "\\Archive"))
SPECIAL_USES = frozenset(u for _, u in DEFAULT_MAILBOXES if u) | {"\\All", "\\Flagged"}
SYSTEM_FLAGS = {f.lower(): f for f in ("\\Seen", "\\Answered", "\\Flagged", "\\Deleted",
                                       "\\Draft")}
MAX_NAME = 1024
MAX_MAILBOXES = 2000
MAX_KEYWORDS = 100
MAX_KEYWORD_LEN = 100
_KEYWORD_RE = re.compile(r'^[^\x00-\x20\x7f(){%*"\\\]]+$')


def _norm(name: str) -> str:
    """Canonical mailbox name: INBOX case-insensitive (RFC 3501 §5.1), a trailing
    delimiter dropped; empty levels, wildcards and controls refused."""
    if name.endswith(DELIMITER):
        name = name[:-1]
    if not name or len(name) > MAX_NAME:
        raise StoreError("invalid", "mailbox name is empty or too long")
    parts = name.split(DELIMITER)
    if "" in parts:
        raise StoreError("invalid", "mailbox name has an empty level")
    if any(ch in name for ch in "*%") or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in name):
        raise StoreError("invalid", "mailbox name contains a wildcard or a control character")
    if parts[0].upper() == "INBOX":
        parts[0] = "INBOX"
    return DELIMITER.join(parts)


def _parents(name: str) -> list[str]:
    parts = name.split(DELIMITER)
    return [DELIMITER.join(parts[:i]) for i in range(1, len(parts))]


def _flags(flags: Iterable[str]) -> list[str]:
    """Flags as the store keeps them: system flags in their canonical case, \\Recent and
    unknown system flags dropped, a keyword that is not an atom refused."""
    out: dict[str, None] = {}
    for f in flags:
        known = SYSTEM_FLAGS.get(f.lower())
        if known:
            out[known] = None
        elif f.startswith("\\"):
            continue
        elif f and len(f) <= MAX_KEYWORD_LEN and _KEYWORD_RE.match(f):
            out[f] = None
        else:
            raise StoreError("invalid", f"not a valid flag: {f!r}")
    return list(out)


def _keywords(flags: Iterable[str]) -> int:
    return sum(1 for f in flags if not f.startswith("\\"))




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
    noselect: bool = False  # deleted while it had children (RFC 3501 §6.3.4)
    expunged: dict[int, int] = field(default_factory=dict)  # UID -> MODSEQ, for VANISHED
    account: int = 0


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
        for name, use in DEFAULT_MAILBOXES:
            self._new_box(account, name, use, subscribed=True)
        return account

    def _new_box(self, account: int, name: str, special_use: str | None = None,
                 subscribed: bool = False) -> _Box:
        self._ids += 1
        self._uidvalidity += 1
        box = _Box(self._ids, name, self._uidvalidity, special_use, subscribed, account=account)
        self.boxes[account][name] = box
        return box

    def deliver(self, account: int, raw: bytes, mailbox: str = "INBOX",
                flags: list[str] | None = None, prefix: bytes = b"",
                internaldate: datetime | None = None, notify: bool = True,
                origin: str | None = None) -> int:
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
                                                              flags=list(flags or []))],
                          origin=origin)
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
        box = self.boxes.get(account, {}).get(_norm(name))
        if box is None:
            raise StoreError("not_found", name)
        return box

    def _target(self, account: int, name: str) -> _Box:
        """The mailbox an APPEND or COPY files into: a default folder the user deleted is
        made again (as mailbox-store does); a \\Noselect one does not exist."""
        name = _norm(name)
        boxes = self.boxes.get(account, {})
        use = dict(DEFAULT_MAILBOXES).get(name, "")
        if (name not in boxes and account in self.boxes and use != ""
                and all(b.special_use != use for b in boxes.values())):
            self._new_box(account, name, use, subscribed=True)
        box = boxes.get(name)
        if box is None or box.noselect:
            raise StoreError("not_found", name)
        return box

    def _used(self, account: int) -> int:
        return sum(served_size(m.prefix, m.blob_size) for b in self.boxes.get(account, {}).values()
                   for m in b.msgs.values())

    def _charge(self, account: int, nbytes: int) -> None:
        if self.limit_bytes is not None and self._used(account) + nbytes > self.limit_bytes:
            raise StoreError("over_quota", "quota exceeded")

    def _remove(self, account: int, b: _Box, uids: list[int], origin: str | None = None) -> None:
        """Expunge these UIDs with one new MODSEQ, remembered for VANISHED."""
        if not uids:
            return
        b.highestmodseq += 1
        for u in uids:
            del b.msgs[u]
            b.expunged[u] = b.highestmodseq
        self._publish(account, b, expunged=uids, origin=origin)

    def _box_by_id(self, account: int, mailbox_id: int) -> _Box:
        for b in self.boxes.get(account, {}).values():
            if b.id == mailbox_id:
                return b
        raise StoreError("not_found", str(mailbox_id))

    def _info(self, b: _Box) -> MailboxInfo:
        children = any(n.startswith(b.name + DELIMITER) for n in self.boxes.get(b.account, {}))
        attrs = ["\\HasChildren" if children else "\\HasNoChildren"]
        if b.noselect:
            attrs.append("\\Noselect")
        return MailboxInfo(
            mailbox_id=b.id, name=b.name, special_use=b.special_use, attributes=attrs,
            subscribed=b.subscribed,
            uidvalidity=b.uidvalidity, uidnext=b.uidnext, highestmodseq=b.highestmodseq,
            messages=len(b.msgs), unseen=sum(1 for m in b.msgs.values() if "\\Seen" not in m.flags),
            recent=sum(1 for u in b.msgs if u >= b.recent_uid),
            size=sum(served_size(m.prefix, m.blob_size) for m in b.msgs.values()),
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
        name = _norm(req.name)
        if req.special_use is not None and req.special_use not in SPECIAL_USES:
            raise StoreError("invalid", f"unknown special-use attribute {req.special_use}")
        boxes = self.boxes[req.account_id]
        old = boxes.get(name)
        if old is not None and not old.noselect:
            raise StoreError("exists", name)
        if len(boxes) + len(_parents(name)) + 1 > MAX_MAILBOXES:
            raise StoreError("limit", f"at most {MAX_MAILBOXES} mailboxes per account")
        for parent in _parents(name):
            if parent not in boxes:
                self._new_box(req.account_id, parent)
        if old is not None:  # a \Noselect placeholder becomes a real mailbox again
            old.noselect = False
            old.special_use = req.special_use or old.special_use
            return self._info(old)
        # a subscription outlives its mailbox (RFC 3501 §6.3.6) and applies to a new one
        dangling = self.dangling.get(req.account_id, set())
        box = self._new_box(req.account_id, name, req.special_use, subscribed=name in dangling)
        dangling.discard(name)
        return self._info(box)

    async def mailbox_delete(self, req: MailboxRef) -> None:
        """RFC 3501 §6.3.4: INBOX cannot be deleted; a mailbox with children loses its
        messages and becomes \\Noselect; deleting a \\Noselect one with children is refused."""
        name = _norm(req.name)
        if name == "INBOX":
            raise StoreError("invalid", "INBOX cannot be deleted")
        b = self._box(req.account_id, name)
        boxes = self.boxes[req.account_id]
        children = any(n.startswith(name + DELIMITER) for n in boxes)
        if children and b.noselect:
            raise StoreError("invalid", f"{name} has children and is already \\Noselect")
        self._remove(req.account_id, b, list(b.msgs))
        if children:
            b.noselect = True
            return
        del boxes[name]
        if b.subscribed:
            self.dangling.setdefault(req.account_id, set()).add(name)

    async def mailbox_rename(self, req: MailboxRenameRequest) -> None:
        """RFC 3501 §6.3.5: children move along; renaming INBOX moves its messages to a new
        mailbox (their UIDs and MODSEQs kept) and leaves INBOX empty."""
        old, new = _norm(req.old), _norm(req.new)
        if old == new:
            raise StoreError("exists", new)
        if new == "INBOX" or new.startswith(old + DELIMITER):
            raise StoreError("invalid", f"cannot rename {old} to {new}")
        boxes = self.boxes[req.account_id]
        src = self._box(req.account_id, old)
        if new in boxes:
            raise StoreError("exists", new)
        moving = [n for n in boxes if n.startswith(old + DELIMITER)]
        for n in moving:
            if new + n[len(old):] in boxes:
                raise StoreError("exists", new + n[len(old):])
        for parent in _parents(new):
            if parent not in boxes:
                self._new_box(req.account_id, parent)
        if old == "INBOX":
            dst = self._new_box(req.account_id, new)
            dst.msgs = dict(src.msgs)
            dst.uidnext, dst.recent_uid = src.uidnext, src.recent_uid
            dst.highestmodseq = src.highestmodseq
            self._remove(req.account_id, src, list(src.msgs))
            return
        for name in [old, *moving]:
            b = boxes.pop(name)
            b.name = new + name[len(old):]
            boxes[b.name] = b
        dangling = self.dangling.get(req.account_id, set())
        for name in [n for n in dangling if n == old or n.startswith(old + DELIMITER)]:
            dangling.discard(name)
            dangling.add(new + name[len(old):])

    async def mailbox_subscribe(self, req: SubscribeRequest) -> None:
        name = _norm(req.name)
        b = self.boxes.get(req.account_id, {}).get(name)
        if b is not None:
            b.subscribed = req.subscribed
        else:  # the name need not exist (RFC 3501 §6.3.6)
            names = self.dangling.setdefault(req.account_id, set())
            (names.add if req.subscribed else names.discard)(name)

    # ------------------------------------------------------------ Store: messages
    async def select(self, req: SelectRequest) -> SelectReply:
        b = (self._box(req.account_id, req.name) if req.name is not None
             else self._box_by_id(req.account_id, req.mailbox_id))
        if b.noselect:  # by name: CANNOT rather than NONEXISTENT, as mailbox-store says
            raise StoreError("invalid" if req.name is not None else "not_found",
                             f"{b.name} cannot be selected (\\Noselect)")
        vanished: list[tuple[int, int]] = []
        if req.changed_since is not None and req.after_uid == 0:
            vanished = uid_ranges(u for u, ms in b.expunged.items() if ms > req.changed_since)
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
                           vanished=vanished, recent_uid=recent_uid)

    def _meta(self, m: _Msg, with_summary: bool) -> MessageMeta:
        summary = None
        if with_summary and self.serve_summaries:
            summary = self.summaries.get(m.blob_key)
            if summary is None:
                summary = mime.summarize(self.blobs[m.blob_key])
                self.summaries[m.blob_key] = summary
        return MessageMeta(uid=m.uid, flags=list(m.flags), modseq=m.modseq,
                           internaldate=m.internaldate, size=served_size(m.prefix, m.blob_size),
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
        flags = _flags(req.flags)
        if _keywords(flags) > MAX_KEYWORDS:
            raise StoreError("limit", f"at most {MAX_KEYWORDS} keywords on a message")
        updated, modified, changes = [], [], []
        todo: list[tuple[_Msg, list[str]]] = []
        for u, m in b.msgs.items():
            if not _in(u, req.uids):
                continue
            if req.unchanged_since is not None and m.modseq > req.unchanged_since:
                modified.append(u)
                continue
            if req.op == "set":
                new = list(flags)
            elif req.op == "add":
                new = m.flags + [f for f in flags if f not in m.flags]
            else:
                new = [f for f in m.flags if f not in flags]
            if _keywords(new) > MAX_KEYWORDS:
                raise StoreError("limit", f"at most {MAX_KEYWORDS} keywords on a message")
            if set(new) != set(m.flags):  # like mailbox-store: only what changed
                todo.append((m, new))
        if todo:  # like mailbox-store: one MODSEQ for the whole STORE (RFC 7162 §3.1.3)
            b.highestmodseq += 1
            for m, new in todo:
                m.flags, m.modseq = new, b.highestmodseq
                changes.append(MessageChange(uid=m.uid, modseq=m.modseq, flags=list(new)))
                updated.append(MessageState(uid=m.uid, flags=list(new), modseq=m.modseq))
        if changes:
            self._publish(req.account_id, b, flags=changes, origin=req.origin)
        return StoreFlagsReply(updated=updated, modified=modified)

    async def copy(self, req: CopyRequest) -> CopyReply:
        src = self._box_by_id(req.account_id, req.mailbox_id)
        dst = self._target(req.account_id, req.target)
        rows = [m for u, m in src.msgs.items() if _in(u, req.uids)]
        if not rows:
            return CopyReply(uidvalidity=dst.uidvalidity, source_uids=[], target_uids=[])
        if not req.move:  # a move within the account does not change its usage
            self._charge(req.account_id, sum(served_size(m.prefix, m.blob_size) for m in rows))
        # like mailbox-store: one MODSEQ for the new messages, then one for the expunge (a
        # MOVE into the source mailbox itself adds the new UIDs and expunges the old ones)
        dst.highestmodseq += 1
        s_uids, t_uids, added = [], [], []
        for m in rows:
            nu = dst.uidnext
            dst.uidnext += 1
            dst.msgs[nu] = _Msg(nu, m.blob_key, m.blob_size, list(m.flags), dst.highestmodseq,
                                m.internaldate, m.prefix)
            s_uids.append(m.uid)
            t_uids.append(nu)
            added.append(MessageChange(uid=nu, modseq=dst.highestmodseq, flags=list(m.flags)))
        self._publish(req.account_id, dst, added=added, origin=req.origin)
        if req.move:
            self._remove(req.account_id, src, s_uids, req.origin)
        return CopyReply(uidvalidity=dst.uidvalidity, source_uids=s_uids, target_uids=t_uids)

    async def append(self, req: AppendRequest) -> AppendReply:
        box = self._target(req.account_id, req.mailbox)
        todo: list[tuple[bytes, list[str], datetime | None]] = []
        each: list[AppendRequest | AppendMessage] = [req, *req.more]
        for m in each:  # MULTIAPPEND (RFC 3502): all checked first, then all or none
            flags = _flags(m.flags)
            if _keywords(flags) > MAX_KEYWORDS:
                raise StoreError("limit", f"at most {MAX_KEYWORDS} keywords on a message")
            if m.message is not None:  # the bytes IMAP serves, with CRLF line ends
                raw: bytes | None = normalize_crlf(m.message)
            elif m.body is not None:  # a small body sent along (ADR 0014)
                raw = m.body
            else:
                raw = self.blobs.get(m.blob_key or "")
                if raw is not None and (m.summary is None or m.blob_size is None):
                    # as mailbox-store: an upload it must summarize is read with CRLF
                    # line ends (one it is told the summary of is taken as it is)
                    raw = normalize_crlf(raw)
            if raw is None:
                raise StoreError("invalid", "append needs message or blob_key")
            todo.append((raw, flags, m.internaldate))
        self._charge(req.account_id, sum(len(raw) for raw, _, _ in todo))
        uids = [self.deliver(req.account_id, raw, box.name, flags, internaldate=when,
                             origin=req.origin) for raw, flags, when in todo]
        sync = None
        if req.sync_after_uid is not None:  # as mailbox-store: the claim comes with it
            sync = await self.select(SelectRequest(
                account_id=req.account_id, mailbox_id=box.id, after_uid=req.sync_after_uid,
                claim_recent=True))
        return AppendReply(uidvalidity=box.uidvalidity, uid=uids[0],
                           uids=uids if req.more else [], sync=sync)

    async def expunge(self, req: ExpungeRequest) -> ExpungeReply:
        b = self._box_by_id(req.account_id, req.mailbox_id)
        gone = sorted(u for u, m in b.msgs.items() if "\\Deleted" in m.flags
                      and (req.uids is None or _in(u, req.uids)))
        limit = max(1, min(req.limit, self.page_limit or req.limit))
        more = len(gone) > limit
        gone = gone[:limit]
        self._remove(req.account_id, b, gone, req.origin)
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
                if len(k.children) != 1:
                    raise StoreError("invalid", "not takes one key")
                return not self._match(m, k.children[0])
            case "uid":
                return _in(m.uid, k.uids)
            case "flag":
                return a[0].lower() in (f.lower() for f in m.flags)
            case "unflag":
                return a[0].lower() not in (f.lower() for f in m.flags)
            case "larger":
                return served_size(m.prefix, m.blob_size) > _number(k)
            case "smaller":
                return served_size(m.prefix, m.blob_size) < _number(k)
            case "modseq":
                return m.modseq >= _number(k)
            case "before" | "on" | "since":
                d, ref = m.internaldate.date(), _date(k)
                return {"before": d < ref, "on": d == ref, "since": d >= ref}[k.op]
        raw = served(m.prefix, self.blobs[m.blob_key])
        hdr = raw[:mime.header_block_end(raw, 0, len(raw))]
        fields = mime.parse_headers(hdr)

        def header(name: str) -> str:
            return " ".join(v.decode("utf-8", "replace") for n, v in fields if n == name)

        needle = (a[-1] if a else "").lower()
        match k.op:
            case "header":  # decoded, as mailbox-store's blob pass reads them
                values = header_values(raw, a[0]) if a else []
                want = (a[1] if len(a) > 1 else "").casefold()
                return any(want in v.casefold() for v in values) if want else bool(values)
            case "from" | "to" | "cc" | "bcc":
                return needle in address_text(mime.decode_words(header(k.op))).lower()
            case "subject":
                return needle in mime.decode_words(header(k.op)).lower()
            case "body" | "text":  # the decoded text of every part, as mailbox-store reads it
                return (a[0] if a else "").casefold() in message_text(
                    raw, headers=k.op == "text").casefold()
            case "sentbefore" | "senton" | "sentsince":
                # the Date: field's date as written; without one the INTERNALDATE's (as the
                # store does)
                d = written_date(header("date")) or m.internaldate.date()
                return compare_dates(k.op, d, _date(k))
        raise StoreError("invalid", f"unknown search key {k.op}")

    async def quota(self, req: QuotaRequest) -> QuotaReply:
        msgs = [m for b in self.boxes.get(req.account_id, {}).values() for m in b.msgs.values()]
        return QuotaReply(used_bytes=self._used(req.account_id), limit_bytes=self.limit_bytes,
                          messages=len(msgs))


def _number(k: SearchKey) -> int:
    try:
        return int(k.args[0])
    except (IndexError, ValueError):
        raise StoreError("invalid", f"{k.op} needs a number") from None


_MONTHS = {m: i for i, m in enumerate(
    ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), 1)}


def _date(k: SearchKey) -> date:
    """An IMAP date (``1-Feb-1994``) or ISO ``1994-02-01``, as mailbox-store reads them."""
    try:
        s = k.args[0].strip().strip('"')
        m = re.fullmatch(r"(\d{1,2})-([A-Za-z]{3})-(\d{4})", s)
        if m and m.group(2).lower() in _MONTHS:
            return date(int(m.group(3)), _MONTHS[m.group(2).lower()], int(m.group(1)))
        return date.fromisoformat(s[:10])
    except (IndexError, ValueError):
        raise StoreError("invalid", f"{k.op} needs a date") from None
