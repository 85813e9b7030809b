"""Password hashing for accounts: Argon2id (RFC 9106) with argon2-cffi.

Hashing and verification are deliberately slow (tens of milliseconds), so the async helpers
run them in a thread and never on the event loop. No SQL, no NATS here.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

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


class Passwords:
    """Argon2id hashing with one configured hasher (tests use a cheaper one)."""

    def __init__(self, hasher: PasswordHasher = DEFAULT_HASHER,
                 max_concurrent: int = MAX_CONCURRENT) -> None:
        self.hasher = hasher
        self._pool = ThreadPoolExecutor(max_workers=max_concurrent, thread_name_prefix="argon2")
        # a hash verified when the account does not exist, so a login for an unknown
        # address costs as much as one for a known address (no enumeration by timing)
        self._dummy: str | None = None

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

    async def verify(self, stored: str, password: str) -> Verified:
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, self.verify_sync, stored, password)

    async def burn(self, password: str) -> None:
        """Spend the time of one verification (unknown user), always failing."""
        if self._dummy is None:
            self._dummy = await self.hash("postbus-no-such-user")
        await self.verify(self._dummy, password + "\x00")


def fast_hasher() -> PasswordHasher:
    """A cheap Argon2id for tests (still a real Argon2id hash)."""
    return PasswordHasher(time_cost=1, memory_cost=8, parallelism=1, hash_len=16, salt_len=8,
                          type=Type.ID)
