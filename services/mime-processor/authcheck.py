"""SPF (pyspf), DKIM (dkimpy) and DMARC checks with dnspython, bounded in time.

Every DNS lookup of one message shares one deadline (``auth_budget_s``); a lookup that
cannot finish before it is a temperror. The checks run in a small thread pool because the
libraries are synchronous. After repeated DNS timeouts the resolver is considered down for
a while and lookups fail at once (temperror), so a dead resolver never slows the pipeline.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import dkim
import dns.exception
import dns.resolver
import spf

from postbus.kit.expiring import ExpiringLRU
from postbus.kit.logging import get_logger
from postbus.mime_processor.policy import (
    AuthResults,
    DkimResult,
    DmarcResult,
    SpfResult,
    evaluate_dmarc,
    from_domain,
    org_domain,
    parse_dmarc_record,
)
from postbus.proto.mail import ClientInfo
from postbus.protocols.mime import header_block_end, parse_headers

log = get_logger(__name__)

MAX_DKIM_SIGNATURES = 5  # each costs a key lookup and an RSA verify


class DnsTempError(Exception):
    """The lookup did not complete (timeout, SERVFAIL, no nameserver, budget spent)."""


class Dns:
    """dnspython with per-message deadlines and a circuit breaker for a dead resolver."""

    BREAKER_AFTER = 5  # consecutive timeouts
    BREAKER_OPEN_S = 30.0

    def __init__(self, nameservers: list[str], timeout_s: float, port: int = 53) -> None:
        try:
            self.resolver = dns.resolver.Resolver(configure=not nameservers)
        except Exception:  # no /etc/resolv.conf
            self.resolver = dns.resolver.Resolver(configure=False)
            nameservers = nameservers or ["127.0.0.1"]
        self.resolver.port = port  # before the nameservers: dnspython binds it to them
        self.resolver.nameservers = list(nameservers or self.resolver.nameservers)
        self.resolver.cache = dns.resolver.LRUCache(10000)
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._timeouts = 0
        self._open_until = 0.0

    def query(self, name: str, qtype: str, deadline: float) -> list[Any]:
        """Answers (rdata) for name/qtype; [] for NXDOMAIN or no data; DnsTempError else."""
        now = time.monotonic()
        if now < self._open_until:
            raise DnsTempError("resolver unavailable (recent timeouts)")
        lifetime = min(self.timeout_s, deadline - now)
        if lifetime <= 0.01:
            raise DnsTempError("DNS time budget spent")
        try:
            ans = self.resolver.resolve(name, qtype, lifetime=lifetime, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            self._ok()
            return []
        except dns.exception.Timeout as exc:
            self._timeout()
            raise DnsTempError(f"timeout: {name} {qtype}") from exc
        except (dns.resolver.NoNameservers, dns.resolver.NoResolverConfiguration) as exc:
            raise DnsTempError(f"no nameserver answered: {name} {qtype}") from exc
        except dns.exception.DNSException as exc:  # bad names and the like: no such data
            log.debug("dns lookup failed", name=name, qtype=qtype, error=str(exc))
            return []
        self._ok()
        return list(ans)

    def txt(self, name: str, deadline: float) -> list[bytes]:
        return [b"".join(r.strings) for r in self.query(name, "TXT", deadline)]

    def _ok(self) -> None:
        self._timeouts = 0

    def _timeout(self) -> None:
        with self._lock:
            self._timeouts += 1
            if self._timeouts >= self.BREAKER_AFTER:
                self._open_until = time.monotonic() + self.BREAKER_OPEN_S
                self._timeouts = 0
                log.warning("DNS resolver keeps timing out; auth lookups paused",
                            seconds=self.BREAKER_OPEN_S)


# ---------------------------------------------------------------- SPF through pyspf
_tls = threading.local()
_original_spf_lookup: Callable[..., Any] = spf.DNSLookup


def _spf_lookup(name: str, qtype: str, tcpfallback: bool = True, timeout: float = 30) -> Any:
    """Replaces ``spf.DNSLookup`` (a module global pyspf calls for each query): inside our
    checks it uses our resolver and deadline; elsewhere it is pyspf's own."""
    ctx = getattr(_tls, "ctx", None)
    if ctx is None:
        return _original_spf_lookup(name, qtype, tcpfallback, timeout)
    resolver, deadline = ctx
    try:
        answers = resolver.query(name, qtype, deadline)
    except DnsTempError as exc:
        raise spf.TempError(f"DNS {exc}") from exc
    out: list[Any] = []
    for r in answers:
        if qtype in ("A", "AAAA"):
            out.append(((name, qtype), r.address))
        elif qtype == "MX":
            out.append(((name, qtype), (r.preference, r.exchange)))
        elif qtype == "PTR":
            out.append(((name, qtype), r.target.to_text(True)))
        elif qtype in ("TXT", "SPF"):
            out.append(((name, qtype), r.strings))
    return out


spf.DNSLookup = _spf_lookup


def check_spf(resolver: Dns, ip: str, mail_from: str, helo: str, deadline: float) -> SpfResult:
    # RFC 7208 §2.4: with the null reverse-path, check postmaster@<helo>
    sender = mail_from or (f"postmaster@{helo}" if helo else "")
    if not sender:
        return SpfResult("none", mail_from, helo, "no identity to check")
    budget = max(0.1, deadline - time.monotonic())
    _tls.ctx = (resolver, deadline)
    try:
        q = spf.query(i=ip, s=sender, h=helo or "unknown", timeout=budget, querytime=budget)
        result, _code, expl = q.check()
    except Exception as exc:  # pyspf raises on odd input (bad IP, bad names)
        return SpfResult("permerror" if not isinstance(exc, spf.TempError) else "temperror",
                         mail_from, helo, str(exc)[:100])
    finally:
        _tls.ctx = None
    if result in ("error",):
        result = "temperror"
    if result == "ambiguous" or result not in (
            "pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"):
        result = "permerror"
    return SpfResult(result, mail_from, helo, "" if result in ("pass", "none") else str(expl)[:100])


# ---------------------------------------------------------------- DKIM through dkimpy
def dkim_signatures(raw: bytes) -> int:
    header = raw[:header_block_end(raw, 0, len(raw))]
    return sum(1 for name, _ in parse_headers(header) if name == "dkim-signature")


def check_dkim(resolver: Dns, raw: bytes, deadline: float,
               count: int | None = None) -> list[DkimResult]:
    """``count``: the DKIM-Signature fields, when the caller counted them already."""
    count = dkim_signatures(raw) if count is None else count
    if count == 0:
        return []
    temp = {"hit": False}

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        try:
            records = resolver.txt(name.decode("ascii", "replace").rstrip("."), deadline)
        except DnsTempError:
            temp["hit"] = True
            raise
        return records[0] if records else None

    out: list[DkimResult] = []
    for idx in range(min(count, MAX_DKIM_SIGNATURES)):
        temp["hit"] = False
        d = dkim.DKIM(raw)
        comment = ""
        try:
            ok = d.verify(idx=idx, dnsfunc=dnsfunc)
            result = "pass" if ok else "fail"
        except DnsTempError:
            result, comment = "temperror", "key lookup did not complete"
        except dkim.DKIMException as exc:
            comment = str(exc).split(" (")[0][:80]
            # a signature that does not match is "fail"; a broken one "permerror" (RFC 8601)
            result = "fail" if "mismatch" in comment else "permerror"
        except Exception as exc:  # dkimpy on malformed input
            result = "temperror" if temp["hit"] else "permerror"
            comment = type(exc).__name__
        if temp["hit"] and result != "pass":
            result = "temperror"
        fields = getattr(d, "signature_fields", {}) or {}
        d_, i_, s_ = (_field(fields, k) for k in (b"d", b"i", b"s"))
        out.append(DkimResult(result, d_, i_, s_, comment))
    return out


def _field(fields: dict[bytes, Any], k: bytes) -> str:
    v = fields.get(k, b"")
    return v.decode("ascii", "replace") if isinstance(v, bytes) else str(v)


# ---------------------------------------------------------------- DMARC
def check_dmarc(resolver: Dns, raw: bytes, spf_r: SpfResult, dkim_r: list[DkimResult],
                deadline: float) -> DmarcResult:
    header = raw[:header_block_end(raw, 0, len(raw))]
    dom = from_domain(header)
    if not dom:
        return DmarcResult("none")
    # §6.6.3: the From domain's record, else the organizational domain's (its sp= applies)
    lookups = [(dom, False)]
    if org_domain(dom) != dom:
        lookups.append((org_domain(dom), True))
    try:
        for name, sub in lookups:
            for txt in resolver.txt(f"_dmarc.{name}", deadline):
                rec = parse_dmarc_record(txt.decode("utf-8", "replace"))
                if rec is not None:
                    return evaluate_dmarc(dom, rec, sub, spf_r, dkim_r)
    except DnsTempError:
        return DmarcResult("temperror", dom)
    return DmarcResult("none", dom)


# ---------------------------------------------------------------- the port implementation
class SpfCache:
    """Recent SPF results by (client IP, MAIL FROM, HELO): the three inputs of the check
    (RFC 7208 §4.1; macros may use the local part, so the whole address). A sender that
    delivers many messages from one host is evaluated once per ``ttl_s`` instead of once
    per message (pyspf in Python was a third of mime-processor's CPU per message). Only
    definitive results are kept: a temperror is asked again. At most ``size`` entries,
    the oldest dropped first; the DNS answers themselves are cached with their own TTLs."""

    def __init__(self, ttl_s: float = 60.0, size: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self._entries: ExpiringLRU[tuple[str, str, str], SpfResult] = ExpiringLRU(size, clock)

    def get(self, ip: str, mail_from: str, helo: str) -> SpfResult | None:
        return self._entries.get((ip, mail_from.lower(), helo.lower()))

    def put(self, ip: str, mail_from: str, helo: str, result: SpfResult) -> None:
        if self.ttl_s > 0 and result.result != "temperror":
            self._entries.put((ip, mail_from.lower(), helo.lower()), result, self.ttl_s)


class DnsAuthenticator:
    """Runs SPF and DKIM at once, then DMARC, all inside one time budget."""

    def __init__(self, nameservers: list[str], timeout_s: float, budget_s: float,
                 threads: int = 16, port: int = 53, spf_cache: SpfCache | None = None) -> None:
        self.dns = Dns(nameservers, timeout_s, port)
        self.budget_s = budget_s
        self.spf_cache = spf_cache if spf_cache is not None else SpfCache()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="auth")

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def check(self, raw: bytes, client: ClientInfo, mail_from: str) -> AuthResults:
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + self.budget_s
        helo = client.helo or ""
        cached = self.spf_cache.get(client.ip, mail_from, helo)
        spf_f = None if cached is not None else loop.run_in_executor(
            self._pool, check_spf, self.dns, client.ip, mail_from, helo, deadline)
        # unsigned mail (most of it) needs no thread for DKIM: counting is a header scan
        signatures = dkim_signatures(raw)
        dkim_f = (loop.run_in_executor(self._pool, check_dkim, self.dns, raw, deadline,
                                       signatures) if signatures else None)
        slack = 0.5  # the libraries' own overhead after the last lookup
        if spf_f is None:
            assert cached is not None
            spf_r = cached
        else:
            try:
                spf_r = await asyncio.wait_for(asyncio.shield(spf_f), self.budget_s + slack)
            except TimeoutError:
                spf_r = SpfResult("temperror", mail_from, helo, "time budget spent")
            self.spf_cache.put(client.ip, mail_from, helo, spf_r)
        dkim_r: list[DkimResult] = []
        if dkim_f is not None:
            try:
                remaining = max(0.0, deadline - time.monotonic()) + slack
                dkim_r = await asyncio.wait_for(asyncio.shield(dkim_f), remaining)
            except TimeoutError:
                dkim_r = [DkimResult("temperror", comment="time budget spent")]
        try:
            remaining = max(0.0, deadline - time.monotonic()) + slack
            dmarc_r = await asyncio.wait_for(
                loop.run_in_executor(self._pool, check_dmarc, self.dns, raw, spf_r, dkim_r,
                                     deadline), remaining)
        except TimeoutError:
            dmarc_r = DmarcResult("temperror")
        return AuthResults(spf_r, dkim_r, dmarc_r)
