"""pop3-access on a real listener (port 0, in-memory ports) driven by real clients: poplib,
curl, fetchmail (delete and keep mode), getmail6, and raw sockets for the edge cases."""

from __future__ import annotations

import asyncio
import os
import poplib
import shutil
import socket
import ssl
import stat
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from postbus.kit.tls import self_signed, server_context
from postbus.pop3_access.memory import (
    MemoryDirectory,
    MemoryLocks,
    MemoryMaildrops,
    MemoryThrottle,
)
from postbus.pop3_access.server import Pop3Server
from postbus.pop3_access.session import Limits

USER, PASSWORD = "alice@example.test", "s3cret pass"

MESSAGES = [
    b"From: a@example.net\r\nTo: alice@example.test\r\nSubject: first\r\nMessage-ID: <1@x>\r\n\r\n"
    b"hello\r\n.dotted line\r\n.\r\nbye\r\n",
    b"From: b@example.net\nTo: alice@example.test\nSubject: second, bare LF\nMessage-ID: <2@x>\n\n"
    b"line one\nline two\n",
    b"From: c@example.net\r\nTo: alice@example.test\r\nSubject: third\r\nMessage-ID: <3@x>\r\n\r\n"
    + b"x" * 70 + b"\r\n" * 1 + (b"y" * 998 + b"\r\n") * 200,
]
PREFIX = b"Return-Path: <a@example.net>\r\nDelivered-To: alice@example.test\r\n"


def crlf(b: bytes) -> bytes:
    return b.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


@dataclass
class Rig:
    server: Pop3Server
    store: MemoryMaildrops
    directory: MemoryDirectory
    locks: MemoryLocks
    port: int
    tls_port: int
    account_id: int
    tmp: Path

    def visible(self) -> int:
        return len(self.store.visible(self.account_id))

    async def wait_unlocked(self) -> None:
        for _ in range(200):
            if not self.locks.held:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("lock still held")


@pytest_asyncio.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    self_signed(cert, key)
    directory, store, locks = MemoryDirectory(), MemoryMaildrops(), MemoryLocks()
    acc = directory.add(USER, PASSWORD)
    for m in MESSAGES:
        store.deliver(acc.account_id, m, PREFIX)
    server = Pop3Server(directory=directory, maildrops=store, locks=locks,
                        throttle=MemoryThrottle(),
                        limits=Limits(auth_failure_delay_s=0.01, auth_failure_delay_max_s=0.05),
                        ssl_context=server_context(cert, key), hostname="pop.test",
                        idle_timeout_s=30)
    port = await server.listen("127.0.0.1", 0)
    tls_port = await server.listen("127.0.0.1", 0, implicit_tls=True)
    yield Rig(server, store, directory, locks, port, tls_port, acc.account_id, tmp_path)
    await server.close()


def client_tls() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def run(*cmd: str, cwd: Path | None = None, timeout: float = 30) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(*cmd, cwd=cwd, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode or 0, out.decode(errors="replace")


def need(binary: str) -> None:
    if shutil.which(binary) is None:
        pytest.skip(f"{binary} not installed")


# ---------------------------------------------------------------- poplib
async def test_poplib_full_session_and_delete_mode(rig: Rig) -> None:
    def client() -> tuple[object, ...]:
        p = poplib.POP3("127.0.0.1", rig.port, timeout=10)
        caps = p.capa()
        p.user(USER)
        p.pass_(PASSWORD)
        stat_ = p.stat()
        listing = p.list()[1]
        uidl = p.uidl()[1]
        _, lines, octets = p.retr(1)
        _, lines2, octets2 = p.retr(2)
        top = p.top(3, 0)[1]
        p.dele(1)
        p.dele(3)
        p.quit()
        return caps, stat_, listing, uidl, lines, octets, lines2, octets2, top

    caps, stat_, listing, uidl, lines, octets, lines2, octets2, top = await asyncio.to_thread(client)
    assert {"TOP", "UIDL", "USER", "SASL", "STLS", "PIPELINING", "RESP-CODES"} <= set(caps)  # type: ignore[operator]
    sizes = [len(crlf(PREFIX + m)) for m in MESSAGES]
    assert stat_ == (3, sum(sizes))
    assert listing == [f"{i} {s}".encode() for i, s in enumerate(sizes, 1)]
    assert [x.split()[1] for x in uidl] == [b"3e9.1", b"3e9.2", b"3e9.3"]  # type: ignore[union-attr]
    # poplib un-stuffs and counts what it received; LIST sizes are what RETR sends
    assert b"\r\n".join(lines) + b"\r\n" == crlf(PREFIX + MESSAGES[0])  # type: ignore[arg-type]
    assert b"\r\n".join(lines2) + b"\r\n" == crlf(PREFIX + MESSAGES[1])  # type: ignore[arg-type]
    assert top[-1] == b"" and top[2] == b"From: c@example.net"  # type: ignore[index]
    assert (octets, octets2) == (sizes[0], sizes[1])  # poplib counts un-stuffed octets
    await rig.wait_unlocked()
    assert [m.uid for m in rig.store.visible(rig.account_id)] == [2]
    assert rig.store.commits[-1].seen_uids == [2]


async def test_poplib_stls_and_implicit_tls(rig: Rig) -> None:
    def client() -> tuple[bytes, bytes]:
        p = poplib.POP3("127.0.0.1", rig.port, timeout=10)
        p.stls(client_tls())
        assert "STLS" not in p.capa()
        p.user(USER)
        p.pass_(PASSWORD)
        a = p.stat()
        p.quit()
        s = poplib.POP3_SSL("127.0.0.1", rig.tls_port, context=client_tls(), timeout=10)
        s.user(USER)
        s.pass_(PASSWORD)
        b = s.stat()
        s.quit()
        return str(a).encode(), str(b).encode()

    a, b = await asyncio.to_thread(client)
    assert a == b and a.startswith(b"(3, ")
    assert rig.visible() == 3


async def test_wrong_password_and_second_client_gets_in_use(rig: Rig) -> None:
    def client() -> tuple[str, str]:
        bad = poplib.POP3("127.0.0.1", rig.port, timeout=10)
        bad.user(USER)
        with pytest.raises(poplib.error_proto) as e1:
            bad.pass_("wrong")
        bad.quit()
        first = poplib.POP3("127.0.0.1", rig.port, timeout=10)
        first.user(USER)
        first.pass_(PASSWORD)
        second = poplib.POP3("127.0.0.1", rig.port, timeout=10)
        second.user(USER)
        with pytest.raises(poplib.error_proto) as e2:
            second.pass_(PASSWORD)
        first.dele(1)
        first.quit()
        second.user(USER)
        second.pass_(PASSWORD)  # free again after the first QUIT
        assert second.stat()[0] == 2
        second.quit()
        return str(e1.value), str(e2.value)

    e1, e2 = await asyncio.to_thread(client)
    assert e1 == "b'-ERR [AUTH] authentication failed'"
    assert e2 == "b'-ERR [IN-USE] maildrop already locked by another session'"


def non_loopback_ip() -> str | None:
    """An address of this machine that is not loopback (the route to a TEST-NET address)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
            ip = str(s.getsockname()[0])
        except OSError:
            return None
    return None if ip.startswith("127.") or ip == "0.0.0.0" else ip


async def test_plaintext_login_refused_before_tls_from_a_non_loopback_peer(rig: Rig) -> None:
    ip = non_loopback_ip()
    if ip is None:
        pytest.skip("no non-loopback address")
    port = await rig.server.listen(ip, 0)

    def client() -> tuple[dict[str, list[str]], str, dict[str, list[str]]]:
        p = poplib.POP3(ip, port, timeout=10)
        before = p.capa()
        try:
            p.user(USER)
            refused = "no error"
        except poplib.error_proto as exc:
            refused = str(exc)
        p.stls(client_tls())
        after = p.capa()
        p.user(USER)
        p.pass_(PASSWORD)
        p.quit()
        return before, refused, after

    before, refused, after = await asyncio.to_thread(client)
    assert "USER" not in before and "SASL" not in before and "STLS" in before
    assert refused.startswith("b'-ERR [AUTH] Plaintext authentication disallowed")
    assert "USER" in after and after["SASL"] == ["PLAIN"] and "STLS" not in after
    need("curl")
    rc, out = await run("curl", "-sS", f"pop3://{ip}:{port}/", "-u", f"{USER}:{PASSWORD}")
    assert rc != 0  # curl gives up: no plaintext login offered
    rc, out = await run("curl", "-sS", "-k", "--ssl-reqd", f"pop3://{ip}:{port}/1",
                        "-u", f"{USER}:{PASSWORD}")
    assert rc == 0 and out.encode() == crlf(PREFIX + MESSAGES[0])


# ---------------------------------------------------------------- curl
async def test_curl_list_retr_uidl_top_dele_and_tls(rig: Rig) -> None:
    need("curl")
    base = f"pop3://127.0.0.1:{rig.port}"
    auth = ["-u", f"{USER}:{PASSWORD}"]
    rc, out = await run("curl", "-sS", base + "/", *auth)
    sizes = [len(crlf(PREFIX + m)) for m in MESSAGES]
    assert rc == 0 and out.splitlines() == [f"{i} {s}" for i, s in enumerate(sizes, 1)]
    rc, out = await run("curl", "-sS", base + "/1", *auth)
    assert rc == 0 and out.encode() == crlf(PREFIX + MESSAGES[0])
    rc, out = await run("curl", "-sS", base + "/", "-X", "UIDL", *auth)
    assert rc == 0 and out.splitlines() == ["1 3e9.1", "2 3e9.2", "3 3e9.3"]
    rc, out = await run("curl", "-sS", base + "/", "-X", "TOP 2 0", *auth)
    assert rc == 0 and "Subject: second, bare LF" in out and "line one" not in out
    rc, out = await run("curl", "-sS", "-k", f"pop3s://127.0.0.1:{rig.tls_port}/2", *auth)
    assert rc == 0 and out.encode() == crlf(PREFIX + MESSAGES[1])
    rc, out = await run("curl", "-sS", "-k", "--ssl-reqd", base + "/3", *auth)  # STLS
    assert rc == 0 and out.encode() == crlf(PREFIX + MESSAGES[2])
    rc, out = await run("curl", "-sS", base + "/", "-X", "DELE 2", "-I", *auth)
    assert rc == 0
    await rig.wait_unlocked()
    assert [m.uid for m in rig.store.visible(rig.account_id)] == [1, 3]
    rc, out = await run("curl", "-sS", base + "/", "-u", f"{USER}:nope")
    assert rc == 67  # login denied


# ---------------------------------------------------------------- fetchmail
def fetchmailrc(rig: Rig, out: Path, keep: bool) -> Path:
    rc = rig.tmp / ("keep.rc" if keep else "delete.rc")
    rc.write_text(
        "set no syslog\n"
        f'poll 127.0.0.1 protocol POP3 port {rig.port} auth password user "{USER}" there '
        f'with password "{PASSWORD}" is "local" here {"keep" if keep else ""} '
        f"sslproto '' mda \"/bin/sh -c 'cat >> {out}'\"\n")
    rc.chmod(stat.S_IRUSR | stat.S_IWUSR)
    return rc


async def test_fetchmail_keep_then_delete_mode(rig: Rig) -> None:
    need("fetchmail")
    out = rig.tmp / "out.mbox"
    ids = rig.tmp / "ids"
    env_home = ["env", f"HOME={rig.tmp}", "fetchmail"]
    rc, log = await run(*env_home, "-f", str(fetchmailrc(rig, out, keep=True)), "--nodetach",
                        "-v", "--idfile", str(ids))
    assert rc == 0, log
    assert "3 messages" in log and out.read_bytes().count(b"Message-ID: <") == 3
    await rig.wait_unlocked()
    assert rig.visible() == 3  # keep mode: nothing deleted
    # a second keep run fetches nothing new: the UIDLs are stable
    rc, log = await run(*env_home, "-f", str(fetchmailrc(rig, out, keep=True)), "--nodetach",
                        "-v", "--idfile", str(ids))
    assert rc == 1, log  # fetchmail: 1 = no new mail
    assert out.read_bytes().count(b"Message-ID: <") == 3
    await rig.wait_unlocked()
    # default (delete) mode: fetchmail RETRs, DELEs and QUITs
    out2 = rig.tmp / "out2.mbox"
    rc, log = await run(*env_home, "-f", str(fetchmailrc(rig, out2, keep=False)), "--nodetach",
                        "-v", "--all", "--idfile", str(rig.tmp / "ids2"))
    assert rc == 0, log
    body = out2.read_bytes()
    assert body.count(b"Message-ID: <") == 3
    assert b"\n.dotted line\n" in body and b"line two\n" in body  # un-stuffed, LF locally
    await rig.wait_unlocked()
    assert rig.visible() == 0


async def test_fetchmail_over_implicit_tls_and_stls(rig: Rig) -> None:
    need("fetchmail")
    out = rig.tmp / "tls.mbox"
    for name, port, tls in (("pop3s", rig.tls_port, "ssl"), ("stls", rig.port, "sslproto TLS1.2+")):
        rc_path = rig.tmp / f"{name}.rc"
        rc_path.write_text(
            "set no syslog\n"
            f'poll 127.0.0.1 protocol POP3 port {port} auth password user "{USER}" there '
            f'with password "{PASSWORD}" is "local" here keep fetchall {tls} no sslcertck '
            f"mda \"/bin/sh -c 'cat >> {out}'\"\n")
        rc_path.chmod(stat.S_IRUSR | stat.S_IWUSR)
        rc, log = await run("env", f"HOME={rig.tmp}", "fetchmail", "-f", str(rc_path),
                            "--nodetach", "-v", "--idfile", str(rig.tmp / f"{name}.ids"))
        assert rc == 0, log
        assert "3 messages" in log, log
        if name == "stls":
            assert "STLS" in log, log
        await rig.wait_unlocked()
    assert out.read_bytes().count(b"Message-ID: <") == 6
    assert rig.visible() == 3


# ---------------------------------------------------------------- getmail6
async def test_getmail_keep_then_delete(rig: Rig) -> None:
    need("getmail")
    # getmail refuses to deliver as root: the Maildir belongs to nobody, in a directory that
    # nobody can reach (pytest's tmp_path parents are private to root)
    top, maildir, gdir = _getmail_dirs(rig.tmp)
    try:
        await _getmail_runs(rig, maildir, gdir)
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _getmail_dirs(tmp: Path) -> tuple[Path, Path, Path]:
    top = Path(tempfile.mkdtemp(prefix="pop3-getmail-"))
    top.chmod(0o755)
    maildir = top / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True)
    if os.getuid() == 0:
        for p in [maildir, *maildir.iterdir()]:
            shutil.chown(p, "nobody", "nogroup")
    gdir = tmp / "getmail"
    gdir.mkdir()
    return top, maildir, gdir


async def _getmail_runs(rig: Rig, maildir: Path, gdir: Path) -> None:

    def rc_file(delete: bool) -> Path:
        p = rig.tmp / f"getmailrc-{delete}"
        p.write_text(
            "[retriever]\ntype = SimplePOP3Retriever\nserver = 127.0.0.1\n"
            f"port = {rig.port}\nusername = {USER}\npassword = {PASSWORD}\n"
            f"[destination]\ntype = Maildir\npath = {maildir}/\nuser = nobody\n"
            f"[options]\nread_all = false\ndelete = {str(delete).lower()}\n")
        return p

    rc, log = await run("getmail", "--rcfile", str(rc_file(False)), "--getmaildir", str(gdir))
    assert rc == 0 and "delivery error" not in log and "3 messages" in log, log
    assert len(list((maildir / "new").iterdir())) == 3
    await rig.wait_unlocked()
    assert rig.visible() == 3
    # read_all = false: the second run sees the same UIDLs and retrieves nothing, and with
    # delete = true it DELEs the messages it has seen before (getmail's delete mode)
    rc, log = await run("getmail", "--rcfile", str(rc_file(True)), "--getmaildir", str(gdir))
    assert rc == 0 and "0 messages" in log, log
    await rig.wait_unlocked()
    assert rig.visible() == 0
    assert rig.store.commits[-1].delete_uids == [1, 2, 3]
    assert len(list((maildir / "new").iterdir())) == 3


# ---------------------------------------------------------------- raw sockets
def _recv_until(sock: socket.socket | ssl.SSLSocket, end: bytes, limit: float = 10) -> bytes:
    buf = b""
    deadline = time.monotonic() + limit
    while not buf.endswith(end):
        assert time.monotonic() < deadline, buf
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
    return buf


async def test_pipelining_overlong_line_and_dropped_connection(rig: Rig) -> None:
    def client() -> bytes:
        s = socket.create_connection(("127.0.0.1", rig.port), timeout=10)
        _recv_until(s, b"\r\n")
        s.sendall(f"USER {USER}\r\nPASS {PASSWORD}\r\nSTAT\r\n".encode() + b"X" * 10000
                  + b"\r\nDELE 1\r\nDELE 2\r\nLIST\r\n")
        out = _recv_until(s, b"\r\n.\r\n")
        s.close()  # no QUIT
        return out

    out = await asyncio.to_thread(client)
    lines = out.split(b"\r\n")
    assert lines[0] == b"+OK send PASS" and lines[1].startswith(b"+OK maildrop has 3")
    assert lines[2].startswith(b"+OK 3 ") and lines[3] == b"-ERR line too long"
    assert lines[4:7] == [b"+OK message 1 deleted", b"+OK message 2 deleted", b"+OK 1 messages ("
                          + lines[6][len(b"+OK 1 messages ("):]]
    await rig.wait_unlocked()
    assert rig.visible() == 3 and rig.store.commits == []  # dropped: nothing deleted


async def test_data_pipelined_after_stls_is_discarded(rig: Rig) -> None:
    def client() -> bytes:
        s = socket.create_connection(("127.0.0.1", rig.port), timeout=10)
        _recv_until(s, b"\r\n")
        s.sendall(b"STLS\r\nCAPA\r\n")  # CVE-2011-0411 style injection
        assert _recv_until(s, b"\r\n") == b"+OK Begin TLS negotiation\r\n"
        t = client_tls().wrap_socket(s)
        t.sendall(b"NOOP\r\n")
        return _recv_until(t, b"\r\n")

    assert await asyncio.to_thread(client) == b"-ERR not allowed before login\r\n"


async def test_stls_discards_plaintext_the_stream_still_holds(rig: Rig) -> None:
    """The injected command past the server's first read (64 KiB) waits in the stream
    reader, not in the receiver: it must be dropped too, not read inside TLS."""
    def client() -> bytes:
        s = socket.create_connection(("127.0.0.1", rig.port), timeout=10)
        _recv_until(s, b"\r\n")
        s.sendall(b"STLS\r\n" + b"NOOP\r\n" * 12_000 + b"CAPA\r\n")
        line = _recv_until(s, b"\r\n")
        while not line.startswith(b"+OK Begin TLS"):
            line = _recv_until(s, b"\r\n")
        t = client_tls().wrap_socket(s)
        t.sendall(b"NOOP\r\n")
        return _recv_until(t, b"\r\n")

    assert await asyncio.to_thread(client) == b"-ERR not allowed before login\r\n"


async def test_idle_autologout(rig: Rig) -> None:
    rig.server.idle_timeout_s = 0.3

    def client() -> bytes:
        s = socket.create_connection(("127.0.0.1", rig.port), timeout=10)
        _recv_until(s, b"\r\n")
        out = _recv_until(s, b"\r\n")
        assert s.recv(10) == b""  # closed
        return out

    assert await asyncio.to_thread(client) == b"-ERR autologout; idle for too long\r\n"


async def test_connections_per_address_are_bounded(rig: Rig) -> None:
    rig.server.max_connections_per_ip = 2

    def client() -> list[bytes]:
        socks = [socket.create_connection(("127.0.0.1", rig.port), timeout=10) for _ in range(3)]
        greetings = [_recv_until(s, b"\r\n") for s in socks]
        socks[0].close()
        deadline = time.monotonic() + 10  # until the server has counted the close
        while rig.server._per_ip.open.get("127.0.0.1", 0) >= 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        again = socket.create_connection(("127.0.0.1", rig.port), timeout=10)
        greetings.append(_recv_until(again, b"\r\n"))
        for s in [*socks[1:], again]:
            s.close()
        return greetings

    g = await asyncio.to_thread(client)
    assert [x[:3] for x in g] == [b"+OK", b"+OK", b"-ER", b"+OK"]
    assert g[2] == b"-ERR [SYS/TEMP] too many connections from your address\r\n"


async def test_proxy_protocol_gives_the_client_address(tmp_path: Path) -> None:
    """Issue 8.10: behind a balancer every POP3 client shared its address (one attacker
    could lock out everyone behind a node); loopback-is-secure can be turned off."""
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    self_signed(cert, key)
    directory, store, locks = MemoryDirectory(), MemoryMaildrops(), MemoryLocks()
    directory.add(USER, PASSWORD)
    server = Pop3Server(directory=directory, maildrops=store, locks=locks,
                        throttle=MemoryThrottle(), ssl_context=server_context(cert, key),
                        proxy_protocol=True, max_connections_per_ip=1)
    port = await server.listen("127.0.0.1", 0)
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"PROXY TCP4 198.51.100.7 192.0.2.1 40000 110\r\nCAPA\r\n")
        assert (await r.readline()).startswith(b"+OK")
        capa = []
        while (line := await r.readline()) != b".\r\n":
            capa.append(line)
        assert b"USER\r\n" not in capa  # 198.51.100.7 is not loopback: no plaintext login
        r2, w2 = await asyncio.open_connection("127.0.0.1", port)  # the same client again
        w2.write(b"PROXY TCP4 198.51.100.7 192.0.2.1 40001 110\r\n")
        assert (await r2.readline()).startswith(b"-ERR")
        r3, w3 = await asyncio.open_connection("127.0.0.1", port)  # another client: admitted
        w3.write(b"PROXY TCP4 198.51.100.8 192.0.2.1 40002 110\r\n")
        assert (await r3.readline()).startswith(b"+OK")
        r4, w4 = await asyncio.open_connection("127.0.0.1", port)  # no header: closed
        w4.write(b"USER x\r\n")
        assert await asyncio.wait_for(r4.read(), 10) == b""
        for wr in (w, w2, w3, w4):
            wr.close()
    finally:
        await server.close()

    off = Pop3Server(directory=directory, maildrops=store, locks=locks,
                     throttle=MemoryThrottle(), loopback_is_secure=False)
    port = await off.listen("127.0.0.1", 0)
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"CAPA\r\n")
        await r.readline()
        await r.readline()
        capa = []
        while (line := await r.readline()) != b".\r\n":
            capa.append(line)
        assert b"USER\r\n" not in capa  # loopback no longer counts as secure
        w.close()
    finally:
        await off.close()
