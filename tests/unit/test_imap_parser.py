"""The pure IMAP command parser and response encoder: tables, chunking invariance, fuzzing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postbus.kit.testing import examples
from postbus.protocols import imap_parser as p
from postbus.protocols.imap_wire import (
    astring,
    flag_list,
    imap_datetime,
    mutf7_decode,
    mutf7_encode,
    nstring,
    seqset,
    string,
)

BODY = p.FetchAtt


def one(data: bytes, **kw: int) -> object:
    out = p.Receiver(**kw).feed(data)
    assert len(out) == 1, out
    return out[0]


# ---------------------------------------------------------------- tables: good commands
GOOD = [
    (b"a1 CAPABILITY\r\n", p.Capability("a1")),
    (b"a1 noop\r\n", p.Noop("a1")),
    (b"x.y LOGOUT\r\n", p.Logout("x.y")),
    (b"a STARTTLS\r\n", p.StartTLS("a")),
    (b"a LOGIN alice@example.test secret\r\n", p.Login("a", b"alice@example.test", b"secret")),
    (b'a LOGIN "al\\"ice" "p w\\\\d"\r\n', p.Login("a", b'al"ice', b"p w\\d")),
    (b"a LOGIN {5+}\r\nalice {3+}\r\np w\r\n", p.Login("a", b"alice", b"p w")),
    (b"a AUTHENTICATE PLAIN\r\n", p.Authenticate("a", "PLAIN", None)),
    (b"a AUTHENTICATE plain AGFsaWNlAHNlY3JldA==\r\n",
     p.Authenticate("a", "PLAIN", b"AGFsaWNlAHNlY3JldA==")),
    (b"a AUTHENTICATE PLAIN =\r\n", p.Authenticate("a", "PLAIN", b"=")),
    (b"a SELECT INBOX\r\n", p.Select("a", b"INBOX")),
    (b"a EXAMINE \"Sent Items\" (CONDSTORE)\r\n", p.Select("a", b"Sent Items", True, True)),
    (b"a CREATE Work/Projects\r\n", p.Create("a", b"Work/Projects")),
    (b"a CREATE Archive (USE (\\Archive))\r\n", p.Create("a", b"Archive", ("\\Archive",))),
    (b"a DELETE foo\r\n", p.Delete("a", b"foo")),
    (b"a RENAME foo bar\r\n", p.Rename("a", b"foo", b"bar")),
    (b"a SUBSCRIBE foo\r\n", p.Subscribe("a", b"foo")),
    (b"a UNSUBSCRIBE foo\r\n", p.Unsubscribe("a", b"foo")),
    (b'a LIST "" *\r\n', p.ListCmd("a", b"", (b"*",))),
    (b'a LIST "" %\r\n', p.ListCmd("a", b"", (b"%",))),
    (b'a LIST Work/ "%/x]"\r\n', p.ListCmd("a", b"Work/", (b"%/x]",))),
    (b'a LIST (SPECIAL-USE) "" (INBOX "*") RETURN (SUBSCRIBED STATUS (MESSAGES UNSEEN))\r\n',
     p.ListCmd("a", b"", (b"INBOX", b"*"), False, ("SPECIAL-USE",),
               ("SUBSCRIBED", "STATUS", "STATUS.MESSAGES", "STATUS.UNSEEN"))),
    (b'a LIST (SUBSCRIBED RECURSIVEMATCH) "" %\r\n',
     p.ListCmd("a", b"", (b"%",), False, ("SUBSCRIBED", "RECURSIVEMATCH"))),
    (b'a LIST "" * RETURN (SPECIAL-USE)\r\n',
     p.ListCmd("a", b"", (b"*",), return_opts=("SPECIAL-USE",))),
    (b'a LSUB "" *\r\n', p.ListCmd("a", b"", (b"*",), lsub=True)),
    (b"a STATUS INBOX (MESSAGES UIDNEXT UNSEEN)\r\n",
     p.Status("a", b"INBOX", ("MESSAGES", "UIDNEXT", "UNSEEN"))),
    (b"a APPEND INBOX {5+}\r\nhello\r\n", p.Append("a", b"INBOX", (), None, b"hello")),
    (b'a APPEND Drafts (\\Seen \\Draft) " 7-Feb-1994 21:52:25 -0800" {2+}\r\nhi\r\n',
     p.Append("a", b"Drafts", ("\\Seen", "\\Draft"),
              datetime(1994, 2, 7, 21, 52, 25, tzinfo=timezone(-timedelta(hours=8))), b"hi")),
    (b'a ID ("name" "curl" "version" NIL)\r\n',
     p.IdCmd("a", (("name", "curl"), ("version", None)))),
    (b"a ID NIL\r\n", p.IdCmd("a", None)),
    (b"a ENABLE CONDSTORE UTF8=ACCEPT\r\n", p.Enable("a", ("CONDSTORE", "UTF8=ACCEPT"))),
    (b"a NAMESPACE\r\n", p.Namespace("a")),
    (b"a IDLE\r\n", p.Idle("a")),
    (b"a CHECK\r\n", p.Check("a")),
    (b"a CLOSE\r\n", p.Close("a")),
    (b"a UNSELECT\r\n", p.Unselect("a")),
    (b"a EXPUNGE\r\n", p.Expunge("a")),
    (b"a UID EXPUNGE 3:5,9\r\n", p.Expunge("a", ((3, 5), (9, 9)))),
    (b"a FETCH 1:* FLAGS\r\n", p.Fetch("a", False, ((1, None),), (BODY("FLAGS"),))),
    (b"a FETCH 2 ALL\r\n", p.Fetch("a", False, ((2, 2),), tuple(
        BODY(x) for x in ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE")), macro="ALL")),
    (b"a UID FETCH 1 BODY[]\r\n", p.Fetch("a", True, ((1, 1),), (BODY("BODY[]", ("", "", ())),))),
    (b"a UID FETCH *:4 (UID BODY.PEEK[1.2.MIME]<10.20>)\r\n",
     p.Fetch("a", True, ((None, 4),), (BODY("UID"), BODY("BODY[]", ("1.2", "MIME", ()), (10, 20),
                                                         True)))),
    (b"a FETCH 1 (BODY[HEADER.FIELDS (Subject \"From\")] RFC822.SIZE) (CHANGEDSINCE 12)\r\n",
     p.Fetch("a", False, ((1, 1),), (BODY("BODY[]", ("", "HEADER.FIELDS", ("Subject", "From"))),
                                     BODY("RFC822.SIZE")), changedsince=12)),
    (b"a FETCH 1 (BODY[2.HEADER] BODY[TEXT] bodystructure envelope modseq)\r\n",
     p.Fetch("a", False, ((1, 1),), (BODY("BODY[]", ("2", "HEADER", ())),
                                     BODY("BODY[]", ("", "TEXT", ())), BODY("BODYSTRUCTURE"),
                                     BODY("ENVELOPE"), BODY("MODSEQ")))),
    (b"a STORE 1:3 +FLAGS.SILENT (\\Deleted)\r\n",
     p.StoreCmd("a", False, ((1, 3),), "add", True, ("\\Deleted",))),
    (b"a UID STORE 5 (UNCHANGEDSINCE 7) -FLAGS \\Seen $Junk\r\n",
     p.StoreCmd("a", True, ((5, 5),), "remove", False, ("\\Seen", "$Junk"), 7)),
    (b"a STORE 1 FLAGS ()\r\n", p.StoreCmd("a", False, ((1, 1),), "set", False, ())),
    (b"a COPY 1:2 Trash\r\n", p.Copy("a", False, ((1, 2),), b"Trash")),
    (b"a UID MOVE 7 Archive\r\n", p.Copy("a", True, ((7, 7),), b"Archive", True)),
    (b"a GETQUOTAROOT INBOX\r\n", p.GetQuotaRoot("a", b"INBOX")),
    (b'a GETQUOTA ""\r\n', p.GetQuota("a", b"")),
    (b"a SEARCH ALL\r\n", p.Search("a", False, None, p.SearchNode("and", children=(
        p.SearchNode("all"),)))),
    (b"a UID SEARCH CHARSET UTF-8 OR SEEN (NOT FROM bob) SINCE 1-Feb-2024 1:3,*\r\n",
     p.Search("a", True, "UTF-8", p.SearchNode("and", children=(
         p.SearchNode("or", children=(
             p.SearchNode("flag", ("\\Seen",)),
             p.SearchNode("and", children=(p.SearchNode("not", children=(
                 p.SearchNode("from", ("bob",)),)),)))),
         p.SearchNode("since", ("2024-02-01",)),
         p.SearchNode("seq", seqset=((1, 3), (None, None))))))),
    (b'a SEARCH HEADER Message-ID "<x@y>" UID 4:* LARGER 100 KEYWORD $Junk MODSEQ 5\r\n',
     p.Search("a", False, None, p.SearchNode("and", children=(
         p.SearchNode("header", ("Message-ID", "<x@y>")),
         p.SearchNode("uid", seqset=((4, None),)),
         p.SearchNode("larger", ("100",)),
         p.SearchNode("flag", ("$Junk",)),
         p.SearchNode("modseq", ("5",)))))),
    (b"a SEARCH SUBJECT {4+}\r\n\xc3\xa9t\xc3\r\n", None),  # checked below: 8-bit literal
    (b"a SEARCH RETURN (MIN COUNT) UNSEEN\r\n", p.Search("a", False, None, p.SearchNode(
        "and", children=(p.SearchNode("unflag", ("\\Seen",)),)), ("MIN", "COUNT"))),
    # RFC 5256 §3 (its examples), RFC 5957 §3, RFC 5267 §3
    (b"A282 SORT (SUBJECT) UTF-8 SINCE 1-Feb-1994\r\n", p.Sort(
        "A282", False, (p.SortKey("SUBJECT"),), "UTF-8", p.SearchNode("and", children=(
            p.SearchNode("since", ("1994-02-01",)),)))),
    (b"A283 SORT (SUBJECT REVERSE DATE) UTF-8 ALL\r\n", p.Sort(
        "A283", False, (p.SortKey("SUBJECT"), p.SortKey("DATE", True)), "UTF-8",
        p.SearchNode("and", children=(p.SearchNode("all"),)))),
    (b'A284 SORT (SUBJECT) US-ASCII TEXT "not in mailbox"\r\n', p.Sort(
        "A284", False, (p.SortKey("SUBJECT"),), "US-ASCII", p.SearchNode("and", children=(
            p.SearchNode("text", ("not in mailbox",)),)))),
    (b"a uid sort (reverse displayfrom displayto) utf-8 1:2 unseen\r\n", p.Sort(
        "a", True, (p.SortKey("DISPLAYFROM", True), p.SortKey("DISPLAYTO")), "UTF-8",
        p.SearchNode("and", children=(p.SearchNode("seq", seqset=((1, 2),)),
                                      p.SearchNode("unflag", ("\\Seen",)))))),
    (b"a SORT RETURN (MIN MAX) (ARRIVAL) US-ASCII ALL\r\n", p.Sort(
        "a", False, (p.SortKey("ARRIVAL"),), "US-ASCII",
        p.SearchNode("and", children=(p.SearchNode("all"),)), ("MIN", "MAX"))),
    (b"a SORT RETURN () (SIZE) UTF-8 ALL\r\n", p.Sort(
        "a", False, (p.SortKey("SIZE"),), "UTF-8",
        p.SearchNode("and", children=(p.SearchNode("all"),)), ())),
    # SEARCHRES (RFC 5182 §2.1): SAVE, and "$" as a whole sequence set
    (b"a SEARCH RETURN (SAVE MIN) $ UID $\r\n", p.Search(
        "a", False, None, p.SearchNode("and", children=(
            p.SearchNode("seq", seqset=p.SAVED), p.SearchNode("uid", seqset=p.SAVED))),
        ("SAVE", "MIN"))),
    (b"a FETCH $ FLAGS\r\n", p.Fetch("a", False, p.SAVED, (BODY("FLAGS"),))),
    (b"a UID STORE $ +FLAGS (\\Seen)\r\n",
     p.StoreCmd("a", True, p.SAVED, "add", False, ("\\Seen",))),
    (b"a MOVE $ Trash\r\n", p.Copy("a", False, p.SAVED, b"Trash", True)),
    (b"a UID EXPUNGE $\r\n", p.Expunge("a", p.SAVED)),
]


@pytest.mark.parametrize("data,expected", GOOD, ids=[g[0][:40].decode("latin-1") for g in GOOD])
def test_good_commands(data: bytes, expected: object) -> None:
    got = one(data)
    if expected is None:
        assert isinstance(got, p.Search)
        return
    assert got == expected


BAD = [
    (b"\r\n", "*", "tag"),
    (b"a\r\n", "a", "space"),
    (b"a FOO\r\n", "a", "unknown command"),
    (b"a UID LOGIN x y\r\n", "a", "not a command"),
    (b"a LOGIN alice\r\n", "a", "space"),
    (b'a LOGIN "unterminated\r\n', "a", "unterminated"),
    (b"a SELECT\r\n", "a", "space"),
    (b"a FETCH 0 FLAGS\r\n", "a", "out of range"),
    (b"a FETCH 1 (FLAGS\r\n", "a", "fetch attribute"),
    (b"a FETCH 1 BODY[HEADER.FIELDS ()]\r\n", "a", "header list"),
    (b"a FETCH 1 BODY[MIME]\r\n", "a", "bad section"),
    (b"a FETCH 1 BODY[1.]\r\n", "a", "bad section"),
    (b"a FETCH 1 BOGUS\r\n", "a", "unknown fetch attribute"),
    (b"a FETCH 1:2,,3 FLAGS\r\n", "a", "number"),
    (b"a STORE 1 FLAGZ (\\Seen)\r\n", "a", "FLAGS"),
    (b"a SEARCH SINCE 31-Feb-2024\r\n", "a", "bad date"),
    (b"a SEARCH CHARSET KOI8-R ALL\r\n", "a", "charset"),
    (b"a SEARCH FOO\r\n", "a", "unknown search key"),
    (b"a SEARCH " + b"(" * 100 + b"ALL" + b")" * 100 + b"\r\n", "a", "nested"),
    (b"a STATUS INBOX (BOGUS)\r\n", "a", "status item"),
    (b"a NOOP extra\r\n", "a", "at end"),
    (b"a APPEND INBOX hello\r\n", "a", "literal"),
    (b'a APPEND INBOX "1-Jan-2024 00:00:00 +0000" {1+}\r\nx\r\n', "a", "date-time"),
    (b"a SEARCH RETURN (SAVE SAVE) ALL\r\n", "a", "SAVE given twice"),
    (b"a SORT RETURN (SAVE) (DATE) UTF-8 ALL\r\n", "a", "return option"),  # SEARCH only
    (b"a FETCH $,1 FLAGS\r\n", "a", "SP"),  # "$" is a whole sequence set (RFC 5182 §4)
    (b"a FETCH 1,$ FLAGS\r\n", "a", "number"),
    (b"a SEARCH RETURN (SAVE) $:3\r\n", "a", "SP"),
    (b"a SORT (BOGUS) UTF-8 ALL\r\n", "a", "unknown sort key"),
    (b"a SORT () UTF-8 ALL\r\n", "a", "empty sort criteria"),
    (b"a SORT (REVERSE) UTF-8 ALL\r\n", "a", "REVERSE without"),
    (b"a SORT (REVERSE REVERSE DATE) UTF-8 ALL\r\n", "a", "unknown sort key"),
    (b"a SORT (DATE) UTF-8\r\n", "a", "missing search criteria"),
    (b"a SORT (DATE) ALL\r\n", "a", "charset"),  # the charset is not optional (§4)
    (b"a SORT (DATE) KOI8-R ALL\r\n", "a", "charset"),
    (b"a SORT RETURN (UPDATE) (DATE) UTF-8 ALL\r\n", "a", "return option"),  # no CONTEXT=SORT
    (b'a LIST (BOGUS) "" *\r\n', "a", "selection option"),
    (b'a LIST (RECURSIVEMATCH) "" *\r\n', "a", "RECURSIVEMATCH"),  # RFC 5258 §3.1
    (b'a LIST (RECURSIVEMATCH REMOTE) "" *\r\n', "a", "RECURSIVEMATCH"),
    (b'a LIST "" * RETURN (BOGUS)\r\n', "a", "return option"),
    (b"a LOGIN {3+}\r\nab", None, None),  # incomplete: nothing yet
]


@pytest.mark.parametrize("data,tag,reason", BAD, ids=[b[0][:30].decode("latin-1") for b in BAD])
def test_bad_commands(data: bytes, tag: str | None, reason: str | None) -> None:
    out = p.Receiver().feed(data)
    if tag is None:
        assert out == []
        return
    assert len(out) == 1 and isinstance(out[0], p.Bad), out
    assert out[0].tag == tag
    assert reason is not None and reason.lower() in out[0].reason.lower(), out[0].reason


def test_section_text_round_trip() -> None:
    f = one(b'a FETCH 1 BODY.PEEK[1.HEADER.FIELDS.NOT (X-A "B C")]\r\n')
    assert isinstance(f, p.Fetch)
    assert f.atts[0].section_text == 'HEADER.FIELDS.NOT (X-A "B C")'.replace("HEADER", "1.HEADER", 1)


# ---------------------------------------------------------------- literals and framing
def test_synchronising_literal_asks_for_continuation() -> None:
    r = p.Receiver()
    assert r.feed(b"a LOGIN {5}\r\n") == [p.Continue(5)]
    assert r.feed(b"alice {6}\r\n") == [p.Continue(6)]
    assert r.feed(b"secret\r\n") == [p.Login("a", b"alice", b"secret")]


def test_literal_plus_needs_no_continuation() -> None:
    assert p.Receiver().feed(b"a LOGIN {5+}\r\nalice secret\r\n") == [
        p.Login("a", b"alice", b"secret")]


def test_literal_may_contain_crlf_and_braces() -> None:
    msg = b"Subject: x\r\n\r\nbody {3}\r\nabc\r\n"
    out = p.Receiver().feed(b"a APPEND INBOX {%d+}\r\n" % len(msg) + msg + b"\r\nb NOOP\r\n")
    assert out == [p.Append("a", b"INBOX", (), None, msg), p.Noop("b")]


def test_oversized_synchronising_literal_is_refused_before_the_data() -> None:
    r = p.Receiver(max_literal=10)
    out = r.feed(b"a APPEND INBOX {11}\r\n")
    assert out == [p.Bad("a", "literal too large", "TOOBIG")]
    assert r.feed(b"b NOOP\r\n") == [p.Noop("b")]


def test_oversized_literal_plus_is_skipped() -> None:
    r = p.Receiver(max_literal=10)
    out = r.feed(b"a APPEND INBOX {20+}\r\n" + b"x" * 20 + b" trailing\r\nb NOOP\r\n")
    assert out == [p.Bad("a", "literal too large", "TOOBIG"), p.Noop("b")]


def test_whole_command_is_bounded_not_only_each_literal() -> None:
    # each literal is under max_literal, but together they pass max_command
    r = p.Receiver(max_line=100, max_literal=60, max_command=130)
    assert r.feed(b"a LOGIN {60+}\r\n" + b"u" * 60 + b" {60}\r\n") == [
        p.Bad("a", "command too large", "TOOBIG")]
    assert r.feed(b"b NOOP\r\n") == [p.Noop("b")]


def test_many_small_literals_cannot_add_up() -> None:
    r = p.Receiver(max_line=100, max_literal=10, max_command=200)
    data = b"a ID (" + b"".join(b'"k%d" {5+}\r\nvvvvv ' % i for i in range(60)) + b")\r\n"
    out = r.feed(data + b"b NOOP\r\n")
    assert out[0] == p.Bad("a", "command too large", "TOOBIG")
    assert out[-1] == p.Noop("b")


def test_preauth_literal_plus_past_the_bound_stops_reading() -> None:
    # RFC 7888 §4: the server may close instead of reading data it will not use
    r = p.Receiver(limits=p.PREAUTH)
    out = r.feed(b"a LOGIN {41943040+}\r\n" + b"x" * 100_000)
    assert out == [p.Bad("a", "literal too large", "TOOBIG", fatal=True)]
    assert r.pending == 0
    assert r.feed(b"b NOOP\r\n") == []  # nothing more is read


def test_preauth_synchronising_literal_is_refused_without_continuation() -> None:
    r = p.Receiver(limits=p.PREAUTH)
    assert r.feed(b"a LOGIN {5000}\r\n") == [p.Bad("a", "literal too large", "TOOBIG")]
    assert r.feed(b"b LOGIN {5}\r\n") == [p.Continue(5)]


def test_preauth_over_long_line_stops_reading() -> None:
    r = p.Receiver(limits=p.PREAUTH)
    out = r.feed(b"a LOGIN " + b"x" * (p.PREAUTH.max_line + 10))
    assert out == [p.Bad("a", "line too long", "TOOBIG", fatal=True)]
    assert r.feed(b"\r\nb NOOP\r\n") == []


# ---------------------------------------------------------------- BINARY (RFC 3516)
def test_binary_fetch_attributes_and_literal8_append() -> None:
    # RFC 3516 §4.2/§6: section-binary is a part number or nothing; partial as for BODY[]
    assert one(b"a FETCH 1 (BINARY.PEEK[1.2]<0.10> BINARY.SIZE[3] BINARY[] BINARY[4])\r\n"
               ) == p.Fetch("a", False, ((1, 1),), (
                   BODY("BINARY[]", ("1.2", "", ()), (0, 10), peek=True),
                   BODY("BINARY.SIZE", ("3", "", ())),
                   BODY("BINARY[]", ("", "", ())),
                   BODY("BINARY[]", ("4", "", ()))))
    for bad in (b"BINARY[1.MIME]", b"BINARY[HEADER]", b"BINARY.SIZE[1]<0.5>", b"BINARY[1."):
        out = one(b"a FETCH 1 (" + bad + b")\r\n")
        assert isinstance(out, p.Bad), bad
    # RFC 3516 §4.4: APPEND with a literal8
    r = p.Receiver()
    assert r.feed(b"a APPEND INBOX ~{5}\r\n") == [p.Continue(5)]
    assert r.feed(b"\x00bin\xff\r\n") == [
        p.Append("a", b"INBOX", (), None, b"\x00bin\xff", binary=True)]
    assert one(b"a APPEND INBOX {3+}\r\nabc\r\n") == p.Append("a", b"INBOX", (), None, b"abc")


def test_refused_literal_names_its_command() -> None:
    # the session answers an APPEND's TOOBIG with NO (RFC 7889 §4), others with BAD
    r = p.Receiver(max_line=100, max_literal=10, max_command=50)
    out = r.feed(b"a APPEND INBOX {11}\r\nb UID SEARCH TEXT {11+}\r\n" + b"x" * 11
                 + b"\r\nc APPEND INBOX {5+}\r\nabcde {9+}\r\n" + b"y" * 9 + b"\r\n"
                 + b"d APPEND INBOX (\\Seen) {30+}\r\n" + b"z" * 30 + b" {30+}\r\n")
    assert [(b.tag, b.command) for b in out if isinstance(b, p.Bad)] == [
        ("a", "APPEND"), ("b", "SEARCH"), ("d", "APPEND")]


def test_multiappend() -> None:
    # RFC 3502 §6: APPEND mailbox 1*(SP append-message), each with its own options
    r = p.Receiver()
    out = r.feed(b'a APPEND saved (\\Seen) {3}\r\n')
    assert out == [p.Continue(3)]
    out = r.feed(b'one (\\Seen $Work) " 7-Feb-1994 22:43:04 -0800" {3+}\r\ntwo ~{5}\r\n')
    assert out == [p.Continue(5)]
    cmd = r.feed(b"th\x00ee\r\n")[0]
    date = datetime(1994, 2, 7, 22, 43, 4, tzinfo=timezone(-timedelta(hours=8)))
    assert cmd == p.Append("a", b"saved", ("\\Seen",), None, b"one", more=(
        p.AppendItem(("\\Seen", "$Work"), date, b"two"),
        p.AppendItem((), None, b"th\x00ee", binary=True)))
    for bad in (b"a APPEND saved {3+}\r\none x\r\n", b"a APPEND saved {3+}\r\none \r\n",
                b"a APPEND saved\r\n"):
        assert isinstance(p.Receiver().feed(bad)[0], p.Bad), bad


# ---------------------------------------------------------------- ID past the pre-login line
def _rfc_max_id(tag: bytes = b"a", value: bytes = b"v") -> bytes:
    """The longest ID RFC 2971 §3.3 allows: 30 pairs, names of 30 octets, values of 1024."""
    pairs = (b'"%s" "%s"' % (b"%02d" % i + b"n" * 28, value * 1024) for i in range(30))
    return tag + b" ID (" + b" ".join(pairs) + b")\r\n"


def test_id_of_the_rfc_maximum_is_answered_before_login() -> None:
    line = _rfc_max_id()
    assert p.PREAUTH.max_line < len(line) <= p.MAX_ID_LINE
    r = p.Receiver(limits=p.PREAUTH)
    out = r.feed(line + b"b LOGIN alice secret\r\n")
    assert len(out) == 2 and out[1] == p.Login("b", b"alice", b"secret")
    cmd = out[0]
    assert isinstance(cmd, p.IdCmd) and cmd.tag == "a" and cmd.truncated
    # the pairs whole in the kept 8 KiB, and no more
    assert cmd.params == tuple((f"{i:02d}" + "n" * 28, "v" * 1024) for i in range(7))
    assert r.pending == 0


def test_id_with_quoted_specials_fits_under_the_cap() -> None:
    # a long tag and values with a few escaped quotes still fit
    value = b'\\"' * 10 + b"w" * 1014  # 1024 octets once unquoted
    line = _rfc_max_id(b"t" * 200).replace(b'"' + b"v" * 1024 + b'"', b'"' + value + b'"')
    assert line.count(value) == 30 and len(line) <= p.MAX_ID_LINE
    out = p.Receiver(limits=p.PREAUTH).feed(line)
    assert len(out) == 1 and isinstance(out[0], p.IdCmd) and out[0].tag == "t" * 200


def test_id_past_the_cap_stops_reading() -> None:
    r = p.Receiver(limits=p.PREAUTH)
    line = b'a ID ("name" "' + b"x" * p.MAX_ID_LINE + b'")\r\n'
    out = r.feed(line + b"b NOOP\r\n")
    assert out == [p.Bad("a", "line too long", "TOOBIG", fatal=True)]
    assert r.pending == 0 and r.feed(b"c NOOP\r\n") == []
    # one octet over, without the line end in sight yet
    r = p.Receiver(limits=p.PREAUTH)
    assert r.feed(b'a ID ("k" "' + b"x" * (p.MAX_ID_LINE - 11)) == []
    assert r.feed(b"x") == [p.Bad("a", "line too long", "TOOBIG", fatal=True)]


def test_id_line_ending_at_exactly_the_cap_is_answered() -> None:
    head = b'a ID ("k" "'
    line = head + b"x" * (p.MAX_ID_LINE - len(head) - 4) + b'")\r\n'
    assert len(line) == p.MAX_ID_LINE
    out = p.Receiver(limits=p.PREAUTH).feed(line)
    assert out == [p.IdCmd("a", (), truncated=True)]


@pytest.mark.parametrize("opening", [
    b"a LOGIN ", b"a NOOP ", b"a IDX (", b"a ID NIL ", b"a ID", b"a UID ID (",
    b'a AUTHENTICATE PLAIN ', b'ID ("k" "', b'a\x80 ID ("k" "', b'a{1} ID ("k" "',
])
def test_other_long_preauth_lines_are_still_refused(opening: bytes) -> None:
    r = p.Receiver(limits=p.PREAUTH)
    out = r.feed(opening + b"x" * p.PREAUTH.max_line + b'")\r\nb NOOP\r\n')
    assert len(out) == 1 and isinstance(out[0], p.Bad) and out[0].fatal
    assert out[0].code == "TOOBIG"


def test_long_id_line_announcing_a_literal_is_refused() -> None:
    # the literal's data would follow a line we did not keep
    r = p.Receiver(limits=p.PREAUTH)
    out = r.feed(b'a ID ("k" "' + b"x" * 9000 + b'" "k2" {5}\r\nhello)\r\n')
    assert out == [p.Bad("a", "line too long", "TOOBIG", fatal=True)]


def test_long_id_prefix_that_is_no_id_is_bad() -> None:
    # the list closes inside the kept prefix and something follows it
    r = p.Receiver(limits=p.PREAUTH)
    out = r.feed(b'a ID ("k" "v") ' + b"x" * 9000 + b"\r\nb NOOP\r\n")
    assert out == [p.Bad("a", "unexpected characters at end of command"), p.Noop("b")]
    # more than 30 pairs already in the prefix
    r = p.Receiver(limits=p.PREAUTH)
    many = b" ".join(b'"k" "v"' for _ in range(1300))
    out = r.feed(b"a ID (" + many + b")\r\n")
    assert out == [p.Bad("a", "bad ID parameter list")]


def test_long_id_after_login_is_parsed_whole() -> None:
    out = p.Receiver().feed(_rfc_max_id())
    assert len(out) == 1 and isinstance(out[0], p.IdCmd) and not out[0].truncated
    assert out[0].params is not None and len(out[0].params) == 30


def test_long_id_without_the_exception_is_refused() -> None:
    lim = p.Limits(max_line=8192, max_literal=4096, max_command=16384, skip_oversized=False)
    out = p.Receiver(limits=lim).feed(_rfc_max_id())
    assert out == [p.Bad("a", "line too long", "TOOBIG", fatal=True)]


def test_long_id_past_the_cap_is_skipped_when_the_limits_allow() -> None:
    lim = p.Limits(max_line=100, max_id_line=300)
    r = p.Receiver(limits=lim)
    out = r.feed(b'a ID ("k" "' + b"x" * 400 + b'")\r\nb NOOP\r\n')
    assert out == [p.Bad("a", "line too long", "TOOBIG"), p.Noop("b")]
    r = p.Receiver(limits=lim)
    assert r.feed(b'a ID ("k" "' + b"x" * 400) == [p.Bad("a", "line too long", "TOOBIG")]
    assert r.feed(b"x" * 400 + b'")\r\nb NOOP\r\n') == [p.Noop("b")]


_ID_STREAM = (_rfc_max_id(b"a1") + b"a2 NOOP\r\n" + b'a3 ID ("k" "' + b"x" * 20_000
              + b'")\r\n' + b"a4 LOGIN {5}\r\n" + b"alice {6+}\r\nsecret\r\n"
              + b"a5 id (" + b'"name" "x" ' * 5 + b'"pad" "' + b"p" * 9000 + b'")\r\n'
              + b"a6 NOOP\r\n")


@pytest.mark.parametrize("size", [1, 2, 7, 4096, 8193, 40_000])
def test_long_id_chunking_invariance(size: int) -> None:
    whole = p.Receiver(limits=p.PREAUTH).feed(_ID_STREAM)
    assert [type(x).__name__ for x in whole] == [
        "IdCmd", "Noop", "IdCmd", "Continue", "Login", "IdCmd", "Noop"]
    assert whole[-2] == p.IdCmd("a5", (("name", "x"),) * 5, truncated=True)
    r = p.Receiver(limits=p.PREAUTH)
    got: list[object] = []
    for i in range(0, len(_ID_STREAM), size):
        got.extend(r.feed(_ID_STREAM[i:i + size]))
    assert got == whole


_ID_TOKENS = st.sampled_from([
    b"a ID (", b"b id (", b'"k" ', b'"v"', b'"' + b"x" * 40, b"NIL", b" ", b")", b"\r\n",
    b"{3}\r\n", b"{2+}\r\nab", b"c NOOP\r\n", b"\\", b'"', b"\n", b"x" * 70,
])


@settings(max_examples=examples(300), deadline=None)
@given(st.lists(_ID_TOKENS, max_size=30), st.integers(1, 50))
def test_long_id_path_never_raises_and_ignores_chunking(tokens: list[bytes], size: int) -> None:
    data = b"".join(tokens)
    for skip in (False, True):
        lim = p.Limits(max_line=60, max_literal=20, max_command=120, skip_oversized=skip,
                       max_id_line=150)
        whole = p.Receiver(limits=lim).feed(data)
        r = p.Receiver(limits=lim)
        got: list[object] = []
        for i in range(0, len(data), size):
            got.extend(r.feed(data[i:i + size]))
        assert got == whole


def test_limits_change_between_commands() -> None:
    r = p.Receiver(limits=p.PREAUTH)
    r.push(b"a LOGIN alice secret\r\nb APPEND INBOX {6000+}\r\n" + b"m" * 6000 + b"\r\n")
    assert r.next() == p.Login("a", b"alice", b"secret")
    r.set_limits(p.Limits())  # logged in
    assert r.next() == p.Append("b", b"INBOX", (), None, b"m" * 6000)


def test_over_long_line_is_bad_and_skipped() -> None:
    r = p.Receiver(max_line=100)
    out = r.feed(b"a1 LOGIN " + b"x" * 200)
    assert out == [p.Bad("a1", "line too long", "TOOBIG")]
    assert r.feed(b"y" * 500 + b"\r\na2 NOOP\r\n") == [p.Noop("a2")]
    out = p.Receiver(max_line=100).feed(b"a3 " + b"z" * 120 + b"\r\na4 NOOP\r\n")
    assert out == [p.Bad("a3", "line too long", "TOOBIG"), p.Noop("a4")]


def test_raw_line_mode_for_idle_and_authenticate() -> None:
    r = p.Receiver()
    r.push(b"a IDLE\r\nDONE\r\nb NOOP\r\n")
    assert r.next() == p.Idle("a")
    r.expect_line()
    assert r.next() == p.RawLine(b"DONE")
    assert r.next() == p.Noop("b")
    assert r.next() is None


def test_reset_drops_buffered_plaintext() -> None:
    r = p.Receiver()
    r.push(b"a STARTTLS\r\nb LOGIN injected x\r\n")
    assert r.next() == p.StartTLS("a")
    r.reset()
    assert r.next() is None
    assert r.feed(b"c NOOP\r\n") == [p.Noop("c")]


def test_bare_lf_is_accepted() -> None:
    assert p.Receiver().feed(b"a NOOP\n") == [p.Noop("a")]


# ---------------------------------------------------------------- chunking invariance
STREAM = b"".join(g[0] for g in GOOD) + b"".join(b[0] for b in BAD[:-1]) + (
    b"z LOGIN {5}\r\nalice {6}\r\nsecret\r\n" + b"q APPEND INBOX {300+}\r\n" + b"m" * 300
    + b"\r\n")


@pytest.mark.parametrize("size", [1, 2, 7, 4096])
def test_chunking_invariance(size: int) -> None:
    whole = p.Receiver().feed(STREAM)
    r = p.Receiver()
    got: list[object] = []
    for i in range(0, len(STREAM), size):
        got.extend(r.feed(STREAM[i:i + size]))
    assert got == whole
    assert len([x for x in whole if not isinstance(x, p.Continue)]) == len(GOOD) + len(BAD) - 1 + 2


# ---------------------------------------------------------------- fuzzing
@settings(max_examples=examples(400), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=64), max_size=20))
def test_arbitrary_bytes_never_raise(chunks: list[bytes]) -> None:
    r = p.Receiver(max_line=200, max_literal=100)
    for c in chunks:
        for item in r.feed(c):
            assert isinstance(item, p.Continue | p.Bad | p.RawLine) or hasattr(item, "tag")


_TOKENS = st.sampled_from([
    b"a ", b"UID ", b"FETCH ", b"SEARCH ", b"SORT ", b"REVERSE ", b"STORE ", b"1:*", b" ", b"(", b")", b"[", b"]",
    b"BODY.PEEK[", b"HEADER.FIELDS ", b"<0.10>", b"{3}\r\n", b"{2+}\r\n", b"\"q\\\"\"",
    b"\r\n", b"OR ", b"NOT ", b"FLAGS", b"+FLAGS.SILENT ", b"\\Seen", b"*", b"1-Jan-2024",
    b"APPEND ", b"LOGIN ", b"LIST ", b"\"\" ", b"%", b"CHARSET ", b"UTF-8 ", b"abc", b"\xff",
])


@settings(max_examples=examples(400), deadline=None)
@given(st.lists(_TOKENS, max_size=40))
def test_grammar_shaped_junk_never_raises(tokens: list[bytes]) -> None:
    data = b"".join(tokens) + b"\r\n"
    r = p.Receiver(max_line=500, max_literal=50)
    r.feed(data)
    assert isinstance(p.parse_command(data), p.Bad | object)


# ---------------------------------------------------------------- encoder
def test_string_choice() -> None:
    assert astring("INBOX") == b"INBOX"
    assert astring("NIL") == b'"NIL"'
    assert astring("Sent Items") == b'"Sent Items"'
    assert string('a"b\\c') == b'"a\\"b\\\\c"'
    assert string("line\r\nbreak") == b"{11}\r\nline\r\nbreak"
    assert string("é") == b"{2}\r\n\xc3\xa9"
    # IMAP4rev2 mailbox names: quoted UTF-8 (RFC 9051 §9 QUOTED-CHAR), not for other bytes
    assert astring("Entwürfe", utf8=True) == '"Entwürfe"'.encode()
    assert astring('ä "q"', utf8=True) == '"ä \\"q\\""'.encode()
    assert astring(b"caf\xe9", utf8=True) == b"{4}\r\ncaf\xe9"
    assert astring("a&b", utf8=True) == b"a&b"
    assert nstring(None) == b"NIL"
    assert flag_list(["\\Seen", "$Junk"]) == b"(\\Seen $Junk)"


def test_seqset_compression() -> None:
    assert seqset([5, 1, 2, 3, 9, 10, 3]) == "1:3,5,9:10"
    assert seqset([]) == ""


def test_imap_datetime() -> None:
    assert imap_datetime(datetime(1994, 2, 7, 21, 52, 25, tzinfo=timezone(-timedelta(hours=8)))
                         ) == b'" 7-Feb-1994 21:52:25 -0800"'
    assert imap_datetime(datetime(2026, 11, 26, 5, 0, 0, tzinfo=UTC)) == b'"26-Nov-2026 05:00:00 +0000"'


@pytest.mark.parametrize("name,wire", [
    ("INBOX", b"INBOX"), ("Entwürfe", b"Entw&APw-rfe"), ("A&B", b"A&-B"),
    ("台北", b"&U,BTFw-"), ("~peter/mail/日本語/台北", b"~peter/mail/&ZeVnLIqe-/&U,BTFw-"),
])
def test_modified_utf7(name: str, wire: bytes) -> None:
    assert mutf7_encode(name) == wire
    assert mutf7_decode(wire) == name


@given(st.text(max_size=30))
def test_mutf7_round_trip(name: str) -> None:
    try:
        name.encode("utf-16-be")
    except UnicodeEncodeError:
        return  # lone surrogates cannot be mailbox names
    assert mutf7_decode(mutf7_encode(name)) == name


@given(st.binary(max_size=40))
def test_mutf7_decode_never_raises(raw: bytes) -> None:
    assert isinstance(mutf7_decode(raw), str)
