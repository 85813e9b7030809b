"""Edges of the relay: destinations from the transport map or DNS (dnspython), and the SMTP
client (aiosmtplib for connect, greeting, EHLO and STARTTLS; then the transport is read by
``_Wire`` so replies to pipelined commands are never lost). No nats here.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import ssl
import time
from collections import deque
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, cast

import aiosmtplib
import dns.asyncresolver
import dns.exception
import dns.resolver
from aiosmtplib.esmtp import parse_esmtp_extensions

from postbus.kit.logging import get_logger
from postbus.kit.net import literal_is_public
from postbus.protocols.dsn import enhanced_status, orcpt_param, xtext_encode
from postbus.relay import policy
from postbus.relay.policy import Hop, MxRecord, NullMx
from postbus.relay.ports import AttemptResult, Envelope, NoRoute, RcptResult, Route
from postbus.relay.wire import ReplyError, data_payload, split_replies

log = get_logger(__name__)


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
                 max_hosts: int = 5, rng: random.Random | None = None,
                 private_literals: bool = False) -> None:
        self.transports = transports
        self.private_literals = private_literals  # relay to [10.0.0.1] and the like
        self.smtp_port = smtp_port
        self.max_hosts = max_hosts
        self.rng = rng or random.Random()
        try:
            self.resolver = dns.asyncresolver.Resolver(configure=not nameservers)
        except dns.resolver.NoResolverConfiguration:
            log.warning("no /etc/resolv.conf; using 127.0.0.1 for DNS")
            self.resolver = dns.asyncresolver.Resolver(configure=False)
            self.resolver.nameservers = ["127.0.0.1"]
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
            lit = domain[1:-1]
            if lit[:5].lower() == "ipv6:":  # the tag in any case: domains arrive lower-cased
                lit = lit[5:]
            if not _is_ip(lit):
                return NoRoute(True, "5.1.2", f"bad address literal {domain}")
            if not self.private_literals and not literal_is_public(domain):
                return NoRoute(True, "5.7.1", f"address literal {domain} is not a public address")
            return Route([Hop(lit, self.smtp_port)])
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


class _Stale(Exception):
    """A cached session turned out to be closed before MAIL FROM was accepted."""


class Disconnected(Exception):
    """The connection closed, timed out or sent junk."""


@dataclass(frozen=True)
class Reply:
    code: int
    text: str

    def __str__(self) -> str:
        return f"{self.code} {' '.join(self.text.splitlines())}".strip()


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


def _data_safe(body: bytes) -> bool:
    """Whether ``body`` survives DATA: no NUL, no bare CR or LF, no line over 998 octets
    (RFC 5321 §4.5.3.1.6)."""
    if b"\0" in body:
        return False
    lines = body.split(b"\r\n")
    return all(b"\r" not in ln and b"\n" not in ln and len(ln) <= 998 for ln in lines)


class _Wire(asyncio.Protocol):
    """An SMTP session's transport after EHLO (and STARTTLS), taken over from aiosmtplib:
    every reply that arrives is queued, so commands can be pipelined (RFC 2920)."""

    def __init__(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport, as loop.create_connection gave aiosmtplib (which casts it too)
        self.transport = cast(asyncio.Transport, transport)
        self.buf = bytearray()
        self.replies: deque[Reply] = deque()
        self.error: str | None = None
        self._wake = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        transport.set_protocol(self)

    # asyncio.Protocol
    def data_received(self, data: bytes) -> None:
        self.buf += data
        try:
            self.replies.extend(Reply(c, t) for c, t in split_replies(self.buf))
        except ReplyError as exc:
            self.error = str(exc)
            self.transport.close()
        self._wake.set()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.error = self.error or (str(exc) if exc else "connection closed by the server")
        self._wake.set()
        self._writable.set()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # use
    @property
    def is_connected(self) -> bool:
        return self.error is None and not self.transport.is_closing()

    def write(self, data: bytes) -> None:
        if not self.is_connected:
            raise Disconnected(self.error or "connection closed")
        self.transport.write(data)

    async def drain(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._writable.wait(), timeout)
        except TimeoutError as exc:
            self.close()
            raise Disconnected("timed out sending") from exc
        if self.error:
            raise Disconnected(self.error)

    async def read(self, timeout: float) -> Reply:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.replies:
            if self.error is not None:
                raise Disconnected(self.error)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), max(0.0, deadline - loop.time()))
            except TimeoutError as exc:
                self.close()  # a late reply would be paired with the wrong command
                raise Disconnected(f"no reply within {timeout:.0f}s") from exc
        return self.replies.popleft()

    async def command(self, line: bytes, timeout: float) -> Reply:
        self.write(line + b"\r\n")
        return await self.read(timeout)

    async def quit(self) -> None:
        try:
            if self.is_connected:
                await self.command(b"QUIT", 5.0)
        except Disconnected:
            pass
        finally:
            self.close()

    def close(self) -> None:
        if not self.transport.is_closing():
            self.transport.close()


@dataclass
class _Conn:
    """An open SMTP session after EHLO (and STARTTLS), ready for MAIL FROM."""

    wire: _Wire
    ext: dict[str, str]
    tls: str | None
    uses: int = 0
    idle_since: float = 0.0


class SmtpTransport:
    """One delivery attempt of one message to one domain's hosts, in order.

    Sessions are cached per host for a few seconds after a transaction and reused for the
    next message to that host (as Postfix's connection cache does): connect, greeting, EHLO
    and the TLS handshake are paid once per burst, not once per message. MAIL and RCPT go
    in one write when the server offers PIPELINING (RFC 2920).
    """

    def __init__(self, *, ehlo_name: str, connect_timeout_s: float = 30.0,
                 command_timeout_s: float = 60.0, data_timeout_s: float = 600.0,
                 starttls: bool = True, tls_required: bool = False,
                 tls_verify: bool = False, cache_idle_s: float = 2.0,
                 cache_max_uses: int = 100, pipelining: bool = True,
                 destination_concurrency: int = 0) -> None:
        self.ehlo_name = ehlo_name
        self.connect_timeout_s = connect_timeout_s
        self.command_timeout_s = command_timeout_s
        self.data_timeout_s = data_timeout_s
        self.starttls = starttls
        self.tls_required = tls_required
        self.tls_verify = tls_verify
        self.cache_idle_s = cache_idle_s
        self.cache_max_uses = cache_max_uses
        self.pipelining = pipelining
        self.destination_concurrency = destination_concurrency
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._idle: dict[tuple[str, int, bool], list[_Conn]] = {}
        self._reapers: set[asyncio.Task[None]] = set()

    def _tls_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        if not self.tls_verify:  # opportunistic TLS (RFC 7435): encrypt, do not authenticate
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    async def send(self, hops: list[Hop], env: Envelope, body: bytes) -> AttemptResult:
        if self.destination_concurrency <= 0 or not hops:
            return await self._send(hops, env, body)
        # at most N sessions at once to one destination (its first host), as Postfix's
        # default_destination_concurrency_limit: a smart host or a big MX is not flooded
        dest = f"{hops[0].label}:{hops[0].port}"
        slot = self._slots.setdefault(dest, asyncio.Semaphore(self.destination_concurrency))
        async with slot:
            return await self._send(hops, env, body)

    async def _send(self, hops: list[Hop], env: Envelope, body: bytes) -> AttemptResult:
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
                    if exc.tls_failed and use_tls and not (self.tls_required or self.tls_verify):
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
            if conn.wire.is_connected:
                return conn
        return None

    def _checkin(self, key: tuple[str, int, bool], conn: _Conn) -> None:
        conn.uses += 1
        if (self.cache_idle_s <= 0 or conn.uses >= self.cache_max_uses
                or not conn.wire.is_connected):
            self._quit_later(conn)
            return
        conn.idle_since = time.monotonic()
        self._idle.setdefault(key, []).append(conn)
        self._spawn(self._expire(key, conn, conn.idle_since))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        t = asyncio.ensure_future(coro)
        self._reapers.add(t)
        t.add_done_callback(self._reapers.discard)

    async def _expire(self, key: tuple[str, int, bool], conn: _Conn, since: float) -> None:
        await asyncio.sleep(self.cache_idle_s)
        pool = self._idle.get(key, [])
        if conn in pool and conn.idle_since == since:
            pool.remove(conn)
            await conn.wire.quit()

    def _quit_later(self, conn: _Conn) -> None:
        self._spawn(conn.wire.quit())

    async def close(self) -> None:
        """QUIT every cached session (service stop)."""
        conns = [c for pool in self._idle.values() for c in pool]
        self._idle.clear()
        for t in list(self._reapers):
            t.cancel()
        await asyncio.gather(*(c.wire.quit() for c in conns), return_exceptions=True)

    # ------------------------------------------------------------ one session
    async def _session(self, hop: Hop, env: Envelope, body: bytes, use_tls: bool) -> AttemptResult:
        key = (hop.host, hop.port, use_tls)
        where = f"{hop.label}[{hop.host}]:{hop.port}"
        conn = self._checkout(key)
        if conn is not None:
            try:
                result = await self._transaction(conn, hop, env, body, where, reused=True)
            except _Stale:
                conn.wire.close()
            except BaseException:
                conn.wire.close()
                raise
            else:
                self._keep_or_close(key, conn, result)
                return result
        conn = await self._open(hop, use_tls, where)
        try:
            result = await self._transaction(conn, hop, env, body, where, reused=False)
        except BaseException:
            conn.wire.close()
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
            ext, tls = await self._hello(smtp, hop, use_tls, where)
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError) as exc:
            smtp.close()
            raise _NextHop(f"lost connection with {where}: {exc}", "4.4.2") from exc
        except _NextHop:
            try:
                await smtp.quit(timeout=5)
            except Exception:  # the answer to QUIT does not matter
                smtp.close()
            raise
        transport = smtp.transport
        if transport is None or transport.is_closing():
            raise _NextHop(f"lost connection with {where} after EHLO", "4.4.2")
        return _Conn(_Wire(transport), ext, tls)

    async def _hello(self, smtp: aiosmtplib.SMTP, hop: Hop, use_tls: bool,
                     where: str) -> tuple[dict[str, str], str | None]:
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
        return ext, tls

    async def _transaction(self, conn: _Conn, hop: Hop, env: Envelope, body: bytes, where: str,
                           *, reused: bool) -> AttemptResult:
        try:
            return await self._mail(conn, hop, env, body, where, reused=reused)
        except Disconnected as exc:
            raise _NextHop(f"lost connection with {where}: {exc}", "4.4.2") from exc

    async def _mail(self, conn: _Conn, hop: Hop, env: Envelope, body: bytes, where: str,
                    *, reused: bool) -> AttemptResult:
        wire, ext = conn.wire, conn.ext
        t = self.command_timeout_s
        # no transaction open yet: a session that stops here can carry the next message
        result = AttemptResult(tls=conn.tls, reusable=True)

        def has(name: str) -> bool:
            return name in ext

        def fail_all(status: str, reply: str) -> AttemptResult:
            for r in env.recipients:
                result.results[r.address] = RcptResult("failed", status, reply, hop.label)
            return result

        # ---- MAIL FROM (RFC 5321 §4.1.1.2) with SIZE, BODY, SMTPUTF8, RET, ENVID
        opts: list[str] = []
        if has("size"):
            limit = ext.get("size", "").strip()
            if limit.isdigit() and int(limit) > 0 and env.size > int(limit):
                return fail_all("5.3.4", f"message size {env.size} exceeds fixed limit "
                                f"{limit} of {where}")  # RFC 1870 §6
            opts.append(f"SIZE={env.size}")
        if env.body_type == "BINARYMIME" and not _data_safe(body):
            # BDAT is not implemented here: binary content cannot go through DATA
            return fail_all("5.6.3", "binary content cannot be relayed without CHUNKING (RFC 3030 §3)")
        if env.body_type in ("8BITMIME", "BINARYMIME") and has("8bitmime"):
            opts.append("BODY=8BITMIME")
        utf8 = _needs_utf8(env, body)
        if utf8:
            if not has("smtputf8"):
                return fail_all("5.6.7", f"{where} does not support SMTPUTF8 (RFC 6531 §3.4)")
            opts.append("SMTPUTF8")
        dsn = has("dsn")
        if dsn:
            if env.dsn_ret:
                opts.append(f"RET={env.dsn_ret}")
            if env.dsn_envid:
                opts.append(f"ENVID={xtext_encode(env.dsn_envid)}")
        enc = "utf-8" if utf8 else "ascii"
        mail_line = _line("MAIL FROM:", env.mail_from, opts, enc)
        if mail_line is None:
            return fail_all("5.1.7", "bad sender address")

        # ---- RCPT TO lines; bad addresses never reach the wire
        rcpt_lines: list[tuple[str, bytes]] = []
        for r in env.recipients:
            ropts: list[str] = []
            if dsn:
                if r.notify:
                    ropts.append("NOTIFY=" + ",".join(n.upper() for n in r.notify))
                if r.orcpt and (o := orcpt_param(r.orcpt)):
                    ropts.append(f"ORCPT={o}")
            line = _line("RCPT TO:", r.address, ropts, enc)
            if line is None:
                result.results[r.address] = RcptResult("failed", "5.1.3", "bad recipient address",
                                                       hop.label)
            else:
                rcpt_lines.append((r.address, line))
        if not rcpt_lines:
            return result

        pipelined = self.pipelining and has("pipelining")
        if pipelined:  # RFC 2920 §3.1: MAIL and every RCPT in one write
            wire.write(b"".join([mail_line, *(ln for _, ln in rcpt_lines)]))
        else:
            wire.write(mail_line)
        try:
            mail = await wire.read(t)
        except Disconnected as exc:
            if reused:  # the server dropped the idle session: open a new one
                raise _Stale() from exc
            raise
        if reused and mail.code == 421:
            raise _Stale()
        if mail.code != 250:
            if pipelined:  # drain the replies to the RCPTs (503s)
                for _ in rcpt_lines:
                    await wire.read(t)
            result.reusable = mail.code != 421 and wire.is_connected
            if mail.code >= 500:
                return fail_all(enhanced_status(mail.code, mail.text), str(mail))
            raise _NextHop(f"{where} said {mail} to MAIL FROM",
                           enhanced_status(mail.code, mail.text))

        accepted: list[str] = []
        for address, line in rcpt_lines:
            resp = await (wire.read(t) if pipelined else wire.command(line[:-2], t))
            outcome = policy.classify(resp.code)
            if outcome == "relayed":
                accepted.append(address)
            else:
                result.results[address] = RcptResult(
                    outcome, enhanced_status(resp.code, resp.text), str(resp), hop.label)
        if not accepted:
            rset = await wire.command(b"RSET", t)
            result.reusable = rset.code == 250
            return result

        # ---- DATA (RFC 5321 §4.1.1.4); a reply we never see leaves the outcome unknown,
        # and the message is tried again (a possible duplicate, never a loss)
        start = await wire.command(b"DATA", t)
        if start.code == 354:
            wire.write(data_payload(body))
            await wire.drain(self.data_timeout_s)
            final = await wire.read(self.data_timeout_s)
        else:
            final = start
        outcome = policy.classify(final.code)
        result.reusable = final.code != 421 and wire.is_connected
        for a in accepted:
            result.results[a] = RcptResult(outcome, enhanced_status(final.code, final.text),
                                           str(final), hop.label, remote_dsn=dsn)
        return result


def _line(verb: str, address: str, params: list[str], enc: str) -> bytes | None:
    """``MAIL FROM:<addr> PARAMS\r\n``; None when the address cannot be sent safely
    (line breaks, other controls, not encodable)."""
    if any(ord(c) < 32 or ord(c) == 127 for c in address) or ">" in address:
        return None
    try:
        text = f"{verb}<{address}>" + "".join(" " + p for p in params)
        return text.encode(enc) + b"\r\n"
    except UnicodeEncodeError:
        return None
