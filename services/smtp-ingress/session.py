"""One SMTP session (RFC 5321 with 1870, 1652, 2034, 2920, 3030, 3207, 3461, 4954, 6531) as a
state machine whose states carry their data: Connected -> Greeted -> Transaction(sender,
parameters, recipients, body spool), with Sasl, InData and InChunk while a challenge
answer, a message or a BDAT chunk is being read. Items come from ``protocols.smtp.Receiver``;
replies are values (``Reply``) from the table in ``protocols.smtp_replies``.

Talks only to ports (ports.py) and the spool; never imports sockets, nats or boto3.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from postbus.kit.counter_keys import account_key, ip_key
from postbus.kit.logging import get_logger
from postbus.kit.metrics import Tally, counter, histogram
from postbus.proto.directory import AuthReply
from postbus.proto.mail import BodyRef, ClientInfo, MailReceived, Recipient
from postbus.protocols import smtp as proto
from postbus.protocols import smtp_replies as replies
from postbus.protocols.smtp import (
    TOO_LONG,
    Auth,
    Bad,
    Bdat,
    Body,
    ChunkEnd,
    Data,
    DataEnd,
    Expn,
    Helo,
    Help,
    Item,
    Mail,
    Noop,
    Overflow,
    Quit,
    Rcpt,
    Rset,
    StartTls,
    Unknown,
    Vrfy,
)
from postbus.smtp_ingress import policy
from postbus.smtp_ingress.ports import Bodies, Counters, Directory, Queue, Unavailable
from postbus.smtp_ingress.settings import Settings
from postbus.smtp_ingress.spool import Budget, Spool, SpoolDir

log = get_logger(__name__)

MESSAGES = counter("postbus_smtp_messages_total", "Messages by outcome and reason",
                   ["listener", "outcome", "reason"])
RECIPIENTS = counter("postbus_smtp_recipients_total", "RCPT answers by outcome and reason",
                     ["listener", "outcome", "reason"])
AUTHS = counter("postbus_smtp_auth_total", "AUTH attempts by outcome", ["listener", "outcome"])
AUTH_THROTTLED = counter("postbus_smtp_auth_throttled_total",
                         "AUTH attempts refused by the failure counters, by what was counted",
                         ["scope"])
MAIL_REJECTED = counter("postbus_smtp_mail_rejected_total", "MAIL FROM refused by sender rules",
                        ["listener", "reason"])
REFUSED = counter("postbus_smtp_connections_refused_total",
                  "Connections refused at admission, by reason", ["reason"])
BYTES = counter("postbus_smtp_received_bytes_total", "Message bytes accepted", ["listener"])
ACCEPT_LATENCY = histogram("postbus_smtp_accept_seconds",
                           "End of data to the 250 reply (S3 put if any + JetStream ack)",
                           ["listener"])
FLOW_DELAYS = counter("postbus_smtp_flow_delays_total", "MAIL FROM answers held by the in-flow delay")
FLOW_DELAY_SECONDS = counter("postbus_smtp_flow_delay_seconds_total",
                             "Seconds MAIL FROM answers were held by the in-flow delay")

# RFC 3207 §4: on a listener that requires TLS, only these before STARTTLS
ALLOWED_BEFORE_STARTTLS = frozenset({"NOOP", "EHLO", "HELO", "STARTTLS", "QUIT", "RSET"})


@functools.lru_cache(maxsize=1024)
def labelled(metric: Any, *labels: str) -> Any:
    """A labelled child, cached (``labels()`` costs a lock and a dict lookup each time)."""
    return metric.labels(*labels)


# ---------------------------------------------------------------- what sessions share
@dataclass
class SessionInfo:
    """One open session, as the management API lists it."""

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
    """What this replica counted, for the management API by outcome and reason: each count
    is a kit Tally, so one call also counts it in Prometheus (there by listener too)."""

    message_tally: Tally = field(default_factory=lambda: Tally(MESSAGES))
    rcpt_tally: Tally = field(default_factory=lambda: Tally(RECIPIENTS))
    auth_tally: Tally = field(default_factory=lambda: Tally(AUTHS))
    auth_throttle_tally: Tally = field(default_factory=lambda: Tally(AUTH_THROTTLED))
    mail_reject_tally: Tally = field(default_factory=lambda: Tally(MAIL_REJECTED))
    refusal_tally: Tally = field(default_factory=lambda: Tally(REFUSED))

    def auth_throttled(self, listener: str, scope: str) -> None:
        self.auth_tally.inc(listener, "throttled")
        self.auth_throttle_tally.inc(scope)

    def as_dict(self) -> dict[str, dict[str, int]]:
        counts: Counter[tuple[str, str]] = Counter()
        for (_, outcome, reason), n in self.message_tally.counts.items():
            counts["message_" + outcome, reason] += n
        for (_, outcome, reason), n in self.rcpt_tally.counts.items():
            counts["rcpt_" + outcome, reason] += n
        for (_, outcome), n in self.auth_tally.counts.items():
            if outcome in ("ok", "failed"):  # throttled: by scope below
                counts["auth", outcome] += n
        for (scope,), n in self.auth_throttle_tally.counts.items():
            counts["auth", "throttled_" + scope] += n
        for (_, reason), n in self.mail_reject_tally.counts.items():
            counts["mail_rejected", reason] += n
        for (reason,), n in self.refusal_tally.counts.items():
            counts["connection_refused", reason] += n
        out: dict[str, dict[str, int]] = {}
        for (outcome, reason), n in sorted(counts.items()):
            out.setdefault(outcome, {})[reason] = n
        return out


class Shared:
    """What every session of a replica shares: settings, ports, the spool and its budgets,
    counters, the in-flow delay. The server's ``Ingress`` is one; tests build one with
    in-memory ports (memory.py)."""

    def __init__(self, settings: Settings, *, directory: Directory, queue: Queue,
                 bodies: Bodies, auth_failures: Counters) -> None:
        self.settings = settings
        self.directory = directory
        self.queue = queue
        self.bodies = bodies
        self.auth_failures = auth_failures
        self.stats = Stats()
        self.hostname = settings.common.hostname
        self.inline_threshold = settings.common.inline_threshold
        self.trusted = policy.parse_networks(settings.common.trusted_networks)
        self.queue_depth = 0  # accepted messages waiting for delivery (in-flow delay)
        # message bodies while they are read: memory up to the inline threshold each, then
        # disk, both bounded for all sessions of this replica (issue 8.6)
        self.spool = SpoolDir(settings.spool_dir, memory=Budget(settings.data_bytes_in_flight),
                              disk=Budget(settings.spool_max_bytes))
        self.uploads = asyncio.Semaphore(settings.spool_uploads)

    def flow_delay(self) -> float:
        s = self.settings
        return policy.in_flow_delay(self.queue_depth, threshold=s.flow_backlog_threshold,
                                    per_message_s=s.flow_delay_per_message_s,
                                    max_s=s.flow_delay_max_s)

    def may_relay(self, ip: str, authenticated: bool) -> bool:
        return policy.may_relay(authenticated=authenticated, trusted=policy.ip_in(ip, self.trusted))


@dataclass
class Peer:
    ip: str
    port: int
    listener: str  # "mx", "submission" or "smtps"
    tls: str | None = None  # what TLS is active ("TLSv1.3 with cipher ..."), None without
    tls_available: bool = False  # a certificate is configured (STARTTLS can be offered)


@dataclass(frozen=True)
class Reply:
    data: bytes = b""
    close: bool = False  # close the connection after writing
    starttls: bool = False  # begin the TLS handshake after writing (RFC 3207 §4)
    read_data: bool = False  # 354 was sent: message data follows (Receiver.start_data)
    read_chunk: int | None = None  # a BDAT chunk of this size follows (Receiver.start_chunk)


def line(text: str) -> bytes:
    """A reply with its enhanced status code (RFC 2034), CRLF-terminated."""
    return proto.with_enhanced_code(text).encode("utf-8", "surrogateescape") + b"\r\n"


def plain(text: str) -> bytes:
    """Greeting, HELO/EHLO and 334: no enhanced code (RFC 2034 §3, RFC 4954 §4)."""
    return text.encode("utf-8", "surrogateescape") + b"\r\n"


# ---------------------------------------------------------------- states
@dataclass(frozen=True)
class Connected:
    """No HELO/EHLO yet (or none since STARTTLS: RFC 3207 §4.2)."""


@dataclass(frozen=True)
class Greeted:
    helo: str
    esmtp: bool  # EHLO, not HELO: parameters and AUTH are allowed


@dataclass
class Transaction:
    """After MAIL FROM: the envelope so far, the spool BDAT chunks go to and DATA's checks
    on the message those chunks make up (RFC 3030 §2 sends the same message as DATA does)."""

    helo: str
    esmtp: bool
    mail_from: str
    params: proto.MailParams
    spool: Spool
    check: proto.MessageCheck
    recipients: list[Recipient] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)  # recipient addresses, lowercased
    mode: str | None = None  # "DATA" or "BDAT" once the data transfer began


@dataclass
class Sasl:
    """AUTH sent a 334 challenge; the next line is the client's answer (RFC 4954 §4)."""

    before: Greeted
    mechanism: str  # "PLAIN" or "LOGIN"
    user: bytes | None = None  # LOGIN: the user name once given


@dataclass
class InData:
    """354 was sent: message data is read into ``spool`` up to <CRLF>.<CRLF>."""

    txn: Transaction
    spool: Spool
    room: bool = True  # False once the spool refused a write: read on, answer 451


@dataclass
class InChunk:
    """A BDAT chunk is read (always to its end: RFC 3030 §4); kept only when ``keep``."""

    before: Connected | Greeted | Transaction
    size: int
    last: bool
    keep: bool
    room: bool


State = Connected | Greeted | Transaction | Sasl | InData | InChunk

Sleep = Callable[[float], Awaitable[None]]
ReverseName = Callable[[], Awaitable[str | None]]


async def _no_name() -> str | None:
    return None


class Session:
    """One SMTP connection's state and decisions; the server feeds it items and writes
    what it returns."""

    def __init__(self, shared: Shared, peer: Peer, *, info: SessionInfo | None = None,
                 reverse_name: ReverseName = _no_name, sleep: Sleep = asyncio.sleep) -> None:
        self.shared = shared
        self.settings = shared.settings
        self.peer = peer
        self.info = info
        self.reverse_name = reverse_name
        self.sleep = sleep
        self.state: State = Connected()
        self.auth: AuthReply | None = None
        self.commands = 0
        self.unknown = 0
        # RFC 3207 §4 + ARCHITECTURE.md: submission (587) needs TLS before anything else
        self.require_starttls = peer.tls_available and peer.listener == "submission"

    # ------------------------------------------------------------ the server calls these
    def greeting(self) -> bytes:
        return plain(replies.R220_GREETING.format(self.shared.hostname))

    @property
    def busy(self) -> bool:
        """Reading a message or a chunk: finish it before shutting down."""
        return isinstance(self.state, InData | InChunk)

    def tls_started(self, tls: str | None) -> None:
        """The handshake is done: forget everything learnt before it (RFC 3207 §4.2)."""
        self.close()
        self.state = Connected()
        self.auth = None
        self.peer.tls = tls or "TLS"
        if self.info is not None:
            self.info.tls = self.peer.tls

    def close(self) -> None:
        """Give back the message bytes held (the connection ended, or TLS began)."""
        st = self.state
        if isinstance(st, InData):
            st.spool.close()
            st = st.txn
        elif isinstance(st, InChunk):
            st = st.before
        if isinstance(st, Transaction):
            st.spool.close()

    @property
    def authenticated(self) -> bool:
        return self.auth is not None

    # ------------------------------------------------------------ dispatch
    async def handle(self, item: Item) -> Reply:
        st = self.state
        if isinstance(st, Sasl):
            return await self._sasl(st, item)
        if isinstance(st, InData):
            return await self._data_item(st, item)
        if isinstance(st, InChunk):
            return await self._chunk_item(st, item)
        return await self._command(st, item)

    async def _command(self, st: Connected | Greeted | Transaction, item: Item) -> Reply:
        if isinstance(item, Bad) and item.reason == TOO_LONG:
            return Reply(line(replies.R500_LINE_TOO_LONG))
        self.commands += 1
        if self.info is not None:
            self.info.commands += 1
        if self.commands > self.settings.max_commands:
            return Reply(line(replies.R421_TOO_MANY_COMMANDS), close=True)
        if isinstance(item, Bad):
            log.info("bad command line", ip=self.peer.ip, line=repr(item.raw[:60]))
            return self._unknown(replies.R500_SYNTAX_ERROR)
        if isinstance(item, Body | Overflow | DataEnd | ChunkEnd):  # pragma: no cover
            raise AssertionError(f"{type(item).__name__} outside a message")
        verb = item.raw.partition(b" ")[0].upper().decode("ascii")
        if self.info is not None:
            self.info.last_command = verb
        if self.require_starttls and not self.peer.tls and verb not in ALLOWED_BEFORE_STARTTLS:
            return Reply(line(replies.R530_STARTTLS_FIRST))
        match item:
            case Unknown(verb=unknown):
                log.info("unknown command", ip=self.peer.ip, command=unknown[:20])
                return self._unknown(replies.R500_UNKNOWN_COMMAND.format(unknown[:20]))
            case Helo(host=host, extended=extended):
                return self._helo(st, host, extended)
            case StartTls(arg=arg):
                return self._starttls(arg)
            case Noop():
                return Reply(line(replies.R250_DONE))
            case Rset(arg=arg):
                if arg:
                    return Reply(line(replies.R501_SYNTAX_RSET))
                self._end_transaction()
                return Reply(line(replies.R250_DONE))
            case Quit():
                return Reply(line(replies.R221_BYE), close=True)
            case Vrfy(arg=arg):
                # RFC 5321 §3.5.3: 252 rather than a directory oracle
                return Reply(line(replies.R252_VRFY if arg else replies.R501_SYNTAX_VRFY))
            case Expn():
                return Reply(line(replies.R502_EXPN))
            case Help():
                return Reply(line(replies.R214_HELP))
            case Auth(arg=arg):
                return await self._auth(st, arg)
            case Mail(arg=arg):
                return await self._mail(st, arg)
            case Rcpt(arg=arg):
                return await self._rcpt(st, arg)
            case Data(arg=arg):
                return self._data(st, arg)
            case Bdat(size=size, last=last):
                return self._bdat(st, size, last)
        raise AssertionError(f"unhandled {item!r}")  # pragma: no cover

    def _unknown(self, reply: str) -> Reply:
        self.unknown += 1
        if self.unknown > self.settings.max_unknown_commands:
            return Reply(line(replies.R421_TOO_MANY_BAD_COMMANDS), close=True)
        return Reply(line(reply))

    def _end_transaction(self) -> None:
        """Forget the envelope (RSET, HELO/EHLO, after a message) and give back the BDAT
        bytes it held."""
        st = self.state
        if isinstance(st, Transaction):
            st.spool.close()
            self.state = Greeted(st.helo, st.esmtp)

    # ------------------------------------------------------------ greeting commands
    def _helo(self, st: Connected | Greeted | Transaction, host: str, extended: bool) -> Reply:
        if not host:
            return Reply(line(replies.R501_SYNTAX_EHLO if extended else replies.R501_SYNTAX_HELO))
        if isinstance(st, Transaction):
            st.spool.close()
        self.state = Greeted(host, extended)
        if self.info is not None:
            self.info.helo = host[:255]
        if not extended:
            return Reply(plain(replies.R250_HELO.format(self.shared.hostname)))
        lines = [self.shared.hostname, "PIPELINING", f"SIZE {self.settings.max_message_size}",
                 "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "CHUNKING", "DSN"]
        if self.peer.tls_available and not self.peer.tls:
            lines.append("STARTTLS")
        if self.peer.tls:  # RFC 4954 §4 + ARCHITECTURE.md: AUTH only over TLS, always
            lines.append("AUTH PLAIN LOGIN")
        return Reply("".join(f"250-{x}\r\n" for x in lines[:-1]).encode()
                     + plain(f"250 {lines[-1]}"))

    def _starttls(self, arg: str) -> Reply:
        if arg:
            return Reply(line(replies.R501_SYNTAX_STARTTLS))
        if not self.peer.tls_available:
            return Reply(line(replies.R454_TLS_UNAVAILABLE))
        if self.peer.tls:
            return Reply(line(replies.R503_TLS_ACTIVE))
        return Reply(line(replies.R220_READY_FOR_TLS), starttls=True)

    # ------------------------------------------------------------ AUTH (RFC 4954)
    async def _auth(self, st: Connected | Greeted | Transaction, arg: str) -> Reply:
        if isinstance(st, Connected) or not st.esmtp:
            return Reply(line(replies.R503_EHLO_FIRST))
        if not self.peer.tls:
            return Reply(line(replies.R538_ENCRYPTION))
        if self.authenticated:
            return Reply(line(replies.R503_ALREADY_AUTHENTICATED))
        if isinstance(st, Transaction):
            return Reply(line(replies.R503_AUTH_IN_TRANSACTION))
        args = arg.split()
        if not args or len(args) > 2:
            return Reply(line(replies.R501_SYNTAX_AUTH))
        mech = args[0].upper()
        if mech not in ("PLAIN", "LOGIN"):
            return Reply(line(replies.R504_AUTH_TYPE))
        s = self.settings
        try:
            ip_failures = await self.shared.auth_failures.get(ip_key(self.peer.ip))
        except Unavailable:
            return Reply(line(replies.R454_AUTH_TEMPORARY))
        if policy.auth_throttled(ip_failures, 0, ip_limit=s.auth_fail_limit_ip, account_limit=0):
            self.shared.stats.auth_throttled(self.peer.listener, "ip")
            return Reply(line(replies.R454_AUTH_THROTTLED))
        initial = None
        if len(args) == 2:
            if mech == "PLAIN" and args[1] == "=":
                initial = b""
            else:
                initial = _b64(args[1].encode("utf-8", "surrogateescape"))
                if initial is None:
                    return Reply(line(replies.R501_BAD_BASE64))
        if mech == "PLAIN":
            if initial is None:
                return self._challenge(Sasl(st, "PLAIN"), b"")
            return await self._plain(initial)
        if initial is None:
            return self._challenge(Sasl(st, "LOGIN"), b"Username:")
        return self._challenge(Sasl(st, "LOGIN", initial), b"Password:")

    def _challenge(self, sasl: Sasl, text: bytes) -> Reply:
        self.state = sasl
        return Reply(plain(replies.R334_CHALLENGE.format(base64.b64encode(text).decode())))

    async def _sasl(self, st: Sasl, item: Item) -> Reply:
        """The answer to a challenge: whatever the line parsed as, its raw octets."""
        self.state = st.before
        if isinstance(item, Bad) and item.reason == TOO_LONG:
            # answered at once, not after the client chose to end the line (issue 8, low)
            return Reply(line(replies.R500_AUTH_LINE_TOO_LONG), close=True)
        blob = item.raw.strip()
        if blob == b"*":
            return Reply(line(replies.R501_AUTH_ABORTED))
        got = _b64(blob)
        if got is None:
            return Reply(line(replies.R501_BAD_BASE64))
        if st.mechanism == "PLAIN":
            return await self._plain(got)
        if st.user is None:
            return self._challenge(Sasl(st.before, "LOGIN", got), b"Password:")
        return await self._login(st.user.decode("utf-8", "replace"), got.decode("utf-8", "replace"))

    async def _plain(self, raw: bytes) -> Reply:
        parts = raw.split(b"\x00")
        if len(parts) != 3 or not parts[1]:
            return Reply(line(replies.R501_BAD_PLAIN))
        if parts[0] and parts[0] != parts[1]:
            # RFC 4616 §2: acting as another identity (authzid) is not offered
            return Reply(line(replies.R535_AUTHZID))
        return await self._login(parts[1].decode("utf-8", "replace"),
                                 parts[2].decode("utf-8", "replace"))

    async def _login(self, username: str, password: str) -> Reply:
        sh, s, listener = self.shared, self.settings, self.peer.listener
        try:
            account_failures = await sh.auth_failures.get(account_key(username))
            if policy.auth_throttled(0, account_failures, ip_limit=0,
                                     account_limit=s.auth_fail_limit_account):
                sh.stats.auth_throttled(listener, "account")
                return Reply(line(replies.R454_AUTH_THROTTLED))
            reply = await sh.directory.authenticate(username, password, self.peer.ip)
        except Unavailable:
            sh.stats.auth_tally.inc(listener, "unavailable")
            return Reply(line(replies.R454_AUTH_TEMPORARY))
        if reply.ok:
            self.auth = reply
            if self.info is not None:
                self.info.auth_user = reply.address or username
            sh.stats.auth_tally.inc(listener, "ok")
            return Reply(line(replies.R235_AUTHENTICATED))
        if reply.reason == "throttled":
            return Reply(line(replies.R454_AUTH_THROTTLED))
        sh.stats.auth_tally.inc(listener, "failed")
        try:
            await sh.auth_failures.incr(ip_key(self.peer.ip))
            await sh.auth_failures.incr(account_key(username))
        except Unavailable:
            pass
        return Reply(line(replies.R535_INVALID))

    # ------------------------------------------------------------ the transaction
    def _gate(self, st: Connected | Greeted | Transaction) -> Reply | None:
        """Common checks before MAIL/RCPT/DATA/BDAT: the refusal, or None."""
        if isinstance(st, Connected):
            return Reply(line(replies.R503_HELO_FIRST))
        if self.peer.listener != "mx" and not self.authenticated:
            return Reply(line(replies.R530_AUTH_REQUIRED))
        return None

    async def _mail(self, st: Connected | Greeted | Transaction, arg: str) -> Reply:
        if (refusal := self._gate(st)) is not None:
            return refusal
        assert not isinstance(st, Connected)
        if isinstance(st, Transaction):
            return Reply(line(replies.R503_NESTED_MAIL))
        if arg[:5].upper() != "FROM:":
            return Reply(line(replies.R501_SYNTAX_MAIL))
        sh = self.shared
        try:
            path, rest = proto.parse_path(arg[5:], allow_null=True, utf8=True)
            params = proto.parse_params(rest)
            if params and not st.esmtp:
                raise proto.ParamError(replies.R501_PARAMETERS_NEED_EHLO)
            mp = proto.mail_params(params, max_size=self.settings.max_message_size)
        except proto.PathError as exc:
            return Reply(line(replies.R501_BAD_SENDER.format(exc)))
        except proto.ParamError as exc:
            return Reply(line(exc.reply))
        if path.utf8 and not mp.smtputf8:
            return Reply(line(replies.R553_NEEDS_SMTPUTF8))
        if self.auth is not None and not policy.sender_allowed(path.address, self.auth.send_as):
            sh.stats.mail_reject_tally.inc(self.peer.listener, "not_owner")
            return Reply(line(replies.R553_NOT_OWNER))
        if (self.settings.reject_unauthenticated_local_senders and path.address
                and not sh.may_relay(self.peer.ip, self.authenticated)):
            # an unauthenticated client claiming one of our own domains (SPF may say
            # nothing): refused when the operator asks for it
            try:
                sender = await sh.directory.resolve(path.address)
            except Unavailable:
                return Reply(line(replies.R451_DIRECTORY))
            if sender.status != "remote":
                sh.stats.mail_reject_tally.inc(self.peer.listener, "local_sender")
                return Reply(line(replies.R550_LOCAL_SENDER))
        # where BDAT chunks go (DATA opens its own spool)
        self.state = Transaction(st.helo, st.esmtp, path.address, mp,
                                 sh.spool.open(sh.inline_threshold),
                                 proto.MessageCheck(self.settings.max_line_length))
        if (delay := sh.flow_delay()) > 0:  # intake follows delivery
            FLOW_DELAYS.inc()
            FLOW_DELAY_SECONDS.inc(delay)
            await self.sleep(delay)
        return Reply(line(replies.R250_OK))

    async def _rcpt(self, st: Connected | Greeted | Transaction, arg: str) -> Reply:
        if (refusal := self._gate(st)) is not None:
            return refusal
        if not isinstance(st, Transaction):
            return Reply(line(replies.R503_NEED_MAIL))
        if st.mode is not None:
            return Reply(line(replies.R503_RCPT_AFTER_DATA))
        if arg[:3].upper() != "TO:":
            return Reply(line(replies.R501_SYNTAX_RCPT))
        sh = self.shared
        target = arg[3:].strip()
        if target[:12].lower() == "<postmaster>":
            # RFC 5321 §4.5.1: <Postmaster> without a domain must be accepted
            target = f"<postmaster@{sh.hostname}>" + target[12:]
        try:
            path, rest = proto.parse_path(target, allow_null=False, utf8=st.params.smtputf8)
            params = proto.parse_params(rest)
            if params and not st.esmtp:
                raise proto.ParamError(replies.R501_PARAMETERS_NEED_EHLO)
            rp = proto.rcpt_params(params)
        except proto.PathError as exc:
            return Reply(line(replies.R501_BAD_RECIPIENT.format(exc)))
        except proto.ParamError as exc:
            return Reply(line(exc.reply))
        if len(st.recipients) >= self.settings.max_recipients:
            self._count_rcpt("deferred", "too_many_recipients")
            return Reply(line(replies.R452_TOO_MANY_RCPTS))
        may_relay = sh.may_relay(self.peer.ip, self.authenticated)
        early = policy.recipient_needs_lookup(
            path, may_relay=may_relay, null_sender=st.mail_from == "",
            private_literals=self.settings.common.allow_private_address_literals)
        answer = None
        if early is None:
            try:
                answer = await sh.directory.resolve(path.address)
            except Unavailable:
                self._count_rcpt("deferred", "directory_unavailable")
                return Reply(line(replies.R451_DIRECTORY))
            decision = policy.recipient_decision(answer, may_relay=may_relay)
            if not policy.null_sender_may_relay(st.mail_from, answer):
                decision = policy.Refuse(replies.R550_NULL_SENDER_RELAY, "null_sender_relay")
        else:
            decision = early
        match decision:
            case policy.Refuse(reply=reply, reason=reason):
                self._count_rcpt("rejected", reason)
                return Reply(line(reply))
            case policy.Accept(reply=reply):
                key = path.address.lower()
                if key not in st.seen:
                    st.seen.add(key)
                    st.recipients.append(Recipient(address=path.address, orcpt=rp.orcpt,
                                                   notify=list(rp.notify),  # type: ignore[arg-type]
                                                   resolved=answer))
                self._count_rcpt("accepted", "ok")
                return Reply(line(reply))
        raise AssertionError(decision)  # pragma: no cover

    def _count_rcpt(self, outcome: str, reason: str) -> None:
        self.shared.stats.rcpt_tally.inc(self.peer.listener, outcome, reason)

    # ------------------------------------------------------------ DATA (RFC 5321 §4.1.1.4)
    def _data(self, st: Connected | Greeted | Transaction, arg: str) -> Reply:
        if (refusal := self._gate(st)) is not None:
            return refusal
        if not isinstance(st, Transaction):
            return Reply(line(replies.R503_NEED_MAIL))
        if st.mode == "BDAT":
            return Reply(line(replies.R503_DATA_AFTER_BDAT))
        if not st.recipients:
            return Reply(line(replies.R503_NEED_RCPT))
        if arg:
            return Reply(line(replies.R501_SYNTAX_DATA))
        st.mode = "DATA"
        sh = self.shared
        self.state = InData(st, sh.spool.open(sh.inline_threshold))
        return Reply(plain(replies.R354_START_DATA), read_data=True)

    async def _data_item(self, st: InData, item: Item) -> Reply:
        match item:
            case Body(data=data):
                if st.room and not st.spool.write(data):
                    st.room = False  # no room: read to the end, keep nothing, answer 451
                    st.spool.close()
                return Reply()
            case Overflow():
                st.spool.close()  # too big: what it holds will not be used
                return Reply()
            case DataEnd(problem=problem):
                self.state = st.txn
                try:
                    if not st.room:
                        return self._refuse(replies.R451_NO_ROOM, "no_room")
                    if problem is not None:
                        return self._refuse(problem.reply, problem.reason)
                    return await self._accept(st.txn, st.spool)
                finally:
                    st.spool.close()
        raise AssertionError(f"{type(item).__name__} inside DATA")  # pragma: no cover

    # ------------------------------------------------------------ BDAT (RFC 3030)
    def _bdat(self, st: Connected | Greeted | Transaction, size: int | None, last: bool) -> Reply:
        if size is None:
            # the size is unknown, so the chunk cannot be skipped: close (RFC 3030 §4)
            return Reply(line(replies.R501_SYNTAX_BDAT), close=True)
        limit = self.settings.max_message_size or 2**31
        keep = (isinstance(st, Transaction) and st.mode != "DATA"
                and st.spool.size + size <= limit)
        self.state = InChunk(st, size, last, keep, keep)
        return Reply(read_chunk=size)

    async def _chunk_item(self, st: InChunk, item: Item) -> Reply:
        txn = st.before if isinstance(st.before, Transaction) else None
        match item:
            case Body(data=data):
                if st.room and txn is not None:
                    if not txn.spool.write(data):
                        st.room = False  # read the chunk to its end, keep nothing, answer 451
                        txn.spool.close()
                    txn.check.feed(data)
                return Reply()
            case ChunkEnd():
                self.state = st.before
                return await self._chunk_end(st, txn)
        raise AssertionError(f"{type(item).__name__} inside a BDAT chunk")  # pragma: no cover

    async def _chunk_end(self, st: InChunk, txn: Transaction | None) -> Reply:
        if st.keep and not st.room:
            return self._refuse(replies.R451_NO_ROOM, "no_room")
        if (refusal := self._gate(st.before)) is not None:
            return refusal
        if txn is None:
            return Reply(line(replies.R503_NEED_MAIL))
        if txn.mode == "DATA":
            return Reply(line(replies.R503_BDAT_AFTER_DATA))
        if not txn.recipients:
            return Reply(line(replies.R503_NEED_RCPT))
        txn.mode = "BDAT"
        if not st.keep:
            return self._refuse(replies.R552_TOO_BIG, "too_big")
        if not st.last:
            return Reply(line(replies.R250_CHUNK.format(st.size)))
        if (problem := txn.check.problem()) is not None:  # as DataEnd answers DATA
            return self._refuse(problem.reply, problem.reason)
        return await self._accept(txn, txn.spool)

    # ------------------------------------------------------------ the end of a message
    def _refuse(self, reply: str, reason: str) -> Reply:
        self.shared.stats.message_tally.inc(self.peer.listener, "rejected", reason)
        log.info("message refused", ip=self.peer.ip, reason=reason)
        self._end_transaction()
        return Reply(line(reply))

    async def _accept(self, txn: Transaction, body: Spool) -> Reply:
        """Queue the message whose body is in ``body`` (the caller closes it) and answer 250
        once it is durable: a body over the inline threshold is uploaded to S3 from the
        spool first, streamed, then the JetStream publish is acked."""
        started = time.perf_counter()
        sh, peer = self.shared, self.peer
        qid = policy.new_queue_id()
        now = datetime.now(UTC)
        rdns = await self.reverse_name()
        auth_user = self.auth.address if self.auth else None
        header = policy.received_header(
            helo=txn.helo, ip=peer.ip, rdns=rdns, hostname=sh.hostname, esmtp=txn.esmtp,
            tls=peer.tls, auth_user=auth_user, utf8=txn.params.smtputf8, queue_id=qid,
            rcpt=txn.recipients[0].address if len(txn.recipients) == 1 else None, when=now)
        size = len(header) + body.size
        try:
            if size > sh.inline_threshold:
                async with sh.uploads:
                    ref = BodyRef(size=size, blob_key=await sh.bodies.put_file(header,
                                                                               body.reader()))
            else:
                ref = BodyRef(size=size, inline=header + body.contents())
            msg = MailReceived(
                queue_id=qid, received_at=now,
                client=ClientInfo(ip=peer.ip, port=peer.port, reverse_dns=rdns, helo=txn.helo,
                                  listener=peer.listener,  # type: ignore[arg-type]
                                  tls=peer.tls, auth_user=auth_user),
                mail_from=txn.mail_from, rcpt_to=txn.recipients, body=ref,
                body_type=txn.params.body,  # type: ignore[arg-type]  # checked by mail_params
                smtputf8=txn.params.smtputf8, dsn_envid=txn.params.envid,
                dsn_ret=txn.params.ret)  # type: ignore[arg-type]
            await sh.queue.publish(msg)
        except Unavailable as exc:
            log.warning("could not queue message", error=str(exc)[:200], ip=peer.ip)
            return self._refuse(replies.R451_QUEUE, "queue_unavailable")
        labelled(ACCEPT_LATENCY, peer.listener).observe(time.perf_counter() - started)
        sh.stats.message_tally.inc(peer.listener, "accepted", "ok")
        labelled(BYTES, peer.listener).inc(size)
        if self.info is not None:
            self.info.messages += 1
        self._end_transaction()
        return Reply(line(replies.R250_QUEUED.format(qid)))


def _b64(data: bytes) -> bytes | None:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return None


def receiver_for(settings: Settings) -> proto.Receiver:
    """The receiver of one connection, with this replica's limits."""
    return proto.Receiver(max_line=settings.max_command_length,
                          max_size=settings.max_message_size,
                          max_data_line=settings.max_line_length)
