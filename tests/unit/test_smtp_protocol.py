"""postbus.protocols.smtp: paths, parameters, enhanced codes, the DATA reader (smuggling,
streaming)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postbus.kit.testing import examples
from postbus.protocols import smtp as p


# ---------------------------------------------------------------- enhanced codes
@pytest.mark.parametrize("reply,expected", [
    ("250 OK", "250 2.0.0 OK"),
    ("503 Error: need RCPT command", "503 5.5.1 Error: need RCPT command"),
    ("500 Error: bad syntax", "500 5.5.2 Error: bad syntax"),
    ("250 2.1.5 Ok", "250 2.1.5 Ok"),
    ("550 5.1.1 user unknown", "550 5.1.1 user unknown"),
    ("354 End data with <CR><LF>.<CR><LF>", "354 End data with <CR><LF>.<CR><LF>"),
    ("221 Bye", "221 2.0.0 Bye"),
    ("501 Syntax: NOOP", "501 5.5.4 Syntax: NOOP"),
])
def test_enhanced_code_added_once(reply: str, expected: str) -> None:
    assert p.with_enhanced_code(reply) == expected
    assert p.with_enhanced_code(expected) == expected


# ---------------------------------------------------------------- paths
@pytest.mark.parametrize("text,address,domain,trick,rest", [
    ("<alice@example.test>", "alice@example.test", "example.test", False, ""),
    ("<alice@Example.TEST> SIZE=10", "alice@Example.TEST", "example.test", False, "SIZE=10"),
    ("alice@example.test", "alice@example.test", "example.test", False, ""),
    ("<@relay.example:bob@remote.example>", "bob@remote.example", "remote.example", True, ""),
    ("<@a.example,@b.example:bob@remote.example>", "bob@remote.example", "remote.example", True, ""),
    ("<bob%remote.example@example.test>", "bob%remote.example@example.test", "example.test", True, ""),
    ("<remote.example!bob@example.test>", "remote.example!bob@example.test", "example.test", True, ""),
    ('<"bob@remote.example"@example.test>', '"bob@remote.example"@example.test', "example.test", True, ""),
    ('<"john doe"@example.test>', '"john doe"@example.test', "example.test", True, ""),
    ("<bob@remote.example@example.test>", "bob@remote.example@example.test", "example.test", True, ""),
    ("<alice@[192.0.2.1]>", "alice@[192.0.2.1]", "[192.0.2.1]", False, ""),
])
def test_parse_path(text: str, address: str, domain: str, trick: bool, rest: str) -> None:
    path, r = p.parse_path(text, allow_null=False)
    assert (path.address, path.domain, path.relay_trick, r) == (address, domain, trick, rest)


@pytest.mark.parametrize("text", [
    "<>", "<alice>", "<alice@>", "<@example.test>", "<alice@exa mple.test>", "<alice@ex..test>",
    "<alice@example.test", "<alice@example.test>junk", "<al\x00ice@example.test>",
    "<a..b@example.test>", '<"unterminated@example.test>', "<alice@-bad.test>",
    "<jörg@example.test>",
])
def test_parse_path_rejects(text: str) -> None:
    with pytest.raises(p.PathError):
        p.parse_path(text, allow_null=False)


def test_null_path_and_utf8() -> None:
    assert p.parse_path("<>", allow_null=True)[0].address == ""
    path, _ = p.parse_path("<jörg@exämple.test> SMTPUTF8", allow_null=False, utf8=True)
    assert path.utf8 and path.address == "jörg@exämple.test"


# ---------------------------------------------------------------- parameters
def test_mail_params() -> None:
    mp = p.mail_params(p.parse_params("SIZE=100 BODY=8bitmime SMTPUTF8 RET=hdrs ENVID=ab+2Bc"),
                       max_size=1000)
    assert mp == p.MailParams(100, "8BITMIME", True, "HDRS", "ab+c", None)


@pytest.mark.parametrize("params,code", [
    ("SIZE=2000", "552 5.3.4"), ("SIZE=x", "501 5.5.4"), ("BODY=BINARYMIME", "501 5.5.4"),
    ("SMTPUTF8=yes", "501 5.5.4"), ("RET=ALL", "501 5.5.4"), ("ENVID=a+zz", "501 5.5.4"),
    ("FOO=bar", "555 5.5.4"), ("SIZE=1 SIZE=2", "501 5.5.4"), ("=x", "501 5.5.4"),
])
def test_mail_params_errors(params: str, code: str) -> None:
    with pytest.raises(p.ParamError) as ei:
        p.mail_params(p.parse_params(params), max_size=1000)
    assert ei.value.reply.startswith(code)


def test_rcpt_params() -> None:
    rp = p.rcpt_params(p.parse_params("NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob+40x@example.net"))
    assert rp.notify == ("SUCCESS", "FAILURE") and rp.orcpt == "rfc822;bob@x@example.net"
    for bad in ("NOTIFY=NEVER,SUCCESS", "NOTIFY=SOMETIMES", "ORCPT=nosemicolon", "X=1"):
        with pytest.raises(p.ParamError):
            p.rcpt_params(p.parse_params(bad))


def test_bdat_syntax() -> None:
    assert p.parse_bdat("100") == (100, False)
    assert p.parse_bdat("0 LAST") == (0, True)
    assert p.parse_bdat("12 last") == (12, True)
    for bad in (None, "", "x", "-1", "1 2", "10 LASTX"):
        assert p.parse_bdat(bad) is None


# ---------------------------------------------------------------- DATA
Outcome = tuple[bytes | p.DataProblem, bytes]  # (body or problem, the bytes after the end)


def reference(stream: bytes, *, max_line: int = 998, max_size: int = 0) -> Outcome | None:
    """What DATA means, the slow and obvious way, on the whole stream at once: split into
    lines at CRLF, un-stuff each line's leading dot. None while the end is not there."""
    v = b"\r\n" + stream
    idx = v.find(b"\r\n.\r\n")
    if idx < 0:
        return None
    stuffed, rest = v[2:idx + 2], v[idx + 5:]
    lines = stuffed.split(b"\r\n")[:-1]  # the body ends with CRLF (or is empty)
    lines = [ln[1:] if ln.startswith(b".") else ln for ln in lines]
    body = b"".join(ln + b"\r\n" for ln in lines)
    if max_size and len(body) > max_size:
        return p.R552_TOO_BIG, rest
    if any(b"\r" in ln or b"\n" in ln for ln in lines):
        return p.R550_BARE_LF, rest
    if max_line and any(len(ln) > max_line for ln in lines):
        return p.R500_LINE_TOO_LONG, rest
    return body, rest


def read(pieces: list[bytes], *, max_line: int = 998, max_size: int = 0) -> Outcome | None:
    """Feed the pieces to one DataReader; what it hands on, joined, or its problem."""
    r = p.DataReader(max_size=max_size, max_line=max_line)
    out = []
    for i, piece in enumerate(pieces):
        body, rest = r.feed(piece)
        out.append(body)
        if rest is not None:
            assert r.done
            problem = r.problem()
            return (problem or b"".join(out)), rest + b"".join(pieces[i + 1:])
        assert len(r._pending) <= 4 and len(r._ctx) == 2  # nothing else kept between chunks
    assert not r.done
    return None


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


@pytest.mark.parametrize("step", [1, 2, 7, 4096])
@pytest.mark.parametrize("stream,body,rest", [
    (b".\r\n", b"", b""),
    (b"hello\r\n.\r\nQUIT\r\n", b"hello\r\n", b"QUIT\r\n"),
    (b"a\r\n..dot\r\n.\r\n", b"a\r\n.dot\r\n", b""),
    (b"..\r\n.\r\n", b".\r\n", b""),
    (b"\r\n.\r\n", b"\r\n", b""),
    (b"a\r\n.x\r\n\r\n.\r\nMAIL", b"a\r\nx\r\n\r\n", b"MAIL"),
])
def test_reader_chunking_invariance(stream: bytes, body: bytes, rest: bytes, step: int) -> None:
    pieces = [stream[i:i + step] for i in range(0, len(stream), step)]
    assert read(pieces) == (body, rest) == reference(stream)


# every edge at once: stuffed dots at the start and after empty lines, dots that are not
# stuffing, CR LF pairs and the terminator's prefixes everywhere, a line of exactly 998
EDGES = (b"..s\r\n\r\n..\r\n...\r\n.x.\r\n\r\n\r\n" + b"y" * 998 + b"\r\n." + b"z" * 998
         + b"\r\n.\r\nQUIT\r\n")


@pytest.mark.parametrize("stream", [
    EDGES,
    EDGES.replace(b"y" * 998, b"y" * 999),  # one line too long
    EDGES.replace(b".x.\r\n", b".x.\n"),  # one bare LF
    EDGES.replace(b"..\r\n...", b"..\r.\r\n..."),  # "\r.\r\n": not the end, a bare CR
    b".\r\n", b"\r\n.\r\n", b"..\r\n.\r\n", b"x\r\n.\r\n",
], ids=["edges", "long-line", "bare-lf", "bare-cr", "empty", "crlf", "dot", "x"])
def test_reader_same_result_split_at_every_boundary(stream: bytes) -> None:
    """Cut the stream once at every octet boundary, and in three at every pair of
    boundaries among its first 40 and last 30 octets: always the one-shot result, which is
    the reference's."""
    whole = read([stream])
    assert whole == reference(stream) and whole is not None
    n = len(stream)
    for i in range(n + 1):
        assert read(split_at(stream, [i])) == whole, i
    near = sorted({*range(min(n, 40)), *range(max(0, n - 30), n + 1)})
    for i in near:
        for j in near:
            if i < j:
                assert read(split_at(stream, [i, j])) == whole, (i, j)
    assert read([stream[i:i + 1] for i in range(n)]) == whole  # one octet at a time


ALPHABET = st.sampled_from([b"\r", b"\n", b".", b"\r\n", b"\r\n.", b"\r\n.\r\n", b"x",
                            b"ab", b"y" * 30])


@settings(max_examples=examples(400), deadline=None)
@given(st.lists(ALPHABET, max_size=60).map(b"".join),
       st.lists(st.integers(min_value=0, max_value=400), max_size=8),
       st.sampled_from([0, 8, 30]), st.sampled_from([0, 20, 100]))
def test_reader_random_splits_match_the_reference(data: bytes, cuts: list[int], max_line: int,
                                                  max_size: int) -> None:
    stream = data + b"\r\n.\r\nNOOP\r\n"
    cuts = [c for c in cuts if c <= len(stream)]
    whole = reference(stream, max_line=max_line, max_size=max_size)
    assert read([stream], max_line=max_line, max_size=max_size) == whole
    assert read(split_at(stream, cuts), max_line=max_line, max_size=max_size) == whole


# ---------------------------------------------------------------- BDAT: DATA's checks
def check_reference(message: bytes, max_line: int) -> p.DataProblem | None:
    """What BDAT refuses, the slow way: the message split at CRLF (its last line may be
    unended), then DATA's rules on each line."""
    lines = message.split(b"\r\n")
    if any(b"\r" in ln or b"\n" in ln for ln in lines):
        return p.R550_BARE_LF
    if max_line and any(len(ln) > max_line for ln in lines):
        return p.R500_LINE_TOO_LONG
    return None


def check(pieces: list[bytes], max_line: int) -> p.DataProblem | None:
    c = p.MessageCheck(max_line)
    for piece in pieces:
        c.feed(piece)
    return c.problem()


@pytest.mark.parametrize(("message", "problem"), [
    (b"Subject: x\r\n\r\nbody\r\n", None),
    (b"Subject: x\r\n\r\nbody", None),  # BDAT may leave the last line unended
    (b"", None),
    (b"Subject: x\n\r\nbody\r\n", p.R550_BARE_LF),
    (b"Subject: x\r\n\r\nbo\rdy\r\n", p.R550_BARE_LF),
    (b"body\r", p.R550_BARE_LF),
    (b"\n.\nMAIL FROM:<x@y>\r\n", p.R550_BARE_LF),
    (b"x" * 12 + b"\r\n", None),
    (b"x" * 13 + b"\r\n", p.R500_LINE_TOO_LONG),
    (b"a\r\n" + b"x" * 12, None),
    (b"a\r\n" + b"x" * 13, p.R500_LINE_TOO_LONG),  # the unended last line counts
    (b"x" * 13 + b"\n", p.R550_BARE_LF),  # bare first, as DATA
])
def test_message_check_at_every_split(message: bytes, problem: p.DataProblem | None) -> None:
    assert check([message], 12) == problem == check_reference(message, 12)
    for i in range(len(message) + 1):  # a CRLF or a line across two chunks is one
        assert check([message[:i], message[i:]], 12) == problem, i
    assert check([message[i:i + 1] for i in range(len(message))], 12) == problem


@settings(max_examples=examples(400), deadline=None)
@given(st.lists(ALPHABET, max_size=60).map(b"".join),
       st.lists(st.integers(min_value=0, max_value=400), max_size=8),
       st.sampled_from([0, 8, 30]))
def test_message_check_random_splits_match_the_reference(data: bytes, cuts: list[int],
                                                         max_line: int) -> None:
    cuts = [c for c in cuts if c <= len(data)]
    assert check(split_at(data, cuts), max_line) == check_reference(data, max_line)


SMUGGLING = [
    b"\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r", b"\r.\r", b"\n.\r", b"\r\n.\n", b"\r.\n",
    b"\n", b"\r",
]


@pytest.mark.parametrize("step", [1, 3, 4096])
@pytest.mark.parametrize("sep", SMUGGLING)
def test_smuggling_payloads_do_not_end_data_and_are_rejected(sep: bytes, step: int) -> None:
    smuggled = b"MAIL FROM:<evil@example.net>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\nevil\r\n"
    stream = b"Subject: x\r\n\r\nhi" + sep + smuggled + b".\r\nQUIT\r\n"
    # only the real <CRLF>.<CRLF> at the very end ends the data
    assert read([stream[i:i + step] for i in range(0, len(stream), step)]) == (
        p.R550_BARE_LF, b"QUIT\r\n")


def test_line_length_and_size() -> None:
    ok = b"x" * 998 + b"\r\n"
    assert read([ok + b".\r\n"]) == (ok, b"")
    assert read([b"." + ok + b".\r\n"]) == (ok, b"")  # a stuffed dot does not count
    assert read([b"x" * 999 + b"\r\n.\r\n"]) == (p.R500_LINE_TOO_LONG, b"")
    assert read([ok * 3 + b".\r\n"], max_size=3000) == (ok * 3, b"")
    assert read([ok * 3 + b"a\r\n.\r\n"], max_size=3000) == (p.R552_TOO_BIG, b"")
    # too big and malformed: too big, whatever else is wrong with it
    assert read([ok * 3 + b"a\nb\r\n.\r\n"], max_size=10) == (p.R552_TOO_BIG, b"")
    assert read([ok * 3 + b"a" * 999 + b"\r\n.\r\n"], max_size=10) == (p.R552_TOO_BIG, b"")


def test_reader_keeps_nothing_past_the_size_limit() -> None:
    r = p.DataReader(max_size=1000, max_line=998)
    body, _ = r.feed(b"y" * 900)
    assert len(body) == 900 - 4
    for _ in range(50):  # 50 more MB-sized chunks: nothing handed on, nothing kept
        assert r.feed(b"y" * 1_000_000) == (b"", None)
        assert len(r._pending) == 4
    assert r.feed(b"\r\n.\r\nNOOP\r\n") == (b"", b"NOOP\r\n")
    assert r.overflow and r.problem() == p.R552_TOO_BIG


@settings(max_examples=examples(300), deadline=None)
@given(st.binary(max_size=2000), st.integers(min_value=1, max_value=64))
def test_arbitrary_bytes_never_raise(data: bytes, step: int) -> None:
    got = read([data[i:i + step] for i in range(0, len(data), step)], max_size=500)
    assert got == reference(data, max_size=500)
    if got is not None and isinstance(got[0], bytes):
        # accepted bodies never contain bare CR or LF
        assert got[0].count(b"\n") == got[0].count(b"\r\n") == got[0].count(b"\r")


@settings(max_examples=examples(200), deadline=None)
@given(st.text(max_size=80))
def test_parse_path_never_raises_anything_else(text: str) -> None:
    try:
        p.parse_path(text, allow_null=True, utf8=True)
    except p.PathError:
        pass
    try:
        p.rcpt_params(p.parse_params(text))
        p.mail_params(p.parse_params(text), max_size=10)
    except p.ParamError:
        pass


def test_reader_drop_hands_on_nothing_but_finds_the_end() -> None:
    r = p.DataReader(max_line=998)
    body, rest = r.feed(b"Subject: x\r\n\r\n" + b"a" * 10_000)
    assert rest is None and len(body) == 10_014 - 4
    r.drop()
    assert r.feed(b"b" * 50_000 + b"\r\n") == (b"", None)
    assert r.feed(b".\r\nQUIT\r\n") == (b"", b"QUIT\r\n")
    assert r.dropped and r.done and not r.overflow


# ---------------------------------------------------------------- the receiver
@pytest.mark.parametrize("line,item", [
    (b"EHLO c.example.net", p.Helo("c.example.net", True)),
    (b"helo  c.example.net ", p.Helo("c.example.net", False)),
    (b"HELO", p.Helo("", False)),
    (b"MAIL FROM:<a@b.example> SIZE=10", p.Mail("FROM:<a@b.example> SIZE=10")),
    (b"rcpt TO:<a@b.example>", p.Rcpt("TO:<a@b.example>")),
    (b"DATA", p.Data("")),
    (b"BDAT 10 LAST", p.Bdat(10, True)),
    (b"BDAT 0", p.Bdat(0, False)),
    (b"BDAT ten", p.Bdat(None)),
    (b"RSET", p.Rset("")),
    (b"NOOP whatever", p.Noop()),
    (b"QUIT", p.Quit()),
    (b"VRFY bob", p.Vrfy("bob")),
    (b"EXPN list", p.Expn()),
    (b"HELP", p.Help()),
    (b"STARTTLS", p.StartTls("")),
    (b"AUTH PLAIN abc=", p.Auth("PLAIN abc=")),
    (b"XCLIENT NAME=x", p.Unknown("XCLIENT")),
    (b"", p.Bad(p.SYNTAX)),
    (b"MAIL\tFROM:<a@b.example>", p.Bad(p.SYNTAX)),
    (b"NO\x00OP", p.Bad(p.SYNTAX)),
    (b"NOOP \x00", p.Bad(p.SYNTAX)),
    (b"\xff\xfe", p.Bad(p.SYNTAX)),
])
def test_command_lines(line: bytes, item: p.Item) -> None:
    assert p.parse_command(line) == item
    assert p.Receiver().feed(line + b"\r\n") == [item]
    assert p.Receiver().feed(line + b"\n") == [item]  # a bare LF ends a command line too


def test_receiver_stops_after_data_bdat_and_starttls() -> None:
    r = p.Receiver()
    assert r.feed(b"NOOP\r\nDATA\r\nNOOP\r\n") == [p.Noop(), p.Data("")]
    assert r.pending() == 6
    assert r.feed(b"") == [p.Noop()]  # no 354: still command lines
    assert r.feed(b"STARTTLS\r\nRSET\r\n") == [p.StartTls("")]
    r.discard()  # RFC 3207 §4.2: nothing pipelined after STARTTLS counts
    assert r.feed(b"") == [] and r.pending() == 0


def test_receiver_data_and_chunks() -> None:
    r = p.Receiver(max_size=100, max_data_line=20)
    assert r.feed(b"DATA\r\nSubject: x\r\n\r\n..dot\r\n.\r\nBDAT 3\r\nabcBDAT 0 LAST\r\nQUIT\r\n") \
        == [p.Data("")]
    r.start_data()
    assert r.mode == "data"
    assert r.feed(b"") == [p.Body(b"Subject: x\r\n\r\n.dot\r\n"), p.DataEnd(None), p.Bdat(3, False)]
    r.start_chunk(3)
    assert r.feed(b"") == [p.Body(b"abc"), p.ChunkEnd(), p.Bdat(0, True)]
    r.start_chunk(0)
    assert r.feed(b"") == [p.ChunkEnd(), p.Quit()]
    assert r.mode == "command"
    r.feed(b"DATA\r\n")
    r.start_data()
    got = r.feed(b"x" * 150 + b"\r\n.\r\n")
    assert got == [p.Overflow(), p.DataEnd(p.R552_TOO_BIG)]
    r.feed(b"DATA\r\n")
    r.start_data()
    assert r.feed(b"a\nb\r\n.\r\n")[-1] == p.DataEnd(p.R550_BARE_LF)


def test_over_long_line_is_reported_once_and_at_once() -> None:
    r = p.Receiver(max_line=100)
    assert r.feed(b"A" * 101) == [p.Bad(p.TOO_LONG)]  # before its end arrives
    assert r.feed(b"A" * 5000) == []
    assert r.feed(b"AAA\r\nNOOP\r\n") == [p.Noop()]
    assert r.feed(b"B" * 100 + b"\r\n") == [p.Bad(p.TOO_LONG)]  # the CR counts
    assert r.feed(b"B" * 99 + b"\r\n") == [p.Unknown("B" * 99)]
    assert r.pending() == 0


def _drive(r: p.Receiver, pieces: list[bytes]) -> list[p.Item]:
    """Feed ``pieces``, starting DATA after every DATA and a chunk after every BDAT (as a
    session that accepts everything would); Body items joined, and dropped before Overflow
    (what came before the limit was found is discarded), so splits do not show."""
    out: list[p.Item] = []

    def take(items: list[p.Item]) -> bool:
        for it in items:
            if isinstance(it, p.Overflow) and out and isinstance(out[-1], p.Body):
                out.pop()
            if isinstance(it, p.Body) and out and isinstance(out[-1], p.Body):
                out[-1] = p.Body(out[-1].data + it.data)
            else:
                out.append(it)
            if isinstance(it, p.Data):
                r.start_data()
            elif isinstance(it, p.Bdat) and it.size is not None:
                r.start_chunk(it.size)
        return bool(items)

    for piece in pieces:
        more = take(r.feed(piece))
        while more:
            more = take(r.feed(b""))
    return out


STREAM = (b"EHLO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n"
          b"Subject: s\r\n\r\n..x\r\nline\r\n.\r\nBDAT 5\r\n12\r\n3BDAT 4 LAST\r\n\r\n\r\n"
          + b"Z" * 3000 + b"\r\nSTARTTLS\r\nNOOP\r\nDATA\r\n" + b"y" * 200 + b"\r\n.\r\nQUIT\r\n")


@pytest.mark.parametrize("step", [1, 2, 3, 7, 64, 4096])
def test_receiver_chunking_invariance(step: int) -> None:
    whole = _drive(p.Receiver(max_line=2048, max_size=100), [STREAM])
    split = _drive(p.Receiver(max_line=2048, max_size=100),
                   [STREAM[i:i + step] for i in range(0, len(STREAM), step)])
    assert split == whole
    assert whole[-1] == p.Quit() and p.Bad(p.TOO_LONG) in whole


@settings(max_examples=examples(300), deadline=None)
@given(st.binary(max_size=3000), st.lists(st.integers(min_value=0, max_value=3000), max_size=12))
def test_receiver_any_bytes_any_split(data: bytes, cuts: list[int]) -> None:
    """Any bytes, split anywhere: never an exception, the same items."""
    stream = b"EHLO x\r\n" + data.replace(b"DATA", b"DATA\r\n").replace(b"BDAT", b"BDAT 7\r\n")
    points = sorted({c % (len(stream) + 1) for c in cuts})
    pieces = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    assert (_drive(p.Receiver(max_line=64, max_size=50, max_data_line=30), pieces)
            == _drive(p.Receiver(max_line=64, max_size=50, max_data_line=30), [stream]))


def test_one_feed_returns_a_bounded_number_of_items() -> None:
    r = p.Receiver()
    batches = [r.feed(b"\r\n" * 10_000)]
    while batches[-1]:
        batches.append(r.feed(b""))
    assert max(map(len, batches)) == p.MAX_ITEMS
    assert sum(map(len, batches)) == 10_000 and r.pending() == 0
