"""kit.metrics.Tally: one call counts in Prometheus and in the object that asked."""

from __future__ import annotations

from prometheus_client import REGISTRY

from postbus.kit.metrics import Tally, counter

TEST_COUNTER = counter("postbus_test_tally_total", "Tally test", ["a", "b"])


def value(a: str, b: str) -> float:
    return REGISTRY.get_sample_value("postbus_test_tally_total", {"a": a, "b": b}) or 0.0


def test_a_tally_counts_its_own_and_in_prometheus() -> None:
    before = value("x", "1")
    one, two = Tally(TEST_COUNTER), Tally(TEST_COUNTER)
    one.inc("x", "1")
    one.inc("x", "2", n=3)
    two.inc("x", "1")
    assert value("x", "1") == before + 2  # the process's total
    assert one.get("x", "1") == 1 and one.total() == 4  # this object's own
    assert one.by(0) == {"x": 4} and one.by(1) == {"1": 1, "2": 3}
    assert one.by(0, 1) == {("x", "1"): 1, ("x", "2"): 3}
    assert two.total() == 1
