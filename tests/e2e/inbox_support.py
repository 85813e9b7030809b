"""Shared by the e2e tests: wait for a message to reach alice's INBOX on a running platform
and read it back over IMAP."""

from __future__ import annotations

import imaplib

from postbus.kit.testing import Platform, wait_for


def first_in_inbox(plat: Platform, items: str, *, timeout: float) -> tuple[bytes, bytes]:
    """Wait (at most ``timeout`` s) until alice's INBOX holds one message, then
    ``UID FETCH 1 items``: the response line and the literal in it."""

    def inbox_count() -> int:
        with imaplib.IMAP4("127.0.0.1", plat.port("imap-access", "imap_port")) as m:
            m.login("alice@example.test", "secret")
            typ, data = m.select("INBOX")
            return int(data[0])

    wait_for(lambda: inbox_count() == 1, timeout=timeout)
    with imaplib.IMAP4("127.0.0.1", plat.port("imap-access", "imap_port")) as m:
        m.login("alice@example.test", "secret")
        m.select("INBOX")
        typ, data = m.uid("FETCH", "1", items)
        assert typ == "OK"
        head, raw = data[0]
    return head, raw
