"""Password hashing for accounts: Argon2id (RFC 9106) with argon2-cffi.

Hashing and verification are deliberately slow (tens of milliseconds), so the async helpers
run them in a thread and never on the event loop. No SQL, no NATS here.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from postbus.kit.expiring import ExpiringLRU
from postbus.kit.metrics import counter

CACHE = counter("postbus_auth_cache_total", "Password checks answered by the cache or not",
                ["result"])

# OWASP's Argon2id minimum (19 MiB, 2 passes, 1 lane): about 50-100 ms per login on a small
# machine. RFC 9106's 64 MiB / 4 lanes took 650 ms here, too slow for IMAP/POP3 clients that
# log in every few minutes. Hashes made with other parameters keep verifying and are
# upgraded on the next successful login (needs_rehash).
DEFAULT_HASHER = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1,
                                hash_len=32, salt_len=16, type=Type.ID)
# at most this many hashes at once: bounds memory (19 MiB each) and leaves cores for mail
MAX_CONCURRENT = 4


@dataclass(frozen=True)
class Verified:
    ok: bool
    new_hash: str | None = None  # set when ok and the stored hash should be replaced


class VerifyCache:
    """Outcomes of password checks, as Dovecot's auth_cache keeps them: a mail client logs in
    every few minutes (imaptest, 50 users: 15 logins a second, 23 ms of Argon2 each).

    An entry is keyed by an HMAC, under a key made at random for this process, of the login
    name, the stored hash and the password given: a changed password (a new stored hash),
    another password or another name never hits it, and no password or reusable digest of
    one is kept beyond the process's memory. Successes live ``ttl_s``, failures
    ``negative_ttl_s``; at most ``max_entries``, the oldest dropped first. ``ttl_s=0``
    turns the cache off."""

    def __init__(self, ttl_s: float = 3600.0, negative_ttl_s: float = 300.0,
                 max_entries: int = 100_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.negative_ttl_s = negative_ttl_s
        self._key = secrets.token_bytes(32)
        self._entries: ExpiringLRU[bytes, bool] = ExpiringLRU(max_entries, clock)

    def key(self, login: str, stored: str, password: str) -> bytes:
        msg = b"\0".join(x.encode("utf-8", "surrogatepass") for x in (login, stored, password))
        return hmac.new(self._key, msg, hashlib.sha256).digest()

    def get(self, key: bytes) -> bool | None:
        hit = self.peek(key)
        if self.ttl_s > 0:
            CACHE.labels("miss" if hit is None else "hit").inc()
        return hit

    def peek(self, key: bytes) -> bool | None:
        """The cached outcome, without counting a lookup."""
        return self._entries.get(key) if self.ttl_s > 0 else None

    def put(self, key: bytes, ok: bool) -> None:
        if self.ttl_s > 0:
            self._entries.put(key, ok, self.ttl_s if ok else self.negative_ttl_s)



class Passwords:
    """Argon2id hashing with one configured hasher (tests use a cheaper one), and a cache
    of verification outcomes (``VerifyCache``; pass ``cache=None`` for none)."""

    def __init__(self, hasher: PasswordHasher = DEFAULT_HASHER,
                 max_concurrent: int = MAX_CONCURRENT,
                 cache: VerifyCache | None = None) -> None:
        self.hasher = hasher
        self.cache = cache
        self._pool = ThreadPoolExecutor(max_workers=max_concurrent, thread_name_prefix="argon2")
        # a hash verified when the account does not exist, so a login for an unknown
        # address costs as much as one for a known address (no enumeration by timing)
        self._dummy: str | None = None
        self._running: dict[bytes, asyncio.Future[Verified]] = {}

    # ------------------------------------------------------------ sync (call from a thread)
    def hash_sync(self, password: str) -> str:
        return self.hasher.hash(password)

    def verify_sync(self, stored: str, password: str) -> Verified:
        try:
            self.hasher.verify(stored, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return Verified(False)
        if self.hasher.check_needs_rehash(stored):
            return Verified(True, self.hasher.hash(password))
        return Verified(True)

    def needs_rehash(self, stored: str) -> bool:
        try:
            return self.hasher.check_needs_rehash(stored)
        except InvalidHashError:
            return True

    # ------------------------------------------------------------ async (off the loop)
    async def hash(self, password: str) -> str:
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, self.hash_sync, password)

    def known_good(self, stored: str, password: str, login: str = "") -> bool:
        """True when this very check (login, stored hash, password) succeeded within the
        cache's TTL: whoever sends it has shown the password, so it is not a guess."""
        return self.cache is not None and self.cache.peek(
            self.cache.key(login, stored, password)) is True

    async def verify(self, stored: str, password: str, login: str = "") -> Verified:
        """Check ``password`` against ``stored``; a cached outcome for the same login, stored
        hash and password is answered without Argon2."""
        if self.cache is None:
            return await asyncio.get_running_loop().run_in_executor(
                self._pool, self.verify_sync, stored, password)
        key = self.cache.key(login, stored, password)
        if (hit := self.cache.get(key)) is not None:
            return Verified(hit)
        # one Argon2 run for the same check asked for at once (a client opening several
        # connections, imaptest's clients at start): the later ones wait for the first
        running = self._running.get(key)
        if running is not None:
            return await asyncio.shield(running)
        fut = asyncio.get_running_loop().run_in_executor(
            self._pool, self.verify_sync, stored, password)
        self._running[key] = fut
        try:
            v = await asyncio.shield(fut)
        finally:
            del self._running[key]
        if v.new_hash is None:  # an upgraded hash: not cached
            self.cache.put(key, v.ok)
        return v

    async def burn(self, password: str, login: str = "") -> None:
        """Spend the time of one verification (unknown user), always failing. Cached like a
        wrong password, per login name, so a repeated guess costs what it costs for a
        known account (no enumeration by timing either way)."""
        if self._dummy is None:
            self._dummy = await self.hash("postbus-no-such-user")
        await self.verify(self._dummy, password + "\x00", login)


def fast_hasher() -> PasswordHasher:
    """A cheap Argon2id for tests (still a real Argon2id hash)."""
    return PasswordHasher(time_cost=1, memory_cost=8, parallelism=1, hash_len=16, salt_len=8,
                          type=Type.ID)
