"""Argon2id password hashing: format, verification, rehash, and that verification never
blocks the event loop."""

from __future__ import annotations

import asyncio
import time

from argon2 import PasswordHasher

from postbus.mailbox_store.passwords import DEFAULT_HASHER, Passwords, fast_hasher


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
    p = Passwords(DEFAULT_HASHER)
    h = await p.hash("pw")
    ticks = 0
    stop = False

    async def ticker() -> None:
        nonlocal ticks
        while not stop:
            ticks += 1
            await asyncio.sleep(0.005)

    t = asyncio.create_task(ticker())
    started = time.perf_counter()
    results = await asyncio.gather(*(p.verify(h, "pw") for _ in range(3)), p.burn("x"))
    elapsed = time.perf_counter() - started
    stop = True
    await t
    assert all(r.ok for r in results[:3])
    # the loop kept running while Argon2 worked (it takes tens of ms per verification)
    assert elapsed > 0.02 and ticks >= 3
