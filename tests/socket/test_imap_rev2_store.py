"""IMAP4rev2 (RFC 9051) through the imap-access server over the real mailbox-store
(SQLite; PostgreSQL too when POSTBUS_TEST_POSTGRES_URL is set) on a real nats-server: an
IMAP4rev1 and an IMAP4rev2 session on one account. UTF-8 names in and out beside modified
UTF-7 ones, STATUS SIZE and DELETED from the store, SELECT without \\Recent and UNSEEN but
with LIST, ESEARCH, "$" (SEARCHRES) through MOVE, new mail without RECENT, OK [CLOSED]."""

from __future__ import annotations

import asyncio
import re

import pytest
from imap_store_support import PASSWORD, USER, Client, imap_port, matching  # noqa: F401

pytestmark = pytest.mark.timeout(120)

INBOX_MESSAGES = 4  # in alice's INBOX when imap_port starts

NAME = "Entwürfe"


def scenario(port: int) -> None:
    old = Client(port, "r")
    old.cmd(f"LOGIN {USER} {PASSWORD}")
    new = Client(port, "r")
    new.cmd(f"LOGIN {USER} {PASSWORD}")
    assert new.cmd("ENABLE IMAP4rev2")[0] == "* ENABLED IMAP4rev2"
    # one mailbox, two spellings (RFC 9051 §5.1, RFC 3501 §5.1.3)
    new.cmd(f'CREATE "{NAME}"')
    assert matching(new.cmd(f'LIST "" "{NAME}"'), r"\* LIST.*") == [
        f'* LIST (\\HasNoChildren) "/" "{NAME}"']
    assert matching(old.cmd('LIST "" Entw*'), r"\* LIST.*") == [
        '* LIST (\\HasNoChildren) "/" Entw&APw-rfe']
    # STATUS: SIZE and DELETED from the store; no RECENT in rev2
    new.cmd("STATUS INBOX (RECENT)", status="BAD")
    status = matching(new.cmd("STATUS INBOX (MESSAGES SIZE DELETED)"), r"\* STATUS.*")
    assert re.fullmatch(r"\* STATUS INBOX \(MESSAGES 4 SIZE \d+ DELETED 0\)", status[0])
    # SELECT: LIST, no RECENT, no UNSEEN (the four are unseen and were recent)
    lines = new.cmd("SELECT INBOX")
    assert '* LIST (\\HasNoChildren) "/" INBOX' in lines and "* 4 EXISTS" in lines
    assert not matching(lines, r"\* (\d+ RECENT|OK \[UNSEEN \d+\].*)")
    assert all("\\Recent" not in x for x in new.cmd("FETCH 1:* (FLAGS)"))
    new.cmd("SEARCH NEW", status="BAD")
    # ESEARCH only; "$" through FETCH and MOVE
    assert new.cmd("SEARCH RETURN (SAVE) 2:3")[0].endswith("OK SEARCH completed")
    assert matching(new.cmd("FETCH $ (UID)"), r"\* \d+ FETCH.*") == [
        "* 2 FETCH (UID 2)", "* 3 FETCH (UID 3)"]
    lines = new.cmd(f'MOVE $ "{NAME}"')
    assert matching(lines, r"\* \d+ EXPUNGE") == ["* 2 EXPUNGE", "* 2 EXPUNGE"]
    assert matching(new.cmd("UID SEARCH ALL"), r"\* .*SEARCH.*") == [
        f'* ESEARCH (TAG "r{new.n}") UID ALL 1,4']
    # new mail from the rev1 session: EXISTS, no RECENT
    old.cmd("APPEND INBOX {12+}\r\nSubject: x\r\n")
    assert new.noop_until(r"\* \d+ EXISTS", never=r"\* \d+ RECENT") == ["* 3 EXISTS"]
    # another SELECT: [CLOSED] first (RFC 9051 §6.3.2), the UTF-8 name in its LIST
    lines = new.cmd(f'SELECT "{NAME}"')
    assert lines[0] == "* OK [CLOSED] Previous mailbox closed"
    assert f'* LIST (\\HasNoChildren) "/" "{NAME}"' in lines and "* 2 EXISTS" in lines
    new.cmd('LSUB "" *', status="BAD")
    assert matching(old.cmd('LSUB "" INBOX'), r"\* LSUB.*") == ['* LSUB () "/" INBOX']
    old.close()
    new.close()


async def test_imap4rev2_over_the_real_store(imap_port: int) -> None:  # noqa: F811
    await asyncio.to_thread(scenario, imap_port)
