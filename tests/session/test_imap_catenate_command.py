"""CATENATE (RFC 4469) in a session against the in-memory ports: the capability, the RFC's
own example (§5: a draft rebuilt from its header, a MIME part and a forwarded message by
URL, with new text between), IMAP URLs (RFC 5092) with UIDVALIDITY, sections and partial
ranges, MULTIAPPEND mixed with plain messages, and the refusals: BADURL, TRYCREATE, TOOBIG."""

from __future__ import annotations

import imap_support
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postbus.kit.testing import examples
from postbus.protocols.imap_wire import astring

BOUNDARY = b"------------030308070208000400050907"
DRAFT = (b"From: Alexey <alexey@example.net>\r\n"
         b"Subject: Weekly report\r\n"
         b"MIME-Version: 1.0\r\n"
         b'Content-Type: multipart/mixed; boundary="' + BOUNDARY + b'"\r\n'
         b"\r\n"
         b"--" + BOUNDARY + b"\r\n"
         b"Content-Type: text/plain; charset=us-ascii\r\n"
         b"\r\n"
         b"The report is below.\r\n"
         b"--" + BOUNDARY + b"--\r\n")
FORWARDED = (b"From: Chris <chris@example.org>\r\n"
             b"Subject: numbers\r\n"
             b"\r\n"
             b"42\r\n")


class Client(imap_support.Client):
    def __init__(self, append_limit: int | None = None) -> None:
        super().__init__(append_limit=append_limit)

    def body(self, mailbox: str, uid: int) -> bytes:
        box = self.mp.boxes[self.acc][mailbox]
        msg = box.msgs[uid]
        return msg.prefix + self.mp.blobs[msg.blob_key]


def lit(data: bytes) -> bytes:
    return b"{%d+}\r\n" % len(data) + data


async def world() -> tuple[Client, int]:
    c = Client()
    c.out.take()
    c.mp.deliver(c.acc, DRAFT, mailbox="Drafts")
    c.mp.deliver(c.acc, FORWARDED, mailbox="Drafts")
    uidvalidity = c.mp.boxes[c.acc]["Drafts"].uidvalidity
    await c.send(b"a LOGIN alice@example.test secret\r\n")
    return c, uidvalidity


async def test_catenate_rfc4469_example() -> None:
    c, uv = await world()
    assert b" CATENATE " in Client().out.take()[0]
    sep = b"\r\n--" + BOUNDARY + b"\r\n"
    url = b'"/Drafts;UIDVALIDITY=%d/;UID=1' % uv
    out = await c.send(
        b"A003 APPEND Drafts (\\Seen \\Draft $MDNSent) CATENATE (URL " + url
        + b'/;section=HEADER" TEXT ' + lit(sep) + b" URL " + url + b'/;section=1.MIME" URL '
        + url + b'/;section=1" TEXT ' + lit(sep)
        + b' URL "/Drafts;UIDVALIDITY=%d/;UID=2" TEXT ' % uv
        + lit(b"\r\n--" + BOUNDARY + b"--\r\n") + b")\r\n")
    assert out[-1] == b"A003 OK [APPENDUID %d 3] APPEND completed" % uv
    want = (DRAFT.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n" + sep
            + b"Content-Type: text/plain; charset=us-ascii\r\n\r\n"
            + b"The report is below." + sep + FORWARDED + b"\r\n--" + BOUNDARY + b"--\r\n")
    assert c.body("Drafts", 3) == want
    assert c.mp.boxes[c.acc]["Drafts"].msgs[3].flags == ["\\Seen", "\\Draft", "$MDNSent"]


async def test_catenate_urls_sections_and_partials() -> None:
    c, uv = await world()
    out = await c.send(
        b'b APPEND INBOX CATENATE (URL "/Drafts/;uid=2/;section=TEXT" '
        b'URL "/Drafts/;UID=2/;PARTIAL=6.5" URL "/Drafts/;uid=2/;partial=1000")\r\n')
    assert out[-1].startswith(b"b OK [APPENDUID")
    assert c.body("INBOX", 1) == b"42\r\nChris"
    # absolute URLs of this user; a section of a single-part message's "1" is its body
    out = await c.send(
        b"c APPEND INBOX CATENATE (TEXT " + lit(b"Subject: x\r\n\r\n")
        + b' URL "imap://alice%40example.test@imap.example.test/Drafts/;UID=2/;SECTION=1")\r\n')
    assert out[-1].startswith(b"c OK [APPENDUID")
    assert c.body("INBOX", 2) == b"Subject: x\r\n\r\n42\r\n"


async def test_catenate_with_multiappend() -> None:
    c, _ = await world()
    out = await c.send(b"d SELECT INBOX\r\n"
                       b'e APPEND INBOX CATENATE (URL "/Drafts/;uid=2") (\\Answered) '
                       + lit(b"New: message\r\n\r\nbody\r\n")
                       + b' CATENATE (URL "/Drafts/;uid=2/;section=header" TEXT '
                       + lit(b"second\r\n") + b")\r\n")
    assert b"* 3 EXISTS" in out and out[-1].startswith(b"e OK [APPENDUID")
    assert c.body("INBOX", 1) == FORWARDED
    assert c.body("INBOX", 2) == b"New: message\r\n\r\nbody\r\n"
    assert c.body("INBOX", 3) == FORWARDED.split(b"42")[0] + b"second\r\n"


async def test_catenate_refusals() -> None:
    c, uv = await world()
    bad = b'"/Drafts;UIDVALIDITY=%d/;UID=1/;section=header"' % (uv + 1)
    out = await c.send(b"f APPEND INBOX CATENATE (TEXT " + lit(b"x: 1\r\n\r\n")
                       + b" URL " + bad + b")\r\n")
    assert out == [b"f NO [BADURL /Drafts;UIDVALIDITY=%d/;UID=1/;section=header] Invalid URL"
                   % (uv + 1)]
    for url in (b'"/Drafts/;uid=9"', b'"/Nowhere/;uid=1"', b'"/Drafts/;uid=1/;section=7"',
                b'"Drafts/;uid=1"', b'"/Drafts/;uid=1/;urlauth=anonymous"',
                b'"imap://bob@example.test/Drafts/;uid=1"'):
        out = await c.send(b"g APPEND INBOX CATENATE (URL " + url + b")\r\n")
        assert out[-1].startswith(b"g NO [BADURL "), url
    # MULTIAPPEND: one bad URL and nothing is appended
    out = await c.send(b'h APPEND INBOX CATENATE (URL "/Drafts/;uid=1") CATENATE (URL '
                       + bad + b")\r\n")
    assert out[-1].startswith(b"h NO [BADURL ")
    assert not c.mp.boxes[c.acc]["INBOX"].msgs
    # a missing target is TRYCREATE, whatever the URLs
    out = await c.send(b"i APPEND Nowhere CATENATE (URL " + bad + b")\r\n")
    assert out == [b"i NO [TRYCREATE] Mailbox does not exist"]
    out = await c.send(b"j APPEND INBOX CATENATE ()\r\nk APPEND INBOX CATENATE (FOO 1)\r\n")
    assert out[0].startswith(b"j BAD ") and out[1].startswith(b"k BAD ")


async def test_catenate_is_bounded_by_the_append_limit() -> None:
    c = Client(append_limit=150)
    c.out.take()
    c.mp.deliver(c.acc, DRAFT, mailbox="Drafts")
    await c.send(b"a LOGIN alice@example.test secret\r\n")
    out = await c.send(b'b APPEND INBOX CATENATE (URL "/Drafts/;uid=1" URL "/Drafts/;uid=1")'
                       b"\r\n")
    assert out == [b"b NO [TOOBIG] Message too large"]
    out = await c.send(b'c APPEND INBOX CATENATE (URL "/Drafts/;uid=1/;section=1")\r\n')
    assert out[-1].startswith(b"c OK [APPENDUID")


_URL_BITS = st.sampled_from(["/", "Drafts", "INBOX", ";UIDVALIDITY=1", ";uidvalidity=x", "/;uid=1",
                             "/;UID=2", "/;uid=99", "/;section=", "HEADER", "TEXT", "1", "1.MIME",
                             "2.1", "HEADER.FIELDS%20(From)", "/;partial=", "0.5", "3", "%",
                             "imap://", "alice%40example.test@h", ";urlauth=x", "]", " "])


@settings(max_examples=examples(60), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.lists(_URL_BITS, max_size=8).map("".join), min_size=1, max_size=4))
async def test_catenate_urls_never_break_the_session(urls: list[str]) -> None:
    c, _ = await world()
    parts = b" ".join(b"URL " + astring(u) for u in urls)
    out = await c.send(b"z APPEND INBOX CATENATE (" + parts + b")\r\n")
    last = out[-1]
    assert last.startswith((b"z OK [APPENDUID", b"z NO [BADURL ", b"z BAD ")), last
