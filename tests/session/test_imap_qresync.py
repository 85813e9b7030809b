"""QRESYNC (RFC 7162 §3.2) with the RFC's own examples, replayed on the in-memory store:
SELECT's QRESYNC parameter (§3.2.5.1), UID FETCH ... (CHANGEDSINCE n VANISHED) (§3.2.6)
and VANISHED in place of EXPUNGE once enabled (§3.2.10). UIDs and flags are the RFC's;
MODSEQs and message numbers are the ones this smaller mailbox has."""

from __future__ import annotations

import re

import pytest
from test_imap_two_sessions import Client

from postbus.imap_access.memory import MemoryPlatform
from postbus.imap_access.ports import StoreError
from postbus.proto.store import ExpungeRequest, SelectReply, SelectRequest, StoreFlagsRequest


def uids_of(spec: str) -> list[int]:
    out: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.partition(":")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


class Box:
    """A mailbox of UIDs 1..n, changed behind the session's back (as another client would)."""

    def __init__(self, mp: MemoryPlatform, acc: int, name: str, n: int) -> None:
        self.mp, self.acc, self.name = mp, acc, name
        if name not in mp.boxes[acc]:
            mp._new_box(acc, name)
        for i in range(n):
            mp.deliver(acc, b"Subject: m%d\r\n\r\nx\r\n" % i, mailbox=name,
                       notify=False)
        self.id = mp.boxes[acc][name].id
        mp.boxes[acc][name].recent_uid = mp.boxes[acc][name].uidnext  # no \Recent here

    @property
    def modseq(self) -> int:
        return self.mp.boxes[self.acc][self.name].highestmodseq

    @property
    def uidvalidity(self) -> int:
        return self.mp.boxes[self.acc][self.name].uidvalidity

    async def set_flags(self, uid: int, *flags: str) -> None:
        await self.mp.flags(StoreFlagsRequest(
            account_id=self.acc, mailbox_id=self.id, uids=[(uid, uid)], op="set",
            flags=list(flags), origin="other"))

    async def expunge(self, spec: str) -> None:
        uids = uids_of(spec)
        await self.mp.flags(StoreFlagsRequest(
            account_id=self.acc, mailbox_id=self.id, uids=[(u, u) for u in uids], op="add",
            flags=["\\Deleted"], origin="other"))
        await self.mp.expunge(ExpungeRequest(account_id=self.acc, mailbox_id=self.id,
                                             uids=[(u, u) for u in uids], limit=100_000))


def inbox(n: int) -> Box:
    """A fresh platform whose one user, alice, has UIDs 1..n in her INBOX."""
    mp = MemoryPlatform()
    return Box(mp, mp.add_user("alice@example.test", "secret"), "INBOX", n)


async def client(mp: MemoryPlatform, *, enable: bool = True) -> Client:
    c = Client(mp)
    await c.cmd("LOGIN alice@example.test secret")
    if enable:
        assert "* ENABLED QRESYNC" in await c.cmd("ENABLE QRESYNC")
    return c


def untagged(lines: list[str], word: str) -> list[str]:
    return [x for x in lines if re.match(rf"\* (\d+ )?{word}\b", x)]


async def test_rfc7162_3_2_5_1_select_with_known_uids() -> None:
    # A03 SELECT INBOX (QRESYNC (67890007 20050715194045000 41,43:211,214:541))
    box = inbox(549)
    since = box.modseq
    await box.expunge("41,43:116,118,120:211,214:540")
    await box.set_flags(117, "\\Seen", "\\Answered")
    await box.set_flags(119, "\\Draft", "$MDNSent")
    await box.set_flags(541, "\\Seen", "$Forwarded")
    await box.set_flags(30, "\\Seen")  # changed, but the client did not name it
    await box.set_flags(549, "\\Seen")  # nor this one (it learns of it from EXISTS)
    c = await client(box.mp)
    uidvalidity = box.uidvalidity
    lines = await c.cmd(f"SELECT INBOX (QRESYNC ({uidvalidity} {since} 41,43:211,214:541))")
    assert untagged(lines, "VANISHED") == ["* VANISHED (EARLIER) 41,43:116,118,120:211,214:540"]
    fetches = untagged(lines, "FETCH")
    assert [re.sub(r"MODSEQ \(\d+\)", "MODSEQ (n)", x) for x in fetches] == [
        "* 42 FETCH (UID 117 FLAGS (\\Seen \\Answered) MODSEQ (n))",
        "* 43 FETCH (UID 119 FLAGS (\\Draft $MDNSent) MODSEQ (n))",
        "* 46 FETCH (UID 541 FLAGS (\\Seen $Forwarded) MODSEQ (n))"]
    # VANISHED (EARLIER) before the FETCHes, both before the tagged OK
    assert lines.index(untagged(lines, "VANISHED")[0]) < lines.index(fetches[0])
    assert "* 54 EXISTS" in lines and lines[-1].endswith("SELECT completed")
    # the keyword of a changed message was announced in FLAGS before it
    assert "$MDNSent" in next(x for x in lines if x.startswith("* FLAGS"))


async def test_select_without_known_uids_reports_every_expunge_since() -> None:
    box = inbox(20)
    since = box.modseq
    await box.expunge("3,5:7")
    await box.expunge("20")
    c = await client(box.mp)
    uv = box.uidvalidity
    lines = await c.cmd(f"EXAMINE INBOX (QRESYNC ({uv} {since}))")
    assert untagged(lines, "VANISHED") == ["* VANISHED (EARLIER) 3,5:7,20"]
    assert untagged(lines, "FETCH") == []
    # a MODSEQ from before the first expunge but after the second: only the second
    later = box.mp.boxes[box.acc]["INBOX"].expunged[3]
    lines = await c.cmd(f"EXAMINE INBOX (QRESYNC ({uv} {later}))")
    assert untagged(lines, "VANISHED") == ["* VANISHED (EARLIER) 20"]
    # a MODSEQ of 0 (the client knows nothing): every expunge the mailbox ever had
    lines = await c.cmd(f"EXAMINE INBOX (QRESYNC ({uv} 0))")
    assert untagged(lines, "VANISHED") == ["* VANISHED (EARLIER) 3,5:7,20"]
    assert len(untagged(lines, "FETCH")) == 15


async def test_rfc7162_3_2_5_2_seq_match_data_is_checked_and_the_log_answers() -> None:
    # B04 SELECT INBOX (QRESYNC (67890007 90060115194045000 1:29997 (5000,7500,9000,9990:9999
    #     15000,22500,27000,29970,29973,29976,29979,29982,29985,29988,29991,29994,29997)))
    box = inbox(30)
    since = box.modseq
    await box.expunge("2:3,10")
    c = await client(box.mp)
    uv = box.uidvalidity
    lines = await c.cmd(f"SELECT INBOX (QRESYNC ({uv} {since} 1:30 (5,10,20:21 5,10,20,21)))")
    assert untagged(lines, "VANISHED") == ["* VANISHED (EARLIER) 2:3,10"]
    bad = Client(box.mp)
    await bad.cmd("LOGIN alice@example.test secret")
    await bad.cmd("ENABLE QRESYNC")
    bad.rx.push(f"x SELECT INBOX (QRESYNC ({uv} {since} 1:30 (5,10 5)))\r\n".encode())
    while (item := bad.rx.next()) is not None:
        await bad.session.handle(item)
    assert bad.out.take_lines()[-1].startswith("x BAD")


async def test_rfc7162_3_2_6_uid_fetch_vanished() -> None:
    # s100 UID FETCH 300:500 (FLAGS) (CHANGEDSINCE 12345 VANISHED)
    box = inbox(520)
    c = await client(box.mp)
    await c.cmd("SELECT INBOX")
    since = box.modseq
    await box.expunge("300:310,405,411,510")
    await box.set_flags(404, "\\Seen")
    await box.set_flags(406, "\\Deleted")
    await box.set_flags(408, "\\Deleted", "\\Flagged")
    await box.set_flags(515, "\\Seen")
    await c.cmd("NOOP")  # the session hears of the expunges: they leave its view
    lines = await c.cmd(f"UID FETCH 300:500 (FLAGS) (CHANGEDSINCE {since} VANISHED)")
    assert untagged(lines, "VANISHED") == ["* VANISHED (EARLIER) 300:310,405,411"]
    assert [re.sub(r"MODSEQ \(\d+\)", "MODSEQ (n)", x) for x in untagged(lines, "FETCH")] == [
        "* 393 FETCH (UID 404 FLAGS (\\Seen) MODSEQ (n))",
        "* 394 FETCH (UID 406 FLAGS (\\Deleted) MODSEQ (n))",
        "* 396 FETCH (UID 408 FLAGS (\\Deleted \\Flagged) MODSEQ (n))"]


async def test_an_expunge_not_yet_reported_is_not_earlier() -> None:
    # the session still shows the message: its expunge comes as a VANISHED that changes
    # message numbers, at a point where one may be sent, never as VANISHED (EARLIER)
    box = inbox(5)
    c = await client(box.mp)
    await c.cmd("SELECT INBOX")
    since = box.modseq
    await box.expunge("2")
    lines = await c.cmd(f"UID FETCH 1:* (FLAGS) (CHANGEDSINCE {since} VANISHED)")
    # the \Deleted flag and the expunge reach it as news, after the command (UID FETCH
    # may report expunges, RFC 3501 §7.4.1)
    assert lines == [f"* 2 FETCH (FLAGS (\\Deleted) UID 2 MODSEQ ({since + 1}))",
                     "* VANISHED 2", lines[-1]]


async def test_rfc7162_3_2_10_vanished_instead_of_expunge() -> None:
    box = inbox(430)
    c = await client(box.mp)
    await c.cmd("SELECT INBOX")
    await c.cmd("UID STORE 405,407,410,425 +FLAGS.SILENT (\\Deleted)")
    lines = await c.cmd("EXPUNGE")
    assert lines[:-1] == ["* VANISHED 405,407,410,425"]
    assert re.fullmatch(r"t\d+ OK \[HIGHESTMODSEQ \d+\] EXPUNGE completed", lines[-1])
    lines = await c.cmd("UID MOVE 1:3 Trash")
    assert "* VANISHED 1:3" in lines and not untagged(lines, "EXPUNGE")
    await c.cmd("STORE 1 +FLAGS.SILENT (\\Deleted)")
    assert untagged(await c.cmd("UID EXPUNGE 1:10"), "VANISHED") == ["* VANISHED 4"]


async def test_without_enable_expunge_stays_expunge() -> None:
    box = inbox(5)
    c = await client(box.mp, enable=False)
    await c.cmd("SELECT INBOX (CONDSTORE)")
    await c.cmd("STORE 2,4 +FLAGS.SILENT (\\Deleted)")
    assert (await c.cmd("EXPUNGE"))[:-1] == ["* 2 EXPUNGE", "* 3 EXPUNGE"]


async def test_other_sessions_hear_vanished_and_live_searches_stay_in_step() -> None:
    box = inbox(6)
    a, b = await client(box.mp), await client(box.mp)
    await a.cmd("SELECT INBOX")
    await b.cmd("SELECT INBOX")
    await a.cmd("SEARCH RETURN (UPDATE) ALL")  # a live search on message numbers
    await b.cmd("STORE 2,4 +FLAGS.SILENT (\\Deleted)")
    await b.cmd("EXPUNGE")
    lines = await a.cmd("FETCH 1 (FLAGS)")  # no expunge report while answering FETCH
    assert not untagged(lines, "VANISHED")
    lines = await a.cmd("NOOP")
    # each REMOVEFROM names the message by the number it has until the VANISHED after it
    gone = [x for x in lines if "REMOVEFROM" in x or "VANISHED" in x]
    assert [re.sub(r'\(TAG "[^"]+"\) ', "", x) for x in gone] == [
        "* ESEARCH REMOVEFROM (0 2)", "* VANISHED 2", "* ESEARCH REMOVEFROM (0 3)",
        "* VANISHED 4"]


async def test_when_the_expunge_log_cannot_answer_every_missing_known_uid_is_vanished(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # RFC 7162 §3.2.5.2: a server without the log reports the known UIDs that are gone
    box = inbox(12)
    since = box.modseq
    await box.expunge("2,5:6,12")
    c = await client(box.mp)
    uv = box.uidvalidity
    real = box.mp.select

    async def no_log(req: SelectRequest) -> SelectReply:
        if req.changed_since is not None:
            raise StoreError("too_large", "the expunge log does not fit a reply")
        return await real(req)

    monkeypatch.setattr(box.mp, "select", no_log)
    lines = await c.cmd(f"SELECT INBOX (QRESYNC ({uv} {since} 1:5,9:20))")
    assert untagged(lines, "VANISHED") == ["* VANISHED (EARLIER) 2,5,12"]
    lines = await c.cmd(f"UID FETCH 1:* (FLAGS) (CHANGEDSINCE {since} VANISHED)")
    assert untagged(lines, "VANISHED") == ["* VANISHED (EARLIER) 2,5:6,12"]


async def test_many_scattered_expunges_go_out_in_lines_of_bounded_length() -> None:
    box = inbox(6000)
    c = await client(box.mp)
    await c.cmd("SELECT INBOX")
    await box.expunge(",".join(str(u) for u in range(2, 6001, 2)))  # another client's
    lines = untagged(await c.cmd("NOOP"), "VANISHED")
    assert len(lines) > 1 and all(len(x) <= 8000 + len("* VANISHED ") for x in lines)
    gone = [int(u) for x in lines for u in x.split()[2].split(",")]
    assert gone == list(range(2, 6001, 2))
