"""The mime-processor worker with in-memory ports: routing, events, idempotent retries,
authentication only for MX mail, failures retried and never acked."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import BaseModel

from postbus.kit.blob import BlobNotFound, BlobUnavailable, blob_key
from postbus.kit.bus import Ack, BusUnavailable, Reject, Retry
from postbus.kit.settings import CommonSettings
from postbus.mime_processor.policy import AuthResults, DmarcResult, SpfResult
from postbus.mime_processor.settings import Settings
from postbus.mime_processor.worker import MimeWorker
from postbus.proto.base import Subject
from postbus.proto.directory import AccountRef, ResolveReply
from postbus.proto.mail import (
    BodyRef,
    ClientInfo,
    DeliverLocal,
    DeliveryEvent,
    MailReceived,
    OutboundQueued,
    Recipient,
)

ALICE = AccountRef(account_id=1, address="alice@example.test")
BOB = AccountRef(account_id=2, address="bob@example.test")
TABLE = {
    "alice@example.test": ResolveReply(status="local", accounts=[ALICE]),
    "team@example.test": ResolveReply(status="local", accounts=[ALICE, BOB]),
    "off@example.test": ResolveReply(status="disabled"),
}
BODY = (b"Received: from client by mx.example.test\r\nFrom: Carol <carol@sender.example>\r\n"
        b"To: team@example.test\r\nSubject: hello\r\nMessage-ID: <c1@sender.example>\r\n\r\n"
        b"Hi all.\r\n")


class TableDirectory:
    def __init__(self) -> None:
        self.fail = False

    async def resolve(self, address: str) -> ResolveReply:
        if self.fail:
            raise BusUnavailable("no responders")
        if address in TABLE:
            return TABLE[address]
        dom = address.rsplit("@", 1)[-1]
        return ResolveReply(status="unknown" if dom == "example.test" else "remote", domain=dom)


def stored(dl: DeliverLocal, blobs: MemBlobs) -> bytes:
    """The bytes a DeliverLocal stands for: sent inline (ADR 0014) or put in S3."""
    return dl.body if dl.body is not None else blobs.data[dl.blob_key]


class MemBlobs:
    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.puts = 0
        self.down = False

    async def get(self, key: str) -> bytes:
        if key not in self.data:
            raise BlobNotFound(key)
        return self.data[key]

    async def put(self, data: bytes, *, verify: bool = False) -> str:
        if self.down:
            raise BlobUnavailable("s3 down")
        self.puts += 1
        self.data[blob_key(data)] = data
        return blob_key(data)


class DedupPublisher:
    """Like JetStream with a duplicate window: a repeated msg id is stored once."""

    def __init__(self) -> None:
        self.msgs: dict[str, tuple[str, BaseModel]] = {}
        self.fail_on: str | None = None

    async def publish(self, subject: Subject[Any], data: Any, *, msg_id: str | None = None,
                      timeout: float = 5.0, **parts: str) -> int:
        name = subject.format(**parts) if parts else subject.name
        if self.fail_on and self.fail_on in name:
            raise BusUnavailable("no ack")
        assert msg_id
        self.msgs.setdefault(msg_id, (name, data))
        return len(self.msgs)

    def of(self, model: type[Any]) -> list[Any]:
        return [d for _, d in self.msgs.values() if isinstance(d, model)]


class FixedAuth:
    def __init__(self) -> None:
        self.calls = 0

    async def check(self, raw: bytes, client: ClientInfo, mail_from: str) -> AuthResults:
        self.calls += 1
        return AuthResults(SpfResult("pass", mail_from), [],
                           DmarcResult("none", "sender.example"))


class MemMemo:
    def __init__(self) -> None:
        self.d: dict[str, str] = {}

    async def get(self, key: str) -> str | None:
        return self.d.get(key)

    async def put(self, key: str, value: str) -> None:
        self.d[key] = value


def mail(qid: str = "Q1", rcpts: list[str] | None = None, *, listener: str = "mx",
         auth_user: str | None = None, body: bytes = BODY, claim: str | None = None,
         ip: str = "198.51.100.7", ret: str = "HDRS") -> MailReceived:
    return MailReceived(
        queue_id=qid, received_at=datetime.now(UTC),
        client=ClientInfo(ip=ip, helo="mx.sender.example", listener=listener,  # type: ignore[arg-type]
                          auth_user=auth_user),
        mail_from="carol@sender.example",
        rcpt_to=[Recipient(address=a, notify=["FAILURE", "DELAY"], orcpt=f"rfc822;{a}")
                 for a in (rcpts or ["team@example.test"])],
        body=BodyRef(size=len(body), inline=None if claim else body, blob_key=claim),
        dsn_envid="ENV1", dsn_ret=ret)  # type: ignore[arg-type]


@pytest.fixture
def parts() -> tuple[MimeWorker, TableDirectory, MemBlobs, DedupPublisher, FixedAuth, MemMemo]:
    d, b, p, a, m = TableDirectory(), MemBlobs(), DedupPublisher(), FixedAuth(), MemMemo()
    w = MimeWorker(Settings(authserv_id="mx.example.test", missing_blob_attempts=3),
                   directory=d, blobs=b, publisher=p, authenticator=a, memo=m)
    return w, d, b, p, a, m


Parts = tuple[MimeWorker, TableDirectory, MemBlobs, DedupPublisher, FixedAuth, MemMemo]


def other_worker(parts: Parts, settings: Settings) -> tuple[MimeWorker, DedupPublisher]:
    """A worker with ``settings`` on the same directory, blobs, authenticator and memo as
    ``parts``, and a publisher of its own."""
    _, d, b, _, a, mm = parts
    pub = DedupPublisher()
    return MimeWorker(settings, directory=d, blobs=b, publisher=pub, authenticator=a,
                      memo=mm), pub


async def test_mx_mail_fans_out_dedupes_and_reports(parts: Parts) -> None:
    w, _, blobs, pub, auth, _ = parts
    m = mail(rcpts=["team@example.test", "alice@example.test", "nobody@example.test",
                    "off@example.test", "x@remote.example"])
    assert await w.handle_message(m) == Ack()
    [key] = blobs.data
    stored = blobs.data[key]
    assert stored.startswith(b"Authentication-Results: mx.example.test;\r\n\tspf=pass")
    assert stored.endswith(BODY)

    deliveries = pub.of(DeliverLocal)
    assert sorted((d.account_id, d.recipient) for d in deliveries) == [
        (1, "team@example.test"), (2, "team@example.test")]
    d1 = deliveries[0]
    assert d1.blob_key == key and d1.blob_size == len(stored)
    assert d1.prefix == b"Return-Path: <carol@sender.example>\r\nDelivered-To: alice@example.test\r\n"
    assert d1.summary.subject == "hello" and d1.summary.header_bytes > len(BODY) // 2
    assert d1.auth_results and "\r\n" not in d1.auth_results and "spf=pass" in d1.auth_results
    assert d1.notify == ["FAILURE", "DELAY"] and d1.dsn_envid == "ENV1"
    assert set(pub.msgs) >= {"Q1:1", "Q1:2", "Q1:received"}

    assert pub.of(OutboundQueued) == []  # unauthenticated MX client: never relayed
    events = {(e.kind, e.recipient): e for e in pub.of(DeliveryEvent)}
    assert events[("failed", "x@remote.example")].status == "5.7.1"
    assert events[("failed", "off@example.test")].status == "5.2.1"
    nobody = events[("failed", "nobody@example.test")]
    assert (nobody.status, nobody.mail_from, nobody.blob_key, nobody.orcpt, nobody.notify,
            nobody.dsn_envid, nobody.dsn_ret) == (
        "5.1.1", "carol@sender.example", key, "rfc822;nobody@example.test",
        ["FAILURE", "DELAY"], "ENV1", "HDRS")
    assert ("received", None) in events and ("expanded", "team@example.test") in events
    name, _ = pub.msgs["Q1:failed:nobody@example.test"]
    assert name == "mail.events.v1.Q1.failed"
    assert w.stats.routes == {"local": 2, "failed": 3} and w.stats.auth["spf"]["pass"] == 1


async def test_authenticated_submission_goes_outbound_without_auth_header(parts: Parts) -> None:
    w, _, blobs, pub, auth, _ = parts
    m = mail("Q2", ["x@remote.example", "y@remote.example", "X@remote.example", "alice@example.test"],
             listener="submission", auth_user="alice@example.test")
    assert await w.handle_message(m) == Ack()
    assert auth.calls == 0
    [key] = blobs.data
    assert blobs.data[key] == BODY  # unchanged
    [out] = pub.of(OutboundQueued)
    assert [r.address for r in out.recipients] == ["x@remote.example", "y@remote.example"]
    assert (out.blob_key, out.size, out.dsn_ret, out.dsn_envid) == (key, len(BODY), "HDRS", "ENV1")
    assert "Q2:out" in pub.msgs
    assert [d.account_id for d in pub.of(DeliverLocal)] == [1]


async def test_bounces_return_full_content_only_to_senders_we_vouch_for(parts: Parts) -> None:
    """Issue 8 (low): an unauthenticated MX client asking RET=FULL with a forged sender would
    have our bounce carry its content to a third party (backscatter)."""
    w, _, _, pub, _, _ = parts
    await w.handle_message(mail("Q8", ["nobody@example.test"], ret="FULL"))
    [failed] = [e for e in pub.of(DeliveryEvent) if e.kind == "failed"]
    assert failed.dsn_ret == "HDRS"
    await w.handle_message(mail("Q9", ["nobody@example.test", "x@remote.example"],
                                listener="submission", auth_user="alice@example.test",
                                ret="FULL"))
    [failed] = [e for e in pub.of(DeliveryEvent) if e.kind == "failed" and e.queue_id == "Q9"]
    [out] = pub.of(OutboundQueued)
    assert failed.dsn_ret == "FULL" and out.dsn_ret == "FULL"


async def test_trusted_network_may_relay_and_mx_auth_user_too(parts: Parts) -> None:
    w, pub = other_worker(parts, Settings(common=CommonSettings(trusted_networks=["10.0.0.0/8"])))
    assert await w.handle_message(mail("Q3", ["x@remote.example"], ip="10.1.1.1")) == Ack()
    assert len(pub.of(OutboundQueued)) == 1


async def test_retry_is_idempotent_same_blob_same_ids(parts: Parts) -> None:
    w, dirs, blobs, pub, auth, memo = parts
    pub.fail_on = "mail.deliver"
    m = mail("Q4", ["team@example.test", "nobody@example.test"])
    out = await w.handle_message(m, attempt=1)
    assert isinstance(out, Retry) and out.delay_s > 0
    assert w.stats.failures[0].queue_id == "Q4"
    pub.fail_on = None
    assert await w.handle_message(m, attempt=2) == Ack()
    assert auth.calls == 1  # the second attempt reused the remembered header
    assert len(blobs.data) == 1  # same bytes, same key
    assert len(pub.of(DeliverLocal)) == 2
    assert await w.handle_message(m, attempt=3) == Ack()  # a redelivery after the ack
    assert len(pub.of(DeliverLocal)) == 2 and len(blobs.data) == 1
    assert len([e for e in pub.of(DeliveryEvent) if e.kind == "failed"]) == 1


async def test_directory_or_s3_down_is_retry(parts: Parts) -> None:
    w, dirs, blobs, pub, _, _ = parts
    dirs.fail = True
    assert isinstance(await w.handle_message(mail("Q5")), Retry)
    dirs.fail = False
    blobs.down = True
    # a remote recipient: relay reads the body from S3, so S3 must take it first
    assert isinstance(await w.handle_message(mail("Q5", ["alice@example.test",
                                                         "x@remote.example"])), Retry)
    assert pub.of(DeliverLocal) == []  # nothing published before the blob is durable


async def test_small_local_mail_travels_inline_without_s3(parts: Parts) -> None:
    """ADR 0014: a small message for local recipients only is not put in S3; each
    DeliverLocal carries the bytes under the blob's key, for the store's blob row."""
    w, _, blobs, pub, _, _ = parts
    blobs.down = True  # not needed at all
    assert await w.handle_message(mail("Q30", ["team@example.test"])) == Ack()
    deliveries = pub.of(DeliverLocal)
    assert len(deliveries) == 2 and blobs.puts == 0 and not blobs.data
    for dl in deliveries:
        assert dl.body is not None and dl.body.endswith(BODY)
        assert dl.blob_key == blob_key(dl.body) and dl.blob_size == len(dl.body)


async def test_large_failed_or_remote_mail_goes_to_s3_not_inline(parts: Parts) -> None:
    w, d, blobs, pub, _, _ = parts
    big = b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 40  # over inline_body_max
    for qid, rcpts, body in (("Q31", ["alice@example.test"], big),
                             ("Q32", ["alice@example.test", "x@remote.example"], BODY),
                             ("Q33", ["alice@example.test", "nobody@example.test"], BODY)):
        assert await w.handle_message(mail(qid, rcpts, body=body)) == Ack()
        [dl] = [x for x in pub.of(DeliverLocal) if x.queue_id == qid]
        assert dl.body is None and dl.blob_key in blobs.data, qid


async def test_claim_check_body_and_missing_blob(parts: Parts) -> None:
    w, _, blobs, pub, _, _ = parts
    key = await blobs.put(BODY)
    m = mail("Q6", ["alice@example.test"], listener="submission", auth_user="alice@example.test",
             claim=key)
    assert await w.handle_message(m) == Ack()
    assert blobs.puts == 1  # unchanged body: the claim-check blob is the final blob
    assert pub.of(DeliverLocal)[0].blob_key == key

    lost = mail("Q7", ["alice@example.test", "x@remote.example"], claim="blobs/" + "0" * 64)
    assert isinstance(await w.handle_message(lost, attempt=1), Retry)
    assert isinstance(await w.handle_message(lost, attempt=3), Reject)
    failed = [e for e in pub.of(DeliveryEvent) if e.queue_id == "Q7"]
    assert sorted((e.recipient, e.status) for e in failed) == [
        ("alice@example.test", "5.3.0"), ("x@remote.example", "5.3.0")]


async def test_bare_cr_normalised_as_every_other_path_does(parts: Parts) -> None:
    """One normalisation for every way in (issue 11.3): a bare CR ends a line as a bare LF
    does, so the stored bytes, RFC822.SIZE and what POP3 serves agree."""
    w, pub = other_worker(parts, Settings(auth_checks=False))
    b = parts[2]
    body = b"Subject: cr\r\n\r\none\rtwo\r\n"
    assert await w.handle_message(mail("Q9", ["alice@example.test"], body=body)) == Ack()
    [dl] = pub.of(DeliverLocal)
    assert stored(dl, b) == b"Subject: cr\r\n\r\none\r\ntwo\r\n"
    assert dl.blob_size == len(stored(dl, b))


async def test_auth_checks_off_and_bare_lf_normalised(parts: Parts) -> None:
    w, pub = other_worker(parts, Settings(auth_checks=False))
    _, _, b, _, a, _ = parts
    lf = b"Subject: lf\n\nline\n"
    assert await w.handle_message(mail("Q8", ["alice@example.test"], body=lf)) == Ack()
    assert a.calls == 0
    [dl] = pub.of(DeliverLocal)
    assert stored(dl, b) == b"Subject: lf\r\n\r\nline\r\n"
    assert dl.summary.body == '("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 6 1)'
    assert dl.auth_results is None


async def test_forged_results_with_our_id_are_removed(parts: Parts) -> None:
    w, _, blobs, pub, _, _ = parts
    forged = b"Authentication-Results: mx.example.test; dkim=pass header.d=bank.example\r\n" + BODY
    assert await w.handle_message(mail("Q9", ["alice@example.test"], body=forged)) == Ack()
    final = stored(pub.of(DeliverLocal)[0], blobs)
    assert final.count(b"Authentication-Results:") == 1 and b"bank.example" not in final


async def test_handler_bug_is_retried_not_acked(parts: Parts) -> None:
    w, _, _, _, _, _ = parts

    async def boom(address: str) -> ResolveReply:
        raise ZeroDivisionError

    w.directory.resolve = boom  # type: ignore[method-assign]
    out = await w.handle_message(mail("Q10"))
    assert isinstance(out, Retry) and "internal" in out.reason


async def test_the_answer_given_at_rcpt_is_used_without_asking_again(parts: Parts) -> None:
    w, dirs, _, pub, _, _ = parts
    dirs.fail = True  # the directory would fail: it must not be asked
    m = mail("Q11", ["alias@example.test"])
    m.rcpt_to[0].resolved = ResolveReply(status="local", domain="example.test", accounts=[
        AccountRef(account_id=7, address="alice@example.test")])
    assert await w.handle_message(m) == Ack()
    [dl] = pub.of(DeliverLocal)
    assert (dl.account_id, dl.recipient) == (7, "alias@example.test")


async def test_auth_results_are_remembered_only_for_a_retry(parts: Parts) -> None:
    w, _, _, pub, auth, memo = parts
    assert await w.handle_message(mail("Q12")) == Ack()
    assert memo.d == {}  # the common path writes no memo
    pub.fail_on = "mail.deliver"
    assert isinstance(await w.handle_message(mail("Q13"), attempt=1), Retry)
    assert "Q13" in memo.d


async def test_forged_results_are_removed_from_submitted_mail_too(parts: Parts) -> None:
    # issue 8.7: nothing was stripped from submitted (authenticated) mail
    w, _, blobs, pub, auth, _ = parts
    forged = (b"Authentication-Results:\r\n mx.example.test; dkim=pass header.d=bank.example\r\n"
              + BODY)
    m = mail("Q14", ["alice@example.test"], listener="submission",
             auth_user="alice@example.test", body=forged)
    assert await w.handle_message(m) == Ack()
    final = stored(pub.of(DeliverLocal)[0], blobs)
    assert b"Authentication-Results" not in final and auth.calls == 0
