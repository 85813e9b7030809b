"""SMTP listeners: an aiosmtpd ``SMTP`` subclass per connection and the shared ``Ingress``.

aiosmtpd keeps the command loop shape, STARTTLS and AUTH challenges; this subclass adds the
Postbus policy (policy.py), enhanced status codes on every reply, DSN/SMTPUTF8/CHUNKING,
a DATA reader that works on large chunks instead of lines and spools bodies past the inline
threshold to disk (spool.py), limits and the durable hand-off (250 only after the S3 upload
and the JetStream ack). Talks to the world through ports.py only.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import itertools
import ssl
import time
from asyncio import sslproto
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiosmtpd.smtp import SMTP, TLSSetupException, login_always_fail

from postbus.kit.logging import get_logger
from postbus.kit.metrics import counter, gauge, histogram
from postbus.kit.net import BadProxyHeader, read_proxy_header
from postbus.proto.directory import AuthReply
from postbus.proto.mail import BodyRef, ClientInfo, MailReceived, Recipient
from postbus.protocols import smtp as proto
from postbus.protocols import smtp_replies as replies
from postbus.smtp_ingress import policy
from postbus.smtp_ingress.ports import (
    Backlog,
    BlockList,
    Bodies,
    Counters,
    Directory,
    LoadShare,
    Queue,
    Unavailable,
)
from postbus.smtp_ingress.settings import Settings
from postbus.smtp_ingress.spool import Budget, Spool, SpoolDir

log = get_logger(__name__)

CONNECTIONS = counter("postbus_smtp_connections_total", "SMTP connections",
                      ["listener", "outcome"])
ACTIVE = gauge("postbus_smtp_sessions_active", "Open SMTP sessions", ["listener"])
MESSAGES = counter("postbus_smtp_messages_total", "Messages by outcome and reason",
                   ["listener", "outcome", "reason"])
RECIPIENTS = counter("postbus_smtp_recipients_total", "RCPT answers by outcome and reason",
                     ["listener", "outcome", "reason"])
AUTHS = counter("postbus_smtp_auth_total", "AUTH attempts by outcome", ["listener", "outcome"])
BYTES = counter("postbus_smtp_received_bytes_total", "Message bytes accepted", ["listener"])
ACCEPT_LATENCY = histogram("postbus_smtp_accept_seconds",
                           "End of data to the 250 reply (S3 put if any + JetStream ack)",
                           ["listener"])

QUEUE_DEPTH = gauge("postbus_smtp_queue_depth",
                    "Accepted messages waiting for mime-processor or the store (in-flow delay)")
FLOW_DELAYS = counter("postbus_smtp_flow_delays_total", "MAIL FROM answers held by the in-flow delay")
FLOW_DELAY_SECONDS = counter("postbus_smtp_flow_delay_seconds_total",
                             "Seconds MAIL FROM answers were held by the in-flow delay")

_REFUSAL_REASONS = {replies.R421_BUSY: "max_connections", replies.R421_TOO_MANY_CONN: "per_ip_limit",
                    replies.R421_RATE: "rate_limit"}


@functools.lru_cache(maxsize=1024)
def _m(metric: Any, *labels: str) -> Any:
    """A labelled child, cached (``labels()`` costs a lock and a dict lookup each time)."""
    return metric.labels(*labels)
ALLOWED_BEFORE_STARTTLS = {"NOOP", "EHLO", "HELO", "STARTTLS", "QUIT", "RSET"}
READ_CHUNK = 256 * 1024

_ids = itertools.count(1)


class _NoHooks:
    """aiosmtpd wants a handler object; every decision lives in the subclass."""


_NO_HOOKS = _NoHooks()


class _Methods:
    """``SMTP._smtp_methods`` without building a dict per connection: command -> bound method."""

    __slots__ = ("_obj",)

    def __init__(self, obj: object) -> None:
        self._obj = obj

    def get(self, command: str) -> Any:
        if command not in _COMMANDS:
            return None
        return getattr(self._obj, "smtp_" + command)


@dataclass
class SessionInfo:
    id: int
    listener: str
    ip: str
    port: int
    started_at: datetime
    helo: str | None = None
    tls: str | None = None
    auth_user: str | None = None
    commands: int = 0
    messages: int = 0
    last_command: str = ""


@dataclass
class Stats:
    """Counters by outcome and reason for the management API (this replica)."""

    counts: Counter[tuple[str, str]] = field(default_factory=Counter)

    def add(self, outcome: str, reason: str) -> None:
        self.counts[(outcome, reason)] += 1

    def as_dict(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for (outcome, reason), n in sorted(self.counts.items()):
            out.setdefault(outcome, {})[reason] = n
        return out


class Ingress:
    """What every connection of this process shares: settings, ports, limits, sessions."""

    def __init__(self, settings: Settings, *, directory: Directory, queue: Queue, bodies: Bodies,
                 auth_failures: Counters, blocklist: BlockList,
                 tls_context: ssl.SSLContext | None, load_share: LoadShare | None = None,
                 backlog: Backlog | None = None) -> None:
        self.load_share = load_share
        self.backlog = backlog
        self.queue_depth = 0  # last depth read from ``backlog`` (in-flow delay)
        self._flow_task: asyncio.Task[None] | None = None
        self.settings = settings
        self.directory = directory
        self.queue = queue
        self.bodies = bodies
        self.auth_failures = auth_failures
        self.blocklist = blocklist
        self.tls_context = tls_context
        self.trusted = policy.parse_networks(settings.common.trusted_networks)
        self.limits = policy.ConnLimits(settings.max_connections, settings.max_connections_per_ip,
                                        settings.connection_rate_per_ip)
        self.rate = policy.RateWindow()
        self.per_ip: Counter[str] = Counter()
        self.sessions: dict[int, SessionInfo] = {}
        self.conns: set[IngressSMTP] = set()
        self.stopping = False
        self._drained = asyncio.Event()
        self.stats = Stats()
        self.servers: list[asyncio.Server] = []
        self.ports: dict[str, int] = {}
        self.hostname = settings.common.hostname
        self.inline_threshold = settings.common.inline_threshold
        # message bodies while they are read: memory up to the inline threshold each, then
        # disk, both bounded for all sessions of this replica (issue 8.6)
        self.spool = SpoolDir(settings.spool_dir, memory=Budget(settings.data_bytes_in_flight),
                              disk=Budget(settings.spool_max_bytes))
        self.uploads = asyncio.Semaphore(settings.spool_uploads)

    # ------------------------------------------------------------ listeners
    async def start(self) -> dict[str, int]:
        """Open the listeners; returns listener -> bound port."""
        self.spool.prepare()
        if self.backlog is not None and self.settings.flow_backlog_threshold > 0:
            self._flow_task = asyncio.create_task(self._watch_backlog(), name="smtp-in-flow")
        loop = asyncio.get_running_loop()
        wanted = {"mx": self.settings.smtp_port, "submission": self.settings.submission_port,
                  "smtps": self.settings.smtps_port}
        for name, port in wanted.items():
            if port < 0 or (name == "smtps" and self.tls_context is None):
                continue
            server = await loop.create_server(lambda n=name: IngressSMTP(self, n),  # type: ignore[misc]
                                              self.settings.host, port, backlog=1024,
                                              reuse_address=True)
            self.servers.append(server)
            self.ports[name] = int(server.sockets[0].getsockname()[1])
            log.info("listening", listener=name, port=self.ports[name])
        return self.ports

    async def stop(self, grace_s: float = 8.0) -> None:
        """Stop listening; idle sessions get 421 at once, a session in the middle of a
        message finishes it (up to ``grace_s``) and is then closed with 421."""
        self.stopping = True
        if self._flow_task is not None:
            self._flow_task.cancel()
        for s in self.servers:
            s.close()
        for conn in list(self.conns):
            if not conn.busy:
                conn._close_with(replies.R421_SHUTDOWN)
        if self.conns:
            self._drained.clear()
            with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                await asyncio.wait_for(self._drained.wait(), grace_s)
        for conn in list(self.conns):
            conn._close_with(replies.R421_SHUTDOWN)

    # ------------------------------------------------------------ in-flow delay
    async def _watch_backlog(self) -> None:
        """Keep ``queue_depth`` current; an unreadable depth counts as none (fail open:
        the delay only shapes intake, it protects nothing)."""
        assert self.backlog is not None
        while True:
            try:
                self.queue_depth = await self.backlog.depth()
            except Unavailable:
                self.queue_depth = 0
            except Exception:  # never let the watch die: the depth would freeze
                log.exception("reading the queue depth failed")
                self.queue_depth = 0
            QUEUE_DEPTH.set(self.queue_depth)
            await asyncio.sleep(self.settings.flow_poll_s)

    def flow_delay(self) -> float:
        s = self.settings
        return policy.in_flow_delay(self.queue_depth, threshold=s.flow_backlog_threshold,
                                    per_message_s=s.flow_delay_per_message_s,
                                    max_s=s.flow_delay_max_s)

    # ------------------------------------------------------------ admission
    def admit(self, ip: str) -> str | None:
        """None when this client may talk to us, else the reply to close with."""
        if self.blocklist.blocked(ip):
            self.stats.add("connection_refused", "blocked")
            return replies.R554_BLOCKED
        recent = self.rate.hit(ip) if self.limits.rate_per_minute else 0
        from_ip = self.per_ip[ip]
        if self.load_share is not None:
            other_open, other_recent = self.load_share.remote(ip)
            from_ip, recent = from_ip + other_open, recent + other_recent
        refusal = policy.connection_decision(total=len(self.sessions), from_ip=from_ip,
                                             recent=recent, limits=self.limits)
        if refusal:
            self.stats.add("connection_refused", _REFUSAL_REASONS.get(refusal, "limit"))
        return refusal

    def load_snapshot(self) -> dict[str, list[int]]:
        """This replica's per-IP counts for the other replicas (see adapters.KvLoadShare)."""
        recent = self.rate.counts() if self.limits.rate_per_minute else {}
        return policy.load_snapshot(dict(self.per_ip), recent)

    def may_relay(self, ip: str, authenticated: bool) -> bool:
        return policy.may_relay(authenticated=authenticated, trusted=policy.ip_in(ip, self.trusted))


async def reverse_dns(ip: str) -> str | None:
    """Forward-confirmed reverse DNS (the PTR name, if that name resolves back to ``ip``),
    through the system resolver (so /etc/hosts counts too); None otherwise."""
    import socket

    loop = asyncio.get_running_loop()
    try:
        name, _ = await loop.getnameinfo((ip, 0), socket.NI_NAMEREQD)
        infos = await loop.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return None
    return name if any(i[4][0] == ip for i in infos) else None


def _tls_info(obj: Any) -> str | None:
    if obj is None:
        return None
    try:
        cipher = obj.cipher()
        return f"{obj.version()} with cipher {cipher[0]} ({cipher[2]}/{cipher[2]} bits)"
    except Exception:
        return "TLS"


class IngressSMTP(SMTP):
    """One SMTP connection (RFC 5321) on one of the listeners mx, submission, smtps."""

    def __init__(self, ingress: Ingress, listener: str) -> None:
        # aiosmtpd's SMTP.__init__ introspects the instance with inspect.getmembers and
        # dir() on every connection (~250 us, a quarter of a core at 1,000 connections/s).
        # We set the same attributes from class-level tables instead;
        # tests/unit/test_smtp_policy.py checks we still set every attribute it does.
        s = ingress.settings
        self.ingress = ingress
        self.listener = listener
        self.__ident__ = "ESMTP Postbus"
        self.loop = asyncio.get_running_loop()
        asyncio.StreamReaderProtocol.__init__(
            self, asyncio.StreamReader(loop=self.loop, limit=s.max_command_length),
            client_connected_cb=self._cb_client_connected, loop=self.loop)
        self.line_length_limit = s.max_command_length
        self.event_handler = _NO_HOOKS
        self.data_size_limit = s.max_message_size
        self.enable_SMTPUTF8 = True
        self._decode_data = False
        self.hostname = ingress.hostname
        self.tls_context = ingress.tls_context
        self.require_starttls = bool(ingress.tls_context) and listener == "submission"
        self._timeout_duration = s.idle_timeout_s
        self._timeout_handle = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        self._auth_require_tls = True
        self._proxy_timeout = None
        self._authenticator = None
        self._auth_callback = login_always_fail
        self._auth_required = listener != "mx"
        self._auth_methods = {}
        self._handle_hooks = {}
        self._ehlo_hook_ver = None
        self._smtp_methods = _Methods(self)  # type: ignore[assignment]
        self._enforce_call_limit = False
        self._pending: list[bytes] = []
        self._rdns: asyncio.Future[str | None] | None = None
        self._last_activity = 0.0
        self._timer_exact = False
        self.busy = False  # reading or queueing a message: finish it before shutdown
        self.info: SessionInfo | None = None
        self.client_ip = ""
        self.client_port = 0
        self._session_timer: asyncio.TimerHandle | None = None
        self._auth: AuthReply | None = None
        self._admitted = False
        self._closing = False

    # ------------------------------------------------------------ plumbing
    def _reset_transaction(self) -> None:
        """Forget the envelope (RSET, HELO/EHLO, after a message) - aiosmtpd's
        ``_set_rset_state``, typed - and give back the BDAT bytes it held."""
        self._close_spool()
        self.envelope = self._create_envelope()

    def _close_spool(self) -> None:
        env: Any = getattr(self, "envelope", None)
        spool: Spool | None = getattr(env, "spool", None)
        if spool is not None:
            spool.close()

    @property
    def encrypted(self) -> bool:
        return self._tls_protocol is not None

    @property
    def authenticated(self) -> bool:
        return self._auth is not None

    async def push(self, status: str | bytes) -> None:
        """Queue a reply; every reply gets an enhanced status code (RFC 2034) unless it has
        one. Replies are written by ``_flush``: at once when no further pipelined command
        is waiting, else together with the next ones (RFC 2920 §3.1)."""
        if isinstance(status, str):
            status = proto.with_enhanced_code(status).encode("utf-8", "surrogateescape")
        self._pending.append(status + b"\r\n")

    async def _push_plain(self, line: str) -> None:
        """Greeting and HELO/EHLO replies: no enhanced code (RFC 2034 §3)."""
        self._pending.append(line.encode("utf-8", "surrogateescape") + b"\r\n")

    async def _flush(self) -> None:
        if self._pending and self.transport is not None:
            data = b"".join(self._pending)
            self._pending.clear()
            self._writer.write(data)
            await self._writer.drain()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        if first:
            peer = transport.get_extra_info("peername") or ("", 0)
            self.client_ip, self.client_port = str(peer[0]), int(peer[1]) if len(peer) > 1 else 0
            self._session_timer = self.loop.call_later(self.ingress.settings.session_timeout_s,
                                                       self._session_expired)
        elif self.info is not None:
            self.info.tls = _tls_info(transport.get_extra_info("ssl_object"))
            self._auth = None  # RFC 3207 §4.2: forget everything learnt before TLS

    def connection_lost(self, error: Exception | None) -> None:
        if self._session_timer is not None:
            self._session_timer.cancel()
        if self._rdns is not None and not self._rdns.done():
            self._rdns.cancel()
        super().connection_lost(error)

    def _reset_timeout(self, duration: float | None = None) -> None:
        """Called for every command: only note the time; the one idle timer re-arms itself
        when it fires early (a call_later per command costs more than the command)."""
        self._last_activity = self.loop.time()
        if duration is not None:  # PROXY header wait: a real, shorter deadline
            if self._timeout_handle is not None:
                self._timeout_handle.cancel()
            self._timeout_handle = self.loop.call_later(duration, self._timeout_cb)
            self._timer_exact = True
        elif self._timeout_handle is None or self._timer_exact:
            if self._timeout_handle is not None:
                self._timeout_handle.cancel()
            self._timeout_handle = self.loop.call_later(self._timeout_duration, self._timeout_cb)
            self._timer_exact = False

    def _timeout_cb(self) -> None:
        idle = self.loop.time() - self._last_activity
        if not self._timer_exact and idle < self._timeout_duration:
            self._timeout_handle = self.loop.call_later(self._timeout_duration - idle,
                                                        self._timeout_cb)
            return
        self._close_with(replies.R421_IDLE_TIMEOUT)

    def _session_expired(self) -> None:
        self._close_with(replies.R421_SESSION_TIME)

    def _close_with(self, reply: str) -> None:
        if self.transport is not None and not self._closing:
            self._closing = True
            try:
                self._writer.write(b"".join(self._pending) + reply.encode() + b"\r\n")
                self._pending.clear()
            except Exception:
                pass
            self.transport.close()

    async def _close_after(self, reply: str) -> None:
        await self.push(reply)
        await self._flush()
        self._closing = True
        assert self.transport is not None
        self.transport.close()

    # ------------------------------------------------------------ the command loop
    async def _handle_client(self) -> None:
        try:
            await self._serve()
        except asyncio.CancelledError:
            raise
        except (ConnectionError, TLSSetupException):
            pass
        except Exception:
            log.exception("smtp session failed", ip=self.client_ip)
            if self.transport is not None:
                self._close_with(replies.R421_INTERNAL_ERROR)
        finally:
            self._release()

    def _release(self) -> None:
        self._close_spool()  # BDAT bytes of an open transaction
        self.ingress.conns.discard(self)
        if self.ingress.stopping and not self.ingress.conns:
            self.ingress._drained.set()
        if self.info is not None and self.ingress.sessions.pop(self.info.id, None) is not None:
            ip = self.info.ip
            self.ingress.per_ip[ip] -= 1
            if self.ingress.per_ip[ip] <= 0:
                del self.ingress.per_ip[ip]
            _m(ACTIVE, self.listener).dec()

    async def _serve(self) -> None:
        s = self.ingress.settings
        if s.proxy_protocol:
            try:
                client = await read_proxy_header(self._reader, s.proxy_protocol_timeout_s)
            except BadProxyHeader as exc:
                _m(CONNECTIONS, self.listener, "bad_proxy").inc()
                log.warning("invalid PROXY header", ip=self.client_ip, error=str(exc))
                assert self.transport is not None
                self.transport.close()
                return
            if client is not None:  # v2 LOCAL (health checks) keeps the socket peer
                self.client_ip, self.client_port = client
        refusal = self.ingress.admit(self.client_ip)
        if refusal and self.listener == "smtps":
            # no handshake for a client over its limits (issue 8, low): TLS costs more than
            # the refusal, and without TLS there is no way to say why
            _m(CONNECTIONS, self.listener, "refused").inc()
            assert self.transport is not None
            self.transport.close()
            return
        if self.listener == "smtps":
            await self._upgrade_tls()
        if refusal:
            _m(CONNECTIONS, self.listener, "refused").inc()
            await self._close_after(refusal)
            return
        self.ingress.conns.add(self)
        if s.reverse_dns:
            self._rdns = asyncio.ensure_future(asyncio.wait_for(reverse_dns(self.client_ip),
                                                                s.reverse_dns_timeout_s))
            self._rdns.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.info = SessionInfo(next(_ids), self.listener, self.client_ip, self.client_port,
                                datetime.now(UTC), tls=_tls_info(self._ssl_object()))
        self.ingress.sessions[self.info.id] = self.info
        self.ingress.per_ip[self.client_ip] += 1
        _m(ACTIVE, self.listener).inc()
        _m(CONNECTIONS, self.listener, "accepted").inc()

        await self._push_plain(replies.R220_GREETING.format(self.hostname))
        unknown = 0
        reader = self._reader
        while self.transport is not None and not self._closing:
            if b"\n" not in reader._buffer:  # type: ignore[attr-defined]
                await self._flush()  # nothing more pipelined: answer now
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.LimitOverrunError as exc:
                await self._discard_line(exc.consumed)
                await self.push(replies.R500_LINE_TOO_LONG)
                continue
            except asyncio.IncompleteReadError:
                return
            self.info.commands += 1
            if self.info.commands > s.max_commands:
                await self._close_after(replies.R421_TOO_MANY_COMMANDS)
                return
            line = line.rstrip(b"\r\n")
            command_bytes, _, arg_bytes = line.partition(b" ")
            try:
                command = command_bytes.upper().decode("ascii")
            except UnicodeDecodeError:
                command = ""
            if not command.isalpha() or b"\x00" in line:
                log.info("bad command line", ip=self.client_ip, line=repr(line[:60]))
                unknown += 1
                if unknown > s.max_unknown_commands:
                    await self._close_after(replies.R421_TOO_MANY_BAD_COMMANDS)
                    return
                await self.push(replies.R500_SYNTAX_ERROR)
                continue
            arg = arg_bytes.strip().decode("utf-8", "surrogateescape") if arg_bytes else None
            self.info.last_command = command
            if (self.require_starttls and not self.encrypted
                    and command not in ALLOWED_BEFORE_STARTTLS):
                await self.push(replies.R530_STARTTLS_FIRST)
                continue
            method = self._smtp_methods.get(command)
            if method is None:
                log.info("unknown command", ip=self.client_ip, command=command[:20])
                unknown += 1
                if unknown > s.max_unknown_commands:
                    await self._close_after(replies.R421_TOO_MANY_BAD_COMMANDS)
                    return
                await self.push(replies.R500_UNKNOWN_COMMAND.format(command[:20]))
                continue
            self._reset_timeout()
            self.busy = command in ("DATA", "BDAT")
            try:
                await method(arg)
            finally:
                self.busy = False
            if self.ingress.stopping:
                await self._close_after(replies.R421_SHUTDOWN)
                return

    async def _discard_line(self, consumed: int) -> None:
        await self._reader.readexactly(consumed)
        while True:
            try:
                await self._reader.readuntil(b"\n")
                return
            except asyncio.LimitOverrunError as e:
                await self._reader.readexactly(e.consumed)

    def _ssl_object(self) -> Any:
        return self.transport.get_extra_info("ssl_object") if self.transport else None

    async def _upgrade_tls(self) -> None:
        """Put TLS under the protocol (STARTTLS, or the start of an smtps connection)."""
        assert self.tls_context is not None
        waiter = self.loop.create_future()
        self._tls_protocol = sslproto.SSLProtocol(self.loop, self, self.tls_context, waiter,
                                                  server_side=True)
        self._original_transport = self.transport
        assert self._original_transport is not None
        self._original_transport.set_protocol(self._tls_protocol)
        self.transport = self._tls_protocol._app_transport
        self._tls_protocol.connection_made(self._original_transport)
        try:
            await waiter
        except asyncio.CancelledError:
            raise
        except Exception as error:
            raise TLSSetupException() from error

    # ------------------------------------------------------------ greeting commands
    async def smtp_HELO(self, hostname: str | None) -> None:
        if not hostname:
            await self.push(replies.R501_SYNTAX_HELO)
            return
        self._reset_transaction()
        assert self.session is not None
        self.session.extended_smtp = False
        self.session.host_name = hostname
        if self.info:
            self.info.helo = hostname[:255]
        await self._push_plain(replies.R250_HELO.format(self.hostname))

    async def smtp_EHLO(self, hostname: str | None) -> None:
        if not hostname:
            await self.push(replies.R501_SYNTAX_EHLO)
            return
        self._reset_transaction()
        assert self.session is not None
        self.session.extended_smtp = True
        self.session.host_name = hostname
        if self.info:
            self.info.helo = hostname[:255]
        lines = [self.hostname, "PIPELINING", f"SIZE {self.data_size_limit}", "8BITMIME",
                 "SMTPUTF8", "ENHANCEDSTATUSCODES", "CHUNKING", "DSN"]
        if self.tls_context is not None and not self.encrypted:
            lines.append("STARTTLS")
        if self.encrypted:  # RFC 4954 §4 + ARCHITECTURE.md: AUTH only over TLS, always
            lines.append("AUTH PLAIN LOGIN")
        text = "".join(f"250-{x}\r\n" for x in lines[:-1]) + f"250 {lines[-1]}"
        await self._push_plain(text)

    async def smtp_STARTTLS(self, arg: str | None) -> None:
        if arg:
            await self.push(replies.R501_SYNTAX_STARTTLS)
            return
        if self.tls_context is None:
            await self.push(replies.R454_TLS_UNAVAILABLE)
            return
        if self.encrypted:
            await self.push(replies.R503_TLS_ACTIVE)
            return
        await self.push(replies.R220_READY_FOR_TLS)
        await self._flush()
        await self._upgrade_tls()

    async def smtp_NOOP(self, arg: str | None) -> None:
        await self.push(replies.R250_DONE)

    async def smtp_RSET(self, arg: str | None) -> None:
        if arg:
            await self.push(replies.R501_SYNTAX_RSET)
            return
        self._reset_transaction()
        await self.push(replies.R250_DONE)

    async def smtp_QUIT(self, arg: str | None) -> None:
        await self.push(replies.R221_BYE)
        await self._flush()
        self._closing = True
        if self.transport is not None:
            self.transport.close()

    async def smtp_VRFY(self, arg: str | None) -> None:
        # RFC 5321 §3.5.3: 252 rather than a directory oracle
        if not arg:
            await self.push(replies.R501_SYNTAX_VRFY)
            return
        await self.push(replies.R252_VRFY)

    async def smtp_EXPN(self, arg: str | None) -> None:
        await self.push(replies.R502_EXPN)

    async def smtp_HELP(self, arg: str | None) -> None:
        await self.push(replies.R214_HELP)

    # ------------------------------------------------------------ AUTH (RFC 4954)
    async def smtp_AUTH(self, arg: str | None) -> None:
        assert self.session is not None and self.envelope is not None
        if not self.session.host_name or not self.session.extended_smtp:
            await self.push(replies.R503_EHLO_FIRST)
            return
        if not self.encrypted:
            await self.push(replies.R538_ENCRYPTION)
            return
        if self.authenticated:
            await self.push(replies.R503_ALREADY_AUTHENTICATED)
            return
        if self._in_transaction():
            await self.push(replies.R503_AUTH_IN_TRANSACTION)
            return
        args = (arg or "").split()
        if not args or len(args) > 2:
            await self.push(replies.R501_SYNTAX_AUTH)
            return
        mech = args[0].upper()
        if mech not in ("PLAIN", "LOGIN"):
            await self.push(replies.R504_AUTH_TYPE)
            return
        ing = self.ingress
        try:
            ip_failures = await ing.auth_failures.get("ip:" + self.client_ip)
        except Unavailable:
            await self.push(replies.R454_AUTH_TEMPORARY)
            return
        if policy.auth_throttled(ip_failures, 0, ip_limit=ing.settings.auth_fail_limit_ip,
                                 account_limit=0):
            _m(AUTHS, self.listener, "throttled").inc()
            ing.stats.add("auth", "throttled_ip")
            await self.push(replies.R454_AUTH_THROTTLED)
            return
        creds = await (self._auth_plain(args) if mech == "PLAIN" else self._auth_login(args))
        if creds is None:
            return
        username, password = creds
        try:
            account_failures = await ing.auth_failures.get("acct:" + username.lower())
            if policy.auth_throttled(0, account_failures, ip_limit=0,
                                     account_limit=ing.settings.auth_fail_limit_account):
                _m(AUTHS, self.listener, "throttled").inc()
                ing.stats.add("auth", "throttled_account")
                await self.push(replies.R454_AUTH_THROTTLED)
                return
            reply = await ing.directory.authenticate(username, password, self.client_ip)
        except Unavailable:
            _m(AUTHS, self.listener, "unavailable").inc()
            await self.push(replies.R454_AUTH_TEMPORARY)
            return
        if reply.ok:
            self._auth = reply
            self.session.authenticated = True
            if self.info:
                self.info.auth_user = reply.address or username
            _m(AUTHS, self.listener, "ok").inc()
            ing.stats.add("auth", "ok")
            await self.push(replies.R235_AUTHENTICATED)
            return
        if reply.reason == "throttled":
            await self.push(replies.R454_AUTH_THROTTLED)
            return
        _m(AUTHS, self.listener, "failed").inc()
        ing.stats.add("auth", "failed")
        try:
            await ing.auth_failures.incr("ip:" + self.client_ip)
            await ing.auth_failures.incr("acct:" + username.lower())
        except Unavailable:
            pass
        await self.push(replies.R535_INVALID)

    async def _read_b64(self, challenge: bytes) -> bytes | None:
        # challenges go out as "334 <base64>", no enhanced code (RFC 4954 §4)
        await self.push(b"334 " + base64.b64encode(challenge))
        await self._flush()
        try:
            line = await self._reader.readuntil(b"\n")
        except asyncio.LimitOverrunError:
            # answered at once, not after the client chose to end the line (issue 8, low)
            await self._close_after(replies.R500_AUTH_LINE_TOO_LONG)
            return None
        blob = line.strip()
        if blob == b"*":
            await self.push(replies.R501_AUTH_ABORTED)
            return None
        try:
            return base64.b64decode(blob, validate=True)
        except (binascii.Error, ValueError):
            await self.push(replies.R501_BAD_BASE64)
            return None

    async def _auth_plain(self, args: list[str]) -> tuple[str, str] | None:
        if len(args) == 2:
            if args[1] == "=":
                raw = b""
            else:
                try:
                    raw = base64.b64decode(args[1], validate=True)
                except (binascii.Error, ValueError):
                    await self.push(replies.R501_BAD_BASE64)
                    return None
        else:
            got = await self._read_b64(b"")
            if got is None:
                return None
            raw = got
        parts = raw.split(b"\x00")
        if len(parts) != 3 or not parts[1]:
            await self.push(replies.R501_BAD_PLAIN)
            return None
        if parts[0] and parts[0] != parts[1]:
            # RFC 4616 §2: acting as another identity (authzid) is not offered
            await self.push(replies.R535_AUTHZID)
            return None
        return parts[1].decode("utf-8", "replace"), parts[2].decode("utf-8", "replace")

    async def _auth_login(self, args: list[str]) -> tuple[str, str] | None:
        if len(args) == 2:
            try:
                user = base64.b64decode(args[1], validate=True)
            except (binascii.Error, ValueError):
                await self.push(replies.R501_BAD_BASE64)
                return None
        else:
            got = await self._read_b64(b"Username:")
            if got is None:
                return None
            user = got
        pw = await self._read_b64(b"Password:")
        if pw is None:
            return None
        return user.decode("utf-8", "replace"), pw.decode("utf-8", "replace")

    # ------------------------------------------------------------ the transaction
    def _in_transaction(self) -> bool:
        env = self.envelope
        return env is not None and getattr(env, "params", None) is not None

    async def _transaction_gate(self, command: str) -> bool:
        """Common checks before MAIL/RCPT/DATA/BDAT; True when a reply was sent."""
        assert self.session is not None
        if not self.session.host_name:
            await self.push(replies.R503_HELO_FIRST)
            return True
        if self.listener != "mx" and not self.authenticated:
            await self.push(replies.R530_AUTH_REQUIRED)
            return True
        return False

    async def smtp_MAIL(self, arg: str | None) -> None:
        if await self._transaction_gate("MAIL"):
            return
        assert self.session is not None and self.envelope is not None
        if self._in_transaction():
            await self.push(replies.R503_NESTED_MAIL)
            return
        if not arg or arg[:5].upper() != "FROM:":
            await self.push(replies.R501_SYNTAX_MAIL)
            return
        try:
            path, rest = proto.parse_path(arg[5:], allow_null=True, utf8=True)
            params = proto.parse_params(rest)
            if params and not self.session.extended_smtp:
                raise proto.ParamError(replies.R501_PARAMETERS_NEED_EHLO)
            mp = proto.mail_params(params, max_size=self.data_size_limit or 0)
        except proto.PathError as exc:
            await self.push(replies.R501_BAD_SENDER.format(exc))
            return
        except proto.ParamError as exc:
            await self.push(exc.reply)
            return
        if path.utf8 and not mp.smtputf8:
            await self.push(replies.R553_NEEDS_SMTPUTF8)
            return
        if self._auth is not None and not policy.sender_allowed(path.address, self._auth.send_as):
            self.ingress.stats.add("mail_rejected", "not_owner")
            await self.push(replies.R553_NOT_OWNER)
            return
        if (self.ingress.settings.reject_unauthenticated_local_senders and path.address
                and not self.ingress.may_relay(self.client_ip, self.authenticated)):
            # an unauthenticated client claiming one of our own domains (SPF may say
            # nothing): refused when the operator asks for it
            try:
                sender = await self.ingress.directory.resolve(path.address)
            except Unavailable:
                await self.push(replies.R451_DIRECTORY)
                return
            if sender.status != "remote":
                self.ingress.stats.add("mail_rejected", "local_sender")
                await self.push(replies.R550_LOCAL_SENDER)
                return
        env = self.envelope
        env.mail_from = path.address
        env.smtp_utf8 = mp.smtputf8
        env.params = mp  # type: ignore[attr-defined]
        env.recipients = []  # type: ignore[attr-defined]
        env.seen = set()  # type: ignore[attr-defined]
        env.mode = None  # type: ignore[attr-defined]  # "DATA" or "BDAT" once started
        # where BDAT chunks go (DATA opens its own spool)
        env.spool = self.ingress.spool.open(self.ingress.inline_threshold)  # type: ignore[attr-defined]
        if (delay := self.ingress.flow_delay()) > 0:  # intake follows delivery
            FLOW_DELAYS.inc()
            FLOW_DELAY_SECONDS.inc(delay)
            await asyncio.sleep(delay)
        await self.push(replies.R250_OK)

    async def smtp_RCPT(self, arg: str | None) -> None:
        if await self._transaction_gate("RCPT"):
            return
        assert self.envelope is not None
        if not self._in_transaction():
            await self.push(replies.R503_NEED_MAIL)
            return
        env: Any = self.envelope
        if env.mode is not None:
            await self.push(replies.R503_RCPT_AFTER_DATA)
            return
        if not arg or arg[:3].upper() != "TO:":
            await self.push(replies.R501_SYNTAX_RCPT)
            return
        target = arg[3:].strip()
        if target[:12].lower() == "<postmaster>":
            # RFC 5321 §4.5.1: <Postmaster> without a domain must be accepted
            target = f"<postmaster@{self.ingress.hostname}>" + target[12:]
        try:
            path, rest = proto.parse_path(target, allow_null=False, utf8=env.params.smtputf8)
            params = proto.parse_params(rest)
            if params and not self.session.extended_smtp:  # type: ignore[union-attr]
                raise proto.ParamError(replies.R501_PARAMETERS_NEED_EHLO)
            rp = proto.rcpt_params(params)
        except proto.PathError as exc:
            await self.push(replies.R501_BAD_RECIPIENT.format(exc))
            return
        except proto.ParamError as exc:
            await self.push(exc.reply)
            return
        if len(env.recipients) >= self.ingress.settings.max_recipients:
            self._count_rcpt("deferred", "too_many_recipients")
            await self.push(replies.R452_TOO_MANY_RCPTS)
            return
        may_relay = self.ingress.may_relay(self.client_ip, self.authenticated)
        refusal = policy.recipient_needs_lookup(
            path, may_relay=may_relay, null_sender=env.mail_from == "",
            private_literals=self.ingress.settings.common.allow_private_address_literals)
        answer = None
        if refusal is None:
            try:
                answer = await self.ingress.directory.resolve(path.address)
            except Unavailable:
                self._count_rcpt("deferred", "directory_unavailable")
                await self.push(replies.R451_DIRECTORY)
                return
            decision = policy.recipient_decision(answer, may_relay=may_relay)
            if not policy.null_sender_may_relay(env.mail_from, answer):
                decision = policy.Refuse(replies.R550_NULL_SENDER_RELAY, "null_sender_relay")
        else:
            decision = refusal
        match decision:
            case policy.Refuse(reply=reply, reason=reason):
                self._count_rcpt("rejected", reason)
                await self.push(reply)
            case policy.Accept(reply=reply):
                key = path.address.lower()
                if key not in env.seen:
                    env.seen.add(key)
                    env.recipients.append(Recipient(address=path.address, orcpt=rp.orcpt,
                                                    notify=list(rp.notify),  # type: ignore[arg-type]
                                                    resolved=answer))
                    env.rcpt_tos.append(path.address)
                self._count_rcpt("accepted", "ok")
                await self.push(reply)

    def _count_rcpt(self, outcome: str, reason: str) -> None:
        _m(RECIPIENTS, self.listener, outcome, reason).inc()
        self.ingress.stats.add("rcpt_" + outcome, reason)

    async def smtp_DATA(self, arg: str | None) -> None:
        if await self._transaction_gate("DATA"):
            return
        env: Any = self.envelope
        if not self._in_transaction():
            await self.push(replies.R503_NEED_MAIL)
            return
        if env.mode == "BDAT":
            await self.push(replies.R503_DATA_AFTER_BDAT)
            return
        if not env.recipients:
            await self.push(replies.R503_NEED_RCPT)
            return
        if arg:
            await self.push(replies.R501_SYNTAX_DATA)
            return
        env.mode = "DATA"
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        await self._flush()
        data = proto.DataReader(max_size=self.data_size_limit or 0,
                                max_line=self.ingress.settings.max_line_length)
        spool = self.ingress.spool.open(self.ingress.inline_threshold)
        reader = self._reader
        try:
            while True:
                chunk = await reader.read(READ_CHUNK)
                if not chunk:
                    raise ConnectionResetError("EOF during DATA")
                got, rest = data.feed(chunk)
                if got and not spool.write(got):
                    data.drop()  # no room: read to the end, keep nothing, answer 451
                if data.dropped or data.overflow:
                    spool.close()  # what it holds will not be used
                if rest is not None:
                    if rest:
                        # pipelined commands after the final dot (RFC 2920 §3.1) go back
                        # to the reader for the command loop
                        reader._buffer[0:0] = rest  # type: ignore[attr-defined]
                    break
                self._reset_timeout()
            self._reset_timeout()
            if data.dropped:
                await self._refuse_message(replies.R451_NO_ROOM, "no_room")
                return
            problem = data.problem()
            if problem is not None:
                await self._refuse_message(problem.reply, problem.reason)
                return
            await self._accept_message(spool)
        finally:
            spool.close()

    async def smtp_BDAT(self, arg: str | None) -> None:
        parsed = proto.parse_bdat(arg)
        if parsed is None:
            # the size is unknown, so the chunk cannot be skipped: close (RFC 3030 §4)
            await self._close_after(replies.R501_SYNTAX_BDAT)
            return
        size, last = parsed
        env: Any = self.envelope
        limit = self.data_size_limit or 2**31
        keep = (self._in_transaction() and env.mode != "DATA"
                and env.spool.size + size <= limit)
        room = keep
        remaining = size
        while remaining:
            piece = await self._reader.readexactly(min(remaining, READ_CHUNK))
            remaining -= len(piece)
            if room and not env.spool.write(piece):
                room = False  # read the chunk to its end, keep nothing, answer 451
                env.spool.close()
            self._reset_timeout()
        if keep and not room:
            await self._refuse_message(replies.R451_NO_ROOM, "no_room")
            return
        if await self._transaction_gate("BDAT"):
            return
        if not self._in_transaction():
            await self.push(replies.R503_NEED_MAIL)
            return
        if env.mode == "DATA":
            await self.push(replies.R503_BDAT_AFTER_DATA)
            return
        if not env.recipients:
            await self.push(replies.R503_NEED_RCPT)
            return
        env.mode = "BDAT"
        if not keep:
            await self._refuse_message(replies.R552_TOO_BIG, "too_big")
            return
        if not last:
            await self.push(replies.R250_CHUNK.format(size))
            return
        await self._accept_message(env.spool)

    async def _reverse_name(self) -> str | None:
        if self._rdns is None:
            return None
        try:
            return await asyncio.shield(self._rdns)
        except (TimeoutError, OSError):
            return None

    async def _refuse_message(self, reply: str, reason: str) -> None:
        _m(MESSAGES, self.listener, "rejected", reason).inc()
        self.ingress.stats.add("message_rejected", reason)
        log.info("message refused", ip=self.client_ip, reason=reason)
        self._reset_transaction()
        await self.push(reply)

    async def _accept_message(self, body: Spool) -> None:
        """Queue the message whose body is in ``body`` (the caller closes it) and answer 250
        once it is durable: a body over the inline threshold is uploaded to S3 from the
        spool first, streamed, then the JetStream publish is acked."""
        started = time.perf_counter()
        env: Any = self.envelope
        ing = self.ingress
        qid = policy.new_queue_id()
        now = datetime.now(UTC)
        ssl_obj = self._ssl_object()
        tls = _tls_info(ssl_obj)
        rdns = await self._reverse_name()
        auth_user = self._auth.address if self._auth else None
        assert self.session is not None
        header = policy.received_header(
            helo=self.session.host_name, ip=self.client_ip, rdns=rdns, hostname=ing.hostname,
            esmtp=bool(self.session.extended_smtp), tls=tls, auth_user=auth_user,
            utf8=bool(env.params.smtputf8), queue_id=qid,
            rcpt=env.recipients[0].address if len(env.recipients) == 1 else None, when=now)
        size = len(header) + body.size
        try:
            if size > ing.inline_threshold:
                async with ing.uploads:
                    ref = BodyRef(size=size, blob_key=await ing.bodies.put_file(header,
                                                                                body.reader()))
            else:
                ref = BodyRef(size=size, inline=header + body.contents())
            msg = MailReceived(
                queue_id=qid, received_at=now,
                client=ClientInfo(ip=self.client_ip, port=self.client_port, reverse_dns=rdns,
                                  helo=self.session.host_name, listener=self.listener,  # type: ignore[arg-type]
                                  tls=tls, auth_user=auth_user),
                mail_from=env.mail_from, rcpt_to=env.recipients, body=ref,
                body_type=env.params.body, smtputf8=env.params.smtputf8,
                dsn_envid=env.params.envid, dsn_ret=env.params.ret)
            await ing.queue.publish(msg)
        except Unavailable as exc:
            log.warning("could not queue message", error=str(exc)[:200], ip=self.client_ip)
            await self._refuse_message(replies.R451_QUEUE, "queue_unavailable")
            return
        elapsed = time.perf_counter() - started
        _m(ACCEPT_LATENCY, self.listener).observe(elapsed)
        _m(MESSAGES, self.listener, "accepted", "ok").inc()
        _m(BYTES, self.listener).inc(size)
        ing.stats.add("message_accepted", "ok")
        if self.info:
            self.info.messages += 1
        self._reset_transaction()
        await self.push(replies.R250_QUEUED.format(qid))


_COMMANDS = frozenset(m[5:] for m in dir(IngressSMTP) if m.startswith("smtp_"))
