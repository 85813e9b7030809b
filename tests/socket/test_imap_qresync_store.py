"""QRESYNC (RFC 7162 §3.2) through the imap-access server over the real mailbox-store
(SQLite; PostgreSQL too when POSTBUS_TEST_POSTGRES_URL is set) on a real nats-server: the
store's expunge log answers SELECT's QRESYNC parameter and UID FETCH ... VANISHED after a
reconnect, and an expunge by another session reaches a QRESYNC session as VANISHED through
mailbox.changed."""

from __future__ import annotations

import asyncio
import re

import pytest
from imap_store_support import PASSWORD, USER, Client, imap_port, matching  # noqa: F401

pytestmark = pytest.mark.timeout(120)

INBOX_MESSAGES = 8  # in alice's INBOX when imap_port starts


def code(lines: list[str], name: str) -> int:
    m = next(re.search(rf"\[{name} (\d+)\]", x) for x in lines if f"[{name} " in x)
    assert m is not None
    return int(m.group(1))


def session(port: int, *, qresync: bool) -> Client:
    c = Client(port, "q")
    c.cmd(f"LOGIN {USER} {PASSWORD}")
    if qresync:
        assert "* ENABLED QRESYNC" in c.cmd("ENABLE QRESYNC")
    return c


def scenario(port: int) -> None:
    # a client syncs, remembers UIDVALIDITY and HIGHESTMODSEQ, and goes away
    a = session(port, qresync=True)
    first = a.cmd("SELECT INBOX")
    uv, since = code(first, "UIDVALIDITY"), code(first, "HIGHESTMODSEQ")
    a.close()
    # meanwhile another client (no QRESYNC: plain EXPUNGE responses) changes things
    b = session(port, qresync=False)
    b.cmd("SELECT INBOX")
    b.cmd("UID STORE 2,4,7 +FLAGS.SILENT (\\Deleted)")
    assert matching(b.cmd("EXPUNGE"), r"\* \d+ EXPUNGE") == ["* 2 EXPUNGE", "* 3 EXPUNGE",
                                                            "* 5 EXPUNGE"]
    b.cmd("UID STORE 5 +FLAGS.SILENT (\\Flagged)")
    # the client comes back and learns exactly that, among the UIDs it names
    a = session(port, qresync=True)
    lines = a.cmd(f"SELECT INBOX (QRESYNC ({uv} {since} 1:7))")
    assert matching(lines, r"\* VANISHED.*") == ["* VANISHED (EARLIER) 2,4,7"]
    assert matching(lines, r"\* \d+ FETCH.*") == [
        f"* 3 FETCH (UID 5 FLAGS (\\Flagged) MODSEQ ({code(lines, 'HIGHESTMODSEQ')}))"]
    assert "* 5 EXISTS" in lines
    # a stale UIDVALIDITY: a plain SELECT
    lines = a.cmd(f"SELECT INBOX (QRESYNC ({uv + 1} {since}))")
    assert not matching(lines, r"\* (VANISHED|\d+ FETCH).*")
    # the other session expunges while this one watches: VANISHED, not EXPUNGE
    b.cmd("UID STORE 1 +FLAGS.SILENT (\\Deleted)")
    b.cmd("UID EXPUNGE 1")
    assert a.noop_until(r"\* VANISHED.*", never=r"\* \d+ EXPUNGE") == ["* VANISHED 1"]
    lines = a.cmd(f"UID FETCH 1:* (FLAGS) (CHANGEDSINCE {since} VANISHED)")
    assert matching(lines, r"\* VANISHED.*") == ["* VANISHED (EARLIER) 1:2,4,7"]
    assert [re.sub(r"MODSEQ \(\d+\)", "MODSEQ (n)", x)
            for x in matching(lines, r"\* \d+ FETCH.*")] == [
        "* 2 FETCH (UID 5 FLAGS (\\Flagged) MODSEQ (n))"]
    # and its own EXPUNGE
    a.cmd("UID STORE 3,8 +FLAGS.SILENT (\\Deleted)")
    assert matching(a.cmd("EXPUNGE"), r"\* (VANISHED|\d+ EXPUNGE).*") == ["* VANISHED 3,8"]
    a.close()
    b.close()


async def test_qresync_over_the_real_store(imap_port: int) -> None:  # noqa: F811
    await asyncio.to_thread(scenario, imap_port)
