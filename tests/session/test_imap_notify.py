"""NOTIFY (RFC 5465) on the in-memory store: the bounds (how many names one NOTIFY may
list, how many mailboxes' STATUS may wait), the subscribed filter following SUBSCRIBE,
news from another session, and no STATUS for the selected mailbox."""

from __future__ import annotations

import pytest
from test_imap_two_sessions import Client

from postbus.imap_access import session as session_mod
from postbus.imap_access.memory import MemoryPlatform


async def logged_in(mp: MemoryPlatform) -> Client:
    c = Client(mp)
    await c.cmd("LOGIN alice@example.test secret")
    return c


def statuses(lines: list[str]) -> list[str]:
    return [x for x in lines if x.startswith("* STATUS")]


async def test_too_many_names_is_notificationoverflow_and_keeps_the_old_setting() -> None:
    mp = MemoryPlatform()
    acc = mp.add_user("alice@example.test", "secret")
    c = await logged_in(mp)
    await c.cmd("NOTIFY SET (mailboxes Trash (MessageNew MessageExpunge))")
    names = " ".join(f"m{i}" for i in range(session_mod.MAX_NOTIFY_NAMES + 1))
    c.rx.push(f"x NOTIFY SET (mailboxes ({names}) (MessageNew MessageExpunge))\r\n".encode())
    while (item := c.rx.next()) is not None:
        await c.session.handle(item)
    assert c.out.take_lines() == ["x NO [NOTIFICATIONOVERFLOW] At most 100 mailbox names"]
    mp.deliver(acc, b"Subject: x\r\n\r\nx\r\n", mailbox="Trash")
    assert statuses(await c.cmd("NOOP")) == ["* STATUS Trash (MESSAGES 1 UIDNEXT 2 "
                                             f"UIDVALIDITY {mp.boxes[acc]['Trash'].uidvalidity})"]


async def test_news_waits_once_per_mailbox_and_within_a_bound(
        monkeypatch: pytest.MonkeyPatch) -> None:
    mp = MemoryPlatform()
    acc = mp.add_user("alice@example.test", "secret")
    c = await logged_in(mp)
    await c.cmd("NOTIFY SET (personal (MessageNew MessageExpunge))")
    for _ in range(5):  # five deliveries, one STATUS with the newest counts
        mp.deliver(acc, b"Subject: x\r\n\r\nx\r\n", mailbox="Trash")
    assert [s.split("(")[1] for s in statuses(await c.cmd("NOOP"))] == [
        f"MESSAGES 5 UIDNEXT 6 UIDVALIDITY {mp.boxes[acc]['Trash'].uidvalidity})"]
    monkeypatch.setattr(session_mod, "MAX_NOTIFY_PENDING", 2)
    for name in ("Trash", "Sent", "Drafts"):  # the third mailbox's news is dropped
        mp.deliver(acc, b"Subject: x\r\n\r\nx\r\n", mailbox=name)
    assert [s.split()[2] for s in statuses(await c.cmd("NOOP"))] == ["Trash", "Sent"]


async def test_subscribed_filter_follows_subscribe_and_the_selected_mailbox_is_left_out(
        ) -> None:
    mp = MemoryPlatform()
    acc = mp.add_user("alice@example.test", "secret")
    c = await logged_in(mp)
    await c.cmd("CREATE Lists")
    await c.cmd("UNSUBSCRIBE Trash")
    await c.cmd("NOTIFY SET (subscribed (MessageNew MessageExpunge))")
    mp.deliver(acc, b"Subject: x\r\n\r\nx\r\n", mailbox="Lists")
    mp.deliver(acc, b"Subject: x\r\n\r\nx\r\n", mailbox="Trash")
    assert statuses(await c.cmd("NOOP")) == []
    await c.cmd("SUBSCRIBE Lists")
    mp.deliver(acc, b"Subject: x\r\n\r\nx\r\n", mailbox="Lists")
    assert [s.split()[2] for s in statuses(await c.cmd("NOOP"))] == ["Lists"]
    # the selected mailbox reports through EXISTS, never STATUS
    await c.cmd("SELECT Lists")
    mp.deliver(acc, b"Subject: x\r\n\r\nx\r\n", mailbox="Lists")
    lines = await c.cmd("NOOP")
    assert statuses(lines) == [] and "* 3 EXISTS" in lines


async def test_news_is_pushed_between_commands() -> None:
    # what the server does when the session's wakeup fires with no command running
    mp = MemoryPlatform()
    acc = mp.add_user("alice@example.test", "secret")
    a, b = await logged_in(mp), await logged_in(mp)
    assert not a.session.idling
    await a.cmd("SELECT INBOX")
    await a.cmd("NOTIFY SET (inboxes NONE) (personal (MessageNew MessageExpunge FlagChange))")
    assert a.session.idling
    await b.cmd("APPEND Trash {5+}\r\nhello")
    await b.cmd("APPEND INBOX {5+}\r\nhello")
    assert a.session.wakeup.is_set()
    await a.session.idle_updates()
    # Trash as STATUS now; INBOX is selected and has no selected filter: at the next command
    uv = mp.boxes[acc]["Trash"].uidvalidity
    assert a.out.take_lines() == [f"* STATUS Trash (MESSAGES 1 UIDNEXT 2 UIDVALIDITY {uv})"]
    assert "* 1 EXISTS" in await a.cmd("NOOP")
    await a.cmd("NOTIFY NONE")
    assert not a.session.idling
