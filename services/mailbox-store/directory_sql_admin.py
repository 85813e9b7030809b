"""The directory in SQL, administration: domains, accounts and aliases (create, read, update,
delete) and ``DirectoryAdmin``, the base that owns the sessionmaker, the write transaction and
the canonical-address lookups. directory_sql.py builds the RCPT and login lookups on it.
With the repository's layer modules the only place in mailbox-store that queries mail data.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal

from sqlalchemy import case, delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from postbus.kit.logging import get_logger
from postbus.mailbox_store.db import IMMEDIATE
from postbus.mailbox_store.directory_rules import (
    AccountInfo,
    AliasInfo,
    Conflict,
    DomainInfo,
    Exists,
    Invalid,
    NotFound,
    _account_info,
    _check_pop3,
    fold_local,
    normalize_domain,
    split_address,
)
from postbus.mailbox_store.models import (
    Account,
    Alias,
    AliasTarget,
    Blob,
    Delivery,
    Domain,
    Expunged,
    Mailbox,
    Message,
    Subscription,
)
from postbus.mailbox_store.passwords import Passwords
from postbus.mailbox_store.repository import Repository
from postbus.proto.directory import ResolveReply

if TYPE_CHECKING:
    from postbus.mailbox_store.directory_rpc import LoginThrottle

log = get_logger(__name__)

_A = Account.__table__

_UNSET: object = object()


class DirectoryAdmin:
    """Directory administration on one ``async_sessionmaker``, and what every directory
    operation shares (``DirectorySql`` adds the lookups). Safe to share between tasks."""

    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession], *,
                 passwords: Passwords | None = None, subaddress_separator: str = "+",
                 repo: Repository | None = None, resolve_cache_ttl_s: float = 0.0) -> None:
        self.sm = sessionmaker
        # off by default: every replica reads SQL on each lookup, so changes apply at once.
        # With a TTL, another replica's change is seen after at most that long; this
        # replica's own writes clear the cache at once.
        self.cache_ttl_s = resolve_cache_ttl_s
        self._cache: dict[str, tuple[float, ResolveReply]] = {}
        engine = sessionmaker.kw.get("bind")
        if not isinstance(engine, AsyncEngine):
            raise TypeError("the sessionmaker must be bound to an AsyncEngine")
        self.engine = engine
        self.repo = repo
        self.throttle: LoginThrottle | None = None  # set by serve_directory
        self.passwords = passwords or Passwords()
        self.separator = subaddress_separator

    @contextlib.asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncSession]:
        """A write transaction; on SQLite it starts with BEGIN IMMEDIATE so a read followed
        by a write never fails to upgrade its lock when another writer got in between."""
        async with self.sm() as s, s.begin():
            await s.connection(execution_options={IMMEDIATE: True})
            yield s
        self._cache.clear()

    # ============================================================ domains
    async def create_domain(self, name: str, *, local_part_case_sensitive: bool = False) -> DomainInfo:
        dn = normalize_domain(name)
        async with self._write() as s:
            if await s.scalar(select(Domain.id).where(Domain.name == dn)) is not None:
                raise Exists(f"domain {dn} exists")
            s.add(Domain(name=dn, local_part_case_sensitive=local_part_case_sensitive))
            try:
                await s.flush()
            except IntegrityError as exc:  # a concurrent create won the race
                raise Exists(f"domain {dn} exists") from exc
        log.info("domain created", domain=dn)
        return await self.get_domain(dn)

    async def _domain(self, s: AsyncSession, name: str) -> Domain:
        dn = normalize_domain(name)
        d = await s.scalar(select(Domain).where(Domain.name == dn))
        if d is None:
            raise NotFound(f"domain {dn} does not exist")
        return d

    async def _domain_info(self, s: AsyncSession, d: Domain) -> DomainInfo:
        accounts = await s.scalar(select(func.count()).select_from(Account)
                                  .where(Account.domain_id == d.id)) or 0
        aliases = await s.scalar(select(func.count()).select_from(Alias)
                                 .where(Alias.domain_id == d.id)) or 0
        catch_all = None
        if d.catch_all_account_id is not None:
            catch_all = await s.scalar(select(Account.address)
                                       .where(Account.id == d.catch_all_account_id))
        return DomainInfo(d.name, d.local_part_case_sensitive, catch_all, accounts, aliases,
                          d.created_at)

    async def get_domain(self, name: str) -> DomainInfo:
        async with self.sm() as s:
            return await self._domain_info(s, await self._domain(s, name))

    async def list_domains(self) -> list[DomainInfo]:
        async with self.sm() as s:
            ds = (await s.scalars(select(Domain).order_by(Domain.name))).all()
            return [await self._domain_info(s, d) for d in ds]

    async def update_domain(self, name: str, *, catch_all: str | None | object = _UNSET,
                            local_part_case_sensitive: bool | None = None) -> DomainInfo:
        """``catch_all``: an account address of this domain, or None to remove it."""
        async with self._write() as s:
            d = await self._domain(s, name)
            if catch_all is not _UNSET:
                if catch_all is None or catch_all == "":
                    d.catch_all_account_id = None
                else:
                    acc = await self._find_account(s, str(catch_all))
                    if acc is None:
                        raise Invalid(f"catch-all account {catch_all} does not exist")
                    if acc.domain_id != d.id:
                        raise Invalid("the catch-all account must belong to the domain")
                    d.catch_all_account_id = acc.id
            if local_part_case_sensitive is not None and \
                    local_part_case_sensitive != d.local_part_case_sensitive:
                if not local_part_case_sensitive:
                    await self._fold_domain_addresses(s, d)
                d.local_part_case_sensitive = local_part_case_sensitive
            dn = d.name
        log.info("domain updated", domain=dn)
        return await self.get_domain(dn)

    async def _fold_domain_addresses(self, s: AsyncSession, d: Domain) -> None:
        """Going case-insensitive: lower-case every stored local part, refusing collisions."""
        for model in (Account, Alias):
            rows = (await s.execute(select(model.id, model.address)
                                    .where(model.domain_id == d.id))).all()
            folded = [(i, a.lower()) for i, a in rows]
            if len({a for _, a in folded}) != len(folded):
                raise Conflict("addresses that differ only in case exist; "
                               "the domain cannot become case-insensitive")
            for (i, new), (_, old) in zip(folded, rows, strict=True):
                if new != old:
                    await s.execute(update(model).where(model.id == i)
                                    .values(address=new))

    async def delete_domain(self, name: str, *, force: bool = False) -> list[str]:
        """Delete a domain; with accounts or aliases only when ``force`` (their mail too).
        Returns the blob keys whose refcount reached zero."""
        freed: list[str] = []
        async with self._write() as s:
            d = await self._domain(s, name)
            ids = (await s.scalars(select(Account.id).where(Account.domain_id == d.id))).all()
            n_alias = await s.scalar(select(func.count()).select_from(Alias)
                                     .where(Alias.domain_id == d.id)) or 0
            if (ids or n_alias) and not force:
                raise Conflict(f"domain {d.name} has {len(ids)} accounts and {n_alias} aliases; "
                               "delete them first or use force")
            d.catch_all_account_id = None
            await s.flush()
            for aid in ids:
                freed += await self._delete_account_rows(s, aid)
            alias_ids = select(Alias.id).where(Alias.domain_id == d.id).scalar_subquery()
            await s.execute(delete(AliasTarget).where(AliasTarget.alias_id.in_(alias_ids)))
            await s.execute(delete(Alias).where(Alias.domain_id == d.id))
            await s.execute(delete(Domain).where(Domain.id == d.id))
            dn = d.name
        log.info("domain deleted", domain=dn, accounts=len(ids), aliases=n_alias)
        return freed

    # ============================================================ accounts
    async def _canonical(self, s: AsyncSession, address: str) -> tuple[Domain | None, str]:
        """(domain row or None, canonical address)."""
        local, dn = split_address(address)
        d = await s.scalar(select(Domain).where(Domain.name == dn))
        cs = d.local_part_case_sensitive if d is not None else False
        return d, f"{fold_local(local, cs)}@{dn}"

    async def _find_account(self, s: AsyncSession, address: str) -> Account | None:
        _, canon = await self._canonical(s, address)
        return await s.scalar(select(Account).where(Account.address == canon))

    async def _new_address(self, s: AsyncSession, address: str,
                           kind: Literal["account", "alias"]) -> tuple[Domain, str]:
        """The domain and canonical spelling of a new account or alias: its domain must
        exist, and no account or alias may have the address already (RCPT finds either)."""
        d, canon = await self._canonical(s, address)
        if d is None:
            raise NotFound(f"domain {canon.rsplit('@', 1)[1]} does not exist; "
                           "create the domain first")
        same, other = (Account, Alias) if kind == "account" else (Alias, Account)
        if await s.scalar(select(same.id).where(same.address == canon)) is not None:
            raise Exists(f"{kind} {canon} exists")
        if await s.scalar(select(other.id).where(other.address == canon)) is not None:
            raise Exists(f"{canon} is an {'alias' if kind == 'account' else 'account'}")
        return d, canon

    async def _account(self, s: AsyncSession, address: str) -> Account:
        acc = await self._find_account(s, address)
        if acc is None:
            raise NotFound(f"account {address} does not exist")
        return acc

    async def create_account(self, address: str, password: str, *, quota_bytes: int | None = None,
                             enabled: bool = True, pop3_policy: str = "client",
                             pop3_expire_days: int | None = None) -> AccountInfo:
        if not password:
            raise Invalid("the password must not be empty")
        _check_pop3(pop3_policy, pop3_expire_days)
        if quota_bytes is not None and quota_bytes < 0:
            raise Invalid("quota_bytes must be >= 0")
        pw_hash = await self.passwords.hash(password)
        async with self._write() as s:
            d, canon = await self._new_address(s, address, "account")
            acc = Account(address=canon, domain_id=d.id, password_hash=pw_hash, enabled=enabled,
                          quota_bytes=quota_bytes, used_bytes=0, message_count=0,
                          pop3_policy=pop3_policy, pop3_expire_days=pop3_expire_days)
            s.add(acc)
            try:
                await s.flush()
            except IntegrityError as exc:
                raise Exists(f"account {canon} exists") from exc
            info = _account_info(acc, d.name)
        if self.repo is not None:  # INBOX and the special-use folders (else made lazily)
            await self.repo.ensure_defaults(info.id)
        log.info("account created", account=canon, account_id=info.id)
        return await self.get_account(canon)

    async def get_account(self, address: str) -> AccountInfo:
        async with self.sm() as s:
            acc = await self._account(s, address)
            dn = await s.scalar(select(Domain.name).where(Domain.id == acc.domain_id))
            return _account_info(acc, dn or "")

    async def get_account_by_id(self, account_id: int) -> AccountInfo:
        async with self.sm() as s:
            acc = await s.get(Account, account_id)
            if acc is None:
                raise NotFound(f"account {account_id} does not exist")
            dn = await s.scalar(select(Domain.name).where(Domain.id == acc.domain_id))
            return _account_info(acc, dn or "")

    async def list_accounts(self, domain: str | None = None, *, offset: int = 0,
                            limit: int = 1000) -> list[AccountInfo]:
        async with self.sm() as s:
            q = select(Account, Domain.name).join(Domain, Domain.id == Account.domain_id)
            if domain:
                q = q.where(Domain.name == normalize_domain(domain))
            rows = (await s.execute(q.order_by(Account.address).offset(offset).limit(limit))).all()
            return [_account_info(a, dn) for a, dn in rows]

    async def update_account(self, address: str, *, password: str | None = None,
                             enabled: bool | None = None,
                             quota_bytes: int | None | object = _UNSET,
                             pop3_policy: str | None = None,
                             pop3_expire_days: int | None | object = _UNSET) -> AccountInfo:
        pw_hash = None
        if password is not None:
            if not password:
                raise Invalid("the password must not be empty")
            pw_hash = await self.passwords.hash(password)
        async with self._write() as s:
            acc = await self._account(s, address)
            if pw_hash is not None:
                acc.password_hash = pw_hash
            if enabled is not None:
                acc.enabled = enabled
            if quota_bytes is not _UNSET:
                if quota_bytes is not None and int(quota_bytes) < 0:  # type: ignore[call-overload]
                    raise Invalid("quota_bytes must be >= 0")
                acc.quota_bytes = quota_bytes  # type: ignore[assignment]
            policy = pop3_policy if pop3_policy is not None else acc.pop3_policy
            days = acc.pop3_expire_days if pop3_expire_days is _UNSET else pop3_expire_days
            _check_pop3(policy, days)  # type: ignore[arg-type]
            acc.pop3_policy = policy
            acc.pop3_expire_days = days  # type: ignore[assignment]
            canon = acc.address
        changed = [k for k, v in (("password", password), ("enabled", enabled),
                                  ("pop3_policy", pop3_policy)) if v is not None]
        if quota_bytes is not _UNSET:
            changed.append("quota_bytes")
        if pop3_expire_days is not _UNSET:
            changed.append("pop3_expire_days")
        log.info("account updated", account=canon, changed=changed)
        return await self.get_account(canon)

    async def delete_account(self, address: str) -> list[str]:
        """Delete an account with its mailboxes and messages, decrementing blob refcounts.
        Returns the blob keys whose refcount reached zero (collected later by blob GC)."""
        async with self._write() as s:
            acc = await self._account(s, address)
            canon, aid = acc.address, acc.id
            freed = await self._delete_account_rows(s, aid)
        log.info("account deleted", account=canon, account_id=aid, unreferenced_blobs=len(freed))
        return freed

    async def _delete_account_rows(self, s: AsyncSession, aid: int) -> list[str]:
        # lock the account row first, as every repository write does, so a delivery in
        # flight either commits before (its message is counted here) or finds no account
        await s.execute(select(_A.c.id).where(_A.c.id == aid).with_for_update())
        mbox_ids = select(Mailbox.id).where(Mailbox.account_id == aid).scalar_subquery()
        refs = (await s.execute(
            select(Message.blob_key, func.count()).where(Message.mailbox_id.in_(mbox_ids))
            .group_by(Message.blob_key))).all()
        freed = await release_blobs(s, {k: int(n) for k, n in refs})
        await s.execute(delete(Message).where(Message.mailbox_id.in_(mbox_ids)))
        await s.execute(delete(Expunged).where(Expunged.mailbox_id.in_(mbox_ids)))
        await s.execute(delete(Mailbox).where(Mailbox.account_id == aid))
        await s.execute(delete(Subscription).where(Subscription.account_id == aid))
        await s.execute(delete(Delivery).where(Delivery.account_id == aid))
        await s.execute(delete(AliasTarget).where(AliasTarget.account_id == aid))
        await s.execute(update(Domain).where(Domain.catch_all_account_id == aid)
                        .values(catch_all_account_id=None))
        await s.execute(delete(Account).where(Account.id == aid))
        return freed

    # ============================================================ aliases
    async def _targets(self, s: AsyncSession, targets: Sequence[str]) -> list[int]:
        if not targets:
            raise Invalid("an alias needs at least one target account")
        ids: list[int] = []
        for t in targets:
            acc = await self._find_account(s, t)
            if acc is None:
                raise Invalid(f"target account {t} does not exist")
            if acc.id not in ids:
                ids.append(acc.id)
        return ids

    async def create_alias(self, address: str, targets: Sequence[str]) -> AliasInfo:
        async with self._write() as s:
            d, canon = await self._new_address(s, address, "alias")
            ids = await self._targets(s, targets)
            al = Alias(address=canon, domain_id=d.id)
            s.add(al)
            try:
                await s.flush()
            except IntegrityError as exc:
                raise Exists(f"alias {canon} exists") from exc
            s.add_all(AliasTarget(alias_id=al.id, account_id=i) for i in ids)
        log.info("alias created", alias=canon, targets=len(ids))
        return await self.get_alias(canon)

    async def _alias(self, s: AsyncSession, address: str) -> Alias:
        _, canon = await self._canonical(s, address)
        al = await s.scalar(select(Alias).where(Alias.address == canon))
        if al is None:
            raise NotFound(f"alias {canon} does not exist")
        return al

    async def _alias_info(self, s: AsyncSession, al: Alias) -> AliasInfo:
        targets = (await s.scalars(
            select(Account.address).join(AliasTarget, AliasTarget.account_id == Account.id)
            .where(AliasTarget.alias_id == al.id).order_by(Account.address))).all()
        return AliasInfo(al.address, list(targets), al.created_at)

    async def get_alias(self, address: str) -> AliasInfo:
        async with self.sm() as s:
            return await self._alias_info(s, await self._alias(s, address))

    async def list_aliases(self, domain: str | None = None) -> list[AliasInfo]:
        async with self.sm() as s:
            q = select(Alias)
            if domain:
                q = q.join(Domain, Domain.id == Alias.domain_id).where(
                    Domain.name == normalize_domain(domain))
            als = (await s.scalars(q.order_by(Alias.address))).all()
            return [await self._alias_info(s, a) for a in als]

    async def set_alias_targets(self, address: str, targets: Sequence[str]) -> AliasInfo:
        async with self._write() as s:
            al = await self._alias(s, address)
            ids = await self._targets(s, targets)
            await s.execute(delete(AliasTarget).where(AliasTarget.alias_id == al.id))
            s.add_all(AliasTarget(alias_id=al.id, account_id=i) for i in ids)
            canon = al.address
        log.info("alias updated", alias=canon, targets=len(ids))
        return await self.get_alias(canon)

    async def delete_alias(self, address: str) -> None:
        async with self._write() as s:
            al = await self._alias(s, address)
            canon = al.address
            await s.execute(delete(AliasTarget).where(AliasTarget.alias_id == al.id))
            await s.execute(delete(Alias).where(Alias.id == al.id))
        log.info("alias deleted", alias=canon)


# ---------------------------------------------------------------- shared SQL helpers
async def release_blobs(s: AsyncSession, refs: dict[str, int]) -> list[str]:
    """Drop ``n`` references from each blob; return the keys that reached zero (their
    ``unreferenced_since`` is set so blob GC collects them after the grace period)."""
    freed: list[str] = []
    now = datetime.now(UTC)
    for key, n in sorted(refs.items()):  # the repository's lock order: blobs by key
        await s.execute(update(Blob).where(Blob.key == key)
                        .values(refcount=case((Blob.refcount > n, Blob.refcount - n), else_=0)))
        rc = await s.scalar(select(Blob.refcount).where(Blob.key == key))
        if rc == 0:
            await s.execute(update(Blob).where(Blob.key == key, Blob.unreferenced_since.is_(None))
                            .values(unreferenced_since=now))
            freed.append(key)
    return freed
