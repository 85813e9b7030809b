"""MessageSummary's References and In-Reply-To (THREAD=REFERENCES, RFC 5256 §4): what
mime.summarize fills in, the bound on a long References, summaries stored before the fields
existed (they validate, with thread_fields False), and agreement with the header-block
reading THREAD falls back to for those."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from postbus.proto.mail import MessageSummary
from postbus.protocols import mime
from postbus.protocols.imap_thread import message_ids, thread_headers


def test_fields_from_the_first_headers_unfolded() -> None:
    raw = (b"Subject: x\r\nReferences: <a@x>\r\n <b@x>\r\nIn-Reply-To: <b@x>\r\n"
           b"References: <later@x>\r\n\r\nbody\r\n")
    sm = mime.summarize(raw)
    assert sm.thread_fields
    assert message_ids(sm.references) == ["a@x", "b@x"]
    assert sm.in_reply_to.strip() == "<b@x>"
    assert (sm.references, sm.in_reply_to) == thread_headers(raw)


def test_absent_fields_are_empty() -> None:
    sm = mime.summarize(b"Subject: x\r\n\r\nbody\r\n")
    assert (sm.references, sm.in_reply_to, sm.thread_fields) == ("", "", True)


def test_a_long_references_keeps_its_last_ids() -> None:
    ids = [f"<{i:06d}@example.test>" for i in range(2000)]  # about 40 KB
    raw = b"References: " + " ".join(ids).encode() + b"\r\n\r\nx\r\n"
    sm = mime.summarize(raw)
    assert len(sm.references) <= mime.MAX_THREAD_FIELD
    kept = message_ids(sm.references)
    assert kept == [i.strip("<>") for i in ids[-len(kept):]] and len(kept) > 80  # whole ids, the nearest ones
    assert thread_headers(raw)[0] == sm.references
    assert mime.thread_field(None) == "" and mime.thread_field("x" * 9000) == ""


def test_a_summary_stored_before_the_fields_still_validates() -> None:
    new = mime.summarize(b"References: <a@x>\r\n\r\nx\r\n")
    old_json = new.model_dump_json(by_alias=True,
                                   exclude={"references", "in_reply_to", "thread_fields"})
    old = MessageSummary.model_validate_json(old_json)
    assert (old.references, old.in_reply_to, old.thread_fields) == ("", "", False)
    assert MessageSummary.model_validate_json(new.model_dump_json(by_alias=True)) == new


_ID = st.from_regex(r"<[a-z0-9.]{1,12}@[a-z]{1,8}\.test>", fullmatch=True)


@given(st.lists(_ID, max_size=6), st.lists(_ID, max_size=2), st.booleans())
def test_summary_and_header_block_agree(refs: list[str], irt: list[str], fold: bool) -> None:
    sep = "\r\n " if fold else " "
    head = b"Subject: s\r\n"
    if refs:
        head += b"References: " + sep.join(refs).encode() + b"\r\n"
    if irt:
        head += b"In-Reply-To: " + " ".join(irt).encode() + b"\r\n"
    raw = head + b"\r\nbody\r\n"
    sm = mime.summarize(raw)
    assert (sm.references, sm.in_reply_to) == thread_headers(raw)
    assert message_ids(sm.references) == [r.strip("<>") for r in refs]
