"""SMTP listeners (mx, submission, smtps): sockets, TLS (STARTTLS and implicit TLS), the PROXY
protocol, admission, timeouts and graceful stop. Each connection feeds a
``protocols.smtp.Receiver`` and a ``session.Session``, and writes what the session answers;
every SMTP decision is the session's. No aiosmtpd here (ADR 0013).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from postbus.kit.logging import get_logger
from postbus.kit.metrics import counter, gauge
from postbus.kit.net import BadProxyHeader, read_proxy_header
from postbus.kit.tls import discard_buffered
from postbus.protocols import smtp_replies as replies
from postbus.protocols.smtp import Bdat, Data, Receiver
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
from postbus.smtp_ingress.session import (
    Peer,
    Session,
    SessionInfo,
    Shared,
    labelled,
    line,
    receiver_for,
)
from postbus.smtp_ingress.settings import Settings

log = get_logger(__name__)

CONNECTIONS = counter("postbus_smtp_connections_total", "SMTP connections",
                      ["listener", "outcome"])
ACTIVE = gauge("postbus_smtp_sessions_active", "Open SMTP sessions", ["listener"])
QUEUE_DEPTH = gauge("postbus_smtp_queue_depth",
                    "Accepted messages waiting for mime-processor or the store (in-flow delay)")

_REFUSAL_REASONS = {replies.R421_BUSY: "max_connections", replies.R421_TOO_MANY_CONN: "per_ip_limit",
                    replies.R421_RATE: "rate_limit"}

# Reads: message data in large pieces; command lines in small ones, so one read of
# pipelined junk yields a bounded number of items (the receiver holds at most one partial
# line, max_command_length octets, between reads)
READ_CHUNK = 256 * 1024
COMMAND_READ = 16 * 1024

_ids = itertools.count(1)


class Ingress(Shared):
    """What every connection of this process shares: settings, ports, limits, sessions."""

    def __init__(self, settings: Settings, *, directory: Directory, queue: Queue, bodies: Bodies,
                 auth_failures: Counters, blocklist: BlockList,
                 tls_context: ssl.SSLContext | None, load_share: LoadShare | None = None,
                 backlog: Backlog | None = None) -> None:
        super().__init__(settings, directory=directory, queue=queue, bodies=bodies,
                         auth_failures=auth_failures)
        self.load_share = load_share
        self.backlog = backlog
        self._flow_task: asyncio.Task[None] | None = None
        self.blocklist = blocklist
        self.tls_context = tls_context
        self.limits = policy.ConnLimits(settings.max_connections, settings.max_connections_per_ip,
                                        settings.connection_rate_per_ip)
        self.rate = policy.RateWindow()
        self.per_ip: Counter[str] = Counter()
        self.sessions: dict[int, SessionInfo] = {}
        self.conns: set[Connection] = set()
        self.stopping = False
        self._drained = asyncio.Event()
        self.servers: list[asyncio.Server] = []
        self.ports: dict[str, int] = {}

    # ------------------------------------------------------------ listeners
    async def start(self) -> dict[str, int]:
        """Open the listeners; returns listener -> bound port."""
        self.spool.prepare()
        if self.backlog is not None and self.settings.flow_backlog_threshold > 0:
            self._flow_task = asyncio.create_task(self._watch_backlog(), name="smtp-in-flow")
        wanted = {"mx": self.settings.smtp_port, "submission": self.settings.submission_port,
                  "smtps": self.settings.smtps_port}
        for name, port in wanted.items():
            if port < 0 or (name == "smtps" and self.tls_context is None):
                continue
            # the StreamReader pauses the socket past twice its limit: a client that sends
            # faster than we read is held at a few KiB (what aiosmtpd's reader did)
            server = await asyncio.start_server(self._handler(name), self.settings.host, port,
                                                backlog=1024, reuse_address=True,
                                                limit=self.settings.max_command_length)
            self.servers.append(server)
            self.ports[name] = int(server.sockets[0].getsockname()[1])
            log.info("listening", listener=name, port=self.ports[name])
        return self.ports

    def _handler(self, listener: str) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                                  Awaitable[None]]:
        async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await Connection(self, listener, reader, writer).run()

        return on_client

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
                conn.close_with(replies.R421_SHUTDOWN)
        if self.conns:
            self._drained.clear()
            with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                await asyncio.wait_for(self._drained.wait(), grace_s)
        for conn in list(self.conns):
            conn.close_with(replies.R421_SHUTDOWN)

    def released(self, conn: Connection) -> None:
        self.conns.discard(conn)
        if self.stopping and not self.conns:
            self._drained.set()

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

    # ------------------------------------------------------------ admission
    def admit(self, ip: str) -> str | None:
        """None when this client may talk to us, else the reply to close with."""
        if self.blocklist.blocked(ip):
            self.stats.refusal_tally.inc("blocked")
            return replies.R554_BLOCKED
        recent = self.rate.hit(ip) if self.limits.rate_per_minute else 0
        from_ip = self.per_ip[ip]
        if self.load_share is not None:
            other_open, other_recent = self.load_share.remote(ip)
            from_ip, recent = from_ip + other_open, recent + other_recent
        refusal = policy.connection_decision(total=len(self.sessions), from_ip=from_ip,
                                             recent=recent, limits=self.limits)
        if refusal:
            self.stats.refusal_tally.inc(_REFUSAL_REASONS.get(refusal, "limit"))
        return refusal

    def load_snapshot(self) -> dict[str, list[int]]:
        """This replica's per-IP counts for the other replicas (see adapters.KvLoadShare)."""
        recent = self.rate.counts() if self.limits.rate_per_minute else {}
        return policy.load_snapshot(dict(self.per_ip), recent)


async def reverse_dns(ip: str) -> str | None:
    """Forward-confirmed reverse DNS (the PTR name, if that name resolves back to ``ip``),
    through the system resolver (so /etc/hosts counts too); None otherwise."""
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


class Connection:
    """One SMTP connection (RFC 5321) on one of the listeners mx, submission, smtps: reads
    into the receiver, hands items to the session, writes its replies (pipelined replies
    together, when no further command is waiting: RFC 2920 §3.1)."""

    def __init__(self, ingress: Ingress, listener: str, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.ingress = ingress
        self.listener = listener
        self.reader = reader
        self.writer = writer
        self.loop = asyncio.get_running_loop()
        peer = writer.get_extra_info("peername") or ("", 0)
        self.ip, self.port = str(peer[0]), int(peer[1]) if len(peer) > 1 else 0
        self.out: list[bytes] = []
        self.closing = False
        self.busy = False  # reading or queueing a message: finish it before shutdown
        self.session: Session | None = None
        self.info: SessionInfo | None = None
        self.rdns: asyncio.Future[str | None] | None = None
        self.last_activity = self.loop.time()
        self._idle: asyncio.TimerHandle | None = None
        self._deadline: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------ output
    async def flush(self) -> None:
        if self.out and not self.closing:
            data = b"".join(self.out)
            self.out.clear()
            self.writer.write(data)
            await self.writer.drain()

    def close_with(self, reply: str) -> None:
        """Write what is pending and ``reply``, then close (timeouts, shutdown)."""
        if self.closing:
            return
        self.closing = True
        with contextlib.suppress(Exception):
            self.writer.write(b"".join(self.out) + line(reply))
            self.out.clear()
        self.writer.close()

    async def close_after(self, reply: str) -> None:
        self.out.append(line(reply))
        await self.flush()
        self.closing = True
        self.writer.close()

    # ------------------------------------------------------------ timers
    def _idle_check(self) -> None:
        """One idle timer per connection that re-arms itself when it fires early (a
        call_later per read costs more than the read)."""
        timeout = self.ingress.settings.idle_timeout_s
        idle = self.loop.time() - self.last_activity
        if idle < timeout:
            self._idle = self.loop.call_later(timeout - idle, self._idle_check)
            return
        self.close_with(replies.R421_IDLE_TIMEOUT)

    def _session_expired(self) -> None:
        self.close_with(replies.R421_SESSION_TIME)

    # ------------------------------------------------------------ the connection
    async def run(self) -> None:
        s = self.ingress.settings
        self._deadline = self.loop.call_later(s.session_timeout_s, self._session_expired)
        try:
            await self._serve()
        except asyncio.CancelledError:
            raise
        except (ConnectionError, ssl.SSLError, OSError, asyncio.IncompleteReadError):
            pass
        except Exception:
            log.exception("smtp session failed", ip=self.ip)
            self.close_with(replies.R421_INTERNAL_ERROR)
        finally:
            self._release()

    def _release(self) -> None:
        for timer in (self._idle, self._deadline):
            if timer is not None:
                timer.cancel()
        if self.rdns is not None and not self.rdns.done():
            self.rdns.cancel()
        if self.session is not None:
            self.session.close()  # the message bytes it held
        self.closing = True
        self.writer.close()
        ing = self.ingress
        ing.released(self)
        if self.info is not None and ing.sessions.pop(self.info.id, None) is not None:
            ing.per_ip[self.ip] -= 1
            if ing.per_ip[self.ip] <= 0:
                del ing.per_ip[self.ip]
            labelled(ACTIVE, self.listener).dec()

    async def _serve(self) -> None:
        ing, s = self.ingress, self.ingress.settings
        if s.proxy_protocol:
            try:
                client = await read_proxy_header(self.reader, s.proxy_protocol_timeout_s)
            except BadProxyHeader as exc:
                labelled(CONNECTIONS, self.listener, "bad_proxy").inc()
                log.warning("invalid PROXY header", ip=self.ip, error=str(exc))
                return
            if client is not None:  # v2 LOCAL (health checks) keeps the socket peer
                self.ip, self.port = client
        refusal = ing.admit(self.ip)
        if refusal and self.listener == "smtps":
            # no handshake for a client over its limits (issue 8, low): TLS costs more than
            # the refusal, and without TLS there is no way to say why
            labelled(CONNECTIONS, self.listener, "refused").inc()
            return
        if self.listener == "smtps":
            await self._start_tls()
        if refusal:
            labelled(CONNECTIONS, self.listener, "refused").inc()
            await self.close_after(refusal)
            return
        ing.conns.add(self)
        if s.reverse_dns:
            self.rdns = asyncio.ensure_future(asyncio.wait_for(reverse_dns(self.ip),
                                                               s.reverse_dns_timeout_s))
            self.rdns.add_done_callback(lambda f: f.cancelled() or f.exception())
        tls = _tls_info(self.writer.get_extra_info("ssl_object"))
        self.info = SessionInfo(next(_ids), self.listener, self.ip, self.port,
                                datetime.now(UTC), tls=tls)
        ing.sessions[self.info.id] = self.info
        ing.per_ip[self.ip] += 1
        labelled(ACTIVE, self.listener).inc()
        labelled(CONNECTIONS, self.listener, "accepted").inc()
        self.session = Session(ing, Peer(self.ip, self.port, self.listener, tls,
                                         ing.tls_context is not None),
                               info=self.info, reverse_name=self._reverse_name)
        self.out.append(self.session.greeting())
        self.last_activity = self.loop.time()
        self._idle = self.loop.call_later(s.idle_timeout_s, self._idle_check)
        await self._converse(self.session, receiver_for(s))

    async def _converse(self, session: Session, receiver: Receiver) -> None:
        ing = self.ingress
        data = b""
        while not self.closing:
            items = receiver.feed(data)
            data = b""
            if not items:
                await self.flush()  # nothing more pipelined: answer now
                data = await self.reader.read(
                    COMMAND_READ if receiver.mode == "command" else READ_CHUNK)
                if not data:
                    return
                continue
            # idle means no command and no message data, not no octets: a line that never
            # ends, sent an octet at a time, does not keep a session open (as before)
            self.last_activity = self.loop.time()
            for item in items:
                self.busy = session.busy or isinstance(item, Data | Bdat)
                reply = await session.handle(item)
                self.busy = session.busy
                if self.closing:  # closed meanwhile (timeout, shutdown)
                    return
                if reply.data:
                    self.out.append(reply.data)
                if reply.close:
                    await self.close_after_pending()
                    return
                if reply.read_data:
                    receiver.start_data()
                    await self.flush()
                elif reply.read_chunk is not None:
                    receiver.start_chunk(reply.read_chunk)
                elif reply.starttls:
                    # RFC 3207 §4.2 / CVE-2011-0411: nothing sent before the handshake counts,
                    # whether the receiver or the stream holds it
                    dropped = receiver.pending() + await discard_buffered(
                        self.reader, self.writer, READ_CHUNK)
                    if dropped:
                        log.info("data pipelined after STARTTLS discarded", ip=self.ip,
                                 octets=dropped)
                    receiver.discard()
                    await self.flush()
                    await self._start_tls()  # resumes reading once TLS has the socket
                    session.tls_started(_tls_info(self.writer.get_extra_info("ssl_object")))
                    break
                if ing.stopping and not session.busy:
                    await self.close_after(replies.R421_SHUTDOWN)
                    return

    async def close_after_pending(self) -> None:
        await self.flush()
        self.closing = True
        self.writer.close()

    async def _start_tls(self) -> None:
        """Put TLS under the connection (STARTTLS, or the start of an smtps connection)."""
        assert self.ingress.tls_context is not None
        await self.writer.start_tls(self.ingress.tls_context)

    async def _reverse_name(self) -> str | None:
        if self.rdns is None:
            return None
        try:
            return await asyncio.shield(self.rdns)
        except (TimeoutError, OSError):
            return None
