"""Directory contract: domains, accounts, aliases, resolve/authenticate/send-as, on real SQL
(SQLite always, PostgreSQL when POSTBUS_TEST_POSTGRES_URL is set), and the directory RPCs
over a real nats-server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import pytest_asyncio
from argon2 import PasswordHasher
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from store_dir_support import BACKENDS, open_db

from postbus.kit.bus import Bus, RemoteError
from postbus.mailbox_store.directory import (
    Conflict,
    Directory,
    Exists,
    Invalid,
    NotFound,
    base_local,
    normalize_domain,
    serve_directory,
    split_address,
)
from postbus.mailbox_store.models import Account, Blob, Mailbox, Message
from postbus.mailbox_store.passwords import Passwords, VerifyCache, fast_hasher
from postbus.mailbox_store.repository import Repository
from postbus.proto.directory import (
    DIRECTORY_AUTHENTICATE,
    DIRECTORY_RESOLVE,
    DIRECTORY_SEND_AS,
    AuthRequest,
    ResolveRequest,
    SendAsRequest,
)

Sm = async_sessionmaker[AsyncSession]


@pytest_asyncio.fixture(params=BACKENDS)
async def sm(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Sm]:
    async for maker in open_db(request.param, tmp_path):
        yield maker


@pytest.fixture
def d(sm: Sm) -> Directory:
    return Directory(sm, passwords=Passwords(fast_hasher()), repo=Repository(sm.kw["bind"]))


# ---------------------------------------------------------------- pure helpers
@pytest.mark.parametrize("raw,want", [
    ("Example.TEST", "example.test"), ("example.test.", "example.test"),
    ("bücher.example", "xn--bcher-kva.example"), ("XN--BCHER-KVA.example", "xn--bcher-kva.example"),
])
def test_normalize_domain(raw: str, want: str) -> None:
    assert normalize_domain(raw) == want


@pytest.mark.parametrize("raw", ["", "localhost", "a..b", "-a.test", "a_b.test", "[1.2.3.4]",
                                 "x" * 64 + ".test", "sp ace.test"])
def test_normalize_domain_rejects(raw: str) -> None:
    with pytest.raises(Invalid):
        normalize_domain(raw)


def test_split_address() -> None:
    assert split_address(" <Alice@Example.TEST> ") == ("Alice", "example.test")
    assert split_address('"a b"@x.test') == ('"a b"', "x.test")
    for bad in ["alice", "@x.test", "alice@", "a..b@x.test", ".a@x.test", "a b@x.test",
                "x" * 65 + "@x.test"]:
        with pytest.raises(Invalid):
            split_address(bad)
    assert base_local("alice+tag", "+") == "alice"
    assert base_local("alice+tag+more", "+") == "alice"
    assert base_local("alice", "+") is None and base_local("+tag", "+") is None


# ---------------------------------------------------------------- domains
async def test_domain_crud(d: Directory) -> None:
    info = await d.create_domain("Example.TEST")
    assert info.name == "example.test" and info.accounts == 0
    with pytest.raises(Exists):
        await d.create_domain("example.test")
    with pytest.raises(Invalid):
        await d.create_domain("no_dots")
    await d.create_domain("bücher.example")
    assert [x.name for x in await d.list_domains()] == ["example.test", "xn--bcher-kva.example"]
    await d.delete_domain("XN--bcher-kva.example")
    with pytest.raises(NotFound):
        await d.get_domain("bücher.example")


async def test_domain_delete_with_accounts_needs_force(d: Directory) -> None:
    await d.create_domain("example.test")
    await d.create_account("alice@example.test", "pw")
    await d.create_domain("other.test")
    await d.create_account("bob@other.test", "pw")
    await d.create_alias("post@other.test", ["bob@other.test"])
    await d.update_domain("other.test", catch_all="bob@other.test")
    with pytest.raises(Conflict):
        await d.delete_domain("other.test")
    await d.delete_domain("other.test", force=True)
    assert [a.address for a in await d.list_accounts()] == ["alice@example.test"]
    assert await d.list_aliases() == []
    assert (await d.resolve("bob@other.test")).status == "remote"


# ---------------------------------------------------------------- accounts
async def test_account_create_makes_mailboxes_and_rejects_duplicates(d: Directory, sm: Sm) -> None:
    with pytest.raises(NotFound, match="create the domain first"):
        await d.create_account("alice@example.test", "pw")
    await d.create_domain("example.test")
    a = await d.create_account("Alice@EXAMPLE.test", "pw", quota_bytes=1000)
    assert a.address == "alice@example.test" and a.quota_bytes == 1000 and a.enabled
    with pytest.raises(Exists):
        await d.create_account("ALICE@example.test", "other")
    with pytest.raises(Invalid):
        await d.create_account("bad address@example.test", "pw")
    with pytest.raises(Invalid):
        await d.create_account("bob@example.test", "")
    with pytest.raises(Invalid):
        await d.create_account("bob@example.test", "pw", pop3_policy="never")
    async with sm() as s:
        boxes = {m.name: m.special_use for m in (await s.scalars(
            select(Mailbox).where(Mailbox.account_id == a.id))).all()}
    assert boxes == {"INBOX": None, "Drafts": "\\Drafts", "Sent": "\\Sent", "Trash": "\\Trash",
                     "Junk": "\\Junk", "Archive": "\\Archive"}


async def test_account_update_fields(d: Directory) -> None:
    await d.create_domain("example.test")
    await d.create_account("alice@example.test", "pw")
    a = await d.update_account("alice@example.test", quota_bytes=5, pop3_policy="delete",
                               pop3_expire_days=30, enabled=False)
    assert (a.quota_bytes, a.pop3_policy, a.pop3_expire_days, a.enabled) == (5, "delete", 30, False)
    a = await d.update_account("alice@example.test", quota_bytes=None, enabled=True)
    assert a.quota_bytes is None and a.enabled and a.pop3_policy == "delete"
    with pytest.raises(Invalid):
        await d.update_account("alice@example.test", pop3_policy="x")
    with pytest.raises(NotFound):
        await d.update_account("nobody@example.test", enabled=False)


async def test_delete_account_releases_blob_references(d: Directory, sm: Sm) -> None:
    await d.create_domain("example.test")
    a = await d.create_account("alice@example.test", "pw")
    b = await d.create_account("bob@example.test", "pw")
    now = datetime.now(UTC)
    async with sm() as s, s.begin():
        s.add(Blob(key="blobs/shared", size=10, refcount=2))
        s.add(Blob(key="blobs/own", size=10, refcount=2))
        await s.flush()
        for acc, keys in ((a, ["blobs/shared", "blobs/own", "blobs/own"]), (b, ["blobs/shared"])):
            box = await s.scalar(select(Mailbox).where(Mailbox.account_id == acc.id,
                                                       Mailbox.name == "INBOX"))
            assert box is not None
            for uid, k in enumerate(keys, 1):
                s.add(Message(mailbox_id=box.id, uid=uid, modseq=uid, internaldate=now, size=10,
                              blob_key=k, summary="{}"))
    freed = await d.delete_account("alice@example.test")
    assert freed == ["blobs/own"]
    async with sm() as s:
        blobs = {x.key: (x.refcount, x.unreferenced_since is not None)
                 for x in (await s.scalars(select(Blob))).all()}
        assert blobs == {"blobs/shared": (1, False), "blobs/own": (0, True)}
        assert await s.scalar(select(Account).where(Account.id == a.id)) is None
        left = (await s.scalars(select(Message.blob_key))).all()
        assert left == ["blobs/shared"]


# ---------------------------------------------------------------- resolve
async def test_resolve_statuses(d: Directory) -> None:
    await d.create_domain("example.test")
    alice = await d.create_account("alice@example.test", "pw")
    bob = await d.create_account("bob@example.test", "pw")
    r = await d.resolve("Alice@Example.Test")
    assert r.status == "local" and r.domain == "example.test"
    assert [(x.account_id, x.address) for x in r.accounts] == [(alice.id, "alice@example.test")]
    assert (await d.resolve("carol@example.test")).status == "unknown"
    r = await d.resolve("someone@elsewhere.test")
    assert r.status == "remote" and r.domain == "elsewhere.test" and r.accounts == []
    await d.update_account("bob@example.test", enabled=False)
    r = await d.resolve("bob@example.test")
    assert r.status == "disabled" and r.accounts[0].account_id == bob.id
    with pytest.raises(Invalid):
        await d.resolve("not-an-address")
    r = await d.resolve("user@[192.0.2.1]")
    assert r.status == "remote" and r.domain == "[192.0.2.1]"


async def test_resolve_subaddress_alias_catch_all(d: Directory) -> None:
    await d.create_domain("example.test")
    alice = await d.create_account("alice@example.test", "pw")
    bob = await d.create_account("bob@example.test", "pw")
    # sub-addressing
    r = await d.resolve("alice+lists@example.test")
    assert r.status == "local" and r.accounts[0].account_id == alice.id
    # an explicit account with the separator wins over sub-addressing
    plus = await d.create_account("alice+x@example.test", "pw")
    assert (await d.resolve("alice+x@example.test")).accounts[0].account_id == plus.id
    # alias fan-out, and via sub-address of the alias
    await d.create_alias("team@example.test", ["alice@example.test", "BOB@example.test"])
    r = await d.resolve("Team+2024@example.test")
    assert r.status == "local"
    assert sorted(x.account_id for x in r.accounts) == sorted([alice.id, bob.id])
    with pytest.raises(Exists):
        await d.create_alias("alice@example.test", ["bob@example.test"])
    with pytest.raises(Exists):
        await d.create_account("team@example.test", "pw")
    with pytest.raises(Invalid):
        await d.create_alias("x@example.test", ["ghost@example.test"])
    # a disabled target drops out; all disabled -> disabled
    await d.update_account("bob@example.test", enabled=False)
    assert [x.account_id for x in (await d.resolve("team@example.test")).accounts] == [alice.id]
    await d.set_alias_targets("team@example.test", ["bob@example.test"])
    assert (await d.resolve("team@example.test")).status == "disabled"
    # catch-all
    assert (await d.resolve("whoever@example.test")).status == "unknown"
    await d.update_domain("example.test", catch_all="alice@example.test")
    r = await d.resolve("whoever@example.test")
    assert r.status == "local" and r.accounts[0].account_id == alice.id
    assert (await d.get_domain("example.test")).catch_all == "alice@example.test"
    await d.update_domain("example.test", catch_all=None)
    assert (await d.resolve("whoever@example.test")).status == "unknown"
    await d.create_domain("other.test")
    await d.create_account("zed@other.test", "pw")
    with pytest.raises(Invalid):
        await d.update_domain("example.test", catch_all="zed@other.test")
    await d.delete_alias("team@example.test")
    assert (await d.resolve("team@example.test")).status == "unknown"


async def test_case_sensitive_local_parts(d: Directory) -> None:
    await d.create_domain("strict.test", local_part_case_sensitive=True)
    big = await d.create_account("Alice@strict.test", "pw")
    small = await d.create_account("alice@strict.test", "pw")
    assert (await d.resolve("Alice@STRICT.test")).accounts[0].account_id == big.id
    assert (await d.resolve("alice@strict.test")).accounts[0].account_id == small.id
    assert (await d.resolve("ALICE@strict.test")).status == "unknown"
    with pytest.raises(Conflict):  # folding would merge two accounts
        await d.update_domain("strict.test", local_part_case_sensitive=False)
    await d.delete_account("alice@strict.test")
    await d.update_domain("strict.test", local_part_case_sensitive=False)
    r = await d.resolve("ALICE@strict.test")
    assert r.status == "local" and r.accounts[0].address == "alice@strict.test"


# ---------------------------------------------------------------- authenticate
async def test_authenticate(d: Directory) -> None:
    await d.create_domain("example.test")
    a = await d.create_account("alice@example.test", "s3cret", pop3_policy="keep")
    await d.create_alias("boss@example.test", ["alice@example.test"])
    await d.create_alias("all@example.test", ["alice@example.test"])
    r = await d.authenticate("alice@EXAMPLE.TEST", "s3cret")
    assert r.ok and r.account_id == a.id and r.address == "alice@example.test"
    assert r.send_as == ["alice@example.test", "all@example.test", "boss@example.test"]
    assert r.pop3_policy == "keep" and r.pop3_expire_days is None
    assert (await d.authenticate("Alice@example.test", "s3cret")).ok  # case-insensitive domain
    for user, pw in [("alice@example.test", "wrong"), ("nobody@example.test", "s3cret"),
                     ("alice", "s3cret"), ("", ""), ("alice@other.test", "s3cret")]:
        r = await d.authenticate(user, pw)
        assert not r.ok and r.reason == "invalid" and r.account_id is None
    await d.update_account("alice@example.test", password="n3w")
    assert not (await d.authenticate("alice@example.test", "s3cret")).ok
    assert (await d.authenticate("alice@example.test", "n3w")).ok
    await d.update_account("alice@example.test", enabled=False)
    r = await d.authenticate("alice@example.test", "n3w")
    assert not r.ok and r.reason == "disabled"
    assert (await d.send_as(a.id)) == ["alice@example.test", "all@example.test",
                                       "boss@example.test"]


async def test_rehash_on_login(sm: Sm) -> None:
    weak = Directory(sm, passwords=Passwords(fast_hasher()))
    await weak.create_domain("example.test")
    await weak.create_account("alice@example.test", "pw")
    async with sm() as s:
        before = await s.scalar(select(Account.password_hash))
    assert before is not None and "m=8," in before
    stronger = PasswordHasher(time_cost=2, memory_cost=1024, parallelism=1)
    d2 = Directory(sm, passwords=Passwords(stronger))
    assert not (await d2.authenticate("alice@example.test", "bad")).ok
    async with sm() as s:
        assert await s.scalar(select(Account.password_hash)) == before  # no rehash on failure
    assert (await d2.authenticate("alice@example.test", "pw")).ok
    async with sm() as s:
        after = await s.scalar(select(Account.password_hash))
    assert after is not None and "m=1024,t=2" in after
    assert (await d2.authenticate("alice@example.test", "pw")).ok
    assert (await weak.authenticate("alice@example.test", "pw")).ok  # still verifies


# ---------------------------------------------------------------- over the bus
async def test_directory_rpcs_over_nats(bus: Bus, tmp_path: Path) -> None:
    async for sm in open_db("sqlite", tmp_path):
        d = await serve_directory(bus, sm, passwords=Passwords(fast_hasher()))
        await d.create_domain("example.test")
        a = await d.create_account("alice@example.test", "pw")
        await d.create_alias("info@example.test", ["alice@example.test"])

        r = await bus.request(DIRECTORY_RESOLVE, ResolveRequest(address="info+x@Example.test"))
        assert r.status == "local" and r.accounts[0].account_id == a.id
        r = await bus.request(DIRECTORY_RESOLVE, ResolveRequest(address="x@remote.test"))
        assert r.status == "remote"
        for junk in ("nonsense", "a..b@example.test", "x@exa mple.test", "@", ""):
            r = await bus.request(DIRECTORY_RESOLVE, ResolveRequest(address=junk))
            assert r.status == "unknown" and r.accounts == []

        ok = await bus.request(DIRECTORY_AUTHENTICATE,
                               AuthRequest(username="alice@example.test", password="pw",
                                           service="smtp", client_ip="127.0.0.1"))
        assert ok.ok and ok.send_as == ["alice@example.test", "info@example.test"]
        ok = await bus.request(DIRECTORY_AUTHENTICATE,  # a reader needs no send-as list
                               AuthRequest(username="alice@example.test", password="pw",
                                           service="pop3", client_ip="127.0.0.1"))
        assert ok.ok and ok.account_id == a.id and ok.send_as == []
        bad = await bus.request(DIRECTORY_AUTHENTICATE,
                                AuthRequest(username="alice@example.test", password="no"))
        assert not bad.ok and bad.reason == "invalid"

        sa = await bus.request(DIRECTORY_SEND_AS, SendAsRequest(account_id=a.id))
        assert sa.addresses == ["alice@example.test", "info@example.test"]
        with pytest.raises(RemoteError) as ei:
            await bus.request(DIRECTORY_SEND_AS, SendAsRequest(account_id=999999))
        assert ei.value.code == "not_found"


async def test_optional_resolve_cache(sm: Sm) -> None:
    pw = Passwords(fast_hasher())
    cached = Directory(sm, passwords=pw, resolve_cache_ttl_s=60)
    other_replica = Directory(sm, passwords=pw)
    await cached.create_domain("example.test")
    await cached.create_account("alice@example.test", "pw")
    assert (await cached.resolve("alice@example.test")).status == "local"
    await other_replica.update_account("alice@example.test", enabled=False)
    # another replica's change shows after the TTL; the uncached directory sees it at once
    assert (await cached.resolve("alice@example.test")).status == "local"
    assert (await other_replica.resolve("alice@example.test")).status == "disabled"
    # this replica's own writes drop its cache
    await cached.create_account("bob@example.test", "pw")
    assert (await cached.resolve("alice@example.test")).status == "disabled"
    short = Directory(sm, passwords=pw, resolve_cache_ttl_s=0.05)
    assert (await short.resolve("carol@example.test")).status == "unknown"
    await other_replica.create_account("carol@example.test", "pw")
    await asyncio.sleep(0.06)
    assert (await short.resolve("carol@example.test")).status == "local"


async def test_login_throttle_shared_over_nats_kv(bus: Bus, tmp_path: Path) -> None:
    async for sm in open_db("sqlite", tmp_path):
        d = await serve_directory(bus, sm, passwords=Passwords(fast_hasher()),
                                  login_max_failures=3, login_window_s=60)
        await d.create_domain("example.test")
        await d.create_account("alice@example.test", "pw")

        async def login(pw: str, ip: str = "192.0.2.1", user: str = "alice@example.test") -> str:
            r = await bus.request(DIRECTORY_AUTHENTICATE,
                                  AuthRequest(username=user, password=pw, client_ip=ip))
            return "ok" if r.ok else str(r.reason)

        assert await login("bad") == "invalid"
        assert await login("pw") == "ok"  # a success clears the count
        assert [await login("bad") for _ in range(3)] == ["invalid"] * 3
        assert await login("pw") == "throttled"  # even the right password, from this IP
        assert await login("pw", ip="192.0.2.2") == "ok"
        assert await login("bad", user="ALICE@example.test") == "throttled"  # same user
        # a second replica (same bucket) sees the same count
        other = await serve_directory(bus, sm, passwords=Passwords(fast_hasher()),
                                      login_max_failures=3)
        assert other.throttle is not None
        key = other.throttle.key("alice@example.test", "192.0.2.1")
        assert await other.throttle.failures(key) == 3
        await other.throttle.reset(key)
        assert await login("pw") == "ok"
        # unknown users are counted too (guessing addresses costs the same)
        assert [await login("x", user="ghost@example.test") for _ in range(4)] == [
            "invalid", "invalid", "invalid", "throttled"]

        # issue 8.4: other spellings of one account share its allowance ...
        for spelling in ("<alice@example.test>", "Alice@EXAMPLE.test.", "alice@Example.Test"):
            assert await login("bad", ip="192.0.2.3", user=spelling) in ("invalid", "throttled")
        assert await login("pw", ip="192.0.2.3") == "throttled"
        # ... and parallel guesses cannot all slip in between a read and a write
        results = await asyncio.gather(*(login("bad", ip="192.0.2.4") for _ in range(40)))
        assert results.count("invalid") == 3 and results.count("throttled") == 37
        assert await login("pw", ip="192.0.2.4") == "throttled"


async def test_known_good_password_takes_no_throttle_unit(bus: Bus, tmp_path: Path) -> None:
    """A password verified for the account within the cache's TTL is no guess: it logs in
    while the (account, IP) is throttled and takes no unit; guesses stay throttled."""
    async for sm in open_db("sqlite", tmp_path):
        d = await serve_directory(bus, sm, passwords=Passwords(fast_hasher(),
                                                               cache=VerifyCache()),
                                  login_max_failures=3, login_window_s=60)
        await d.create_domain("example.test")
        await d.create_account("alice@example.test", "pw")
        assert d.throttle is not None
        key = d.throttle.key("alice@example.test", "192.0.2.1")

        async def login(pw: str) -> str:
            r = await bus.request(DIRECTORY_AUTHENTICATE, AuthRequest(
                username="alice@example.test", password=pw, client_ip="192.0.2.1"))
            return "ok" if r.ok else str(r.reason)

        assert await login("pw") == "ok"  # checked with Argon2, now cached
        assert [await login(f"bad{i}") for i in range(4)] == ["invalid"] * 3 + ["throttled"]
        assert await d.throttle.failures(key) == 3
        assert await login("pw") == "ok"
        assert await d.throttle.failures(key) == 3  # no unit taken, none given back
        assert await login("bad0") == "throttled"  # a cached failure is still a guess
        await d.update_account("alice@example.test", password="new")
        assert await login("new") == "throttled"  # a changed password is not known yet


async def test_resolve_says_when_an_account_is_full(d: Directory, sm: Sm) -> None:
    """SMTP refuses mail for a full mailbox at RCPT (452) instead of bouncing it later."""
    await d.create_domain("example.test")
    a = await d.create_account("alice@example.test", "pw", quota_bytes=100)
    assert not (await d.resolve("alice@example.test")).accounts[0].full
    async with sm() as s, s.begin():
        await s.execute(update(Account).where(Account.id == a.id).values(used_bytes=100))
    assert (await d.resolve("alice@example.test")).accounts[0].full
