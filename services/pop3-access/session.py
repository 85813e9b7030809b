"""One POP3 session (RFC 1939 §3-§6 with RFC 2449, 2595, 5034, 6856) as a state machine whose
states carry their data: Authorization -> Transaction(maildrop, deleted set) -> Update.

Talks only to ports (ports.py); never imports sockets, nats or boto3.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from postbus.kit.logging import get_logger
from postbus.kit.metrics import Tally, counter
from postbus.pop3_access import policy
from postbus.pop3_access.ports import Directory, Lease, Locks, Maildrops, Throttle, Unavailable
from postbus.proto.directory import AuthReply
from postbus.proto.store import Pop3Message
from postbus.protocols.pop3 import (
    Apop,
    Auth,
    Bad,
    Capa,
    Dele,
    Item,
    List,
    Noop,
    Pass,
    Quit,
    Retr,
    Rset,
    Stat,
    Stls,
    Top,
    Uidl,
    Unknown,
    User,
    Utf8,
    decode_plain,
    err,
    multiline,
    ok,
    stuff,
    top_payload,
)
from postbus.protocols.served import retr_text

log = get_logger(__name__)

COMMANDS = counter("postbus_pop3_commands_total", "POP3 commands", ["command", "outcome"])
LOGINS = counter("postbus_pop3_logins_total", "POP3 login attempts", ["outcome"])
RETR_OCTETS = counter("postbus_pop3_retr_octets_total", "Message octets sent by RETR and TOP")
SIZE_MISMATCH = counter("postbus_pop3_size_mismatch_total",
                        "Messages whose RETR octets differ from the size the store reported")
UPDATES = counter("postbus_pop3_updates_total", "UPDATE states applied", ["mode"])
SESSIONS = counter("postbus_pop3_sessions_started_total", "POP3 sessions started")
RETRIEVED = counter("postbus_pop3_retrieved_total", "Messages sent whole by RETR")
DELETED = counter("postbus_pop3_deleted_total", "Messages deleted by UPDATE states")

# RFC 2449 §8 and RFC 3206 response codes
IN_USE, LOGIN_DELAY, AUTH, SYS_TEMP, SYS_PERM, UTF8 = (
    "IN-USE", "LOGIN-DELAY", "AUTH", "SYS/TEMP", "SYS/PERM", "UTF8")


@dataclass(frozen=True)
class Reply:
    data: bytes
    close: bool = False  # close the connection after writing
    starttls: bool = False  # begin the TLS handshake after writing (RFC 2595 §4)


@dataclass(frozen=True)
class Peer:
    ip: str
    tls: bool  # TLS is active on this connection
    tls_available: bool  # a certificate is configured (STLS can be offered)
    insecure_auth: bool = False  # the operator allows logins without TLS from anywhere
    loopback_is_secure: bool = True

    @property
    def secure(self) -> bool:
        return (self.tls or self.insecure_auth
                or (self.loopback_is_secure and policy.is_loopback(self.ip)))


@dataclass(frozen=True)
class Limits:
    login_delay_s: int = 0
    auth_failure_delay_s: float = 1.0
    auth_failure_delay_max_s: float = 8.0
    max_auth_failures_ip: int = 30
    max_auth_failures_account: int = 10
    max_auth_failures_session: int = 3
    max_bad_commands: int = 20
    max_commands: int = 200_000
    prefetch: int = 16


@dataclass
class Stats:
    """What this replica counted, for the management API: each count is a kit Tally, so one
    call also counts it in Prometheus."""

    session_tally: Tally = field(default_factory=lambda: Tally(SESSIONS))
    login_tally: Tally = field(default_factory=lambda: Tally(LOGINS))  # by outcome
    command_tally: Tally = field(default_factory=lambda: Tally(COMMANDS))  # by command, outcome
    retr_tally: Tally = field(default_factory=lambda: Tally(RETRIEVED))
    retr_octet_tally: Tally = field(default_factory=lambda: Tally(RETR_OCTETS))
    delete_tally: Tally = field(default_factory=lambda: Tally(DELETED))

    @property
    def sessions(self) -> int:
        return self.session_tally.total()

    @property
    def logins_ok(self) -> int:
        return self.login_tally.get("ok")

    @property
    def logins_failed(self) -> int:
        """Refused for the credentials or the throttle; not for an unavailable directory,
        LOGIN-DELAY or a maildrop in use."""
        return sum(n for outcome, n in self.login_tally.by(0).items()
                   if outcome not in ("ok", "unavailable", "login_delay", "in_use"))

    @property
    def in_use(self) -> int:
        return self.login_tally.get("in_use")

    @property
    def retrieved(self) -> int:
        return self.retr_tally.total()

    @property
    def retrieved_octets(self) -> int:
        return self.retr_octet_tally.total()

    @property
    def deleted(self) -> int:
        return self.delete_tally.total()

    @property
    def commands(self) -> dict[str, int]:
        return self.command_tally.by(0)


class PreparedBodies:
    """Blobs as RETR sends them (CRLF line ends, byte-stuffed) with their unstuffed length,
    by blob key. Blobs are immutable, so entries are never invalidated; shared by the
    sessions of one replica so a warm maildrop costs one copy per RETR."""

    def __init__(self, max_bytes: int = 64 << 20) -> None:
        self.max_bytes = max_bytes
        self.used = 0
        self._d: OrderedDict[str, tuple[int, bytes]] = OrderedDict()

    def get(self, key: str, blob: bytes) -> tuple[int, bytes]:
        hit = self._d.get(key)
        if hit is not None:
            self._d.move_to_end(key)
            return hit
        text = retr_text(b"", blob)
        entry = (len(text), stuff(text))
        if len(entry[1]) <= self.max_bytes // 8:
            self._d[key] = entry
            self.used += len(entry[1])
            while self.used > self.max_bytes and self._d:
                _, (_, old) = self._d.popitem(last=False)
                self.used -= len(old)
        return entry


# ---------------------------------------------------------------- states
@dataclass
class Authorization:
    user: str | None = None  # after USER, waiting for PASS
    sasl: bool = False  # after "AUTH PLAIN", waiting for the response line
    utf8: bool = False  # RFC 6856 UTF8 command given


@dataclass(frozen=True)
class Maildrop:
    """Message numbers (1-based) and sizes are fixed for the session (RFC 1939 §5)."""

    mailbox_id: int
    messages: tuple[Pop3Message, ...]

    @property
    def octets(self) -> int:
        return sum(m.size for m in self.messages)


@dataclass
class Transaction:
    account_id: int
    address: str
    policy: policy.Pop3Policy
    expire_days: int | None
    maildrop: Maildrop
    lease: Lease
    deleted: set[int] = field(default_factory=set)  # message numbers marked by DELE
    retrieved: set[int] = field(default_factory=set)  # message numbers sent in full by RETR

    def message(self, n: int) -> Pop3Message | bytes:
        """Message ``n``, or the -ERR reply when it does not exist or is marked deleted."""
        if n < 1 or n > len(self.maildrop.messages):
            return err(f"no such message, only {len(self.maildrop.messages)} in maildrop")
        if n in self.deleted:
            return err(f"message {n} already deleted")
        return self.maildrop.messages[n - 1]

    def following(self, n: int, count: int) -> list[Pop3Message]:
        """Up to ``count`` messages after number ``n`` that are not marked deleted."""
        out: list[Pop3Message] = []
        msgs = self.maildrop.messages
        i = n + 1
        while i <= len(msgs) and len(out) < count:
            if i not in self.deleted:
                out.append(msgs[i - 1])
            i += 1
        return out

    def live(self) -> list[tuple[int, Pop3Message]]:
        return [(i, m) for i, m in enumerate(self.maildrop.messages, 1) if i not in self.deleted]


@dataclass(frozen=True)
class Update:
    """The session has ended (QUIT applied, or the connection dropped)."""


State = Authorization | Transaction | Update

Sleep = Callable[[float], Awaitable[None]]


class Session:
    def __init__(self, *, directory: Directory, maildrops: Maildrops, locks: Locks,
                 throttle: Throttle, peer: Peer, limits: Limits | None = None,
                 session_id: str = "", stats: Stats | None = None,
                 sleep: Sleep = asyncio.sleep, hostname: str = "localhost",
                 prepared: PreparedBodies | None = None) -> None:
        self.directory = directory
        self.maildrops = maildrops
        self.locks = locks
        self.throttle = throttle
        self.peer = peer
        self.limits = limits or Limits()
        self.id = session_id
        self.stats = stats or Stats()
        self.sleep = sleep
        self.hostname = hostname
        self.prepared = prepared if prepared is not None else PreparedBodies(8 << 20)
        self.state: State = Authorization()
        self.started = time.time()
        self.bad_commands = 0
        self.auth_failures = 0
        self.commands = 0
        self.octets_sent = 0
        self.stats.session_tally.inc()

    # ------------------------------------------------------------ edges call these
    def greeting(self) -> bytes:
        return ok(f"{self.hostname} Postbus POP3 ready")

    def tls_started(self) -> None:
        self.peer = Peer(self.peer.ip, True, self.peer.tls_available, self.peer.insecure_auth)

    async def abort(self) -> None:
        """The connection ended without QUIT: nothing is deleted (RFC 1939 §6)."""
        st = self.state
        self.state = Update()
        if isinstance(st, Transaction):
            log.info("session dropped; no changes applied", session=self.id, account=st.account_id,
                     marked=len(st.deleted))
            await self._release(st.lease)

    def info(self) -> dict[str, object]:
        st = self.state
        return {
            "id": self.id,
            "client_ip": self.peer.ip,
            "tls": self.peer.tls,
            "state": type(st).__name__.lower(),
            "account": st.address if isinstance(st, Transaction) else None,
            "messages": len(st.maildrop.messages) if isinstance(st, Transaction) else None,
            "marked_deleted": len(st.deleted) if isinstance(st, Transaction) else None,
            "started": self.started,
            "commands": self.commands,
            "octets_sent": self.octets_sent,
        }

    # ------------------------------------------------------------ dispatch
    async def handle(self, item: Item) -> Reply:
        self.commands += 1
        if self.commands > self.limits.max_commands:
            await self.abort()
            return Reply(err("too many commands in one session, closing"), close=True)
        st = self.state
        # the line after "AUTH PLAIN" is a SASL response, whatever it parsed as
        sasl = isinstance(st, Authorization) and st.sasl
        name = "SASL" if sasl else type(item).__name__.upper()
        self._wrong = False
        reply = await self._dispatch(item)
        outcome = "ok" if reply.data.startswith(b"+") else "err"
        self.stats.command_tally.inc(name, outcome)
        self.octets_sent += len(reply.data)
        bad = not sasl and isinstance(item, Bad | Unknown)
        if not sasl and isinstance(item, Bad):
            log.info("bad command", session=self.id, client_ip=self.peer.ip, reason=item.reason)
        elif not sasl and isinstance(item, Unknown):
            log.info("unknown command", session=self.id, client_ip=self.peer.ip, verb=item.verb)
        if (self._wrong or bad) and not reply.close:
            self.bad_commands += 1
            if self.bad_commands >= self.limits.max_bad_commands:
                await self.abort()
                return Reply(reply.data + err("too many bad commands, closing"), close=True)
        return reply

    _wrong = False

    def _refuse(self, text: str, code: str | None = None) -> Reply:
        """An -ERR for a command the client should not have sent (counts as a bad command)."""
        self._wrong = True
        return Reply(err(text, code))

    async def _dispatch(self, item: Item) -> Reply:
        st = self.state
        if isinstance(st, Authorization) and st.sasl:
            st.sasl = False
            return await self._plain_response(item.raw)
        match st, item:
            case _, Bad(reason=reason):
                return Reply(err(reason))
            case _, Unknown(verb=verb):
                return Reply(err(f"unknown command {verb}"))
            case _, Capa():
                return self._capa()
            case Update(), _:
                return Reply(err("session ended"), close=True)

            # -------------------------------------------------- AUTHORIZATION (§4)
            case Authorization(), Quit():
                self.state = Update()
                return Reply(ok("Postbus POP3 signing off"), close=True)
            case Authorization(), Stls():
                if self.peer.tls:
                    return self._refuse("TLS already active")
                if not self.peer.tls_available:
                    return self._refuse("TLS not available", SYS_PERM)
                return Reply(ok("Begin TLS negotiation"), starttls=True)
            case Authorization() as a, Utf8():
                a.utf8 = True
                return Reply(ok("UTF8 enabled"))
            case Authorization() as a, User(name=name):
                if not self.peer.secure:
                    return self._refuse(
                        "Plaintext authentication disallowed on non-secure connections; use STLS",
                        AUTH)
                a.user = name
                return Reply(ok("send PASS"))
            case Authorization(user=None), Pass():
                return self._refuse("USER first")
            case Authorization(user=str(user)) as a, Pass(secret=secret):
                a.user = None
                return await self._login(user, secret)
            case Authorization(), Auth(mechanism=None):
                mechs = [b"PLAIN"] if self.peer.secure else []
                return Reply(multiline(ok("SASL mechanisms follow"), mechs))
            case Authorization() as a, Auth(mechanism="PLAIN", initial=initial):
                if not self.peer.secure:
                    return self._refuse(
                        "Plaintext authentication disallowed on non-secure connections; use STLS",
                        AUTH)
                a.user = None
                if initial is None:
                    a.sasl = True
                    return Reply(b"+ \r\n")
                return await self._plain_response(initial.encode())
            case Authorization(), Auth(mechanism=str(mech)):
                return self._refuse(f"unsupported SASL mechanism {mech}")
            case Authorization(), Apop():
                return self._refuse("APOP not supported; use USER/PASS or AUTH PLAIN")
            case Authorization(), _:
                return self._refuse("not allowed before login")

            # -------------------------------------------------- TRANSACTION (§5)
            case Transaction() as t, Stat():
                live = t.live()
                return Reply(ok(f"{len(live)} {sum(m.size for _, m in live)}"))
            case Transaction() as t, List(msg=None):
                live = t.live()
                return Reply(multiline(
                    ok(f"{len(live)} messages ({sum(m.size for _, m in live)} octets)"),
                    [f"{i} {m.size}".encode() for i, m in live]))
            case Transaction() as t, List(msg=int(n)):
                m = t.message(n)
                if isinstance(m, bytes):
                    return self._refuse(m.decode()[5:-2])
                return Reply(ok(f"{n} {m.size}"))
            case Transaction() as t, Uidl(msg=None):
                return Reply(multiline(ok("unique-id listing follows"),
                                       [f"{i} {m.uidl}".encode() for i, m in t.live()]))
            case Transaction() as t, Uidl(msg=int(n)):
                m = t.message(n)
                if isinstance(m, bytes):
                    return self._refuse(m.decode()[5:-2])
                return Reply(ok(f"{n} {m.uidl}"))
            case Transaction() as t, Retr(msg=n):
                return await self._retr(t, n, None)
            case Transaction() as t, Top(msg=n, lines=lines):
                return await self._retr(t, n, lines)
            case Transaction() as t, Dele(msg=n):
                m = t.message(n)
                if isinstance(m, bytes):
                    return self._refuse(m.decode()[5:-2])
                t.deleted.add(n)
                return Reply(ok(f"message {n} deleted"))
            case Transaction(), Noop():
                return Reply(ok())
            case Transaction() as t, Rset():
                t.deleted.clear()
                return Reply(ok(f"maildrop has {len(t.maildrop.messages)} messages "
                                f"({t.maildrop.octets} octets)"))
            case Transaction() as t, Quit():
                return await self._update(t)
            case Transaction(), _:
                return self._refuse("not allowed after login")
        return self._refuse("command not valid in this state")  # pragma: no cover

    # ------------------------------------------------------------ CAPA
    def _capa(self) -> Reply:
        st = self.state
        t = st if isinstance(st, Transaction) else None
        caps = policy.capabilities(policy.CapaContext(
            authenticated=t is not None, secure=self.peer.secure, tls_active=self.peer.tls,
            tls_available=self.peer.tls_available, login_delay_s=self.limits.login_delay_s,
            policy=t.policy if t else "client", expire_days=t.expire_days if t else None))
        return Reply(multiline(ok("Capability list follows"), [c.encode() for c in caps]))

    # ------------------------------------------------------------ login
    async def _plain_response(self, line: bytes) -> Reply:
        text = line.decode("ascii", "replace").strip()
        if text == "*":  # RFC 5034 §4: the client cancelled
            return self._refuse("authentication cancelled")
        creds = decode_plain("" if text == "=" else text)
        if creds is None:
            self.auth_failures += 1
            return self._refuse("malformed SASL PLAIN response", AUTH)
        if creds.authzid and creds.authzid != creds.authcid:
            return self._refuse("authorization identity must be empty or the login name", AUTH)
        return await self._login(creds.authcid, creds.password)

    async def _login(self, username: str, password: str) -> Reply:
        ip = self.peer.ip
        lim = self.limits
        try:
            ip_failures, account_failures = await self.throttle.failures(ip, username)
        except Unavailable as exc:
            log.warning("throttle unavailable", error=str(exc))
            ip_failures, account_failures = 0, 0
        if ip_failures >= lim.max_auth_failures_ip or account_failures >= lim.max_auth_failures_account:
            self.stats.login_tally.inc("throttled")
            log.warning("login throttled", session=self.id, client_ip=ip, user=username,
                        ip_failures=ip_failures, account_failures=account_failures)
            await self.sleep(lim.auth_failure_delay_max_s)
            return self._fail_login(err("too many failed logins; try again later", SYS_TEMP))
        try:
            auth = await self.directory.authenticate(username, password, ip)
        except Unavailable as exc:
            self.stats.login_tally.inc("unavailable")
            log.warning("directory unavailable", error=str(exc))
            return Reply(err("authentication service unavailable; try again later", SYS_TEMP))
        if not auth.ok or auth.account_id is None:
            return await self._login_failed(username, auth, max(ip_failures, account_failures))
        return await self._open(username, auth)

    def _fail_login(self, data: bytes) -> Reply:
        self.auth_failures += 1
        if self.auth_failures >= self.limits.max_auth_failures_session:
            return Reply(data, close=True)
        return Reply(data)

    async def _login_failed(self, username: str, auth: AuthReply, recent: int) -> Reply:
        self.stats.login_tally.inc(auth.reason or "invalid")
        log.info("login failed", session=self.id, client_ip=self.peer.ip, user=username,
                 reason=auth.reason)
        try:
            await self.throttle.record_failure(self.peer.ip, username)
        except Unavailable as exc:
            log.warning("throttle unavailable", error=str(exc))
        await self.sleep(policy.failure_delay(recent + 1, self.limits.auth_failure_delay_s,
                                              self.limits.auth_failure_delay_max_s))
        if auth.reason == "throttled":
            return self._fail_login(err("too many failed logins; try again later", SYS_TEMP))
        # a disabled account answers as a wrong password does: "disabled" only came with
        # the right password, so it told a guesser the password was right (issue 8, low)
        return self._fail_login(err("authentication failed", AUTH))

    async def _open(self, username: str, auth: AuthReply) -> Reply:
        assert auth.account_id is not None
        account_id = auth.account_id
        try:
            await self.throttle.record_success(self.peer.ip, username)
            if not await self.throttle.login_allowed(account_id):
                self.stats.login_tally.inc("login_delay")
                return Reply(err(f"wait {self.limits.login_delay_s}s between logins", LOGIN_DELAY))
            lease = await self.locks.acquire(account_id, self.id)
        except Unavailable as exc:
            log.warning("lock service unavailable", error=str(exc))
            return Reply(err("maildrop lock unavailable; try again later", SYS_TEMP))
        if lease is None:
            self.stats.login_tally.inc("in_use")
            log.info("maildrop in use", session=self.id, account=account_id)
            return Reply(err("maildrop already locked by another session", IN_USE))
        try:
            drop = await self.maildrops.open(account_id)
        except Unavailable as exc:
            await self._release(lease)
            log.warning("maildrop unavailable", error=str(exc), account=account_id)
            return Reply(err("maildrop unavailable; try again later", SYS_TEMP))
        t = Transaction(account_id=account_id, address=auth.address or username,
                        policy=auth.pop3_policy, expire_days=auth.pop3_expire_days,
                        maildrop=Maildrop(drop.mailbox_id, tuple(drop.messages)), lease=lease)
        self.state = t
        self.stats.login_tally.inc("ok")
        log.info("login", session=self.id, account=account_id, messages=len(drop.messages),
                 policy=auth.pop3_policy)
        self.maildrops.prefetch(t.maildrop.messages[: self.limits.prefetch])
        return Reply(ok(f"maildrop has {len(t.maildrop.messages)} messages "
                        f"({t.maildrop.octets} octets)"))

    # ------------------------------------------------------------ RETR / TOP
    async def _retr(self, t: Transaction, n: int, top_lines: int | None) -> Reply:
        m = t.message(n)
        if isinstance(m, bytes):
            return self._refuse(m.decode()[5:-2])
        # fetch ahead: clients read in order, so the next bodies are on their way meanwhile
        self.maildrops.prefetch(t.following(n, self.limits.prefetch))
        try:
            blob = await self.maildrops.blob(m)
        except Unavailable as exc:
            log.warning("message body unavailable", error=str(exc), uid=m.uid, key=m.blob_key)
            return Reply(err("message body unavailable; try again later", SYS_TEMP))
        if top_lines is not None:
            payload = top_payload(retr_text(m.prefix, blob), top_lines)
            RETR_OCTETS.inc(len(payload))  # counted for Prometheus, not in retrieved_octets
            return Reply(ok("top of message follows") + payload)
        prefix = m.prefix
        if prefix and not prefix.endswith(b"\n"):  # not whole lines: convert it all at once
            data = retr_text(prefix, blob)
            size, parts = len(data), [stuff(data)]
        else:  # the same bytes: the prefix's lines, then the blob's as prepared
            crlf_len, stuffed = self.prepared.get(m.blob_key, blob)
            head = retr_text(prefix, b"")
            size, parts = len(head) + crlf_len, [stuff(head), stuffed]
        if size != m.size:
            SIZE_MISMATCH.inc()
            log.warning("stored size differs from RETR octets", uid=m.uid, stored=m.size,
                        sent=size)
        t.retrieved.add(n)
        self.stats.retr_tally.inc()
        self.stats.retr_octet_tally.inc(n=size)
        return Reply(b"".join([ok(f"{m.size} octets"), *parts, b".\r\n"]))

    # ------------------------------------------------------------ UPDATE (§6)
    async def _update(self, t: Transaction) -> Reply:
        self.state = Update()
        msgs = t.maildrop.messages
        req = policy.commit_request(
            account_id=t.account_id, mailbox_id=t.maildrop.mailbox_id, policy=t.policy,
            deleted={msgs[n - 1].uid for n in t.deleted},
            retrieved={msgs[n - 1].uid for n in t.retrieved}, expire_days=t.expire_days)
        if t.lease.lost:
            await self._release(t.lease)
            log.warning("maildrop lock lost before QUIT; nothing applied", account=t.account_id)
            return Reply(err("maildrop lock lost; no messages deleted", SYS_TEMP), close=True)
        if req is not None:
            try:
                await self.maildrops.commit(req)
            except Unavailable as exc:
                await self._release(t.lease)
                log.warning("commit failed", error=str(exc), account=t.account_id)
                return Reply(err("some deleted messages not removed; try again later", SYS_TEMP),
                             close=True)
            UPDATES.labels(req.mode).inc()
            self.stats.delete_tally.inc(n=len(req.delete_uids))
        await self._release(t.lease)
        left = len(msgs) - (len(req.delete_uids) if req else 0)
        log.info("update applied", session=self.id, account=t.account_id,
                 deleted=len(req.delete_uids) if req else 0, mode=req.mode if req else None)
        return Reply(ok(f"Postbus POP3 signing off ({left} messages left)"), close=True)

    async def _release(self, lease: Lease) -> None:
        try:
            await lease.release()
        except Unavailable as exc:  # the lock expires on its own
            log.warning("lock release failed", error=str(exc))
