"""kit.counter_keys: what the shared counters are keyed by, and one key encoding for every
counter in NATS KV."""

from __future__ import annotations

import re

import pytest

from postbus.kit import counters
from postbus.kit.counter_keys import account_key, ip_key, kv_key

KEY = re.compile(r"[-/_=.a-zA-Z0-9]+")


@pytest.mark.parametrize("text", ["ip:192.0.2.1", "ip:2001:db8::1", "acct:bob@example.test",
                                  "alice@example.test|192.0.2.1", "", "x" * 192, "x" * 193,
                                  "ü" * 500, "a b\tc/d", "10.0.0.0/8"])
def test_any_text_is_a_valid_kv_key(text: str) -> None:
    assert KEY.fullmatch(kv_key(text))
    assert len(kv_key(text)) <= 256


def test_short_text_stays_readable_and_long_text_is_hashed() -> None:
    assert kv_key("ip:192.0.2.1") == "aXA6MTkyLjAuMi4x"  # base64url, as smtp-ingress wrote it
    assert kv_key("x" * 193).startswith("=") and len(kv_key("x" * 193)) == 65
    assert kv_key("x" * 193) != kv_key("x" * 194)
    assert kv_key("a") != kv_key("A")  # callers choose their own case folding


def test_login_throttle_keys_are_spelt_once_and_as_before() -> None:
    # smtp-ingress and pop3-access wrote these by hand; a rolling update keeps their counts
    assert ip_key("192.0.2.1") == "ip:192.0.2.1"
    assert ip_key("2001:db8::1") == "ip:2001:db8::1"
    assert account_key("Bob@Example.TEST") == "acct:bob@example.test"
    assert kv_key(ip_key("192.0.2.1")) == "aXA6MTkyLjAuMi4x"
    assert ip_key("acct") != account_key("acct")  # the two kinds cannot collide
    assert (counters.kv_key, counters.ip_key, counters.account_key) == (kv_key, ip_key, account_key)
