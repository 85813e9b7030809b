"""The relay against real aiosmtpd servers (port 0) reached through the transport map, a
real nats-server and a real SeaweedFS: delivery, retries, bounces, expiry, DSN parameters,
STARTTLS, failures reported by other services, the management API, and DNS routing via a
tiny local DNS responder."""

from __future__ import annotations

import asyncio
import email
import email.policy
import ssl
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import httpx
import pytest
import pytest_asyncio
from aiosmtpd.smtp import SMTP

from postbus.kit.blob import BlobStore
from postbus.kit.bus import Ack, Bus, Delivery
from postbus.kit.mgmt import create_app
from postbus.kit.settings import CommonSettings
from postbus.kit.testing import ADMIN_TOKEN, RunningNats
from postbus.kit.tls import self_signed, server_context
from postbus.proto.mail import (
    DELIVERY_EVENT,
    MAIL_RECEIVED,
    OUTBOUND_QUEUED,
    DeliveryEvent,
    MailReceived,
    OutboundQueued,
    Recipient,
)
from postbus.relay import service
from postbus.relay.adapters import DnsDestinations
from postbus.relay.mgmt import router
from postbus.relay.policy import Hop
from postbus.relay.ports import NoRoute, Route
from postbus.relay.settings import Settings
from postbus.relay.worker import RelayWorker

pytestmark = pytest.mark.timeout(60)

BODY = (b"From: Bob <bob@example.test>\r\nTo: carol@example.net\r\nSubject: hello relay\r\n"
        b"Message-ID: <r1@example.test>\r\n\r\nLine one\r\n.starts with a dot\r\nend\r\n")


# ---------------------------------------------------------------- a remote MX (aiosmtpd)
@dataclass
class Got:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    mail_options: list[str]
    tls: bool


@dataclass
class Remote:
    """One aiosmtpd server on port 0 in the test's loop, with scripted replies."""

    dsn: bool = False
    tls: ssl.SSLContext | None = None
    size_limit: int = 10 * 1024 * 1024
    rcpt_script: dict[str, list[str]] = field(default_factory=dict)  # address -> replies
    rcpt_hold: asyncio.Event | None = None  # RCPT waits for this (once)
    messages: list[Got] = field(default_factory=list)
    rcpt_options: dict[str, list[str]] = field(default_factory=dict)
    dsn_seen: list[tuple[str, str]] = field(default_factory=list)
    rcpt_waiting: asyncio.Event = field(default_factory=asyncio.Event)
    drop_after_data: bool = False  # close the session after each message
    busy_421: bool = False  # a second MAIL in one session gets 421 (idle timeout)
    pipelining: bool = True  # advertise PIPELINING (aiosmtpd reads commands in order anyway)
    data_delay_s: float = 0.0  # handle_DATA takes this long
    active: int = 0  # DATA handlers running now
    max_active: int = 0
    ehlos: int = 0
    port: int = 0
    server: asyncio.base_events.Server | None = None

    async def start(self) -> Remote:
        remote = self

        class Handler:
            async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str,
                                  responses: list[str]) -> list[str]:
                session.host_name = hostname
                remote.ehlos += 1
                if remote.dsn:
                    responses.insert(-1, "250-DSN")
                if remote.pipelining:
                    responses.insert(-1, "250-PIPELINING")
                return responses

            async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                                  mail_options: list[str]) -> str:
                if remote.busy_421 and getattr(session, "had_mail", False):
                    return "421 4.4.2 mx.example.net idle too long, closing"
                session.had_mail = True
                envelope.mail_from = address
                envelope.mail_options.extend(mail_options)
                return "250 2.1.0 OK"

            async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                                  rcpt_options: list[str]) -> str:
                if remote.rcpt_hold is not None:
                    hold, remote.rcpt_hold = remote.rcpt_hold, None
                    remote.rcpt_waiting.set()
                    await hold.wait()
                    return "451 4.3.0 try later"
                script = remote.rcpt_script.get(address)
                if script:
                    reply = script.pop(0)
                    if not reply.startswith("250"):
                        return reply
                envelope.rcpt_tos.append(address)
                remote.rcpt_options[address] = list(rcpt_options)
                return "250 2.1.5 OK"

            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                remote.active += 1
                remote.max_active = max(remote.max_active, remote.active)
                try:
                    await asyncio.sleep(remote.data_delay_s)
                finally:
                    remote.active -= 1
                remote.messages.append(Got(envelope.mail_from, list(envelope.rcpt_tos),
                                           envelope.original_content, list(envelope.mail_options),
                                           session.ssl is not None))
                if remote.drop_after_data:
                    asyncio.get_running_loop().call_later(0.02, server.transport.close)
                return "250 2.0.0 Ok: queued as X1"

        class DsnSMTP(SMTP):
            def _getparams(self, params: Any) -> Any:
                result = super()._getparams(params)
                if result is not None and remote.dsn:
                    for k in ("NOTIFY", "ORCPT", "RET", "ENVID"):
                        if k in result:
                            remote.dsn_seen.append((k, str(result.pop(k))))
                return result

        def factory() -> SMTP:
            return DsnSMTP(Handler(), hostname="mx.example.net", decode_data=False,
                           enable_SMTPUTF8=True, data_size_limit=self.size_limit,
                           tls_context=self.tls, require_starttls=False)

        self.server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


# ---------------------------------------------------------------- fixtures and helpers
def relay_settings(common: CommonSettings, tmap: str, **kw: Any) -> Settings:
    base: dict[str, Any] = dict(
        common=common, transport_map=tmap, hostname="relay.example.test",
        retry_schedule="0.5", max_age_s=3600, ack_wait_s=5, lease_s=5, connect_timeout_s=2,
        command_timeout_s=5, data_timeout_s=5, concurrency=4, queue_gauge_interval_s=1)
    base.update(kw)
    return Settings(**base)


@pytest_asyncio.fixture
async def remotes() -> AsyncIterator[list[Remote]]:
    made: list[Remote] = []
    yield made
    for r in made:
        await r.stop()


async def new_remote(made: list[Remote], **kw: Any) -> Remote:
    r = await Remote(**kw).start()
    made.append(r)
    return r


async def enqueue(bus: Bus, blobs: BlobStore, rcpts: list[Recipient | str], *,
                  mail_from: str = "bob@example.test", body: bytes = BODY,
                  **kw: Any) -> OutboundQueued:
    key = await blobs.put(body)
    job = OutboundQueued(
        queue_id="Q" + uuid.uuid4().hex[:12].upper(), mail_from=mail_from,
        recipients=[r if isinstance(r, Recipient) else Recipient(address=r) for r in rcpts],
        blob_key=key, size=len(body), queued_at=datetime.now(UTC), **kw)
    await bus.publish(OUTBOUND_QUEUED, job, msg_id=f"{job.queue_id}:out")
    return job


class Inbox:
    """MAIL_RECEIVED as mime-processor would see it: where injected DSNs land."""

    def __init__(self, bus: Bus) -> None:
        self.mails: list[MailReceived] = []

        async def on_mail(d: Delivery[MailReceived]) -> Ack:
            self.mails.append(d.data)
            return Ack()

        bus.consume(MAIL_RECEIVED, on_mail, durable="test-inbox")


async def until(pred: Any, timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        got = pred()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def events(worker: RelayWorker, qid: str) -> list[DeliveryEvent]:
    return await worker.history(qid)


async def first_event(worker: RelayWorker, qid: str, kind: str) -> DeliveryEvent:
    """Wait until ``qid``'s history has an event of ``kind``; the first such event."""

    async def of_kind() -> list[DeliveryEvent]:
        return [e for e in await events(worker, qid) if e.kind == kind]

    await until(of_kind)
    return (await of_kind())[0]


def parse(raw: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(raw, policy=email.policy.default)  # type: ignore[return-value]


def dsn_of(mail: MailReceived) -> email.message.EmailMessage:
    assert mail.body.inline is not None
    return parse(mail.body.inline)


# ---------------------------------------------------------------- tests
async def test_delivered_to_two_domains_with_events(bus: Bus, blobs: BlobStore,
                                                    common_settings: CommonSettings,
                                                    remotes: list[Remote]) -> None:
    a = await new_remote(remotes)
    b = await new_remote(remotes)
    s = relay_settings(common_settings, f"example.net=127.0.0.1:{a.port},*=127.0.0.1:{b.port}")
    worker = await service.start(s, bus, blobs)
    job = await enqueue(bus, blobs, ["carol@example.net", "dave@example.net", "erin@other.org"],
                        body_type="8BITMIME")
    await until(lambda: len(a.messages) == 1 and len(b.messages) == 1)
    got = a.messages[0]
    assert got.mail_from == "bob@example.test"
    assert got.rcpt_tos == ["carol@example.net", "dave@example.net"]
    assert got.data == BODY  # dot-stuffing undone by the server: bytes intact
    assert f"SIZE={len(BODY)}" in got.mail_options and "BODY=8BITMIME" in got.mail_options
    assert b.messages[0].rcpt_tos == ["erin@other.org"]

    async def relayed() -> bool:
        return len([e for e in await events(worker, job.queue_id) if e.kind == "relayed"]) == 3

    await until(relayed)
    evs = [e for e in await events(worker, job.queue_id) if e.kind == "relayed"]
    assert all(e.service == "relay" and e.remote_mta == "127.0.0.1" for e in evs)
    assert all(e.detail.startswith("250 2.0.0") and e.status == "2.0.0" for e in evs)
    got_entry = await worker.load(job.queue_id)
    assert got_entry is not None and got_entry[0].done and not got_entry[0].outbox
    await asyncio.sleep(0.5)
    assert len(a.messages) == 1 and len(b.messages) == 1


async def test_4xx_then_success_on_retry_without_duplicates(
        bus: Bus, blobs: BlobStore, common_settings: CommonSettings,
        remotes: list[Remote]) -> None:
    r = await new_remote(remotes, rcpt_script={"dave@example.net": ["450 4.2.0 mailbox busy"]})
    worker = await service.start(relay_settings(common_settings, f"*=127.0.0.1:{r.port}"),
                                 bus, blobs)
    job = await enqueue(bus, blobs, ["carol@example.net", "dave@example.net"])
    await until(lambda: len(r.messages) == 2, 20)
    assert [m.rcpt_tos for m in r.messages] == [["carol@example.net"], ["dave@example.net"]]

    async def kinds() -> list[tuple[str | None, str]]:
        return [(e.recipient, e.kind) for e in await events(worker, job.queue_id)]

    await until(lambda: _has(kinds(), ("dave@example.net", "relayed")))
    got = await kinds()
    assert got.count(("carol@example.net", "relayed")) == 1
    assert ("dave@example.net", "deferred") in got
    deferred = [e for e in await events(worker, job.queue_id) if e.kind == "deferred"]
    assert deferred[0].next_attempt_at is not None and deferred[0].status == "4.2.0"
    await asyncio.sleep(1.2)  # a further attempt would show up here
    assert len(r.messages) == 2
    entry = await worker.load(job.queue_id)
    assert entry is not None and entry[0].attempts == 2 and entry[0].done


async def _has(coro: Any, item: Any) -> bool:
    return item in await coro


async def test_5xx_bounces_as_multipart_report(bus: Bus, blobs: BlobStore,
                                               common_settings: CommonSettings,
                                               remotes: list[Remote]) -> None:
    r = await new_remote(remotes, dsn=True,
                         rcpt_script={"nobody@example.net": ["550 5.1.1 <nobody@example.net>: no such user"]})
    worker = await service.start(relay_settings(common_settings, f"*=127.0.0.1:{r.port}"),
                                 bus, blobs)
    inbox = Inbox(bus)
    job = await enqueue(
        bus, blobs,
        [Recipient(address="nobody@example.net", notify=["FAILURE"], orcpt="rfc822;Nobody@example.net"),
         Recipient(address="carol@example.net", notify=["SUCCESS", "FAILURE"],
                   orcpt="rfc822;c+x@example.net")],
        dsn_envid="ENV 42", dsn_ret="HDRS")
    await until(lambda: len(inbox.mails) == 1 and len(r.messages) == 1)
    # DSN parameters passed to a server that advertises DSN (RFC 3461), xtext-encoded
    assert ("RET", "HDRS") in r.dsn_seen and ("ENVID", "ENV+2042") in r.dsn_seen
    assert r.rcpt_options["carol@example.net"] == ["NOTIFY=SUCCESS,FAILURE", "ORCPT=RFC822;C+2BX@EXAMPLE.NET"]
    mail = inbox.mails[0]
    assert mail.mail_from == "" and [x.address for x in mail.rcpt_to] == ["bob@example.test"]
    assert mail.client.listener == "api" and mail.queue_id.startswith("DSN")
    assert mail.client.auth_user == "MAILER-DAEMON@relay.example.test"  # may go to remote senders
    msg = dsn_of(mail)
    assert msg.get_content_type() == "multipart/report"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]
    per_msg, per_rcpt = parts[1].get_payload()
    assert per_msg["Reporting-MTA"] == "dns; relay.example.test"
    assert per_msg["Original-Envelope-Id"] == "ENV 42"
    assert per_msg["Arrival-Date"]
    assert per_rcpt["Final-Recipient"] == "rfc822; nobody@example.net"
    assert per_rcpt["Original-Recipient"] == "rfc822;Nobody@example.net"
    assert per_rcpt["Action"] == "failed" and per_rcpt["Status"] == "5.1.1"
    assert per_rcpt["Remote-MTA"] == "dns; 127.0.0.1"
    assert "no such user" in per_rcpt["Diagnostic-Code"]
    assert per_rcpt["Last-Attempt-Date"]
    assert b"Subject: hello relay" in parts[2].get_payload(decode=True)

    async def kinds() -> list[tuple[str | None, str]]:
        return [(e.recipient, e.kind) for e in await events(worker, job.queue_id)]

    await until(lambda: _has(kinds(), ("nobody@example.net", "bounced")))
    got = await kinds()
    assert ("nobody@example.net", "failed") in got and ("carol@example.net", "relayed") in got
    await asyncio.sleep(0.5)
    assert len(inbox.mails) == 1  # the server took DSN duty for SUCCESS: no relayed DSN


async def test_notify_success_to_a_server_without_dsn_gets_a_relayed_dsn(
        bus: Bus, blobs: BlobStore, common_settings: CommonSettings,
        remotes: list[Remote]) -> None:
    r = await new_remote(remotes)  # no DSN extension: we report "relayed" ourselves
    await service.start(relay_settings(common_settings, f"*=127.0.0.1:{r.port}"), bus, blobs)
    inbox = Inbox(bus)
    await enqueue(bus, blobs, [Recipient(address="carol@example.net", notify=["SUCCESS"]),
                               Recipient(address="dave@example.net")])
    await until(lambda: len(inbox.mails) == 1 and len(r.messages) == 1)
    msg = dsn_of(inbox.mails[0])
    assert msg["Subject"].startswith("Successful Mail Delivery Report")
    blocks = list(msg.iter_parts())[1].get_payload()
    assert len(blocks) == 2  # only the recipient that asked
    assert blocks[1]["Action"] == "relayed" and blocks[1]["Status"] == "2.0.0"
    assert blocks[1]["Final-Recipient"] == "rfc822; carol@example.net"
    assert r.rcpt_options["carol@example.net"] == []  # no NOTIFY to a server without DSN
    await asyncio.sleep(0.5)
    assert len(inbox.mails) == 1


async def test_no_bounce_for_a_bounce_or_notify_never(bus: Bus, blobs: BlobStore,
                                                      common_settings: CommonSettings,
                                                      remotes: list[Remote]) -> None:
    r = await new_remote(remotes, rcpt_script={
        "x@example.net": ["550 5.1.1 no"], "y@example.net": ["550 5.1.1 no"]})
    worker = await service.start(relay_settings(common_settings, f"*=127.0.0.1:{r.port}"),
                                 bus, blobs)
    inbox = Inbox(bus)
    j1 = await enqueue(bus, blobs, ["x@example.net"], mail_from="")
    j2 = await enqueue(bus, blobs, [Recipient(address="y@example.net", notify=["NEVER"])])

    async def failed(qid: str) -> bool:
        return any(e.kind == "failed" for e in await events(worker, qid))

    await until(lambda: failed(j1.queue_id))
    await until(lambda: failed(j2.queue_id))
    await asyncio.sleep(0.5)
    assert inbox.mails == []


async def test_retries_expire_then_bounce_and_one_delay_dsn(
        bus: Bus, blobs: BlobStore, common_settings: CommonSettings,
        remotes: list[Remote]) -> None:
    r = await new_remote(remotes, rcpt_script={"slow@example.net": ["451 4.4.0 later"] * 100})
    s = relay_settings(common_settings, f"*=127.0.0.1:{r.port}", retry_schedule="0.3",
                       max_age_s=2.0, delay_dsn_after_s=0.2)
    worker = await service.start(s, bus, blobs)
    inbox = Inbox(bus)
    job = await enqueue(bus, blobs, [Recipient(address="slow@example.net",
                                               notify=["DELAY", "FAILURE"])], dsn_ret="FULL")
    await until(lambda: len(inbox.mails) == 2, 20)
    delayed, failed = (dsn_of(m) for m in inbox.mails)
    assert delayed["Subject"].startswith("Delayed Mail")
    d_rcpt = list(delayed.iter_parts())[1].get_payload()[1]
    assert d_rcpt["Action"] == "delayed" and d_rcpt["Will-Retry-Until"]
    assert failed["Subject"].startswith("Undelivered Mail")
    parts = list(failed.iter_parts())
    f_rcpt = parts[1].get_payload()[1]
    # RFC 3463 X.4.7: delivery time expired; the last remote reply is the diagnostic
    assert f_rcpt["Action"] == "failed" and f_rcpt["Status"] == "4.4.7"
    assert "retries expired" in f_rcpt["Diagnostic-Code"] and "4.4.0 later" in f_rcpt["Diagnostic-Code"]
    assert parts[2].get_content_type() == "message/rfc822"  # RET=FULL
    entry = await worker.load(job.queue_id)
    assert entry is not None and entry[0].done and entry[0].attempts >= 3
    evs = await events(worker, job.queue_id)
    assert [e.kind for e in evs].count("failed") == 1
    assert [e.kind for e in evs].count("deferred") == entry[0].attempts - 1
    await asyncio.sleep(0.8)
    assert len(inbox.mails) == 2


async def test_connection_refused_defers_and_unknown_transport_never_crashes(
        bus: Bus, blobs: BlobStore, common_settings: CommonSettings) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    s = relay_settings(common_settings, f"*=127.0.0.1:{dead}", retry_schedule="30")
    worker = await service.start(s, bus, blobs)
    job = await enqueue(bus, blobs, ["carol@example.net"])

    ev = await first_event(worker, job.queue_id, "deferred")
    assert ev.status == "4.4.1" and "connect to" in ev.detail
    assert ev.next_attempt_at is not None


async def test_starttls_is_used_when_offered(bus: Bus, blobs: BlobStore,
                                             common_settings: CommonSettings,
                                             remotes: list[Remote], tmp_path: Path) -> None:
    self_signed(tmp_path / "c.pem", tmp_path / "k.pem", "mx.example.net")
    r = await new_remote(remotes, tls=server_context(tmp_path / "c.pem", tmp_path / "k.pem"))
    await service.start(relay_settings(common_settings, f"*=127.0.0.1:{r.port}"), bus, blobs)
    await enqueue(bus, blobs, ["carol@example.net"])
    await until(lambda: len(r.messages) == 1)
    assert r.messages[0].tls  # self-signed: not verified by default (opportunistic)


async def test_sessions_are_reused_and_a_dropped_one_is_replaced(
        bus: Bus, blobs: BlobStore, common_settings: CommonSettings,
        remotes: list[Remote]) -> None:
    keep = await new_remote(remotes)
    drop = await new_remote(remotes, drop_after_data=True)
    s = relay_settings(common_settings,
                       f"keep.test=127.0.0.1:{keep.port},drop.test=127.0.0.1:{drop.port}",
                       concurrency=1, connection_cache_s=5)
    await service.start(s, bus, blobs)
    for i in range(3):
        await enqueue(bus, blobs, [f"k{i}@keep.test"])
        await until(lambda i=i: len(keep.messages) == i + 1)
    assert keep.ehlos == 1  # one session carried all three
    for i in range(3):
        await enqueue(bus, blobs, [f"d{i}@drop.test"])
        await until(lambda i=i: len(drop.messages) == i + 1)
        await asyncio.sleep(0.1)  # the server hangs up after each message
    assert drop.ehlos == 3 and len(drop.messages) == 3


async def test_a_cached_session_refused_with_421_is_replaced_without_deferral(
        bus: Bus, blobs: BlobStore, common_settings: CommonSettings,
        remotes: list[Remote]) -> None:
    r = await new_remote(remotes, busy_421=True)
    s = relay_settings(common_settings, f"*=127.0.0.1:{r.port}", concurrency=1,
                       connection_cache_s=5)
    worker = await service.start(s, bus, blobs)
    j1 = await enqueue(bus, blobs, ["a@example.net"])
    await until(lambda: len(r.messages) == 1)
    j2 = await enqueue(bus, blobs, ["b@example.net"])
    await until(lambda: len(r.messages) == 2)
    assert r.ehlos == 2
    for j in (j1, j2):
        kinds = [e.kind for e in await events(worker, j.queue_id)]
        assert "deferred" not in kinds


class RawSmtp(asyncio.Protocol):
    """A scripted SMTP server that records how the bytes arrive and answers each command
    in its own TCP write, a millisecond apart (replies to a pipelined group trickle in)."""

    def __init__(self, log: dict[str, Any], pipelining: bool) -> None:
        self.log, self.pipelining = log, pipelining
        self.buf = b""
        self.in_data = False
        self.replies = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t: asyncio.WriteTransport = transport  # type: ignore[assignment]
        self.t.write(b"220 raw.example ESMTP\r\n")

    def reply(self, text: bytes) -> None:
        self.replies += 1
        asyncio.get_running_loop().call_later(0.001 * self.replies, self.t.write, text)

    def data_received(self, data: bytes) -> None:
        if not self.in_data:
            self.log["chunks"].append(data)
        self.buf += data
        while b"\r\n" in self.buf:
            line, self.buf = self.buf.split(b"\r\n", 1)
            if self.in_data:
                if line == b".":
                    self.in_data = False
                    self.log["messages"] += 1
                    self.reply(b"250 2.0.0 ok\r\n")
                continue
            verb = line[:4].upper()
            if verb == b"EHLO":
                caps = b"250-PIPELINING\r\n" if self.pipelining else b""
                self.reply(b"250-raw.example\r\n" + caps + b"250 8BITMIME\r\n")
            elif verb == b"MAIL":
                self.reply(b"250 2.1.0 ok\r\n")
            elif verb == b"RCPT":
                self.reply(b"550 5.1.1 no such user\r\n" if b"bad" in line
                           else b"250 2.1.5 ok\r\n")
            elif verb == b"DATA":
                self.in_data = True
                self.reply(b"354 go ahead\r\n")
            elif verb == b"QUIT":
                self.t.write(b"221 bye\r\n")
                self.t.close()
            else:
                self.reply(b"250 ok\r\n")


@pytest.mark.parametrize("offered", [True, False])
async def test_pipelining_when_offered_lockstep_otherwise(
        offered: bool, bus: Bus, blobs: BlobStore, common_settings: CommonSettings) -> None:
    log: dict[str, Any] = {"chunks": [], "messages": 0}
    server = await asyncio.get_running_loop().create_server(
        lambda: RawSmtp(log, offered), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        worker = await service.start(relay_settings(common_settings, f"*=127.0.0.1:{port}"),
                                     bus, blobs)
        job = await enqueue(bus, blobs, ["a@example.net", "bad@example.net", "c@example.net"])

        async def outcomes() -> dict[str | None, str]:
            return {e.recipient: e.kind for e in await events(worker, job.queue_id)
                    if e.kind in ("relayed", "failed")}

        await until(lambda: _eq(outcomes(), {"a@example.net": "relayed",
                                             "bad@example.net": "failed",
                                             "c@example.net": "relayed"}))
        assert log["messages"] == 1
        envelope_chunks = [c for c in log["chunks"] if b"MAIL FROM" in c or b"RCPT TO" in c]
        if offered:  # RFC 2920: MAIL and every RCPT in one write
            assert len(envelope_chunks) == 1
            assert envelope_chunks[0].count(b"RCPT TO") == 3
        else:
            assert len(envelope_chunks) == 4
            assert all(c.count(b"\r\n") == 1 for c in envelope_chunks)
    finally:
        server.close()


async def test_destination_concurrency_limit(bus: Bus, blobs: BlobStore,
                                             common_settings: CommonSettings,
                                             remotes: list[Remote]) -> None:
    r = await new_remote(remotes, data_delay_s=0.2)
    s = relay_settings(common_settings, f"*=127.0.0.1:{r.port}", concurrency=8,
                       destination_concurrency=2)
    await service.start(s, bus, blobs)
    for i in range(6):
        await enqueue(bus, blobs, [f"u{i}@example.net"])
    await until(lambda: len(r.messages) == 6)
    assert r.max_active == 2


async def test_tls_verify_refuses_a_self_signed_certificate(
        bus: Bus, blobs: BlobStore, common_settings: CommonSettings, remotes: list[Remote],
        tmp_path: Path) -> None:
    self_signed(tmp_path / "c.pem", tmp_path / "k.pem", "mx.example.net")
    r = await new_remote(remotes, tls=server_context(tmp_path / "c.pem", tmp_path / "k.pem"))
    s = relay_settings(common_settings, f"*=127.0.0.1:{r.port}", tls_verify=True,
                       retry_schedule="30")
    worker = await service.start(s, bus, blobs)
    job = await enqueue(bus, blobs, ["carol@example.net"])

    ev = await first_event(worker, job.queue_id, "deferred")
    assert ev.status == "4.7.0" and "STARTTLS" in ev.detail
    assert r.messages == []  # no fallback to clear text when verification is asked for


async def test_tls_required_defers_when_not_offered(bus: Bus, blobs: BlobStore,
                                                    common_settings: CommonSettings,
                                                    remotes: list[Remote]) -> None:
    r = await new_remote(remotes)
    s = relay_settings(common_settings, f"*=127.0.0.1:{r.port}", tls_required=True,
                       retry_schedule="30")
    worker = await service.start(s, bus, blobs)
    job = await enqueue(bus, blobs, ["carol@example.net"])

    assert (await first_event(worker, job.queue_id, "deferred")).status == "4.7.5"
    assert r.messages == []


async def test_size_limit_and_smtputf8_are_permanent(bus: Bus, blobs: BlobStore,
                                                     common_settings: CommonSettings,
                                                     remotes: list[Remote]) -> None:
    r = await new_remote(remotes, size_limit=50)
    worker = await service.start(relay_settings(common_settings, f"*=127.0.0.1:{r.port}"),
                                 bus, blobs)
    job = await enqueue(bus, blobs, ["carol@example.net"])

    assert (await first_event(worker, job.queue_id, "failed")).status == "5.3.4"

    r.size_limit = 10_000_000
    binary = await enqueue(bus, blobs, ["carol@example.net"], body=b"Subject: b\r\n\r\n\0\r\n",
                           body_type="BINARYMIME")

    assert (await first_event(worker, binary.queue_id, "failed")).status == "5.6.3"
    assert r.messages == []


async def test_failures_of_other_services_are_bounced_once(bus: Bus, blobs: BlobStore,
                                                           common_settings: CommonSettings) -> None:
    worker = await service.start(relay_settings(common_settings, ""), bus, blobs)
    inbox = Inbox(bus)
    key = await blobs.put(BODY)
    ev = DeliveryEvent(queue_id="QSTORE1", kind="failed", recipient="alice@example.test",
                       at=datetime.now(UTC), service="mailbox-store", status="5.2.2",
                       detail="mailbox full", mail_from="bob@example.net", blob_key=key,
                       notify=["FAILURE"], dsn_envid="E1")
    await bus.publish(DELIVERY_EVENT, ev, msg_id="a", queue_id="QSTORE1", kind="failed")
    await bus.publish(DELIVERY_EVENT, ev, msg_id="b", queue_id="QSTORE1", kind="failed")  # again
    own = ev.model_copy(update={"service": "relay", "recipient": "x@example.test"})
    await bus.publish(DELIVERY_EVENT, own, msg_id="c", queue_id="QSTORE1", kind="failed")
    never = ev.model_copy(update={"recipient": "n@example.test", "notify": ["NEVER"]})
    await bus.publish(DELIVERY_EVENT, never, msg_id="d", queue_id="QSTORE1", kind="failed")
    from datetime import timedelta

    stale = ev.model_copy(update={"recipient": "old@example.test",
                                  "at": datetime.now(UTC) - timedelta(hours=2)})
    await bus.publish(DELIVERY_EVENT, stale, msg_id="e", queue_id="QSTORE1", kind="failed")
    await until(lambda: len(inbox.mails) == 1)
    msg = dsn_of(inbox.mails[0])
    rcpt = list(msg.iter_parts())[1].get_payload()[1]
    assert rcpt["Final-Recipient"] == "rfc822; alice@example.test"
    assert rcpt["Status"] == "5.2.2" and "mailbox full" in rcpt["Diagnostic-Code"]
    assert inbox.mails[0].rcpt_to[0].address == "bob@example.net"

    async def bounced() -> bool:
        return any(e.kind == "bounced" for e in await events(worker, "QSTORE1"))

    await until(bounced)
    await asyncio.sleep(1.0)
    assert len(inbox.mails) == 1


async def test_management_api_queue_retry_and_cancel(bus: Bus, blobs: BlobStore,
                                                     common_settings: CommonSettings,
                                                     remotes: list[Remote]) -> None:
    r = await new_remote(remotes, rcpt_script={"carol@example.net": ["451 4.3.0 later"] * 1,
                                               "dave@example.net": ["451 4.3.0 later"] * 100})
    s = relay_settings(common_settings, f"*=127.0.0.1:{r.port}", retry_schedule="1h")
    worker = await service.start(s, bus, blobs)
    inbox = Inbox(bus)
    job1 = await enqueue(bus, blobs, ["carol@example.net"])
    job2 = await enqueue(bus, blobs, ["dave@example.net"])
    app = create_app("relay", checks={}, routers=[router(worker)], token_source=lambda: ADMIN_TOKEN)
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                                 headers=auth) as c:
        async def queued() -> list[dict[str, Any]]:
            resp = await c.get("/api/v1/queue")
            assert resp.status_code == 200
            return [i for i in resp.json() if i["attempts"] >= 1 and not i["in_progress"]]

        await until(lambda: _len_is(queued(), 2))
        items = {i["queue_id"]: i for i in await queued()}
        one = items[job1.queue_id]
        assert one["recipients"][0]["state"] == "pending"
        assert one["recipients"][0]["status"] == "4.3.0" and one["next_attempt_at"]
        # retry now: delivered long before the one-hour schedule
        resp = await c.post(f"/api/v1/queue/{job1.queue_id}/retry")
        assert resp.status_code == 202, resp.text
        await until(lambda: len(r.messages) == 1)
        assert r.messages[0].rcpt_tos == ["carol@example.net"]
        hist = (await c.get(f"/api/v1/queue/{job1.queue_id}/events")).json()
        assert [h["kind"] for h in hist] == ["deferred", "relayed"]
        assert (await c.get(f"/api/v1/queue/{job1.queue_id}")).json()["done"] is True
        assert (await c.post(f"/api/v1/queue/{job1.queue_id}/retry")).status_code == 409
        # cancel with a bounce
        resp = await c.delete(f"/api/v1/queue/{job2.queue_id}", params={"bounce": "true"})
        assert resp.status_code == 200 and resp.json()["cancelled"] is True
        await until(lambda: len(inbox.mails) == 1)
        assert "cancelled" in list(dsn_of(inbox.mails[0]).iter_parts())[1].get_payload()[1][
            "Diagnostic-Code"]
        assert (await c.get("/api/v1/queue")).json() == []
        assert len((await c.get("/api/v1/queue", params={"all": "true"})).json()) == 2
        assert (await c.get("/api/v1/queue/nope")).status_code == 404
        assert (await c.get("/api/v1/queue", headers={"Authorization": "Bearer x"})).status_code == 401
    assert await worker.refresh_gauge() == 0
    await asyncio.sleep(0.5)
    assert len(r.messages) == 1


async def _len_is(coro: Any, n: int) -> bool:
    return len(await coro) == n


# ---------------------------------------------------------------- DNS
class TinyDns(asyncio.DatagramProtocol):
    """Answers A/AAAA/MX from a dict; NXDOMAIN for names in ``nx``."""

    def __init__(self, zone: dict[tuple[str, str], list[str]], nx: set[str]) -> None:
        self.zone, self.nx = zone, nx
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        q = dns.message.from_wire(data)
        resp = dns.message.make_response(q)
        question = q.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        rtype = dns.rdatatype.to_text(question.rdtype)
        if name in self.nx:
            resp.set_rcode(dns.rcode.NXDOMAIN)
        else:
            for text in self.zone.get((name, rtype), []):
                resp.answer.append(dns.rrset.from_text(question.name, 60, "IN", rtype, text))
        assert self.transport is not None
        self.transport.sendto(resp.to_wire(), addr)


@pytest_asyncio.fixture
async def tiny_dns() -> AsyncIterator[tuple[int, TinyDns]]:
    proto = TinyDns({
        ("mx.test", "MX"): ["20 mx2.mx.test.", "10 mx1.mx.test."],
        ("mx1.mx.test", "A"): ["127.0.0.1"],
        ("mx2.mx.test", "A"): ["127.0.0.2"],
        ("implicit.test", "A"): ["127.0.0.3"],
        ("null.test", "MX"): ["0 ."],
        ("bare.test", "TXT"): ['"nothing"'],
    }, nx={"gone.test"})
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: proto, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    yield port, proto
    transport.close()


async def test_dns_routing_rules(tiny_dns: tuple[int, TinyDns]) -> None:
    port, _ = tiny_dns
    d = DnsDestinations({"over.test": Hop("127.0.0.9", 2626)}, nameservers=["127.0.0.1"],
                        port=port, timeout_s=2, smtp_port=2525)
    assert await d.route("over.test") == Route([Hop("127.0.0.9", 2626)])
    got = await d.route("mx.test")
    assert got == Route([Hop("127.0.0.1", 2525, 10, "mx1.mx.test"),
                         Hop("127.0.0.2", 2525, 20, "mx2.mx.test")])
    assert await d.route("implicit.test") == Route([Hop("127.0.0.3", 2525, 0, "implicit.test")])
    null = await d.route("null.test")
    assert isinstance(null, NoRoute) and null.permanent and null.status == "5.1.10"
    gone = await d.route("gone.test")
    assert isinstance(gone, NoRoute) and gone.permanent and gone.status == "5.1.2"
    bare = await d.route("bare.test")
    assert isinstance(bare, NoRoute) and bare.permanent
    # issue 8 (low): non-public literals are a way into the cluster; the IPv6 tag is
    # matched in any case (domains arrive lower-cased, which broke every IPv6 literal)
    for inside in ("[127.0.0.5]", "[169.254.169.254]", "[10.1.2.3]", "[ipv6:::1]",
                   "[IPv6:fe80::1]", "[ipv6:::ffff:127.0.0.1]"):
        blocked = await d.route(inside)
        assert isinstance(blocked, NoRoute) and blocked.permanent and blocked.status == "5.7.1"
    assert await d.route("[ipv6:2001:4860:4860::8888]") == Route([Hop("2001:4860:4860::8888", 2525)])
    assert await d.route("[8.8.8.8]") == Route([Hop("8.8.8.8", 2525)])
    lab = DnsDestinations({}, nameservers=["127.0.0.1"], port=port, timeout_s=2, smtp_port=2525,
                          private_literals=True)
    assert await lab.route("[127.0.0.5]") == Route([Hop("127.0.0.5", 2525)])


async def test_dns_timeout_is_temporary() -> None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:  # never answers
        silent.bind(("127.0.0.1", 0))
        d = DnsDestinations({}, nameservers=["127.0.0.1"], port=silent.getsockname()[1],
                            timeout_s=0.3)
        got = await d.route("example.net")
    assert isinstance(got, NoRoute) and not got.permanent and got.status == "4.4.3"


async def test_delivery_through_mx_lookup(bus: Bus, blobs: BlobStore,
                                          common_settings: CommonSettings,
                                          remotes: list[Remote],
                                          tiny_dns: tuple[int, TinyDns]) -> None:
    port, dnsd = tiny_dns
    r = await new_remote(remotes)
    dnsd.zone[("mx.test", "MX")] = ["10 mx1.mx.test."]
    s = relay_settings(common_settings, "", dns_nameservers=["127.0.0.1"], dns_port=port,
                       smtp_port=r.port)
    worker = await service.start(s, bus, blobs)
    inbox = Inbox(bus)
    job = await enqueue(bus, blobs, ["carol@mx.test", "x@null.test"])
    await until(lambda: len(r.messages) == 1 and len(inbox.mails) == 1)
    assert r.messages[0].rcpt_tos == ["carol@mx.test"]
    rcpt = list(dsn_of(inbox.mails[0]).iter_parts())[1].get_payload()[1]
    assert rcpt["Status"] == "5.1.10"
    evs = await events(worker, job.queue_id)
    relayed = [e for e in evs if e.kind == "relayed"]
    assert relayed and relayed[0].remote_mta == "mx1.mx.test"


# ---------------------------------------------------------------- crash safety
async def test_killed_worker_mid_attempt_no_duplicate_nothing_lost(
        bus: Bus, blobs: BlobStore, common_settings: CommonSettings, remotes: list[Remote],
        nats_server: RunningNats, tmp_path: Path) -> None:
    """A relay process is SIGKILLed while one domain is delivered and the other is still in
    RCPT; a fresh worker finishes the second domain only."""
    import sys

    from postbus.kit import embedded
    from postbus.relay.worker import QueueEntry

    fast = await new_remote(remotes)
    hold = asyncio.Event()
    slow = await new_remote(remotes, rcpt_hold=hold)
    tmap = f"fast.test=127.0.0.1:{fast.port},slow.test=127.0.0.1:{slow.port}"
    env = {
        "POSTBUS_NATS_URL": common_settings.nats_url,
        **nats_server.service_env("relay"),
        "POSTBUS_S3_ENDPOINT": common_settings.s3_endpoint,
        "POSTBUS_S3_BUCKET": common_settings.s3_bucket,
        "POSTBUS_ADMIN_TOKEN": ADMIN_TOKEN,
        "POSTBUS_RELAY_MGMT_PORT": str(embedded.free_port()),
        "POSTBUS_RELAY_TRANSPORT_MAP": tmap,
        "POSTBUS_RELAY_ACK_WAIT_S": "2",
        "POSTBUS_RELAY_LEASE_S": "2",
        "POSTBUS_RELAY_RETRY_SCHEDULE": "1",
        "POSTBUS_RELAY_HOSTNAME": "relay.example.test",
    }
    proc = embedded.start([sys.executable, "-m", "postbus.relay"], tmp_path / "relay1.log", env)
    try:
        job = await enqueue(bus, blobs, ["a@fast.test", "b@slow.test"])
        queue = await bus.kv_bucket("relay_queue")

        async def fast_recorded() -> bool:
            e = await queue.get(job.queue_id)
            if e is None:
                return False
            entry = QueueEntry.model_validate_json(e.value)
            return any(r.address == "a@fast.test" and r.state == "relayed"
                       for r in entry.recipients)

        await until(lambda: slow.rcpt_waiting.is_set() and len(fast.messages) == 1, 30)
        await until(fast_recorded)
    finally:
        proc.kill()  # SIGKILL: no stop callbacks, no ack, no drain
        proc.wait(10)
    assert slow.rcpt_hold is None
    hold.set()  # the dead worker's RCPT gets its 451 into a closed connection

    worker = await service.start(
        relay_settings(common_settings, tmap, ack_wait_s=2, lease_s=2, retry_schedule="1"),
        bus, blobs)
    await until(lambda: len(slow.messages) == 1, 30)
    assert slow.messages[0].rcpt_tos == ["b@slow.test"]

    async def relayed() -> list[str | None]:
        return sorted(e.recipient for e in await events(worker, job.queue_id) if e.kind == "relayed")

    await until(lambda: _eq(relayed(), ["a@fast.test", "b@slow.test"]))
    await asyncio.sleep(2.5)  # a duplicate would come with the next redelivery
    assert len(fast.messages) == 1 and len(slow.messages) == 1
    entry = await worker.load(job.queue_id)
    assert entry is not None and entry[0].done


async def _eq(coro: Any, value: Any) -> bool:
    return bool(await coro == value)


async def test_an_outbox_left_by_a_dead_worker_is_published_once(
        bus: Bus, blobs: BlobStore, common_settings: CommonSettings) -> None:
    """State as a worker leaves it when it dies after recording outcomes but before
    publishing them: the next worker publishes the events and the DSN, once."""
    from postbus.relay.worker import DsnRcpt, Notice, QueueEntry, RcptState

    worker = await service.start(relay_settings(common_settings, "*=127.0.0.1:1"), bus, blobs)
    inbox = Inbox(bus)
    key = await blobs.put(BODY)
    now = datetime.now(UTC)
    job = OutboundQueued(queue_id="QDEAD1", mail_from="bob@example.test",
                         recipients=[Recipient(address="x@example.net")], blob_key=key,
                         size=len(BODY), queued_at=now)
    ev = DeliveryEvent(queue_id="QDEAD1", kind="failed", recipient="x@example.net", at=now,
                       service="relay", status="5.1.1", detail="550 5.1.1 no")
    entry = QueueEntry(
        queue_id="QDEAD1", job=job, created_at=now, attempts=1, lease_owner="dead",
        recipients=[RcptState(address="x@example.net", state="failed", attempts=1,
                              status="5.1.1", reply="550 5.1.1 no")],
        outbox=[Notice(msg_id="relay:QDEAD1:x@example.net:failed", event=ev),
                Notice(msg_id="dsn:QDEAD1:failed:abc", dsn_action="failed",
                       dsn_rcpts=[DsnRcpt(address="x@example.net", status="5.1.1",
                                          reply="550 5.1.1 no")])])
    assert await worker.queue.create("QDEAD1", entry.model_dump_json().encode())
    await bus.publish(OUTBOUND_QUEUED, job)
    await until(lambda: len(inbox.mails) == 1)

    async def flushed() -> bool:
        got = await worker.load("QDEAD1")
        return got is not None and not got[0].outbox

    await until(flushed)
    kinds = [e.kind for e in await events(worker, "QDEAD1")]
    assert kinds == ["failed"]
    await bus.publish(OUTBOUND_QUEUED, job)  # a late duplicate changes nothing
    await asyncio.sleep(1.0)
    assert len(inbox.mails) == 1 and [e.kind for e in await events(worker, "QDEAD1")] == ["failed"]
