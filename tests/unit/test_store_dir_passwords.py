"""Argon2id password hashing: format, verification, rehash, and that verification never
blocks the event loop."""

from __future__ import annotations

import asyncio

from argon2 import PasswordHasher
from argon2.exceptions import VerifyMismatchError

from postbus.mailbox_store.passwords import (
    DEFAULT_HASHER,
    Passwords,
    Verified,
    VerifyCache,
    fast_hasher,
)


def test_hash_verify_and_rehash() -> None:
    p = Passwords(fast_hasher())
    h = p.hash_sync("correct horse")
    assert h.startswith("$argon2id$v=19$")
    assert p.hash_sync("correct horse") != h  # salted
    assert p.verify_sync(h, "correct horse").ok
    assert p.verify_sync(h, "correct horse").new_hash is None
    assert not p.verify_sync(h, "Correct horse").ok
    assert not p.verify_sync("not a hash", "x").ok
    assert not p.needs_rehash(h)
    assert p.needs_rehash("not a hash")
    stronger = Passwords(PasswordHasher(time_cost=2, memory_cost=64, parallelism=1))
    assert stronger.needs_rehash(h)
    v = stronger.verify_sync(h, "correct horse")
    assert v.ok and v.new_hash is not None and "m=64,t=2,p=1" in v.new_hash
    assert not stronger.verify_sync(h, "wrong").ok


async def test_verify_runs_off_the_event_loop() -> None:
    """Deterministic (issue 12.6: no lower time bound that depends on the CPU): the hash
    check waits for an event that only the event loop sets. Run on the loop's thread, it
    would block the loop, the event would never be set, and the check would fail."""
    import threading

    release = threading.Event()

    class GatedHasher:
        def verify(self, stored: str, password: str) -> bool:
            if not release.wait(5):
                raise VerifyMismatchError("the loop was blocked")
            return True

        def check_needs_rehash(self, stored: str) -> bool:
            return False

    p = Passwords(GatedHasher())  # type: ignore[arg-type]
    pending = asyncio.ensure_future(p.verify("$argon2id$stored", "pw"))
    await asyncio.sleep(0.01)
    assert not pending.done()  # waiting in its thread; the loop runs on
    release.set()
    assert (await pending).ok



def test_default_hash_is_argon2id_with_the_documented_parameters() -> None:
    # issue 12.2: switching to Argon2i or weaker parameters must fail a test
    h = Passwords(DEFAULT_HASHER).hash_sync("pw")
    assert h.startswith("$argon2id$v=19$m=19456,t=2,p=1$"), h
    salt, digest = h.rsplit("$", 2)[1:]
    assert len(salt) >= 22 and len(digest) >= 43  # 16-byte salt, 32-byte hash (base64)


class Counting:
    """Passwords whose Argon2 calls are counted."""

    def __init__(self, cache: VerifyCache, hasher: PasswordHasher | None = None) -> None:
        self.p = Passwords(hasher or fast_hasher(), cache=cache)
        self.calls = 0
        real = self.p.verify_sync

        def counted(stored: str, password: str) -> Verified:
            self.calls += 1
            return real(stored, password)

        self.p.verify_sync = counted  # type: ignore[method-assign]


async def test_verify_cache_answers_repeats_without_argon2() -> None:
    now = [0.0]
    c = Counting(VerifyCache(ttl_s=60, negative_ttl_s=10, clock=lambda: now[0]))
    h = c.p.hash_sync("right")
    assert (await c.p.verify(h, "right", "a@x")).ok
    assert (await c.p.verify(h, "right", "a@x")).ok
    assert c.calls == 1
    assert not (await c.p.verify(h, "wrong", "a@x")).ok  # another password: a miss
    assert not (await c.p.verify(h, "wrong", "a@x")).ok  # a negative hit
    assert c.calls == 2
    assert (await c.p.verify(h, "right", "b@x")).ok  # another login: a miss
    assert c.calls == 3
    changed = c.p.hash_sync("right")  # the password was set again: a new stored hash
    assert (await c.p.verify(changed, "right", "a@x")).ok and c.calls == 4
    assert not (await c.p.verify(changed, "wrong", "a@x")).ok and c.calls == 5
    now[0] = 11  # the negative entry expired, the positive one lives on
    assert not (await c.p.verify(changed, "wrong", "a@x")).ok and c.calls == 6
    assert (await c.p.verify(changed, "right", "a@x")).ok and c.calls == 6
    now[0] = 100
    assert (await c.p.verify(changed, "right", "a@x")).ok and c.calls == 7


async def test_verify_cache_off_bounded_and_never_keeps_an_upgrade() -> None:
    off = Counting(VerifyCache(ttl_s=0))
    h = off.p.hash_sync("pw")
    for _ in range(3):
        assert (await off.p.verify(h, "pw")).ok
    assert off.calls == 3
    small = Counting(VerifyCache(max_entries=2))
    for pw in ("a", "b", "c"):
        await small.p.verify(h, pw)
    assert len(small.p.cache._entries) == 2  # type: ignore[union-attr]
    # a hash made with older parameters verifies, is upgraded, and is not cached as is
    stronger = Counting(VerifyCache(), PasswordHasher(time_cost=2, memory_cost=64, parallelism=1))
    v1 = await stronger.p.verify(h, "pw")
    v2 = await stronger.p.verify(h, "pw")
    assert v1.ok and v1.new_hash and v2.ok and v2.new_hash and stronger.calls == 2


def test_verify_cache_keeps_no_password() -> None:
    cache = VerifyCache()
    key = cache.key("a@x", "$argon2id$stored", "hunter2")
    assert b"hunter2" not in key and len(key) == 32
    assert key != VerifyCache().key("a@x", "$argon2id$stored", "hunter2")  # per-process key


async def test_verify_cache_runs_one_argon2_for_the_same_check_at_once() -> None:
    c = Counting(VerifyCache())
    h = c.p.hash_sync("right")
    same = await asyncio.gather(*(c.p.verify(h, "right", "a@x") for _ in range(8)))
    assert all(v.ok for v in same) and c.calls == 1
    # other passwords or logins at the same moment are their own checks
    mixed = await asyncio.gather(c.p.verify(h, "wrong", "a@x"), c.p.verify(h, "right", "b@x"),
                                 c.p.verify(h, "wrong", "a@x"))
    assert [v.ok for v in mixed] == [False, True, False] and c.calls == 3
    assert not c.p._running  # nothing left behind
