"""NOTIFY (RFC 5465) through the imap-access server over the real mailbox-store and a real
nats-server: a change another session makes in a mailbox that is not selected reaches a
NOTIFY session as an unsolicited STATUS, pushed while it sends nothing (mailbox.changed
through BusChanges, the server's wakeup between commands)."""

from __future__ import annotations

import asyncio
import re

import pytest
from imap_store_support import imap_port  # noqa: F401 (a fixture)
from test_imap_qresync_store import session

pytestmark = pytest.mark.timeout(120)

INBOX_MESSAGES = 8  # in alice's INBOX when imap_port starts


def scenario(port: int) -> None:
    a = session(port, qresync=True)
    a.cmd("SELECT INBOX")
    lines = a.cmd("NOTIFY SET STATUS (selected (MessageNew MessageExpunge)) "
                  "(personal (MessageNew MessageExpunge FlagChange))")
    trash = next(x for x in lines if x.startswith("* STATUS Trash"))
    assert re.fullmatch(r"\* STATUS Trash \(MESSAGES 0 UIDNEXT 1 UIDVALIDITY \d+ UNSEEN 0 "
                        r"HIGHESTMODSEQ \d+\)", trash), trash
    assert not any(x.startswith("* STATUS INBOX") for x in lines)  # the selected one
    b = session(port, qresync=False)
    b.cmd("APPEND Trash {5+}\r\nhello")
    # nothing sent by a: the STATUS comes by itself
    a.sock.settimeout(10)
    line = a.rf.readline().decode().rstrip("\r\n")
    assert re.fullmatch(r"\* STATUS Trash \(MESSAGES 1 UIDNEXT 2 UIDVALIDITY \d+\)", line), line
    b.cmd("SELECT INBOX")
    b.cmd("STORE 1 +FLAGS.SILENT (\\Deleted)")
    b.cmd("EXPUNGE")  # in a's selected mailbox, with a selected filter: pushed as well
    pushed = [a.rf.readline().decode().rstrip("\r\n")]
    while pushed[-1].startswith("* 1 FETCH"):  # the \Deleted flag may come first
        pushed.append(a.rf.readline().decode().rstrip("\r\n"))
    assert pushed[-1] == "* VANISHED 1", pushed
    assert a.cmd("NOTIFY NONE")[-1].endswith("OK NOTIFY completed")
    a.close()
    b.close()


async def test_notify_over_the_real_store(imap_port: int) -> None:  # noqa: F811
    await asyncio.to_thread(scenario, imap_port)
