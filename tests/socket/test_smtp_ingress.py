"""smtp-ingress against real clients (raw sockets, smtplib, aiosmtplib), a real nats-server
(messages pulled back from JetStream) and real SeaweedFS."""

from __future__ import annotations

import asyncio
import base64
import os
import smtplib
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiosmtplib
import httpx
import pytest
import pytest_asyncio
from prometheus_client import generate_latest

from postbus.kit.blob import BlobStore, blob_key
from postbus.kit.bus import Bus
from postbus.kit.mgmt import create_app
from postbus.kit.settings import CommonSettings
from postbus.kit.testing import ADMIN_TOKEN, RunningNats
from postbus.smtp_ingress import mgmt
from postbus.smtp_ingress.settings import Settings
from postbus.smtp_ingress.testing import DirectoryTable, Inbox, RunningIngress, User, start_ingress

pytestmark = pytest.mark.timeout(60)

BODY = b"From: bob@example.net\r\nTo: alice@example.test\r\nSubject: hi\r\n\r\nhello\r\n"


def table() -> DirectoryTable:
    return DirectoryTable(
        domains={"example.test"},
        users={"alice@example.test": User("secret", send_as=["alice@example.test",
                                                             "sales@example.test"]),
               "bob@example.test": User("hunter2"),
               "gone@example.test": User("x", status="disabled")})


Start = Callable[..., Awaitable[RunningIngress]]


@pytest_asyncio.fixture
async def start(bus: Bus, blobs: BlobStore, common_settings: CommonSettings,
                tmp_path: Path) -> AsyncIterator[Start]:
    started: list[RunningIngress] = []
    n = 0

    async def _start(**kw: object) -> RunningIngress:
        nonlocal n
        n += 1
        common = common_settings
        if "trusted_networks" in kw:
            common = common.model_copy(update={"trusted_networks": kw.pop("trusted_networks")})
        s = Settings(common=common, smtp_port=0, submission_port=0, smtps_port=0,
                     **kw)  # type: ignore[arg-type]
        d = tmp_path / f"ing{n}"
        d.mkdir()
        r = await start_ingress(bus, blobs, s, d, table() if n == 1 else DirectoryTable())
        started.append(r)
        return r

    yield _start
    for r in started:
        await r.ingress.stop()


@pytest_asyncio.fixture
async def ing(start: Start) -> RunningIngress:
    return await start()


@pytest_asyncio.fixture
async def inbox(bus: Bus) -> Inbox:
    return Inbox(bus)


class Raw:
    """A raw SMTP client on asyncio streams: send bytes, read whole replies."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.r, self.w = reader, writer

    @classmethod
    async def open(cls, port: int, tls: ssl.SSLContext | None = None) -> Raw:
        r, w = await asyncio.open_connection("127.0.0.1", port, ssl=tls)
        return cls(r, w)

    async def send(self, data: bytes) -> None:
        self.w.write(data)
        await self.w.drain()

    async def reply(self, timeout: float = 10) -> tuple[int, list[str]]:
        lines = []
        while True:
            line = await asyncio.wait_for(self.r.readline(), timeout)
            if not line:
                raise ConnectionError("closed")
            lines.append(line.decode().rstrip("\r\n"))
            if line[3:4] != b"-":
                return int(lines[0][:3]), [x[4:] for x in lines]

    async def cmd(self, line: str) -> tuple[int, str]:
        await self.send(line.encode() + b"\r\n")
        code, lines = await self.reply()
        return code, lines[-1]

    async def starttls(self, ctx: ssl.SSLContext) -> None:
        assert (await self.cmd("STARTTLS"))[0] == 220
        await self.w.start_tls(ctx)

    async def closed(self) -> bool:
        try:
            return await asyncio.wait_for(self.r.read(), 5) == b""
        except ConnectionError:
            return True

    def close(self) -> None:
        self.w.close()


async def greeted(port: int, tls: ssl.SSLContext | None = None, helo: str = "EHLO c.example.net") -> Raw:
    c = await Raw.open(port, tls)
    code, _ = await c.reply()
    assert code == 220
    code, _ = await c.cmd(helo)
    assert code == 250
    return c


async def start_data(c: Raw) -> None:
    """MAIL FROM bob, RCPT TO alice and DATA, pipelined: 250, 250 and 354."""
    await c.send(b"MAIL FROM:<bob@example.net>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
    assert [(await c.reply())[0] for _ in range(3)] == [250, 250, 354]


async def inside_tls(c: Raw, ing: RunningIngress) -> None:
    """After a 220 to STARTTLS: the handshake, then EHLO's is the first reply inside TLS
    (nothing sent before the handshake is answered), then the session goes on."""
    await c.w.start_tls(ing.client_tls())
    await c.send(b"EHLO c.example.net\r\n")
    code, lines = await c.reply()
    assert code == 250 and "AUTH PLAIN LOGIN" in lines
    assert (await c.cmd("NOOP")) == (250, "2.0.0 Ok")
    c.close()


async def settle(cond: Callable[[], object], timeout: float = 10) -> None:
    """Wait until the server has caught up (a closed connection is released asynchronously)."""
    for _ in range(int(timeout / 0.02)):
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met")


async def ehlo_lines(c: Raw) -> list[str]:
    await c.send(b"EHLO c.example.net\r\n")
    code, lines = await c.reply()
    assert code == 250
    return lines


# ---------------------------------------------------------------- EHLO and TLS
async def test_ehlo_advertises_and_auth_only_after_tls(ing: RunningIngress) -> None:
    c = await Raw.open(ing.port("mx"))
    code, lines = await c.reply()
    assert code == 220 and "ESMTP" in lines[0]
    ext = await ehlo_lines(c)
    for e in ("PIPELINING", "SIZE 26214400", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES",
              "CHUNKING", "DSN", "STARTTLS"):
        assert e in ext, ext
    assert not any(x.startswith("AUTH") for x in ext)  # loopback included
    code, text = await c.cmd("AUTH PLAIN " + base64.b64encode(b"\0alice@example.test\0secret").decode())
    assert (code, text[:6]) == (538, "5.7.11")
    await c.starttls(ing.client_tls())
    ext = await ehlo_lines(c)
    assert "AUTH PLAIN LOGIN" in ext and "STARTTLS" not in ext
    code, text = await c.cmd("AUTH PLAIN " + base64.b64encode(b"\0alice@example.test\0secret").decode())
    assert (code, text[:5]) == (235, "2.7.0")
    c.close()


# ---------------------------------------------------------------- relay policy (MX)
@pytest.mark.parametrize("rcpt,expected", [
    ("<alice@example.test>", "250 2.1.5"),
    ("<ALICE@Example.Test>", "250 2.1.5"),
    ("<nobody@example.test>", "550 5.1.1"),
    ("<gone@example.test>", "550 5.2.1"),
    ("<someone@remote.example>", "554 5.7.1"),
    ("<someone%remote.example@example.test>", "554 5.7.1"),
    ("<@example.test:someone@remote.example>", "554 5.7.1"),
    ('<"someone@remote.example"@example.test>', "554 5.7.1"),
    ("<someone@remote.example@example.test>", "554 5.7.1"),
    ("<remote.example!someone@example.test>", "554 5.7.1"),
    ("<not an address>", "501 5.1.3"),
])
async def test_mx_recipient_policy(ing: RunningIngress, rcpt: str, expected: str) -> None:
    c = await greeted(ing.port("mx"))
    assert (await c.cmd("MAIL FROM:<bob@example.net>"))[0] == 250
    code, text = await c.cmd(f"RCPT TO:{rcpt}")
    assert f"{code} {text[:5]}" == expected, text
    c.close()


async def test_trusted_network_may_relay(start: Start, inbox: Inbox) -> None:
    ing = await start(trusted_networks=["127.0.0.0/8"])
    c = await greeted(ing.port("mx"))
    assert (await c.cmd("MAIL FROM:<app@example.test>"))[0] == 250
    assert (await c.cmd("RCPT TO:<someone@remote.example>"))[0] == 250
    assert (await c.cmd("DATA"))[0] == 354
    await c.send(BODY + b".\r\n")
    assert (await c.reply())[0] == 250
    assert (await inbox.get()).rcpt_to[0].address == "someone@remote.example"


# ---------------------------------------------------------------- submission
async def test_submission_requires_starttls_and_auth_and_send_as(ing: RunningIngress, inbox: Inbox) -> None:
    port = ing.port("submission")
    c = await greeted(port)
    code, text = await c.cmd("MAIL FROM:<alice@example.test>")
    assert (code, text[:5]) == (530, "5.7.0")  # STARTTLS first
    await c.starttls(ing.client_tls())
    await ehlo_lines(c)
    code, text = await c.cmd("MAIL FROM:<alice@example.test>")
    assert (code, text[:5]) == (530, "5.7.0")  # AUTH required
    code, _ = await c.cmd("AUTH PLAIN " + base64.b64encode(b"\0alice@example.test\0wrong").decode())
    assert code == 535
    # AUTH LOGIN with challenges
    assert (await c.cmd("AUTH LOGIN"))[0] == 334
    assert (await c.cmd(base64.b64encode(b"alice@example.test").decode()))[0] == 334
    code, text = await c.cmd(base64.b64encode(b"secret").decode())
    assert (code, text[:5]) == (235, "2.7.0")
    code, text = await c.cmd("MAIL FROM:<bob@example.test>")
    assert (code, text[:5]) == (553, "5.7.1")
    assert (await c.cmd("MAIL FROM:<sales@example.test>"))[0] == 250
    assert (await c.cmd("RCPT TO:<friend@remote.example> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;friend+2Bx@remote.example"))[0] == 250
    code, text = await c.cmd("RCPT TO:<nobody@example.test>")
    assert code == 550  # local users are checked on submission too
    assert (await c.cmd("DATA"))[0] == 354
    await c.send(BODY + b".\r\n")
    code, lines = await c.reply()
    assert code == 250
    msg = await inbox.get()
    assert msg.client.listener == "submission" and msg.client.auth_user == "alice@example.test"
    assert msg.client.tls and msg.client.tls.startswith("TLS")
    assert msg.rcpt_to[0].notify == ["SUCCESS", "FAILURE"]
    assert msg.rcpt_to[0].orcpt == "rfc822;friend+x@remote.example"
    head = msg.body.inline.split(b"\r\n\r\n")[0].decode()  # type: ignore[union-attr]
    assert "with ESMTPSA id " + msg.queue_id in head and "Authenticated sender: alice@example.test" in head
    c.close()


async def test_smtps_implicit_tls_with_aiosmtplib(ing: RunningIngress, inbox: Inbox) -> None:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=ing.port("smtps"), use_tls=True,
                             tls_context=ing.client_tls(), timeout=10)
    await client.connect()
    await client.login("bob@example.test", "hunter2")
    errors, resp = await client.sendmail("bob@example.test", ["alice@example.test", "x@remote.example"],
                                         BODY)
    assert errors == {} and "queued as" in resp
    await client.quit()
    msg = await inbox.get()
    assert msg.client.listener == "smtps" and msg.client.auth_user == "bob@example.test"
    assert [r.address for r in msg.rcpt_to] == ["alice@example.test", "x@remote.example"]


async def test_smtplib_dsn_8bit_and_smtputf8(ing: RunningIngress, inbox: Inbox) -> None:
    ing.table.users["jörg@example.test"] = User("x")

    def send() -> dict[str, tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", ing.port("mx"), timeout=10) as s:
            return s.sendmail("bob@example.net", ["jörg@example.test"],
                              "Subject: ü\r\n\r\nGrüße\r\n".encode(),
                              mail_options=["SMTPUTF8", "BODY=8BITMIME", "RET=HDRS", "ENVID=e+2Bnv"],
                              rcpt_options=["NOTIFY=NEVER"])

    assert await asyncio.to_thread(send) == {}
    msg = await inbox.get()
    assert (msg.smtputf8, msg.body_type, msg.dsn_ret, msg.dsn_envid) == (True, "8BITMIME", "HDRS", "e+nv")
    assert msg.rcpt_to[0].address == "jörg@example.test" and msg.rcpt_to[0].notify == ["NEVER"]
    assert msg.body.inline.endswith("Grüße\r\n".encode())  # type: ignore[union-attr]
    assert b"with UTF8SMTP id" in msg.body.inline  # type: ignore[operator]


# ---------------------------------------------------------------- pipelining, BDAT
async def test_pipelining_answers_in_order_with_enhanced_codes(ing: RunningIngress, inbox: Inbox) -> None:
    c = await Raw.open(ing.port("mx"))
    await c.reply()
    await c.send(b"EHLO c.example.net\r\nMAIL FROM:<bob@example.net>\r\n"
                 b"RCPT TO:<alice@example.test>\r\nRCPT TO:<nobody@example.test>\r\n"
                 b"RCPT TO:<bob@example.test>\r\nDATA\r\n")
    replies = [await c.reply() for _ in range(6)]
    assert [r[0] for r in replies] == [250, 250, 250, 550, 250, 354]
    for code, lines in replies[1:5]:
        assert lines[-1][1:2] == "." and lines[-1][0] == str(code)[0]
    await c.send(BODY + b".\r\nNOOP\r\nRSET\r\nQUIT\r\n")
    codes = [(await c.reply()) for _ in range(4)]
    assert [x[0] for x in codes] == [250, 250, 250, 221]
    assert codes[0][1][-1].startswith("2.0.0 Ok: queued as ")
    msg = await inbox.get()
    assert [r.address for r in msg.rcpt_to] == ["alice@example.test", "bob@example.test"]
    assert msg.rcpt_to and msg.body.inline.endswith(BODY)  # type: ignore[union-attr]


async def test_bdat_chunking(ing: RunningIngress, inbox: Inbox) -> None:
    c = await greeted(ing.port("mx"))
    part1, part2 = BODY[:20], BODY[20:] + b".\r\nno dot-stuffing in BDAT\r\n"
    await c.send(b"MAIL FROM:<bob@example.net>\r\nRCPT TO:<alice@example.test>\r\n"
                 + f"BDAT {len(part1)}\r\n".encode() + part1
                 + f"BDAT {len(part2)} LAST\r\n".encode() + part2)
    codes = [await c.reply() for _ in range(4)]
    assert [x[0] for x in codes] == [250, 250, 250, 250], codes
    assert codes[2][1][-1] == f"2.0.0 {len(part1)} octets received"
    assert "queued as" in codes[3][1][-1]
    msg = await inbox.get()
    assert msg.body.inline.endswith(part1 + part2)  # type: ignore[union-attr]
    # BDAT without a transaction still consumes its chunk; DATA after BDAT is refused
    await c.send(b"BDAT 13\r\nRCPT TO:<x>\r\nNOOP\r\n")
    assert (await c.reply())[0] == 503
    assert (await c.reply())[0] == 250
    await c.send(b"MAIL FROM:<bob@example.net>\r\nRCPT TO:<alice@example.test>\r\nBDAT 3\r\nabcDATA\r\n")
    assert [(await c.reply())[0] for _ in range(4)] == [250, 250, 250, 503]
    await c.send(b"BDAT 0 LAST\r\n")
    assert (await c.reply())[0] == 250
    assert (await inbox.get()).body.inline.endswith(b"+0000\r\nabc")  # type: ignore[union-attr]
    # bad BDAT syntax: the size is unknown, so the connection is closed
    await c.send(b"BDAT lots\r\n")
    code, lines = await c.reply()
    assert (code, lines[-1][:5]) == (501, "5.5.4") and await c.closed()


# ---------------------------------------------------------------- smuggling and bad input
@pytest.mark.parametrize("sep", [b"\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r", b"\r.\r",
                                 b"\r\n.\n", b"\n.\r"])
async def test_smtp_smuggling_is_refused(ing: RunningIngress, inbox: Inbox, sep: bytes) -> None:
    c = await greeted(ing.port("mx"))
    smuggled = (b"MAIL FROM:<admin@example.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
                b"From: admin@example.test\r\n\r\nsmuggled\r\n")
    await start_data(c)
    await c.send(b"Subject: x\r\n\r\nhello" + sep + smuggled + b"\r\n.\r\nNOOP\r\n")
    code, lines = await c.reply()
    assert (code, lines[-1][:5]) == (550, "5.5.2"), lines
    assert (await c.reply())[0] == 250  # the session goes on, nothing else was executed
    assert await inbox.empty_for(0.5)
    c.close()


async def test_garbage_and_out_of_sequence(ing: RunningIngress, inbox: Inbox) -> None:
    c = await Raw.open(ing.port("mx"))
    await c.reply()
    cases: list[tuple[bytes, int, str]] = [
        (b"\x00\x01\xff\xfebinary junk\r\n", 500, "5.5.2"),
        (b"FOO bar\r\n", 500, "5.5.2"),
        (b"\r\n", 500, "5.5.2"),
        (b"MAIL FROM:<bob@example.net>\r\n", 503, "5.5.1"),  # before EHLO
        (b"EHLO c.example.net\r\n", 250, ""),
        (b"RCPT TO:<alice@example.test>\r\n", 503, "5.5.1"),  # before MAIL
        (b"DATA\r\n", 503, "5.5.1"),
        (b"MAIL FROM:<bob@example.net>\r\n", 250, "2.1.0"),
        (b"MAIL FROM:<bob@example.net>\r\n", 503, "5.5.1"),  # nested
        (b"DATA\r\n", 503, "5.5.1"),  # before RCPT
        (b"MAIL FROM bob\r\n", 503, "5.5.1"),
        (b"RCPT alice\r\n", 501, "5.5.4"),
        (b"X" * 5000 + b"\r\n", 500, "5.5.6"),
        (b"RCPT TO:<alice@example.test> FOO=1\r\n", 555, "5.5.4"),
        (b"VRFY alice\r\n", 252, "2.5.0"),
        (b"EXPN list\r\n", 502, "5.5.1"),
        (b"HELP\r\n", 214, "2.0.0"),
        (b"NOOP\r\n", 250, "2.0.0"),
    ]
    for data, code, enh in cases:
        await c.send(data)
        got, lines = await c.reply()
        assert got == code, (data[:30], lines)
        if enh:
            assert lines[-1].startswith(enh), (data[:30], lines)
    assert await inbox.empty_for(0.2)
    c.close()


async def test_unknown_command_limit_closes(start: Start) -> None:
    ing = await start(max_unknown_commands=3)
    c = await Raw.open(ing.port("mx"))
    await c.reply()
    for _ in range(3):
        assert (await c.cmd("JUNK"))[0] == 500
    code, text = await c.cmd("JUNK")
    assert (code, text[:5]) == (421, "4.7.0") and await c.closed()


# ---------------------------------------------------------------- limits
async def test_in_flow_delay_holds_mail_from_while_the_queue_is_deep(start: Start,
                                                                     bus: Bus) -> None:
    """Postfix's in_flow_delay: while more accepted messages than the threshold wait for
    delivery, MAIL FROM is answered late, in proportion to the excess; intake follows
    delivery and the queue (the latency from 250 to the mailbox) stays bounded."""
    from postbus.proto.mail import INBOUND_STREAM
    from postbus.smtp_ingress import session as server

    depth0 = await bus.stream_messages(INBOUND_STREAM.name)  # left by earlier tests
    ing = await start(flow_backlog_threshold=depth0 + 2, flow_delay_per_message_s=0.3,
                      flow_delay_max_s=0.6, flow_poll_s=0.05)
    held = server.FLOW_DELAYS._value.get()
    c = await greeted(ing.port("mx"))

    async def send_one() -> float:
        """One message (nobody consumes the stream here: it stays queued); returns how
        long MAIL FROM took."""
        t = time.monotonic()
        assert (await c.cmd("MAIL FROM:<bob@example.net>"))[0] == 250
        took = time.monotonic() - t
        assert (await c.cmd("RCPT TO:<alice@example.test>"))[0] == 250
        assert (await c.cmd("DATA"))[0] == 354
        await c.send(b"Subject: flow\r\n\r\nbody\r\n.\r\n")
        assert (await c.reply())[0] == 250
        return took

    async def polled(depth: int) -> None:
        for _ in range(200):
            if ing.ingress.queue_depth >= depth:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"queue depth {ing.ingress.queue_depth}, wanted {depth}")

    for _ in range(3):  # up to the threshold and one past it: never held
        assert await send_one() < 0.25
    await polled(depth0 + 3)
    assert ing.ingress.flow_delay() == pytest.approx(0.3)  # one message over
    assert await send_one() >= 0.3
    assert server.FLOW_DELAYS._value.get() == held + 1
    await polled(depth0 + 4)
    assert ing.ingress.flow_delay() == pytest.approx(0.6)  # two over: twice as long


async def test_message_limits(start: Start, inbox: Inbox) -> None:
    # a message too big is 552 whatever else is wrong with it, so the long line below
    # (1,001 octets) must fit
    ing = await start(max_message_size=1200, max_recipients=2, max_commands=20)
    c = await greeted(ing.port("mx"))
    code, text = await c.cmd("MAIL FROM:<bob@example.net> SIZE=5000")
    assert (code, text[:5]) == (552, "5.3.4")
    assert (await c.cmd("MAIL FROM:<bob@example.net> SIZE=500"))[0] == 250
    assert (await c.cmd("RCPT TO:<alice@example.test>"))[0] == 250
    assert (await c.cmd("RCPT TO:<bob@example.test>"))[0] == 250
    code, text = await c.cmd("RCPT TO:<alice2@example.test>")
    assert (code, text[:5]) == (452, "4.5.3")
    assert (await c.cmd("DATA"))[0] == 354
    await c.send(b"x" * 3000 + b"\r\n" + b"y\r\n" * 500 + b".\r\n")
    code, lines = await c.reply()
    assert (code, lines[-1][:5]) == (552, "5.3.4")
    # a long line in DATA
    await start_data(c)
    await c.send(b"z" * 999 + b"\r\n.\r\n")
    code, lines = await c.reply()
    assert (code, lines[-1][:5]) == (500, "5.5.6")
    assert await inbox.empty_for(0.2)
    for _ in range(20):
        code, text = await c.cmd("NOOP")
        if code != 250:
            break
    assert (code, text[:5]) == (421, "4.7.0") and await c.closed()


async def test_connection_limits_per_ip_and_rate(start: Start) -> None:
    ing = await start(max_connections_per_ip=2)
    a, b = await greeted(ing.port("mx")), await greeted(ing.port("mx"))
    c = await Raw.open(ing.port("mx"))
    code, lines = await c.reply()
    assert (code, lines[-1][:5]) == (421, "4.7.0") and await c.closed()
    a.close()
    await settle(lambda: ing.ingress.per_ip["127.0.0.1"] < 2)
    d = await greeted(ing.port("submission"))
    d.close()
    b.close()
    ing2 = await start(connection_rate_per_ip=3)
    for _ in range(3):
        (await greeted(ing2.port("mx"))).close()
    c = await Raw.open(ing2.port("mx"))
    code, lines = await c.reply()
    assert (code, lines[-1][:5]) == (421, "4.7.0")
    assert ing.ingress.stats.as_dict()["connection_refused"] == {"per_ip_limit": 1}
    assert ing2.ingress.stats.as_dict()["connection_refused"] == {"rate_limit": 1}


async def test_idle_and_session_timeouts(start: Start) -> None:
    ing = await start(idle_timeout_s=0.5)
    c = await greeted(ing.port("mx"))
    code, lines = await c.reply(timeout=5)
    assert (code, lines[-1][:5]) == (421, "4.4.2") and await c.closed()
    ing2 = await start(session_timeout_s=0.8, idle_timeout_s=30)
    c = await greeted(ing2.port("mx"))
    started = time.monotonic()
    for _ in range(50):  # busy, never idle: the total session time still runs out
        code, text = await c.cmd("NOOP")
        if code != 250:
            break
        await asyncio.sleep(0.1)
    assert (code, text[:5]) == (421, "4.4.2") and time.monotonic() - started >= 0.7


async def test_auth_failures_throttled_across_replicas(start: Start) -> None:
    ing = await start(auth_fail_limit_account=2, auth_fail_limit_ip=100)
    ing2 = await start(auth_fail_limit_account=2, auth_fail_limit_ip=100)
    ing2.table.users.update(ing.table.users)
    bad = "AUTH PLAIN " + base64.b64encode(b"\0alice@example.test\0nope").decode()
    good = "AUTH PLAIN " + base64.b64encode(b"\0alice@example.test\0secret").decode()
    for _ in range(2):
        c = await greeted(ing.port("smtps"), ing.client_tls())
        assert (await c.cmd(bad))[0] == 535
        c.close()
    # the other replica sees the same count (NATS KV), even with the right password
    c = await greeted(ing2.port("smtps"), ing2.client_tls())
    code, text = await c.cmd(good)
    assert (code, text[:5]) == (454, "4.7.0")
    c.close()


# ---------------------------------------------------------------- durability
async def test_large_body_goes_to_s3_first(start: Start, inbox: Inbox, blobs: BlobStore) -> None:
    ing = await start()
    ing.ingress.inline_threshold = 1024
    body = BODY + b"line of text for a large message\r\n" * 200
    c = await greeted(ing.port("mx"))
    await start_data(c)
    await c.send(body + b".\r\n")
    assert (await c.reply())[0] == 250
    msg = await inbox.get()
    assert msg.body.inline is None and msg.body.blob_key
    stored = await blobs.get(msg.body.blob_key)
    blobs.cache.discard(msg.body.blob_key)
    assert await blobs.get(msg.body.blob_key) == stored
    assert stored.endswith(body) and stored.startswith(b"Received: ")
    assert msg.body.blob_key == blob_key(stored) and msg.body.size == len(stored)


async def test_s3_unavailable_gives_451(bus: Bus, common_settings: CommonSettings,
                                        tmp_path: Path, inbox: Inbox) -> None:
    from postbus.kit.embedded import free_port

    dead = common_settings.model_copy(update={"s3_endpoint": f"http://127.0.0.1:{free_port()}"})
    dead_blobs = BlobStore(dead)
    s = Settings(common=common_settings, smtp_port=0, submission_port=-1, smtps_port=-1)
    ing = await start_ingress(bus, dead_blobs, s, tmp_path, table())
    ing.ingress.inline_threshold = 100
    try:
        c = await greeted(ing.port("mx"))
        await start_data(c)
        await c.send(BODY * 5 + b".\r\n")
        code, lines = await c.reply(timeout=30)
        assert (code, lines[-1][:5]) == (451, "4.3.0")
        assert await inbox.empty_for(0.5)
        assert spool_idle(ing)
    finally:
        await ing.ingress.stop()
        await dead_blobs.close()


# ---------------------------------------------------------------- spooling (issue 8.6)
def spool_fds(path: Path) -> list[str]:
    """Files this process has open in the spool directory (unnamed ones included)."""
    found = []
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(str(path) + "/"):
            found.append(target)
    return found


def spool_idle(ing: RunningIngress) -> bool:
    """Nothing held: no bytes counted in memory or on disk, no spool file open or left."""
    sp = ing.ingress.spool
    return (sp.memory.used == 0 and sp.disk.used == 0 and sp.open_files == 0
            and not spool_fds(sp.path) and not any(sp.path.iterdir()))


def stuffed(body: bytes) -> bytes:
    return b"\r\n".join(b"." + ln if ln.startswith(b".") else ln for ln in body.split(b"\r\n"))


BIG_BODY = BODY + b"".join(b".%05d dotted, then a line of text\r\n" % i
                           + b"line %05d of a large message\r\n" % i for i in range(8000))


async def test_large_bodies_are_spooled_and_the_spool_is_released(
        start: Start, inbox: Inbox, blobs: BlobStore) -> None:
    ing = await start(max_message_size=len(BIG_BODY) + 1000)
    ing.ingress.inline_threshold = 1024
    sp = ing.ingress.spool
    assert sp.path.is_dir() and spool_idle(ing)

    async def stored(expect: bytes) -> None:
        msg = await inbox.get()
        assert msg.body.inline is None and msg.body.blob_key
        data = await blobs.get(msg.body.blob_key)
        assert data.startswith(b"Received: ") and data.endswith(expect)
        assert msg.body.blob_key == blob_key(data) and msg.body.size == len(data)

    # DATA: on disk while it is read, nothing of it in memory
    c = await greeted(ing.port("mx"))
    await start_data(c)
    await c.send(stuffed(BIG_BODY)[:400_000])
    await settle(lambda: sp.disk.used > 300_000)
    assert sp.open_files == 1 and len(spool_fds(sp.path)) == 1 and sp.memory.used == 0
    assert not any(sp.path.iterdir())  # the file has no name
    await c.send(stuffed(BIG_BODY)[400_000:] + b".\r\n")
    assert (await c.reply())[0] == 250
    await stored(BIG_BODY)
    assert spool_idle(ing)

    # BDAT, in three chunks
    third = len(BIG_BODY) // 3
    parts = [BIG_BODY[:third], BIG_BODY[third:2 * third], BIG_BODY[2 * third:]]
    await c.send(b"MAIL FROM:<bob@example.net>\r\nRCPT TO:<alice@example.test>\r\n"
                 + b"".join(f"BDAT {len(p)}{' LAST' if i == 2 else ''}\r\n".encode() + p
                            for i, p in enumerate(parts)))
    assert [(await c.reply())[0] for _ in range(5)] == [250] * 5
    await stored(BIG_BODY)
    assert spool_idle(ing)

    # refused after spooling: too big (552), bare LF (550)
    for body, code in ((BIG_BODY + BIG_BODY, 552), (BIG_BODY + b"bare\nLF\r\n", 550)):
        await start_data(c)
        await c.send(stuffed(body) + b".\r\n")
        assert (await c.reply())[0] == code
        assert spool_idle(ing)

    # BDAT chunks of an open transaction, given back by RSET
    await c.send(b"MAIL FROM:<bob@example.net>\r\nRCPT TO:<alice@example.test>\r\n"
                 + f"BDAT {len(parts[0])}\r\n".encode() + parts[0] + b"RSET\r\n")
    assert [(await c.reply())[0] for _ in range(4)] == [250] * 4
    assert spool_idle(ing)

    # the client goes away in the middle of DATA, and of a BDAT transaction
    for opening in (b"DATA\r\n", f"BDAT {len(parts[0])}\r\n".encode() + parts[0]):
        await c.send(b"MAIL FROM:<bob@example.net>\r\nRCPT TO:<alice@example.test>\r\n"
                     + opening + (stuffed(BIG_BODY)[:200_000] if opening == b"DATA\r\n" else b""))
        assert [(await c.reply())[0] for _ in range(3)] == [250, 250, 354 if opening == b"DATA\r\n" else 250]
        await settle(lambda: sp.disk.used > 100_000)
        c.close()
        await settle(lambda: spool_idle(ing))
        c = await greeted(ing.port("mx"))
    c.close()
    assert await inbox.empty_for(0.2)


async def test_spool_full_gives_451_and_memory_full_spools_early(start: Start,
                                                                  inbox: Inbox) -> None:
    # no room on disk: the message is read to its end and refused with 451 4.3.1
    ing = await start(spool_max_bytes=100_000)
    ing.ingress.inline_threshold = 1024
    c = await greeted(ing.port("mx"))
    await start_data(c)
    await c.send(stuffed(BIG_BODY) + b".\r\nNOOP\r\n")
    code, lines = await c.reply()
    assert (code, lines[-1][:5]) == (451, "4.3.1")
    assert (await c.reply())[0] == 250  # and the session goes on
    assert spool_idle(ing)
    c.close()
    # no room in memory: a small message goes to disk at once, and is accepted as usual
    ing2 = await start(data_bytes_in_flight=1000)
    ing2.table.users.update(ing.table.users)
    sp = ing2.ingress.spool
    c = await greeted(ing2.port("mx"))
    await start_data(c)
    body = BODY * 100
    await c.send(body)
    await settle(lambda: sp.disk.used > 0)
    assert sp.memory.used == 0 and sp.open_files == 1
    await c.send(b".\r\n")
    assert (await c.reply())[0] == 250
    msg = await inbox.get()
    assert msg.body.inline is not None and msg.body.inline.endswith(body)
    assert spool_idle(ing2)
    c.close()


async def test_nats_down_gives_451_and_nothing_queued(start: Start, bus: Bus,
                                                      nats_server: RunningNats) -> None:
    ing = await start(resolve_cache_ttl_s=300, publish_timeout_s=1)
    c = await greeted(ing.port("mx"))
    assert (await c.cmd("MAIL FROM:<bob@example.net>"))[0] == 250
    assert (await c.cmd("RCPT TO:<alice@example.test>"))[0] == 250  # now cached
    assert (await c.cmd("DATA"))[0] == 354
    await asyncio.to_thread(nats_server.stop)
    await c.send(BODY + b".\r\n")
    code, lines = await c.reply(timeout=15)
    assert (code, lines[-1][:5]) == (451, "4.3.0")
    # and RCPT for an uncached address is deferred too
    assert (await c.cmd("MAIL FROM:<bob@example.net>"))[0] == 250
    code, text = await c.cmd("RCPT TO:<bob@example.test>")
    assert (code, text[:5]) == (451, "4.3.0")
    c.close()
    await asyncio.to_thread(nats_server.restart)
    for _ in range(100):
        if bus.nc.is_connected:
            break
        await asyncio.sleep(0.1)
    info = await bus.js.stream_info("POSTBUS_INBOUND")
    assert info.state.messages == 0


# ---------------------------------------------------------------- PROXY protocol
async def test_proxy_protocol_v1_and_v2(start: Start, inbox: Inbox) -> None:
    import struct

    ing = await start(proxy_protocol=True)
    c = await Raw.open(ing.port("mx"))
    await c.send(b"PROXY TCP4 203.0.113.7 192.0.2.1 40000 25\r\n")
    assert (await c.reply())[0] == 220
    assert (await c.cmd("EHLO c.example.net"))[0] == 250
    await start_data(c)
    await c.send(BODY + b".\r\n")
    assert (await c.reply())[0] == 250
    msg = await inbox.get()
    assert (msg.client.ip, msg.client.port) == ("203.0.113.7", 40000)
    assert b"[203.0.113.7]" in msg.body.inline  # type: ignore[operator]
    v2 = (b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack("!H", 12)
          + bytes([198, 51, 100, 9, 192, 0, 2, 1]) + struct.pack("!HH", 40001, 25))
    c2 = await Raw.open(ing.port("mx"))
    await c2.send(v2)
    assert (await c2.reply())[0] == 220
    assert any(s.ip == "198.51.100.9" for s in ing.ingress.sessions.values())
    bad = await Raw.open(ing.port("mx"))
    await bad.send(b"EHLO not-a-proxy-header\r\n")
    assert await bad.closed()


# ---------------------------------------------------------------- management API, metrics
async def test_mgmt_api_blocklist_shared_sessions_counters(start: Start) -> None:
    ing = await start()
    ing2 = await start()
    app = create_app("smtp-ingress", checks={}, routers=[mgmt.router(ing.ingress)],
                     token_source=lambda: ADMIN_TOKEN)
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://t", headers=auth) as api:
        c = await greeted(ing.port("mx"))
        sessions = (await api.get("/api/v1/sessions")).json()
        assert len(sessions) == 1 and sessions[0]["ip"] == "127.0.0.1"
        assert sessions[0]["helo"] == "c.example.net" and sessions[0]["listener"] == "mx"
        assert (await c.cmd("MAIL FROM:<bob@example.net>"))[0] == 250
        assert (await c.cmd("RCPT TO:<nobody@example.test>"))[0] == 550
        c.close()
        counters = (await api.get("/api/v1/counters")).json()["counters"]
        assert counters["rcpt_rejected"]["unknown_user"] == 1
        limits = (await api.get("/api/v1/limits")).json()
        assert limits["max_recipients"] == 100 and limits["listeners"]["mx"] == ing.port("mx")
        assert (await api.post("/api/v1/blocklist", json={"network": "nonsense"})).status_code == 422
        r = await api.post("/api/v1/blocklist", json={"network": "127.0.0.1", "reason": "test"})
        assert r.status_code == 201 and r.json()["network"] == "127.0.0.1/32"
        assert [e["network"] for e in (await api.get("/api/v1/blocklist")).json()] == ["127.0.0.1/32"]
        c = await Raw.open(ing.port("mx"))
        code, lines = await c.reply()
        assert (code, lines[-1][:5]) == (554, "5.7.1") and await c.closed()
        # the other replica picks it up from NATS KV
        await ing2.blocklist.refresh()
        c = await Raw.open(ing2.port("mx"))
        assert (await c.reply())[0] == 554
        assert (await api.delete("/api/v1/blocklist/127.0.0.1/32")).status_code == 204
        assert (await api.delete("/api/v1/blocklist/127.0.0.1/32")).status_code == 404
        (await greeted(ing.port("mx"))).close()
        await ing2.blocklist.refresh()
        (await greeted(ing2.port("mx"))).close()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as anon:
        assert (await anon.get("/api/v1/sessions")).status_code == 401


async def test_metrics_count_outcomes(ing: RunningIngress, inbox: Inbox) -> None:
    def send() -> None:
        with smtplib.SMTP("127.0.0.1", ing.port("mx"), timeout=10) as s:
            s.sendmail("bob@example.net", ["alice@example.test"], BODY)

    await asyncio.to_thread(send)
    await inbox.get()
    text = generate_latest().decode()
    assert 'postbus_smtp_messages_total{listener="mx",outcome="accepted",reason="ok"}' in text
    assert "postbus_smtp_accept_seconds_bucket" in text
    assert 'postbus_smtp_connections_total{listener="mx",outcome="accepted"}' in text
    assert "postbus_smtp_received_bytes_total" in text


async def test_postmaster_without_domain_and_graceful_stop(start: Start, inbox: Inbox) -> None:
    ing = await start()
    ing.table.domains.add("localhost")
    ing.table.users["postmaster@localhost"] = User("x")
    c = await greeted(ing.port("mx"))
    assert (await c.cmd("MAIL FROM:<>"))[0] == 250
    assert (await c.cmd("RCPT TO:<Postmaster>"))[0] == 250
    assert (await c.cmd("DATA"))[0] == 354
    idle = await greeted(ing.port("mx"))
    stopping = asyncio.create_task(ing.ingress.stop(grace_s=5))
    code, lines = await idle.reply()
    assert (code, lines[-1][:5]) == (421, "4.3.2")  # idle sessions are told at once
    await c.send(BODY + b".\r\n")  # the message in flight is still taken
    code, lines = await c.reply()
    assert code == 250
    code, lines = await c.reply()
    assert (code, lines[-1][:5]) == (421, "4.3.2")
    await stopping
    msg = await inbox.get()
    assert msg.mail_from == "" and msg.rcpt_to[0].address == "postmaster@localhost"


def test_trusted_networks_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTBUS_TRUSTED_NETWORKS", "10.0.0.0/8, 192.0.2.7")
    assert Settings().common.trusted_networks == ["10.0.0.0/8", "192.0.2.7"]
    monkeypatch.setenv("POSTBUS_TRUSTED_NETWORKS", '["2001:db8::/32"]')
    assert Settings().common.trusted_networks == ["2001:db8::/32"]
    # mime-processor reads the same variable, so the two decisions cannot disagree
    from postbus.mime_processor.settings import Settings as MimeSettings

    assert MimeSettings().common.trusted_networks == ["2001:db8::/32"]


async def test_random_junk_never_breaks_the_server(ing: RunningIngress, inbox: Inbox) -> None:
    import random

    rnd = random.Random(5321)
    prefixes = [b"", b"EHLO x\r\n", b"EHLO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n",
                b"EHLO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<alice@example.test>\r\nBDAT 50\r\n"]
    for i in range(24):
        junk = bytes(rnd.getrandbits(8) for _ in range(rnd.randint(1, 3000)))
        if i % 3 == 0:
            junk = junk.replace(b"\r\n.\r\n", b"")
        c = await Raw.open(ing.port("mx"))
        await c.reply()
        await c.send(rnd.choice(prefixes) + junk + b"\r\nQUIT\r\n")
        try:
            await asyncio.wait_for(c.r.read(), 0.4)  # whatever it answers, it answers and lives
        except (ConnectionError, TimeoutError):
            pass
        c.close()
    c = await greeted(ing.port("mx"))
    assert (await c.cmd("NOOP"))[0] == 250
    assert await inbox.empty_for(0.3)


async def test_per_ip_limits_hold_across_replicas(start: Start) -> None:
    a = await start(max_connections_per_ip=2, connection_rate_per_ip=4)
    b = await start(max_connections_per_ip=2, connection_rate_per_ip=4)
    assert a.share is not None and b.share is not None
    c1 = await greeted(a.port("mx"))
    c2 = await greeted(b.port("mx"))
    # one exchange each way through NATS KV (the service does it every second)
    await a.share.exchange(a.ingress.load_snapshot())
    await b.share.exchange(b.ingress.load_snapshot())
    await a.share.exchange(a.ingress.load_snapshot())
    assert a.share.remote("127.0.0.1") == (1, 1)
    c3 = await Raw.open(a.port("mx"))
    code, lines = await c3.reply()
    assert (code, lines[-1][:5]) == (421, "4.7.0")  # 1 here + 1 on the other replica
    for c in (c1, c2):
        c.close()
    await settle(lambda: not a.ingress.per_ip and not b.ingress.per_ip)
    await b.share.exchange(b.ingress.load_snapshot())
    await a.share.exchange(a.ingress.load_snapshot())
    assert a.share.remote("127.0.0.1") == (0, 1)
    (await greeted(a.port("mx"))).close()  # 4th connection in the minute over both replicas
    await settle(lambda: not a.ingress.per_ip)
    c5 = await Raw.open(a.port("mx"))
    code, lines = await c5.reply()
    assert (code, lines[-1][:5]) == (421, "4.7.0")  # rate: 3 here + 1 there
    assert a.ingress.stats.as_dict()["connection_refused"] == {"per_ip_limit": 1, "rate_limit": 1}


async def test_starttls_command_injection_is_discarded(ing: RunningIngress) -> None:
    """CVE-2011-0411 style: plaintext pipelined after STARTTLS must not run inside TLS."""
    c = await greeted(ing.port("submission"))
    await c.send(b"STARTTLS\r\nRSET\r\nNOOP\r\n")
    code, _ = await c.reply()
    assert code == 220
    await inside_tls(c, ing)


async def test_reverse_dns_in_client_info_and_received(start: Start, inbox: Inbox) -> None:
    ing = await start(reverse_dns=True)
    c = await greeted(ing.port("mx"))
    await start_data(c)
    await c.send(BODY + b".\r\n")
    assert (await c.reply())[0] == 250
    msg = await inbox.get()
    assert msg.client.reverse_dns == "localhost"  # 127.0.0.1 -> localhost -> 127.0.0.1
    assert b"from c.example.net (localhost [127.0.0.1])" in msg.body.inline  # type: ignore[operator]
    c.close()


# ---------------------------------------------------------------- issue 8, low items
async def submitter(ing: RunningIngress) -> Raw:
    c = await greeted(ing.port("submission"))
    await c.starttls(ing.client_tls())
    await ehlo_lines(c)
    code, _ = await c.cmd("AUTH PLAIN " + base64.b64encode(b"\0alice@example.test\0secret").decode())
    assert code == 235
    return c


async def test_authenticated_relay_limits(ing: RunningIngress) -> None:
    c = await submitter(ing)
    assert (await c.cmd("MAIL FROM:<alice@example.test>"))[0] == 250
    for literal in ("[127.0.0.1]", "[169.254.169.254]", "[10.0.0.7]", "[IPv6:::1]"):
        code, text = await c.cmd(f"RCPT TO:<x@{literal}>")
        assert (code, text[:5]) == (550, "5.7.1"), literal
    assert (await c.cmd("RCPT TO:<x@[192.0.2.300]>"))[0] == 550  # not even an address
    assert (await c.cmd("RSET"))[0] == 250
    assert (await c.cmd("MAIL FROM:<>"))[0] == 250
    code, text = await c.cmd("RCPT TO:<friend@remote.example>")
    assert (code, text[:5]) == (550, "5.7.1")  # the null sender may not relay
    assert (await c.cmd("RCPT TO:<alice@example.test>"))[0] == 250  # but may deliver locally
    c.close()


async def test_over_long_auth_line_is_answered_and_closed(ing: RunningIngress) -> None:
    c = await greeted(ing.port("submission"))
    await c.starttls(ing.client_tls())
    await ehlo_lines(c)
    assert (await c.cmd("AUTH PLAIN"))[0] == 334
    await c.send(b"A" * 200_000)  # no line end: the answer must not wait for one
    code, lines = await c.reply(timeout=10)
    assert (code, lines[-1][:5]) == (500, "5.5.6") and await c.closed()


async def test_smtps_refused_before_the_handshake(start: Start) -> None:
    ing = await start(max_connections_per_ip=1)
    first = await Raw.open(ing.port("smtps"), ing.client_tls())
    assert (await first.reply())[0] == 220
    # before: the handshake completed (CPU spent on anyone), then 421 inside TLS
    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
        await Raw.open(ing.port("smtps"), ing.client_tls())
    first.close()


async def test_hosted_sender_policy(start: Start) -> None:
    ing = await start(reject_unauthenticated_local_senders=True)
    c = await greeted(ing.port("mx"))
    code, text = await c.cmd("MAIL FROM:<alice@example.test>")
    assert (code, text[:5]) == (550, "5.7.1")
    assert (await c.cmd("MAIL FROM:<someone@elsewhere.example>"))[0] == 250
    c.close()


async def test_plaintext_that_arrives_while_starttls_waits_is_discarded(start: Start) -> None:
    """RFC 3207 §4.2 when the injected plaintext comes in its own packet while an earlier
    command of the group is still being answered (here MAIL FROM, held by the in-flow
    delay): it lands in the stream's buffer, not the receiver's, and must not run inside
    TLS either."""
    ing = await start(flow_backlog_threshold=1, flow_delay_per_message_s=0.3,
                      flow_delay_max_s=0.3, flow_poll_s=3600)
    c = await greeted(ing.port("mx"))
    ing.ingress.queue_depth = 1000  # the watch polls again in an hour
    await c.send(b"MAIL FROM:<bob@example.net>\r\nSTARTTLS\r\n")
    await asyncio.sleep(0.1)  # MAIL FROM is being held
    await c.send(b"RSET\r\nNOOP\r\n")
    assert [(await c.reply())[0] for _ in range(2)] == [250, 220]
    await inside_tls(c, ing)
