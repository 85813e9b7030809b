"""SPF/DKIM/DMARC through the real pyspf and dkimpy, with DNS answered from a table at our
own Dns boundary; and the time bound against a nameserver that never answers."""

from __future__ import annotations

import asyncio
import base64
import socket
import time
from collections.abc import Iterator
from typing import Any

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from postbus.mime_processor.authcheck import (
    Dns,
    DnsAuthenticator,
    DnsTempError,
    SpfCache,
    check_dkim,
    check_dmarc,
    check_spf,
)
from postbus.mime_processor.policy import DkimResult, SpfResult
from postbus.proto.mail import ClientInfo


class _Rdata:
    def __init__(self, qtype: str, value: Any) -> None:
        if qtype in ("A", "AAAA"):
            self.address = value
        else:
            self.strings = [value.encode() if isinstance(value, str) else value]


class TableDns(Dns):
    """Answers from a dict; names in ``broken`` give a temporary error."""

    def __init__(self, table: dict[tuple[str, str], list[str]], broken: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        super().__init__(["127.0.0.1"], 1.0)
        self.table = table
        self.broken = broken
        self.asked: list[tuple[str, str]] = []

    def query(self, name: str, qtype: str, deadline: float) -> list[Any]:
        name = name.rstrip(".").lower()
        self.asked.append((name, qtype))
        if name in self.broken:
            raise DnsTempError("broken")
        return [_Rdata(qtype, v) for v in self.table.get((name, qtype), [])]


@pytest.fixture(scope="module")
def keypair() -> Iterator[tuple[bytes, str]]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    yield pem, "v=DKIM1; k=rsa; p=" + base64.b64encode(pub).decode()


MSG = (b"From: Alice <alice@sender.example>\r\nTo: bob@example.test\r\nSubject: signed\r\n"
       b"Date: Thu, 26 Nov 2026 10:00:00 +0000\r\nMessage-ID: <m1@sender.example>\r\n\r\n"
       b"Hello Bob.\r\n")


def signed(pem: bytes, msg: bytes = MSG) -> bytes:
    sig = dkim.sign(msg, b"sel1", b"sender.example", pem,
                    include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
    return sig + msg


def far() -> float:
    return time.monotonic() + 5


def test_spf_pass_fail_none_and_temperror() -> None:
    table = {("sender.example", "TXT"): ["v=spf1 ip4:192.0.2.0/24 -all"]}
    dns = TableDns(table, broken={"broken.example"})
    assert check_spf(dns, "192.0.2.7", "a@sender.example", "mx.sender.example", far()).result == "pass"
    r = check_spf(dns, "198.51.100.1", "a@sender.example", "mx.sender.example", far())
    assert r.result == "fail"
    assert check_spf(dns, "192.0.2.7", "a@nospf.example", "h", far()).result == "none"
    assert check_spf(dns, "192.0.2.7", "a@broken.example", "h", far()).result == "temperror"
    # null reverse-path: the HELO identity is checked (RFC 7208 §2.4)
    helo = check_spf(dns, "192.0.2.7", "", "sender.example", far())
    assert helo.result == "pass" and helo.mailfrom == ""
    assert check_spf(dns, "not an ip", "a@sender.example", "h", far()).result in (
        "permerror", "none")


def test_dkim_pass_fail_none_temperror(keypair: tuple[bytes, str]) -> None:
    pem, record = keypair
    dns = TableDns({("sel1._domainkey.sender.example", "TXT"): [record]})
    good = signed(pem)
    [r] = check_dkim(dns, good, far())
    assert (r.result, r.domain, r.selector) == ("pass", "sender.example", "sel1")
    tampered = good.replace(b"Hello Bob.", b"Hello Eve.")
    assert check_dkim(dns, tampered, far())[0].result == "fail"
    assert check_dkim(dns, MSG, far()) == []
    nokey = TableDns({})
    assert check_dkim(nokey, good, far())[0].result in ("permerror", "fail")
    broken = TableDns({}, broken={"sel1._domainkey.sender.example"})
    assert check_dkim(broken, good, far())[0].result == "temperror"
    garbage = b"DKIM-Signature: v=1; this is not; a signature\r\n" + MSG
    assert check_dkim(dns, garbage, far())[0].result in ("permerror", "fail")


def test_dmarc_lookup_and_org_fallback() -> None:
    dns = TableDns({("_dmarc.sender.example", "TXT"): ["v=DMARC1; p=reject"]})
    spf_ok = SpfResult("pass", "b@sender.example")
    assert check_dmarc(dns, MSG, spf_ok, [], far()).result == "pass"
    assert check_dmarc(dns, MSG, SpfResult("fail", "b@sender.example"), [], far()).result == "fail"
    sub = MSG.replace(b"alice@sender.example", b"alice@news.sender.example")
    r = check_dmarc(dns, sub, SpfResult("fail"), [DkimResult("pass", "sender.example")], far())
    assert r.result == "pass" and r.header_from == "news.sender.example"
    assert ("_dmarc.news.sender.example", "TXT") in dns.asked
    assert check_dmarc(TableDns({}), MSG, spf_ok, [], far()).result == "none"
    broken = TableDns({}, broken={"_dmarc.sender.example"})
    assert check_dmarc(broken, MSG, spf_ok, [], far()).result == "temperror"
    assert check_dmarc(dns, b"Subject: no from\r\n\r\n", spf_ok, [], far()).result == "none"


async def test_authenticator_end_to_end(keypair: tuple[bytes, str]) -> None:
    pem, record = keypair
    auth = DnsAuthenticator([], 1.0, 3.0, threads=2)
    auth.dns = TableDns({
        ("sender.example", "TXT"): ["v=spf1 ip4:192.0.2.0/24 -all"],
        ("sel1._domainkey.sender.example", "TXT"): [record],
        ("_dmarc.sender.example", "TXT"): ["v=DMARC1; p=quarantine"],
    })
    res = await auth.check(signed(pem), ClientInfo(ip="192.0.2.9", helo="mx.sender.example"),
                           "bounce@sender.example")
    await auth.close()
    assert res.spf.result == "pass" and res.dkim[0].result == "pass"
    assert (res.dmarc.result, res.dmarc.policy) == ("pass", "quarantine")


async def test_unsigned_mail_is_checked_without_a_dkim_lookup() -> None:
    """No DKIM-Signature: no key lookup and no thread for DKIM; DMARC rests on SPF."""
    auth = DnsAuthenticator([], 1.0, 3.0, threads=2)
    table = TableDns({
        ("sender.example", "TXT"): ["v=spf1 ip4:192.0.2.0/24 -all"],
        ("_dmarc.sender.example", "TXT"): ["v=DMARC1; p=reject"],
    })
    auth.dns = table
    raw = (b"From: a@sender.example\r\nTo: b@example.test\r\nSubject: hi\r\n\r\nbody\r\n")
    res = await auth.check(raw, ClientInfo(ip="192.0.2.9", helo="mx.sender.example"),
                           "bounce@sender.example")
    await auth.close()
    assert res.spf.result == "pass" and res.dkim == []
    assert (res.dmarc.result, res.dmarc.policy) == ("pass", "reject")


async def test_spf_result_is_reused_for_the_same_host_and_sender(
        keypair: tuple[bytes, str]) -> None:
    """One SPF evaluation per (IP, MAIL FROM, HELO) within the cache's TTL; another IP, another
    sender or a temperror is evaluated again."""
    pem, record = keypair
    auth = DnsAuthenticator([], 1.0, 3.0, threads=2)
    dns = auth.dns = TableDns({
        ("sender.example", "TXT"): ["v=spf1 ip4:192.0.2.0/24 -all"],
        ("sel1._domainkey.sender.example", "TXT"): [record],
        ("_dmarc.sender.example", "TXT"): ["v=DMARC1; p=quarantine"],
    })
    client = ClientInfo(ip="192.0.2.9", helo="mx.sender.example")

    async def spf(client: ClientInfo, sender: str = "bounce@sender.example") -> str:
        return (await auth.check(signed(pem), client, sender)).spf.result

    spf_lookups = lambda: dns.asked.count(("sender.example", "TXT"))  # noqa: E731
    assert [await spf(client) for _ in range(3)] == ["pass"] * 3
    assert spf_lookups() == 1
    assert await spf(ClientInfo(ip="198.51.100.1", helo="mx.sender.example")) == "fail"
    assert await spf(client, "other@sender.example") == "pass"
    assert spf_lookups() == 3
    await auth.close()


def test_spf_cache_expires_skips_temperrors_and_is_bounded() -> None:
    now = [0.0]
    cache = SpfCache(ttl_s=60, size=2, clock=lambda: now[0])
    ok = SpfResult("pass", "a@x.example", "h")
    cache.put("192.0.2.1", "a@x.example", "h", ok)
    assert cache.get("192.0.2.1", "A@X.example", "H") == ok  # addresses compare caseless
    now[0] = 61
    assert cache.get("192.0.2.1", "a@x.example", "h") is None
    cache.put("192.0.2.1", "a@x.example", "h", SpfResult("temperror", "a@x.example", "h"))
    assert cache.get("192.0.2.1", "a@x.example", "h") is None
    for ip in ("192.0.2.2", "192.0.2.3", "192.0.2.4"):
        cache.put(ip, "a@x.example", "h", ok)
    assert cache.get("192.0.2.2", "a@x.example", "h") is None  # the oldest went
    assert cache.get("192.0.2.4", "a@x.example", "h") == ok


async def test_silent_nameserver_is_bounded_by_the_budget(keypair: tuple[bytes, str]) -> None:
    """A nameserver that never answers: every check is temperror within the budget, and
    after a few timeouts the breaker answers at once."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    try:
        auth = DnsAuthenticator(["127.0.0.1"], 0.3, 1.0, threads=4, port=sock.getsockname()[1])
        started = time.monotonic()
        res = await auth.check(signed(keypair[0]), ClientInfo(ip="192.0.2.9", helo="h.example"),
                               "a@sender.example")
        assert time.monotonic() - started < 2.0
        assert res.spf.result == "temperror"
        assert res.dkim[0].result == "temperror"
        assert res.dmarc.result == "temperror"
        for _ in range(3):
            await auth.check(MSG, ClientInfo(ip="192.0.2.9"), "a@sender.example")
        started = time.monotonic()
        res = await auth.check(MSG, ClientInfo(ip="192.0.2.9"), "a@sender.example")
        assert time.monotonic() - started < 0.3  # breaker open: no waiting at all
        assert res.spf.result == "temperror"
        await auth.close()
    finally:
        sock.close()


def test_budget_spent_means_no_lookup() -> None:
    dns = Dns(["127.0.0.1"], 1.0)
    with pytest.raises(DnsTempError):
        dns.query("example.org", "TXT", time.monotonic() - 1)
    assert asyncio.iscoroutinefunction(DnsAuthenticator.check)
