"""Delivery Status Notifications (RFC 3464) and the DSN SMTP extension helpers (RFC 3461).

Pure: values in, bytes out. No asyncio, no nats, no boto3.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from datetime import datetime
from email.utils import format_datetime
from typing import Literal

from postbus.protocols.served import normalize_crlf

Action = Literal["failed", "delayed", "delivered", "relayed", "expanded"]  # RFC 3464 §2.3.3

CRLF = b"\r\n"
_ENHANCED = re.compile(r"^\s*([245])\.(\d{1,3})\.(\d{1,3})(?:\s|$)")


# ---------------------------------------------------------------- RFC 3461 helpers
def xtext_encode(value: str) -> str:
    """RFC 3461 §4: "+" and "=", and octets outside 33..126, become "+XX" (upper-case hex)."""
    out: list[str] = []
    for b in value.encode("utf-8"):
        if b < 33 or b > 126 or b in (0x2B, 0x3D):
            out.append(f"+{b:02X}")
        else:
            out.append(chr(b))
    return "".join(out)


def orcpt_param(orcpt: str) -> str | None:
    """``rfc822;bob@example.net`` (decoded, as stored) -> the ORCPT parameter value, or None
    when it has no address type (RFC 3461 §4.2: ORCPT=addr-type;xtext)."""
    addr_type, sep, addr = orcpt.partition(";")
    if not sep or not addr_type.strip() or not addr:
        return None
    return f"{addr_type.strip()};{xtext_encode(addr)}"


def enhanced_status(reply_code: int, text: str) -> str:
    """The enhanced status code (RFC 3463) a reply carries, else one derived from its class:
    2xx -> 2.0.0, 4xx -> 4.0.0, otherwise 5.0.0."""
    m = _ENHANCED.match(text)
    if m and m.group(1) == str(reply_code)[:1]:
        return f"{m.group(1)}.{m.group(2)}.{m.group(3)}"
    klass = str(reply_code)[:1]
    return f"{klass}.0.0" if klass in ("2", "4") else "5.0.0"


# ---------------------------------------------------------------- the report
@dataclass(frozen=True)
class RecipientReport:
    """The per-recipient fields of RFC 3464 §2.3."""

    final_recipient: str  # an address; written as "rfc822;<address>"
    action: Action
    status: str  # "5.1.1"
    original_recipient: str | None = None  # "rfc822;<address>" as the ORCPT gave it
    diagnostic: str | None = None  # the remote reply, written as "smtp; <reply>"
    remote_mta: str | None = None  # a host name, written as "dns; <host>"
    last_attempt: datetime | None = None
    will_retry_until: datetime | None = None  # only for Action: delayed


@dataclass(frozen=True)
class Report:
    reporting_mta: str  # our host name
    sender: str  # the envelope sender the report goes to
    recipients: list[RecipientReport]
    date: datetime
    envelope_id: str | None = None  # ENVID (RFC 3461 §4.4)
    arrival_date: datetime | None = None
    ret: Literal["FULL", "HDRS"] | None = None  # RET; None means headers only
    original: bytes | None = None  # the original message as it was queued
    original_subject: str = ""
    extra_headers: list[tuple[str, str]] = field(default_factory=list)


def _ascii_line(value: str, limit: int = 900) -> str:
    """One header-safe line: no CR/LF, no control bytes, non-ASCII as "?" (RFC 3464 fields
    are ASCII unless RFC 6533 is used, which this builder does not)."""
    flat = " ".join(value.replace("\r", "\n").split("\n"))
    clean = "".join(c if 32 <= ord(c) < 127 else "?" for c in flat).strip()
    return clean[:limit]


def _fold(name: str, value: str) -> bytes:
    """``Name: value`` folded at spaces near 78 columns (RFC 5322 §2.2.3)."""
    words = value.split(" ")
    lines: list[str] = []
    cur = f"{name}: "
    for w in words:
        if len(cur) + len(w) > 76 and cur.strip() and not cur.endswith(": "):
            lines.append(cur.rstrip())
            cur = "    "
        cur += w + " "
    lines.append(cur.rstrip())
    return "\r\n".join(lines).encode("ascii") + CRLF


def header_block(message: bytes) -> bytes:
    """The header section of ``message`` (without the blank line), CRLF line ends."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        i = message.find(sep)
        if i >= 0:
            head = message[:i]
            break
    else:
        head = message
    return normalize_crlf(head).rstrip(b"\r\n") + CRLF


def _subject_of(message: bytes) -> str:
    m = re.search(rb"(?im)^subject:[ \t]*(.*(?:\r?\n[ \t].*)*)", header_block(message))
    if not m:
        return ""
    return _ascii_line(m.group(1).decode("utf-8", "replace"), 200)


def _boundary(report: Report, parts: list[bytes]) -> str:
    seed = hashlib.sha256(b"".join(parts) + report.sender.encode()).hexdigest()[:24]
    b = f"=_postbus-dsn-{seed}"
    while any(b.encode() in p for p in parts):
        b += "x"
    return b


def delivery_status(report: Report) -> bytes:
    """The message/delivery-status body (RFC 3464 §2.1): per-message fields, then one block
    of per-recipient fields each, blocks separated by blank lines."""
    out = bytearray()
    out += _fold("Reporting-MTA", f"dns; {_ascii_line(report.reporting_mta)}")
    if report.envelope_id:
        out += _fold("Original-Envelope-Id", _ascii_line(report.envelope_id))
    if report.arrival_date:
        out += _fold("Arrival-Date", format_datetime(report.arrival_date))
    for r in report.recipients:
        out += CRLF
        if r.original_recipient:
            out += _fold("Original-Recipient", _ascii_line(r.original_recipient))
        out += _fold("Final-Recipient", f"rfc822; {_ascii_line(r.final_recipient)}")
        out += _fold("Action", r.action)
        out += _fold("Status", r.status)
        if r.remote_mta:
            out += _fold("Remote-MTA", f"dns; {_ascii_line(r.remote_mta)}")
        if r.diagnostic:
            out += _fold("Diagnostic-Code", f"smtp; {_ascii_line(r.diagnostic)}")
        if r.last_attempt:
            out += _fold("Last-Attempt-Date", format_datetime(r.last_attempt))
        if r.will_retry_until and r.action == "delayed":
            out += _fold("Will-Retry-Until", format_datetime(r.will_retry_until))
    return bytes(out)


def _human(report: Report) -> bytes:
    actions = {r.action for r in report.recipients}
    lines = [f"This is the mail system at host {_ascii_line(report.reporting_mta)}.", ""]
    if "failed" in actions:
        lines += ["I'm sorry to have to inform you that your message could not",
                  "be delivered to one or more recipients.", ""]
    if "delayed" in actions:
        lines += ["Your message could not be delivered yet to one or more recipients.",
                  "The mail system will keep trying; you do not need to send it again.", ""]
    if actions & {"delivered", "relayed", "expanded"}:
        lines += ["Your message was delivered (or handed on) to the recipients below,",
                  "as you asked.", ""]
    for r in report.recipients:
        why = f": {_ascii_line(r.diagnostic, 300)}" if r.diagnostic else ""
        lines.append(f"<{_ascii_line(r.final_recipient)}>: {r.action} ({r.status}){why}")
    lines.append("")
    return "\r\n".join(lines).encode("ascii")


def subject_for(report: Report) -> str:
    actions = {r.action for r in report.recipients}
    if "failed" in actions:
        base = "Undelivered Mail Returned to Sender"
    elif "delayed" in actions:
        base = "Delayed Mail (still being retried)"
    else:
        base = "Successful Mail Delivery Report"
    subj = report.original_subject or (_subject_of(report.original) if report.original else "")
    return f"{base}: {subj}" if subj else base


def build_dsn(report: Report, *, message_id: str) -> bytes:
    """A complete multipart/report; report-type=delivery-status message (RFC 3464 §2,
    RFC 6522), from MAILER-DAEMON, CRLF line ends.

    The third part is the whole original (message/rfc822) when RET=FULL, else its header
    section (text/rfc822-headers); omitted when the original is unknown.
    """
    human = _human(report)
    status = delivery_status(report)
    third: bytes | None = None
    third_type = ""
    if report.original is not None:
        if report.ret == "FULL":
            third = normalize_crlf(report.original)
            if not third.endswith(CRLF):
                third += CRLF
            third_type = "message/rfc822"
        else:
            third = header_block(report.original)
            third_type = "text/rfc822-headers"
    bnd = _boundary(report, [human, status, third or b""])
    host = _ascii_line(report.reporting_mta)

    out = bytearray()
    out += _fold("From", f"Mail Delivery System <MAILER-DAEMON@{host}>")
    out += _fold("To", _ascii_line(report.sender))
    out += _fold("Subject", subject_for(report))
    out += _fold("Date", format_datetime(report.date))
    out += _fold("Message-ID", f"<{_ascii_line(message_id)}>")
    out += _fold("Auto-Submitted", "auto-replied")  # RFC 3834 §5
    for name, value in report.extra_headers:
        out += _fold(name, _ascii_line(value))
    out += _fold("MIME-Version", "1.0")
    out += _fold("Content-Type", f'multipart/report; report-type=delivery-status; boundary="{bnd}"')
    out += CRLF
    out += b"This is a MIME-encapsulated message." + CRLF + CRLF
    b = bnd.encode()
    out += b"--" + b + CRLF
    out += b"Content-Description: Notification" + CRLF
    out += b'Content-Type: text/plain; charset="us-ascii"' + CRLF + CRLF
    out += human + CRLF
    out += b"--" + b + CRLF
    out += b"Content-Description: Delivery report" + CRLF
    out += b"Content-Type: message/delivery-status" + CRLF + CRLF
    out += status + CRLF
    if third is not None:
        out += b"--" + b + CRLF
        desc = b"Undelivered Message" if third_type == "message/rfc822" else b"Undelivered Message Headers"
        out += b"Content-Description: " + desc + CRLF
        out += b"Content-Type: " + third_type.encode() + CRLF
        if any(c > 127 for c in third):
            out += b"Content-Transfer-Encoding: 8bit" + CRLF
        out += CRLF
        out += third
        if not third.endswith(CRLF):
            out += CRLF
    out += b"--" + b + b"--" + CRLF
    return bytes(out)
