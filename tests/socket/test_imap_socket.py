"""A real imap-access listener on port 0 (in-memory ports behind it) driven by real clients:
imaplib, imapclient, curl and raw sockets; STARTTLS, implicit TLS, bounds, timeouts, mgmt."""

from __future__ import annotations

import asyncio
import contextlib
import imaplib
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from imapclient import IMAPClient

from postbus.imap_access.memory import MemoryPlatform
from postbus.imap_access.mgmt import router
from postbus.imap_access.server import ImapServer
from postbus.imap_access.settings import Settings
from postbus.kit.settings import CommonSettings
from postbus.kit.tls import self_signed, server_context

pytestmark = pytest.mark.timeout(60)

USER, PASSWORD = "alice@example.test", "secret"
MSG = (b"From: Bob <bob@example.net>\r\nTo: Alice <alice@example.test>\r\nSubject: hello\r\n"
       b"Message-ID: <m1@example.net>\r\n\r\nHi Alice,\r\nsee you.\r\n")
PREFIX = b"Return-Path: <bob@example.net>\r\n"


@dataclass
class Running:
    server: ImapServer
    mp: MemoryPlatform
    account: int
    loop: asyncio.AbstractEventLoop
    port: int
    tls_port: int | None

    def call(self, fn: object, *args: object) -> object:
        """Run a plain function on the server's loop (the platform is not thread-safe)."""
        async def run() -> object:
            return fn(*args)  # type: ignore[operator]
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(5)

    def deliver(self, raw: bytes, mailbox: str = "INBOX") -> int:
        return self.call(self.mp.deliver, self.account, raw, mailbox)  # type: ignore[return-value]


@contextlib.contextmanager
def serving(server: ImapServer, *, tls: bool
            ) -> Iterator[tuple[asyncio.AbstractEventLoop, list[int]]]:
    """``server`` listening on 127.0.0.1 port 0 (and on a port 0 for implicit TLS when
    ``tls``), on an event loop of its own in a thread: that loop and the ports. Stopped after."""
    loop = asyncio.new_event_loop()
    ports = loop.run_until_complete(server.start("127.0.0.1", 0, 0 if tls else None))
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    try:
        yield loop, ports
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        t.join(5)
        loop.close()


def _start(tmp_path: Path, **overrides: object) -> Iterator[Running]:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    self_signed(cert, key)
    settings = Settings(common=CommonSettings(tls_cert=cert, tls_key=key,
                                              admin_token_file=tmp_path / "tok"),
                        auth_fail_delay_s=0, **overrides)  # type: ignore[arg-type]
    mp = MemoryPlatform()
    account = mp.add_user(USER, PASSWORD)
    mp.deliver(account, MSG, prefix=PREFIX)
    server = ImapServer(settings, mp, mp, mp, mp, tls=server_context(cert, key))
    with serving(server, tls=True) as (loop, ports):
        yield Running(server, mp, account, loop, ports[0], ports[1])


@pytest.fixture
def imap(tmp_path: Path) -> Iterator[Running]:
    yield from _start(tmp_path)


def _insecure_ctx() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


# ---------------------------------------------------------------- imaplib
def test_imaplib_walkthrough(imap: Running) -> None:
    with imaplib.IMAP4("127.0.0.1", imap.port) as m:
        assert "LOGINDISABLED" not in m.capabilities  # loopback counts as secure
        m.login(USER, PASSWORD)
        typ, data = m.select("INBOX")
        assert typ == "OK" and data == [b"1"]
        typ, data = m.uid("FETCH", "1", "(BODY.PEEK[])")
        assert typ == "OK"
        assert data[0][1] == PREFIX + MSG  # type: ignore[index]
        typ, data = m.search(None, "FROM", '"bob"')
        assert data == [b"1"]
        typ, data = m.fetch("1", "(FLAGS)")
        assert b"\\Seen" not in data[0]  # PEEK left it unseen
        m.fetch("1", "(BODY[TEXT])")
        typ, data = m.fetch("1", "(FLAGS)")
        assert b"\\Seen" in data[0]
        typ, data = m.append("INBOX", "(\\Flagged)", None, b"Subject: new\r\n\r\nbody\r\n")
        assert typ == "OK" and b"APPENDUID" in data[0]
        typ, data = m.noop()
        typ, data = m.search(None, "FLAGGED")
        assert data == [b"2"]
        m.store("1", "+FLAGS", "(\\Deleted)")
        typ, data = m.expunge()
        assert data == [b"1"]
        typ, data = m.list()
        assert any(b"INBOX" in d for d in data) and any(b"\\Sent" in d for d in data)
        typ, data = m.status("INBOX", "(MESSAGES UIDNEXT)")
        assert data == [b"INBOX (MESSAGES 1 UIDNEXT 3)"]
        m.logout()


def test_imaplib_starttls_when_loopback_is_not_trusted(tmp_path: Path) -> None:
    for imap in _start(tmp_path, loopback_is_secure=False):
        with imaplib.IMAP4("127.0.0.1", imap.port) as m:
            assert "LOGINDISABLED" in m.capabilities and "STARTTLS" in m.capabilities
            with pytest.raises(imaplib.IMAP4.error, match="PRIVACYREQUIRED"):
                m.login(USER, PASSWORD)
            m.starttls(_insecure_ctx())
            assert "LOGINDISABLED" not in m.capabilities and "AUTH=PLAIN" in m.capabilities
            m.login(USER, PASSWORD)
            assert m.select("INBOX")[1] == [b"1"]


def test_implicit_tls(imap: Running) -> None:
    assert imap.tls_port
    with imaplib.IMAP4_SSL("127.0.0.1", imap.tls_port, ssl_context=_insecure_ctx()) as m:
        assert "STARTTLS" not in m.capabilities
        m.login(USER, PASSWORD)
        m.select("INBOX", readonly=True)
        typ, data = m.uid("FETCH", "1", "(RFC822.SIZE)")
        assert f"RFC822.SIZE {len(PREFIX + MSG)}".encode() in data[0]


def test_failed_login(imap: Running) -> None:
    with imaplib.IMAP4("127.0.0.1", imap.port) as m:
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            m.login(USER, "wrong")
        m.login(USER, PASSWORD)


# ---------------------------------------------------------------- imapclient
def test_imapclient_fetch_structures_and_idle(imap: Running) -> None:
    with IMAPClient("127.0.0.1", port=imap.port, ssl=False, timeout=10) as c:
        c.login(USER, PASSWORD)
        info = c.select_folder("INBOX")
        assert info[b"EXISTS"] == 1 and info[b"UIDNEXT"] == 2
        res = c.fetch([1], ["ENVELOPE", "BODYSTRUCTURE", "INTERNALDATE", "RFC822.SIZE",
                            "BODY.PEEK[HEADER.FIELDS (SUBJECT)]", "FLAGS"])
        r = res[1]
        assert r[b"ENVELOPE"].subject == b"hello"
        assert r[b"ENVELOPE"].from_[0].mailbox == b"bob"
        assert r[b"BODYSTRUCTURE"][0].lower() == b"text"
        assert r[b"BODY[HEADER.FIELDS (SUBJECT)]"] == b"Subject: hello\r\n\r\n"
        assert r[b"RFC822.SIZE"] == len(PREFIX + MSG)
        assert c.search(["SUBJECT", "hello"]) == [1]
        folders = [f[2] for f in c.list_folders()]
        assert "INBOX" in folders and "Trash" in folders
        assert c.find_special_folder(b"\\Sent") == "Sent"
        c.create_folder("Work")
        c.copy([1], "Work")
        assert c.folder_status("Work", ["MESSAGES"])[b"MESSAGES"] == 1
        c.move([1], "Trash")
        assert c.search() == []
        c.idle()
        imap.deliver(b"Subject: during idle\r\n\r\nx\r\n")
        responses = c.idle_check(timeout=5)
        c.idle_done()
        assert (1, b"EXISTS") in responses, responses
        assert c.fetch([2], ["BODY[]"])[2][b"BODY[]"].startswith(b"Subject: during idle")


def test_imapclient_condstore(imap: Running) -> None:
    with IMAPClient("127.0.0.1", port=imap.port, ssl=False, timeout=10) as c:
        c.login(USER, PASSWORD)
        c.enable("CONDSTORE")
        info = c.select_folder("INBOX")
        hms = info[b"HIGHESTMODSEQ"]
        c.add_flags([1], [b"$Label"])
        res = c.fetch([1], ["FLAGS"], modifiers=[f"CHANGEDSINCE {hms}"])
        assert b"$Label" in res[1][b"FLAGS"] and res[1][b"MODSEQ"][0] > hms


# ---------------------------------------------------------------- curl (CLIENTS.md)
CURL = shutil.which("curl")


@pytest.mark.clients
@pytest.mark.skipif(CURL is None, reason="curl not installed")
def test_curl(imap: Running, tmp_path: Path) -> None:
    base = f"imap://127.0.0.1:{imap.port}"

    def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([CURL, "-sS", "-u", f"{USER}:{PASSWORD}", *args],  # type: ignore[list-item]
                              capture_output=True, timeout=20)

    r = curl(f"{base}/INBOX;UID=1")
    assert r.returncode == 0, r.stderr
    assert r.stdout == PREFIX + MSG
    r = curl(f"{base}/")
    assert b'* LIST (\\HasNoChildren) "/" INBOX' in r.stdout
    r = curl(f"{base}/INBOX?ALL")
    assert r.stdout.strip() == b"* SEARCH 1"
    eml = tmp_path / "m.eml"
    eml.write_bytes(b"From: curl@example.test\r\nSubject: via curl\r\n\r\nappended\r\n")
    r = curl("-T", str(eml), f"{base}/INBOX")
    assert r.returncode == 0, r.stderr
    r = curl(f"{base}/INBOX;UID=2;SECTION=HEADER.FIELDS%20(SUBJECT)")
    assert r.stdout == b"Subject: via curl\r\n\r\n"
    r = curl("-X", "STATUS INBOX (MESSAGES UIDNEXT UNSEEN)", f"{base}/")
    assert b"MESSAGES 2 UIDNEXT 3" in r.stdout
    r = subprocess.run([CURL, "-sS", "-u", f"{USER}:bad", f"{base}/INBOX;UID=1"],  # type: ignore[list-item]
                       capture_output=True, timeout=20)
    assert r.returncode == 67


# ---------------------------------------------------------------- raw socket: bounds
class Raw:
    def __init__(self, port: int) -> None:
        self.s = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.f = self.s.makefile("rb")
        self.greeting = self.f.readline()

    def cmd(self, data: bytes, until: bytes) -> list[bytes]:
        self.s.sendall(data)
        lines = []
        while True:
            line = self.f.readline()
            assert line, f"connection closed; got {lines}"
            lines.append(line)
            if line.startswith(until):
                return lines

    def close(self) -> None:
        self.f.close()
        self.s.close()


def test_long_line_and_big_literal_get_bad_and_the_session_goes_on(tmp_path: Path) -> None:
    for imap in _start(tmp_path, max_line=1000, max_literal=5000, max_command=8000):
        r = Raw(imap.port)
        assert r.greeting.startswith(b"* OK")
        out = r.cmd(b"a0 LOGIN {5}\r\n", b"+")
        out = r.cmd(b"alice secret\r\n", b"a0 ")
        assert out[-1].startswith(b"a0 NO")  # "alice" is not a known user
        r.cmd(b"a1 LOGIN alice@example.test secret\r\n", b"a1 OK")
        out = r.cmd(b"a2 NOOP " + b"x" * 5000 + b"\r\n", b"a2 ")
        assert out[-1].startswith(b"a2 BAD [TOOBIG]")
        # an APPEND past the limit is NO [TOOBIG] (RFC 7889 §4), other commands BAD
        out = r.cmd(b"a3 APPEND INBOX {6000}\r\n", b"a3 ")
        assert out[-1].startswith(b"a3 NO [TOOBIG]")
        out = r.cmd(b"a4 APPEND INBOX {6000+}\r\n" + b"y" * 6000 + b"\r\n", b"a4 ")
        assert out[-1].startswith(b"a4 NO [TOOBIG]")
        # two literals under max_literal, together over max_command
        out = r.cmd(b"a5 APPEND INBOX {4500+}\r\n" + b"y" * 4500 + b" {4500}\r\n", b"a5 ")
        assert out[-1].startswith(b"a5 NO [TOOBIG] command too large")
        out = r.cmd(b"a9 SEARCH TEXT {6000}\r\n", b"a9 ")
        assert out[-1].startswith(b"a9 BAD [TOOBIG]")
        out = r.cmd(b"a6 NOOP\r\n\x00\xff junk\r\na7 NOOP\r\n", b"a7 ")
        assert out[0].startswith(b"a6 OK") and out[1].startswith(b"* BAD")
        r.close()


def test_preauth_big_literal_or_line_gets_bad_and_bye(imap: Running) -> None:
    # issue 8.1: one pre-auth LOGIN {41943040+} used to buffer 40 MB per literal
    for opening in (b"a LOGIN {41943040+}\r\n", b"a LOGIN " + b"u" * 20_000):
        r = Raw(imap.port)
        r.s.sendall(opening)
        with contextlib.suppress(OSError):
            r.s.sendall(b"x" * 1_000_000)  # the server stops reading: this may fail
        assert r.f.readline().startswith(b"a BAD [TOOBIG]")
        assert r.f.readline().startswith(b"* BYE")
        assert r.f.readline() == b""
        r.close()
    r = Raw(imap.port)  # a synchronising one is refused before the data, the session goes on
    assert r.cmd(b"a LOGIN {5000}\r\n", b"a ")[-1].startswith(b"a BAD [TOOBIG]")
    r.cmd(b"b LOGIN alice@example.test {6}\r\n", b"+")
    assert r.cmd(b"secret\r\n", b"b ")[-1].startswith(b"b OK")
    r.close()


def test_connections_per_address_are_capped(tmp_path: Path) -> None:
    # issue 8.5: 1,500 of 1,500 connections from one address were accepted
    for imap in _start(tmp_path, max_connections_per_ip=3):
        held = [Raw(imap.port) for _ in range(3)]
        assert all(r.greeting.startswith(b"* OK") for r in held)
        extra = Raw(imap.port)
        assert extra.greeting.startswith(b"* BYE [UNAVAILABLE]")
        extra.close()
        held.pop().close()
        deadline = time.monotonic() + 5
        while imap.server.per_ip.open.get("127.0.0.1", 0) >= 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        again = Raw(imap.port)  # a slot is free again
        assert again.greeting.startswith(b"* OK")
        for r in [*held, again]:
            r.close()


def test_proxy_protocol_gives_the_client_address(tmp_path: Path) -> None:
    # issue 8.10: behind a balancer every client had the balancer's address (and, with a
    # sidecar, loopback, where plaintext login is allowed)
    for imap in _start(tmp_path, proxy_protocol=True, max_connections_per_ip=1):
        s = socket.create_connection(("127.0.0.1", imap.port), timeout=10)
        s.sendall(b"PROXY TCP4 198.51.100.7 192.0.2.1 40000 143\r\n")
        f = s.makefile("rb")
        greeting = f.readline()
        assert greeting.startswith(b"* OK") and b"LOGINDISABLED" in greeting  # not loopback
        t = socket.create_connection(("127.0.0.1", imap.port), timeout=10)  # same client
        t.sendall(b"PROXY TCP4 198.51.100.7 192.0.2.1 40001 143\r\n")
        assert t.makefile("rb").readline().startswith(b"* BYE [UNAVAILABLE]")
        bad = socket.create_connection(("127.0.0.1", imap.port), timeout=10)
        bad.sendall(b"a LOGIN alice@example.test secret\r\n")  # no header: closed, no greeting
        assert bad.makefile("rb").readline() == b""
        for c in (s, t, bad):
            c.close()
        # 993: the header before the TLS handshake
        assert imap.tls_port
        raw = socket.create_connection(("127.0.0.1", imap.tls_port), timeout=10)
        raw.sendall(b"PROXY TCP4 203.0.113.9 192.0.2.1 40002 993\r\n")
        tls = _insecure_ctx().wrap_socket(raw, server_hostname="localhost")
        assert tls.recv(4096).startswith(b"* OK")
        assert "203.0.113.9" in [x.client_ip for x in list(imap.server.sessions.values())]
        with contextlib.suppress(OSError):
            tls.close()


def test_failed_logins_per_address_across_sessions(tmp_path: Path) -> None:
    # issue 8.4: a guesser opened new sessions to reset the per-session count
    for imap in _start(tmp_path, max_auth_failures_ip=4, max_auth_failures=3):
        for _ in range(2):  # two sessions, two wrong guesses each
            r = Raw(imap.port)
            for tag in ("a", "b"):
                out = r.cmd(f"{tag} LOGIN alice@example.test wrong\r\n".encode(),
                            tag.encode() + b" ")
                assert out[-1].startswith(tag.encode() + b" NO [AUTHENTICATIONFAILED]")
            r.close()
        r = Raw(imap.port)  # now even the right password is refused from this address
        out = r.cmd(b"c LOGIN alice@example.test secret\r\n", b"c ")
        assert out[-1].startswith(b"c NO [UNAVAILABLE]")
        assert r.f.readline().startswith(b"* BYE")
        r.close()


def test_preauth_phase_has_an_absolute_deadline(tmp_path: Path) -> None:
    # issue 8.5: a byte every few seconds used to hold an unauthenticated connection for 24 h
    for imap in _start(tmp_path, preauth_timeout_s=5, preauth_deadline_s=0.6):
        r = Raw(imap.port)
        t0 = time.monotonic()
        for _ in range(20):
            try:
                r.s.sendall(b"a NOOP\r\n")
            except OSError:
                break
            time.sleep(0.1)
        lines = r.f.read().split(b"\r\n")
        assert any(x.startswith(b"* BYE Session time limit") for x in lines), lines
        assert time.monotonic() - t0 < 4
        r.close()


def test_pipelined_commands_answer_in_order(imap: Running) -> None:
    r = Raw(imap.port)
    out = r.cmd(b"a1 LOGIN alice@example.test secret\r\na2 SELECT INBOX\r\n"
                b"a3 UID FETCH 1 (UID FLAGS)\r\na4 LOGOUT\r\n", b"a4 ")
    tags = [x.split(b" ")[0] for x in out if not x.startswith(b"*")]
    assert tags == [b"a1", b"a2", b"a3", b"a4"]
    r.close()


def test_preauth_timeout_says_bye(tmp_path: Path) -> None:
    for imap in _start(tmp_path, preauth_timeout_s=0.3):
        r = Raw(imap.port)
        assert r.f.readline().startswith(b"* BYE Autologout")
        assert r.f.readline() == b""
        r.close()


def _noop_inside_tls(s: socket.socket) -> bytes:
    """The handshake after STARTTLS's OK, then everything up to a NOOP's tagged answer."""
    tls = _insecure_ctx().wrap_socket(s, server_hostname="localhost")
    tls.sendall(b"a3 NOOP\r\n")
    data = b""
    while b"a3 " not in data:
        data += tls.recv(4096)
    tls.close()
    return data


def test_starttls_discards_pipelined_plaintext(tmp_path: Path) -> None:
    for imap in _start(tmp_path, loopback_is_secure=False):
        s = socket.create_connection(("127.0.0.1", imap.port), timeout=10)
        f = s.makefile("rb")
        f.readline()
        s.sendall(b"a1 STARTTLS\r\na2 LOGIN alice@example.test secret\r\n")
        assert f.readline().startswith(b"a1 OK")
        assert b"a2" not in _noop_inside_tls(s)  # the injected LOGIN was never executed


def test_starttls_discards_plaintext_the_stream_still_holds(tmp_path: Path) -> None:
    """The injected command past the server's first read (64 KiB) waits in the stream
    reader, not in the receiver: it must be dropped too, not read inside TLS."""
    for imap in _start(tmp_path, loopback_is_secure=False):
        s = socket.create_connection(("127.0.0.1", imap.port), timeout=10)
        f = s.makefile("rb")
        f.readline()
        s.sendall(b"a1 STARTTLS\r\n" + b"\r\n" * 40_000
                  + b"a2 LOGIN alice@example.test secret\r\n")
        while not (line := f.readline()).startswith(b"a1 "):
            pass
        assert line.startswith(b"a1 OK")
        assert b"a2" not in _noop_inside_tls(s)  # the injected LOGIN was never executed


# ---------------------------------------------------------------- management API
def test_mgmt_lists_live_sessions_and_counters(imap: Running) -> None:
    asyncio.run_coroutine_threadsafe(imap.server.check(), imap.loop).result(5)  # readiness
    app = FastAPI()
    app.include_router(router(imap.server), prefix="/api/v1")
    with imaplib.IMAP4("127.0.0.1", imap.port) as m:
        m.login(USER, PASSWORD)
        m.select("INBOX")
        m.fetch("1", "(BODY.PEEK[])")
        with TestClient(app) as http:
            deadline = time.monotonic() + 5
            while True:
                sessions = http.get("/api/v1/imap/sessions").json()
                if sessions and sessions[0]["mailbox"] == "INBOX" or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert sessions[0]["user"] == USER and sessions[0]["ip"] == "127.0.0.1"
            stats = http.get("/api/v1/imap/stats").json()
            assert stats["sessions"] == 1
            assert stats["commands"]["FETCH"]["OK"] >= 1 and stats["fetch_bytes"] > 0
            assert http.delete("/api/v1/imap/sessions/nope").status_code == 404
            assert http.delete(f"/api/v1/imap/sessions/{sessions[0]['id']}").status_code == 204
        with pytest.raises((imaplib.IMAP4.abort, OSError)):
            m.noop()
            m.noop()


def test_append_goes_to_the_blob_store_first_with_crlf_line_ends(tmp_path: Path) -> None:
    """imap-access uploads a large APPEND (CRLF-normalised, as IMAP serves it) and sends the
    store a reference, so the store only writes rows; a small one travels with the request
    and the store keeps it in its blob row, with no upload (ADR 0014)."""
    for imap in _start(tmp_path):
        big = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 40  # over 32 KiB
        with imaplib.IMAP4("127.0.0.1", imap.port) as m:
            m.login(USER, PASSWORD)
            typ, _ = m.append("INBOX", None, None, big)
            assert typ == "OK"
            m.append("INBOX", None, None, b"Subject: bare\n\nx\n")
            m.select("INBOX")
            typ, data = m.fetch("2:3", "(RFC822.SIZE BODY.PEEK[])")
            assert data[0][1] == big  # type: ignore[index]
            assert data[2][1] == b"Subject: bare\r\n\r\nx\r\n"  # type: ignore[index]
            assert b"RFC822.SIZE 20 " in data[2][0]  # type: ignore[index]
        assert imap.mp.puts == 1


def test_session_time_limit(tmp_path: Path) -> None:
    for imap in _start(tmp_path, max_session_s=0.5):
        r = Raw(imap.port)
        r.cmd(b"a1 LOGIN alice@example.test secret\r\n", b"a1 OK")
        assert r.f.readline().startswith(b"* BYE Session time limit")
        r.close()


def test_command_budget_and_idle_autologout(tmp_path: Path) -> None:
    for imap in _start(tmp_path, max_commands=3, idle_timeout_s=0.3):
        r = Raw(imap.port)
        out = r.cmd(b"a1 NOOP\r\na2 NOOP\r\na3 NOOP\r\na4 NOOP\r\n", b"* BYE")
        assert out[-1].startswith(b"* BYE Too many commands") and len(out) == 4
        assert r.f.readline() == b""
        r.close()
        r = Raw(imap.port)
        r.cmd(b"a1 LOGIN alice@example.test secret\r\na2 SELECT INBOX\r\n", b"a2 OK")
        out = r.cmd(b"a3 IDLE\r\n", b"+ idling")
        assert r.f.readline().startswith(b"* BYE Autologout")  # RFC 2177: idle too long
        r.close()


# ---------------------------------------------------------------- fetchmail, mbsync (CLIENTS.md)
@pytest.mark.clients
@pytest.mark.skipif(shutil.which("fetchmail") is None, reason="fetchmail not installed")
def test_fetchmail_keep_mode(imap: Running, tmp_path: Path) -> None:
    out = tmp_path / "out.mbox"
    rc = tmp_path / "fetchmailrc"
    rc.write_text(
        "set no syslog\n"
        f'poll 127.0.0.1 protocol IMAP port {imap.port} auth password user "{USER}" there '
        f'with password "{PASSWORD}" is "local" here keep fetchall sslproto \'\' '
        f"mda \"/bin/sh -c 'cat >> {out}'\"\n")
    rc.chmod(0o600)
    r = subprocess.run(["fetchmail", "-f", str(rc), "--nodetach", "-v",
                        "--idfile", str(tmp_path / "ids")],
                       capture_output=True, timeout=30, env={"HOME": str(tmp_path)})
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()
    assert b"Subject: hello" in out.read_bytes() and b"see you." in out.read_bytes()
    flags = imap.mp.boxes[imap.account]["INBOX"].msgs[1].flags
    assert "\\Seen" in flags  # fetchmail marks what it fetched


@pytest.mark.clients
@pytest.mark.skipif(shutil.which("mbsync") is None, reason="mbsync not installed")
def test_mbsync_incremental_pull(imap: Running, tmp_path: Path) -> None:
    maildir = tmp_path / "mail"
    maildir.mkdir()
    rc = tmp_path / "mbsyncrc"
    rc.write_text(
        f"IMAPAccount a\nHost 127.0.0.1\nPort {imap.port}\nUser {USER}\nPass {PASSWORD}\n"
        "SSLType None\nAuthMechs LOGIN\n\n"
        "IMAPStore a-remote\nAccount a\n\n"
        f"MaildirStore a-local\nPath {maildir}/\nInbox {maildir}/INBOX\nSubFolders Verbatim\n\n"
        "Channel a\nFar :a-remote:\nNear :a-local:\nPatterns *\nCreate Near\nSync Pull\n"
        "SyncState *\n")

    def sync() -> None:
        r = subprocess.run(["mbsync", "-c", str(rc), "-a", "-V"], capture_output=True,
                           timeout=30, env={"HOME": str(tmp_path)})
        assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()

    def inbox_files() -> list[bytes]:
        # mbsync stores LF line ends and adds its own X-TUID header
        return sorted(b"".join(line for line in p.read_bytes().splitlines(keepends=True)
                               if not line.startswith(b"X-TUID:"))
                      for p in (maildir / "INBOX").glob("*/*") if p.is_file())

    sync()
    assert inbox_files() == [(PREFIX + MSG).replace(b"\r\n", b"\n")]
    assert (maildir / "Trash").is_dir() and (maildir / "Sent").is_dir()
    imap.deliver(b"Subject: second\r\n\r\nmore\r\n")
    sync()
    files = inbox_files()
    assert len(files) == 2 and any(f.startswith(b"Subject: second") for f in files)
