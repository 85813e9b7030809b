"""Differential test against Dovecot (issue 10 item 4): the same messages APPENDed to Debian's
dovecot-imapd (started by ../shared/tools/imaptest/dovecot-anchor) and to imap-access (on
in-memory ports); ENVELOPE, BODYSTRUCTURE, BODY, BODY[section] for every part number (with
n.1 of leaves and parts that do not exist), HEADER/TEXT/MIME/HEADER.FIELDS[.NOT], partial
ranges, BINARY[n], BINARY.SIZE[n] and RFC822.SIZE must be the same octets, a NO the same
code. Skips with a message where Dovecot cannot be had (`make dovecot` installs it).

The values are compared, not their spelling on the wire: a string sent quoted by one server
and as a literal by the other is the same string (RFC 3501 §4.3); a literal8 is not (it is
kept marked with "~"). Where Dovecot is arguably wrong, ``DOVECOT_DIFFERS`` says why and that
item is skipped, by name.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_imap_socket import serving

from postbus.imap_access.memory import MemoryPlatform
from postbus.imap_access.server import ImapServer
from postbus.imap_access.settings import Settings
from postbus.kit.settings import CommonSettings

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
TOOL = Path(os.environ.get("IMAPTEST_DIR", ROOT.parent / "shared" / "tools" / "imaptest"))
ANCHOR = TOOL / "dovecot-anchor"
USER, PASSWORD = "alice@example.test", "pass"


# ---------------------------------------------------------------- the corpus
def _crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode("utf-8")


CORPUS: dict[str, bytes] = {
    "plain": _crlf("From: Alice <alice@example.org>\nTo: bob@example.net\n"
                   "Subject: plain\nDate: Tue, 1 Dec 2026 10:00:00 +0100\n"
                   "Message-ID: <plain@example.org>\n\nHello,\nworld.\n"),
    "no-final-crlf": b"Subject: cut\r\nFrom: a@example.org\r\n\r\nline one\r\nno end",
    "bare-lf": (b"From: lf@example.org\nSubject: bare LF\nContent-Type: multipart/mixed;"
                b" boundary=\"lf\"\n\n--lf\nContent-Type: text/plain\n\none\ntwo\n--lf\n"
                b"Content-Type: text/html\n\n<p>x</p>\n--lf--\n"),
    "header-only": b"Subject: only a header\r\nFrom: h@example.org\r\n",
    "empty-body": b"Subject: empty body\r\n\r\n",
    "encoded-words": _crlf(
        "From: =?ISO-8859-1?Q?Andr=E9?= Pirard <PIRARD@vm1.ulg.ac.be>\n"
        "To: =?US-ASCII?Q?Keith_Moore?= <moore@cs.utk.edu>, \"Quoted, Name\" <q@example.org>\n"
        "Cc: undisclosed-recipients:;\nBcc: (comment) bcc@example.org\n"
        "Reply-To: Group: a@example.org, b@example.org;\n"
        "Sender: =?utf-8?b?U8O4cmVu?= <sender@example.org>\n"
        "Subject: =?ISO-8859-1?B?SWYgeW91IGNhbiByZWFkIHRoaXMgeW8=?=\n"
        " =?ISO-8859-2?B?dSB1bmRlcnN0YW5kIHRoZSBleGFtcGxlLg==?=\n"
        "In-Reply-To: <parent@example.org>\nMessage-ID: <ew@example.org>\n"
        "Date: Wed, 2 Dec 2026 23:59:59 -0800 (PST)\n\nbody\n"),
    "8bit-headers": ("From: Jörg Müller <joerg@example.de>\nTo: Zoë <zoe@example.org>\n"
                     "Subject: Grüße aus Köln — ünïcödé\nContent-Type: text/plain; "
                     "charset=utf-8\nContent-Transfer-Encoding: 8bit\n\nGrüße\n"
                     ).replace("\n", "\r\n").encode("utf-8"),
    "rfc2231": _crlf(
        "Subject: rfc2231\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=\"b1\"\n\n"
        "--b1\nContent-Type: text/plain; charset=us-ascii\n\nsee attachment\n"
        "--b1\nContent-Type: application/octet-stream;\n"
        " name*0*=utf-8''%E2%82%AC%20rates;\n name*1*=%20for%20;\n name*2=\"2026.pdf\"\n"
        "Content-Disposition: attachment; filename*=iso-8859-1'en'%A3%20rates.pdf;\n"
        " size=1234\nContent-Transfer-Encoding: base64\nContent-ID: <att@example.org>\n"
        "Content-Description: =?utf-8?q?Pr=C3=A9sentation?=\nContent-Language: en, de\n"
        "Content-Location: http://example.org/a/b.pdf\nContent-MD5: Q2hlY2sgSW50ZWdyaXR5IQ==\n\n"
        "SGVsbG8gd29ybGQ=\n--b1--\n"),
    "rfc2231-odd": _crlf(
        "Subject: odd parameters\nContent-Type: multipart/mixed; boundary=b2\n\n--b2\n"
        "Content-Type: text/plain; title*1=\"b%c\"; title*0*=us-ascii'en'a%20; x=1\n\nx\n--b2\n"
        "Content-Type: text/plain; gap*0=a; gap*2=c; plain=\"q\"; Charset=utf-8\n\ny\n--b2\n"
        "Content-Type: application/x-y; n*0=a; N*1=b; third*x=1\n"
        "Content-Disposition: inline; filename*0=\"a b\"; filename*1*=%41\n\nz\n--b2--\n"),
    "rfc2231-after-a-continuation": _crlf(
        "Subject: stale index\nContent-Type: application/x-y; a*0=x; a*1=y; b*=utf-8''%41\n\n"
        "z\n"),
    "odd-types-and-addresses": _crlf(
        "Subject: tabs\tand\n\tfolds\nFrom: (leading comment) a@example.org, b@example.org "
        "(trailing), c (inside) @example.org (last)\nTo: \"Tab\tName\" <t@example.org>, "
        "<@route.example:r@example.org>, Missing <>, @only.example\nCc: group: ;\n"
        "Content-Type: multipart/mixed; boundary=t\n\n--t\nContent-Type: text/plain\n\nfirst\n"
        "--t\nContent-Type: message/rfc822\n\n--t\nContent-Type: message/rfc822\n\n"
        "Subject: header only inside\n--t\nContent-Type: text/plain\n"
        "Content-Transfer-Encoding: quoted-printable\n\nsoft=\nbreak =3D trailing  \n--t--"),
    "unknown-cte": _crlf(
        "Subject: unknown encoding\nContent-Type: multipart/mixed; boundary=u\n\n--u\n"
        "Content-Type: text/plain\nContent-Transfer-Encoding: base64\n\naGk=\n--u\n"
        "Content-Type: application/octet-stream\nContent-Transfer-Encoding: x-unknown\n\n"
        "???\n--u--\n"),
    "text-without-subtype": _crlf(
        "Subject: no subtype\nContent-Type: text\n\nplain text?\n"),
    "content-location-folded": _crlf(
        "Subject: folded URL\nContent-Type: text/html\nContent-Location: http://example.org/a\n"
        "  /b.html\n\n<p>x</p>\n"),
    "nested-alternative": _crlf(
        "Subject: nested\nContent-Type: multipart/mixed; boundary=\"outer\"\n\n"
        "This is the preamble.\n--outer\n"
        "Content-Type: multipart/alternative; boundary=\"inner\"\n\n--inner\n"
        "Content-Type: text/plain; charset=utf-8\n\nplain text\n--inner\n"
        "Content-Type: text/html; charset=utf-8\n\n<p>html</p>\n--inner--\n--outer\n"
        "Content-Type: image/png; name=\"x.png\"\nContent-Transfer-Encoding: base64\n\n"
        "iVBORw0KGgo=\n--outer--\nThe epilogue.\n"),
    "nested-epilogues": _crlf(
        "Subject: epilogues\nContent-Type: multipart/mixed; boundary=o\n\n--o\n"
        "Content-Type: multipart/alternative; boundary=i\n\ninner preamble\n--i\n\nplain\n"
        "--i--\ninner epilogue\n\n--o\nContent-Type: multipart/related; boundary=j\n\n--j\n"
        "Content-Type: text/html\n\n<b>x</b>\n--j--\n\n--o\n"
        "Content-Type: multipart/mixed; boundary=k\n\n--k\n\nthird\n--k--\n--o--\n"),
    "rfc822-inside": _crlf(
        "From: fwd@example.org\nSubject: Fwd: inner\nContent-Type: multipart/mixed; "
        "boundary=\"f\"\n\n--f\nContent-Type: text/plain\n\nSee attached.\n\n--f\n"
        "Content-Type: message/rfc822\nContent-Description: Forwarded\n\n"
        "From: sub@example.org\nTo: t1@example.org, t2@example.org\n"
        "Date: Sun, 12 Aug 2012 12:34:56 +0300\nSubject: submsg\n"
        "Content-Type: multipart/alternative; boundary=\"s\"\n\nSub prologue\n--s\n"
        "Content-Type: text/html\nContent-Transfer-Encoding: 8bit\n\n<p>Hello</p>\n\n--s\n"
        "Content-Type: text/plain\n\nHello again\n\n--s--\nSub epilogue\n\n"
        "--f\nContent-Type: message/rfc822\n\nSubject: single\nFrom: s@example.org\n\n"
        "single-part inner\n--f--\n"),
    "rfc822-top": _crlf(
        "Subject: wrapper\nContent-Type: message/rfc822\n\nSubject: wrapped\n"
        "Content-Type: multipart/mixed; boundary=w\n\n--w\n\nfirst\n--w\n"
        "Content-Type: message/rfc822\n\nSubject: deepest\n\ndeep body\n--w--\n"),
    "empty-parts": _crlf(
        "Subject: empties\nContent-Type: multipart/mixed; boundary=e\n\n--e\n--e\n"
        "Content-Type: text/plain\n\n--e\nContent-Type: text/html\n--e\n\n--e\n"
        "Content-Type: multipart/mixed; boundary=none\n\n--e\n"
        "Content-Type: multipart/mixed; boundary=z\n\n--z--\n--e--\n"),
    "digest": _crlf(
        "Subject: digest\nContent-Type: multipart/digest; boundary=d\n\n--d\n\n"
        "Subject: one\nFrom: one@example.org\n\nfirst\n--d\nContent-Type: text/plain\n\n"
        "not a message\n--d\n\nSubject: three\n\nthird\n--d--\n"),
    "unterminated": _crlf(
        "Subject: unterminated\nContent-Type: multipart/mixed; boundary=u\n\n--u\n"
        "Content-Type: text/plain\n\nfirst\n--u\nContent-Type: multipart/alternative; "
        "boundary=v\n\n--v\n\nnever closed\n"),
    "params-and-case": _crlf(
        "Subject: params\nMIME-Version: 1.0 (produced by a test)\n"
        "Content-Type: MULTIPART/Mixed (a comment); BOUNDARY=\"=_quoted; b\"; x-extra=\"a \\\"q\\\"\"\n\n"
        "--=_quoted; b\nContent-Type: Text/Plain; Charset=\"ISO-8859-1\"; format=flowed\n"
        "Content-Transfer-Encoding: Quoted-Printable\n\ncaf=E9\n--=_quoted; b\n"
        "Content-Type: application/pdf\nContent-Disposition: INLINE\n\n%PDF\n--=_quoted; b--\n"),
    "mixed-line-ends": (b"Subject: mixed\r\nContent-Type: multipart/mixed; boundary=m\r\n\r\n"
                        b"--m\nContent-Type: text/plain\r\n\nlf line\r\ncrlf line\n--m\r\n\r\n"
                        b"last\r\n--m--"),
    "folded-long": _crlf(
        "Subject: a long subject that is folded\n over several lines\n\tand a tab\n"
        "To: one@example.org,\n two@example.org,\n (comment) three@example.org\n"
        "References: <a@example.org>\n <b@example.org>\n\nbody\n"),
}


# ---------------------------------------------------------------- Dovecot being arguably wrong
# (message, item) -> why we do not follow Dovecot there; the item is skipped, not compared.
DOVECOT_DIFFERS: dict[tuple[str, str], str] = {
    ("header-only", "BODY.PEEK[HEADER.FIELDS (FROM SUBJECT CONTENT-TYPE X-NONE)]"):
        "RFC 3501 §6.4.5: the blank line is included in all header fetches 'except in the "
        "case of a message which has no body and no blank line'; Dovecot adds one to "
        "HEADER.FIELDS (though not to HEADER.FIELDS.NOT or HEADER) of such a message",
    ("odd-types-and-addresses", "BODY.PEEK[2.HEADER.FIELDS (SUBJECT)]"):
        "the same RFC 3501 §6.4.5 exception: the message in part 2 is empty",
    ("odd-types-and-addresses", "BODY.PEEK[3.HEADER.FIELDS (SUBJECT)]"):
        "the same RFC 3501 §6.4.5 exception: the message in part 3 is a header without a "
        "blank line",
    ("text-without-subtype", "BODYSTRUCTURE"):
        "RFC 2045 §5.2: a syntactically invalid Content-Type ('text', no subtype) is best "
        "taken as text/plain; charset=us-ascii; Dovecot shows the subtype as \"\"",
    ("text-without-subtype", "BODY"): "the same type as in its BODYSTRUCTURE",
    ("odd-types-and-addresses", "BINARY.PEEK[3]"):
        "Dovecot's BINARY[3] of a message/rfc822 part whose message is a header cut short "
        "by the delimiter runs on past the part into the next one; its own BODY[3] ends at "
        "the part's end, as ours does",
    ("odd-types-and-addresses", "BINARY.SIZE[3]"): "the size of that overrun BINARY[3]",
    ("unknown-cte", "BINARY.SIZE[1]"):
        "RFC 3516 §4.3: UNKNOWN-CTE is for the section asked for; Dovecot refuses "
        "BINARY.SIZE of every part once any part of the message has an unknown encoding "
        "(its BINARY[1] answers)",
    ("unknown-cte", "BINARY.SIZE[1.1]"): "the same part as BINARY.SIZE[1]",
    ("nested-alternative", "BINARY.SIZE[1]"):
        "RFC 3516 §4.2: BINARY.SIZE is the size of what BINARY[] returns; Dovecot answers 135 "
        "for this multipart part and sends 139 octets for BINARY[1]",
    ("rfc2231-after-a-continuation", "BODYSTRUCTURE"):
        "RFC 2231 §4: b*= is one whole encoded parameter (index 0); Dovecot's rfc2231_parse "
        "keeps the index of the parameter before it (a*1) and shows it as a broken "
        "continuation b*1*",
    ("rfc2231-after-a-continuation", "BODY"): "the same parameter as in its BODYSTRUCTURE",
    ("content-location-folded", "BODYSTRUCTURE"):
        "RFC 2557 §4.4.2 folds a long URL as RFC 2017 §3.1 does, whose unfolding removes the "
        "whitespace: the URL is http://example.org/a/b.html; Dovecot keeps '  ' inside it",
}


# ---------------------------------------------------------------- a raw IMAP client
class Client:
    def __init__(self, port: int) -> None:
        self.s = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.f = self.s.makefile("rb")
        self.n = 0
        assert self.f.readline().startswith(b"* OK")

    def cmd(self, line: bytes, literal: bytes | None = None, ok: bool = True) -> list[bytes]:
        """Send one command; the response lines up to the tagged one, literals inline (with
        ``ok=False`` the tagged line too, whatever it says)."""
        self.n += 1
        tag = b"d%d" % self.n
        if literal is None:
            self.s.sendall(tag + b" " + line + b"\r\n")
        else:
            self.s.sendall(tag + b" " + line + b" {%d}\r\n" % len(literal))
            assert self.f.readline().startswith(b"+")
            self.s.sendall(literal + b"\r\n")
        out: list[bytes] = []
        while True:
            resp = self._response()
            if resp.startswith(tag + b" "):
                if not ok:
                    return [*out, resp[len(tag) + 1:]]
                assert resp.startswith(tag + b" OK"), resp
                return out
            out.append(resp)

    def _response(self) -> bytes:
        parts: list[bytes] = []
        while True:
            line = self.f.readline()
            assert line, "connection closed"
            parts.append(line)
            if line.endswith(b"}\r\n") and b"{" in line:
                n = int(line[line.rindex(b"{") + 1:-3])
                parts.append(self.f.read(n))
                continue
            return b"".join(parts)

    def close(self) -> None:
        self.f.close()
        self.s.close()


Value = bytes | list["Value"] | None


def _parse(data: bytes, i: int) -> tuple[Value, int]:
    """One IMAP value (RFC 3501 §9: list, NIL, number or atom, quoted string, literal)."""
    c = data[i:i + 1]
    if c == b"(":
        items: list[Value] = []
        i += 1
        while data[i:i + 1] != b")":
            assert i < len(data), "unterminated list"
            if data[i:i + 1] == b" ":
                i += 1
                continue
            v, i = _parse(data, i)
            items.append(v)
        return items, i + 1
    if c == b'"':
        out = bytearray()
        i += 1
        while data[i:i + 1] != b'"':
            if data[i:i + 1] == b"\\":
                i += 1
            out += data[i:i + 1]
            i += 1
        return bytes(out), i + 1
    if c == b"{" or data[i:i + 2] == b"~{":  # a literal or a literal8 (RFC 3516 §4.2)
        j = data.index(b"}", i)
        n = int(data[data.index(b"{", i) + 1:j])
        start = j + 3
        tag = b"~" if c == b"~" else b""  # which kind is part of the answer
        return tag + data[start:start + n], start + n
    j = i
    while j < len(data) and data[j:j + 1] not in b" ()":
        j += 1
    tok = data[i:j]
    return (None if tok.upper() == b"NIL" else tok), j


def fetch_items(resp: bytes) -> dict[str, Value]:
    """``* n FETCH (NAME value ...)`` to {NAME: value}; a section's name up to its ``]``
    (and origin) is one name, upper-cased."""
    i = resp.index(b"FETCH (") + len(b"FETCH (")
    out: dict[str, Value] = {}
    while resp[i:i + 1] != b")":
        assert i < len(resp), f"unterminated FETCH response {resp[:200]!r}"
        if resp[i:i + 1] == b" ":
            i += 1
            continue
        j = i
        while resp[j:j + 1] not in (b" ", b"["):
            j += 1
        if resp[j:j + 1] == b"[":
            j = resp.index(b"]", j) + 1
            if resp[j:j + 1] == b"<":
                j = resp.index(b">", j) + 1
        name = resp[i:j].decode().upper()
        v, i = _parse(resp, j + 1)
        out[name] = v
    return out


def fetch(c: Client, uid: int, att: str) -> dict[str, Value]:
    lines = c.cmd(b"UID FETCH %d (%s)" % (uid, att.encode()), ok=False)
    if not lines[-1].startswith(b"OK"):  # NO [code] or BAD: the status and code compare
        return {"": lines[-1].split(b"]")[0] + b"]" if b"[" in lines[-1] else lines[-1][:3]}
    fetches = [x for x in lines if b" FETCH (" in x]
    assert len(fetches) == 1, lines
    items = fetch_items(fetches[0])
    items.pop("UID", None)
    items.pop("FLAGS", None)
    return items


# ---------------------------------------------------------------- the two servers
@dataclass
class Servers:
    dovecot: Client
    postbus: Client


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    if not ANCHOR.exists():
        pytest.skip(f"no dovecot-anchor at {ANCHOR} (set IMAPTEST_DIR): Dovecot differential "
                    "test skipped")
    if shutil.which("dovecot") is None:
        pytest.skip("Debian's dovecot-imapd is not installed (`make dovecot` installs it): "
                    "Dovecot differential test skipped")
    run = Path(tempfile.mkdtemp(prefix="dovecot-diff-"))
    run.chmod(0o755)  # Dovecot's auth and mail users read the users file and mail below it
    port = _free_port()
    with (run / "anchor.out").open("wb") as out:  # a file: dovecot keeps the descriptors
        r = subprocess.run([str(ANCHOR), "start", str(run / "anchor"), str(port), "plain"],
                           stdout=out, stderr=out, timeout=120)
    if r.returncode != 0:
        shutil.rmtree(run, ignore_errors=True)
        pytest.skip("Dovecot did not start: " + (run / "anchor.out").read_text()[-500:])
    settings = Settings(common=CommonSettings(admin_token_file=run / "tok"), auth_fail_delay_s=0)
    mp = MemoryPlatform()
    mp.add_user(USER, PASSWORD)
    try:
        with serving(ImapServer(settings, mp, mp, mp, mp), tls=False) as (_, ports):
            d, p = Client(port), Client(ports[0])
            d.cmd(b"LOGIN testuser pass")
            p.cmd(b"LOGIN %s %s" % (USER.encode(), PASSWORD.encode()))
            for c in (d, p):
                c.cmd(b"SELECT INBOX")
            yield Servers(d, p)
            d.close()
            p.close()
    finally:
        subprocess.run([str(ANCHOR), "stop", str(run / "anchor")], capture_output=True,
                       timeout=60)
        shutil.rmtree(run, ignore_errors=True)


def _append(c: Client, raw: bytes) -> int:
    lines = c.cmd(b"APPEND INBOX", raw)
    del lines
    out = c.cmd(b"UID SEARCH ALL")
    uids = [int(x) for x in out[0].split()[2:]]
    return max(uids)


def _sections(structure: Value, prefix: str = "") -> list[tuple[str, bool, bool]]:
    """(section, is_multipart, is_message_rfc822) of every part, from a BODYSTRUCTURE."""
    out: list[tuple[str, bool, bool]] = []

    def join(n: int) -> str:
        return f"{prefix}.{n}" if prefix else str(n)

    assert isinstance(structure, list)
    if isinstance(structure[0], list):  # multipart: its children, then the subtype
        children = []
        for x in structure:
            if not isinstance(x, list):
                break
            children.append(x)
        for n, child in enumerate(children, 1):
            sec = join(n)
            multi = isinstance(child[0], list)
            rfc822 = (not multi and isinstance(child[0], bytes) and isinstance(child[1], bytes)
                      and child[0].lower() == b"message" and child[1].lower() == b"rfc822")
            out.append((sec, multi, rfc822))
            if multi:
                out.extend(_sections(child, sec))
            elif rfc822:
                out.extend(_sections(child[8], sec))
        return out
    # a single-part message (the top, or inside message/rfc822): its body is part 1
    sec = join(1)
    rfc822 = structure[0].lower() == b"message" and structure[1].lower() == b"rfc822" \
        if isinstance(structure[0], bytes) and isinstance(structure[1], bytes) else False
    out.append((sec, False, rfc822))
    if rfc822:
        out.extend(_sections(structure[8], sec))
    return out


def _attributes(structure: Value) -> list[str]:
    atts = ["ENVELOPE", "BODYSTRUCTURE", "BODY", "RFC822.SIZE", "BODY.PEEK[]",
            "BODY.PEEK[HEADER]", "BODY.PEEK[TEXT]",
            "BODY.PEEK[HEADER.FIELDS (FROM SUBJECT CONTENT-TYPE X-NONE)]",
            "BODY.PEEK[HEADER.FIELDS.NOT (FROM SUBJECT)]", "BODY.PEEK[]<0.20>",
            "BODY.PEEK[TEXT]<3.7>", "BODY.PEEK[]<100000.10>", "RFC822.HEADER",
            "BODY.PEEK[1]", "BODY.PEEK[1.1]", "BODY.PEEK[9]", "BODY.PEEK[1.9]"]
    for sec, multi, rfc822 in _sections(structure):
        atts += [f"BODY.PEEK[{sec}]", f"BODY.PEEK[{sec}.MIME]", f"BODY.PEEK[{sec}]<1.4>",
                 f"BINARY.PEEK[{sec}]", f"BINARY.SIZE[{sec}]", f"BINARY.PEEK[{sec}]<2.5>"]
        if not multi and not rfc822:
            atts += [f"BODY.PEEK[{sec}.1]", f"BODY.PEEK[{sec}.1.MIME]", f"BODY.PEEK[{sec}.1.1]"]
        if rfc822:
            atts += [f"BODY.PEEK[{sec}.HEADER]", f"BODY.PEEK[{sec}.TEXT]",
                     f"BODY.PEEK[{sec}.HEADER.FIELDS (SUBJECT)]"]
    return list(dict.fromkeys(atts))


@pytest.mark.parametrize("name", list(CORPUS))
def test_same_answers_as_dovecot(servers: Servers, name: str) -> None:
    raw = CORPUS[name]
    d_uid = _append(servers.dovecot, raw)
    p_uid = _append(servers.postbus, raw)
    structure = fetch(servers.dovecot, d_uid, "BODYSTRUCTURE")["BODYSTRUCTURE"]
    diffs: list[str] = []
    for att in _attributes(structure):
        if (name, att) in DOVECOT_DIFFERS:
            continue
        d = fetch(servers.dovecot, d_uid, att)
        p = fetch(servers.postbus, p_uid, att)
        if d != p:
            diffs.append(f"{att}:\n  dovecot {d!r}\n  postbus {p!r}")
    assert not diffs, f"{name}: {len(diffs)} items differ\n" + "\n".join(diffs)
