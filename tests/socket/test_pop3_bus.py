"""pop3-access adapters on the real bus and S3: two replicas share the maildrop lock in
JetStream KV, a small in-process store/directory responder answers over bus.serve, bodies come
from SeaweedFS. The management router is served by the kit app."""

from __future__ import annotations

import asyncio
import poplib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest_asyncio

from postbus.kit.blob import BlobStore
from postbus.kit.bus import Bus
from postbus.kit.directory import DirectoryClient
from postbus.kit.mgmt import create_app
from postbus.kit.testing import ADMIN_TOKEN
from postbus.pop3_access import adapters, mgmt
from postbus.pop3_access.memory import MemoryDirectory, MemoryMaildrops, serve_on_bus
from postbus.pop3_access.server import Pop3Server
from postbus.pop3_access.session import Limits

USER, PASSWORD = "alice@example.test", "pw"
BODIES = [b"Subject: one\r\n\r\nfirst\r\n", b"Subject: two\n\n.second\n"]
PREFIX = b"Delivered-To: alice@example.test\r\n"


@dataclass
class Cluster:
    a: Pop3Server
    b: Pop3Server
    port_a: int
    port_b: int
    store: MemoryMaildrops
    locks: adapters.KvLocks
    auth_services: list[str]


@pytest_asyncio.fixture
async def cluster(bus: Bus, blobs: BlobStore) -> AsyncIterator[Cluster]:
    directory, store = MemoryDirectory(), MemoryMaildrops()
    acc = directory.add(USER, PASSWORD, 7, policy="client")
    for body in BODIES:
        await blobs.put(body)
        store.deliver(acc.account_id, body, PREFIX)
    blobs.cache = type(blobs.cache)(blobs.cache.max_bytes)  # cold cache: bodies come from S3
    await serve_on_bus(bus, directory, store)

    locks_bucket = await bus.kv_bucket("pop3-locks-test", ttl_s=3)
    auth_bucket = await bus.kv_bucket("pop3-auth-test", ttl_s=60)
    servers = []
    locks = None
    for replica in ("ra", "rb"):
        locks = adapters.KvLocks(locks_bucket, ttl_s=3, replica=replica)
        servers.append(Pop3Server(
            directory=DirectoryClient(bus, "pop3", errors=adapters.unavailable),
            maildrops=adapters.StoreMaildrops(bus, blobs),
            locks=locks, throttle=adapters.KvThrottle(auth_bucket, None),
            limits=Limits(auth_failure_delay_s=0.01, auth_failure_delay_max_s=0.02,
                          max_auth_failures_account=3),
            replica=replica))
    ports = [await s.listen("127.0.0.1", 0) for s in servers]
    assert locks is not None
    yield Cluster(servers[0], servers[1], ports[0], ports[1], store, locks, directory.services)
    for s in servers:
        await s.close()


async def test_two_replicas_share_the_lock_and_bodies_come_from_s3(cluster: Cluster) -> None:
    def clients() -> tuple[list[bytes], list[bytes], str, list[bytes]]:
        a = poplib.POP3("127.0.0.1", cluster.port_a, timeout=10)
        a.user(USER)
        a.pass_(PASSWORD)
        uidl_a = a.uidl()[1]
        retr = a.retr(2)[1]
        b = poplib.POP3("127.0.0.1", cluster.port_b, timeout=10)
        b.user(USER)
        try:
            b.pass_(PASSWORD)
            in_use = "no error"
        except poplib.error_proto as exc:
            in_use = str(exc)
        a.dele(1)
        a.quit()
        b.user(USER)
        b.pass_(PASSWORD)
        uidl_b = b.uidl()[1]
        b.quit()
        return uidl_a, retr, in_use, uidl_b

    uidl_a, retr, in_use, uidl_b = await asyncio.to_thread(clients)
    assert in_use == "b'-ERR [IN-USE] maildrop already locked by another session'"
    assert retr == [b"Delivered-To: alice@example.test", b"Subject: two", b"", b".second"]
    assert [u.split()[1] for u in uidl_a][1:] == [u.split()[1] for u in uidl_b]  # stable UIDL
    assert cluster.store.commits[0].delete_uids == [1]
    assert cluster.auth_services == ["pop3"] * 3
    assert await cluster.locks.holders() == []


async def test_lock_released_after_a_refresh_it_did_not_hear_back_from(bus: Bus) -> None:
    """release() cancels the refresh task; when that cancel lands after the update reached
    the server, the lease's revision is stale and the delete at that revision fails. The
    lock must be freed anyway (it still holds this lease's value), or the user's next POP3
    session is refused until the TTL: make test caught it once under load."""
    bucket = await bus.kv_bucket("pop3-locks-stale", ttl_s=30)
    locks = adapters.KvLocks(bucket, ttl_s=30, replica="r1")
    live = await locks.acquire(7, "s1")
    assert live is not None
    moved = await bucket.update(live.key, live.value, live.revision)  # the unheard refresh
    assert moved is not None and moved != live.revision
    await live.release()
    again = await locks.acquire(7, "s2")
    assert again is not None
    # another session's lock is never taken by a stale release
    stale = await locks.acquire(8, "s3")
    assert stale is not None
    await bucket.delete(stale.key)
    other = await locks.acquire(8, "s4")
    assert other is not None
    await stale.release()
    assert await locks.acquire(8, "s5") is None
    await other.release()
    await again.release()


async def test_lock_is_refreshed_while_held_and_expires_when_its_holder_dies(bus: Bus) -> None:
    bucket = await bus.kv_bucket("pop3-locks-expiry", ttl_s=1.2)
    locks = adapters.KvLocks(bucket, ttl_s=1.2, replica="r1")
    live = await locks.acquire(1, "s1")
    assert live is not None
    await asyncio.sleep(2.0)  # beyond the TTL: the refresh keeps it
    assert await locks.acquire(1, "s2") is None and not live.lost
    [holder] = await locks.holders()
    assert holder["key"] == "account-1" and holder["session"] == "s1"
    await live.release()
    again = await locks.acquire(1, "s3")
    assert again is not None
    again._task.cancel()  # the replica dies: nobody refreshes or releases
    for _ in range(50):
        await asyncio.sleep(0.2)
        taken = await locks.acquire(1, "s4")
        if taken is not None:
            await taken.release()
            break
    else:
        raise AssertionError("a dead holder's lock never expired")


async def test_failed_logins_are_counted_in_kv_across_replicas(cluster: Cluster) -> None:
    def attempt(port: int, password: str) -> str:
        p = poplib.POP3("127.0.0.1", port, timeout=10)
        p.user(USER)
        try:
            return p.pass_(password).decode()
        except poplib.error_proto as exc:
            return str(exc)
        finally:
            p.quit()

    results = [await asyncio.to_thread(attempt, port, "bad")
               for port in (cluster.port_a, cluster.port_b, cluster.port_a)]
    assert results == ["b'-ERR [AUTH] authentication failed'"] * 3
    # the account limit (3) is reached across both replicas: even the right password waits
    assert await asyncio.to_thread(attempt, cluster.port_b, PASSWORD) == (
        "b'-ERR [SYS/TEMP] too many failed logins; try again later'")


async def test_management_router(cluster: Cluster) -> None:
    app = create_app("pop3-access", checks={}, routers=[mgmt.router(cluster.a, cluster.locks.holders)],
                     token_source=lambda: ADMIN_TOKEN)

    def hold() -> poplib.POP3:
        p = poplib.POP3("127.0.0.1", cluster.port_a, timeout=10)
        p.user(USER)
        p.pass_(PASSWORD)
        return p

    p = await asyncio.to_thread(hold)
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://mgmt") as http:
        assert (await http.get("/api/v1/pop3/sessions")).status_code == 401
        [s] = (await http.get("/api/v1/pop3/sessions", headers=headers)).json()
        assert s["state"] == "transaction" and s["account"] == USER and s["messages"] == 2
        [lock] = (await http.get("/api/v1/pop3/locks", headers=headers)).json()
        assert lock["key"] == "account-7" and lock["replica"] == "ra"
        stats = (await http.get("/api/v1/pop3/stats", headers=headers)).json()
        assert stats["logins_ok"] == 1 and stats["active_sessions"] == 1
        r = await http.delete(f"/api/v1/pop3/sessions/{s['id']}", headers=headers)
        assert r.status_code == 204
        assert (await http.delete("/api/v1/pop3/sessions/nope", headers=headers)).status_code == 404
    for _ in range(100):
        if not cluster.a.sessions:
            break
        await asyncio.sleep(0.02)
    assert cluster.a.sessions == {}
    kicked = await asyncio.to_thread(p.file.readline)  # type: ignore[attr-defined]
    assert kicked == b"-ERR [SYS/TEMP] session closed by the administrator\r\n"
    await asyncio.to_thread(p.close)
    assert await cluster.locks.holders() == []  # the kicked session gave its lock back
