"""pop3-access policy: CAPA by state, UPDATE by account policy, failure delays, loopback."""

from __future__ import annotations

import pytest

from postbus.pop3_access.policy import (
    CapaContext,
    capabilities,
    commit_request,
    expire_value,
    failure_delay,
    is_loopback,
)


def test_capabilities_before_login_depend_on_security() -> None:
    insecure = capabilities(CapaContext(False, secure=False, tls_active=False, tls_available=True,
                                        login_delay_s=0))
    assert "USER" not in insecure and "SASL PLAIN" not in insecure and "STLS" in insecure
    secure = capabilities(CapaContext(False, secure=True, tls_active=True, tls_available=True,
                                      login_delay_s=5))
    assert {"USER", "SASL PLAIN", "LOGIN-DELAY 5", "EXPIRE NEVER USER", "UTF8 USER"} <= set(secure)
    assert "STLS" not in secure


@pytest.mark.parametrize(("policy", "days", "value"), [
    ("client", None, "NEVER"), ("client", 30, "30"), ("keep", 7, "7"), ("delete", 30, "0"),
    ("client", -1, "0")])
def test_expire(policy: str, days: int | None, value: str) -> None:
    assert expire_value(policy, days) == value  # type: ignore[arg-type]
    caps = capabilities(CapaContext(True, True, True, True, 0, policy, days))  # type: ignore[arg-type]
    assert f"EXPIRE {value}" in caps and "USER" not in caps and "STLS" not in caps


def test_commit_by_policy() -> None:
    kw = {"account_id": 1, "mailbox_id": 2, "deleted": {3, 1}, "retrieved": {1, 2}}
    c = commit_request(policy="client", **kw)  # type: ignore[arg-type]
    assert c is not None and (c.mode, c.delete_uids, c.seen_uids) == ("delete", [1, 3], [2])
    k = commit_request(policy="keep", **kw)  # type: ignore[arg-type]
    assert k is not None and (k.mode, k.delete_uids, k.seen_uids) == ("keep", [1, 3], [1, 2])
    d = commit_request(policy="delete", **kw)  # type: ignore[arg-type]
    assert d is not None and (d.mode, d.delete_uids, d.seen_uids) == ("delete", [1, 2, 3], [])
    assert commit_request(account_id=1, mailbox_id=2, policy="client", deleted=set(),
                          retrieved=set()) is None
    only_seen = commit_request(account_id=1, mailbox_id=2, policy="client", deleted=set(),
                               retrieved={4})
    assert only_seen is not None and only_seen.delete_uids == [] and only_seen.seen_uids == [4]
    # EXPIRE 0 promises that retrieved mail is not kept: it goes at QUIT, whatever the policy
    for p in ("client", "keep"):
        z = commit_request(policy=p, expire_days=0, **kw)  # type: ignore[arg-type]
        assert z is not None and (z.mode, z.delete_uids, z.seen_uids) == ("delete", [1, 2, 3], [])
    longer = commit_request(policy="client", expire_days=7, **kw)  # type: ignore[arg-type]
    assert longer is not None and longer.delete_uids == [1, 3]  # the store expires it later


def test_failure_delay_grows_and_is_capped() -> None:
    assert [failure_delay(n, 1.0, 4.0) for n in (0, 1, 2, 3, 9)] == [1.0, 1.0, 2.0, 3.0, 4.0]


@pytest.mark.parametrize(("ip", "loop"), [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("192.0.2.1", False),
    ("::ffff:192.0.2.1", False), ("::ffff:127.0.0.1", True), ("fe80::1%eth0", False), ("garbage", False)])
def test_loopback(ip: str, loop: bool) -> None:
    assert is_loopback(ip) is loop
