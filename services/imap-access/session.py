"""One IMAP4rev1 session (RFC 3501 §3 states: not authenticated, authenticated, selected,
logout), or IMAP4rev2 after ENABLE IMAP4rev2 (RFC 9051, ADR 0016), talking only to the ports. The server owns the socket; the session writes its
responses to an ``Output`` and tells the server what to do next (raw line, STARTTLS, close).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import time
import uuid
from array import array
from bisect import bisect_right
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from postbus.imap_access.metacache import MetaCache
from postbus.imap_access.ports import (
    Blobs,
    Changes,
    Directory,
    Output,
    Store,
    StoreError,
    Unsubscribe,
)
from postbus.imap_access.view import BadSequence, MailboxView, to_ranges
from postbus.kit.blob import blob_key
from postbus.kit.flow import RecentFailures
from postbus.kit.logging import get_logger
from postbus.kit.metrics import counter
from postbus.proto.mail import MailboxChanged, MessageSummary
from postbus.proto.store import (
    AppendMessage,
    AppendRequest,
    CopyRequest,
    ExpungeRequest,
    FetchRequest,
    MailboxCreateRequest,
    MailboxInfo,
    MailboxListRequest,
    MailboxRef,
    MailboxRenameRequest,
    MessageMeta,
    MessageState,
    QuotaRequest,
    SearchKey,
    SearchRequest,
    SelectReply,
    SelectRequest,
    StoreFlagsRequest,
    SubscribeRequest,
)
from postbus.protocols import imap_context, imap_notify, imap_qresync, imap_sort, imap_thread, mime
from postbus.protocols import imap_parser as p
from postbus.protocols.imap_wire import (
    astring,
    flag_list,
    imap_datetime,
    literal,
    mutf7_decode,
    mutf7_encode,
    ordered_seqset,
    seqset,
)
from postbus.protocols.served import served

log = get_logger(__name__)

COMMANDS = counter("postbus_imap_commands_total", "IMAP commands by name and result",
                   ["command", "result"])
FETCH_BYTES = counter("postbus_imap_fetch_bytes_total", "Octets of message data sent by FETCH")

MAX_PENDING_EVENTS = 1000  # notifications kept for a session between two commands
# NOTIFY (RFC 5465): mailbox names one NOTIFY SET may list, and mailboxes other than the
# selected one with a STATUS waiting to go out (one each: a later change replaces it)
MAX_NOTIFY_NAMES = 100
MAX_NOTIFY_PENDING = 1000
SYSTEM_FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")
DELIM = "/"
# IMAP4rev2 (RFC 9051) beside IMAP4rev1: a client chooses it with ENABLE (§6.3.1); the
# extensions rev2 folds in stay advertised for rev1 clients (Appendix E)
BASE_CAPS = ("IMAP4rev1", "IMAP4rev2", "LITERAL+", "SASL-IR", "ID", "ENABLE", "IDLE",
             "NAMESPACE", "UIDPLUS", "MOVE", "UNSELECT", "CHILDREN", "SPECIAL-USE",
             "LIST-EXTENDED", "LIST-STATUS", "CONDSTORE", "ESEARCH", "SEARCHRES",
             "STATUS=SIZE", "QUOTA", "CREATE-SPECIAL-USE", "BINARY",
             "MULTIAPPEND", "SORT", "SORT=DISPLAY", "ESORT", "CONTEXT=SEARCH",
             *(f"THREAD={alg}" for alg in p.THREAD_ALGORITHMS), "CATENATE", "QRESYNC",
             "NOTIFY")


# ---------------------------------------------------------------- states (RFC 3501 §3)
@dataclass(frozen=True)
class NotAuthenticated:
    failures: int = 0


@dataclass(frozen=True)
class Authenticated:
    account_id: int
    user: str


@dataclass
class Selected:
    account_id: int
    user: str
    view: MailboxView


@dataclass(frozen=True)
class LoggedOut:
    pass


State = NotAuthenticated | Authenticated | Selected | LoggedOut


@dataclass(frozen=True)
class Tagged:
    status: str  # OK | NO | BAD
    text: str


class No(Exception):
    """Answer the command with ``NO [code] text``."""

    def __init__(self, text: str, code: str | None = None, status: str = "NO") -> None:
        super().__init__(text)
        self.text = f"[{code}] {text}" if code else text
        self.status = status


@dataclass
class SessionConfig:
    auth_fail_delay_s: float = 2.0
    max_auth_failures: int = 3
    fetch_batch: int = 250
    # UIDs per STORE/COPY request: replies list every message, and a NATS message is at most
    # 1 MiB by default
    uids_per_request: int = 5000
    # message bytes read from S3 and held at once by one FETCH (larger batches go piecewise)
    fetch_bytes_in_flight: int = 32 * 1024 * 1024
    # SORT reads the metadata of every matching message; past this many it answers NO [LIMIT]
    # (RFC 5256 leaves the bound to the server)
    sort_max_messages: int = 100_000
    # SEARCH RETURN (UPDATE) (RFC 5267 §4.3): live searches a session may keep (Dovecot's
    # CLIENT_MAX_SEARCH_UPDATES), and the UIDs all of them may hold together (4 octets
    # each); past either the server answers NO [NOUPDATE] and stops updating that search
    search_updates_max: int = 10
    search_update_uids_max: int = 100_000
    # APPENDs up to this size are summarised here; the store summarises larger ones itself
    # (a summary of thousands of parts is about twice the message, and a NATS message is
    # bounded, 1 MiB by default)
    summarize_append_max: int = 128 * 1024
    # APPENDs up to this size travel to the store with the request and are kept in its
    # blob rows instead of S3 (ADR 0014)
    inline_body_max: int = 32 * 1024
    inline_append_budget: int = 256 * 1024  # bytes inline in one request (NATS: 1 MiB)
    hostname: str = "localhost"
    starttls_available: bool = False
    # the largest message an APPEND takes (the receiver's literal bound), advertised after
    # login as APPENDLIMIT=n and in STATUS (RFC 7889); None: not advertised
    append_limit: int | None = None
    # the server can wrap the stream in DEFLATE (RFC 4978): COMPRESS=DEFLATE after login
    compress_available: bool = False


@dataclass
class LiveSearch:
    """A SEARCH RETURN (UPDATE) the session keeps up to date (RFC 5267 §4.3). ``program``
    names messages by UID only: sequence numbers were resolved when it ran (as Dovecot)."""

    tag: str
    uid: bool
    program: p.SearchNode
    charset: str
    result: imap_context.ResultSet
    ranges: int = 0  # the UID ranges ``program`` holds ("$" and sequence sets resolved)


@dataclass
class Info:
    """What the management API shows about a live session."""

    id: str
    ip: str
    listener: str
    since: float = field(default_factory=time.time)
    user: str | None = None
    mailbox: str | None = None
    tls: bool = False
    commands: int = 0


# ---------------------------------------------------------------- names
def decode_name(raw: bytes, utf8: bool = False) -> str:
    """A name or pattern from the wire: modified UTF-7 (RFC 3501 §5.1.3), or with ``utf8``
    (IMAP4rev2, RFC 9051 §5.1) UTF-8 as sent, where "&" is an ordinary character. Not
    normalised: a name means the octets it has (RFC 9051 §5.1 leaves NFC to the server)."""
    if not utf8:
        return mutf7_decode(raw)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise No("Mailbox name is not UTF-8", "CLIENTBUG", status="BAD") from None


def to_store_name(raw: bytes, utf8: bool = False) -> str:
    """Wire mailbox name (modified UTF-7, or UTF-8 with ``utf8``) to the store's name; INBOX
    is case-insensitive. One trailing delimiter is dropped (RFC 3501 §6.3.3); any other
    empty level stays, so "/INBOX" or "a//b" names no mailbox (the store refuses such
    names)."""
    name = decode_name(raw, utf8).removesuffix(DELIM) if raw not in (b"",) else ""
    head, sep, rest = name.partition(DELIM)
    if head.upper() == "INBOX":
        name = "INBOX" + sep + rest
    return name


def check_new_name(name: str) -> None:
    """A name a client creates (CREATE, RENAME's target, SUBSCRIBE): RFC 9051 §5.1 forbids
    the C0 and C1 controls, DEL, LINE SEPARATOR and PARAGRAPH SEPARATOR in mailbox names,
    whether they come as UTF-8 (IMAP4rev2) or modified UTF-7. The store refuses only C0
    and DEL."""
    if any(ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F or ch in "\u2028\u2029" for ch in name):
        raise No("Mailbox name contains a control character or line separator", "CANNOT")


def wire_name(name: str, utf8: bool = False) -> bytes:
    """A store name for the wire: modified UTF-7, or with ``utf8`` (IMAP4rev2) UTF-8,
    quoted when it is not an atom (RFC 9051 §5.1)."""
    return astring(name, utf8=True) if utf8 else astring(mutf7_encode(name))


def _ancestors(name: str) -> list[str]:
    """"a/b/c" -> ["a/b", "a"]: the names above a mailbox, nearest first."""
    parts = name.split(DELIM)
    return [DELIM.join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]


class _ListPattern:
    """A LIST pattern (RFC 3501 §6.3.8, RFC 9051 §6.3.9): ``*`` matches anything, ``%``
    anything but the delimiter; a leading INBOX in any case. Matched as a set of positions
    in the pattern carried along the name (bits of an int), never by backtracking: a
    pattern of many wildcards against a long name costs its length times the pattern's,
    where a regex took exponential time and held the event loop."""

    def __init__(self, ref: str, pattern: str) -> None:
        full = pattern if (not ref or pattern.startswith(DELIM)) else ref + pattern
        # every "*" and "%" of a pattern is a wildcard; a run of them is one, "*" if it
        # has one, else "%"
        toks: list[str] = []
        for ch in full:
            if ch in "*%" and toks and toks[-1] in "*%":
                toks[-1] = "*" if "*" in (ch, toks[-1]) else "%"
            else:
                toks.append(ch)
        self.size = len(toks)
        self.literals = sum(t not in "*%" for t in toks)  # the fewest characters it takes
        self.star = self.pct = 0
        self.lit: dict[str, int] = {}  # per character, the positions it matches at
        inbox = full[:5].upper() == "INBOX"
        for i, t in enumerate(toks):
            if t == "*":
                self.star |= 1 << i
            elif t == "%":
                self.pct |= 1 << i
            else:
                for ch in {t.lower(), t.upper()} if inbox and i < 5 else {t}:
                    self.lit[ch] = self.lit.get(ch, 0) | 1 << i
        self.wild = self.star | self.pct

    def _close(self, states: int) -> int:
        # a wildcard matches nothing too; none follows another, so one step is enough
        return states | (states & self.wild) << 1

    def match(self, name: str) -> bool:
        if self.literals > len(name):
            return False
        states = self._close(1)
        for ch in name:
            nxt = (states & self.lit.get(ch, 0)) << 1 | states & self.star
            if ch != DELIM:
                nxt |= states & self.pct
            states = self._close(nxt)
            if not states:
                return False
        return bool(states >> self.size & 1)


class Session:
    def __init__(self, *, directory: Directory, store: Store, blobs: Blobs, changes: Changes,
                 out: Output, config: SessionConfig, client_ip: str = "127.0.0.1",
                 secure: bool = False, tls: bool = False, listener: str = "imap",
                 meta_cache: MetaCache | None = None,
                 ip_failures: RecentFailures | None = None) -> None:
        self.directory = directory
        self.store = store
        self.blobs = blobs
        self.changes = changes
        self.out = out
        self.cfg = config
        # shared by the sessions of a server: immutable message metadata (metacache.py)
        self.meta_cache = meta_cache if meta_cache is not None else MetaCache(4 * 1024 * 1024)
        # failed logins per client address, shared by the sessions of a server
        self.ip_failures = ip_failures if ip_failures is not None else RecentFailures(0, 0)
        self.client_ip = client_ip
        self.secure = secure or tls
        self.tls = tls
        self.state: State = NotAuthenticated()
        self.info = Info(uuid.uuid4().hex[:16], client_ip, listener, tls=tls)
        self.condstore = False
        # RFC 7162 §3.2.3: after ENABLE QRESYNC, VANISHED instead of EXPUNGE responses
        self.qresync = False
        # after ENABLE IMAP4rev2 (RFC 9051, ADR 0016): UTF-8 mailbox names, no \Recent,
        # ESEARCH for every SEARCH, no LSUB, a LIST response and [CLOSED] from SELECT
        self.rev2 = False
        # SEARCH RETURN (SAVE)'s result, the messages "$" names (RFC 5182 §2.1), as
        # ascending UID ranges, first and last flat in 32-bit words: 8 octets a run of
        # saved messages however long, 8 a message at worst (every other one saved);
        # expunged ones drop out when it is used; empty after SELECT, CLOSE, UNSELECT
        self._saved: array[int] = array("I")
        # what the server should do after the current command
        self.expect_line = False
        self.start_tls = False
        self.start_compress = False  # DEFLATE from the octet after the tagged OK
        # the layer that compresses the stream already ("DEFLATE", "TLS"), RFC 4978 §3
        self.compression: str | None = None
        self._pending_auth: str | None = None  # tag of an AUTHENTICATE waiting for a response
        self._idle_tag: str | None = None
        self._events: list[MailboxChanged] = []
        self.wakeup = asyncio.Event()
        self._unsubscribe: Unsubscribe | None = None
        self._bye_after: str | None = None  # say BYE after the tagged response
        self._resync = False  # compare the whole view with the store at the next safe point
        self._live: dict[str, LiveSearch] = {}  # by tag: SEARCH RETURN (UPDATE), RFC 5267
        # NOTIFY SET (RFC 5465): what to report; the subscribed names when a filter needs
        # them; per other mailbox the newest change to report and its STATUS items
        self._notify: imap_notify.Filter | None = None
        self._subscribed: set[str] = set()
        self._notify_status: dict[int, tuple[MailboxChanged, tuple[str, ...]]] = {}

    # ------------------------------------------------------------ helpers
    @property
    def closed(self) -> bool:
        return isinstance(self.state, LoggedOut)

    @property
    def idling(self) -> bool:
        """The session takes news between commands (the server wakes it through
        ``wakeup``): in IDLE, and while a NOTIFY SET is in force (RFC 5465 §3)."""
        return self._idle_tag is not None or (self._notify is not None and self.authenticated)

    @property
    def authenticated(self) -> bool:
        return isinstance(self.state, Authenticated | Selected)

    def capabilities(self) -> str:
        caps = list(BASE_CAPS)
        if not self.tls and self.cfg.starttls_available:
            caps.append("STARTTLS")
        if not self.secure:
            caps.append("LOGINDISABLED")
        elif not self.authenticated:
            caps.append("AUTH=PLAIN")
        if self.authenticated and self.cfg.append_limit is not None:
            caps.append(f"APPENDLIMIT={self.cfg.append_limit}")  # the same for every mailbox
        if self.authenticated and self.cfg.compress_available:
            caps.append("COMPRESS=DEFLATE")  # valid only once authenticated (RFC 4978 §3)
        return " ".join(caps)

    # ------------------------------------------------------------ names and modes
    def _name(self, raw: bytes) -> str:
        return to_store_name(raw, self.rev2)

    def _wire(self, name: str) -> bytes:
        return wire_name(name, self.rev2)

    def _decode(self, raw: bytes) -> str:
        return decode_name(raw, self.rev2)

    def _shown(self, view: MailboxView, uid: int) -> list[str]:
        """The flags a FETCH shows: IMAP4rev2 has no \\Recent (RFC 9051 §2.3.2, Appendix
        E), IMAP4rev1 shows it on the messages recent to this session."""
        return view.flags.get(uid, []) if self.rev2 else view.shown_flags(uid)

    def _recent_line(self, view: MailboxView) -> None:
        """``* n RECENT`` (RFC 3501 §7.3.2); IMAP4rev2 has no such response."""
        if not self.rev2:
            self.w(f"* {len(view.recent)} RECENT")

    def w(self, line: str | bytes) -> None:
        self.out.write((line.encode() if isinstance(line, str) else line) + b"\r\n")

    def greeting(self) -> None:
        self.w(f"* OK [CAPABILITY {self.capabilities()}] Postbus IMAP ready")

    def bye(self, text: str) -> None:
        self.w(f"* BYE {text}")
        self.state = LoggedOut()

    def notify(self, event: MailboxChanged) -> None:
        """Called by the Changes port (any time): remember, apply at the next safe point."""
        if isinstance(self.state, Selected) and event.mailbox_id == self.state.view.mailbox_id:
            if len(self._events) >= MAX_PENDING_EVENTS:
                # a quiet client on a busy mailbox: forget the details, compare snapshots later
                self._events.clear()
                self._resync = True
            else:
                self._events.append(event)
            self.wakeup.set()
        elif self._notify is not None and self.authenticated:
            self._notify_other(self._notify, event)

    def _notify_other(self, flt: imap_notify.Filter, event: MailboxChanged) -> None:
        """A change in a mailbox other than the selected one, under NOTIFY: keep the newest
        state of each mailbox with the STATUS items it earned (no store call; bounded by
        MAX_NOTIFY_PENDING mailboxes, one entry each)."""
        counts = not (event.added or event.expunged or event.flags)  # (say: counts moved)
        items = imap_notify.status_items(
            flt.events_for(event.mailbox, self._subscribed), added=bool(event.added) or counts,
            expunged=bool(event.expunged), flags=bool(event.flags))
        if not items:
            return
        prev = self._notify_status.get(event.mailbox_id)
        if prev is None:
            if len(self._notify_status) >= MAX_NOTIFY_PENDING:
                return
        else:
            items = tuple(dict.fromkeys(prev[1] + items))
            if prev[0].highestmodseq > event.highestmodseq:  # news overtaken by newer news
                event = prev[0]
        self._notify_status[event.mailbox_id] = (event, items)
        self.wakeup.set()

    def _flush_notify(self) -> None:
        """The STATUS responses NOTIFY earned for other mailboxes (RFC 5465 §5)."""
        if not self._notify_status:
            return
        pending, self._notify_status = self._notify_status, {}
        selected = self.state.view.mailbox_id if isinstance(self.state, Selected) else None
        for mailbox_id, (ev, items) in pending.items():
            if mailbox_id == selected:
                continue
            self._status_write(ev.mailbox, items, {
                "MESSAGES": ev.exists, "UIDNEXT": ev.uidnext, "UIDVALIDITY": ev.uidvalidity,
                "HIGHESTMODSEQ": ev.highestmodseq})

    async def _notify_cmd(self, st: Authenticated | Selected, cmd: p.Notify) -> Tagged:
        """NOTIFY SET / NONE (RFC 5465 §3). Events this server cannot report (mailbox
        names, subscriptions, annotations, metadata) are NO [BADEVENT] and leave the
        earlier setting in force."""
        if cmd.groups is None:
            self._notify = None
            self._notify_status.clear()
            return Tagged("OK", "NOTIFY completed")
        if imap_notify.unsupported(cmd):
            raise No("Unsupported NOTIFY events",
                     "BADEVENT (" + " ".join(imap_notify.SUPPORTED) + ")")
        if imap_notify.mailbox_names(cmd) > MAX_NOTIFY_NAMES:
            raise No(f"At most {MAX_NOTIFY_NAMES} mailbox names", "NOTIFICATIONOVERFLOW")
        flt = imap_notify.Filter.of(cmd, [tuple(self._name(m) for m in g.mailboxes)
                                          for g in cmd.groups])
        infos: list[MailboxInfo] = []
        if flt.uses_subscriptions or cmd.status:
            infos = (await self.store.mailbox_list(
                MailboxListRequest(account_id=st.account_id))).mailboxes
        self._subscribed = {i.name for i in infos if i.subscribed}
        self._notify = flt
        self._notify_status.clear()
        if any(imap_notify.FLAGS in g.events for g in cmd.groups):
            # its STATUS responses carry HIGHESTMODSEQ, and FETCHes MODSEQ: CONDSTORE is
            # on from here (as Dovecot does; the client learns HIGHESTMODSEQ first)
            self._enable_condstore()
        if cmd.status:  # the state to start from, for each mailbox the events cover
            selected = st.view.mailbox_id if isinstance(st, Selected) else None
            for info in infos:
                if info.mailbox_id == selected or "\\Noselect" in info.attributes:
                    continue
                items = imap_notify.status_items(
                    flt.events_for(info.name, self._subscribed), added=False,
                    expunged=False, flags=False, initial=True)
                if items:
                    self._status_line(info, items)
        return Tagged("OK", "NOTIFY completed")

    async def close(self) -> None:
        if self._unsubscribe is not None:
            unsub, self._unsubscribe = self._unsubscribe, None
            try:
                await unsub()
            except Exception:
                log.warning("unsubscribe failed", session=self.info.id)
        if not self.closed:
            self.state = LoggedOut()

    # ------------------------------------------------------------ dispatch
    async def handle(self, item: p.Command | p.Bad | p.Continue | p.RawLine) -> None:
        """Process one receiver output; writes the responses. Never raises for client input."""
        self.expect_line = False
        match item:
            case p.Continue():
                self.w("+ Ready for literal data")
                return
            case p.RawLine(line=line):
                await self._raw_line(line)
                return
            case p.Bad(tag=tag, reason=reason, code=code, fatal=fatal):
                # RFC 3501 §6.4.4: an unknown charset is NO [BADCHARSET], not BAD; an APPEND
                # past APPENDLIMIT is a tagged NO [TOOBIG] (RFC 7889 §4, RFC 4469 §4)
                status = "NO" if code and code.startswith("BADCHARSET") or (
                    code == "TOOBIG" and item.command == "APPEND" and not fatal) else "BAD"
                COMMANDS.labels("invalid", status).inc()
                if status == "NO" and item.saves:
                    self._saved = array("I")  # RFC 9051 §6.4.4.1: SAVE answered NO
                self.w(f"{tag} {status} [{code or 'CLIENTBUG'}] {reason}")
                if fatal:
                    log.info("input past the limits, closing", session=self.info.id,
                             ip=self.client_ip, reason=reason)
                    self.bye("Too much input, closing")
                return
        cmd = item
        name = _metric_name(cmd)
        self.info.commands += 1
        try:
            result = await self._dispatch(cmd)
        except No as exc:
            result = Tagged(exc.status, exc.text)
        except StoreError as exc:
            result = Tagged("NO", _store_error_text(exc))
        except Exception:
            log.exception("command failed", command=name, session=self.info.id)
            result = Tagged("NO", "[SERVERBUG] Internal error")
        if result is None:  # answered later (IDLE, AUTHENTICATE continuation) or LOGOUT
            return
        if isinstance(self.state, Selected) and result.status != "BAD":
            try:
                await self._apply_changes(allow_expunge=_expunge_allowed(cmd))
            except Exception:
                log.exception("applying mailbox changes failed", session=self.info.id)
        self._flush_notify()
        COMMANDS.labels(name, result.status).inc()
        self.w(f"{cmd.tag} {result.status} {result.text}")
        self._maybe_bye()

    def _maybe_bye(self) -> None:
        if self._bye_after is not None:
            self.bye(self._bye_after)
            self._bye_after = None

    async def _dispatch(self, cmd: p.Command) -> Tagged | None:
        st = self.state
        # commands valid in any state (RFC 3501 §6.1)
        match cmd:
            case p.Capability():
                self.w(f"* CAPABILITY {self.capabilities()}")
                return Tagged("OK", "CAPABILITY completed")
            case p.Noop() | p.Check():
                if isinstance(st, Selected):
                    if isinstance(cmd, p.Check):
                        self._resync = True  # CHECK: a full checkpoint against the store
                    else:
                        await self._sync_new(st)
                return Tagged("OK", f"{type(cmd).__name__.upper()} completed")
            case p.Logout():
                self.w("* BYE Logging out")
                self.w(f"{cmd.tag} OK LOGOUT completed")
                COMMANDS.labels("LOGOUT", "OK").inc()
                await self.close()
                return None
            case p.IdCmd(params=params, truncated=truncated):
                # RFC 2971 §3.1: the client's fields are for logs and statistics only;
                # 100 characters of each value tell a client apart, a line stays short
                log.info("client id", session=self.info.id, ip=self.client_ip,
                         fields={k: v if v is None else v[:100] for k, v in params or ()},
                         truncated=truncated)
                self.w('* ID ("name" "Postbus" "vendor" "Postbus" "version" "0.1.0")')
                return Tagged("OK", "ID completed")
        if isinstance(st, NotAuthenticated):
            match cmd:
                case p.StartTLS():
                    return self._starttls()
                case p.Login(user=user, password=password):
                    return await self._login(st, user, password)
                case p.Authenticate():
                    return await self._authenticate(st, cmd)
                case _:
                    return Tagged("BAD", "[CLIENTBUG] Command not valid before login")
        if isinstance(cmd, p.StartTLS | p.Login | p.Authenticate):
            return Tagged("BAD", "[CLIENTBUG] Already authenticated")
        assert isinstance(st, Authenticated | Selected)
        match cmd:
            case p.Select():
                return await self._select(st, cmd)
            case p.Create():
                return await self._create(st, cmd)
            case p.Delete(mailbox=m):
                name = self._name(m)
                if name == "INBOX":
                    raise No("INBOX cannot be deleted", "CANNOT")
                if isinstance(st, Selected) and st.view.name == name:
                    raise No("Cannot delete the selected mailbox", "INUSE")
                await self.store.mailbox_delete(MailboxRef(account_id=st.account_id, name=name))
                return Tagged("OK", "DELETE completed")
            case p.Rename(old=old, new=new):
                o, n = self._name(old), self._name(new)
                if not n or n == "INBOX":
                    raise No("Invalid target name", "CANNOT")
                check_new_name(n)
                await self.store.mailbox_rename(
                    MailboxRenameRequest(account_id=st.account_id, old=o, new=n))
                return Tagged("OK", "RENAME completed")
            case p.Subscribe(mailbox=m) | p.Unsubscribe(mailbox=m):
                if isinstance(cmd, p.Subscribe):
                    check_new_name(self._name(m))  # a name LIST (SUBSCRIBED) may show
                await self.store.mailbox_subscribe(SubscribeRequest(
                    account_id=st.account_id, name=self._name(m),
                    subscribed=isinstance(cmd, p.Subscribe)))
                # NOTIFY's "subscribed" filter follows this session's own changes
                (self._subscribed.add if isinstance(cmd, p.Subscribe)
                 else self._subscribed.discard)(self._name(m))
                return Tagged("OK", f"{type(cmd).__name__.upper()} completed")
            case p.ListCmd(lsub=True) if self.rev2:
                # RFC 9051 has no LSUB (Appendix E): LIST (SUBSCRIBED) says more; a rev2
                # client cannot parse an LSUB response either (ADR 0016)
                return Tagged("BAD", "[CLIENTBUG] LSUB is not IMAP4rev2; use LIST (SUBSCRIBED)")
            case p.ListCmd():
                return await self._list(st, cmd)
            case p.Status():
                return await self._status(st, cmd)
            case p.Append() if cmd.parts is not None or any(
                    m.parts is not None for m in cmd.more):
                return await self._catenate(st, cmd)
            case p.Append():
                return await self._append(st, cmd)
            case p.Enable(capabilities=caps):
                # RFC 5161 §3.1; the capability is named as CAPABILITY spells it
                known = {"CONDSTORE": "CONDSTORE", "QRESYNC": "QRESYNC",
                         "IMAP4REV2": "IMAP4rev2"}
                enabled = list(dict.fromkeys(known[c] for c in caps if c in known))
                self.w("* ENABLED" + "".join(" " + c for c in enabled))
                if {"CONDSTORE", "QRESYNC"} & set(enabled):
                    self._enable_condstore()  # QRESYNC implies CONDSTORE (RFC 7162 §3.2.3)
                if "QRESYNC" in enabled:
                    self.qresync = True
                if "IMAP4rev2" in enabled:
                    # RFC 9051 §6.3.1; unlike Dovecot not QRESYNC as well: VANISHED is no
                    # IMAP4rev2 response, and a rev2 client may not expect it (ADR 0016)
                    self.rev2 = True
                return Tagged("OK", "ENABLE completed")
            case p.Namespace():
                self.w(f'* NAMESPACE (("" "{DELIM}")) NIL NIL')
                return Tagged("OK", "NAMESPACE completed")
            case p.GetQuotaRoot(mailbox=m):
                q = await self.store.quota(QuotaRequest(account_id=st.account_id))
                self.out.write(b"* QUOTAROOT " + self._wire(self._name(m)) + b' ""\r\n')
                self._quota_line(q.used_bytes, q.limit_bytes)
                return Tagged("OK", "GETQUOTAROOT completed")
            case p.GetQuota(root=r):
                if r != b"":
                    raise No("No such quota root", "NONEXISTENT")
                q = await self.store.quota(QuotaRequest(account_id=st.account_id))
                self._quota_line(q.used_bytes, q.limit_bytes)
                return Tagged("OK", "GETQUOTA completed")
            case p.Idle():
                await self._idle_start(st, cmd.tag)
                return None
            case p.Notify():
                return await self._notify_cmd(st, cmd)
            case p.Compress():
                return self._compress(cmd)
        if not isinstance(st, Selected):
            return Tagged("BAD", "[CLIENTBUG] No mailbox selected")
        return await self._dispatch_selected(st, cmd)

    async def _dispatch_selected(self, st: Selected, cmd: p.Command) -> Tagged:
        """The commands of the selected state (RFC 3501 §6.4 and its extensions)."""
        match cmd:
            case p.Close():
                if not st.view.readonly:
                    await self._expunge_pages(st, None)
                self._deselect(st)
                return Tagged("OK", "CLOSE completed")
            case p.Unselect():
                self._deselect(st)
                return Tagged("OK", "UNSELECT completed")
            case p.Expunge():
                return await self._expunge(st, cmd)
            case p.Search():
                return await self._search(st, cmd)
            case p.CancelUpdate(tags=tags):
                for t in tags:  # RFC 5267 §4.3.5 (Dovecot stops at the first unknown tag)
                    if self._live.pop(t, None) is None:
                        shown = "".join(ch for ch in t[:40] if ch.isprintable())
                        raise No(f"Unknown tag {shown}")
                self._stop_watching(st.view)
                return Tagged("OK", "CANCELUPDATE completed")
            case p.Sort():
                return await self._sort(st, cmd)
            case p.ThreadCmd():
                return await self._thread(st, cmd)
            case p.Fetch():
                return await self._fetch(st, cmd)
            case p.StoreCmd():
                return await self._store_flags(st, cmd)
            case p.Copy():
                return await self._copy(st, cmd)
        return Tagged("BAD", "[CLIENTBUG] Command not supported")

    # ------------------------------------------------------------ authentication
    def _starttls(self) -> Tagged:
        if self.tls:
            return Tagged("BAD", "[CLIENTBUG] TLS is already active")
        if not self.cfg.starttls_available:
            return Tagged("NO", "TLS is not configured")
        self.start_tls = True
        return Tagged("OK", "Begin TLS negotiation now")

    def _compress(self, cmd: p.Compress) -> Tagged:
        """RFC 4978 §3: BAD for a mechanism we do not know, NO [COMPRESSIONACTIVE] when a
        layer compresses already; after OK the server compresses from the next octet on.
        Only after login, so after any STARTTLS: TLS comes first (RFC 4978 §4)."""
        if cmd.mechanism != "DEFLATE" or not self.cfg.compress_available:
            return Tagged("BAD", "[CLIENTBUG] Unknown compression mechanism")
        if self.compression is not None:
            return Tagged("NO", f"[COMPRESSIONACTIVE] {self.compression} is active already")
        self.compression = "DEFLATE"
        self.start_compress = True
        return Tagged("OK", "DEFLATE active")

    async def _login(self, st: NotAuthenticated, user: bytes, password: bytes) -> Tagged:
        if not self.secure:
            return Tagged("NO", "[PRIVACYREQUIRED] LOGIN is disabled before STARTTLS")
        return await self._check_credentials(st, user.decode("utf-8", "replace"),
                                             password.decode("utf-8", "replace"))

    async def _check_credentials(self, st: NotAuthenticated, user: str, password: str) -> Tagged:
        if self.ip_failures.over(self.client_ip):
            # every session from this address together (issue 8.4): no password check
            log.info("login refused: too many failures from address", ip=self.client_ip)
            self._bye_after = "Too many authentication failures from your address"
            return Tagged("NO", "[UNAVAILABLE] Too many failed logins, try again later")
        try:
            reply = await self.directory.authenticate(user, password, self.client_ip)
        except StoreError:
            return Tagged("NO", "[UNAVAILABLE] Authentication service unavailable")
        if not reply.ok or reply.account_id is None:
            self.ip_failures.add(self.client_ip)
            failures = st.failures + 1
            self.state = NotAuthenticated(failures)
            log.info("login failed", user=user[:100], ip=self.client_ip, reason=reply.reason)
            await asyncio.sleep(self.cfg.auth_fail_delay_s)
            if failures >= self.cfg.max_auth_failures:
                self._bye_after = "Too many authentication failures"
            return Tagged("NO", "[AUTHENTICATIONFAILED] Authentication failed")
        self.state = Authenticated(reply.account_id, reply.address or user)
        self.info.user = reply.address or user
        try:
            self._unsubscribe = await self.changes.subscribe(reply.account_id, self.notify)
        except Exception:
            log.warning("could not subscribe to mailbox changes", session=self.info.id)
        return Tagged("OK", f"[CAPABILITY {self.capabilities()}] Logged in")

    async def _authenticate(self, st: NotAuthenticated, cmd: p.Authenticate) -> Tagged | None:
        if cmd.mechanism != "PLAIN":
            return Tagged("NO", "[CANNOT] Unsupported authentication mechanism")
        if not self.secure:
            return Tagged("NO", "[PRIVACYREQUIRED] Authentication is disabled before STARTTLS")
        if cmd.initial is None:
            self._pending_auth = cmd.tag
            self.expect_line = True
            self.w("+ ")
            return None
        return await self._plain(st, cmd.initial)

    async def _plain(self, st: NotAuthenticated, response: bytes) -> Tagged:
        try:
            raw = b"" if response == b"=" else base64.b64decode(response, validate=True)
        except (binascii.Error, ValueError):
            return Tagged("BAD", "[CLIENTBUG] Invalid base64")
        parts = raw.split(b"\x00")
        if len(parts) != 3:
            return Tagged("BAD", "[CLIENTBUG] Invalid PLAIN response")
        authz, user, password = (x.decode("utf-8", "replace") for x in parts)
        if authz and authz != user:
            return Tagged("NO", "[AUTHORIZATIONFAILED] Proxy authorization is not supported")
        return await self._check_credentials(st, user, password)

    async def _raw_line(self, line: bytes) -> None:
        if self._pending_auth is not None:
            tag, self._pending_auth = self._pending_auth, None
            if line.strip() == b"*":
                result = Tagged("BAD", "Authentication cancelled")
            elif isinstance(self.state, NotAuthenticated):
                result = await self._plain(self.state, line.strip())
            else:
                result = Tagged("BAD", "[CLIENTBUG] Already authenticated")
            COMMANDS.labels("AUTHENTICATE", result.status).inc()
            self.w(f"{tag} {result.status} {result.text}")
            self._maybe_bye()
        elif self._idle_tag is not None:
            tag, self._idle_tag = self._idle_tag, None
            if line.strip().upper() == b"DONE":
                if isinstance(self.state, Selected):
                    await self._apply_changes(allow_expunge=True)
                self._flush_notify()
                COMMANDS.labels("IDLE", "OK").inc()
                self.w(f"{tag} OK IDLE terminated")
            else:
                COMMANDS.labels("IDLE", "BAD").inc()
                self.w(f"{tag} BAD [CLIENTBUG] Expected DONE")

    # ------------------------------------------------------------ IDLE (RFC 2177)
    async def _idle_start(self, st: Authenticated | Selected, tag: str) -> None:
        self._idle_tag = tag
        self.expect_line = True
        self.w("+ idling")
        if isinstance(st, Selected):
            await self._apply_changes(allow_expunge=True)
        self._flush_notify()
        await self.out.drain()
        return None

    async def idle_updates(self) -> None:
        """The server calls this when ``wakeup`` fires between commands: in IDLE, or with
        NOTIFY (RFC 5465 §3: news at any time). Without a selected filter the selected
        mailbox's news waits for a command, as in RFC 3501; with ``selected-delayed``
        its expunges do."""
        self.wakeup.clear()
        if not self.idling:
            return
        in_idle, flt = self._idle_tag is not None, self._notify
        if isinstance(self.state, Selected) and (in_idle or (flt is not None and (
                imap_notify.FLAGS in flt.selected_events
                or (flt.selected_events and (self._resync or any(
                    ev.added or ev.expunged for ev in self._events)))))):
            # (without FlagChange a flag change alone waits for the next command, §5.1)
            await self._apply_changes(
                allow_expunge=in_idle or (flt is not None and flt.selected_immediate))
        self._flush_notify()
        await self.out.drain()

    async def _apply_changes(self, allow_expunge: bool) -> None:
        """The selected mailbox's news (``_apply_events``), then, when NOTIFY asked for
        MessageNew with fetch attributes (RFC 5465 §5.2), a FETCH of each new message
        (BODY[] as BODY.PEEK[]: a notification does not set \\Seen), then what entered and
        left the live searches."""
        st = self.state
        if not isinstance(st, Selected):
            return
        top = st.view.max_uid
        await self._apply_events(allow_expunge)
        atts = self._notify.new_message_atts if self._notify is not None else ()
        if atts and self.state is st and st.view.max_uid > top:
            await self._fetch(st, p.Fetch("*", True, ((top + 1, st.view.max_uid),),
                                          tuple(replace(a, peek=True) for a in atts)))
        await self._update_live()

    # ------------------------------------------------------------ mailboxes
    async def _list(self, st: Authenticated | Selected, cmd: p.ListCmd) -> Tagged:
        ref = self._decode(cmd.reference)
        verb = "LSUB" if cmd.lsub else "LIST"
        if len(cmd.patterns) == 1 and cmd.patterns[0] == b"" and not cmd.lsub:
            self.w(f'* LIST (\\Noselect) "{DELIM}" ""')
            return Tagged("OK", "LIST completed")
        subscribed_only = cmd.lsub or "SUBSCRIBED" in cmd.select_opts
        boxes = (await self.store.mailbox_list(MailboxListRequest(
            account_id=st.account_id, subscribed_only=subscribed_only))).mailboxes
        names = {b.name for b in boxes}
        pats = [self._decode(pat) for pat in cmd.patterns]
        rxs = [_ListPattern(ref, pat) for pat in pats]
        want_status = [x[7:] for x in cmd.return_opts if x.startswith("STATUS.")]
        self._check_status_items(want_status)
        show_subscribed = "SUBSCRIBED" in cmd.return_opts or "SUBSCRIBED" in cmd.select_opts
        special_only = "SPECIAL-USE" in cmd.select_opts
        listed = {b.name: b for b in boxes if any(rx.match(b.name) for rx in rxs)
                  and (b.special_use or not special_only)}
        # names above subscribed mailboxes the patterns do not match, which the patterns
        # match: RFC 5258 §3.5 RECURSIVEMATCH lists them with CHILDINFO (not subscribed
        # ones too), RFC 3501 §6.3.9 LSUB "%" lists the unsubscribed ones as \Noselect
        childinfo = "RECURSIVEMATCH" in cmd.select_opts and "SUBSCRIBED" in cmd.select_opts
        lsub_parents = cmd.lsub and any("%" in pat for pat in pats)
        above: set[str] = set()
        if childinfo or lsub_parents:
            above = {a for b in boxes if b.subscribed and b.name not in listed
                     for a in _ancestors(b.name) if any(rx.match(a) for rx in rxs)}
        existing: dict[str, MailboxInfo] = {}
        if childinfo:  # the parents' own attributes, and children that are not subscribed
            existing = {b.name: b for b in (await self.store.mailbox_list(MailboxListRequest(
                account_id=st.account_id, subscribed_only=False))).mailboxes}
            names |= set(existing)
        extended = b' ("CHILDINFO" ("SUBSCRIBED"))' if childinfo else b""
        lines: list[tuple[str, bytes, MailboxInfo | None]] = []
        for name in above - set(listed):
            parent = existing.get(name)
            if cmd.lsub:
                attrs = ["\\Noselect"]
            elif parent is None:
                attrs = ["\\NonExistent"]
            else:
                attrs = [a for a in parent.attributes
                         if a.lower() not in ("\\haschildren", "\\hasnochildren")]
                attrs.append("\\HasChildren")
                if parent.special_use and parent.special_use not in attrs:
                    attrs.append(parent.special_use)
            lines.append((name, f"* {verb} ({' '.join(attrs)}) \"{DELIM}\" ".encode()
                          + self._wire(name) + extended + b"\r\n", None))
        for b in listed.values():
            attrs = [a for a in b.attributes if a.lower() not in ("\\haschildren",
                                                                  "\\hasnochildren")]
            missing = "\\NonExistent" in attrs
            if cmd.lsub and missing:
                attrs = [a for a in attrs if a != "\\NonExistent"] + ["\\Noselect"]
            has_children = any(n.startswith(b.name + DELIM) for n in names)
            if not cmd.lsub and not missing:
                attrs.append("\\HasChildren" if has_children else "\\HasNoChildren")
            if b.special_use and b.special_use not in attrs:
                attrs.append(b.special_use)
            if show_subscribed and b.subscribed and "\\Subscribed" not in attrs:
                attrs.append("\\Subscribed")
            status = want_status and "\\Noselect" not in attrs and not missing
            lines.append((b.name, f"* {verb} ({' '.join(attrs)}) \"{DELIM}\" ".encode()
                          + self._wire(b.name) + (extended if b.name in above else b"")
                          + b"\r\n", b if status else None))
        for _name, line, status_of in sorted(lines, key=lambda e: (e[0] != "INBOX", e[0])):
            self.out.write(line)
            if status_of is not None:
                self._status_line(status_of, tuple(want_status))
        return Tagged("OK", f"{verb} completed")

    def _status_line(self, info: MailboxInfo, items: tuple[str, ...]) -> None:
        vals = {"MESSAGES": info.messages, "RECENT": info.recent, "UIDNEXT": info.uidnext,
                "UIDVALIDITY": info.uidvalidity, "UNSEEN": info.unseen,
                "HIGHESTMODSEQ": info.highestmodseq, "SIZE": info.size,
                "DELETED": info.deleted,
                # RFC 7889 §3.1: NIL when there is no limit
                "APPENDLIMIT": "NIL" if self.cfg.append_limit is None else self.cfg.append_limit}
        self._status_write(info.name, items, vals)

    def _status_write(self, name: str, items: Iterable[str], vals: Mapping[str, object]) -> None:
        """``* STATUS name (item value ...)`` for the items asked, in their order."""
        body = " ".join(f"{it} {vals[it]}" for it in items if it in vals)
        self.out.write(b"* STATUS " + self._wire(name) + f" ({body})\r\n".encode())

    def _check_status_items(self, items: list[str] | tuple[str, ...]) -> None:
        """IMAP4rev2's status-att has no RECENT (RFC 9051 §6.3.11, §9): BAD, as Dovecot."""
        if self.rev2 and "RECENT" in items:
            raise No("RECENT is not an IMAP4rev2 status item", "CLIENTBUG", status="BAD")

    async def _status(self, st: Authenticated | Selected, cmd: p.Status) -> Tagged:
        self._check_status_items(cmd.items)
        info = await self._mailbox(st.account_id, self._name(cmd.mailbox))
        self._status_line(info, cmd.items)
        return Tagged("OK", "STATUS completed")

    async def _mailbox(self, account_id: int, name: str) -> MailboxInfo:
        try:
            return await self.store.mailbox_status(MailboxRef(account_id=account_id, name=name))
        except StoreError as exc:
            if exc.code == "not_found":
                raise No("Mailbox does not exist", "NONEXISTENT") from None
            raise

    async def _create(self, st: Authenticated | Selected, cmd: p.Create) -> Tagged:
        name = self._name(cmd.mailbox)
        if not name or name == "INBOX":
            raise No("Mailbox already exists", "ALREADYEXISTS")
        check_new_name(name)
        use = cmd.special_use[0] if cmd.special_use else None
        try:
            await self.store.mailbox_create(MailboxCreateRequest(
                account_id=st.account_id, name=name, special_use=use))
        except StoreError as exc:
            if exc.code == "exists":
                raise No("Mailbox already exists", "ALREADYEXISTS") from None
            raise
        return Tagged("OK", "CREATE completed")

    def _quota_line(self, used: int, limit: int | None) -> None:
        if limit is None:
            self.w('* QUOTA "" ()')
        else:
            self.w(f'* QUOTA "" (STORAGE {(used + 1023) // 1024} {limit // 1024})')

    # ------------------------------------------------------------ select
    async def _select(self, st: Authenticated | Selected, cmd: p.Select) -> Tagged:
        if cmd.qresync is not None:
            _check_qresync(cmd.qresync, self.qresync)
        # a name that is not UTF-8 (IMAP4rev2) is BAD before anything changes: the selected
        # mailbox and "$" stay as they were
        name = self._name(cmd.mailbox)
        self._saved = array("I")  # RFC 5182 §2.1: "$" starts empty in every mailbox
        if isinstance(st, Selected):
            self._deselect(st)
            # RFC 7162 §3.2.11 with CONDSTORE; always in IMAP4rev2 (RFC 9051 §6.3.2)
            if self.condstore or self.rev2:
                self.w("* OK [CLOSED] Previous mailbox closed")
            st2: Authenticated | Selected = self.state  # type: ignore[assignment]
        else:
            st2 = st
        # the first page by name: the mailbox's info comes with it (one round trip)
        try:
            # \Recent (RFC 3501 §2.3.2): SELECT takes the messages no session was told about;
            # EXAMINE only looks (§6.3.2: it must not make them lose \Recent)
            page = await self.store.select(SelectRequest(
                account_id=st2.account_id, name=name, claim_recent=not cmd.readonly))
        except StoreError as exc:
            if exc.code == "not_found":
                raise No("Mailbox does not exist", "NONEXISTENT") from None
            if exc.code == "invalid":
                raise No("Mailbox cannot be selected", "CANNOT") from None
            raise
        info = page.mailbox
        if "\\Noselect" in info.attributes:
            raise No("Mailbox cannot be selected", "CANNOT")
        if cmd.condstore:
            self.condstore = True
        view = MailboxView(info.mailbox_id, info.name, cmd.readonly, info.uidvalidity,
                           info.uidnext, info.highestmodseq)
        recent = (page.recent_uid if page.recent_uid is not None else info.uidnext,
                  info.uidnext)
        after = 0
        while True:
            if after:
                page = await self.store.select(SelectRequest(
                    account_id=st2.account_id, mailbox_id=info.mailbox_id, after_uid=after))
            for m in page.messages:
                view.add(m.uid, m.flags, m.modseq)
            view.uidnext = max(view.uidnext, page.mailbox.uidnext)
            view.highestmodseq = max(view.highestmodseq, page.mailbox.highestmodseq)
            if not page.more or not page.messages or page.messages[-1].uid <= after:
                break
            after = page.messages[-1].uid
        view.mark_recent(*recent)
        self.state = Selected(st2.account_id, st2.user, view)
        self.info.mailbox = view.name
        view.announced = dict.fromkeys(view.keywords())
        self._flags_lines(view)
        if self.rev2:
            # RFC 9051 §6.3.2: a LIST response with the mailbox's name and attributes
            # (names are not normalised here, so OLDNAME never applies, ADR 0016)
            attrs = list(info.attributes)
            if info.special_use and info.special_use not in attrs:
                attrs.append(info.special_use)
            self.out.write(f"* LIST ({' '.join(attrs)}) \"{DELIM}\" ".encode()
                           + self._wire(info.name) + b"\r\n")
        self.w(f"* {view.exists} EXISTS")
        self._recent_line(view)
        first_unseen = next((i + 1 for i, u in enumerate(view.uids)
                             if "\\Seen" not in view.flags[u]), None)
        if first_unseen and not self.rev2:  # no UNSEEN response code in RFC 9051 (§7.1)
            self.w(f"* OK [UNSEEN {first_unseen}] First unseen")
        self.w(f"* OK [UIDVALIDITY {view.uidvalidity}] UIDs valid")
        self.w(f"* OK [UIDNEXT {view.uidnext}] Predicted next UID")
        self.w(f"* OK [HIGHESTMODSEQ {view.highestmodseq}] Highest")
        if cmd.qresync is not None and cmd.qresync.uidvalidity == view.uidvalidity:
            # (another UIDVALIDITY: the client's cache is void, a plain SELECT, §3.2.5)
            await self._qresync_select(st2.account_id, view, cmd.qresync)
        verb = "EXAMINE" if cmd.readonly else "SELECT"
        return Tagged("OK", f"[{'READ-ONLY' if cmd.readonly else 'READ-WRITE'}] {verb} completed")

    async def _qresync_select(self, account_id: int, view: MailboxView, q: p.QResync) -> None:
        """RFC 7162 §3.2.5.1: what changed since the client's MODSEQ, among the UIDs it
        knows: VANISHED (EARLIER) for the expunged ones, then FETCH of the changed ones.

        The store's expunge log keeps every expunge of a mailbox for as long as the mailbox
        exists, so it always reaches back to MODSEQ and the exact answer needs no
        seq-match-data (§3.2.5.2 is for servers whose log is shorter): that is checked
        for form and otherwise ignored."""
        known = imap_qresync.from_seqset(q.known_uids) if q.known_uids is not None else None
        vanished = await self._vanished_since(account_id, view, q.modseq, known)
        if vanished:
            self._vanished(vanished, earlier=True)
        for seq, uid in enumerate(view.uids, 1):
            if view.modseq.get(uid, 0) > q.modseq and (known is None or _inside(known, uid)):
                self.out.write(b"* %d FETCH (UID %d FLAGS " % (seq, uid)
                               + flag_list(self._shown(view, uid))
                               + b" MODSEQ (%d))\r\n" % view.modseq.get(uid, 0))

    async def _vanished_since(self, account_id: int, view: MailboxView, modseq: int,
                              within: imap_qresync.Ranges | None) -> imap_qresync.Ranges:
        """UIDs expunged at a MODSEQ above ``modseq`` (the store's expunge log), limited to
        ``within``, without the ones the view still holds: their expunge reaches this
        session later, as a plain VANISHED that changes sequence numbers.

        When the log cannot answer (the store refuses, e.g. a reply too large for the bus
        after very many scattered expunges), RFC 7162 §3.2.5.2's fallback: every UID below
        UIDNEXT (within ``within``) that no longer exists; VANISHED (EARLIER) may name UIDs
        the client never knew or already forgot, and clients ignore those."""
        gone: imap_qresync.Ranges
        try:
            page = await self.store.select(SelectRequest(
                account_id=account_id, mailbox_id=view.mailbox_id, changed_since=modseq,
                limit=1))
        except StoreError as exc:
            if exc.code == "unavailable":
                raise
            log.warning("expunge log unavailable, reporting every missing UID",
                        session=self.info.id, code=exc.code)
            gone = [(1, view.uidnext - 1)] if view.uidnext > 1 else []
        else:
            if page.mailbox.uidvalidity != view.uidvalidity:
                return []
            gone = sorted((a, b) for a, b in page.vanished)
        if within is not None:
            gone = imap_qresync.intersect(gone, within)
        return imap_qresync.without(gone, view.uids)

    def _vanished(self, ranges: imap_qresync.Ranges, earlier: bool = False) -> None:
        """``* VANISHED [(EARLIER)] uids``, in lines of at most about 8 KB."""
        head = "* VANISHED (EARLIER) " if earlier else "* VANISHED "
        for part in imap_qresync.wire_sets(ranges):
            self.w(head + part)

    def _report_expunged(self, view: MailboxView, uids: list[int]) -> None:
        """Remove messages from the view and tell the client: ``* n EXPUNGE`` each, or
        after ENABLE QRESYNC ``* VANISHED uids`` (RFC 7162 §3.2.10). A live search hears
        of each message before it goes, by its sequence number at that moment, so with one
        running the VANISHED goes out message by message, right after its REMOVEFROM."""
        if not self.qresync:
            for uid in uids:
                seq = self._expunge_one(view, uid)
                if seq is not None:
                    self.w(f"* {seq} EXPUNGE")
            return
        gone: list[int] = []
        for uid in sorted(uids):
            if self._live and gone:
                self._vanished(to_ranges(gone))
                gone = []
            if self._expunge_one(view, uid) is not None:
                gone.append(uid)
        if gone:
            self._vanished(to_ranges(gone))

    def _expunge_one(self, view: MailboxView, uid: int) -> int | None:
        """Remove a message from the view, after the live searches holding it said
        REMOVEFROM; the sequence number it had."""
        seq = view.seq_of(uid)
        if seq is not None and self._live:
            self._live_expunge(uid, seq)
        return view.expunge(uid)

    def _deselect(self, st: Selected) -> None:
        self.state = Authenticated(st.account_id, st.user)
        self._saved = array("I")
        self.info.mailbox = None
        self._events.clear()
        self._resync = False
        self._live.clear()  # RFC 5267 §4.3: a live search ends with its mailbox
        st.view.touched = None

    # ------------------------------------------------------------ changes from elsewhere
    async def _sync_new(self, st: Selected, *, exists_sent: bool = False,
                        first_page: SelectReply | None = None) -> None:
        """Add messages newer than the view (paged STORE_SELECT after the largest UID) and
        claim \\Recent for this session on the ones no session was told about yet.

        RFC 3501 §2.3.2 gives \\Recent to the first session notified of a message. With
        two sessions on one mailbox both hear of a delivery; the store decides which one
        gets it (the first to claim), so every session that learns of new messages asks,
        and the others find them claimed. Messages are claimed only up to the UIDNEXT of
        the reply, i.e. ones this session is now told about; a read-only session claims
        nothing and sees \\Recent only on messages nobody has claimed.
        ``exists_sent``: the caller sent an EXISTS for messages it added to the view from a
        change notification; the RECENT that goes with it comes from here. ``first_page``:
        that first page (with its claim) already came with an APPEND's answer."""
        view = st.view
        before = view.exists
        recent_before = len(view.recent)
        first = True
        while True:
            # a claim on the first page only: it covers everything up to its UIDNEXT
            page = first_page if first and first_page is not None else await self.store.select(
                SelectRequest(account_id=st.account_id, mailbox_id=view.mailbox_id,
                              after_uid=view.max_uid, claim_recent=first and not view.readonly))
            added = [view.add(m.uid, m.flags, m.modseq) for m in page.messages]
            if first and page.recent_uid is not None:
                view.mark_recent(page.recent_uid, page.mailbox.uidnext)
            first = False
            view.uidnext = max(view.uidnext, page.mailbox.uidnext)
            if not page.more or not any(added):  # (a store ignoring after_uid cannot loop us)
                break
        if view.exists != before:
            self.w(f"* {view.exists} EXISTS")
        if view.exists != before or exists_sent or len(view.recent) != recent_before:
            self._recent_line(view)

    async def _resync_view(self, st: Selected, allow_expunge: bool) -> None:
        """Compare the view with a fresh snapshot (paged STORE_SELECT) and report the
        differences: used when notifications were dropped, and for CHECK."""
        view = st.view
        current: dict[int, tuple[list[str], int]] = {}
        after = 0
        recent: tuple[int, int] | None = None
        while True:
            page = await self.store.select(SelectRequest(
                account_id=st.account_id, mailbox_id=view.mailbox_id, after_uid=after,
                claim_recent=recent is None and not view.readonly))
            if page.mailbox.uidvalidity != view.uidvalidity:
                self.bye("Mailbox UIDVALIDITY changed")
                return
            if recent is None:  # the claim of the first page (see _sync_new)
                recent = (page.mailbox.uidnext if page.recent_uid is None else page.recent_uid,
                          page.mailbox.uidnext)
            for m in page.messages:
                current[m.uid] = (m.flags, m.modseq)
            view.uidnext = max(view.uidnext, page.mailbox.uidnext)
            view.highestmodseq = max(view.highestmodseq, page.mailbox.highestmodseq)
            if not page.more or not page.messages or page.messages[-1].uid <= after:
                break
            after = page.messages[-1].uid
        gone = [u for u in view.uids if u not in current]
        if gone and not allow_expunge:
            self._resync = True  # report the expunges when they are allowed
        for uid in list(view.uids):
            if uid in current:
                flags, modseq = current[uid]
                if view.set_flags(uid, flags, modseq):
                    self._flags_response(view, uid, with_uid=True)
        if allow_expunge:
            self._report_expunged(view, gone)
        before, recent_before = view.exists, len(view.recent)
        for uid in sorted(u for u in current if u > view.max_uid):
            view.add(uid, *current[uid])
        if recent is not None:
            view.mark_recent(*recent)
        if view.exists != before:
            self.w(f"* {view.exists} EXISTS")
        if view.exists != before or len(view.recent) != recent_before:
            self._recent_line(view)

    async def _apply_events(self, allow_expunge: bool) -> None:
        st = self.state
        if not isinstance(st, Selected):
            return
        if self._resync:
            self._resync = False
            self._events.clear()
            await self._resync_view(st, allow_expunge)
            return
        if not self._events:
            return
        view = st.view
        kept: list[MailboxChanged] = []
        events, self._events = self._events, []
        need_new = exists_sent = False
        for ev in events:
            if ev.mailbox_id != view.mailbox_id:
                continue
            if ev.uidvalidity != view.uidvalidity:
                self.bye("Mailbox UIDVALIDITY changed")
                return
            if ev.added:
                # new messages right after the view's last UID, without a gap: the event
                # says all there is to know, no need to ask the store
                new = sorted(ev.added, key=lambda m: m.uid)
                if all(m.uid == view.max_uid + 1 + i for i, m in enumerate(new)):
                    for m in new:
                        view.add(m.uid, m.flags, m.modseq)
                    view.uidnext = max(view.uidnext, ev.uidnext)
                    self.w(f"* {view.exists} EXISTS")  # before any EXPUNGE that follows
                    # whether they are \Recent here only the store can say (_sync_new)
                    need_new = exists_sent = True
            for ch in ev.flags:
                if view.set_flags(ch.uid, ch.flags, ch.modseq):
                    self._flags_response(view, ch.uid, with_uid=True)
            if ev.expunged:
                if allow_expunge:
                    self._report_expunged(view, sorted(ev.expunged))
                else:
                    kept.append(MailboxChanged(**{**ev.model_dump(by_alias=True),
                                                  "added": [], "flags": []}))
            if ev.uidnext > view.max_uid + 1 and (ev.added or ev.exists > view.exists):
                need_new = True
            view.highestmodseq = max(view.highestmodseq, ev.highestmodseq)
        self._events = kept + self._events
        if need_new:
            await self._sync_new(st, exists_sent=exists_sent)

    def _enable_condstore(self) -> None:
        """A CONDSTORE-enabling command (RFC 7162 §3.1: FETCH MODSEQ or CHANGEDSINCE, STORE
        UNCHANGEDSINCE, SEARCH MODSEQ, ENABLE) after a plain SELECT: the client learns the
        mailbox's HIGHESTMODSEQ before the first response that carries a MODSEQ."""
        if self.condstore:
            return
        self.condstore = True
        if isinstance(self.state, Selected):
            self.w(f"* OK [HIGHESTMODSEQ {self.state.view.highestmodseq}] Highest")

    def _flags_lines(self, view: MailboxView) -> None:
        flags = " ".join(list(SYSTEM_FLAGS) + list(view.announced))
        self.w(f"* FLAGS ({flags})")
        if view.readonly:
            self.w("* OK [PERMANENTFLAGS ()] Read-only mailbox")
        else:
            self.w(f"* OK [PERMANENTFLAGS ({flags} \\*)] Flags permitted")

    def _announce_keywords(self, view: MailboxView, flags: list[str]) -> None:
        """RFC 3501 §7.2.6: a keyword new to the mailbox reaches the client in FLAGS (and
        PERMANENTFLAGS) before any FETCH shows it, whoever set it."""
        new = [f for f in flags if not f.startswith("\\") and f not in view.announced]
        if new:
            view.announced.update(dict.fromkeys(new))
            self._flags_lines(view)

    def _flags_response(self, view: MailboxView, uid: int, with_uid: bool) -> None:
        seq = view.seq_of(uid)
        if seq is None:
            return
        self._announce_keywords(view, view.flags[uid])
        items = [b"FLAGS " + flag_list(self._shown(view, uid))]
        if with_uid:
            items.append(b"UID %d" % uid)
        if self.condstore:
            items.append(b"MODSEQ (%d)" % view.modseq.get(uid, 0))
        self.out.write(b"* %d FETCH (" % seq + b" ".join(items) + b")\r\n")

    # ------------------------------------------------------------ resolving sets
    def _uids(self, view: MailboxView, s: p.SeqSet, uid: bool) -> list[int]:
        if s == p.SAVED:  # the saved result, without the messages expunged since
            return view.resolve(tuple(_saved_ranges(self._saved)), True)
        try:
            return view.resolve(s, uid)
        except BadSequence as exc:
            raise No(str(exc), "CLIENTBUG", status="BAD") from None

    # ------------------------------------------------------------ EXPUNGE
    async def _expunge(self, st: Selected, cmd: p.Expunge) -> Tagged:
        view = st.view
        if view.readonly:
            raise No("Mailbox is read-only", "READ-ONLY")
        ranges = None
        if cmd.uids is not None:
            uids = self._uids(view, cmd.uids, True)
            if not uids:
                return Tagged("OK", "EXPUNGE completed")
            ranges = to_ranges(uids)
        self._report_expunged(view, await self._expunge_pages(st, ranges))
        if self.condstore:
            return Tagged("OK", f"[HIGHESTMODSEQ {view.highestmodseq}] EXPUNGE completed")
        return Tagged("OK", "EXPUNGE completed")

    async def _expunge_pages(self, st: Selected, ranges: list[tuple[int, int]] | None
                             ) -> list[int]:
        """Expunge in as many calls as the store needs (each removes a page of messages);
        returns the expunged UIDs, ascending."""
        expunged: list[int] = []
        while True:
            reply = await self.store.expunge(ExpungeRequest(
                account_id=st.account_id, mailbox_id=st.view.mailbox_id, uids=ranges,
                origin=self.info.id))
            expunged += reply.expunged
            st.view.highestmodseq = max(st.view.highestmodseq, reply.highestmodseq)
            if not reply.more or not reply.expunged:
                return sorted(expunged)

    # ------------------------------------------------------------ SEARCH
    def _search_key(self, view: MailboxView, node: p.SearchNode) -> SearchKey:
        if node.op in ("seq", "uid") and node.seqset == p.SAVED:
            # "$" (RFC 5182 §2.1): the saved messages still here, by sequence number or UID
            # (the store knows no expunged UID, and a new one is above every saved range)
            return SearchKey(op="uid", uids=_saved_ranges(self._saved))
        if node.op in ("flag", "unflag") and node.args and node.args[0].lower() == "\\recent":
            if self.rev2:  # RFC 9051 §6.4.4 has no RECENT, NEW or OLD (as Dovecot: BAD)
                raise No("RECENT, NEW and OLD are not IMAP4rev2 search keys", "CLIENTBUG",
                         status="BAD")
            # a session flag (RFC 3501 §2.3.2): RECENT, and NEW and OLD built on it, become
            # this session's recent UIDs before the key reaches the store
            recent = SearchKey(op="uid", uids=to_ranges(sorted(view.recent)))
            return recent if node.op == "flag" else SearchKey(op="not", children=[recent])
        if node.op == "seq":
            return SearchKey(op="uid", uids=to_ranges(view.resolve_lenient(node.seqset)))
        if node.op == "uid":
            return SearchKey(op="uid", uids=to_ranges(view.resolve(node.seqset, True)))
        return SearchKey(op=node.op, args=list(node.args),
                         children=[self._search_key(view, c) for c in node.children])

    async def _matching(self, st: Selected, program: p.SearchNode, charset: str,
                        within: list[int] | None = None) -> tuple[list[int], int]:
        """The UIDs in this view matching a search program (of ``within`` only, when given),
        ascending, and the highest MODSEQ the store reported for them."""
        view = st.view
        key = self._search_key(view, program)
        if len(key.children) == 1:
            key = key.children[0]
        if within is not None:
            key = SearchKey(op="and", children=[
                SearchKey(op="uid", uids=to_ranges(within)), key])
        found: set[int] = set()
        highestmodseq = after = 0
        while True:  # the store answers a page of matches at a time
            reply = await self.store.search(SearchRequest(
                account_id=st.account_id, mailbox_id=view.mailbox_id, key=key,
                charset=charset, after_uid=after))
            found.update(reply.uids)
            highestmodseq = max(highestmodseq, reply.highestmodseq)
            if not reply.more or not reply.uids or reply.uids[-1] <= after:
                break
            after = reply.uids[-1]
        return sorted(u for u in found if u in view.flags), highestmodseq

    async def _search(self, st: Selected, cmd: p.Search) -> Tagged:
        view = st.view
        opts = cmd.return_opts
        if opts is None and self.rev2:
            opts = ()  # RFC 9051 §6.4.4: ESEARCH, RETURN () meaning ALL; no SEARCH response
        update = opts is not None and "UPDATE" in opts
        if update and cmd.tag in self._live:  # §4.3: the tag names the live search
            raise No("Duplicate search update tag", "CLIENTBUG", status="BAD")
        save = opts is not None and "SAVE" in opts
        charset = cmd.charset or "UTF-8"
        try:
            uids, highestmodseq = await self._matching(st, cmd.program, charset)
        except BaseException as exc:
            # RFC 9051 §6.4.4.1: a SEARCH with SAVE answered NO sets "$" to the empty
            # sequence; one answered BAD MUST NOT change it
            if save and not (isinstance(exc, No) and exc.status == "BAD"):
                self._saved = array("I")
            raise
        nums = uids if cmd.uid else [view.seq_of(u) or 0 for u in uids]
        uses_modseq = _has_op(cmd.program, "modseq")
        if uses_modseq:
            self._enable_condstore()
        if update:
            self._watch(st, cmd, charset, uids)
        if save:
            # RFC 5182 §2.1: with MIN or MAX and neither ALL nor COUNT only those are saved
            assert opts is not None
            if {"MIN", "MAX"} & set(opts) and not {"ALL", "COUNT"} & set(opts):
                self._saved = _saved_of([*(uids[:1] if "MIN" in opts else []),
                                         *(uids[-1:] if "MAX" in opts else [])])
            elif cmd.partial is not None and "COUNT" not in opts:
                # PARTIAL saves its range, unless COUNT asks about the whole (as Dovecot)
                self._saved = _saved_of(imap_context.take_partial(uids, cmd.partial))
            else:
                self._saved = _saved_of(uids)
        if opts is not None and (not save or set(opts) - {"SAVE"}):
            # (SAVE alone: no ESEARCH response, RFC 5182 §2.1)
            self._esearch(cmd.tag, cmd.uid, opts, nums, seqset(nums) if nums else "",
                          uids[0] if uids else 0, uids[-1] if uids else 0,
                          highestmodseq if uses_modseq else None, cmd.partial)
        elif opts is None:
            line = "* SEARCH" + "".join(f" {n}" for n in nums)
            if uses_modseq and nums:
                line += f" (MODSEQ {highestmodseq})"
            self.w(line)
        return Tagged("OK", "SEARCH completed")

    # ------------------------------------------------------------ SORT
    async def _sort(self, st: Selected, cmd: p.Sort) -> Tagged:
        """SORT and UID SORT (RFC 5256 §3, RFC 5957), ESORT's RETURN (RFC 5267 §3)."""
        uids, highestmodseq = await self._matching(st, cmd.program, cmd.charset)
        if len(uids) > self.cfg.sort_max_messages:
            raise No(f"SORT of more than {self.cfg.sort_max_messages} messages; "
                     "narrow the search", "LIMIT")
        infos = await self._sort_infos(st, uids, any(
            c.key not in ("ARRIVAL", "SIZE") for c in cmd.criteria))
        ordered = imap_sort.sort_messages(
            infos, [imap_sort.Criterion(c.key, c.reverse) for c in cmd.criteria])
        nums = [i.uid if cmd.uid else i.seq for i in ordered]
        # RFC 7162 §3.1.5: a MODSEQ search key enables CONDSTORE and the response ends with
        # the highest mod-sequence of the messages it returns
        uses_modseq = _has_op(cmd.program, "modseq")
        if uses_modseq:
            self._enable_condstore()
        if cmd.return_opts is None:
            line = "* SORT" + "".join(f" {n}" for n in nums)
            if uses_modseq and nums:
                line += f" (MODSEQ {highestmodseq})"
            self.w(line)
            return Tagged("OK", "SORT completed")
        # RFC 5267 §3.1: MIN and MAX are the first and last message in sort order, ALL
        # lists the messages in sort order
        self._esearch(cmd.tag, cmd.uid, cmd.return_opts, nums,
                      ordered_seqset(nums) if nums else "",
                      ordered[0].uid if ordered else 0, ordered[-1].uid if ordered else 0,
                      highestmodseq if uses_modseq else None, cmd.partial, ordered=True)
        return Tagged("OK", "SORT completed")

    # ------------------------------------------------------------ THREAD
    async def _thread(self, st: Selected, cmd: p.ThreadCmd) -> Tagged:
        """THREAD and UID THREAD (RFC 5256 §3, §4): the matches, their sent dates, subjects
        and (REFERENCES) message ids, threaded by postbus.protocols.imap_thread."""
        uids, _ = await self._matching(st, cmd.program, cmd.charset)
        if len(uids) > self.cfg.sort_max_messages:
            raise No(f"THREAD of more than {self.cfg.sort_max_messages} messages; "
                     "narrow the search", "LIMIT")
        infos = await self._thread_infos(st, uids, cmd.algorithm == "REFERENCES")
        threads = imap_thread.thread(cmd.algorithm, infos)
        lists = imap_thread.thread_lists(threads, cmd.uid)
        self.w("* THREAD" + (" " + lists if lists else ""))
        return Tagged("OK", "THREAD completed")

    async def _thread_infos(self, st: Selected, uids: list[int],
                            with_references: bool) -> list[imap_thread.ThreadInfo]:
        """The threading inputs of the messages from their summaries (as SORT reads them):
        sent date, subject, Message-ID, References and In-Reply-To. A summary stored before
        it carried the last two (``thread_fields`` False) has them read from the header
        block of its blob, a byte budget at a time."""
        view = st.view
        batch = max(1, min(self.cfg.fetch_batch, 100))
        infos: list[imap_thread.ThreadInfo] = []
        for i in range(0, len(uids), batch):
            chunk = uids[i:i + batch]
            metas = await self._metas(st, chunk, True)
            await self._summarise_missing([m for m in metas.values() if m.summary is None])
            found = [(u, metas[u]) for u in chunk if u in metas and view.seq_of(u) is not None]
            headers: dict[str, tuple[str, str]] = {}
            if with_references:
                headers = await self._thread_headers([
                    m for _, m in found if m.summary is not None and not m.summary.thread_fields])
            for u, meta in found:
                seq = view.seq_of(u)
                sm = meta.summary
                if seq is None or sm is None:
                    continue  # expunged meanwhile: left out, as FETCH does
                refs, irt = ((sm.references, sm.in_reply_to) if sm.thread_fields
                             else headers.get(meta.blob_key, ("", "")))
                infos.append(imap_thread.ThreadInfo(
                    seq=seq, uid=u, sent=sm.date or meta.internaldate, subject=sm.subject,
                    message_id=sm.message_id, references=refs, in_reply_to=irt))
        return infos

    async def _thread_headers(self, metas: list[MessageMeta]) -> dict[str, tuple[str, str]]:
        """References and In-Reply-To of each message, by blob key."""
        out: dict[str, tuple[str, str]] = {}
        async for group, blobs in self._blobs_by_budget(metas):
            for m in group:
                blob = blobs.get(m.blob_key)
                if blob is None:
                    raise No("Message headers unavailable", "UNAVAILABLE")
                out[m.blob_key] = imap_thread.thread_headers(blob)
        return out

    def _esearch(self, tag: str, uid: bool, return_opts: tuple[str, ...], nums: list[int],
                 all_set: str, first_uid: int, last_uid: int,
                 highestmodseq: int | None, partial: tuple[int, int] | None = None, *,
                 ordered: bool = False) -> None:
        """The ESEARCH response of SEARCH and SORT with RETURN (RFC 4731 §3.1, RFC 5267
        §3.1, §4.4): ``nums`` in answer order, ``first_uid``/``last_uid`` the UIDs of its
        first and last, ``partial`` the PARTIAL range asked (``ordered``: in SORT order);
        ``highestmodseq`` when the search used
        MODSEQ (RFC 7162 §3.1.5: the highest MODSEQ of the messages returned, with only MIN
        and MAX those two). UPDATE alone returns no result (as Dovecot: §4.3 leaves it to
        the other options); no option at all, or CONTEXT alone, means ALL."""
        opts = tuple(o for o in return_opts if o not in ("CONTEXT", "SAVE")) or ("ALL",)
        parts = [f'* ESEARCH (TAG "{tag}")'] + (["UID"] if uid else [])
        if nums:
            if "MIN" in opts:
                parts.append(f"MIN {nums[0]}")
            if "MAX" in opts:
                parts.append(f"MAX {nums[-1]}")
            if "ALL" in opts:
                parts.append(f"ALL {all_set}")
        if partial is not None:
            parts.append(imap_context.partial_data(
                partial, imap_context.take_partial(nums, partial), ordered=ordered))
        if "COUNT" in opts:
            parts.append(f"COUNT {len(nums)}")
        if highestmodseq is not None and nums:
            if {"MIN", "MAX"} & set(opts) and not {"ALL", "COUNT", "PARTIAL"} & set(opts):
                assert isinstance(self.state, Selected)
                returned = ([first_uid] if "MIN" in opts else []) + (
                    [last_uid] if "MAX" in opts else [])
                highestmodseq = max(self.state.view.modseq.get(u, 0) for u in returned)
            parts.append(f"MODSEQ {highestmodseq}")
        self.w(" ".join(parts))

    # ------------------------------------------------------------ live searches (RFC 5267)
    def _watch(self, st: Selected, cmd: p.Search, charset: str, uids: list[int]) -> None:
        """Keep a SEARCH RETURN (UPDATE) up to date, or say NO [NOUPDATE] (§4.3) when the
        session holds too many live searches or results already."""
        # what it holds: its result, and the UID ranges its program keeps (a large "$", or
        # a sequence set over a mailbox with many gaps), as many as the result at worst
        view = st.view
        program = _uid_program(view, cmd.program, _saved_ranges(self._saved))
        ranges = _ranges_in(program)
        held = sum(len(ls.result) + ls.ranges for ls in self._live.values())
        if (len(self._live) >= self.cfg.search_updates_max
                or held + len(uids) + ranges > self.cfg.search_update_uids_max):
            self.w(f'* NO [NOUPDATE "{cmd.tag}"] Too many search updates')
            return
        self._live[cmd.tag] = LiveSearch(cmd.tag, cmd.uid, program, charset,
                                         imap_context.ResultSet(uids), ranges)
        if view.touched is None:
            view.touched = set()

    def _stop_watching(self, view: MailboxView) -> None:
        if not self._live:
            view.touched = None

    def _live_expunge(self, uid: int, seq: int) -> None:
        """Before a message goes (``_expunge_one``): REMOVEFROM of the live searches
        holding it, with the sequence number it has until its EXPUNGE (which the caller
        sends next)."""
        for ls in self._live.values():
            if ls.result.discard(uid):
                self.w(imap_context.update_line(ls.tag, ls.uid, [uid if ls.uid else seq], []))

    async def _update_live(self) -> None:
        """Search the messages added or changed since the last look again, for every live
        search, and send what entered and left each result (ADDTO / REMOVEFROM, §4.3)."""
        st = self.state
        if not isinstance(st, Selected) or not self._live or not st.view.touched:
            return
        view = st.view
        assert view.touched is not None
        touched = sorted(u for u in view.touched if u in view.flags)
        view.touched = set()
        if not touched:
            return
        try:
            await self._update_results(st, touched)
        except BaseException:
            view.touched.update(touched)  # look again next time (an update is idempotent)
            raise
        self._stop_watching(view)

    async def _update_results(self, st: Selected, touched: list[int]) -> None:
        view = st.view
        gone: set[int] | None = None
        for ls in list(self._live.values()):
            matching, _ = await self._matching(st, ls.program, ls.charset, within=touched)
            checked: list[int] = touched
            found = set(matching)
            if any(u in ls.result and u not in found for u in touched):
                if gone is None:  # expunged elsewhere, not yet here: REMOVEFROM comes with
                    # the EXPUNGE (_live_expunge), while the client still sees the message
                    present, _ = await self._matching(st, p.SearchNode("all"), "UTF-8",
                                                      within=touched)
                    gone = set(touched) - set(present)
                checked = [u for u in touched if u not in gone]
            added, removed = ls.result.update(checked, matching)
            held = sum(len(x.result) + x.ranges for x in self._live.values())
            if added and held > self.cfg.search_update_uids_max:
                del self._live[ls.tag]  # §4.3: the server may stop updating at any time
                self.w(f'* NO [NOUPDATE "{ls.tag}"] Search result too large to update')
                continue
            if not ls.uid:
                added = [s for s in map(view.seq_of, added) if s is not None]
                removed = [s for s in map(view.seq_of, removed) if s is not None]
            line = imap_context.update_line(ls.tag, ls.uid, removed, added)
            if line:
                self.w(line)

    async def _metas(self, st: Selected, uids: list[int], need_summary: bool
                     ) -> dict[int, MessageMeta]:
        """Metadata of these messages: the session cache first, one store FETCH for the
        rest (cached as it comes)."""
        view = st.view
        base = (st.account_id, view.mailbox_id, view.uidvalidity)
        metas: dict[int, MessageMeta] = {}
        ask = []
        for u in uids:
            hit = self.meta_cache.get((*base, u), need_summary)
            if hit is None:
                ask.append(u)
            else:
                metas[u] = hit
        if ask:
            reply = await self.store.fetch(FetchRequest(
                account_id=st.account_id, mailbox_id=view.mailbox_id,
                uids=to_ranges(ask), with_summary=need_summary))
            for m in reply.messages:
                metas[m.uid] = m
                self.meta_cache.put((*base, m.uid), m)
        return metas

    async def _sort_infos(self, st: Selected, uids: list[int],
                          need_summary: bool) -> list[imap_sort.SortInfo]:
        """The sort inputs of the messages, through the metadata cache and the store's
        paged FETCH metadata (summaries the store lacks are computed from the blobs)."""
        view = st.view
        batch = max(1, min(self.cfg.fetch_batch, 100) if need_summary else self.cfg.fetch_batch)
        infos: list[imap_sort.SortInfo] = []
        for i in range(0, len(uids), batch):
            chunk = uids[i:i + batch]
            metas = await self._metas(st, chunk, need_summary)
            if need_summary:
                await self._summarise_missing([m for m in metas.values() if m.summary is None])
            for u in chunk:
                meta = metas.get(u)
                seq = view.seq_of(u)
                if meta is None or seq is None:
                    continue  # expunged meanwhile: left out, as FETCH does
                sm = meta.summary
                infos.append(imap_sort.SortInfo(
                    seq=seq, uid=u, arrival=meta.internaldate, size=meta.size,
                    sent=sm.date if sm is not None else None,
                    subject=sm.subject if sm is not None else "",
                    envelope=sm.envelope if sm is not None else ""))
        return infos

    async def _summarise_missing(self, metas: list[MessageMeta]) -> None:
        """Summaries for metadata the store has none for, from the blobs, read a byte
        budget at a time."""
        async for group, blobs in self._blobs_by_budget(metas):
            for m in group:
                blob = blobs.get(m.blob_key)
                if blob is None:
                    raise No("Message structure unavailable", "UNAVAILABLE")
                m.summary = mime.summarize(blob)

    async def _blobs_by_budget(self, metas: list[MessageMeta]
                               ) -> AsyncIterator[tuple[list[MessageMeta], dict[str, bytes]]]:
        """The blobs of these messages, in groups of at most ``fetch_bytes_in_flight``
        octets (a larger message alone): memory stays bounded."""
        budget = self.cfg.fetch_bytes_in_flight
        i = 0
        while i < len(metas):
            group = [metas[i]]
            size = metas[i].blob_size
            i += 1
            while i < len(metas) and size + metas[i].blob_size <= budget:
                group.append(metas[i])
                size += metas[i].blob_size
                i += 1
            yield group, await self.blobs.get_many([m.blob_key for m in group])

    # ------------------------------------------------------------ STORE
    async def _store_flags(self, st: Selected, cmd: p.StoreCmd) -> Tagged:
        view = st.view
        if view.readonly:
            raise No("Mailbox is read-only", "READ-ONLY")
        uids = self._uids(view, cmd.seqset, cmd.uid)
        flags = [f for f in cmd.flags if f.lower() != "\\recent"]
        if cmd.unchangedsince is not None:
            self._enable_condstore()
        if not uids:
            return Tagged("OK", "STORE completed")
        updated: list[MessageState] = []
        modified: list[int] = []
        for part in _chunks(uids, self.cfg.uids_per_request):  # replies list messages: keep them small
            r = await self.store.flags(StoreFlagsRequest(
                account_id=st.account_id, mailbox_id=view.mailbox_id, uids=to_ranges(part),
                op=cmd.mode, flags=flags, unchanged_since=cmd.unchangedsince,  # type: ignore[arg-type]
                origin=self.info.id))
            updated += r.updated
            modified += r.modified
        if cmd.mode != "remove":
            self._announce_keywords(view, flags)
        for m in updated:  # the store reports the messages it changed
            view.set_flags(m.uid, m.flags, m.modseq)
        if not cmd.silent:
            # RFC 3501 §6.4.6: a FETCH for every message of the set, changed or not
            failed = set(modified)
            for uid in uids:
                if uid not in failed:  # (RFC 7162 §3.2.4: UID with QRESYNC)
                    self._flags_response(view, uid, with_uid=cmd.uid or self.qresync)
        elif self.condstore and cmd.unchangedsince is not None:
            for m in updated:  # RFC 7162 §3.2: MODSEQ of what changed, even .SILENT
                self._flags_response(view, m.uid, with_uid=cmd.uid or self.qresync)
        if modified:
            mod = modified if cmd.uid else [view.seq_of(u) or 0 for u in modified]
            return Tagged("OK", f"[MODIFIED {seqset(mod)}] Conditional STORE failed")
        return Tagged("OK", "STORE completed")

    # ------------------------------------------------------------ COPY / MOVE
    async def _copy(self, st: Selected, cmd: p.Copy) -> Tagged:
        view = st.view
        verb = "MOVE" if cmd.move else "COPY"
        if cmd.move and view.readonly:
            raise No("Mailbox is read-only", "READ-ONLY")
        uids = self._uids(view, cmd.seqset, cmd.uid)
        if not uids:
            return Tagged("OK", f"{verb} completed (no messages)")
        target = self._name(cmd.mailbox)
        # RFC 6851 lets MOVE name the selected mailbox: the store moves the messages to new
        # UIDs and expunges the old ones in one transaction, as for any other target
        in_place = cmd.move and target == view.name
        try:
            reply = None
            for part in _chunks(uids, self.cfg.uids_per_request):
                r = await self.store.copy(CopyRequest(
                    account_id=st.account_id, mailbox_id=view.mailbox_id, uids=to_ranges(part),
                    target=target, move=cmd.move, origin=self.info.id))
                if reply is None:
                    reply = r
                else:
                    reply.source_uids += r.source_uids
                    reply.target_uids += r.target_uids
            assert reply is not None
        except StoreError as exc:
            if exc.code == "not_found":
                raise No("Mailbox does not exist", "TRYCREATE") from None
            if exc.code == "over_quota":
                raise No("Quota exceeded", "OVERQUOTA") from None
            raise
        code = ""
        if reply.source_uids:
            code = (f"[COPYUID {reply.uidvalidity} {seqset(reply.source_uids)} "
                    f"{ordered_seqset(reply.target_uids)}] ")
        if cmd.move:
            moved = sorted(reply.source_uids)
            if code:
                self.w(f"* OK {code}Moved")
            self._report_expunged(view, moved)
            if in_place:
                await self._sync_new(st)
            return Tagged("OK", "MOVE completed")
        if target == view.name:
            await self._sync_new(st)
        return Tagged("OK", f"{code}COPY completed")

    # ------------------------------------------------------------ APPEND
    async def _append(self, st: Authenticated | Selected, cmd: p.Append) -> Tagged:
        name = self._name(cmd.mailbox)
        first = p.AppendItem(cmd.flags, cmd.date, cmd.message, cmd.binary)
        msgs: list[AppendMessage] = []
        summarised = inlined = 0
        for item in (first, *cmd.more):  # MULTIAPPEND (RFC 3502): one store call, all or none
            # the bytes IMAP will serve (CRLF line ends), uploaded and summarised here, where
            # the CPU is spare, so the store only writes rows (docs/benchmarks.md); a literal8
            # may carry binary parts: base64 from here on, as BODY[] cannot send NUL and
            # BINARY[] decodes them back (RFC 3516 §4.4)
            raw = mime.normalize_crlf(mime.binary_to_base64(item.message) if item.binary
                                      else item.message)
            # a small one goes to the store with the request and is kept in its blob row,
            # not in S3 (ADR 0014); a MULTIAPPEND sends at most inline_append_budget so
            small = (len(raw) <= self.cfg.inline_body_max
                     and inlined + len(raw) <= self.cfg.inline_append_budget)
            inlined += len(raw) if small else 0
            m = AppendMessage(flags=[f for f in item.flags if f.lower() != "\\recent"],
                              internaldate=item.date or datetime.now(UTC),
                              blob_key=blob_key(raw) if small else await self.blobs.put(raw),
                              body=raw if small else None)
            if summarised + len(raw) <= self.cfg.summarize_append_max:
                # small enough to summarise in the loop (mime-processor does so up to
                # 512 KiB): a thread would cost more than it saves; larger ones, and the
                # rest of a large MULTIAPPEND, the store summarises itself
                m.blob_size, m.summary = len(raw), mime.summarize(raw)
                summarised += len(raw)
            msgs.append(m)
        head = msgs[0]
        selected = (self.state if isinstance(self.state, Selected)
                    and self.state.view.name == name else None)
        req = AppendRequest(account_id=st.account_id, mailbox=name, flags=head.flags,
                            internaldate=head.internaldate, origin=self.info.id,
                            blob_key=head.blob_key, blob_size=head.blob_size,
                            summary=head.summary, body=head.body, more=msgs[1:],
                            # into the selected mailbox: the store claims \Recent and sends
                            # the new messages with its answer (no second request)
                            sync_after_uid=(selected.view.max_uid if selected is not None
                                            and not selected.view.readonly else None))
        try:
            reply = await self.store.append(req)
        except StoreError as exc:
            if exc.code == "not_found":
                raise No("Mailbox does not exist", "TRYCREATE") from None
            if exc.code == "over_quota":
                raise No("Quota exceeded", "OVERQUOTA") from None
            raise
        if selected is not None:
            await self._sync_new(selected, first_page=reply.sync)
        uids = ordered_seqset(reply.uids) if reply.uids else str(reply.uid)
        return Tagged("OK", f"[APPENDUID {reply.uidvalidity} {uids}] APPEND completed")

    # ------------------------------------------------------------ CATENATE (RFC 4469)
    async def _catenate(self, st: Authenticated | Selected, cmd: p.Append) -> Tagged:
        """APPEND with CATENATE (RFC 4469 §5): each message is built from its TEXT parts and
        what its IMAP URLs name in the user's own mailboxes (RFC 5092), then appended as a
        plain APPEND would be (with MULTIAPPEND, all or none)."""
        name = self._name(cmd.mailbox)
        try:  # §5: a missing target is NO [TRYCREATE], whatever the URLs say
            await self.store.mailbox_status(MailboxRef(account_id=st.account_id, name=name))
        except StoreError as exc:
            if exc.code == "not_found":
                raise No("Mailbox does not exist", "TRYCREATE") from None
            raise
        limit = self.cfg.append_limit or p.MAX_LITERAL
        first = p.AppendItem(cmd.flags, cmd.date, cmd.message, cmd.binary, cmd.parts)
        built: list[p.AppendItem] = []
        for item in (first, *cmd.more):
            if item.parts is None:
                built.append(item)
                continue
            data = bytearray()
            for part in item.parts:
                data += part.data if isinstance(part, p.CatText) else await self._url_data(
                    st, part.url)
                if len(data) > limit:  # §5: the result is bounded as a literal would be
                    raise No("Message too large", "TOOBIG")
            built.append(replace(item, message=bytes(data), parts=None))
        head = built[0]
        return await self._append(st, replace(
            cmd, flags=head.flags, date=head.date, message=head.message, binary=head.binary,
            parts=None, more=tuple(built[1:])))

    async def _url_data(self, st: Authenticated | Selected, url: str) -> bytes:
        """What a CATENATE URL names: a message of one of the user's mailboxes (UIDVALIDITY
        checked when given), a section of it as BODY[section] has it, a partial range of
        that. NO [BADURL url] when it names nothing (RFC 4469 §5)."""
        shown = "".join(ch for ch in url[:200] if ch.isprintable() and ch != "]")
        bad = No("Invalid URL", f"BADURL {shown}")
        u = p.parse_message_url(url)
        if u is None or (u.user is not None and u.user.lower() != st.user.lower()):
            raise bad
        section = mime.parse_section(u.section) if u.section else mime.Section("", "")
        if section is None:
            raise bad
        try:
            info = await self.store.mailbox_status(MailboxRef(
                account_id=st.account_id, name=to_store_name(mutf7_encode(u.mailbox))))
        except StoreError as exc:
            if exc.code == "not_found":
                raise bad from None
            raise
        if u.uidvalidity is not None and u.uidvalidity != info.uidvalidity:
            raise bad
        reply = await self.store.fetch(FetchRequest(
            account_id=st.account_id, mailbox_id=info.mailbox_id, uids=[(u.uid, u.uid)],
            with_summary=bool(section.part)))
        meta = next((m for m in reply.messages if m.uid == u.uid), None)
        if meta is None:
            raise bad
        blob = (await self.blobs.get_many([meta.blob_key])).get(meta.blob_key)
        if blob is None:
            raise No("Message unavailable, try again", "UNAVAILABLE")
        data = _section_data(meta, blob, (section.part, section.text, section.fields),
                             meta.summary)
        if data is None:
            raise bad
        if u.partial is not None:
            start, length = u.partial
            data = data[start:] if length is None else data[start:start + length]
        return data

    # ------------------------------------------------------------ FETCH
    async def _fetch(self, st: Selected, cmd: p.Fetch) -> Tagged:
        view = st.view
        uids = self._uids(view, cmd.seqset, cmd.uid)
        atts = list(cmd.atts)
        names = {a.name for a in atts}
        if cmd.uid and "UID" not in names:
            atts.insert(0, p.FetchAtt("UID"))
        if cmd.vanished:
            if not self.qresync:
                raise No("VANISHED needs ENABLE QRESYNC first", "CLIENTBUG", status="BAD")
            assert cmd.changedsince is not None  # the parser makes sure
            # RFC 7162 §3.2.6: first the requested UIDs expunged since CHANGEDSINCE
            gone = await self._vanished_since(st.account_id, view, cmd.changedsince,
                                              imap_qresync.from_seqset(cmd.seqset)
                                              if cmd.seqset != p.SAVED
                                              else _saved_ranges(self._saved))
            if gone:
                self._vanished(gone, earlier=True)
        if cmd.changedsince is not None:
            self._enable_condstore()
            uids = [u for u in uids if view.modseq.get(u, 0) > cmd.changedsince]
            if "MODSEQ" not in names:
                atts.append(p.FetchAtt("MODSEQ"))
        if "MODSEQ" in names:
            self._enable_condstore()
        bodies = [a for a in atts if a.name in ("BODY[]", "RFC822", "RFC822.HEADER",
                                                "RFC822.TEXT", "BINARY[]", "BINARY.SIZE")]
        need_meta = any(a.name not in ("FLAGS", "UID", "MODSEQ") for a in atts)
        need_summary = any(a.name in ("ENVELOPE", "BODY", "BODYSTRUCTURE") for a in atts) or any(
            a.name in ("BODY[]", "BINARY[]", "BINARY.SIZE") and a.section is not None
            and a.section[0] for a in bodies)
        set_seen = not view.readonly and any(
            (a.name in ("BODY[]", "BINARY[]") and not a.peek)
            or a.name in ("RFC822", "RFC822.TEXT") for a in bodies)
        # summaries make metadata replies large: keep them well under the NATS payload limit
        batch = max(1, self.cfg.fetch_batch if not need_summary else min(self.cfg.fetch_batch, 100))

        async def load(chunk: list[int]) -> tuple[set[int], dict[int, MessageMeta],
                                                  dict[str, bytes]]:
            seen_changed: set[int] = set()
            if set_seen:
                unseen = [u for u in chunk if "\\Seen" not in view.flags.get(u, ())]
                if unseen:
                    r = await self.store.flags(StoreFlagsRequest(
                        account_id=st.account_id, mailbox_id=view.mailbox_id,
                        uids=to_ranges(unseen), op="add", flags=["\\Seen"],
                        origin=self.info.id))
                    for ms in r.updated:
                        if view.set_flags(ms.uid, ms.flags, ms.modseq):
                            seen_changed.add(ms.uid)
            metas: dict[int, MessageMeta] = (
                await self._metas(st, chunk, need_summary) if need_meta else {})
            blobs: dict[str, bytes] = {}
            # bodies, and messages the store has no summary for (computed here from the blob);
            # a batch of large messages is read later, a few at a time (see below)
            wanted = [m for m in metas.values() if needs_blob(m)]
            if wanted and sum(m.blob_size for m in wanted) <= self.cfg.fetch_bytes_in_flight:
                blobs = await self.blobs.get_many([m.blob_key for m in wanted])
            return seen_changed, metas, blobs

        def needs_blob(m: MessageMeta) -> bool:
            return bool(bodies) or (need_summary and m.summary is None)

        # literals last, as Dovecot does: some clients read the small items before the body
        small = [a for a in atts if a not in bodies]
        flags_asked = any(a.name == "FLAGS" for a in atts)
        chunks = [uids[i:i + batch] for i in range(0, len(uids), batch)]
        missing = 0
        nxt: asyncio.Task[tuple[set[int], dict[int, MessageMeta], dict[str, bytes]]] | None = None
        try:
            for n, chunk in enumerate(chunks):
                if nxt is None:
                    seen_changed, metas, blobs = await load(chunk)
                else:
                    seen_changed, metas, blobs = await nxt
                    nxt = None
                if n + 1 < len(chunks) and need_meta:
                    # fetch the next batch's metadata and bodies while this one is written
                    nxt = asyncio.ensure_future(load(chunks[n + 1]))
                sent = 0
                budget = self.cfg.fetch_bytes_in_flight
                for i, uid in enumerate(chunk):
                    seq = view.seq_of(uid)
                    if seq is None:
                        continue
                    meta = metas.get(uid)
                    if need_meta and meta is None:
                        continue  # expunged meanwhile: send nothing (RFC 3501 §7.4.1 leeway)
                    if meta is not None and needs_blob(meta) and meta.blob_key not in blobs:
                        # large messages: read the next ones up to the byte budget, then
                        # forget what was written (memory stays bounded)
                        group: list[str] = []
                        size = 0
                        for u in chunk[i:]:
                            m = metas.get(u)
                            if m is None or not needs_blob(m):
                                continue
                            if group and size + m.blob_size > budget:
                                break
                            group.append(m.blob_key)
                            size += m.blob_size
                        await self.out.drain()
                        blobs = await self.blobs.get_many(group)
                        if meta.blob_key not in blobs:
                            missing += 1
                            continue
                    if flags_asked or uid in seen_changed:
                        self._announce_keywords(view, view.flags.get(uid, []))
                    items: list[bytes] = []
                    for a in small:
                        items.append(self._fetch_item(view, uid, a, meta, blobs))
                    if uid in seen_changed and not flags_asked:
                        items.append(b"FLAGS " + flag_list(self._shown(view, uid)))
                    for a in bodies:
                        items.append(self._fetch_item(view, uid, a, meta, blobs))
                    data = b"* %d FETCH (" % seq + b" ".join(items) + b")\r\n"
                    sent += len(data)
                    self.out.write(data)
                FETCH_BYTES.inc(sent)
                await self.out.drain()
        finally:
            if nxt is not None:
                nxt.cancel()
                with contextlib.suppress(BaseException):
                    await nxt
        if missing:
            return Tagged("NO", f"[UNAVAILABLE] {missing} message(s) could not be read; "
                                "try again")
        return Tagged("OK", "FETCH completed")

    def _fetch_item(self, view: MailboxView, uid: int, a: p.FetchAtt, meta: MessageMeta | None,
                    blobs: dict[str, bytes]) -> bytes:
        match a.name:
            case "FLAGS":
                return b"FLAGS " + flag_list(self._shown(view, uid))
            case "UID":
                return b"UID %d" % uid
            case "MODSEQ":
                return b"MODSEQ (%d)" % view.modseq.get(uid, 0)
        assert meta is not None
        match a.name:
            case "INTERNALDATE":
                return b"INTERNALDATE " + imap_datetime(meta.internaldate)
            case "RFC822.SIZE":
                return b"RFC822.SIZE %d" % meta.size
            case "ENVELOPE":
                return b"ENVELOPE " + self._summary(meta, blobs).envelope.encode("utf-8")
            case "BODY":
                return b"BODY " + self._summary(meta, blobs).body.encode("utf-8")
            case "BODYSTRUCTURE":
                return b"BODYSTRUCTURE " + self._summary(meta, blobs).bodystructure.encode("utf-8")
        blob = blobs[meta.blob_key]
        match a.name:
            case "RFC822":
                return b"RFC822 " + literal(served(meta.prefix, blob))
            case "RFC822.HEADER":
                data = _section_data(meta, blob, ("", "HEADER", ()), None)
                return b"RFC822.HEADER " + literal(data or b"")
            case "RFC822.TEXT":
                data = _section_data(meta, blob, ("", "TEXT", ()), None)
                return b"RFC822.TEXT " + literal(data or b"")
        if a.name in ("BINARY[]", "BINARY.SIZE"):
            return _binary_item(meta, blob, a)
        sec = a.section or ("", "", ())
        data = _section_data(meta, blob, sec, meta.summary)
        name = b"BODY[" + a.section_text.encode() + b"]"
        if data is None:
            data = b""
        if a.partial is not None:
            start, count = a.partial
            name += b"<%d>" % start
            data = data[start:start + count]
        return name + b" " + literal(data)

    def _summary(self, meta: MessageMeta, blobs: dict[str, bytes]) -> MessageSummary:
        if meta.summary is not None:
            return meta.summary
        blob = blobs.get(meta.blob_key)
        if blob is None:
            raise No("Message structure unavailable", "UNAVAILABLE")
        meta.summary = mime.summarize(blob)
        return meta.summary


def _section_data(meta: MessageMeta, blob: bytes, sec: tuple[str, str, tuple[str, ...]],
                  summary: MessageSummary | None) -> bytes | None:
    """BODY[section] of ``prefix + blob``: sections of the whole message include the prefix
    (trace headers); numbered parts use the summary's offsets into the blob."""
    part, text, fields = sec
    section = mime.Section(part, text, fields)
    if part == "":
        return mime.section_bytes(served(meta.prefix, blob), [], section)
    if summary is None:
        summary = mime.summarize(blob)
    return mime.section_bytes(blob, summary, section)


def _binary_item(meta: MessageMeta, blob: bytes, a: p.FetchAtt) -> bytes:
    """BINARY[part]<partial> or BINARY.SIZE[part] (RFC 3516 §4.2): the part decoded; a
    literal8 when it was decoded or holds NUL, as Dovecot sends it."""
    part = a.section[0] if a.section else ""
    try:
        if part == "":
            data, decoded = served(meta.prefix, blob), False
        else:
            summary = meta.summary if meta.summary is not None else mime.summarize(blob)
            data, decoded = mime.binary_section(blob, summary.parts, part)
    except mime.UnknownCTE as exc:
        raise No(f"Unknown Content-Transfer-Encoding {str(exc)[:40]}", "UNKNOWN-CTE") from None
    if a.name == "BINARY.SIZE":
        return b"BINARY.SIZE[%s] %d" % (part.encode(), len(data))
    name = b"BINARY[" + part.encode() + b"]"
    if a.partial is not None:
        start, count = a.partial
        name += b"<%d>" % start
        data = data[start:start + count]
    if decoded or b"\0" in data:
        return name + b" ~{%d}\r\n" % len(data) + data
    return name + b" " + literal(data)


def _chunks(uids: list[int], n: int) -> list[list[int]]:
    return [uids[i:i + n] for i in range(0, len(uids), n)]


def _metric_name(cmd: p.Command) -> str:
    """The command's name for metrics: LIST/LSUB, SELECT/EXAMINE, COPY/MOVE, UID forms."""
    match cmd:
        case p.ListCmd(lsub=True):
            name = "LSUB"
        case p.Select(readonly=True):
            name = "EXAMINE"
        case p.Copy(move=True):
            name = "MOVE"
        case p.Expunge(uids=tuple()):
            return "UID EXPUNGE"
        case _:
            name = type(cmd).__name__.upper().removesuffix("CMD")
    return "UID " + name if getattr(cmd, "uid", False) else name


def _saved_of(uids: list[int]) -> array[int]:
    """A search result to keep as "$": its UID ranges, first and last flat (UIDs are 32-bit,
    RFC 9051 §2.3.1.1)."""
    out = array("I")
    for lo, hi in to_ranges(uids):
        out.append(lo)
        out.append(hi)
    return out


def _saved_ranges(saved: array[int]) -> list[tuple[int, int]]:
    return list(zip(saved[0::2], saved[1::2], strict=True))


def _ranges_in(node: p.SearchNode) -> int:
    """How many ranges the sequence sets of a search program hold."""
    return len(node.seqset or ()) + sum(_ranges_in(c) for c in node.children)


def _uid_program(view: MailboxView, node: p.SearchNode,
                 saved: list[tuple[int, int]]) -> p.SearchNode:
    """A search program with its message sequence sets (and "$", the ``saved`` UID ranges) turned
    into the UIDs they name now: a live search keeps meaning the same messages when
    sequence numbers move or "$" changes."""
    if node.op in ("seq", "uid") and node.seqset == p.SAVED:
        return p.SearchNode("uid", seqset=tuple(saved) or ((0, 0),))
    if node.op == "seq":
        ranges = to_ranges(view.resolve_lenient(node.seqset))
        return p.SearchNode("uid", seqset=tuple((a, b) for a, b in ranges) or ((0, 0),))
    if not node.children:
        return node
    return replace(node, children=tuple(_uid_program(view, c, saved) for c in node.children))


def _has_op(node: p.SearchNode, op: str) -> bool:
    return node.op == op or any(_has_op(c, op) for c in node.children)


def _check_qresync(q: p.QResync, enabled: bool) -> None:
    """RFC 7162 §3.2.5: the parameter only after ENABLE QRESYNC; seq-match-data pairs
    message numbers with UIDs, so both sets name as many."""
    if not enabled:
        raise No("QRESYNC parameter needs ENABLE QRESYNC first", "CLIENTBUG", status="BAD")
    if q.seq_match is not None:
        n, m = (imap_qresync.count(x) for x in q.seq_match)
        if n is None or m is None or n != m:
            raise No("seq-match-data: both sets must name as many messages", "CLIENTBUG",
                     status="BAD")


def _inside(ranges: imap_qresync.Ranges, uid: int) -> bool:
    i = bisect_right(ranges, (uid, imap_qresync.MAX_UID + 1)) - 1
    return i >= 0 and ranges[i][0] <= uid <= ranges[i][1]


def _expunge_allowed(cmd: p.Command) -> bool:
    """RFC 3501 §7.4.1: no untagged EXPUNGE while answering FETCH, STORE or SEARCH
    (the UID forms may have them, §6.4.8)."""
    if isinstance(cmd, p.Fetch | p.StoreCmd | p.Search | p.Sort | p.ThreadCmd):
        return cmd.uid
    return True


def _store_error_text(exc: StoreError) -> str:
    return {
        "not_found": "[NONEXISTENT] No such mailbox or message",
        "exists": "[ALREADYEXISTS] Already exists",
        "over_quota": "[OVERQUOTA] Quota exceeded",
        "invalid": "[CANNOT] " + (exc.message[:200] or "Invalid request"),
        "unavailable": "[UNAVAILABLE] Store unavailable, try again",
        "conflict": "[INUSE] Conflict, try again",
        "limit": "[LIMIT] " + (exc.message[:200] or "Over a server limit"),
    }.get(exc.code, "[SERVERBUG] Store error")

