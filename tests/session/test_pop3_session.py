"""Session behaviour that a transcript cannot show: the maildrop lock between two sessions,
throttling across sessions, LOGIN-DELAY, unavailable dependencies, a lost lock, prefetch."""

from __future__ import annotations

from postbus.pop3_access.memory import (
    MemoryDirectory,
    MemoryLocks,
    MemoryMaildrops,
    MemoryThrottle,
)
from postbus.pop3_access.session import Limits, Peer, Session, Transaction, Update
from postbus.protocols.pop3 import Dele, Pass, Quit, Retr, Stat, User


class World:
    def __init__(self, **limits: object) -> None:
        self.directory = MemoryDirectory()
        self.store = MemoryMaildrops()
        self.locks = MemoryLocks()
        self.throttle = MemoryThrottle(login_delay_s=float(limits.get("login_delay_s", 0)))  # type: ignore[arg-type]
        self.limits = Limits(**limits)  # type: ignore[arg-type]
        self.sleeps: list[float] = []
        self.alice = self.directory.add("alice@example.test", "secret")
        for i in range(5):
            self.store.deliver(self.alice.account_id, f"Subject: {i}\r\n\r\nbody {i}\r\n".encode())

    async def sleep(self, s: float) -> None:
        self.sleeps.append(s)

    def session(self, ip: str = "127.0.0.1") -> Session:
        return Session(directory=self.directory, maildrops=self.store, locks=self.locks,
                       throttle=self.throttle, peer=Peer(ip, False, False), limits=self.limits,
                       sleep=self.sleep, session_id=f"s{len(self.sleeps)}")


async def login(s: Session, user: str = "alice@example.test", pw: str = "secret") -> bytes:
    assert (await s.handle(User(user))).data.startswith(b"+OK")
    return (await s.handle(Pass(pw))).data


async def test_second_session_gets_in_use_until_first_quits() -> None:
    w = World()
    a, b = w.session(), w.session()
    assert (await login(a)).startswith(b"+OK maildrop has 5 messages")
    assert await login(b) == b"-ERR [IN-USE] maildrop already locked by another session\r\n"
    assert not isinstance(b.state, Transaction)
    assert w.store.commits == []
    assert (await a.handle(Quit())).close
    assert (await login(b)).startswith(b"+OK")


async def test_dropped_session_frees_the_lock_and_applies_nothing() -> None:
    w = World()
    a = w.session()
    await login(a)
    await a.handle(Dele(1))
    await a.abort()
    assert isinstance(a.state, Update) and w.store.commits == [] and w.locks.held == {}
    assert len(w.store.visible(w.alice.account_id)) == 5


async def test_failures_are_counted_across_sessions_per_ip_and_account() -> None:
    w = World(max_auth_failures_ip=4, max_auth_failures_account=3, auth_failure_delay_s=0.5,
              auth_failure_delay_max_s=1.5)
    for _ in range(3):
        s = w.session("192.0.2.1")
        s.peer = Peer("192.0.2.1", True, True)
        assert await login(s, pw="bad") == b"-ERR [AUTH] authentication failed\r\n"
    assert w.sleeps == [0.5, 1.0, 1.5]  # grows with recent failures, capped
    # the account is now throttled, even with the right password and from another IP
    s = w.session("127.0.0.1")
    assert await login(s) == b"-ERR [SYS/TEMP] too many failed logins; try again later\r\n"
    # another account from the first IP: one more failure reaches the IP limit
    w.directory.add("bob@example.test", "pw")
    s = w.session("192.0.2.1")
    s.peer = Peer("192.0.2.1", True, True)
    assert await login(s, "bob@example.test", "nope") == b"-ERR [AUTH] authentication failed\r\n"
    s = w.session("192.0.2.1")
    s.peer = Peer("192.0.2.1", True, True)
    assert (await login(s, "bob@example.test", "pw")).startswith(b"-ERR [SYS/TEMP]")
    assert w.directory.calls == 4  # throttled attempts never reach the directory


async def test_success_clears_the_account_counter() -> None:
    w = World()
    s = w.session()
    await login(s, pw="bad")
    assert w.throttle.account == {"alice@example.test": 1}
    await login(s)
    assert w.throttle.account == {} and w.throttle.ip == {"127.0.0.1": 1}


async def test_login_delay() -> None:
    w = World(login_delay_s=300)
    s = w.session()
    assert (await login(s)).startswith(b"+OK")
    await s.handle(Quit())
    again = w.session()
    assert await login(again) == b"-ERR [LOGIN-DELAY] wait 300s between logins\r\n"


async def test_unavailable_dependencies_answer_sys_temp() -> None:
    w = World()
    w.directory.down = True
    assert (await login(w.session())).startswith(b"-ERR [SYS/TEMP] authentication service")
    w.directory.down = False
    w.store.down = True
    s = w.session()
    assert (await login(s)).startswith(b"-ERR [SYS/TEMP] maildrop unavailable")
    assert w.locks.held == {}  # the lock taken for the failed open was given back
    w.store.down = False
    assert (await login(s)).startswith(b"+OK")
    await s.handle(Dele(2))
    w.store.down = True
    assert (await s.handle(Retr(1))).data.startswith(b"-ERR [SYS/TEMP] message body")
    reply = await s.handle(Quit())
    assert reply.close and reply.data.startswith(b"-ERR [SYS/TEMP] some deleted messages")
    assert w.locks.held == {}


async def test_lost_lock_applies_nothing() -> None:
    w = World()
    s = w.session()
    await login(s)
    await s.handle(Dele(1))
    assert isinstance(s.state, Transaction)
    s.state.lease._lost = True  # type: ignore[attr-defined]
    reply = await s.handle(Quit())
    assert reply.data == b"-ERR [SYS/TEMP] maildrop lock lost; no messages deleted\r\n"
    assert w.store.commits == []


async def test_retr_prefetches_the_next_messages() -> None:
    w = World(prefetch=2)
    s = w.session()
    await login(s)
    keys = [m.blob_key for m in (await w.store.open(w.alice.account_id)).messages]
    assert w.store.prefetched == keys[:2]  # at login
    await s.handle(Dele(3))
    await s.handle(Retr(2))
    assert w.store.prefetched[2:] == [keys[3], keys[4]]  # skips the deleted message 3
    assert (await s.handle(Stat())).data == b"+OK 4 " + str(
        sum(m.size for i, m in enumerate((await w.store.open(1)).messages) if i != 2)).encode() + b"\r\n"


async def test_commit_carries_uids_mode_and_seen() -> None:
    w = World()
    s = w.session()
    await login(s)
    await s.handle(Retr(1))
    await s.handle(Retr(2))
    await s.handle(Dele(2))
    await s.handle(Dele(5))
    await s.handle(Quit())
    [c] = w.store.commits
    assert (c.delete_uids, c.mode, c.seen_uids) == ([2, 5], "delete", [1])


async def test_command_count_is_bounded() -> None:
    w = World(max_commands=4)
    s = w.session()
    await login(s)
    await s.handle(Dele(1))
    assert not (await s.handle(Stat())).close
    reply = await s.handle(Stat())
    assert reply.close and reply.data == b"-ERR too many commands in one session, closing\r\n"
    assert w.store.commits == [] and w.locks.held == {}


async def test_disabled_account_answers_as_a_wrong_password_and_is_counted() -> None:
    # issue 8 (low): "account disabled" came only with the right password (an oracle)
    w = World()
    w.directory.accounts["alice@example.test"].disabled = True
    s = w.session()
    right, wrong = await login(s), await login(s, pw="bad")
    assert right == wrong == b"-ERR [AUTH] authentication failed\r\n"
    assert w.throttle.account == {"alice@example.test": 2}
