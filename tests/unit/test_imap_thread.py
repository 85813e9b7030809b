"""IMAP THREAD (libs/protocols/imap_thread.py): RFC 5256 §4's response examples, §3's example
responses, the ORDEREDSUBJECT and REFERENCES steps one by one, the mailboxes of Dovecot's
imaptest thread scripts with Dovecot's answers, and the THREAD command grammar."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postbus.protocols import imap_parser as p
from postbus.protocols.imap_sort import base_subject_info
from postbus.protocols.imap_thread import (
    Thread,
    ThreadInfo,
    message_ids,
    orderedsubject,
    references,
    thread,
    thread_headers,
    thread_lists,
)

T0 = datetime(2008, 2, 22, 15, 6, 23, tzinfo=UTC)


def info(seq: int, *, sent: datetime = T0, subject: str = "", mid: str = "",
         refs: str = "", irt: str = "") -> ThreadInfo:
    return ThreadInfo(seq=seq, uid=seq * 10, sent=sent, subject=subject, message_id=mid,
                      references=refs, in_reply_to=irt)


# ---------------------------------------------------------------- response syntax
def _parse_lists(text: str) -> list[Thread]:
    """thread-lists back into trees (RFC 5256 §4 syntax), for the round trips below."""
    pos = 0

    def one() -> Thread:
        nonlocal pos
        assert text[pos] == "("
        pos += 1
        nums: list[int] = []
        nested: list[Thread] = []
        while text[pos] != ")":
            if text[pos] == " ":
                pos += 1
            elif text[pos] == "(":
                nested.append(one())
            else:
                end = pos
                while text[end].isdigit():
                    end += 1
                nums.append(int(text[pos:end]))
                pos = end
        pos += 1
        node: Thread | None = None
        for n in reversed(nums):
            kids = (node,) if node is not None else tuple(nested)
            node = Thread(info(n), kids)
        return node if node is not None else Thread(None, tuple(nested))

    out = []
    while pos < len(text):
        out.append(one())
    return out


def _seq_lists(threads: list[Thread]) -> str:
    return thread_lists(threads, uid=False)


def test_rfc5256_s4_example_tree() -> None:
    # §4: 2 alone; 3 -> 6 -> {4 -> 23, 44 -> 7 -> 96}
    tree = [Thread(info(2)),
            Thread(info(3), (Thread(info(6), (
                Thread(info(4), (Thread(info(23)),)),
                Thread(info(44), (Thread(info(7), (Thread(info(96)),)),)))),))]
    assert _seq_lists(tree) == "(2)(3 6 (4 23)(44 7 96))"
    assert thread_lists(tree, uid=True) == "(20)(30 60 (40 230)(440 70 960))"


def test_a_dummy_parent_is_written_as_its_children() -> None:
    assert _seq_lists([Thread(None, (Thread(info(3)), Thread(info(5))))]) == "((3)(5))"


def test_no_threads_is_nothing() -> None:
    # §3 A284: "* THREAD" when nothing matched
    assert _seq_lists([]) == ""
    assert orderedsubject([]) == [] and references([]) == []


@pytest.mark.parametrize("text", [
    # RFC 5256 §3, A283 (ORDEREDSUBJECT) and A285 (REFERENCES): the responses round-trip
    "(166)(167)(168)(169)(172)(170)(171)(173)(174 (175)(176)(178)(181)(180))(179)(177 "
    "(183)(182)(188)(184)(185)(186)(187)(189))(190)(191)(192)(193)(194 195)(196 (197)(198))"
    "(199)(200 202)(201)(203)(204)(205)(206 207)(208)",
    "(166)(167)(168)(169)(172)((170)(179))(171)(173)((174)(175)(176)(178)(181)(180))"
    "((177)(183)(182)(188 (184)(189))(185 186)(187))(190)(191)(192)(193)((194)(195 196))"
    "(197 198)(199)(200 202)(201)(203)(204)(205 206 207)(208)",
    "(2)(3 6 (4 23)(44 7 96))",
])
def test_rfc5256_example_responses_round_trip(text: str) -> None:
    assert _seq_lists(_parse_lists(text)) == text


def test_a_long_chain_is_written_without_recursion() -> None:
    node = Thread(info(5000))
    for n in range(4999, 0, -1):
        node = Thread(info(n), (node,))
    assert _seq_lists([node]) == "(" + " ".join(str(n) for n in range(1, 5001)) + ")"


# ---------------------------------------------------------------- inputs
@pytest.mark.parametrize(("value", "ids"), [
    ("<a@b>", ["a@b"]),
    ("<a@b> <c@d>\r\n <e@f>", ["a@b", "c@d", "e@f"]),
    ("<a@b>(comment <x@y>) <c@d>", ["a@b", "c@d"]),
    ("< a@b >", ["a@b"]),
    ("no id here", []),
    ("<no-at-sign>", []),
    ("", []),
])
def test_message_ids(value: str, ids: list[str]) -> None:
    assert message_ids(value) == ids


def test_thread_headers_reads_the_first_of_each_field_unfolded() -> None:
    raw = (b"Subject: x\r\nReferences: <a@b>\r\n <c@d>\r\nIn-Reply-To: <c@d>\r\n"
           b"References: <z@z>\r\n\r\nReferences: <body@x>\r\n")
    assert thread_headers(raw) == ("<a@b> <c@d>", "<c@d>")
    assert thread_headers(b"Subject: x\n\nbody") == ("", "")


@pytest.mark.parametrize(("subject", "base", "refwd"), [
    ("hello", "hello", False),
    ("Re: hello", "hello", True),
    ("Fwd: hello", "hello", True),
    ("hello (fwd)", "hello", True),
    ("[Fwd: hello]", "hello", True),
    ("[list] hello", "hello", False),  # a blob alone is no reply
    ("  hello  ", "hello", False),
    ("Ad: Re: x", "Ad: Re: x", False),
])
def test_base_subject_says_whether_a_reply_or_forward(subject: str, base: str,
                                                     refwd: bool) -> None:
    assert base_subject_info(subject) == (base, refwd)


# ---------------------------------------------------------------- ORDEREDSUBJECT (§3)
def test_orderedsubject_groups_by_base_subject_then_date() -> None:
    t = [info(1, subject="b", sent=T0 + timedelta(seconds=5)),
         info(2, subject="Re: a", sent=T0 + timedelta(seconds=1)),
         info(3, subject="a", sent=T0 + timedelta(seconds=3)),
         info(4, subject="RE: B", sent=T0),
         info(5, subject="a", sent=T0 + timedelta(seconds=2))]
    # a: 2 (1 s), 5 (2 s), 3 (3 s); b: 4 (0 s), 1 (5 s); threads by their first date
    assert _seq_lists(orderedsubject(t)) == "(4 1)(2 (5)(3))"


def _mbox_orderedsubject() -> list[ThreadInfo]:
    # imaptest thread-orderedsubject: all at the same date, so sequence order decides
    subjects = ["a", "C", "b", "_", "[foo] Fwd: [bar] Re: fw: b (fWd)  (fwd)", "b (a)",
                "Re: [FWD: c]", "[xyz]", "", " ", "Re: b", "RE: C", "Re: c",
                "Ad: Re: Ad: Re: Ad: x", "re: [fwd: [fwd: re: [fwd: babylon]]]"]
    return [info(n, subject=s) for n, s in enumerate(subjects, 1)]


def test_imaptest_thread_orderedsubject() -> None:
    assert _seq_lists(orderedsubject(_mbox_orderedsubject())) == \
        "(1)(2 (7)(12)(13))(3 (5)(11))(4)(6)(8)(9 10)(14)(15)"


def test_imaptest_thread_orderedsubject2() -> None:
    # Date headers on 1-4, INTERNALDATE (the mbox From_ line) on 5-8
    tz = timedelta(hours=2)
    t = [info(1, subject="a", sent=T0 + timedelta(seconds=10) - tz),
         info(2, subject="b", sent=T0 + timedelta(seconds=9) - tz),
         info(3, subject="a", sent=T0 + timedelta(seconds=8) - tz),
         info(4, subject="b", sent=T0 + timedelta(seconds=7) - tz),
         info(5, subject="a", sent=T0 + timedelta(seconds=30) - tz),
         info(6, subject="b", sent=T0 + timedelta(seconds=29) - tz),
         info(7, subject="a", sent=T0 + timedelta(seconds=28) - tz),
         info(8, subject="b", sent=T0 + timedelta(seconds=27) - tz)]
    assert _seq_lists(orderedsubject(t)) == "(4 (2)(8)(6))(3 (1)(7)(5))"


# ---------------------------------------------------------------- REFERENCES (§4)
def test_references_links_the_chain_and_its_last_element_is_the_parent() -> None:
    t = [info(1, mid="<a@x>"), info(2, mid="<b@x>", refs="<a@x>"),
         info(3, mid="<c@x>", refs="<a@x> <b@x>"), info(4, mid="<d@x>", refs="<a@x>")]
    assert _seq_lists(references(t)) == "(1 (2 3)(4))"


def test_in_reply_to_only_without_references() -> None:
    t = [info(1, mid="<a@x>"), info(2, mid="<b@x>"),
         info(3, mid="<c@x>", refs="<a@x>", irt="<b@x>"),
         info(4, mid="<d@x>", irt="<b@x> <a@x>")]  # only its first id counts
    assert _seq_lists(references(t)) == "(1 3)(2 4)"


def test_step_1a_an_existing_parent_stays() -> None:
    # 3 says b's parent is a; 4's truncated chain "z b" must not move b under z
    t = [info(1, mid="<a@x>"), info(2, mid="<b@x>", refs="<a@x>"),
         info(3, mid="<z@x>"), info(4, mid="<c@x>", refs="<z@x> <b@x>")]
    assert _seq_lists(references(t)) == "(1 2 4)(3)"


def test_step_1b_breaks_a_parent_guessed_from_another_references() -> None:
    # imaptest "thread": 2 guesses a -> c -> b; 3 (c) names b as its parent, which would
    # be a loop: c loses its guessed parent a and stays a root
    t = [info(1, mid="<a@b>", sent=T0 + timedelta(hours=2)),
         info(2, mid="<b@b>", refs="<a@b> <c@b>"),
         info(3, mid="<c@b>", refs="<b@b>", sent=T0 + timedelta(hours=1, seconds=2))]
    assert _seq_lists(references(t)) == "(3 2)(1)"
    # after 1 is expunged (Dovecot answers the same)
    t2 = [info(1, mid="<b@b>", refs="<a@b> <c@b>"),
          info(2, mid="<c@b>", refs="<b@b>", sent=T0 + timedelta(hours=1, seconds=2))]
    assert _seq_lists(references(t2)) == "(2 1)"


def test_a_message_referring_to_itself_is_no_loop() -> None:
    assert _seq_lists(references([info(1, mid="<a@x>", refs="<a@x>")])) == "(1)"
    # 2's chain "b a b": b becomes a's parent (step 1.A), a cannot then be b's (a loop), nor
    # can b be its own parent (step 1.B)
    t = [info(1, mid="<a@x>", refs="<a@x>"), info(2, mid="<b@x>", refs="<b@x> <a@x> <b@x>")]
    assert _seq_lists(references(t)) == "(2 1)"


def test_duplicate_and_missing_message_ids_get_their_own() -> None:
    # imaptest thread2 and thread6: a repeated id belongs to the first message only; two
    # messages without an id that refer to a missing one share a dummy parent
    assert _seq_lists(references([info(1, mid="<a@b>"), info(2, mid="<a@b>")])) == "(1)(2)"
    assert _seq_lists(references([info(1, refs="<a@b>"),
                                  info(2, refs="<a@b>", sent=T0 + timedelta(seconds=1))])) \
        == "((1)(2))"


def test_dummies_are_pruned_below_the_root() -> None:
    # c's parent b is missing: c goes straight under a; a missing root with one child is
    # replaced by it (step 3.B)
    t = [info(1, mid="<a@x>"), info(2, mid="<c@x>", refs="<a@x> <b@x>"),
         info(3, mid="<e@x>", refs="<d@x>")]
    assert _seq_lists(references(t)) == "(1 2)(3)"


def test_imaptest_thread5_and_thread7() -> None:
    t5 = [info(1, mid="<1@b>", sent=T0 + timedelta(hours=2)), info(2, mid="<2@b>", irt="<1@b>"),
          info(3, mid="<3@b>", irt="<1@b>"), info(4, mid="<4@b>", irt="<2@b>")]
    assert _seq_lists(references(t5)) == "(1 (2 4)(3))"
    left = [info(1, mid="<3@b>", irt="<1@b>"), info(2, mid="<4@b>", irt="<2@b>")]
    assert _seq_lists(references(left)) == "(1)(2)"
    left.append(info(3, mid="<5@b>", irt="<2@b>"))
    assert _seq_lists(references(left)) == "(1)((2)(3))"
    t7 = [info(1, mid="<a@b>"), info(2, mid="<b@b>", refs="<a@b>"),
          info(3, mid="<c@b>", refs="<b@b>"), info(4, mid="<b@b>", refs="<a@b>")]
    assert _seq_lists(references(t7)) == "(1 (2 3)(4))"
    t7b = [t7[0], info(2, mid="<c@b>", refs="<b@b>"), info(3, mid="<b@b>", refs="<a@b>")]
    assert _seq_lists(references(t7b)) == "(1 3 2)"


def test_step_5_same_subject_threads_merge() -> None:
    # imaptest thread3 and thread4: a reply with the subject of a non-reply goes under it
    assert _seq_lists(references([info(1, mid="<a@b>", subject="foo"),
                                  info(2, mid="<a@b>", subject="Re: foo")])) == "(1 2)"
    assert _seq_lists(references([info(1, mid="<a@b>", subject="foo"),
                                  info(2, mid="<b@b>", refs="<c@b>",
                                       subject="Re: foo")])) == "(1 2)"
    # two non-replies with one subject: a new dummy holds both
    assert _seq_lists(references([info(1, mid="<a@b>", subject="foo"),
                                  info(2, mid="<b@b>", subject="foo")])) == "((1)(2))"
    # the table keeps a non-reply over a reply that came first (step 5.B.v)
    assert _seq_lists(references([info(1, mid="<a@b>", subject="Re: foo"),
                                  info(2, mid="<b@b>", subject="foo",
                                       sent=T0 + timedelta(seconds=1))])) == "(2 1)"
    # empty subjects never merge (step 5.B.ii)
    assert _seq_lists(references([info(1, mid="<a@b>"), info(2, mid="<b@b>")])) == "(1)(2)"


def test_step_5_dummy_threads_merge() -> None:
    # two dummies with one subject: their children become siblings; a message with that
    # subject goes under the dummy
    t = [info(1, refs="<x@y>", subject="s"), info(2, refs="<x@y>", subject="s"),
         info(3, refs="<z@y>", subject="Re: s"), info(4, refs="<z@y>", subject="s"),
         info(5, mid="<m@y>", subject="s")]
    assert _seq_lists(references(t)) == "((1)(2)(3)(4)(5))"


def test_step_6_siblings_by_date_then_sequence() -> None:
    t = [info(1, mid="<a@x>"), info(2, mid="<b@x>", refs="<a@x>", sent=T0 + timedelta(2)),
         info(3, mid="<c@x>", refs="<a@x>", sent=T0 + timedelta(1)),
         info(4, mid="<d@x>", refs="<a@x>", sent=T0 + timedelta(1))]
    assert _seq_lists(references(t)) == "(1 (3)(4)(2))"


def test_a_long_reply_chain() -> None:
    n = 3000
    t = [info(1, mid="<m1@x>")] + [info(i, mid=f"<m{i}@x>", refs=f"<m{i - 1}@x>")
                                   for i in range(2, n + 1)]
    assert _seq_lists(references(t)) == "(" + " ".join(map(str, range(1, n + 1))) + ")"


@given(st.lists(st.integers(0, 30), min_size=1, max_size=30), st.integers(0, 29),
       st.integers(0, 29))
def test_the_loop_check_agrees_with_walking_up(parents: list[int], a: int, b: int) -> None:
    # a random forest: node i hangs under parents[i] when that is a smaller index
    from postbus.protocols.imap_thread import _Box, _in_subtree

    boxes = [_Box() for _ in parents]
    for i, par in enumerate(parents):
        if par < i:
            boxes[i].link_under(boxes[par])
    node, top = boxes[a % len(boxes)], boxes[b % len(boxes)]
    walk: _Box | None = node
    naive = False
    while walk is not None:
        naive = naive or walk is top
        walk = walk.parent
    assert _in_subtree(node, top) == naive


_IDS = st.sampled_from(["<a@x>", "<b@x>", "<c@x>", "<d@x>", "", "junk"])
_SUBJECTS = st.sampled_from(["", "s", "Re: s", "t", "Fwd: t", "[x] s"])


@given(st.lists(st.tuples(_IDS, st.lists(_IDS, max_size=4), _IDS, _SUBJECTS,
                          st.integers(0, 3)), max_size=12))
def test_every_message_appears_once(rows: list[tuple[str, list[str], str, str, int]]) -> None:
    infos = [info(n, mid=mid, refs=" ".join(refs), irt=irt, subject=subj,
                  sent=T0 + timedelta(seconds=d))
             for n, (mid, refs, irt, subj, d) in enumerate(rows, 1)]
    for alg in ("ORDEREDSUBJECT", "REFERENCES"):
        text = _seq_lists(thread(alg, infos))
        nums = sorted(int(x) for x in text.replace("(", " ").replace(")", " ").split())
        assert nums == list(range(1, len(rows) + 1))
        assert _seq_lists(_parse_lists(text)) == text  # well-formed thread-lists


# ---------------------------------------------------------------- the command (§3)
def test_thread_commands_parse() -> None:
    cmd = p.parse_command(b'A283 THREAD ORDEREDSUBJECT UTF-8 SINCE 5-MAR-2000')
    assert isinstance(cmd, p.ThreadCmd)
    assert (cmd.algorithm, cmd.charset, cmd.uid) == ("ORDEREDSUBJECT", "UTF-8", False)
    assert cmd.program.children[0].op == "since"
    cmd = p.parse_command(b'A284 THREAD ORDEREDSUBJECT US-ASCII TEXT "gewp"')
    assert isinstance(cmd, p.ThreadCmd) and cmd.program.children[0].args == ("gewp",)
    cmd = p.parse_command(b"a uid thread references utf-8 all")
    assert isinstance(cmd, p.ThreadCmd) and cmd.uid and cmd.algorithm == "REFERENCES"


@pytest.mark.parametrize(("line", "code"), [
    (b"a THREAD REFS UTF-8 ALL", None),          # not an algorithm we offer
    (b"a THREAD REFERENCES ISO-8859-1 ALL", "BADCHARSET (UTF-8 US-ASCII)"),
    (b"a THREAD REFERENCES UTF-8", None),        # search criteria are mandatory
    (b"a THREAD REFERENCES", None),
])
def test_bad_thread_commands(line: bytes, code: str | None) -> None:
    bad = p.parse_command(line)
    assert isinstance(bad, p.Bad) and bad.tag == "a"
    if code is not None:
        assert bad.code == code
