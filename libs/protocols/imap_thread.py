"""IMAP THREAD (RFC 5256 §3, §4): the ORDEREDSUBJECT and REFERENCES algorithms over the
messages a search found, and the thread-list response (§4, formal syntax). Pure: no asyncio,
no I/O. Base subjects and the collation come from ``imap_sort`` (SORT uses the same ones).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime

from postbus.protocols import mime
from postbus.protocols.imap_sort import base_subject_info, casemap

__all__ = ["ThreadInfo", "Thread", "orderedsubject", "references", "thread",
           "thread_lists", "message_ids", "thread_headers"]

@dataclass(frozen=True)
class ThreadInfo:
    """What the threads of one message are computed from."""

    seq: int  # message sequence number: ties go in its ascending order (§2.2)
    uid: int
    sent: datetime  # the Date header, or INTERNALDATE when it has none (§2.2)
    subject: str = ""  # decoded (RFC 2047)
    message_id: str = ""  # the Message-ID field's value, unparsed
    references: str = ""  # the References field's value, unparsed
    in_reply_to: str = ""  # the In-Reply-To field's value, unparsed


@dataclass(frozen=True)
class Thread:
    """One node: a message, or a dummy (``msg`` None) that only holds its children."""

    msg: ThreadInfo | None
    children: tuple[Thread, ...] = ()


# ---------------------------------------------------------------- message ids
_COMMENT = re.compile(r"\((?:[^()\\]|\\.)*\)")
_MSG_ID = re.compile(r"<\s*([^<>\s]+@[^<>\s]+?)\s*>")


def message_ids(value: str) -> list[str]:
    """The msg-ids of a Message-ID, In-Reply-To or References value (RFC 5322 §3.6.4), in
    order, without their angle brackets; what is not "<left@right>" is skipped. Compared
    case-sensitively (RFC 5256 §4 step 1)."""
    return _MSG_ID.findall(_COMMENT.sub(" ", value.replace("\r", "").replace("\n", "")))


def thread_headers(raw: bytes) -> tuple[str, str]:
    """The References and In-Reply-To values (unfolded; "" when absent) of the header
    block of a message; the first field of each name counts. For summaries stored before
    MessageSummary carried them (``thread_fields`` False)."""
    block = raw[:mime.header_block_end(raw, 0, len(raw))]
    refs = irt = None
    for name, value in mime.parse_headers(block):
        if name == "references" and refs is None:
            refs = mime.unfold(value)
        elif name == "in-reply-to" and irt is None:
            irt = mime.unfold(value)
    # as MessageSummary has them (mime.summarize), so both ways thread alike
    return mime.thread_field(refs), mime.thread_field(irt)


def _date_key(info: ThreadInfo) -> tuple[float, int]:
    # §2.2: the sent date, ties in the order of the mailbox (sequence numbers)
    return (info.sent.timestamp(), info.seq)


# ---------------------------------------------------------------- ORDEREDSUBJECT (§3)
def orderedsubject(infos: list[ThreadInfo]) -> list[Thread]:
    """RFC 5256 §3 ORDEREDSUBJECT: messages sorted by base subject then sent date; one thread
    per base subject whose first message holds all the others as children (no
    grandchildren); threads in the order of their first message's sent date."""
    groups: dict[str, list[ThreadInfo]] = {}
    for info in infos:
        groups.setdefault(casemap(base_subject_info(info.subject)[0]), []).append(info)
    threads: list[Thread] = []
    for members in groups.values():
        members.sort(key=_date_key)
        threads.append(Thread(members[0], tuple(Thread(m) for m in members[1:])))
    threads.sort(key=lambda t: _date_key(t.msg) if t.msg is not None else (0.0, 0))
    return threads


# ---------------------------------------------------------------- REFERENCES (§4)
@dataclass(eq=False)
class _Box:
    """A container of step 1: a message or a dummy, linked to its parent and children."""

    msg: ThreadInfo | None = None
    parent: _Box | None = None
    children: list[_Box] = field(default_factory=list)

    def unlink(self) -> None:
        if self.parent is not None:
            self.parent.children.remove(self)
            self.parent = None

    def link_under(self, parent: _Box) -> None:
        self.parent = parent
        parent.children.append(self)


def _in_subtree(node: _Box, top: _Box) -> bool:
    """Whether ``node`` is ``top`` or below it (linking ``node`` above ``top`` would make a
    loop). Walks up from ``node`` and down through ``top``'s subtree in turns, so the cost
    is about the smaller of the two: a new message has no children, and a long reply chain
    must not make threading quadratic."""
    up: _Box | None = node
    down = [top]
    while up is not None and down:
        if up is top:
            return True
        up = up.parent
        below = down.pop()
        if below is node:
            return True
        down.extend(below.children)
    return False


def _first_date(box: _Box) -> tuple[float, int]:
    """The sort key of a container: its message's, or a dummy's first child's (§4 steps 4
    and 6: children are sorted first)."""
    while box.msg is None:
        if not box.children:
            return (0.0, 0)
        box = box.children[0]
    return _date_key(box.msg)


def _parents_first(roots: list[_Box]) -> list[_Box]:
    """Every box of the trees, each before its children; iterative (a reply chain may be as
    long as the mailbox), so reversed it visits children before their parents."""
    order: list[_Box] = []
    stack = list(roots)
    while stack:
        box = stack.pop()
        order.append(box)
        stack.extend(box.children)
    return order


def _sort_tree(roots: list[_Box]) -> None:
    """Sort every set of siblings by sent date, the deepest first (§4 step 6), then the
    roots. Iterative: a reply chain may be as long as the mailbox."""
    for box in reversed(_parents_first(roots)):  # children before their parents
        box.children.sort(key=_first_date)
    roots.sort(key=_first_date)


def _prune(roots: list[_Box]) -> list[_Box]:
    """§4 step 3: a dummy without children goes; a dummy with children goes and its
    children take its place, except at the root where only a single child is promoted."""
    for box in reversed(_parents_first(roots)):  # a container's children are pruned before it
        kept: list[_Box] = []
        for child in box.children:
            if child.msg is None:
                for grandchild in child.children:
                    grandchild.parent = box
                kept.extend(child.children)
            else:
                kept.append(child)
        box.children = kept
    out: list[_Box] = []
    for box in roots:
        if box.msg is None and len(box.children) <= 1:
            for child in box.children:
                child.parent = None
            out.extend(box.children)
        else:
            out.append(box)
    return out


def _subject_of(box: _Box) -> tuple[str, bool]:
    """The thread subject (casemapped) of a root container and whether it is a reply or
    forward: its message's, or a dummy's first child's (§4 step 5.B.i)."""
    msg = box.msg if box.msg is not None else (box.children[0].msg if box.children else None)
    if msg is None:
        return "", False
    base, refwd = base_subject_info(msg.subject)
    return casemap(base), refwd


def _merge_subjects(roots: list[_Box]) -> list[_Box]:
    """§4 step 5: gather the threads under the root that share a base subject."""
    table: dict[str, _Box] = {}
    for box in roots:  # B: one container per thread subject
        subject, refwd = _subject_of(box)
        if not subject:
            continue
        held = table.get(subject)
        if held is None:
            table[subject] = box
        elif held.msg is not None and (box.msg is None
                                       or (_subject_of(held)[1] and not refwd)):
            table[subject] = box
    for box in roots:  # C: merge
        if box.parent is not None:
            continue  # already made a child of another thread
        subject, refwd = _subject_of(box)
        held = table.get(subject) if subject else None
        if held is None or held is box:
            continue
        if held.msg is None and box.msg is None:
            for child in box.children:
                child.parent = held
            held.children.extend(box.children)
            box.children = []
        elif held.msg is None or (refwd and not _subject_of(held)[1]):
            box.link_under(held)
        else:
            dummy = _Box()
            held.link_under(dummy)
            box.link_under(dummy)
            table[subject] = dummy
    # what is under the root now: each former root's topmost container, once; a dummy
    # whose children went to another one is gone
    result: list[_Box] = []
    seen: set[int] = set()
    for box in roots:
        while box.parent is not None:
            box = box.parent
        if id(box) not in seen and (box.msg is not None or box.children):
            seen.add(id(box))
            result.append(box)
    return result


def references(infos: list[ThreadInfo]) -> list[Thread]:
    """RFC 5256 §4 REFERENCES over messages given in ascending sequence order."""
    by_id: dict[str, _Box] = {}
    boxes: list[_Box] = []  # every container, in the order made

    def new(msg: ThreadInfo | None) -> _Box:
        box = _Box(msg)
        boxes.append(box)
        return box

    for info in sorted(infos, key=lambda i: i.seq):
        # step 1: the message's own id; none, or one an earlier message has: a unique one
        ids = message_ids(info.message_id)
        box: _Box | None = None
        if ids:
            known = by_id.get(ids[0])
            if known is None:
                box = by_id[ids[0]] = new(info)
            elif known.msg is None:
                box = known
                box.msg = info
        if box is None:
            box = new(info)
        # its references: References, else the first id of In-Reply-To
        refs = message_ids(info.references) or message_ids(info.in_reply_to)[:1]
        chain: list[_Box] = []
        for r in refs:
            ref = by_id.get(r)
            if ref is None:
                ref = by_id[r] = new(None)  # a dummy until a message with this id comes
            chain.append(ref)
        # step 1.A: link the references in order; an existing parent stays; no loops
        for parent, child in zip(chain, chain[1:], strict=False):
            if child.parent is None and not _in_subtree(parent, child):
                child.link_under(parent)
        # step 1.B: the last reference becomes the parent (a truncated References may have
        # given another one: that link is broken first); no loops
        box.unlink()
        if chain and not _in_subtree(chain[-1], box):
            box.link_under(chain[-1])
    # step 2: the containers without a parent are the root's children
    roots = [b for b in boxes if b.parent is None]
    roots = _prune(roots)  # step 3
    _sort_tree(roots)  # step 4: sort what is under the root (children first, for dummies)
    roots = _merge_subjects(roots)  # step 5
    _sort_tree(roots)  # step 6
    return [_freeze(b) for b in roots]


def _freeze(root: _Box) -> Thread:
    """The immutable tree of a container (iteratively: chains may be long)."""
    order: list[_Box] = []
    stack = [root]
    while stack:
        box = stack.pop()
        order.append(box)
        stack.extend(box.children)
    done: dict[int, Thread] = {}
    for box in reversed(order):
        done[id(box)] = Thread(box.msg, tuple(done[id(c)] for c in box.children))
    return done[id(root)]


def thread(algorithm: str, infos: list[ThreadInfo]) -> list[Thread]:
    """The threads of ``infos`` by ORDEREDSUBJECT or REFERENCES (RFC 5256 §3)."""
    if algorithm == "ORDEREDSUBJECT":
        return orderedsubject(infos)
    if algorithm == "REFERENCES":
        return references(infos)
    raise ValueError(f"unknown threading algorithm {algorithm}")


# ---------------------------------------------------------------- response (§4 syntax)
def thread_lists(threads: list[Thread], uid: bool) -> str:
    """The thread-lists of a THREAD response: ``(1 2 (3)(4 5))(6)``. A chain of single
    replies is written as members, a node with several children as nested thread-lists,
    a dummy as its children's lists only. UIDs or sequence numbers."""
    out: list[str] = []
    # a stack of what is left to write: a node to open, or text to append
    stack: list[Thread | str] = [t for t in reversed(threads)]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            out.append(item)
            continue
        out.append("(")
        node = item
        members: list[str] = []
        while node.msg is not None:
            members.append(str(node.msg.uid if uid else node.msg.seq))
            if len(node.children) != 1:
                break
            node = node.children[0]
        text = " ".join(members)
        nested = list(node.children) if node.msg is None or len(node.children) > 1 else []
        if text and nested:
            text += " "
        out.append(text)
        stack.append(")")
        stack.extend(reversed(nested))
    return "".join(out)
