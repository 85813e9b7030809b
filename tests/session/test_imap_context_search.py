"""CONTEXT=SEARCH (RFC 5267 §4) in sessions against the in-memory ports: SEARCH RETURN
(UPDATE) kept up to date through the session's own STORE, EXPUNGE, MOVE and APPEND and
through another session's changes (ADDTO/REMOVEFROM as Dovecot sends them, each REMOVEFROM
before the EXPUNGE of its message, imaptest's search-context-update scripts), CANCELUPDATE,
the end of a live search with its mailbox, NOUPDATE past the limits, PARTIAL (§4.4)."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st
from test_imap_transcripts import Out

from postbus.imap_access.memory import MemoryPlatform
from postbus.imap_access.session import Session, SessionConfig
from postbus.kit.testing import examples
from postbus.protocols.imap_parser import Receiver


class Client:
    def __init__(self, mp: MemoryPlatform, **cfg: int) -> None:
        self.out = Out()
        self.session = Session(directory=mp, store=mp, blobs=mp, changes=mp, out=self.out,
                               config=SessionConfig(auth_fail_delay_s=0, **cfg),  # type: ignore[arg-type]
                               secure=True)
        self.rx = Receiver(max_line=2000, max_literal=10_000)

    async def cmd(self, line: str) -> list[str]:
        """One command (``tag text``); its responses, the tagged one last."""
        self.rx.push(f"{line}\r\n".encode())
        while (item := self.rx.next()) is not None:
            await self.session.handle(item)
        return self.out.take_lines()


async def mailbox(n: int = 5, **cfg: int) -> tuple[MemoryPlatform, int, Client]:
    mp = MemoryPlatform()
    acc = mp.add_user("alice@example.test", "secret")
    for i in range(1, n + 1):
        mp.deliver(acc, b"Subject: s%d\r\n\r\nbody %d\r\n" % (i, i))
    c = Client(mp, **cfg)
    await c.cmd("a LOGIN alice@example.test secret")
    await c.cmd("b SELECT INBOX")
    return mp, acc, c


def esearch(lines: list[str]) -> list[str]:
    return [x for x in lines if x.startswith("* ESEARCH")]


async def test_capability_and_update_through_own_changes() -> None:
    mp, acc, c = await mailbox()
    assert "CONTEXT=SEARCH" in " ".join(await c.cmd("c CAPABILITY"))
    # imaptest search-context-update: UPDATE alone answers no result (as Dovecot)
    assert await c.cmd("A1 SEARCH RETURN (UPDATE) SEEN") == [
        '* ESEARCH (TAG "A1")', "A1 OK SEARCH completed"]
    out = await c.cmd("d STORE 1,2,4 +FLAGS (\\Seen)")
    assert out[-2:] == ['* ESEARCH (TAG "A1") ADDTO (0 1:2,4)', "d OK STORE completed"]
    out = await c.cmd("e STORE 1,2 -FLAGS.SILENT (\\Seen)")
    assert esearch(out) == ['* ESEARCH (TAG "A1") REMOVEFROM (0 1:2)']
    # 3, 4 and 5 go; 4 (the only match) is 3 when its EXPUNGE comes: REMOVEFROM first
    await c.cmd("f STORE 3:5 +FLAGS.SILENT (\\Deleted)")
    out = await c.cmd("g EXPUNGE")
    assert out == ["* 3 EXPUNGE", '* ESEARCH (TAG "A1") REMOVEFROM (0 3)', "* 3 EXPUNGE",
                   "* 3 EXPUNGE", "g OK EXPUNGE completed"]
    out = await c.cmd("h APPEND INBOX (\\Seen) {10+}\r\nSubject: x")
    assert "* 3 EXISTS" in out and esearch(out) == ['* ESEARCH (TAG "A1") ADDTO (0 3)']
    assert await c.cmd('i CANCELUPDATE "A1"') == ["i OK CANCELUPDATE completed"]
    out = await c.cmd("j STORE 1 +FLAGS (\\Seen)")
    assert esearch(out) == []
    assert c.session.state.view.touched is None  # type: ignore[union-attr]
    assert (await c.cmd('k CANCELUPDATE "A1"'))[-1].startswith("k NO ")


async def test_uid_search_with_all_and_another_sessions_changes() -> None:
    mp, acc, c = await mailbox()
    other = Client(mp)
    await other.cmd("a LOGIN alice@example.test secret")
    await other.cmd("b SELECT INBOX")
    await c.cmd("c STORE 1,2 +FLAGS.SILENT (\\Seen)")
    # imaptest search-context-update3: UID results, a search program with an OR
    out = await c.cmd("A2 UID SEARCH RETURN (UPDATE ALL) OR SEEN SUBJECT s3")
    assert out == ['* ESEARCH (TAG "A2") UID ALL 1:3', "A2 OK SEARCH completed"]
    await other.cmd("d STORE 4:5 +FLAGS.SILENT (\\Seen)")
    out = await c.cmd("e NOOP")
    assert out[-2] == '* ESEARCH (TAG "A2") UID ADDTO (0 4:5)'
    await other.cmd("f STORE 1 -FLAGS.SILENT (\\Seen)")
    await other.cmd("g STORE 2 +FLAGS.SILENT (\\Deleted)")
    await other.cmd("h EXPUNGE")
    mp.deliver(acc, b"Subject: s3 again\r\n\r\nx\r\n")
    out = await c.cmd("i NOOP")
    # a UID result says UIDs; the expunged 2 leaves it before its EXPUNGE
    assert out.index('* ESEARCH (TAG "A2") UID REMOVEFROM (0 2)') < out.index("* 2 EXPUNGE")
    # then one response for what left and entered: 1 lost \Seen, 6 is new and matches
    assert out[-2:] == ['* ESEARCH (TAG "A2") UID REMOVEFROM (0 1) ADDTO (0 6)',
                        "i OK NOOP completed"]
    # no EXPUNGE while answering SEARCH (RFC 3501 §7.4.1), so neither its REMOVEFROM: the
    # message (UID 4, 3 here) is still there for this client
    await other.cmd("j STORE 3 +FLAGS.SILENT (\\Deleted)")
    await other.cmd("k EXPUNGE")
    out = await c.cmd("l SEARCH RETURN (COUNT) ALL")
    assert not any("EXPUNGE" in x or "REMOVEFROM" in x for x in out), out
    out = await c.cmd("m NOOP")
    assert out[:2] == ['* ESEARCH (TAG "A2") UID REMOVEFROM (0 4)', "* 3 EXPUNGE"]


async def test_sequence_numbers_in_the_program_stay_with_their_messages() -> None:
    mp, acc, c = await mailbox()
    await c.cmd("A3 SEARCH RETURN (UPDATE ALL) 4:5 UNSEEN")
    await c.cmd("c STORE 1 +FLAGS.SILENT (\\Deleted)")
    await c.cmd("d EXPUNGE")
    # 4:5 named UIDs 4 and 5 (now 3 and 4); the new message 5 is not in the set
    mp.deliver(acc, b"Subject: new\r\n\r\nx\r\n")
    out = await c.cmd("e STORE 3 +FLAGS (\\Seen)")
    assert esearch(out) == ['* ESEARCH (TAG "A3") REMOVEFROM (0 3)']
    out = await c.cmd("f STORE 3 -FLAGS (\\Seen)")
    assert esearch(out) == ['* ESEARCH (TAG "A3") ADDTO (0 3)']


async def test_move_and_fetch_seen_update_the_result() -> None:
    mp, acc, c = await mailbox(3)
    await c.cmd('c CREATE Archive')
    await c.cmd("A4 SEARCH RETURN (UPDATE) UNSEEN")
    out = await c.cmd("d FETCH 1 BODY[]")
    assert esearch(out) == ['* ESEARCH (TAG "A4") REMOVEFROM (0 1)']
    out = await c.cmd("e MOVE 2 Archive")
    assert out.index('* ESEARCH (TAG "A4") REMOVEFROM (0 2)') == out.index("* 2 EXPUNGE") - 1


async def test_duplicate_tag_limits_and_deselect() -> None:
    mp, acc, c = await mailbox(4, search_updates_max=2, search_update_uids_max=5)
    assert (await c.cmd("A1 SEARCH RETURN (UPDATE) ALL"))[-1] == "A1 OK SEARCH completed"
    assert (await c.cmd("A1 SEARCH RETURN (UPDATE) ALL"))[-1].startswith("A1 BAD ")
    # a tag in use may still search without UPDATE
    assert (await c.cmd("A1 SEARCH RETURN (COUNT) ALL"))[-2] == '* ESEARCH (TAG "A1") COUNT 4'
    # 4 + 4 UIDs held would pass the limit of 5: the search is answered, not kept
    out = await c.cmd("A2 SEARCH RETURN (UPDATE COUNT) ALL")
    assert out == ['* NO [NOUPDATE "A2"] Too many search updates',
                   '* ESEARCH (TAG "A2") COUNT 4', "A2 OK SEARCH completed"]
    assert (await c.cmd("A3 SEARCH RETURN (UPDATE) SEEN"))[0] == '* ESEARCH (TAG "A3")'
    assert (await c.cmd("A4 SEARCH RETURN (UPDATE) SEEN"))[0].startswith('* NO [NOUPDATE')
    # a result that grows past the limit stops being updated (§4.3)
    out = await c.cmd("d STORE 1:3 +FLAGS (\\Seen)")
    assert '* NO [NOUPDATE "A3"] Search result too large to update' in out
    assert esearch(out) == []
    # a live search ends with its mailbox
    await c.cmd("e SELECT INBOX")
    assert (await c.cmd('f CANCELUPDATE "A1"'))[-1].startswith("f NO ")


async def test_a_failed_update_is_tried_again() -> None:
    mp, acc, c = await mailbox(3)
    await c.cmd("A1 SEARCH RETURN (UPDATE) SEEN")
    search = mp.search
    calls = 0

    async def failing_once(req: object) -> object:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("store down")
        return await search(req)  # type: ignore[arg-type]

    mp.search = failing_once  # type: ignore[method-assign]
    out = await c.cmd("d STORE 2 +FLAGS.SILENT (\\Seen)")
    assert out == ["d OK STORE completed"]  # the change is kept for the next look
    out = await c.cmd("e NOOP")
    assert out == ['* ESEARCH (TAG "A1") ADDTO (0 2)', "e OK NOOP completed"]


async def test_cancelupdate_does_not_echo_line_breaks() -> None:
    mp, acc, c = await mailbox(1)
    out = await c.cmd("d CANCELUPDATE {9+}\r\nA1\r\n* BYE")
    assert out == ["d NO Unknown tag A1* BYE"]


async def test_partial_of_search_and_sort() -> None:
    mp, acc, c = await mailbox()
    # RFC 5267 §4.4: a client pages through a large result
    out = await c.cmd("A1 UID SEARCH RETURN (PARTIAL 1:2) ALL")
    assert out[0] == '* ESEARCH (TAG "A1") UID PARTIAL (1:2 1:2)'
    out = await c.cmd("A2 SEARCH RETURN (PARTIAL 3:4 COUNT MIN) ALL")
    assert out[0] == '* ESEARCH (TAG "A2") MIN 1 PARTIAL (3:4 3:4) COUNT 5'
    out = await c.cmd("A3 SEARCH RETURN (PARTIAL 9:10) ALL")
    assert out[0] == '* ESEARCH (TAG "A3") PARTIAL (9:10 NIL)'
    out = await c.cmd("A4 SORT RETURN (PARTIAL 1:3) (REVERSE SUBJECT) UTF-8 ALL")
    assert out[0] == '* ESEARCH (TAG "A4") PARTIAL (1:3 5,4,3)'
    out = await c.cmd("A5 SEARCH RETURN (PARTIAL 1:2) MODSEQ 1")
    assert out[1].startswith('* ESEARCH (TAG "A5") PARTIAL (1:2 1:2) MODSEQ ')
    assert (await c.cmd("A6 SEARCH RETURN (PARTIAL 1:*) ALL"))[-1].startswith("A6 BAD ")


# ---------------------------------------------------------------- a client's copy stays right
def _expand(text: str) -> set[int]:
    out: set[int] = set()
    for part in text.split(","):
        a, _, b = part.partition(":")
        out.update(range(int(a), int(b or a) + 1))
    return out


_UPDATE = re.compile(r'\* ESEARCH \(TAG "L"\)( UID)?((?: (?:ADDTO|REMOVEFROM) \(0 [0-9:,]+\))+)\Z')
_ITEM = re.compile(r"(ADDTO|REMOVEFROM) \(0 ([0-9:,]+)\)")


class Mirror:
    """What a client keeps of a live search from the responses alone (RFC 5267 §4.3):
    REMOVEFROM and ADDTO edit it; an EXPUNGE renumbers it (sequence numbers), and must
    never name a message still in it (its REMOVEFROM comes first)."""

    def __init__(self, uid: bool, first: set[int]) -> None:
        self.uid, self.result = uid, set(first)

    def read(self, lines: list[str]) -> None:
        for line in lines:
            if m := _UPDATE.match(line):
                assert bool(m.group(1)) == self.uid, line
                for verb, nums in _ITEM.findall(m.group(2)):
                    got = _expand(nums)
                    if verb == "ADDTO":
                        assert not got & self.result, line
                        self.result |= got
                    else:
                        assert got <= self.result, line
                        self.result -= got
            elif (m2 := re.fullmatch(r"\* (\d+) EXPUNGE", line)) and not self.uid:
                n = int(m2.group(1))
                assert n not in self.result, f"EXPUNGE of {n} before its REMOVEFROM"
                self.result = {s - 1 if s > n else s for s in self.result}


_PROGRAMS = ["UNSEEN", "OR FLAGGED SUBJECT a", "SEEN NOT FLAGGED", "UID 1:3 UNSEEN", "ALL"]
_STEPS = st.lists(st.tuples(
    st.sampled_from(["seen", "unseen", "flag", "expunge", "other-seen", "other-expunge",
                     "deliver", "move", "fetch"]),
    st.integers(1, 8)), max_size=10)


@settings(max_examples=examples(60), deadline=None)
@given(st.booleans(), st.sampled_from(_PROGRAMS), _STEPS)
async def test_a_live_result_always_equals_a_fresh_search(
        uid: bool, program: str, steps: list[tuple[str, int]]) -> None:
    mp, acc, c = await mailbox(4)
    other = Client(mp)
    await other.cmd("a LOGIN alice@example.test secret")
    await other.cmd("b SELECT INBOX")
    await c.cmd("c CREATE Other")
    verb = "UID SEARCH" if uid else "SEARCH"
    first = await c.cmd(f"L {verb} RETURN (UPDATE ALL) {program}")
    assert first[-1] == "L OK SEARCH completed", first
    shown = [x for x in first if x.startswith('* ESEARCH (TAG "L")') and " ALL " in x]
    mirror = Mirror(uid, _expand(shown[0].rsplit(" ", 1)[1]) if shown else set())
    exists = 4
    for n, (op, k) in enumerate(steps):
        seq = (k - 1) % exists + 1 if exists else 0
        if op == "deliver":
            mp.deliver(acc, b"Subject: %s\r\n\r\nx\r\n" % (b"a" if k % 2 else b"b"))
        elif op.startswith("other-"):
            if op == "other-seen":
                await other.cmd(f"o{n} STORE {k} +FLAGS (\\Seen)")
            else:
                await other.cmd(f"o{n} STORE {k} +FLAGS (\\Deleted)")
                await other.cmd(f"p{n} EXPUNGE")
        elif seq:
            cmd = {"seen": f"STORE {seq} +FLAGS (\\Seen)",
                   "unseen": f"STORE {seq} -FLAGS (\\Seen)",
                   "flag": f"STORE {seq} +FLAGS (\\Flagged)",
                   "expunge": f"STORE {seq} +FLAGS (\\Deleted)",
                   "move": f"MOVE {seq} Other",
                   "fetch": f"FETCH {seq} BODY[]"}[op]
            mirror.read(await c.cmd(f"s{n} {cmd}"))
            if op == "expunge":
                mirror.read(await c.cmd(f"x{n} EXPUNGE"))
        out = await c.cmd(f"n{n} NOOP")
        mirror.read(out)
        exists = int(next(x for x in reversed(
            await c.cmd(f"e{n} STATUS INBOX (MESSAGES)")) if "MESSAGES" in x).split()[-1][:-1])
        fresh = (await c.cmd(f"f{n} {verb} {program}"))[0]
        assert fresh.startswith("* SEARCH")
        assert mirror.result == {int(x) for x in fresh.split()[2:]}, (steps[:n + 1], fresh)
