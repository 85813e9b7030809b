"""IMAP listeners (asyncio streams): port 143-style with STARTTLS and 993-style implicit TLS.

Reads bytes into the pure ``Receiver``, hands every command to a ``Session`` and writes
what it answers. Owns timeouts (RFC 3501 §5.4), the command budget and TLS upgrades.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
import zlib
from dataclasses import dataclass, field, replace
from typing import Any

from postbus.imap_access.metacache import MetaCache
from postbus.imap_access.ports import Blobs, Changes, Directory, Store
from postbus.imap_access.session import Session, SessionConfig
from postbus.imap_access.settings import Settings
from postbus.kit.flow import RecentFailures
from postbus.kit.logging import get_logger
from postbus.kit.metrics import counter, gauge
from postbus.kit.net import (
    BadProxyHeader,
    PerIpLimit,
    is_loopback,
    linger_close,
    read_proxy_header,
)
from postbus.kit.tls import discard_buffered
from postbus.protocols.imap_parser import Continue, Limits, RawLine, Receiver

log = get_logger(__name__)

SESSIONS = gauge("postbus_imap_sessions", "Open IMAP sessions", ["listener"])
CONNECTIONS = counter("postbus_imap_connections_total", "IMAP connections accepted",
                      ["listener"])
REFUSED = counter("postbus_imap_connections_refused_total",
                  "IMAP connections refused: too many from one address", ["listener"])
READ_SIZE = 64 * 1024


class _Deflate:
    """COMPRESS=DEFLATE (RFC 4978): raw DEFLATE both ways (no zlib header, no dictionary).
    Each batch of output ends in a sync flush (§3: the client must see every response at
    once). Input is inflated at most ``max_out`` octets at a time and only when the
    receiver wants more, so a few compressed kilobytes never become megabytes in memory:
    the compressed rest waits in ``unconsumed_tail`` and nothing more is read meanwhile."""

    def __init__(self) -> None:
        self._z = zlib.compressobj(6, zlib.DEFLATED, -15)
        self._d = zlib.decompressobj(-15)
        self._in = b""  # compressed input not inflated yet
        self.more = False  # inflate() may return more without new input

    def deflate(self, data: bytes) -> bytes:
        return self._z.compress(data) + self._z.flush(zlib.Z_SYNC_FLUSH)

    def push(self, data: bytes) -> None:
        """Compressed octets from the socket; zlib.error if the stream had ended."""
        if self._d.eof and data:
            raise zlib.error("data after the end of the compressed stream")
        self._in += data
        self.more = bool(self._in)

    def inflate(self, max_out: int) -> bytes:
        """Up to ``max_out`` inflated octets; zlib.error on corrupt input."""
        before = len(self._in)
        out = self._d.decompress(self._in, max_out)
        self._in = self._d.unconsumed_tail
        if self._d.eof and self._d.unused_data:
            raise zlib.error("data after the end of the compressed stream")
        progressed = bool(out) or len(self._in) < before
        # a full batch may leave output inside zlib even when all input was taken
        self.more = progressed and (bool(self._in) or len(out) == max_out)
        return out


class _Out:
    """Responses are gathered and handed to the socket at a drain: one send per command
    (or per pipelined batch) instead of one per response line; after COMPRESS, each such
    batch is one deflated, flushed block."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.bytes = 0  # gathered since the last drain
        self._parts: list[bytes] = []
        self.deflate: _Deflate | None = None

    def write(self, data: bytes) -> None:
        self.bytes += len(data)
        self._parts.append(data)

    def flush(self) -> None:
        if self._parts:
            data = b"".join(self._parts)
            self._parts.clear()
            self.writer.write(data if self.deflate is None else self.deflate.deflate(data))
        self.bytes = 0

    async def drain(self) -> None:
        self.flush()
        await self.writer.drain()


def _ack_quickly(writer: asyncio.StreamWriter) -> None:
    """After a continuation request, acknowledge the literal at once (Linux TCP_QUICKACK).
    Clients that write a literal and its closing CRLF in two sends (Python's imaplib does)
    have Nagle hold the CRLF until the literal is acknowledged, and a delayed ACK made
    every APPEND wait 40 ms: p50 61 ms on an idle server, 15 ms with this."""
    sock = writer.get_extra_info("socket")
    quickack = getattr(socket, "TCP_QUICKACK", None)
    if sock is not None and quickack is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, quickack, 1)


def _tls_compression(writer: asyncio.StreamWriter) -> str | None:
    """"TLS" when the TLS layer compresses already (COMPRESS is then NO, RFC 4978 §3)."""
    obj = writer.get_extra_info("ssl_object")
    return "TLS" if obj is not None and obj.compression() is not None else None


@dataclass
class ImapServer:
    settings: Settings
    directory: Directory
    store: Store
    blobs: Blobs
    changes: Changes
    tls: ssl.SSLContext | None = None
    sessions: dict[str, Session] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    _servers: list[asyncio.Server] = field(default_factory=list)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _outs: dict[str, _Out] = field(default_factory=dict)
    meta_cache: MetaCache = field(init=False)
    per_ip: PerIpLimit = field(init=False)
    ip_failures: RecentFailures = field(init=False)

    def __post_init__(self) -> None:
        self.ip_failures = RecentFailures(self.settings.max_auth_failures_ip,
                                          self.settings.auth_failure_window_s)
        self.meta_cache = MetaCache(self.settings.meta_cache_mb * 1024 * 1024)
        self.per_ip = PerIpLimit(self.settings.max_connections_per_ip)

    def kick(self, session_id: str, reason: str = "Disconnected by an administrator") -> bool:
        """Say BYE to one session and close its connection; False when there is none."""
        session, out = self.sessions.get(session_id), self._outs.get(session_id)
        if session is None or out is None:
            return False
        with contextlib.suppress(Exception):
            session.bye(reason)
            out.flush()
            out.writer.close()
        return True

    def session_config(self) -> SessionConfig:
        s = self.settings
        return SessionConfig(auth_fail_delay_s=s.auth_fail_delay_s,
                             max_auth_failures=s.max_auth_failures, fetch_batch=s.fetch_batch,
                             fetch_bytes_in_flight=s.fetch_bytes_in_flight,
                             summarize_append_max=s.common.inline_threshold,
                             inline_body_max=s.common.inline_body_max,
                             hostname=s.common.hostname,
                             starttls_available=self.tls is not None,
                             append_limit=s.max_literal, compress_available=True)

    async def start(self, host: str, imap_port: int | None,
                    imaps_port: int | None) -> list[int]:
        """Listen; returns the bound ports (useful with port 0)."""
        ports = []
        if imap_port is not None:
            srv = await asyncio.start_server(lambda r, w: self._spawn(r, w, "imap", False),
                                             host, imap_port, limit=READ_SIZE)
            self._servers.append(srv)
            ports.append(srv.sockets[0].getsockname()[1])
        if imaps_port is not None and self.tls is not None:
            # behind PROXY protocol the header comes before the handshake (see _serve)
            tls = None if self.settings.proxy_protocol else self.tls
            srv = await asyncio.start_server(lambda r, w: self._spawn(r, w, "imaps", True),
                                             host, imaps_port, ssl=tls, limit=READ_SIZE)
            self._servers.append(srv)
            ports.append(srv.sockets[0].getsockname()[1])
        return ports

    async def check(self) -> None:
        """Readiness: every listener is accepting connections."""
        if not self._servers or not all(srv.is_serving() for srv in self._servers):
            raise RuntimeError("IMAP listeners are not serving")

    async def stop(self) -> None:
        for srv in self._servers:
            srv.close()
        for s in list(self.sessions.values()):
            with contextlib.suppress(Exception):
                s.bye("Server shutting down")
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for srv in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(srv.wait_closed(), 2)

    async def _spawn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     listener: str, implicit_tls: bool) -> None:
        t = asyncio.current_task()
        if t is not None:
            self._tasks.add(t)
        SESSIONS.labels(listener).inc()
        CONNECTIONS.labels(listener).inc()
        try:
            await self._serve(reader, writer, listener, implicit_tls)
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError, TimeoutError):
            pass
        except Exception:
            log.exception("connection failed", listener=listener)
        finally:
            SESSIONS.labels(listener).dec()
            if t is not None:
                self._tasks.discard(t)
            with contextlib.suppress(Exception):
                writer.close()
                await asyncio.wait_for(writer.wait_closed(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     listener: str, implicit_tls: bool) -> None:
        s = self.settings
        peer = writer.get_extra_info("peername") or ("?", 0)
        ip = str(peer[0])
        if s.proxy_protocol:
            try:
                client = await read_proxy_header(reader, s.proxy_protocol_timeout_s)
            except BadProxyHeader as exc:
                log.warning("connection without a valid PROXY header", peer=ip, error=str(exc))
                return
            if client is not None:
                ip = client[0]
            if implicit_tls:
                assert self.tls is not None
                await writer.start_tls(self.tls)
        secure = implicit_tls or (s.loopback_is_secure and is_loopback(ip))
        out = _Out(writer)
        session = Session(directory=self.directory, store=self.store, blobs=self.blobs,
                          changes=self.changes, out=out, config=self.session_config(),
                          client_ip=ip, secure=secure, tls=implicit_tls, listener=listener,
                          meta_cache=self.meta_cache, ip_failures=self.ip_failures)
        session.compression = _tls_compression(writer)
        if len(self.sessions) >= s.max_sessions:
            out.write(b"* BYE [UNAVAILABLE] Too many connections, try later\r\n")
            await out.drain()
            return
        if not self.per_ip.admit(ip):  # one address cannot take every session (issue 8.5)
            REFUSED.labels(listener).inc()
            log.warning("too many connections from one address", ip=ip)
            out.write(b"* BYE [UNAVAILABLE] Too many connections from your address\r\n")
            await out.drain()
            return
        try:
            await self._session(session, reader, writer, out)
        finally:
            self.per_ip.release(ip)

    def _limits(self, authenticated: bool, compressed: bool) -> Limits:
        limits = self.settings.limits(authenticated)
        # a few compressed octets can carry megabytes to throw away: past a limit, close
        # (as before login) rather than inflate and skip the rest
        return replace(limits, skip_oversized=False) if compressed else limits

    async def _session(self, session: Session, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter, out: _Out) -> None:
        s = self.settings
        self.sessions[session.info.id] = session
        self._outs[session.info.id] = out
        rx = Receiver(limits=s.limits(authenticated=False))
        authenticated = False
        deflate: _Deflate | None = None
        read_task: asyncio.Task[bytes] | None = None
        try:
            session.greeting()
            await out.drain()
            commands = 0
            started = time.monotonic()
            deadline = started + s.max_session_s
            preauth_deadline = started + min(s.preauth_deadline_s, s.max_session_s)
            while not session.closed:
                item = rx.next()
                if item is None and deflate is not None and deflate.more:
                    try:  # one bounded batch for the receiver, as one read would be
                        rx.push(deflate.inflate(READ_SIZE))
                    except zlib.error:
                        session.bye("Corrupt compressed input")
                        break
                    continue
                if item is None:
                    if read_task is None:
                        read_task = asyncio.ensure_future(reader.read(READ_SIZE))
                    if authenticated:
                        timeout, left = s.idle_timeout_s, deadline - time.monotonic()
                    else:
                        timeout, left = s.preauth_timeout_s, preauth_deadline - time.monotonic()
                    if left <= 0:
                        session.bye("Session time limit reached")
                        break
                    timeout = min(timeout, left)
                    waits: set[asyncio.Future[Any]] = {read_task}
                    wake = None
                    if session.idling:
                        wake = asyncio.ensure_future(session.wakeup.wait())
                        waits.add(wake)
                    done, _ = await asyncio.wait(waits, timeout=timeout,
                                                 return_when=asyncio.FIRST_COMPLETED)
                    if wake is not None and not wake.done():
                        wake.cancel()
                    if not done:
                        session.bye("Autologout; idle for too long" if timeout < left
                                    else "Session time limit reached")
                        break
                    if wake is not None and wake in done:
                        await session.idle_updates()
                    if read_task.done():
                        data = read_task.result()
                        read_task = None
                        if not data:
                            break
                        if deflate is None:
                            rx.push(data)
                        else:
                            try:
                                deflate.push(data)
                            except zlib.error:
                                session.bye("Corrupt compressed input")
                                break
                    continue
                if not isinstance(item, Continue | RawLine):
                    commands += 1
                    if commands > s.max_commands:
                        session.bye("Too many commands in one session")
                        break
                await session.handle(item)
                if session.authenticated != authenticated:
                    authenticated = session.authenticated
                    rx.set_limits(self._limits(authenticated, deflate is not None))
                if session.expect_line:
                    rx.expect_line()
                if session.start_tls:
                    session.start_tls = False
                    await out.drain()
                    if read_task is not None:
                        # nothing may follow STARTTLS in plaintext (RFC 3501 §6.2.1)
                        read_task.cancel()
                        read_task = None
                    # whether the receiver or the stream holds it (CVE-2011-0411)
                    dropped = rx.pending + await discard_buffered(reader, writer)
                    if dropped:
                        log.info("data pipelined after STARTTLS discarded",
                                 session=session.info.id, octets=dropped)
                    rx.reset()
                    assert self.tls is not None
                    await writer.start_tls(self.tls)
                    session.tls = session.secure = session.info.tls = True
                    session.compression = _tls_compression(writer)
                if session.start_compress:
                    session.start_compress = False
                    await out.drain()  # the tagged OK is the last plain octet (RFC 4978 §3)
                    deflate = out.deflate = _Deflate()
                    # what the client sent past COMPRESS (it should have waited) is compressed
                    deflate.push(rx.take_pending())
                    rx.set_limits(self._limits(authenticated, True))
                if out.bytes > 256 * 1024 or rx.pending == 0 or isinstance(item, Continue):
                    await out.drain()
                if isinstance(item, Continue):  # after the send: it would end quick-ACK mode
                    _ack_quickly(writer)
            await out.drain()
            if session.closed:
                # we end it (BYE): the client may be mid-command, let it read why
                if read_task is not None:
                    read_task.cancel()
                    read_task = None
                await linger_close(reader, writer)
        finally:
            if read_task is not None:
                read_task.cancel()
            self.sessions.pop(session.info.id, None)
            self._outs.pop(session.info.id, None)
            await session.close()
