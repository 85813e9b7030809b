"""postbus.protocols.smtp: paths, parameters, enhanced codes, the DATA scanner (smuggling)."""

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
def scan(stream: bytes, step: int, limit: int = 10_000) -> tuple[p.DataScanner, bytes | None]:
    sc = p.DataScanner(limit=limit)
    rest = None
    for i in range(0, len(stream), step):
        rest = sc.feed(stream[i:i + step])
        if rest is not None:
            rest = rest + stream[i + step:]
            break
    return sc, rest


@pytest.mark.parametrize("step", [1, 2, 7, 4096])
@pytest.mark.parametrize("stream,body,rest", [
    (b".\r\n", b"", b""),
    (b"hello\r\n.\r\nQUIT\r\n", b"hello\r\n", b"QUIT\r\n"),
    (b"a\r\n..dot\r\n.\r\n", b"a\r\n.dot\r\n", b""),
    (b"..\r\n.\r\n", b".\r\n", b""),
    (b"\r\n.\r\n", b"\r\n", b""),
    (b"a\r\n.x\r\n\r\n.\r\nMAIL", b"a\r\nx\r\n\r\n", b"MAIL"),
])
def test_scanner_chunking_invariance(stream: bytes, body: bytes, rest: bytes, step: int) -> None:
    sc, r = scan(stream, step)
    assert r == rest
    assert p.finish_data(sc.stuffed_body(), max_line=998) == body


SMUGGLING = [
    b"\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r", b"\r.\r", b"\n.\r", b"\r\n.\n", b"\r.\n",
    b"\n", b"\r",
]


@pytest.mark.parametrize("step", [1, 3, 4096])
@pytest.mark.parametrize("sep", SMUGGLING)
def test_smuggling_payloads_do_not_end_data_and_are_rejected(sep: bytes, step: int) -> None:
    smuggled = b"MAIL FROM:<evil@example.net>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\nevil\r\n"
    stream = b"Subject: x\r\n\r\nhi" + sep + smuggled + b".\r\nQUIT\r\n"
    sc, r = scan(stream, step)
    # only the real <CRLF>.<CRLF> at the very end ends the data
    assert r == b"QUIT\r\n"
    assert p.finish_data(sc.stuffed_body(), max_line=998) == p.R550_BARE_LF


def test_line_length_and_overflow() -> None:
    ok = b"x" * 998 + b"\r\n"
    assert p.finish_data(ok, max_line=998) == ok
    assert p.finish_data(b"." + ok, max_line=998) == ok  # a stuffed dot does not count
    assert p.finish_data(b"x" * 999 + b"\r\n", max_line=998) == p.R500_LINE_TOO_LONG
    sc, rest = scan(b"y" * 50_000 + b"\r\n.\r\nNOOP\r\n", 1000, limit=1000)
    assert sc.overflow and rest == b"NOOP\r\n" and len(sc.buf) < 2000


@settings(max_examples=examples(300), deadline=None)
@given(st.binary(max_size=2000), st.integers(min_value=1, max_value=64))
def test_arbitrary_bytes_never_raise(data: bytes, step: int) -> None:
    sc, _ = scan(data, step, limit=500)
    result = p.finish_data(sc.stuffed_body(), max_line=998)
    assert isinstance(result, bytes | p.DataProblem)
    if isinstance(result, bytes):
        # accepted bodies never contain bare CR or LF
        assert result.count(b"\n") == result.count(b"\r\n") == result.count(b"\r")


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


def test_data_scanner_drop_keeps_nothing_but_finds_the_end() -> None:
    sc = p.DataScanner(limit=10**9)
    assert sc.feed(b"Subject: x\r\n\r\n" + b"a" * 10_000) is None
    sc.drop()
    assert len(sc.buf) <= 4
    assert sc.feed(b"b" * 50_000 + b"\r\n") is None and len(sc.buf) <= 4
    assert sc.feed(b".\r\nQUIT\r\n") == b"QUIT\r\n"
    assert sc.dropped and not sc.overflow and sc.stuffed_body() == b""


def test_finish_data_long_line_check_without_splitting() -> None:
    ok = b"x" * 998 + b"\r\n" + b".." + b"y" * 997 + b"\r\n"  # a stuffed dot does not count
    assert p.finish_data(ok, max_line=998) == b"x" * 998 + b"\r\n." + b"y" * 997 + b"\r\n"
    assert p.finish_data(b"z" * 999 + b"\r\n", max_line=998) == p.R500_LINE_TOO_LONG
