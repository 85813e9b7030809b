"""Contract suites for the POP3 ports: the same tests against the in-memory implementation and
the JetStream KV / bus + S3 adapters (real nats-server, real SeaweedFS)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from postbus.kit.blob import BlobStore
from postbus.kit.bus import Bus
from postbus.pop3_access import adapters
from postbus.pop3_access.memory import MemoryLocks, MemoryMaildrops, MemoryThrottle
from postbus.pop3_access.ports import Locks, Throttle, Unavailable
from postbus.proto.store import Pop3Message


@pytest_asyncio.fixture(params=["memory", "kv"])
async def locks(request: pytest.FixtureRequest, bus: Bus) -> AsyncIterator[Locks]:
    if request.param == "memory":
        yield MemoryLocks()
        return
    yield adapters.KvLocks(await bus.kv_bucket("contract-locks", ttl_s=30), ttl_s=30, replica="r")


@pytest_asyncio.fixture(params=["memory", "kv"])
async def throttle(request: pytest.FixtureRequest, bus: Bus) -> AsyncIterator[Throttle]:
    if request.param == "memory":
        yield MemoryThrottle(login_delay_s=60)
        return
    yield adapters.KvThrottle(await bus.kv_bucket("contract-auth", ttl_s=60),
                              await bus.kv_bucket("contract-delay", ttl_s=60))


async def test_lock_contract(locks: Locks) -> None:
    a = await locks.acquire(1, "s1")
    assert a is not None and not a.lost
    assert await locks.acquire(1, "s2") is None
    other = await locks.acquire(2, "s3")  # another maildrop is independent
    assert other is not None
    await a.release()
    await a.release()  # idempotent
    b = await locks.acquire(1, "s4")
    assert b is not None
    await b.release()
    await other.release()


async def test_concurrent_acquires_have_one_winner(locks: Locks) -> None:
    leases = await asyncio.gather(*(locks.acquire(9, f"s{i}") for i in range(10)))
    winners = [x for x in leases if x is not None]
    assert len(winners) == 1
    await winners[0].release()


async def test_throttle_contract(throttle: Throttle) -> None:
    assert await throttle.failures("192.0.2.1", "Alice@Example.test") == (0, 0)
    for _ in range(3):
        await throttle.record_failure("192.0.2.1", "alice@example.test")
    await throttle.record_failure("2001:db8::1", "Alice@Example.test")
    assert await throttle.failures("192.0.2.1", "alice@example.test") == (3, 4)
    assert await throttle.failures("2001:db8::1", "ALICE@example.test") == (1, 4)
    await throttle.record_success("192.0.2.1", "alice@example.test")
    assert await throttle.failures("192.0.2.1", "alice@example.test") == (3, 0)
    assert await throttle.login_allowed(5)
    assert not await throttle.login_allowed(5)
    assert await throttle.login_allowed(6)


async def test_concurrent_failures_are_all_counted(throttle: Throttle) -> None:
    await asyncio.gather(*(throttle.record_failure("192.0.2.9", "bob") for _ in range(6)))
    assert await throttle.failures("192.0.2.9", "bob") == (6, 6)


async def test_store_maildrops_prefetch_shares_one_get_and_serves_from_cache(
        bus: Bus, blobs: BlobStore) -> None:
    bodies = [f"Subject: {i}\r\n\r\nbody {i}\r\n".encode() for i in range(5)]
    keys = [await blobs.put(b) for b in bodies]
    blobs.cache = type(blobs.cache)(blobs.cache.max_bytes)  # cold
    drops = adapters.StoreMaildrops(bus, blobs)
    msgs = [Pop3Message(uid=i + 1, uidl=str(i), size=len(b), blob_key=k)
            for i, (b, k) in enumerate(zip(bodies, keys, strict=True))]
    gets = 0
    real_get = blobs.get

    async def counting_get(key: str) -> bytes:
        nonlocal gets
        gets += 1
        return await real_get(key)

    blobs.get = counting_get  # type: ignore[method-assign]
    drops.prefetch(msgs)
    drops.prefetch(msgs)  # already in flight: no second GET
    got = await asyncio.gather(*(drops.blob(m) for m in msgs))
    assert got == bodies and gets == 5
    assert await drops.blob(msgs[0]) == bodies[0] and gets == 5  # LRU hit
    missing = Pop3Message(uid=9, uidl="9", size=1,
                          blob_key="blobs/" + hashlib.sha256(b"never stored").hexdigest())
    with pytest.raises(Unavailable):
        await drops.blob(missing)


async def test_memory_maildrops_modes() -> None:
    store = MemoryMaildrops()
    for i in range(3):
        store.deliver(1, f"m{i}\n".encode())
    drop = await store.open(1)
    assert [m.size for m in drop.messages] == [4, 4, 4]  # CRLF octets of "mN\n"
    from postbus.proto.store import Pop3CommitRequest

    await store.commit(Pop3CommitRequest(account_id=1, mailbox_id=drop.mailbox_id,
                                         delete_uids=[1], mode="keep", seen_uids=[1, 2]))
    await store.commit(Pop3CommitRequest(account_id=1, mailbox_id=drop.mailbox_id,
                                         delete_uids=[3], mode="delete"))
    assert [m.uid for m in (await store.open(1)).messages] == [2]
    assert [(m.uid, m.hidden, m.seen) for m in store.mailbox(1).messages] == [
        (1, True, True), (2, False, True)]
