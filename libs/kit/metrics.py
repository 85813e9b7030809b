"""Prometheus metrics helpers: get-or-create, so a module can be imported twice in tests."""

from __future__ import annotations

from collections import Counter as Counts
from typing import Any, TypeVar

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.registry import CollectorRegistry

T = TypeVar("T", Counter, Gauge, Histogram)

_created: dict[str, Counter | Gauge | Histogram] = {}


def _get(kind: type[T], name: str, doc: str, labels: list[str] | tuple[str, ...] = (),
         registry: CollectorRegistry = REGISTRY, **kw: Any) -> T:
    found = _created.get(name)
    if found is not None:
        if not isinstance(found, kind):
            raise TypeError(f"metric {name} exists as a {type(found).__name__}")
        return found
    metric = kind(name, doc, list(labels), registry=registry, **kw)
    _created[name] = metric
    return metric


def counter(name: str, doc: str, labels: list[str] | tuple[str, ...] = ()) -> Counter:
    return _get(Counter, name, doc, labels)


def gauge(name: str, doc: str, labels: list[str] | tuple[str, ...] = ()) -> Gauge:
    return _get(Gauge, name, doc, labels)


LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


def histogram(name: str, doc: str, labels: list[str] | tuple[str, ...] = (),
              buckets: tuple[float, ...] = LATENCY_BUCKETS) -> Histogram:
    return _get(Histogram, name, doc, labels, buckets=buckets)


class Tally:
    """One call counts twice: in the Prometheus counter (the process's total, for /metrics)
    and here (what this object, one server or worker, counted: for its management API).
    Counting the two by hand in two places is how they drift apart."""

    def __init__(self, metric: Counter) -> None:
        self.metric = metric
        self.counts: Counts[tuple[str, ...]] = Counts()

    def inc(self, *labels: str, n: int = 1) -> None:
        (self.metric.labels(*labels) if labels else self.metric).inc(n)
        self.counts[labels] += n

    def total(self) -> int:
        return sum(self.counts.values())

    def get(self, *labels: str) -> int:
        return self.counts[labels]

    def by(self, *positions: int) -> dict[Any, int]:
        """Counts summed by the labels at ``positions`` (one: keyed by that label's value;
        several: by their tuple)."""
        out: Counts[Any] = Counts()
        for labels, n in self.counts.items():
            key = tuple(labels[i] for i in positions)
            out[key[0] if len(key) == 1 else key] += n
        return dict(out)
