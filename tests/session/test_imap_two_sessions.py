"""Two IMAP sessions on one mailbox of the in-memory store: \\Recent goes to exactly one of
them (RFC 3501 §2.3.2), and a MOVE into the selected mailbox reaches the other as one
change (RFC 6851), never as a \\Deleted flag set on the way."""

from __future__ import annotations

import re

from test_imap_transcripts import Out

from postbus.imap_access.memory import MemoryPlatform
from postbus.imap_access.session import Session, SessionConfig
from postbus.protocols.imap_parser import Receiver


class Client:
    def __init__(self, mp: MemoryPlatform) -> None:
        self.out = Out()
        self.session = Session(directory=mp, store=mp, blobs=mp, changes=mp, out=self.out,
                               config=SessionConfig(auth_fail_delay_s=0), secure=True)
        self.rx = Receiver(max_line=2000, max_literal=10_000)
        self.n = 0

    async def cmd(self, text: str) -> list[str]:
        self.n += 1
        tag = f"t{self.n}"
        self.rx.push(f"{tag} {text}\r\n".encode())
        while (item := self.rx.next()) is not None:
            await self.session.handle(item)
        lines = self.out.take_lines()
        assert lines and lines[-1].startswith(f"{tag} OK"), lines
        return lines


def recent_uids(lines: list[str]) -> set[int]:
    found = [line for line in lines if line.startswith("* SEARCH")]
    return {int(x) for x in found[0].split()[2:]}


async def two_sessions() -> tuple[MemoryPlatform, int, Client, Client]:
    mp = MemoryPlatform()
    acc = mp.add_user("alice@example.test", "secret")
    for i in range(3):
        mp.deliver(acc, b"Subject: old %d\r\n\r\nx\r\n" % i)
    a, b = Client(mp), Client(mp)
    for c in (a, b):
        await c.cmd("LOGIN alice@example.test secret")
    return mp, acc, a, b


async def test_each_message_is_recent_to_one_session() -> None:
    mp, acc, a, b = await two_sessions()
    assert "* 3 RECENT" in await a.cmd("SELECT INBOX")
    assert "* 0 RECENT" in await b.cmd("SELECT INBOX")  # a was told first
    for i in range(3):
        mp.deliver(acc, b"Subject: new %d\r\n\r\nx\r\n" % i)
    # both hear of the new mail; the one that looks first gets it
    got_b = await b.cmd("NOOP")
    got_a = await a.cmd("NOOP")
    assert "* 6 EXISTS" in got_a and "* 6 EXISTS" in got_b
    assert "* 3 RECENT" in got_b and "* 3 RECENT" in got_a  # a keeps its first three
    recent_a = recent_uids(await a.cmd("UID SEARCH RECENT"))
    recent_b = recent_uids(await b.cmd("UID SEARCH RECENT"))
    assert (recent_a, recent_b) == ({1, 2, 3}, {4, 5, 6})
    assert "\\Recent" not in " ".join(await a.cmd("UID FETCH 4:6 (FLAGS)"))
    # a message copied into the mailbox by a is new to everyone; a is told first
    await a.cmd("COPY 1 INBOX")
    await b.cmd("NOOP")
    assert recent_uids(await a.cmd("UID SEARCH RECENT")) == {1, 2, 3, 7}
    assert recent_uids(await b.cmd("UID SEARCH RECENT")) == {4, 5, 6}


async def test_examine_does_not_take_recent_from_a_later_select() -> None:
    mp, acc, a, b = await two_sessions()
    assert "* 3 RECENT" in await b.cmd("EXAMINE INBOX")
    assert "* 3 RECENT" in await a.cmd("SELECT INBOX")
    mp.deliver(acc, b"Subject: new\r\n\r\nx\r\n")
    assert "* 4 RECENT" in await a.cmd("NOOP")
    got = await b.cmd("NOOP")  # claimed by a meanwhile: not recent to the examiner
    assert "* 4 EXISTS" in got and "* 3 RECENT" in got


async def test_move_into_the_selected_mailbox_is_one_change() -> None:
    mp, acc, a, b = await two_sessions()
    calls: list[str] = []
    for name in ("copy", "flags", "expunge"):
        real = getattr(mp, name)

        async def spy(req: object, real: object = real, name: str = name) -> object:
            calls.append(name)
            return await real(req)  # type: ignore[operator]

        setattr(mp, name, spy)
    await a.cmd("SELECT INBOX")
    await b.cmd("SELECT INBOX")
    got = await a.cmd("MOVE 1:2 INBOX")
    assert calls == ["copy"]
    assert got[:4] == ["* OK [COPYUID 1001 1:2 4:5] Moved", "* 1 EXPUNGE", "* 1 EXPUNGE",
                       "* 3 EXISTS"]
    seen = await b.cmd("NOOP")
    assert not any(re.search(r"FETCH.*\\Deleted", line) for line in seen), seen
    assert [x for x in seen if "EXPUNGE" in x or "EXISTS" in x] == [
        "* 5 EXISTS", "* 1 EXPUNGE", "* 1 EXPUNGE"]
    fetched = (await b.cmd("FETCH 1:* (UID)"))[:-1]
    assert [line.split()[4].rstrip(")") for line in fetched] == ["3", "4", "5"]
