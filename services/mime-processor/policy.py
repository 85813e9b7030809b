"""Pure decisions of mime-processor: where each recipient goes, trace headers, and the
Authentication-Results header (RFC 8601) with DMARC evaluation (RFC 7489).

Values in, values out: no I/O, no nats, no boto3, no DNS.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from postbus.kit.net import ip_in, parse_networks
from postbus.proto.directory import AccountRef, ResolveReply
from postbus.proto.mail import ClientInfo, Recipient
from postbus.protocols.mime import header_block_end, parse_headers


# ---------------------------------------------------------------- routing
@dataclass(frozen=True)
class LocalTarget:
    account: AccountRef
    recipient: Recipient  # the first RCPT that led to this account


@dataclass(frozen=True)
class Failure:
    recipient: Recipient
    status: str  # enhanced status code (RFC 3463)
    detail: str  # the SMTP-style diagnostic, for the DSN


@dataclass(frozen=True)
class Plan:
    local: list[LocalTarget] = field(default_factory=list)
    remote: list[Recipient] = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)
    expanded: list[tuple[Recipient, list[AccountRef]]] = field(default_factory=list)


def may_relay(client: ClientInfo, trusted_networks: Sequence[str]) -> bool:
    """Remote recipients only for authenticated clients or configured networks
    (ARCHITECTURE.md "Security baseline": no open relay; loopback is not trusted)."""
    return bool(client.auth_user) or ip_in(client.ip, parse_networks(trusted_networks))


def bounce_ret(ret: Literal["FULL", "HDRS"] | None,
               vouched: bool) -> Literal["FULL", "HDRS"] | None:
    """What a bounce of this message may return: the whole message (RET=FULL, RFC 3461)
    only to a sender we vouch for (``may_relay``: authenticated, or a trusted network); to
    anyone else, whose sender address is unverified, headers only, so a forged sender
    cannot use our bounces to send content to a third party (backscatter)."""
    return "HDRS" if ret == "FULL" and not vouched else ret


def plan_routes(rcpts: Sequence[Recipient], replies: Sequence[ResolveReply],
                relay_allowed: bool) -> Plan:
    """One decision per recipient: local accounts deduplicated (an alias may fan out and
    two RCPTs may reach one account), remote ones deduplicated, the rest failed."""
    plan = Plan()
    seen_accounts: set[int] = set()
    seen_remote: set[str] = set()
    for rcpt, rep in zip(rcpts, replies, strict=True):
        addr = rcpt.address
        match rep.status:
            case "local" if rep.accounts:
                if len(rep.accounts) > 1:
                    plan.expanded.append((rcpt, list(rep.accounts)))
                for acc in rep.accounts:
                    if acc.account_id not in seen_accounts:
                        seen_accounts.add(acc.account_id)
                        plan.local.append(LocalTarget(acc, rcpt))
            case "remote" if relay_allowed:
                if addr.lower() not in seen_remote:
                    seen_remote.add(addr.lower())
                    plan.remote.append(rcpt)
            case "remote":
                plan.failed.append(Failure(
                    rcpt, "5.7.1", f"550 5.7.1 <{addr}>: Relay access denied"))
            case "disabled":
                plan.failed.append(Failure(
                    rcpt, "5.2.1", f"550 5.2.1 <{addr}>: Mailbox disabled, not accepting messages"))
            case _:  # unknown, or local without any account
                plan.failed.append(Failure(
                    rcpt, "5.1.1", f"550 5.1.1 <{addr}>: Recipient address rejected: User unknown"))
    return plan


def _clean(s: str) -> str:
    """No CR/LF/NUL may reach a header we write (header injection)."""
    return re.sub(r"[\r\n\x00]", "", s)


def trace_prefix(mail_from: str, account: str) -> bytes:
    """Per-recipient trace fields shown before the shared blob (RFC 5321 §4.4 Return-Path;
    Delivered-To as Postfix writes it)."""
    return (f"Return-Path: <{_clean(mail_from)}>\r\n"
            f"Delivered-To: {_clean(account)}\r\n").encode()


def subject_token(value: str) -> str:
    """A string usable as one NATS subject token (no dots, spaces or wildcards)."""
    return re.sub(r"[^A-Za-z0-9_\-]", "_", value) or "_"


# ---------------------------------------------------------------- Authentication-Results
@dataclass(frozen=True)
class SpfResult:
    result: str  # pass fail softfail neutral none temperror permerror (RFC 7208 §2.6)
    mailfrom: str = ""
    helo: str = ""
    comment: str = ""


@dataclass(frozen=True)
class DkimResult:
    result: str  # pass fail neutral temperror permerror (RFC 8601 §2.7.1)
    domain: str = ""
    identity: str = ""
    selector: str = ""
    comment: str = ""


@dataclass(frozen=True)
class DmarcResult:
    result: str  # pass fail none temperror permerror (RFC 7489 §11.2)
    header_from: str = ""
    policy: str = ""


@dataclass(frozen=True)
class AuthResults:
    spf: SpfResult
    dkim: list[DkimResult]  # empty: no signature (dkim=none)
    dmarc: DmarcResult


_PTOKEN = re.compile(r"^[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~.@]+$")


def _pvalue(v: str) -> str:
    """RFC 8601 §2.2 pvalue: a token or a quoted-string."""
    v = _clean(v)
    if v and _PTOKEN.match(v) and v.count("@") <= 1:
        return v
    return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment(c: str) -> str:
    c = _clean(c).replace("\\", "").replace("(", "[").replace(")", "]")
    return f" ({c[:120]})" if c else ""


def auth_results_value(authserv_id: str, r: AuthResults) -> str:
    """The Authentication-Results field value, folded (CRLF TAB) between results."""
    parts = [_clean(authserv_id) or "localhost"]
    spf = f"spf={r.spf.result}{_comment(r.spf.comment)}"
    if r.spf.mailfrom:
        spf += f" smtp.mailfrom={_pvalue(r.spf.mailfrom)}"
    elif r.spf.helo:
        spf += f" smtp.helo={_pvalue(r.spf.helo)}"
    parts.append(spf)
    if not r.dkim:
        parts.append("dkim=none")
    for d in r.dkim:
        s = f"dkim={d.result}{_comment(d.comment)}"
        if d.domain:
            s += f" header.d={_pvalue(d.domain)}"
        if d.identity:
            s += f" header.i={_pvalue(d.identity)}"
        if d.selector:
            s += f" header.s={_pvalue(d.selector)}"
        parts.append(s)
    dm = f"dmarc={r.dmarc.result}"
    if r.dmarc.policy:
        dm += f" (p={_clean(r.dmarc.policy)})"
    if r.dmarc.header_from:
        dm += f" header.from={_pvalue(r.dmarc.header_from)}"
    parts.append(dm)
    return ";\r\n\t".join(parts)


def prepend_auth_results(raw: bytes, value: str, authserv_id: str) -> bytes:
    """Remove Authentication-Results fields that claim our authserv-id (RFC 8601 §5: they
    are forgeries from outside), then add ours at the top."""
    return f"Authentication-Results: {value}\r\n".encode() + strip_forged(raw, authserv_id)


# the field name, also in the obsolete form with white space before the colon (RFC 5322
# §4.5), which mail readers accept
_AR_NAME = re.compile(rb"authentication-results[ \t]*:", re.IGNORECASE)
_COMMENT = re.compile(r"\([^()]*\)")


def _authserv_id(value: bytes) -> str:
    """The authserv-id of an Authentication-Results value (RFC 8601 §2.2), unfolded, with
    comments (nested too) removed, lower-case, without a trailing dot."""
    text = value.replace(b"\r", b"").replace(b"\n", b"").decode("utf-8", "replace")
    for _ in range(20):  # nested comments, innermost first; bounded
        stripped = _COMMENT.sub(" ", text)
        if stripped == text:
            break
        text = stripped
    head = text.split(";", 1)[0].split()
    return head[0].lower().rstrip(".") if head else ""


def strip_forged(raw: bytes, authserv_id: str) -> bytes:
    """Every Authentication-Results field that claims our authserv-id is removed, whatever
    its spelling or folding (RFC 8601 §5); the rest of the message is untouched."""
    end = header_block_end(raw, 0, len(raw))
    head = raw[:end]
    if b"authentication-results" not in head.lower():
        return raw
    ours = authserv_id.lower().rstrip(".")
    lines = head.splitlines(keepends=True)
    out: list[bytes] = []
    i = 0
    while i < len(lines):
        j = i + 1
        while j < len(lines) and lines[j][:1] in (b" ", b"\t"):  # the field's continuations
            j += 1
        m = _AR_NAME.match(lines[i])
        if not (m and _authserv_id(b"".join(lines[i:j])[m.end():]) == ours):
            out.extend(lines[i:j])
        i = j
    return b"".join(out) + raw[end:]


# ---------------------------------------------------------------- DMARC (RFC 7489)
def parse_dmarc_record(txt: str) -> dict[str, str] | None:
    """Tags of a DMARC record; None when it is not one (§6.4: must start with v=DMARC1)."""
    tags: dict[str, str] = {}
    for item in txt.split(";"):
        if "=" in item:
            k, v = item.split("=", 1)
            tags[k.strip().lower()] = v.strip()
    if tags.get("v", "").upper() != "DMARC1" or not txt.strip().lower().startswith("v"):
        return None
    if tags.get("p", "").lower() not in ("none", "quarantine", "reject"):
        # §6.6.3: a record with an invalid p= but a valid rua is treated as p=none
        tags["p"] = "none"
    return tags


# A few multi-label public suffixes; without the full Public Suffix List the organizational
# domain (§3.2) is approximated as the last two labels, or three under these.
_MULTI_LABEL_SUFFIXES = frozenset({
    "co.uk", "org.uk", "ac.uk", "gov.uk", "com.au", "net.au", "org.au", "co.nz", "co.jp",
    "ne.jp", "or.jp", "com.br", "com.cn", "com.mx", "co.za", "co.in", "com.tr", "com.sg",
})


def org_domain(domain: str) -> str:
    labels = [x for x in domain.lower().rstrip(".").split(".") if x]
    if len(labels) <= 2:
        return ".".join(labels)
    if ".".join(labels[-2:]) in _MULTI_LABEL_SUFFIXES:
        return ".".join(labels[-3:])
    return ".".join(labels[-2:])


def aligned(a: str, b: str, strict: bool) -> bool:
    a, b = a.lower().rstrip("."), b.lower().rstrip(".")
    if not a or not b:
        return False
    return a == b if strict else org_domain(a) == org_domain(b)


def evaluate_dmarc(from_domain: str, record: dict[str, str], is_subdomain_policy: bool,
                   spf: SpfResult, dkim: Sequence[DkimResult]) -> DmarcResult:
    """§3.1 identifier alignment and §6.6.2 evaluation: pass when SPF or DKIM passes for an
    aligned domain."""
    strict_spf = record.get("aspf", "r").lower() == "s"
    strict_dkim = record.get("adkim", "r").lower() == "s"
    spf_domain = spf.mailfrom.rsplit("@", 1)[-1] if spf.mailfrom else spf.helo
    ok = (spf.result == "pass" and aligned(spf_domain, from_domain, strict_spf)) or any(
        d.result == "pass" and aligned(d.domain, from_domain, strict_dkim) for d in dkim)
    policy = record.get("sp", record["p"]) if is_subdomain_policy else record["p"]
    return DmarcResult("pass" if ok else "fail", from_domain, policy.lower())


def from_domain(raw_header: bytes) -> str | None:
    """The domain of the RFC5322.From address (§3.1: the author domain); None when absent
    or unparseable. Several From addresses: the first."""
    from email.utils import getaddresses

    for name, value in parse_headers(raw_header):
        if name == "from":
            text = value.decode("utf-8", "replace").replace("\r\n", "")
            try:
                addrs = getaddresses([text])
            except Exception:
                return None
            for _, addr in addrs:
                if "@" in addr:
                    dom = addr.rsplit("@", 1)[1].strip().strip(">").lower()
                    return dom or None
            return None
    return None
