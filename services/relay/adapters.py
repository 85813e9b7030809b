"""Edges of the relay: destinations from the transport map or DNS (dnspython), and the SMTP
client (aiosmtplib). No nats here; the bus and blob store come from postbus.kit.
"""

from __future__ import annotations

import ipaddress
import random
import ssl
from collections.abc import Sequence

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


class SmtpTransport:
    """One delivery attempt of one message to one domain's hosts, in order."""

    def __init__(self, *, ehlo_name: str, connect_timeout_s: float = 30.0,
                 command_timeout_s: float = 60.0, data_timeout_s: float = 600.0,
                 starttls: bool = True, tls_required: bool = False,
                 tls_verify: bool = False) -> None:
        self.ehlo_name = ehlo_name
        self.connect_timeout_s = connect_timeout_s
        self.command_timeout_s = command_timeout_s
        self.data_timeout_s = data_timeout_s
        self.starttls = starttls
        self.tls_required = tls_required
        self.tls_verify = tls_verify

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

    async def _session(self, hop: Hop, env: Envelope, body: bytes, use_tls: bool) -> AttemptResult:
        smtp = aiosmtplib.SMTP(hostname=hop.host, port=hop.port, local_hostname=self.ehlo_name,
                               timeout=self.command_timeout_s, start_tls=False,
                               validate_certs=self.tls_verify)
        where = f"{hop.label}[{hop.host}]:{hop.port}"
        try:
            try:
                await smtp.connect(timeout=self.connect_timeout_s)
            except aiosmtplib.SMTPConnectResponseError as exc:
                raise _NextHop(f"{where} greeted with {exc.code} {exc.message}",
                               enhanced_status(exc.code, exc.message)) from exc
            except (aiosmtplib.SMTPException, OSError) as exc:
                raise _NextHop(f"connect to {where}: {exc}", "4.4.1") from exc
            try:
                return await self._transaction(smtp, hop, env, body, use_tls, where)
            except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError,
                    OSError) as exc:
                raise _NextHop(f"lost connection with {where}: {exc}", "4.4.2") from exc
        finally:
            if smtp.is_connected:
                try:
                    await smtp.quit(timeout=5)
                except Exception:  # the answer to QUIT does not matter
                    smtp.close()

    async def _transaction(self, smtp: aiosmtplib.SMTP, hop: Hop, env: Envelope, body: bytes,
                           use_tls: bool, where: str) -> AttemptResult:
        result = AttemptResult()
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
            result.tls = f"{cipher[1]} {cipher[0]}" if cipher else "TLS"
        elif self.tls_required:
            raise _NextHop(f"{where} does not offer STARTTLS (TLS required)", "4.7.5")
        ext, _ = parse_esmtp_extensions(ehlo.message) if esmtp else ({}, [])

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
        if env.body_type == "8BITMIME" and has("8bitmime"):
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
        if mail.code != 250:
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
            await self._rset(smtp)
            return result

        # ---- DATA (RFC 5321 §4.1.1.4); a reply we never see leaves the outcome unknown,
        # and the message is tried again (a possible duplicate, never a loss)
        try:
            resp = await smtp.data(body, timeout=self.data_timeout_s)
            code, text = resp.code, resp.message
        except aiosmtplib.SMTPDataError as exc:
            code, text = exc.code, exc.message
        outcome = policy.classify(code)
        reply = f"{code} {' '.join(text.splitlines())}"
        for a in accepted:
            result.results[a] = RcptResult(outcome, enhanced_status(code, text), reply,
                                           hop.label, remote_dsn=dsn)
        return result

    @staticmethod
    async def _rset(smtp: aiosmtplib.SMTP) -> None:
        try:
            await smtp.execute_command(b"RSET")
        except Exception:  # best effort before QUIT
            pass

    @staticmethod
    def _all(result: AttemptResult, env: Envelope, outcome: str, status: str, reply: str,
             hop: Hop) -> AttemptResult:
        for r in env.recipients:
            result.results[r.address] = RcptResult(outcome, status, reply, hop.label)  # type: ignore[arg-type]
        return result
