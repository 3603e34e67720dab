"""Latency histograms per transaction name and type, and process metrics, as metricsets.

Fed on the transport's worker thread as transactions are encoded, so the request thread
pays nothing. Buckets are log-spaced, eight per doubling (each within ~4.5% of its
neighbour), which is plenty for p50/p95/p99; counts are deltas since the last collection.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, NamedTuple

_STEPS_PER_DOUBLING = 8
_MIN_MS = 0.001  # durations below 1 µs share the first bucket


def bucket_index(duration_ms: float) -> int:
    if duration_ms <= _MIN_MS:
        return 0
    return int(math.log2(duration_ms / _MIN_MS) * _STEPS_PER_DOUBLING) + 1


def bucket_value(index: int) -> float:
    """The representative duration (ms) of a bucket: the geometric middle of its bounds."""
    if index == 0:
        return _MIN_MS
    return _MIN_MS * 2 ** ((index - 0.5) / _STEPS_PER_DOUBLING)


def percentile(values: list[float], counts: list[int], q: float) -> float | None:
    """The q-th percentile (0-100) of a histogram given as parallel values/counts lists."""
    total = sum(counts)
    if not total:
        return None
    rank = q / 100.0 * total
    seen = 0
    for value, count in zip(values, counts, strict=True):
        seen += count
        if seen >= rank:
            return value
    return values[-1]


class MetricSet(NamedTuple):
    """Samples taken at one time; `samples` maps a name to ("gauge", value),
    ("counter", value) or ("histogram", unit, values, counts). The encoder writes it."""

    timestamp: int
    samples: dict[str, tuple[Any, ...]]
    transaction: tuple[str | None, str] | None = None  # (name, type) the samples are about


class LatencyMetrics:
    """Counts and latency histograms of finished transactions, by (name, type); the process
    samples are of process `pid` (the exporter process reports the app's), by default this."""

    def __init__(self, pid: int | None = None) -> None:
        self._histograms: dict[tuple[str | None, str], dict[int, int]] = {}
        self._pid = pid
        self._cpu = self._cpu_seconds()
        self._wall = time.monotonic()

    def record(self, name: str | None, transaction_type: str, duration_ms: float) -> None:
        counts = self._histograms.get((name, transaction_type))
        if counts is None:
            counts = self._histograms[(name, transaction_type)] = {}
        index = bucket_index(duration_ms)
        counts[index] = counts.get(index, 0) + 1

    def collect(self, timestamp_us: int | None = None) -> list[MetricSet]:
        """The metricsets since the last call (transaction histograms, then process)."""
        timestamp = timestamp_us if timestamp_us is not None else time.time_ns() // 1000
        histograms, self._histograms = self._histograms, {}
        sets = []
        for key, counts in histograms.items():
            indexes = sorted(counts)
            sets.append(MetricSet(timestamp, {
                "transaction.duration.histogram": (
                    "histogram", "ms", [bucket_value(i) for i in indexes],
                    [counts[i] for i in indexes]),
                "transaction.duration.count": ("counter", sum(counts.values())),
            }, key))
        sets.append(MetricSet(timestamp, self._process_samples()))
        return sets

    def _process_samples(self) -> dict[str, tuple[Any, ...]]:
        cpu, wall = self._cpu_seconds(), time.monotonic()
        elapsed = wall - self._wall
        share = (cpu - self._cpu) / elapsed / (os.cpu_count() or 1) if elapsed > 0 else 0.0
        self._cpu, self._wall = cpu, wall
        samples: dict[str, tuple[Any, ...]] = {
            "system.process.cpu.total.norm.pct": ("gauge", round(min(max(share, 0.0), 1.0), 6))
        }
        rss = _rss_bytes("self" if self._pid is None else str(self._pid))
        if rss is not None:
            samples["system.process.memory.rss.bytes"] = ("gauge", rss)
        return samples

    def _cpu_seconds(self) -> float:
        if self._pid is None:
            return time.process_time()
        try:  # utime and stime, fields 14 and 15, after the command name in parentheses
            with open(f"/proc/{self._pid}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return getattr(self, "_cpu", 0.0)  # gone: no change


def _rss_bytes(pid: str = "self") -> int | None:
    try:
        with open(f"/proc/{pid}/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None
