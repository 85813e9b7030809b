"""mbox / Maildir / .eml readers and the mbox writer, against files made by Python's own
``mailbox`` module; chunking invariance and a fuzz property for the incremental reader."""

from __future__ import annotations

import io
import mailbox
import os
import tarfile
import zipfile
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postbus.kit.testing import examples
from postbus.mailbox_store.importexport import (
    FormatError,
    MboxReader,
    flags_from_status,
    maildir_flags,
    maildir_folder,
    mbox_entry,
    read_archive,
    read_mbox,
)


def _msg(n: int, body: str) -> EmailMessage:
    m = EmailMessage()
    m["From"] = f"Sender {n} <sender{n}@example.net>"
    m["To"] = "alice@example.test"
    m["Subject"] = f"message {n}"
    m.set_content(body)
    return m


BODIES = [
    "plain body\n",
    "From the start of a line\nand >From quoted\n>>From twice\n",
    "ends without newline",
    "\n\nblank lines around\n\n",
]


def _body(raw: bytes) -> bytes:
    return raw.split(b"\r\n\r\n", 1)[1]


def _make_mbox(path: Path) -> list[EmailMessage]:
    box = mailbox.mbox(str(path))
    msgs = [_msg(i, b) for i, b in enumerate(BODIES)]
    for i, m in enumerate(msgs):
        mm = mailbox.mboxMessage(m)
        mm.set_from(f"sender{i}@example.net", (2024, 3, 4 + i, 5, 6, 7, 0, 0, 0))
        if i == 0:
            mm.set_flags("RF")
        if i == 1:
            mm.set_flags("A")
        box.add(mm)
    box.flush()
    box.close()
    return msgs


def test_mbox_from_python_mailbox(tmp_path: Path) -> None:
    path = tmp_path / "in.mbox"
    msgs = _make_mbox(path)
    with open(path, "rb") as fp:
        got = list(read_mbox(fp))
    assert len(got) == len(msgs)
    for m, g in zip(msgs, got, strict=True):
        assert b"\n" not in g.raw.replace(b"\r\n", b"")  # CRLF everywhere
        want = m.get_content().replace("\n", "\r\n").encode()
        if not want.endswith(b"\r\n"):
            want += b"\r\n"
        # Python's mailbox (mboxo) quotes only "From " lines; our reader unquotes one level
        want = want.replace(b"\r\n>From", b"\r\nFrom").replace(b"\r\n>>From", b"\r\n>From")
        assert _body(g.raw) == want
        assert f"Subject: {m['Subject']}".encode() in g.raw
    assert got[0].flags == ["\\Seen", "\\Flagged"]
    assert got[1].flags == ["\\Answered"]
    assert got[2].flags == []
    assert got[0].internaldate == datetime(2024, 3, 4, 5, 6, 7, tzinfo=UTC)


@pytest.mark.parametrize("size", [1, 2, 7, 4096])
def test_mbox_chunking_invariance(tmp_path: Path, size: int) -> None:
    path = tmp_path / "in.mbox"
    _make_mbox(path)
    data = path.read_bytes()
    with open(path, "rb") as fp:
        whole = list(read_mbox(fp))
    r = MboxReader()
    got = []
    for i in range(0, len(data), size):
        got += r.feed(data[i:i + size])
    got += r.close()
    assert got == whole


def test_mbox_writer_round_trip(tmp_path: Path) -> None:
    originals = [
        b"From: a@x.test\r\nSubject: one\r\n\r\nFrom me\r\n>From you\r\nbye\r\n",
        b"From: b@x.test\r\nSubject: two\r\nStatus: RO\r\n\r\nno final newline",
        b"Subject: three\r\n\r\n\r\n",
    ]
    flags = [["\\Seen", "\\Flagged"], [], ["\\Answered", "\\Draft"]]
    when = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    out = b"".join(mbox_entry(r, when, f) for r, f in zip(originals, flags, strict=True))
    assert out.startswith(b"From a@x.test Thu Jan  2 03:04:05 2025\n")
    assert b"\n>From me\n>>From you\n" in out
    back = list(read_mbox(io.BytesIO(out)))
    assert [b.flags for b in back] == [["\\Seen", "\\Flagged"], [], ["\\Answered", "\\Draft"]]
    assert all(b.internaldate == when for b in back)
    for orig, b in zip(originals, back, strict=True):
        assert _body(b.raw).rstrip(b"\r\n") == _body(orig).rstrip(b"\r\n")
        assert b"Status:" in b.raw  # written from the flags, once
        assert b.raw.count(b"\nStatus: ") == 1
    # Python's mailbox reads our output as the same number of messages
    p = tmp_path / "out.mbox"
    p.write_bytes(out)
    box = mailbox.mbox(str(p))
    assert [m["Subject"] for m in box] == ["one", "two", "three"]
    assert box[0].get_flags() == "ROF"


def test_mbox_rejects_non_mbox() -> None:
    with pytest.raises(FormatError):
        list(read_mbox(io.BytesIO(b"Subject: hi\n\nbody\n")))
    with pytest.raises(FormatError):
        list(read_mbox(io.BytesIO(b"")))
    with pytest.raises(FormatError, match="larger than"):
        list(read_mbox(io.BytesIO(b"From x Thu Jan  2 03:04:05 2025\n" + b"a" * 90 + b"\n"),
                       max_message=50))


@settings(max_examples=examples(200), deadline=None)
@given(st.binary(max_size=2000), st.integers(min_value=1, max_value=64))
def test_mbox_reader_never_raises_anything_but_format_error(data: bytes, chunk: int) -> None:
    r = MboxReader(max_message=1000)
    try:
        for i in range(0, len(data), chunk):
            r.feed(data[i:i + chunk])
        r.close()
    except FormatError:
        pass


def test_status_and_maildir_flags() -> None:
    assert flags_from_status(b"Status: RO\r\nX-Status: AFD\r\n") == [
        "\\Seen", "\\Answered", "\\Flagged", "\\Deleted"]
    assert flags_from_status(b"Subject: x\r\n") == []
    assert maildir_flags("1700000000.M1P2.host:2,DFPRST") == [
        "\\Draft", "\\Flagged", "$Forwarded", "\\Answered", "\\Seen", "\\Deleted"]
    assert maildir_flags("1700000000.M1P2.host!2,S") == ["\\Seen"]
    assert maildir_flags("1700000000.M1P2.host") == []


def _make_maildir(root: Path) -> None:
    md = mailbox.Maildir(str(root / "Maildir"))
    for i, (sub, fl) in enumerate([("new", ""), ("cur", "S"), ("cur", "FR")]):
        m = mailbox.MaildirMessage(_msg(i, f"maildir body {i}\n"))
        m.set_subdir(sub)
        if fl:
            m.set_flags(fl)
        key = md.add(m)
        os.utime(Path(md._path) / md._lookup(key), (1_700_000_000 + 10 * i,) * 2)  # type: ignore[attr-defined]
    (root / "Maildir" / "tmp" / "junk").write_bytes(b"partial")  # never imported


@pytest.mark.parametrize("packer", ["tar", "tgz", "zip"])
def test_maildir_archives(tmp_path: Path, packer: str) -> None:
    _make_maildir(tmp_path)
    src = tmp_path / "Maildir"
    arc = tmp_path / f"md.{packer}"
    if packer == "zip":
        with zipfile.ZipFile(arc, "w") as z:
            for p in sorted(src.rglob("*")):
                z.write(p, p.relative_to(tmp_path))
    else:
        with tarfile.open(arc, "w:gz" if packer == "tgz" else "w") as t:
            t.add(src, arcname="Maildir")
    got = list(read_archive("maildir", str(arc)))
    assert [g.flags for g in got] == [[], ["\\Seen"], ["\\Flagged", "\\Answered"]]
    assert [_body(g.raw) for g in got] == [f"maildir body {i}\r\n".encode() for i in range(3)]
    if packer != "zip":
        assert got[0].internaldate == datetime.fromtimestamp(1_700_000_000, UTC)


def test_maildir_plus_plus_folders(tmp_path: Path) -> None:
    assert maildir_folder("Maildir/cur/1:2,S") is None
    assert maildir_folder("cur/1") is None
    assert maildir_folder("Maildir/.Sent/cur/1:2,S") == "Sent"
    assert maildir_folder(".Work.Projects/new/1") == "Work/Projects"
    assert maildir_folder("Maildir/./cur/1") is None
    md = mailbox.Maildir(str(tmp_path / "Maildir"))
    md.add(mailbox.MaildirMessage(_msg(0, "inbox\n")))
    sent = md.add_folder("Sent")
    m = mailbox.MaildirMessage(_msg(1, "sent\n"))
    m.set_subdir("cur")
    m.set_flags("S")
    sent.add(m)
    md.add_folder("Work.Projects").add(mailbox.MaildirMessage(_msg(2, "work\n")))
    arc = tmp_path / "md.tar"
    with tarfile.open(arc, "w") as t:
        t.add(tmp_path / "Maildir", arcname="Maildir")
    got = {g.folder: (_body(g.raw), g.flags) for g in read_archive("maildir", str(arc))}
    assert got == {None: (b"inbox\r\n", []), "Sent": (b"sent\r\n", ["\\Seen"]),
                   "Work/Projects": (b"work\r\n", [])}


def test_maildir_rejects_other_archives(tmp_path: Path) -> None:
    p = tmp_path / "x.tar"
    with tarfile.open(p, "w") as t:
        info = tarfile.TarInfo("notes/readme.txt")
        info.size = 2
        t.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(FormatError, match="no Maildir messages"):
        list(read_archive("maildir", str(p)))
    p.write_bytes(b"plain text, not an archive")
    with pytest.raises(FormatError, match="tar or zip"):
        list(read_archive("maildir", str(p)))


def test_eml(tmp_path: Path) -> None:
    p = tmp_path / "m.eml"
    m = _msg(1, "hello\n")
    m["Date"] = "Tue, 05 Mar 2024 10:00:00 +0100"
    p.write_bytes(m.as_bytes())
    [got] = list(read_archive("eml", str(p)))
    assert _body(got.raw) == b"hello\r\n"
    assert got.internaldate == datetime(2024, 3, 5, 9, 0, tzinfo=UTC)
    p.write_bytes(b"\x00\x01 not mail")
    with pytest.raises(FormatError):
        list(read_archive("eml", str(p)))
    with pytest.raises(FormatError, match="unknown format"):
        list(read_archive("pst", str(p)))
