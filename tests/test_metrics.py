"""Latency histograms: bucket accuracy, percentiles, delta collection, schema-valid metricsets."""

from __future__ import annotations

import random

from beatlib.metrics import LatencyMetrics, bucket_index, bucket_value, percentile
from tests.events import encode_one


def test_bucket_value_is_within_five_percent():
    for duration in (0.002, 0.5, 1.0, 3.7, 42.0, 999.0, 12345.6, 3_600_000.0):
        value = bucket_value(bucket_index(duration))
        assert abs(value - duration) / duration < 0.05, (duration, value)


def test_buckets_are_monotonic():
    indexes = [bucket_index(d / 10) for d in range(1, 100_000, 7)]
    assert indexes == sorted(indexes)
    assert bucket_index(0) == 0 and bucket_index(-1) == 0


def test_percentiles_from_the_histogram_match_the_data():
    rng = random.Random(7)
    durations = [rng.lognormvariate(2, 0.8) for _ in range(20_000)]
    metrics = LatencyMetrics()
    for d in durations:
        metrics.record("GET /items", "request", d)
    sets = [encode_one(m) for m in metrics.collect()]
    histogram = sets[0]["samples"]["transaction.duration.histogram"]
    durations.sort()
    for q in (50, 95, 99):
        exact = durations[int(q / 100 * len(durations)) - 1]
        estimate = percentile(histogram["values"], histogram["counts"], q)
        assert abs(estimate - exact) / exact < 0.06, (q, exact, estimate)
    assert sets[0]["samples"]["transaction.duration.count"]["value"] == 20_000


def test_collect_is_per_name_and_type_and_resets():
    metrics = LatencyMetrics()
    metrics.record("a", "request", 1.0)
    metrics.record("a", "request", 2.0)
    metrics.record("a", "task", 3.0)
    metrics.record(None, "task", 3.0)
    sets = [encode_one(m) for m in metrics.collect(1_700_000_000_000_000)]
    keyed = {
        (m["transaction"].get("name"), m["transaction"]["type"]): m
        for m in sets
        if "transaction" in m
    }
    assert set(keyed) == {("a", "request"), ("a", "task"), (None, "task")}
    assert keyed[("a", "request")]["samples"]["transaction.duration.count"]["value"] == 2
    process = sets[-1]["samples"]
    assert 0.0 <= process["system.process.cpu.total.norm.pct"]["value"] <= 1.0
    assert process["system.process.memory.rss.bytes"]["value"] > 1_000_000
    assert [m for m in metrics.collect() if m.transaction is not None] == []
