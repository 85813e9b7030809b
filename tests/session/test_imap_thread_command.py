"""THREAD and UID THREAD (RFC 5256 §3, §4) in a session against the in-memory ports: the
capabilities, RFC 5256's example commands (A283-A285) on a small mailbox, threads after an
expunge and a delivery (imaptest thread7 and thread8), summaries computed from the blobs,
an unreadable body, the LIMIT and the grammar's errors."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import imap_support
from hypothesis import given, settings
from hypothesis import strategies as st

from postbus.kit.testing import examples
from postbus.proto.mail import MessageSummary
from postbus.protocols import mime

T0 = datetime(2000, 3, 5, 12, 0, tzinfo=UTC)


def msg(mid: str | None, subject: str, refs: str | None = None, irt: str | None = None,
        date: str | None = None) -> bytes:
    head = [b"From: a@example.test", b"Subject: " + subject.encode()]
    if mid is not None:
        head.append(b"Message-ID: " + mid.encode())
    if refs is not None:
        # folded, as long References fields are
        head.append(b"References: " + refs.replace(" ", "\r\n ").encode())
    if irt is not None:
        head.append(b"In-Reply-To: " + irt.encode())
    if date is not None:
        head.append(b"Date: " + date.encode())
    return b"\r\n".join(head) + b"\r\n\r\nbody\r\n"


class Client(imap_support.Client):
    def __init__(self, **cfg: int) -> None:
        super().__init__(max_literal=10_000, fetch_batch=2, **cfg)

    def deliver(self, raw: bytes, minutes: int = 0) -> int:
        return self.mp.deliver(self.acc, raw, internaldate=T0 + timedelta(minutes=minutes))

    async def login(self) -> None:
        self.out.take()
        await self.send(b"a LOGIN alice@example.test secret\r\nb SELECT INBOX\r\n")


def mailbox(c: Client) -> None:
    """1 "hello"; 2 a reply to 1; 3 "other" (no Message-ID); 4 replies to 2 with only
    In-Reply-To; 5 "Re: hello" whose References name a message not in the mailbox; 6 a reply
    to 1, dated before 2; 7 "other" again, before the first one."""
    c.deliver(msg("<1@x>", "hello"), 0)
    c.deliver(msg("<2@x>", "Re: hello", refs="<1@x>"), 10)
    c.deliver(msg(None, "other"), 20)
    c.deliver(msg("<4@x>", "Re: Re: hello", irt="<2@x>"), 30)
    c.deliver(msg("<5@x>", "Re: hello", refs="<gone@x>"), 40)
    c.deliver(msg("<6@x>", "Re: hello", refs="<1@x>", date="Sun, 5 Mar 2000 12:05:00 +0000"),
              50)
    c.deliver(msg("<7@x>", "Other", date="Sun, 5 Mar 2000 11:00:00 +0000"), 60)


async def test_thread_capabilities_and_rfc5256_examples() -> None:
    c = Client()
    greeting = c.out.take()[0]
    assert b" THREAD=ORDEREDSUBJECT THREAD=REFERENCES " in greeting
    mailbox(c)
    await c.login()
    # RFC 5256 §3 A283-A285 on this mailbox; sent dates: 1 12:00, 2 12:10, 3 12:20, 4 12:30,
    # 5 12:40, 6 12:05 (its Date header), 7 11:00 (its Date header)
    out = await c.send(b"A283 THREAD ORDEREDSUBJECT UTF-8 SINCE 5-MAR-2000\r\n")
    assert out == [b"* THREAD (7 3)(1 (6)(2)(4)(5))", b"A283 OK THREAD completed"]
    out = await c.send(b'A284 THREAD ORDEREDSUBJECT US-ASCII TEXT "gewp"\r\n')
    assert out == [b"* THREAD", b"A284 OK THREAD completed"]
    # 5's parent is missing (a dummy, pruned), so it joins 1's thread by its subject
    out = await c.send(b"A285 THREAD REFERENCES UTF-8 SINCE 5-MAR-2000\r\n")
    assert out == [b"* THREAD ((7)(3))(1 (6)(2 4)(5))", b"A285 OK THREAD completed"]
    out = await c.send(b"c UID THREAD REFERENCES UTF-8 NOT UID 6\r\n")
    assert out == [b"* THREAD ((7)(3))(1 (2 4)(5))", b"c OK THREAD completed"]
    # without 2, 4 and 5 are two replies with one base subject: a dummy holds both (§4 5.C)
    out = await c.send(b"d THREAD REFERENCES UTF-8 4:5\r\n")
    assert out == [b"* THREAD ((4)(5))", b"d OK THREAD completed"]


async def test_thread_after_expunge_and_delivery() -> None:
    # imaptest thread7: a duplicate Message-ID gets one of its own; after 2 is expunged, its
    # twin 4 (now 3) takes the id and 3 (now 2) hangs under it
    c = Client()
    c.deliver(msg("<a@b>", ""), 0)
    c.deliver(msg("<b@b>", "", refs="<a@b>"), 0)
    c.deliver(msg("<c@b>", "", refs="<b@b>"), 0)
    c.deliver(msg("<b@b>", "", refs="<a@b>"), 0)
    await c.login()
    out = await c.send(b"e THREAD REFERENCES US-ASCII ALL\r\n")
    assert out[0] == b"* THREAD (1 (2 3)(4))"
    out = await c.send(b"f STORE 2 +FLAGS.SILENT (\\Deleted)\r\ng EXPUNGE\r\n"
                       b"h THREAD REFERENCES US-ASCII ALL\r\n")
    assert b"* THREAD (1 3 2)" in out and out[-1] == b"h OK THREAD completed"
    c.deliver(msg("<d@b>", "", refs="<a@b> <c@b>"), 0)
    out = await c.send(b"i NOOP\r\nj THREAD REFERENCES US-ASCII ALL\r\n")
    assert b"* 4 EXISTS" in out
    assert out[-2:] == [b"* THREAD (1 3 2 4)", b"j OK THREAD completed"]


async def test_thread_without_stored_summaries() -> None:
    c = Client()
    mailbox(c)
    c.mp.serve_summaries = False  # summaries computed here from the blobs
    await c.login()
    out = await c.send(b"j THREAD REFERENCES UTF-8 ALL\r\n")
    assert out == [b"* THREAD ((7)(3))(1 (6)(2 4)(5))", b"j OK THREAD completed"]


async def test_thread_with_an_unreadable_body() -> None:
    # the summaries carry References and In-Reply-To: REFERENCES reads no message
    c = Client()
    mailbox(c)
    await c.login()
    out = await c.send(b"k THREAD ORDEREDSUBJECT UTF-8 ALL\r\n")  # the summaries, stored
    assert out[-1] == b"k OK THREAD completed"
    inbox = c.mp.boxes[c.acc]["INBOX"]
    del c.mp.blobs[inbox.msgs[2].blob_key]
    out = await c.send(b"l THREAD REFERENCES UTF-8 SINCE 5-MAR-2000\r\n")
    assert out == [b"* THREAD ((7)(3))(1 (6)(2 4)(5))", b"l OK THREAD completed"]


def old_rows(c: Client) -> None:
    """Summaries as the store kept them before MessageSummary had References and
    In-Reply-To: their JSON lacks the fields (it still validates, thread_fields False)."""
    for m in c.mp.boxes[c.acc]["INBOX"].msgs.values():
        new = mime.summarize(c.mp.blobs[m.blob_key])
        c.mp.summaries[m.blob_key] = MessageSummary.model_validate_json(new.model_dump_json(
            by_alias=True, exclude={"references", "in_reply_to", "thread_fields"}))


async def test_thread_with_summaries_stored_before_thread_fields() -> None:
    c = Client()
    mailbox(c)
    old_rows(c)
    assert not c.mp.summaries[c.mp.boxes[c.acc]["INBOX"].msgs[1].blob_key].thread_fields
    await c.login()
    # the header blocks are read instead: the same threads
    out = await c.send(b"A285 THREAD REFERENCES UTF-8 SINCE 5-MAR-2000\r\n")
    assert out == [b"* THREAD ((7)(3))(1 (6)(2 4)(5))", b"A285 OK THREAD completed"]
    inbox = c.mp.boxes[c.acc]["INBOX"]
    del c.mp.blobs[inbox.msgs[2].blob_key]
    out = await c.send(b"l THREAD REFERENCES UTF-8 ALL\r\n")
    assert out == [b"l NO [UNAVAILABLE] Message headers unavailable"]
    # ORDEREDSUBJECT needs only the summaries
    out = await c.send(b"m THREAD ORDEREDSUBJECT UTF-8 ALL\r\n")
    assert out[-1] == b"m OK THREAD completed"


async def test_thread_limit_and_errors() -> None:
    c = Client(sort_max_messages=3)
    mailbox(c)
    out = await c.send(b"a LOGIN alice@example.test secret\r\n"
                       b"m THREAD REFERENCES UTF-8 ALL\r\n")
    assert out[-1] == b"m BAD [CLIENTBUG] No mailbox selected"
    await c.send(b"b SELECT INBOX\r\n")
    out = await c.send(b"n THREAD REFERENCES UTF-8 ALL\r\n")
    assert out[-1].startswith(b"n NO [LIMIT] THREAD of more than 3 messages")
    out = await c.send(b"o THREAD REFERENCES UTF-8 1:3\r\n")
    assert out[-1] == b"o OK THREAD completed"
    out = await c.send(b"p THREAD REFERENCES ISO-8859-1 ALL\r\n")
    assert out[-1].startswith(b"p NO [BADCHARSET (UTF-8 US-ASCII)]")
    out = await c.send(b"q THREAD REFS UTF-8 ALL\r\n")
    assert out[-1].startswith(b"q BAD ")


_KEYS = st.sampled_from(["ALL", "1:3", "*", "UID 2:*", "SEEN", "NOT SEEN", 'SUBJECT "hello"',
                         'HEADER References "x"', "OR 1 7", "SINCE 5-Mar-2000", "9:12"])


@settings(max_examples=examples(40), deadline=None)
@given(st.sampled_from(["THREAD", "UID THREAD"]),
       st.sampled_from(["REFERENCES", "ORDEREDSUBJECT"]),
       st.lists(_KEYS, min_size=1, max_size=3))
async def test_thread_answers_every_search(verb: str, alg: str, keys: list[str]) -> None:
    c = Client()
    mailbox(c)
    await c.login()
    out = await c.send(f"t {verb} {alg} UTF-8 {' '.join(keys)}\r\n".encode())
    assert out[-1] == b"t OK THREAD completed", out
    assert out[-2].startswith(b"* THREAD")
    listed = out[-2][len(b"* THREAD"):].replace(b"(", b" ").replace(b")", b" ").split()
    assert len(listed) == len(set(listed))  # each message once
