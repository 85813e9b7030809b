"""Two more real IMAP clients against a real imap-access listener (in-memory store behind
it), with the command lines of CLIENTS.md: offlineimap (a two-way Maildir sync: flags and
deletions made locally reach the server, new mail reaches the Maildir) and mutt (a real
MUA's dialect, driven through a terminal, copying every message to an mbox)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_imap_socket import MSG, PASSWORD, PREFIX, USER, Running, _start

pytestmark = [pytest.mark.timeout(120), pytest.mark.clients]


@pytest.fixture
def imap(tmp_path: Path) -> Iterator[Running]:
    yield from _start(tmp_path)


def _inbox(imap: Running) -> dict[int, list[str]]:
    box = imap.mp.boxes[imap.account]["INBOX"]
    return {uid: list(m.flags) for uid, m in box.msgs.items()}


def mutt_copy_all(imap: Running, tmp_path: Path, rc_extra: str = "") -> bytes:
    """mutt, driven through a terminal, copies every message in the INBOX to an mbox (its
    muttrc the usual one plus ``rc_extra``); that mbox."""
    out = tmp_path / "out.mbox"
    rc = tmp_path / "muttrc"
    rc.write_text(
        f'set imap_user="{USER}" imap_pass="{PASSWORD}" ssl_starttls=no ssl_force_tls=no\n'
        f'set folder="imap://127.0.0.1:{imap.port}/" spoolfile="+INBOX" record=""\n'
        "set mbox_type=mbox confirmappend=no confirmcreate=no move=no quit=yes\n" + rc_extra)
    keys = f"<tag-pattern>~A<enter><tag-prefix><copy-message>{out}<enter><quit>"
    cmd = (f"mutt -n -F {rc} -f imap://127.0.0.1:{imap.port}/INBOX "
           f"-e 'push \"{keys}\"'")
    r = subprocess.run(["script", "-qec", cmd, "/dev/null"], capture_output=True, timeout=60,
                       env={**os.environ, "TERM": "vt100", "HOME": str(tmp_path)})
    assert out.exists(), r.stdout.decode(errors="replace")[-2000:]
    return out.read_bytes()


@pytest.mark.skipif(shutil.which("offlineimap") is None, reason="offlineimap not installed")
def test_offlineimap_two_way_sync(imap: Running, tmp_path: Path) -> None:
    local = tmp_path / "mail"
    rc = tmp_path / "offlineimaprc"
    rc.write_text(
        "[general]\naccounts = a\nmetadata = " + str(tmp_path / "meta") + "\n\n"
        "[Account a]\nlocalrepository = l\nremoterepository = r\n\n"
        f"[Repository l]\ntype = Maildir\nlocalfolders = {local}\n\n"
        f"[Repository r]\ntype = IMAP\nremotehost = 127.0.0.1\nremoteport = {imap.port}\n"
        f"remoteuser = {USER}\nremotepass = {PASSWORD}\nssl = no\nstarttls = no\n")

    def sync() -> None:
        r = subprocess.run(["offlineimap", "-c", str(rc), "-o", "-u", "basic"],
                           capture_output=True, timeout=60, env={**os.environ, "HOME": str(tmp_path)})
        out = r.stdout.decode() + r.stderr.decode()
        assert r.returncode == 0 and "ERROR" not in out, out

    sync()
    files = [p for p in (local / "INBOX").glob("*/*") if p.is_file()]
    assert len(files) == 1
    assert files[0].read_bytes().replace(b"\n", b"\r\n") == PREFIX + MSG
    assert {"Sent", "Trash", "Drafts"} <= {p.name for p in local.iterdir()}

    # locally: flag the message (Maildir info ":2,FS"), then sync: the server has the flags
    (uid,) = _inbox(imap)
    cur = local / "INBOX" / "cur"
    cur.mkdir(exist_ok=True)
    name = files[0].name.split(":2,")[0]
    files[0].rename(cur / f"{name}:2,FS")
    sync()
    assert {"\\Flagged", "\\Seen"} <= set(_inbox(imap)[uid])

    # new mail on the server reaches the Maildir; a message deleted locally goes away
    imap.deliver(b"Subject: second\r\n\r\nmore\r\n")
    sync()
    files = [p for p in (local / "INBOX").glob("*/*") if p.is_file()]
    assert len(files) == 2
    first = next(p for p in files if b"Subject: hello" in p.read_bytes())
    first.unlink()
    sync()
    assert list(_inbox(imap)) == [uid + 1]


@pytest.mark.skipif(shutil.which("mutt") is None or shutil.which("script") is None,
                    reason="mutt or script not installed")
def test_mutt_reads_the_inbox(imap: Running, tmp_path: Path) -> None:
    imap.deliver(b"From: Carol <carol@example.net>\r\nSubject: second\r\n\r\nmore\r\n")
    mbox = mutt_copy_all(imap, tmp_path)
    assert mbox.count(b"\nFrom ") + mbox.startswith(b"From ") == 2
    assert b"Subject: hello" in mbox and b"Subject: second" in mbox
    assert b"see you." in mbox
    # copying is not moving: both are still on the server, none \Deleted
    flags = _inbox(imap)
    assert len(flags) == 2 and not any("\\Deleted" in f for f in flags.values())
