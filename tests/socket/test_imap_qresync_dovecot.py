"""QRESYNC against Dovecot (issue 10 item 4's differential test, for RFC 7162 §3.2): the
same mailbox built in both, the same flag changes and expunges, then what each server says
to a client coming back with SELECT ... (QRESYNC ...) and UID FETCH ... (CHANGEDSINCE n
VANISHED): the same UIDs vanished, the same UIDs and flags fetched. MODSEQ values are each
server's own and only compared for order. Skips where Dovecot cannot be had."""

from __future__ import annotations

import re

import pytest
from test_imap_dovecot_differential import Client, Servers, servers  # noqa: F401 (fixture)

pytestmark = pytest.mark.timeout(120)


def text(lines: list[bytes]) -> list[str]:
    return [x.decode().rstrip("\r\n") for x in lines]


def code(lines: list[str], name: str) -> int:
    return int(next(m.group(1) for x in lines if (m := re.search(rf"\[{name} (\d+)\]", x))))


def vanished(lines: list[str]) -> set[int]:
    out: set[int] = set()
    for x in lines:
        m = re.fullmatch(r"\* VANISHED \(EARLIER\) (\S+)", x)
        for part in m.group(1).split(",") if m else ():
            lo, _, hi = part.partition(":")
            out.update(range(int(lo), int(hi or lo) + 1))
    return out


def fetched(lines: list[str]) -> dict[int, tuple[str, ...]]:
    out: dict[int, tuple[str, ...]] = {}
    for x in lines:
        if re.match(r"\* \d+ FETCH", x):
            uid = re.search(r"UID (\d+)", x)
            flags = re.search(r"FLAGS \(([^)]*)\)", x)
            assert uid and flags and re.search(r"MODSEQ \(\d+\)", x), x
            out[int(uid.group(1))] = tuple(sorted(f for f in flags.group(1).split()
                                                  if f != "\\Recent"))
    return out


def story(c: Client, box: bytes) -> dict[str, object]:
    """Build the mailbox, remember the state, change it, and come back."""
    c.cmd(b"ENABLE QRESYNC")
    c.cmd(b"CREATE " + box)
    for i in range(12):
        c.cmd(b"APPEND " + box, b"Subject: m%d\r\n\r\nbody %d\r\n" % (i, i))
    first = text(c.cmd(b"SELECT " + box))
    uv, since = code(first, "UIDVALIDITY"), code(first, "HIGHESTMODSEQ")
    c.cmd(b"UID STORE 3,7 +FLAGS.SILENT (\\Flagged)")
    c.cmd(b"UID STORE 2,5:6,11 +FLAGS.SILENT (\\Deleted)")
    gone_now = text(c.cmd(b"UID EXPUNGE 2,5:6"))
    c.cmd(b"UID STORE 9 +FLAGS.SILENT ($Important)")
    c.cmd(b"UID STORE 11 -FLAGS.SILENT (\\Deleted)")
    c.cmd(b"UNSELECT")
    back = text(c.cmd(b"SELECT %s (QRESYNC (%d %d 1:12))" % (box, uv, since)))
    narrow = text(c.cmd(b"EXAMINE %s (QRESYNC (%d %d 4:9))" % (box, uv, since)))
    stale = text(c.cmd(b"EXAMINE %s (QRESYNC (%d %d 1:12))" % (box, uv + 1, since)))
    c.cmd(b"SELECT " + box)
    fetch = text(c.cmd(b"UID FETCH 1:* (FLAGS) (CHANGEDSINCE %d VANISHED)" % since))
    c.cmd(b"UID STORE 12 +FLAGS.SILENT (\\Deleted)")
    last = text(c.cmd(b"EXPUNGE"))
    c.cmd(b"UNSELECT")
    return {
        "expunge": [x for x in gone_now if "VANISHED" in x or "EXPUNGE" in x],
        "back_vanished": vanished(back), "back_fetched": fetched(back),
        "back_exists": [x for x in back if x.endswith(" EXISTS")],
        "narrow_vanished": vanished(narrow), "narrow_fetched": fetched(narrow),
        "stale": [x for x in stale if "VANISHED" in x or " FETCH " in x],
        "fetch_vanished": vanished(fetch), "fetch_fetched": fetched(fetch),
        "last": [x for x in last if "VANISHED" in x or "EXPUNGE" in x],
    }


def test_qresync_answers_as_dovecot_does(servers: Servers) -> None:  # noqa: F811
    d = story(servers.dovecot, b"qresync-diff")
    p = story(servers.postbus, b"qresync-diff")
    assert p == d
    # and what that is, so a change in both is seen too
    assert p["expunge"] == ["* VANISHED 2,5:6"]
    assert p["back_vanished"] == {2, 5, 6}
    assert p["back_fetched"] == {3: ("\\Flagged",), 7: ("\\Flagged",), 9: ("$Important",),
                                 11: ()}
    assert p["narrow_vanished"] == {5, 6} and set(p["narrow_fetched"]) == {7, 9}
    assert p["stale"] == [] and p["last"] == ["* VANISHED 12"]


def notify_story(c: Client, box: bytes) -> list[str]:
    c.cmd(b"CREATE " + box)
    c.cmd(b"APPEND " + box, b"Subject: n\r\n\r\nbody\r\n")
    out: list[str] = []
    for events in (b"MessageNew MessageExpunge", b"MessageNew MessageExpunge FlagChange"):
        out += text(c.cmd(b"NOTIFY SET STATUS (mailboxes %s (%s))" % (box, events)))
    out += text(c.cmd(b"NOTIFY SET (mailboxes %s (MessageNew MessageExpunge))" % box))
    out += text(c.cmd(b"NOTIFY SET (inboxes (MessageNew MessageExpunge AnnotationChange))",
                      ok=False))
    c.cmd(b"NOTIFY NONE")
    # each server's own UIDVALIDITY and MODSEQ; the rest of the line, and what is refused
    return [re.sub(r"(UIDVALIDITY|HIGHESTMODSEQ) \d+", r"\1 n", x).split(" [")[0]
            if x.startswith("NO") else re.sub(r"(UIDVALIDITY|HIGHESTMODSEQ) \d+", r"\1 n", x)
            for x in out]


def test_notify_status_as_dovecot_does(servers: Servers) -> None:  # noqa: F811
    d = notify_story(servers.dovecot, b"notify-diff")
    p = notify_story(servers.postbus, b"notify-diff")
    assert p == d
    assert sum(x.startswith("* STATUS notify-diff") for x in p) == 2
    # Dovecot 2.3 answers OK here; RFC 5465 §5 says FlagChange without MessageNew and
    # MessageExpunge MUST be BAD, so that one is not compared
    bad = servers.postbus.cmd(b"NOTIFY SET (personal (FlagChange))", ok=False)
    assert bad[-1].startswith(b"BAD")
