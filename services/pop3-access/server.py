"""POP3 sockets: plain (with STLS) and implicit-TLS listeners feeding a Receiver and a Session.

The only module of pop3-access that touches sockets. Bad input gets -ERR, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
import uuid
from dataclasses import dataclass, field

from postbus.kit.logging import get_logger
from postbus.kit.metrics import counter, gauge
from postbus.kit.net import BadProxyHeader, PerIpLimit, read_proxy_header
from postbus.kit.tls import discard_buffered
from postbus.pop3_access.ports import Directory, Locks, Maildrops, Throttle
from postbus.pop3_access.session import Limits, Peer, PreparedBodies, Session, Stats
from postbus.protocols.pop3 import Receiver, err

log = get_logger(__name__)

CONNECTIONS = counter("postbus_pop3_connections_total", "POP3 connections accepted", ["listener"])
REFUSED = counter("postbus_pop3_connections_refused_total",
                  "Connections refused over the per-address limit")
ACTIVE = gauge("postbus_pop3_sessions", "POP3 sessions open now")

WRITE_HIGH_WATER = 1 << 20  # drain when this much is buffered (big RETR replies)


@dataclass
class Pop3Server:
    directory: Directory
    maildrops: Maildrops
    locks: Locks
    throttle: Throttle
    limits: Limits = field(default_factory=Limits)
    ssl_context: ssl.SSLContext | None = None
    hostname: str = "localhost"
    idle_timeout_s: float = 600.0
    session_timeout_s: float = 4 * 3600.0
    insecure_auth: bool = False
    max_connections_per_ip: int = 50
    loopback_is_secure: bool = True
    proxy_protocol: bool = False
    proxy_protocol_timeout_s: float = 5.0
    replica: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    stats: Stats = field(default_factory=Stats)
    prepared: PreparedBodies = field(default_factory=PreparedBodies)
    sessions: dict[str, Session] = field(default_factory=dict)
    _servers: list[asyncio.Server] = field(default_factory=list)
    _conns: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    _per_ip: PerIpLimit = field(init=False)
    _seq: int = 0

    def __post_init__(self) -> None:
        self._per_ip = PerIpLimit(self.max_connections_per_ip)

    async def listen(self, host: str, port: int, *, implicit_tls: bool = False) -> int:
        """Start a listener; returns the bound port (pass 0 for any free one)."""
        if implicit_tls and self.ssl_context is None:
            raise ValueError("implicit TLS needs a certificate")

        async def on_client(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await self._client(r, w, implicit_tls)

        # behind PROXY protocol the header comes before the TLS handshake (see _client)
        tls = self.ssl_context if implicit_tls and not self.proxy_protocol else None
        srv = await asyncio.start_server(on_client, host, port, ssl=tls,
                                         ssl_handshake_timeout=30 if tls else None)
        self._servers.append(srv)
        bound = int(srv.sockets[0].getsockname()[1])
        log.info("pop3 listening", host=host, port=bound, tls=implicit_tls)
        return bound

    async def close(self) -> None:
        """Stop listening; sessions still open are cut (they apply nothing: RFC 1939 §6)."""
        for srv in self._servers:
            srv.close()
        for t in list(self._conns.values()):
            t.cancel()
        for t in list(self._conns.values()):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for srv in self._servers:
            with contextlib.suppress(Exception):
                await srv.wait_closed()

    def kick(self, session_id: str) -> bool:
        t = self._conns.get(session_id)
        if t is None:
            return False
        t.cancel("kicked")
        return True

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      implicit_tls: bool) -> None:
        self._seq += 1
        sid = f"{self.replica}-{self._seq}"
        peer = writer.get_extra_info("peername") or ("?", 0)
        ip = str(peer[0])
        if self.proxy_protocol:
            try:
                client = await read_proxy_header(reader, self.proxy_protocol_timeout_s)
                if implicit_tls:
                    assert self.ssl_context is not None
                    await asyncio.wait_for(writer.start_tls(self.ssl_context), 30)
            except (BadProxyHeader, ssl.SSLError, OSError, TimeoutError) as exc:
                log.warning("connection refused before the greeting", peer=ip, error=str(exc))
                writer.close()
                return
            if client is not None:
                ip = client[0]
        self._per_ip.limit = self.max_connections_per_ip  # may be changed at run time
        if not self._per_ip.admit(ip):
            REFUSED.inc()
            log.warning("too many connections", client_ip=ip)
            with contextlib.suppress(Exception):
                writer.write(err("too many connections from your address", "SYS/TEMP"))
                await writer.drain()
            writer.close()
            return
        session = Session(
            directory=self.directory, maildrops=self.maildrops, locks=self.locks,
            throttle=self.throttle, limits=self.limits, session_id=sid, stats=self.stats,
            hostname=self.hostname, prepared=self.prepared,
            peer=Peer(ip, implicit_tls, self.ssl_context is not None, self.insecure_auth,
                      self.loopback_is_secure))
        self.sessions[sid] = session
        task = asyncio.current_task()
        assert task is not None
        self._conns[sid] = task
        CONNECTIONS.labels("pop3s" if implicit_tls else "pop3").inc()
        ACTIVE.inc()
        try:
            await asyncio.wait_for(self._run(session, reader, writer), self.session_timeout_s)
        except TimeoutError:
            with contextlib.suppress(Exception):
                writer.write(err("session time limit reached"))
                await writer.drain()
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError, OSError) as exc:
            log.debug("connection lost", session=sid, error=str(exc))
        except asyncio.CancelledError as exc:
            why = ("session closed by the administrator" if exc.args == ("kicked",)
                   else "server shutting down")
            with contextlib.suppress(Exception):
                writer.write(err(why, "SYS/TEMP"))
        except Exception:
            log.exception("session failed", session=sid)
            with contextlib.suppress(Exception):
                writer.write(err("internal error", "SYS/TEMP"))
        finally:
            ACTIVE.dec()
            self._per_ip.release(ip)
            self.sessions.pop(sid, None)
            self._conns.pop(sid, None)
            # cancelled again while closing (shutdown): the abort still runs to its end
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.shield(session.abort())
            writer.close()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(writer.wait_closed(), 2)

    async def _run(self, session: Session, reader: asyncio.StreamReader,
                   writer: asyncio.StreamWriter) -> None:
        writer.write(session.greeting())
        await writer.drain()
        receiver = Receiver()
        while True:
            try:
                data = await asyncio.wait_for(reader.read(65536), self.idle_timeout_s)
            except TimeoutError:
                writer.write(err("autologout; idle for too long"))
                await writer.drain()
                return
            if not data:
                return
            items = receiver.feed(data)
            for i, item in enumerate(items):
                started = time.perf_counter()
                reply = await session.handle(item)
                writer.write(reply.data)
                if reply.close:
                    await writer.drain()
                    return
                if reply.starttls:
                    await writer.drain()
                    # RFC 2595 §4 / CVE-2011-0411: nothing sent before the handshake counts,
                    # whether the receiver or the stream holds it
                    dropped = await discard_buffered(reader, writer)
                    if i + 1 < len(items) or receiver.pending() or dropped:
                        log.warning("data pipelined after STLS discarded", session=session.id)
                    receiver.discard()
                    assert self.ssl_context is not None
                    await writer.start_tls(self.ssl_context)
                    session.tls_started()
                    break
                transport = writer.transport
                if transport.get_write_buffer_size() > WRITE_HIGH_WATER:
                    await writer.drain()
                elapsed = time.perf_counter() - started
                if elapsed > 5:
                    log.info("slow command", session=session.id, seconds=round(elapsed, 2))
            await writer.drain()
