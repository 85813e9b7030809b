"""The directory in SQL, lookups: resolve (RCPT TO, with its optional TTL cache), login and
send-as, on the administration of directory_sql_admin.py (``DirectorySql`` is both).
With the repository's layer modules the only place in mailbox-store that queries mail data.
Nothing is cached by default (see directory.py).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from sqlalchemy import bindparam, literal, select, union_all, update

from postbus.kit.logging import get_logger
from postbus.kit.metrics import counter
from postbus.mailbox_store.directory_rules import (
    POP3_POLICIES,
    Invalid,
    NotFound,
    Pop3Policy,
    _reply_for,
    base_local,
    fold_local,
    split_address,
)
from postbus.mailbox_store.directory_sql_admin import DirectoryAdmin, release_blobs
from postbus.mailbox_store.models import Account, Alias, AliasTarget, Domain
from postbus.mailbox_store.prepared import Prepared
from postbus.proto.directory import AuthReply, ResolveReply

__all__ = ["RESOLVE_CACHE", "RESOLVE_CACHE_MAX", "DirectoryAdmin", "DirectorySql",
           "release_blobs"]

log = get_logger(__name__)

_A = Account.__table__
_AL = Alias.__table__
_T = AliasTarget.__table__
_D = Domain.__table__

RESOLVE_CACHE = counter("postbus_directory_resolve_cache_total", "Resolve cache lookups",
                        ["result"])
RESOLVE_CACHE_MAX = 50_000  # entries; the whole cache is dropped when full

# a login's two lookups, prepared once (prepared.py): every IMAP, POP3 and SMTP login
_Q_DOMAIN_CASE = Prepared(select(_D.c.local_part_case_sensitive)
                          .where(_D.c.name == bindparam("p_name")))
_Q_LOGIN = Prepared(select(_A.c.id, _A.c.address, _A.c.password_hash, _A.c.enabled,
                           _A.c.pop3_policy, _A.c.pop3_expire_days)
                    .where(_A.c.address == bindparam("p_address")), named=True)


class DirectorySql(DirectoryAdmin):
    """Every directory operation on one ``async_sessionmaker``: the administration of
    ``DirectoryAdmin`` and the lookups the ``directory.*`` RPCs answer. Safe to share
    between tasks."""

    async def resolve(self, address: str) -> ResolveReply:
        """RCPT TO -> local / unknown / remote / disabled, through the optional TTL cache."""
        if self.cache_ttl_s <= 0:
            return await self._resolve(address)
        now = time.monotonic()
        hit = self._cache.get(address)
        if hit is not None and hit[0] > now:
            RESOLVE_CACHE.labels("hit").inc()
            return hit[1]
        RESOLVE_CACHE.labels("miss").inc()
        reply = await self._resolve(address)
        if len(self._cache) >= RESOLVE_CACHE_MAX:
            self._cache.clear()
        self._cache[address] = (now + self.cache_ttl_s, reply)
        return reply

    async def _resolve(self, address: str) -> ResolveReply:
        """RCPT TO -> local / unknown / remote / disabled (see proto ResolveReply).

        Precedence: the exact address (account, then alias), then its sub-address base
        (``alice+tag`` -> ``alice``), then the domain's catch-all. Two indexed queries on
        one connection (SQLAlchemy Core: the ORM cost four times as much per lookup).
        """
        lit = address.strip().strip("<>").rpartition("@")[2]
        if lit.startswith("[") and lit.endswith("]"):  # an address literal is never ours
            return ResolveReply(status="remote", domain=lit)  # (RFC 5321 §4.1.3)
        local, dn = split_address(address)
        async with self.engine.connect() as conn:
            d = (await conn.execute(select(_D.c.local_part_case_sensitive,
                                           _D.c.catch_all_account_id)
                                    .where(_D.c.name == dn))).first()
            if d is None:
                return ResolveReply(status="remote", domain=dn)
            first = fold_local(local, d.local_part_case_sensitive)
            cands = [f"{first}@{dn}"]
            base = base_local(first, self.separator)
            if base is not None:
                cands.append(f"{base}@{dn}")
            acc = (_A.c.id, _A.c.address, _A.c.enabled, _A.c.used_bytes, _A.c.quota_bytes)
            parts = [
                select(literal(0).label("kind"), _A.c.address.label("key"), *acc)
                .where(_A.c.address.in_(cands)),
                select(literal(1), _AL.c.address, *acc)
                .select_from(_AL.outerjoin(_T, _T.c.alias_id == _AL.c.id)
                             .outerjoin(_A, _A.c.id == _T.c.account_id))
                .where(_AL.c.address.in_(cands)),
            ]
            if d.catch_all_account_id is not None:
                parts.append(select(literal(2), literal(""), *acc)
                             .where(_A.c.id == d.catch_all_account_id))
            rows = (await conn.execute(union_all(*parts))).all()
        for cand in cands:
            accounts = [r for r in rows if r.kind == 0 and r.key == cand]
            if accounts:
                return _reply_for(accounts, dn)
            targets = [r for r in rows if r.kind == 1 and r.key == cand]
            if targets:
                live = sorted((r for r in targets if r.id is not None), key=lambda r: r.id)
                if not live:  # an alias whose targets were all deleted
                    return ResolveReply(status="unknown", domain=dn)
                return _reply_for(live, dn)
        catch_all = [r for r in rows if r.kind == 2]
        if catch_all:
            return _reply_for(catch_all, dn)
        return ResolveReply(status="unknown", domain=dn)

    async def authenticate(self, username: str, password: str, *,
                           with_send_as: bool = True,
                           gate: Callable[[str], Awaitable[bool]] | None = None) -> AuthReply:
        """A login by full address (domain case-insensitive). Never raises for bad input.
        ``with_send_as``: fill in the addresses it may send as (only SMTP needs them).
        ``gate`` is asked with the login's canonical spelling (the account's address, or
        the canonical form of an unknown one) before any password work; False answers
        ``throttled``."""
        canonical = username.strip().lower()
        try:
            local, dn = split_address(username)
            async with self.engine.connect() as conn:
                await conn.begin()
                d = await _Q_DOMAIN_CASE.first(conn, p_name=dn)
                canonical = f"{fold_local(local, bool(d[0]) if d else False)}@{dn}"
                acc = await _Q_LOGIN.first(conn, p_address=canonical)
        except Invalid:
            acc = None
        # a password this replica verified for this account within the cache's TTL is no
        # guess: it takes no unit of the throttle (three KV round trips a login), and an
        # attacker's failures do not lock out the user who knows it
        known = acc is not None and self.passwords.known_good(acc.password_hash, password,
                                                               acc.address)
        if (gate is not None and not known
                and not await gate(acc.address if acc is not None else canonical)):
            return AuthReply(ok=False, reason="throttled")  # no Argon2 work for a guesser
        if acc is None:
            await self.passwords.burn(password, username)
            return AuthReply(ok=False, reason="invalid")
        v = await self.passwords.verify(acc.password_hash, password, acc.address)
        if not v.ok:
            return AuthReply(ok=False, reason="invalid")
        if not acc.enabled:
            return AuthReply(ok=False, reason="disabled", account_id=acc.id, address=acc.address)
        if v.new_hash is not None:  # parameters changed since the hash was made: upgrade it
            async with self._write() as s:
                await s.execute(update(Account).where(Account.id == acc.id,
                                                      Account.password_hash == acc.password_hash)
                                .values(password_hash=v.new_hash))
            log.info("password rehashed", account=acc.address)
        policy: Pop3Policy = acc.pop3_policy if acc.pop3_policy in POP3_POLICIES else "client"
        return AuthReply(ok=True, account_id=acc.id, address=acc.address,
                         send_as=await self.send_as(acc.id) if with_send_as else [],
                         pop3_policy=policy,
                         pop3_expire_days=acc.pop3_expire_days)

    async def send_as(self, account_id: int) -> list[str]:
        """The account's own address, then every alias that delivers to it."""
        async with self.sm() as s:
            own = await s.scalar(select(Account.address).where(Account.id == account_id))
            if own is None:
                raise NotFound(f"account {account_id} does not exist")
            aliases = (await s.scalars(
                select(Alias.address).join(AliasTarget, AliasTarget.alias_id == Alias.id)
                .where(AliasTarget.account_id == account_id).order_by(Alias.address))).all()
        return [own, *aliases]
