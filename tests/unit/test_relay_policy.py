"""Relay policy: transport map, MX ordering (RFC 5321 §5.1, RFC 7505), retry schedule,
reply classes, DSN suppression."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postbus.relay import policy
from postbus.relay.policy import Expired, Hop, MxRecord, NextAttempt, NullMx


def test_transport_map_parsing_and_lookup() -> None:
    t = policy.parse_transport_map(
        "example.net=127.0.0.1:2626, .sub.example=[::1]:2727 smart.example=relay.example,"
        "*=10.0.0.1:587")
    assert t["example.net"] == Hop("127.0.0.1", 2626)
    assert t[".sub.example"] == Hop("::1", 2727)
    assert t["smart.example"] == Hop("relay.example", 25)
    assert policy.transport_for("EXAMPLE.NET.", t) == Hop("127.0.0.1", 2626)
    assert policy.transport_for("a.b.sub.example", t) == Hop("::1", 2727)
    assert policy.transport_for("other.org", t) == Hop("10.0.0.1", 587)
    assert policy.transport_for("other.org", {}) is None
    assert policy.parse_transport_map("") == {}


@pytest.mark.parametrize("bad", ["example.net", "=1.2.3.4", "x=", "x=host:", "x=a:b:c:d:1"])
def test_transport_map_rejects_malformed(bad: str) -> None:
    if bad == "x=a:b:c:d:1":  # a bare IPv6 literal is accepted as a host
        assert policy.parse_transport_map(bad)["x"].port == 25
        return
    with pytest.raises(ValueError):
        policy.parse_transport_map(bad)


def test_mx_ordering_by_preference_with_shuffled_ties() -> None:
    recs = [MxRecord(20, "b"), MxRecord(10, "a1"), MxRecord(10, "a2"), MxRecord(30, "c"),
            MxRecord(10, "A1")]
    seen_first: set[str] = set()
    for seed in range(50):
        out = policy.order_mx(recs, random.Random(seed))
        assert not isinstance(out, NullMx)
        names = [r.exchange for r in out]
        assert sorted(names[:2]) == ["a1", "a2"] or sorted(n.lower() for n in names[:2]) == ["a1", "a2"]
        assert names[2:] == ["b", "c"]
        assert len(names) == 4  # A1 and a1 are the same host
        seen_first.add(names[0].lower())
    assert seen_first == {"a1", "a2"}  # equal preferences are load-balanced


def test_null_mx() -> None:
    assert isinstance(policy.order_mx([MxRecord(0, "")]), NullMx)
    assert isinstance(policy.order_mx([MxRecord(0, ".")]), NullMx)
    # a root exchange beside real ones is ignored, not a null MX (RFC 7505 §3)
    out = policy.order_mx([MxRecord(0, ""), MxRecord(10, "mx")])
    assert not isinstance(out, NullMx) and [r.exchange for r in out] == ["mx"]
    assert policy.order_mx([]) == []


def test_schedule_parsing() -> None:
    assert policy.parse_schedule("1m,5m,15m,30m,1h,2h,4h") == (60, 300, 900, 1800, 3600, 7200, 14400)
    assert policy.parse_schedule("0.5, 2s 1d") == (0.5, 2, 86400)
    for bad in ("", "x", "1w", "0", "-1"):
        with pytest.raises(ValueError):
            policy.parse_schedule(bad)


def test_retry_delay_steps_then_repeats_the_last() -> None:
    s = (60, 300, 900)
    assert [policy.retry_delay(n, s) for n in range(0, 6)] == [0, 60, 300, 900, 900, 900]


def test_after_deferral_schedules_then_expires_at_the_deadline() -> None:
    q = datetime(2026, 1, 1, tzinfo=UTC)
    s = (60.0, 3600.0)
    got = policy.after_deferral(1, q, q + timedelta(seconds=1), schedule=s, max_age_s=600)
    assert got == NextAttempt(q + timedelta(seconds=61))
    # the next step would pass the deadline: the last attempt is at the deadline
    got = policy.after_deferral(2, q, q + timedelta(seconds=100), schedule=s, max_age_s=600)
    assert got == NextAttempt(q + timedelta(seconds=600))
    assert policy.after_deferral(3, q, q + timedelta(seconds=600), schedule=s,
                                 max_age_s=600) == Expired()


@pytest.mark.parametrize(("code", "outcome"), [
    (250, "relayed"), (251, "relayed"), (421, "deferred"), (450, "deferred"),
    (550, "failed"), (554, "failed"), (0, "deferred"), (354, "deferred"), (600, "deferred"),
])
def test_classify(code: int, outcome: str) -> None:
    assert policy.classify(code) == outcome


def test_group_by_domain() -> None:
    got = policy.group_by_domain(["a@X.net", "b@x.net", "c@y.org", "A@x.net"])
    assert got == {"x.net": ["a@X.net", "b@x.net"], "y.org": ["c@y.org"]}


def test_dsn_suppression() -> None:
    assert policy.wants_failure_dsn("bob@x", False, [])
    assert policy.wants_failure_dsn("bob@x", False, ["FAILURE", "DELAY"])
    assert not policy.wants_failure_dsn("bob@x", False, ["NEVER"])
    assert not policy.wants_failure_dsn("bob@x", False, ["SUCCESS"])
    assert not policy.wants_failure_dsn("", False, [])
    assert not policy.wants_failure_dsn("<>", False, [])
    assert not policy.wants_failure_dsn("bob@x", True, [])
    assert policy.wants_delay_dsn("bob@x", False, ["DELAY"])
    assert not policy.wants_delay_dsn("bob@x", False, [])
    assert policy.wants_success_dsn("bob@x", False, ["SUCCESS", "FAILURE"])
    assert not policy.wants_success_dsn("", False, ["SUCCESS"])


def test_names_on_the_bus() -> None:
    assert policy.kv_key("Q1.a b*") == "Q1_a_b_"
    assert policy.subject_token("a.b>c") == "a_b_c"
    assert policy.kv_key("") == "_"


@given(st.text(max_size=200))
def test_parsers_raise_only_value_error(text: str) -> None:
    for parse in (policy.parse_transport_map, policy.parse_schedule):
        try:
            parse(text)
        except ValueError:
            pass


@given(st.lists(st.tuples(st.integers(0, 65535), st.sampled_from(["a", "b", "c", "", "."])),
                max_size=8), st.integers(0, 1000))
def test_mx_order_is_sorted_and_unique(recs: list[tuple[int, str]], seed: int) -> None:
    out = policy.order_mx([MxRecord(p, x) for p, x in recs], random.Random(seed))
    if isinstance(out, NullMx):
        assert len(recs) == 1 and recs[0][0] == 0
        return
    prefs = [r.preference for r in out]
    names = [r.exchange for r in out]
    assert len(set(names)) == len(names) and "" not in names and "." not in names
    assert prefs == sorted(prefs)  # a host listed twice keeps its best preference
    assert set(names) == {x for _, x in recs if x not in ("", ".")}
