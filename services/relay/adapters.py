"""Edges of the relay: destinations from the transport map or DNS (dnspython), and the SMTP
client (aiosmtplib). No nats here; the bus and blob store come from postbus.kit.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass

import aiosmtplib
import dns.asyncresolver
import dns.exception
import dns.resolver
from aiosmtplib.esmtp import parse_esmtp_extensions

from postbus.kit.logging import get_logger
from postbus.protocols.dsn import enhanced_status, orcpt_param, xtext_encode
from postbus.relay import policy
from postbus.relay.policy import Hop, MxRecord, NullMx
from postbus.relay.ports import AttemptResult, Envelope, NoRoute, RcptResult, Route

log = get_logger("postbus.relay.smtp")


# ---------------------------------------------------------------- destinations
def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


class DnsDestinations:
    """The transport map first, then DNS: MX by preference, implicit MX from A/AAAA,
    null MX as a permanent failure (RFC 5321 §5.1, RFC 7505)."""

    def __init__(self, transports: dict[str, Hop], *, nameservers: Sequence[str] = (),
                 port: int = 53, timeout_s: float = 3.0, smtp_port: int = 25,
                 max_hosts: int = 5, rng: random.Random | None = None) -> None:
        self.transports = transports
        self.smtp_port = smtp_port
        self.max_hosts = max_hosts
        self.rng = rng or random.Random()
        self.resolver = dns.asyncresolver.Resolver(configure=not nameservers)
        if nameservers:
            self.resolver.nameservers = list(nameservers)
            self.resolver.port = port
        self.resolver.timeout = timeout_s
        self.resolver.lifetime = timeout_s

    async def route(self, domain: str) -> Route | NoRoute:
        hop = policy.transport_for(domain, self.transports)
        if hop is not None:
            return Route([hop])
        if domain.startswith("[") and domain.endswith("]"):  # address literal, RFC 5321 §4.1.3
            lit = domain[1:-1].removeprefix("IPv6:")
            if _is_ip(lit):
                return Route([Hop(lit, self.smtp_port)])
            return NoRoute(True, "5.1.2", f"bad address literal {domain}")
        try:
            answer = await self.resolver.resolve(domain, "MX", search=False)
            records = [MxRecord(int(r.preference), r.exchange.to_text(omit_final_dot=True))
                       for r in answer]
        except dns.resolver.NXDOMAIN:
            return NoRoute(True, "5.1.2", f"domain {domain} does not exist (NXDOMAIN)")
        except dns.resolver.NoAnswer:
            records = []
        except (dns.exception.Timeout, dns.resolver.NoNameservers, dns.resolver.YXDOMAIN,
                dns.resolver.LifetimeTimeout) as exc:
            return NoRoute(False, "4.4.3", f"MX lookup for {domain} failed: {type(exc).__name__}")
        except dns.exception.DNSException as exc:
            return NoRoute(False, "4.4.3", f"MX lookup for {domain} failed: {exc}")

        if not records:  # implicit MX: the domain itself (RFC 5321 §5.1)
            hosts = await self._addresses(domain, 0)
            if isinstance(hosts, NoRoute):
                return hosts
            if not hosts:
                return NoRoute(True, "5.1.2", f"{domain} has no MX and no address records")
            return Route(hosts[: self.max_hosts * 2])
        ordered = policy.order_mx(records, self.rng)
        if isinstance(ordered, NullMx):
            return NoRoute(True, "5.1.10", f"{domain} accepts no mail (null MX, RFC 7505)")
        hops: list[Hop] = []
        temp: NoRoute | None = None
        for rec in ordered[: self.max_hosts]:
            got = await self._addresses(rec.exchange, rec.preference)
            if isinstance(got, NoRoute):
                temp = temp or got
                continue
            hops.extend(got)
        if hops:
            return Route(hops)
        if temp is not None:
            return NoRoute(False, temp.status, temp.detail)
        return NoRoute(False, "4.4.4", f"no address for any MX host of {domain}")

    async def _addresses(self, host: str, preference: int) -> list[Hop] | NoRoute:
        if _is_ip(host):
            return [Hop(host, self.smtp_port, preference, host)]
        out: list[Hop] = []
        failed: str | None = None
        for rtype in ("AAAA", "A"):
            try:
                answer = await self.resolver.resolve(host, rtype, search=False)
                out.extend(Hop(r.to_text(), self.smtp_port, preference, host) for r in answer)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                continue
            except dns.exception.DNSException as exc:
                failed = f"{rtype} lookup for {host} failed: {type(exc).__name__}"
        # IPv4 first: a sandbox or container often has no IPv6 route
        out.sort(key=lambda h: ":" in h.host)
        if not out and failed:
            return NoRoute(False, "4.4.3", failed)
        return out


# ---------------------------------------------------------------- SMTP client
class _NextHop(Exception):
    """This host could not take the message now; try the next one."""

    def __init__(self, reply: str, status: str = "4.4.1", *, tls_failed: bool = False) -> None:
        super().__init__(reply)
        self.reply = reply
        self.status = status
        self.tls_failed = tls_failed


def _reply(resp: aiosmtplib.SMTPResponse) -> str:
    return f"{resp.code} {' '.join(resp.message.splitlines())}".strip()


def _needs_utf8(env: Envelope, body: bytes) -> bool:
    """SMTPUTF8 is needed when an address or the header section is not ASCII (RFC 6531 §3.4)."""
    if not env.smtputf8:
        return False
    if not env.mail_from.isascii() or any(not r.address.isascii() for r in env.recipients):
        return True
    head = body.split(b"\r\n\r\n", 1)[0]
    return any(b > 127 for b in head)


@dataclass
class _Conn:
    """An open SMTP session after EHLO (and STARTTLS), ready for MAIL FROM."""

    smtp: aiosmtplib.SMTP
    ext: dict[str, str]
    tls: str | None
    uses: int = 0
    idle_since: float = 0.0


class _Stale(Exception):
    """A cached connection turned out to be closed before MAIL FROM was accepted."""


def _data_safe(body: bytes) -> bool:
    """Whether ``body`` survives DATA: no NUL, no bare CR or LF, no line over 998 octets
    (RFC 5321 §4.5.3.1.6)."""
    if b"\0" in body:
        return False
    lines = body.split(b"\r\n")
    return all(b"\r" not in ln and b"\n" not in ln and len(ln) <= 998 for ln in lines)


class SmtpTransport:
    """One delivery attempt of one message to one domain's hosts, in order.

    Sessions are cached per host for a few seconds after a transaction and reused for the
    next message to that host (as Postfix's connection cache does): connect, greeting, EHLO
    and the TLS handshake are paid once per burst, not once per message.
    """

    def __init__(self, *, ehlo_name: str, connect_timeout_s: float = 30.0,
                 command_timeout_s: float = 60.0, data_timeout_s: float = 600.0,
                 starttls: bool = True, tls_required: bool = False,
                 tls_verify: bool = False, cache_idle_s: float = 2.0,
                 cache_max_uses: int = 100) -> None:
        self.ehlo_name = ehlo_name
        self.connect_timeout_s = connect_timeout_s
        self.command_timeout_s = command_timeout_s
        self.data_timeout_s = data_timeout_s
        self.starttls = starttls
        self.tls_required = tls_required
        self.tls_verify = tls_verify
        self.cache_idle_s = cache_idle_s
        self.cache_max_uses = cache_max_uses
        self._idle: dict[tuple[str, int, bool], list[_Conn]] = {}
        self._reapers: set[asyncio.Task[None]] = set()

    def _tls_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        if not self.tls_verify:  # opportunistic TLS (RFC 7435): encrypt, do not authenticate
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    async def send(self, hops: list[Hop], env: Envelope, body: bytes) -> AttemptResult:
        last = "no host to try"
        last_status = "4.4.1"
        want_tls = self.starttls or self.tls_required
        for hop in hops:
            use_tls = want_tls
            while True:
                try:
                    return await self._session(hop, env, body, use_tls)
                except _NextHop as exc:
                    last, last_status = exc.reply, exc.status
                    if exc.tls_failed and use_tls and not self.tls_required:
                        use_tls = False  # handshake failed: same host in clear (RFC 7435 §6.2)
                        continue
                    break
        return AttemptResult({r.address: RcptResult("deferred", last_status, last)
                              for r in env.recipients})

    # ------------------------------------------------------------ connection cache
    def _checkout(self, key: tuple[str, int, bool]) -> _Conn | None:
        pool = self._idle.get(key)
        while pool:
            conn = pool.pop()
            if conn.smtp.is_connected:
                return conn
        return None

    def _checkin(self, key: tuple[str, int, bool], conn: _Conn) -> None:
        conn.uses += 1
        if (self.cache_idle_s <= 0 or conn.uses >= self.cache_max_uses
                or not conn.smtp.is_connected):
            self._quit_later(conn)
            return
        conn.idle_since = time.monotonic()
        self._idle.setdefault(key, []).append(conn)
        t = asyncio.ensure_future(self._expire(key, conn, conn.idle_since))
        self._reapers.add(t)
        t.add_done_callback(self._reapers.discard)

    async def _expire(self, key: tuple[str, int, bool], conn: _Conn, since: float) -> None:
        await asyncio.sleep(self.cache_idle_s)
        pool = self._idle.get(key, [])
        if conn in pool and conn.idle_since == since:
            pool.remove(conn)
            await self._quit(conn.smtp)

    def _quit_later(self, conn: _Conn) -> None:
        t = asyncio.ensure_future(self._quit(conn.smtp))
        self._reapers.add(t)
        t.add_done_callback(self._reapers.discard)

    @staticmethod
    async def _quit(smtp: aiosmtplib.SMTP) -> None:
        if smtp.is_connected:
            try:
                await smtp.quit(timeout=5)
            except Exception:  # the answer to QUIT does not matter
                smtp.close()

    async def close(self) -> None:
        """QUIT every cached session (service stop)."""
        conns = [c for pool in self._idle.values() for c in pool]
        self._idle.clear()
        for t in list(self._reapers):
            t.cancel()
        await asyncio.gather(*(self._quit(c.smtp) for c in conns), return_exceptions=True)

    # ------------------------------------------------------------ one session
    async def _session(self, hop: Hop, env: Envelope, body: bytes, use_tls: bool) -> AttemptResult:
        key = (hop.host, hop.port, use_tls)
        where = f"{hop.label}[{hop.host}]:{hop.port}"
        conn = self._checkout(key)
        if conn is not None:
            try:
                result = await self._transaction(conn, hop, env, body, where, reused=True)
            except _Stale:
                conn.smtp.close()
            except _NextHop:
                conn.smtp.close()
                raise
            else:
                self._keep_or_close(key, conn, result)
                return result
        conn = await self._open(hop, use_tls, where)
        try:
            result = await self._transaction(conn, hop, env, body, where, reused=False)
        except BaseException:
            await self._quit(conn.smtp)
            raise
        self._keep_or_close(key, conn, result)
        return result

    def _keep_or_close(self, key: tuple[str, int, bool], conn: _Conn, result: AttemptResult) -> None:
        if result.reusable:
            self._checkin(key, conn)
        else:
            self._quit_later(conn)

    async def _open(self, hop: Hop, use_tls: bool, where: str) -> _Conn:
        smtp = aiosmtplib.SMTP(hostname=hop.host, port=hop.port, local_hostname=self.ehlo_name,
                               timeout=self.command_timeout_s, start_tls=False,
                               validate_certs=self.tls_verify)
        try:
            await smtp.connect(timeout=self.connect_timeout_s)
        except aiosmtplib.SMTPConnectResponseError as exc:
            smtp.close()
            raise _NextHop(f"{where} greeted with {exc.code} {exc.message}",
                           enhanced_status(exc.code, exc.message)) from exc
        except (aiosmtplib.SMTPException, OSError) as exc:
            smtp.close()
            raise _NextHop(f"connect to {where}: {exc}", "4.4.1") from exc
        try:
            return await self._hello(smtp, hop, use_tls, where)
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError) as exc:
            smtp.close()
            raise _NextHop(f"lost connection with {where}: {exc}", "4.4.2") from exc
        except _NextHop:
            await self._quit(smtp)
            raise

    async def _hello(self, smtp: aiosmtplib.SMTP, hop: Hop, use_tls: bool, where: str) -> _Conn:
        ehlo = await smtp.execute_command(b"EHLO", self.ehlo_name.encode())
        esmtp = ehlo.code == 250
        if esmtp:
            smtp.last_ehlo_response = ehlo
        else:
            helo = await smtp.execute_command(b"HELO", self.ehlo_name.encode())
            if helo.code != 250:
                raise _NextHop(f"{where} refused HELO: {_reply(helo)}",
                               enhanced_status(helo.code, helo.message))
            smtp.last_helo_response = helo
        tls: str | None = None
        if use_tls and esmtp and smtp.supports_extension("starttls"):
            try:
                await smtp.starttls(server_hostname=hop.label, tls_context=self._tls_context(),
                                    timeout=self.command_timeout_s)
            except (aiosmtplib.SMTPException, ssl.SSLError, OSError) as exc:
                raise _NextHop(f"STARTTLS with {where} failed: {exc}", "4.7.0",
                               tls_failed=True) from exc
            ehlo = await smtp.execute_command(b"EHLO", self.ehlo_name.encode())
            if ehlo.code != 250:
                raise _NextHop(f"{where} refused EHLO after TLS: {_reply(ehlo)}")
            smtp.last_ehlo_response = ehlo
            cipher = smtp.get_transport_info("cipher")
            tls = f"{cipher[1]} {cipher[0]}" if cipher else "TLS"
        elif self.tls_required:
            raise _NextHop(f"{where} does not offer STARTTLS (TLS required)", "4.7.5")
        ext, _ = parse_esmtp_extensions(ehlo.message) if esmtp else ({}, [])
        return _Conn(smtp, ext, tls)

    async def _transaction(self, conn: _Conn, hop: Hop, env: Envelope, body: bytes, where: str,
                           *, reused: bool) -> AttemptResult:
        try:
            return await self._mail(conn, hop, env, body, where, reused=reused)
        except _Stale:
            raise
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError) as exc:
            raise _NextHop(f"lost connection with {where}: {exc}", "4.4.2") from exc

    async def _mail(self, conn: _Conn, hop: Hop, env: Envelope, body: bytes, where: str,
                    *, reused: bool) -> AttemptResult:
        smtp, ext = conn.smtp, conn.ext
        # no transaction open yet: a session that stops here can carry the next message
        result = AttemptResult(tls=conn.tls, reusable=True)

        def has(name: str) -> bool:
            return name in ext

        # ---- MAIL FROM (RFC 5321 §4.1.1.2) with SIZE, BODY, SMTPUTF8, RET, ENVID
        opts: list[bytes] = []
        if has("size"):
            limit = ext.get("size", "").strip()
            if limit.isdigit() and int(limit) > 0 and env.size > int(limit):
                reply = f"message size {env.size} exceeds fixed limit {limit} of {where}"
                return self._all(result, env, "failed", "5.3.4", reply, hop)  # RFC 1870 §6
            opts.append(f"SIZE={env.size}".encode())
        if env.body_type == "BINARYMIME" and not _data_safe(body):
            # BDAT is not implemented here: binary content cannot go through DATA
            return self._all(result, env, "failed", "5.6.3",
                             "binary content cannot be relayed without CHUNKING (RFC 3030 §3)", hop)
        if env.body_type in ("8BITMIME", "BINARYMIME") and has("8bitmime"):
            opts.append(b"BODY=8BITMIME")
        utf8 = _needs_utf8(env, body)
        if utf8:
            if not has("smtputf8"):
                return self._all(result, env, "failed", "5.6.7",
                                 f"{where} does not support SMTPUTF8 (RFC 6531 §3.4)", hop)
            opts.append(b"SMTPUTF8")
        dsn = has("dsn")
        if dsn:
            if env.dsn_ret:
                opts.append(f"RET={env.dsn_ret}".encode())
            if env.dsn_envid:
                opts.append(f"ENVID={xtext_encode(env.dsn_envid)}".encode())
        enc = "utf-8" if utf8 else "ascii"
        try:
            sender = f"FROM:<{env.mail_from}>".encode(enc)
        except UnicodeEncodeError:
            return self._all(result, env, "failed", "5.6.7", "sender address is not ASCII", hop)
        try:
            mail = await smtp.execute_command(b"MAIL", sender, *opts)
        except ValueError:
            return self._all(result, env, "failed", "5.1.7", "bad sender address", hop)
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError) as exc:
            if reused:  # the server dropped the idle session: open a new one
                raise _Stale() from exc
            raise
        if reused and mail.code == 421:
            raise _Stale()
        if mail.code != 250:
            result.reusable = mail.code != 421 and smtp.is_connected
            if mail.code >= 500:
                return self._all(result, env, "failed", enhanced_status(mail.code, mail.message),
                                 _reply(mail), hop)
            raise _NextHop(f"{where} said {_reply(mail)} to MAIL FROM",
                           enhanced_status(mail.code, mail.message))

        # ---- RCPT TO, one by one (aiosmtplib sends commands in lockstep, see ADR note)
        accepted: list[str] = []
        for r in env.recipients:
            ropts: list[bytes] = []
            if dsn:
                if r.notify:
                    ropts.append(("NOTIFY=" + ",".join(n.upper() for n in r.notify)).encode())
                if r.orcpt and (o := orcpt_param(r.orcpt)):
                    ropts.append(f"ORCPT={o}".encode())
            try:
                resp = await smtp.execute_command(b"RCPT", f"TO:<{r.address}>".encode(enc), *ropts)
            except (ValueError, UnicodeEncodeError):
                result.results[r.address] = RcptResult("failed", "5.1.3", "bad recipient address",
                                                       hop.label)
                continue
            outcome = policy.classify(resp.code)
            if outcome == "relayed":
                accepted.append(r.address)
            else:
                result.results[r.address] = RcptResult(
                    outcome, enhanced_status(resp.code, resp.message), _reply(resp), hop.label)
        if not accepted:
            result.reusable = await self._rset(smtp)
            return result

        # ---- DATA (RFC 5321 §4.1.1.4); a reply we never see leaves the outcome unknown,
        # and the message is tried again (a possible duplicate, never a loss)
        try:
            resp = await smtp.data(body, timeout=self.data_timeout_s)
            code, text = resp.code, resp.message
        except aiosmtplib.SMTPDataError as exc:
            code, text = exc.code, exc.message
        outcome = policy.classify(code)
        result.reusable = code != 421 and smtp.is_connected
        reply = f"{code} {' '.join(text.splitlines())}"
        for a in accepted:
            result.results[a] = RcptResult(outcome, enhanced_status(code, text), reply,
                                           hop.label, remote_dsn=dsn)
        return result

    @staticmethod
    async def _rset(smtp: aiosmtplib.SMTP) -> bool:
        """RSET after a transaction with no recipient; True when the session is reusable."""
        try:
            return (await smtp.execute_command(b"RSET")).code == 250
        except Exception:  # the session is not worth keeping
            return False

    @staticmethod
    def _all(result: AttemptResult, env: Envelope, outcome: str, status: str, reply: str,
             hop: Hop) -> AttemptResult:
        for r in env.recipients:
            result.results[r.address] = RcptResult(outcome, status, reply, hop.label)  # type: ignore[arg-type]
        return result
