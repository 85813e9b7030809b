"""Property: any sequence of command lines leaves the session consistent with a simple model —
no exception, every reply is +OK/-ERR/continuation, STAT agrees with the DELE marks, and the
store changes only if the client QUIT from the transaction state, by exactly what it marked."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from postbus.kit.testing import examples
from postbus.pop3_access.memory import (
    MemoryDirectory,
    MemoryLocks,
    MemoryMaildrops,
    MemoryThrottle,
)
from postbus.pop3_access.session import Limits, Peer, Session, Transaction
from postbus.protocols.pop3 import Receiver

BODIES = [b"Subject: a\r\n\r\n.x\r\n", b"Subject: b\n\nyy\n", b"Subject: c\r\n\r\nzzz"]

n = st.integers(min_value=-1, max_value=5).map(str)
VERBS = {"USER", "PASS", "AUTH", "STAT", "LIST", "UIDL", "RSET", "NOOP", "CAPA", "STLS", "UTF8",
         "QUIT", "RETR", "DELE", "TOP", "APOP"}
LINES = st.one_of(
    st.just("USER alice@example.test"), st.just("PASS secret"), st.just("PASS wrong"),
    st.just("AUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABzZWNyZXQ="), st.just("AUTH PLAIN"),
    st.just("STAT"), st.just("LIST"), st.just("UIDL"), st.just("RSET"), st.just("NOOP"),
    st.just("CAPA"), st.just("STLS"), st.just("UTF8"), st.just("QUIT"),
    n.map(lambda x: f"LIST {x}"), n.map(lambda x: f"UIDL {x}"), n.map(lambda x: f"RETR {x}"),
    n.map(lambda x: f"DELE {x}"), st.tuples(n, n).map(lambda t: f"TOP {t[0]} {t[1]}"),
    # junk, but never a real command in disguise (the model below follows real ones)
    st.text(max_size=30).filter(lambda s: "\n" not in s and "\r" not in s
                                and (s.split() or [""])[0].upper() not in VERBS),
)


async def run(lines: list[str]) -> None:
    directory, store = MemoryDirectory(), MemoryMaildrops()
    acc = directory.add("alice@example.test", "secret")
    for b in BODIES:
        store.deliver(acc.account_id, b)

    async def no_sleep(_: float) -> None:
        return None

    s = Session(directory=directory, maildrops=store, locks=MemoryLocks(),
                throttle=MemoryThrottle(), peer=Peer("127.0.0.1", False, True),
                limits=Limits(max_auth_failures_account=1000, max_auth_failures_ip=1000,
                              max_auth_failures_session=1000), sleep=no_sleep)
    receiver = Receiver()
    marked: set[int] = set()
    quit_in_transaction = False
    sizes = [m.size for m in (await store.open(acc.account_id)).messages]
    for line in lines:
        closed = False
        for item in receiver.feed(line.encode() + b"\r\n"):
            was_transaction = isinstance(s.state, Transaction)
            reply = await s.handle(item)
            assert reply.data.startswith((b"+OK", b"-ERR", b"+ ")), reply.data
            assert reply.data.endswith(b"\r\n")
            if reply.starttls:
                s.tls_started()
            if isinstance(s.state, Transaction):
                # the model keeps its own marks (issue 12.3: copying the session's let an
                # RSET that forgot to clear them pass)
                if not was_transaction:
                    marked = set()  # just logged in
                words = line.split()
                if words[:1] == ["DELE"] and len(words) == 2:
                    k = int(words[1])
                    ok = 1 <= k <= len(sizes) and k not in marked
                    assert reply.data.startswith(b"+OK") == ok, (line, reply.data, marked)
                    if ok:
                        marked.add(k)
                elif words == ["RSET"]:
                    assert reply.data.startswith(b"+OK")
                    marked.clear()
                elif words[:1] in (["RETR"], ["LIST"]) and len(words) == 2:
                    k = int(words[1])
                    ok = 1 <= k <= len(sizes) and k not in marked
                    assert reply.data.startswith(b"+OK") == ok, (line, reply.data, marked)
                if line == "STAT":
                    live = [sz for i, sz in enumerate(sizes, 1) if i not in marked]
                    assert reply.data == f"+OK {len(live)} {sum(live)}\r\n".encode()
            if reply.close:
                quit_in_transaction = was_transaction and line == "QUIT"
                closed = True
                break
        if closed:
            break
    else:
        await s.abort()
    left = {m.uid for m in store.mailbox(acc.account_id).messages}
    if quit_in_transaction:
        assert left == {1, 2, 3} - marked
    else:
        assert left == {1, 2, 3}


@settings(max_examples=examples(200), deadline=None)
@given(st.lists(LINES, max_size=40))
def test_any_command_sequence_keeps_the_model(lines: list[str]) -> None:
    asyncio.run(run(lines))


@settings(max_examples=examples(50), deadline=None)
@given(st.lists(st.sampled_from(["DELE 1", "DELE 2", "DELE 3", "RSET", "RETR 2", "STAT"]),
                max_size=15))
def test_logged_in_sequences_then_quit(cmds: list[str]) -> None:
    asyncio.run(run(["USER alice@example.test", "PASS secret", *cmds, "QUIT"]))
