"""APPENDLIMIT (RFC 7889) in a session against the in-memory ports: the capability after
login, STATUS and LIST-STATUS, and an APPEND past the limit answered NO [TOOBIG] (with a
synchronising literal before its data, with LITERAL+ after skipping it)."""

from __future__ import annotations

import imap_support

from postbus.protocols.imap_parser import Limits

LIMIT = 5000


class Client(imap_support.Client):
    def __init__(self, append_limit: int | None = LIMIT) -> None:
        # the server's receiver bounds a literal by the same number (server.py)
        super().__init__(append_limit=append_limit, limits=Limits(
            max_line=2000, max_literal=LIMIT, max_command=2 * LIMIT))


async def test_appendlimit_advertised_and_enforced() -> None:
    c = Client()
    greeting = c.out.take()[0]
    assert b"APPENDLIMIT" not in greeting  # only once logged in
    out = await c.send(b"a LOGIN alice@example.test secret\r\nb CAPABILITY\r\n")
    assert b" APPENDLIMIT=5000" in out[0] and b" APPENDLIMIT=5000 " in out[1] + b" "
    # RFC 7889 §3.1 and §3.2
    out = await c.send(b"c STATUS INBOX (APPENDLIMIT MESSAGES)\r\n"
                       b'd LIST "" INBOX RETURN (STATUS (APPENDLIMIT))\r\n')
    assert out[0] == b"* STATUS INBOX (APPENDLIMIT 5000 MESSAGES 0)"
    assert out[-2] == b"* STATUS INBOX (APPENDLIMIT 5000)" and out[-1].startswith(b"d OK")
    # RFC 7889 §4: past the limit the APPEND fails with a tagged NO [TOOBIG]; a synchronising
    # literal before its data is sent (no continuation), a LITERAL+ one after it is skipped
    out = await c.send(b"e APPEND INBOX {5001}\r\n")
    assert out == [b"e NO [TOOBIG] literal too large"]
    out = await c.send(b"f APPEND INBOX {5001+}\r\n" + b"x" * 5001 + b"\r\n")
    assert out == [b"f NO [TOOBIG] literal too large"]
    out = await c.send(b"g APPEND INBOX {5000+}\r\n" + b"y" * 5000 + b"\r\n")
    assert out[-1].startswith(b"g OK [APPENDUID")
    # other commands past the literal bound are still BAD
    out = await c.send(b"h SEARCH TEXT {5001}\r\n")
    assert out == [b"h BAD [TOOBIG] literal too large"]


async def test_no_appendlimit_without_a_limit() -> None:
    c = Client(append_limit=None)
    c.out.take()  # the greeting
    out = await c.send(b"a LOGIN alice@example.test secret\r\nb STATUS INBOX (APPENDLIMIT)\r\n")
    assert b"APPENDLIMIT" not in out[0]
    assert out[1] == b"* STATUS INBOX (APPENDLIMIT NIL)"  # RFC 7889 §5: number / nil
