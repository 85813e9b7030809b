"""IMAP session transcripts (tests/transcripts/imap/*.txt) against the in-memory ports.

Format, one item a line:
  ``C: text``  the client sends text + CRLF (consecutive C: lines go out together)
  ``S: text``  the next line the server writes, exactly
  ``S~ regex`` the next line the server writes, matching the regex in full
  ``!insecure`` (first lines only) the connection is neither TLS nor loopback
  ``!deliver MAILBOX SUBJECT``  another party delivers a message (a change notification)
  ``!flags UID FLAG...``  another session sets flags on INBOX UID
  ``!expunge UID``  another session expunges INBOX UID
  ``!budget N``  a FETCH holds at most N octets of bodies at once
  ``!sort-max N``  a SORT takes at most N matching messages
  ``!no-summaries``  the store answers FETCH without summaries (computed from the blob)
  ``!lose-body UID``  the blob of INBOX UID cannot be read any more
  ``!quiet DIRECTIVE``  the same, but no change notification reaches the session
  ``!pause``  send the C: lines before and after separately
  ``# ...`` comments and blank lines are ignored
After each group of C: lines the server's output must match the S lines up to the next C:.
"""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from imap_support import Out

from postbus.imap_access.memory import MemoryPlatform
from postbus.imap_access.session import Session, SessionConfig
from postbus.kit.testing import examples
from postbus.protocols.imap_parser import Receiver

TRANSCRIPTS = Path(__file__).parent.parent / "transcripts" / "imap"

PREFIX = b"Return-Path: <bob@example.net>\r\nDelivered-To: alice@example.test\r\n"
MSG1 = (b"From: Bob <bob@example.net>\r\n"
        b"To: Alice <alice@example.test>\r\n"
        b"Subject: hello\r\n"
        b"Date: Thu, 26 Nov 2026 10:00:00 +0000\r\n"
        b"Message-ID: <m1@example.net>\r\n"
        b"\r\n"
        b"Hi Alice,\r\n"
        b"see you.\r\n")
MSG2 = (b"From: Carol <carol@example.org>\r\n"
        b"To: alice@example.test\r\n"
        b"Subject: report\r\n"
        b"Date: Fri, 20 Nov 2026 09:30:00 +0100\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: multipart/mixed; boundary=\"XX\"\r\n"
        b"\r\n"
        b"preamble\r\n"
        b"--XX\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"\r\n"
        b"The report is attached.\r\n"
        b"--XX\r\n"
        b"Content-Type: application/octet-stream; name=\"r.bin\"\r\n"
        b"Content-Transfer-Encoding: base64\r\n"
        b"\r\n"
        b"AAECAw==\r\n"
        b"--XX--\r\n")
MSG3 = (b"From: Dave <dave@example.com>\r\n"
        b"To: alice@example.test\r\n"
        b"Subject: third\r\n"
        b"\r\n"
        b"Third message, larger body text here.\r\n" * 1)


def world() -> tuple[MemoryPlatform, int]:
    mp = MemoryPlatform()
    acc = mp.add_user("alice@example.test", "secret")
    mp.add_user("bob@example.net", "hunter2")
    mp.deliver(acc, MSG1, prefix=PREFIX,
               internaldate=datetime(2026, 11, 26, 10, 0, 5, tzinfo=UTC))
    mp.deliver(acc, MSG2, flags=["\\Seen"],
               internaldate=datetime(2026, 11, 20, 8, 31, 0, tzinfo=UTC))
    mp.deliver(acc, MSG3, flags=["\\Flagged"],
               internaldate=datetime(2026, 11, 21, 12, 0, 0, tzinfo=UTC))
    inbox = mp.boxes[acc]["INBOX"]
    inbox.recent_uid = inbox.uidnext  # an earlier session was told of these three (\Recent)
    return mp, acc


class Runner:
    def __init__(self, secure: bool) -> None:
        self.mp, self.acc = world()
        self.out = Out()
        self.session = Session(directory=self.mp, store=self.mp, blobs=self.mp,
                               changes=self.mp, out=self.out,
                               config=SessionConfig(auth_fail_delay_s=0, fetch_batch=2,
                                                    starttls_available=True),
                               client_ip="127.0.0.1" if secure else "192.0.2.7",
                               secure=secure)
        self.rx = Receiver(max_line=2000, max_literal=10_000)
        self.session.greeting()

    async def send(self, data: bytes) -> None:
        self.rx.push(data)
        while (item := self.rx.next()) is not None:
            await self.session.handle(item)
            if self.session.expect_line:
                self.rx.expect_line()
            if self.session.start_tls:
                self.session.start_tls = False
                self.rx.reset()
                self.session.tls = self.session.secure = True
            if self.session.closed:
                break

    async def directive(self, line: str) -> None:
        word, *args = line[1:].split()
        if word == "quiet":  # the change happens, but no notification reaches the session
            saved = dict(self.mp.listeners)
            self.mp.listeners.clear()
            try:
                await self.directive("!" + " ".join(args))
            finally:
                self.mp.listeners.update(saved)
            return
        inbox = self.mp.boxes[self.acc]["INBOX"]
        if word == "pause":  # only splits the client's lines into two sends
            return
        if word == "deliver":
            self.mp.deliver(self.acc, b"Subject: " + " ".join(args[1:]).encode()
                            + b"\r\n\r\nnew\r\n", mailbox=args[0])
        elif word == "flags":
            await self.mp.flags(_flags_req(self.acc, inbox.id, int(args[0]), args[1:]))
        elif word == "budget":  # FETCH may hold only this many body octets at once
            self.session.cfg.fetch_bytes_in_flight = int(args[0])
        elif word == "sort-max":  # SORT refuses more matches than this
            self.session.cfg.sort_max_messages = int(args[0])
        elif word == "no-summaries":  # the store has no precomputed summaries
            self.mp.serve_summaries = False
        elif word == "lose-body":  # the blob store cannot deliver this message's body
            del self.mp.blobs[inbox.msgs[int(args[0])].blob_key]
        elif word == "expunge":
            await self.mp.flags(_flags_req(self.acc, inbox.id, int(args[0]), ["\\Deleted"]))
            from postbus.proto.store import ExpungeRequest
            await self.mp.expunge(ExpungeRequest(account_id=self.acc, mailbox_id=inbox.id,
                                                 uids=[(int(args[0]), int(args[0]))]))
        else:
            raise AssertionError(f"unknown directive {line}")
        if self.session.idling and self.session.wakeup.is_set():
            await self.session.idle_updates()


def _flags_req(acc: int, box: int, uid: int, flags: list[str]) -> object:
    from postbus.proto.store import StoreFlagsRequest
    return StoreFlagsRequest(account_id=acc, mailbox_id=box, uids=[(uid, uid)], op="set",
                             flags=flags, origin="other")


def parse_transcript(text: str) -> list[tuple[str, str]]:
    steps = []
    for raw in text.splitlines():
        if not raw.strip() or raw.startswith("#"):
            continue
        if raw.startswith("!"):
            steps.append(("!", raw))
        elif raw[:2] in ("C:", "S:", "S~"):
            steps.append((raw[:2], raw[3:] if len(raw) > 2 else ""))
        else:
            raise AssertionError(f"bad transcript line: {raw!r}")
    return steps


async def run_transcript(path: Path, text: str) -> None:
    steps = parse_transcript(text)
    secure = not any(k == "!" and v.strip() == "!insecure" for k, v in steps)
    steps = [(k, v) for k, v in steps if not (k == "!" and v.strip() == "!insecure")]
    r = Runner(secure)
    got: list[str] = r.out.take_lines()
    i = 0
    lineno = 0

    def expect_output() -> None:
        nonlocal i, lineno
        while i < len(steps) and steps[i][0] in ("S:", "S~"):
            kind, want = steps[i]
            lineno += 1
            assert got, f"{path.name}: server said nothing more; expected {want!r}"
            line = got.pop(0)
            if kind == "S:":
                assert line == want, f"{path.name}: expected {want!r}\n got {line!r}"
            else:
                assert re.fullmatch(want, line), f"{path.name}: /{want}/ vs {line!r}"
            i += 1
        assert not got, f"{path.name}: unexpected output {got!r} (before step {i})"

    expect_output()
    while i < len(steps):
        kind, val = steps[i]
        if kind == "!":
            if val.strip() != "!insecure":
                await r.directive(val.strip())
            i += 1
        else:
            assert kind == "C:", f"{path.name}: expected a C: line at step {i}: {steps[i]}"
            data = b""
            while i < len(steps) and steps[i][0] == "C:":
                data += steps[i][1].encode("utf-8") + b"\r\n"
                i += 1
            await r.send(data)
        got.extend(r.out.take_lines())
        expect_output()
    await r.session.close()


CASES = [(p, p.read_text()) for p in sorted(TRANSCRIPTS.glob("*.txt"))]


@pytest.mark.parametrize("path,text", CASES, ids=[c[0].stem for c in CASES])
async def test_imap_transcript(path: Path, text: str) -> None:
    await run_transcript(path, text)


def test_there_are_transcripts() -> None:
    assert len(list(TRANSCRIPTS.glob("*.txt"))) >= 8


# ---------------------------------------------------------------- fuzzing the session
_WORDS = st.sampled_from([
    "FETCH", "UID FETCH", "STORE", "UID STORE", "SEARCH", "UID SEARCH", "COPY", "MOVE",
    "UID MOVE", "EXPUNGE", "UID EXPUNGE", "SELECT", "EXAMINE", "LIST", "STATUS", "APPEND",
    "CREATE", "RENAME", "DELETE", "NOOP", "CLOSE", "UNSELECT", "IDLE", "ENABLE", "ID", "LSUB",
    "GETQUOTAROOT", "CHECK", "SUBSCRIBE", "NAMESPACE", "SORT", "UID SORT",
])
_ARGS = st.sampled_from([
    "1", "2:*", "*", "1:3,5", "0", "4294967295", "INBOX", "Trash", '""', '"*"', "%", "()",
    "(FLAGS)", "FLAGS", "+FLAGS", "-FLAGS.SILENT", "(\\Seen)", "(\\Deleted $X)", "BODY[]",
    "BODY.PEEK[1.MIME]", "(BODY[HEADER.FIELDS (SUBJECT)]<0.3> ENVELOPE BODYSTRUCTURE)",
    "ALL", "FULL", "(UNCHANGEDSINCE 1)", "(CHANGEDSINCE 2)", "OR SEEN UNSEEN", "NOT UID 1:*",
    "SINCE 1-Jan-2020", "(MESSAGES UIDNEXT)", "{3+}\r\nabc", "(CONDSTORE)", "RETURN (ALL)",
    "CONDSTORE", "NIL", "Work/x", "&-", "\\", "\"unterminated",
    "(REVERSE SUBJECT DISPLAYFROM) UTF-8", "(ARRIVAL) US-ASCII ALL", "RETURN (MIN ALL) (DATE)",
])


@st.composite
def _commands(draw: st.DrawFn) -> list[str]:
    lines = []
    for i in range(draw(st.integers(1, 8))):
        words = [draw(_WORDS)] + draw(st.lists(_ARGS, max_size=4))
        lines.append(f"f{i} " + " ".join(words))
    return lines


@settings(max_examples=examples(150), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_commands())
def test_selected_session_survives_junk(lines: list[str]) -> None:
    async def run() -> list[str]:
        r = Runner(secure=True)
        await r.send(b"a LOGIN alice@example.test secret\r\nb SELECT INBOX\r\n")
        r.out.take_lines()
        for line in lines:
            await r.send(line.encode() + b"\r\n")
            if r.session.idling:
                await r.send(b"DONE\r\n")
            if r.session.closed:
                break
        return r.out.take_lines() if r.out.buf.endswith(b"\r\n") or not r.out.buf else []

    out = asyncio.run(run())
    assert not any("SERVERBUG" in x for x in out), out
    tagged = {x.split(" ", 1)[0] for x in out if re.match(r"f\d+ (OK|NO|BAD) ", x)}
    assert tagged == {f"f{i}" for i in range(len(lines))}, (lines, out)


@settings(max_examples=examples(200), deadline=None)
@given(st.binary(max_size=300))
def test_session_takes_any_bytes(data: bytes) -> None:
    async def run() -> None:
        r = Runner(secure=True)
        await r.send(b"a LOGIN alice@example.test secret\r\nb SELECT INBOX\r\n" + data + b"\r\n")
        assert b"SERVERBUG" not in r.out.buf

    asyncio.run(run())


# ---------------------------------------------------------------- sequence-number consistency
_OPS = st.lists(st.sampled_from([
    "deliver", "other-expunge", "other-flag", "store-delete", "expunge", "uid-expunge",
    "move", "copy-self", "move-self", "flag-all", "append", "fetch", "uid-fetch", "search", "noop", "idle", "check",
]), min_size=1, max_size=25)


@settings(max_examples=examples(120), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_OPS, st.randoms(use_true_random=False))
def test_client_view_of_sequence_numbers_stays_consistent(ops: list[str], rnd: object) -> None:
    """A client that only follows EXISTS and EXPUNGE keeps the same message count as the
    session, every EXPUNGE names an existing message, and after CHECK the mapping of sequence
    numbers to UIDs is the store's."""
    import random
    assert isinstance(rnd, random.Random)

    async def run() -> None:
        r = Runner(secure=True)
        r.mp.page_limit = 2  # SELECT and the resyncs read the snapshot in pages
        r.session.cfg.uids_per_request = 2  # STORE and COPY/MOVE go in several requests
        inbox = r.mp.boxes[r.acc]["INBOX"]
        count = 0
        tagn = 0

        def track(lines: list[str]) -> None:
            nonlocal count
            for line in lines:
                m = re.match(r"\* (\d+) (EXISTS|EXPUNGE)$", line)
                if m and m.group(2) == "EXISTS":
                    assert int(m.group(1)) >= count, (line, count)
                    count = int(m.group(1))
                elif m:
                    assert 1 <= int(m.group(1)) <= count, (line, count)
                    count -= 1
                assert "SERVERBUG" not in line and not re.match(r"f\d+ BAD", line), line

        async def cmd(text: str) -> list[str]:
            nonlocal tagn
            tagn += 1
            await r.send(f"f{tagn} {text}\r\n".encode())
            if r.session.idling:
                await r.send(b"DONE\r\n")
            lines = r.out.take_lines()
            track(lines)
            return lines

        await r.send(b"a LOGIN alice@example.test secret\r\n")
        r.out.take_lines()
        await cmd("SELECT INBOX")
        assert count == len(inbox.msgs)
        for op in ops:
            uids = list(inbox.msgs)
            pick = rnd.choice(uids) if uids else None
            seq = rnd.randint(1, count) if count else None
            if op == "deliver":
                r.mp.deliver(r.acc, b"Subject: x\r\n\r\ny\r\n")
            elif op == "other-expunge" and pick:
                await r.directive(f"!expunge {pick}")
            elif op == "other-flag" and pick:
                await r.directive(f"!flags {pick} \\Flagged")
            elif op == "store-delete" and seq:
                await cmd(f"STORE {seq} +FLAGS.SILENT (\\Deleted)")
            elif op == "expunge":
                await cmd("EXPUNGE")
            elif op == "uid-expunge" and pick:
                await cmd(f"UID STORE {pick} +FLAGS (\\Deleted)")
                await cmd(f"UID EXPUNGE {pick}")
            elif op == "move" and seq:
                await cmd(f"MOVE {seq}:* Trash")
            elif op == "copy-self" and seq:
                await cmd(f"COPY {seq}:* INBOX")
            elif op == "move-self" and seq:
                await cmd(f"MOVE {seq}:* INBOX")
            elif op == "flag-all" and count:
                before = count
                lines = await cmd("STORE 1:* +FLAGS (\\Answered)")
                fetched = {int(m.group(1)) for x in lines
                           if (m := re.match(r"\* (\d+) FETCH \(FLAGS", x))}
                # one per message, over every chunk (messages that arrived meanwhile may
                # follow with changes of their own)
                assert {n for n in fetched if n <= before} == set(range(1, before + 1)), lines
            elif op == "append":
                await cmd("APPEND INBOX {3+}\r\nabc")
            elif op == "fetch" and count:
                await cmd("FETCH 1:* (FLAGS)")
            elif op == "uid-fetch":
                await cmd("UID FETCH 1:* (FLAGS)")
            elif op == "search":
                await cmd("SEARCH ALL")
            elif op == "noop":
                await cmd("NOOP")
            elif op == "idle":
                await cmd("IDLE")
            elif op == "check":
                await cmd("CHECK")
            view = r.session.state.view  # type: ignore[union-attr]
            assert count == view.exists
        await cmd("CHECK")
        tagn += 1
        await r.send(f"f{tagn} FETCH 1:* (UID)\r\n".encode() if count else b"z NOOP\r\n")
        lines = r.out.take_lines()
        got = [int(m.group(2)) for line in lines
               if (m := re.match(r"\* (\d+) FETCH \(UID (\d+)\)", line))]
        assert got == list(inbox.msgs), (lines, list(inbox.msgs))
        assert count == len(inbox.msgs)

    asyncio.run(run())
