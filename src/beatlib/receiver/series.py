"""Time series and distributions for the dashboard's charts: plain functions of a connection
returning dicts and lists (µs timestamps, ms durations), each on an index of
`schema.SCHEMA`. Percentiles are nearest rank, as in
`queries`; rates are per minute over the time a bucket (or the data) actually covers.
"""

from __future__ import annotations

import bisect
import math
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

# Chart windows: label -> seconds.
WINDOWS: dict[str, int] = {
    "15m": 15 * 60, "1h": 3600, "6h": 6 * 3600, "24h": 86400, "7d": 7 * 86400,
}
DEFAULT_WINDOW = "1h"
# Bucket sizes (s) a window may be cut in: the smallest that gives at most MAX_BUCKETS.
STEPS = (10, 30, 60, 5 * 60, 10 * 60, 30 * 60, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400)
MAX_BUCKETS = 60
# Series beyond this many (span types, dependencies) are added up as "other".
MAX_KEYS = 8
OTHER = "other"

# Same rule as queries.transaction_groups: the outcome, else an HTTP result's class.
_OUTCOME = """CASE WHEN outcome IN ('success', 'failure') THEN outcome
                   WHEN result LIKE 'HTTP 5%' THEN 'failure'
                   WHEN result LIKE 'HTTP %' THEN 'success' END"""


@dataclass(frozen=True)
class Buckets:
    """A window cut into equal buckets aligned on multiples of `step` since the epoch (the
    first starts at or before `since`, so the window is at most one step longer than asked);
    the last one ends after `until` (now), which it covers only in part."""

    window: str
    step: int       # µs
    first: int      # µs, start of the first bucket
    count: int
    until: int      # µs, the end of the window (now)

    @property
    def since(self) -> int:
        return self.first

    @property
    def end(self) -> int:
        return self.first + self.count * self.step

    def starts(self) -> list[int]:
        return [self.first + i * self.step for i in range(self.count)]

    def seconds(self, index: int) -> float:
        """How much of bucket `index` lies in the window (the last one: up to now)."""
        start = self.first + index * self.step
        return max(min(start + self.step, self.until) - start, 0) / 1e6


def step_for(seconds: float, max_buckets: int = MAX_BUCKETS) -> int:
    """The bucket size (s) for a window of `seconds`: the smallest of STEPS giving at most
    `max_buckets` buckets (the largest step for longer windows)."""
    for step in STEPS:
        if seconds / step <= max_buckets:
            return step
    return STEPS[-1]


def bucketing(window: str = DEFAULT_WINDOW, now_us: int | None = None) -> Buckets:
    """The buckets of `window` (one of WINDOWS; anything else is the default) ending now."""
    if window not in WINDOWS:
        window = DEFAULT_WINDOW
    now = _now_us() if now_us is None else now_us
    step = step_for(WINDOWS[window]) * 1_000_000
    first = (now - WINDOWS[window] * 1_000_000) // step * step
    return Buckets(window, step, first, (now - first) // step + 1, now)


def rate_per_minute(count: int, first_us: int | None, last_us: int | None) -> float | None:
    """`count` events per minute over the time they cover (first to last, at least 1 s):
    745 transactions in 5 s are 8,940/min, whatever the window. None without events."""
    if not count or first_us is None or last_us is None:
        return None
    return count / (max(last_us - first_us, 1_000_000) / 60e6)


def transaction_series(
    conn: sqlite3.Connection, service: str, window: str = DEFAULT_WINDOW,
    name: str | None = None, now_us: int | None = None,
) -> dict[str, Any]:
    """Latency, throughput and error rate of `service` (or of its transactions named `name`)
    per bucket: every bucket of the window, in order, with `start` (µs), `count`, `tpm`
    (per minute over the part of the bucket inside the window), `avg`/`p50`/`p95`/`p99` (ms,
    None when empty), `failures`, `with_outcome` and `error_rate` (failures over those with
    a known outcome; None when none has one). The summary: `count`, `tpm` over the time the
    data covers (`first` to `last`), `error_rate`."""
    return transaction_overview(conn, service, window, name, now_us)["series"]


def transaction_overview(
    conn: sqlite3.Connection, service: str, window: str = DEFAULT_WINDOW,
    name: str | None = None, now_us: int | None = None,
) -> dict[str, Any]:
    """What a page shows of the transactions of `service` (or of those named `name`) in the
    window, from one pass over their rows: `series` (as `transaction_series`),
    `distribution` (as `distribution`) and, without `name`, `groups`: by name and type,
    as `queries.transaction_groups` (count, avg, total, p50/p95/p99, failures,
    with_outcome, error_rate, first, last, tpm over the time the service's data covers),
    over the window's buckets, most total time first."""
    b = bucketing(window, now_us)
    where, params = "service = ?", [service]
    if name is not None:
        where += " AND name = ?"
        params.append(name)
    # The rows themselves, bucketed and ranked here: at 50,000 rows this is several times
    # faster than SQLite's window functions (which sort twice), and exact all the same.
    cursor = conn.cursor()
    cursor.row_factory = None
    cursor.execute(f"""
        SELECT timestamp, duration, {_OUTCOME}, {"name, type" if name is None else "0, 0"}
        FROM transactions
        WHERE {where} AND timestamp >= ? AND timestamp < ?""", (*params, b.first, b.end))
    durations: list[list[float]] = [[] for _ in range(b.count)]
    failures = [0] * b.count
    known = [0] * b.count
    groups: dict[tuple[str, str], _Group] = {}
    first = last = None
    for timestamp, duration, outcome, tx_name, tx_type in cursor:
        i = int(timestamp - b.first) // b.step
        durations[i].append(duration)
        group = groups.get((tx_name, tx_type))
        if group is None:
            group = groups[tx_name, tx_type] = _Group(timestamp)
        group.durations.append(duration)
        if outcome is not None:
            known[i] += 1
            group.known += 1
            if outcome == "failure":
                failures[i] += 1
                group.failures += 1
        if timestamp < group.first:
            group.first = timestamp
        if timestamp > group.last:
            group.last = timestamp
    buckets = []
    for i, start in enumerate(b.starts()):
        values = sorted(durations[i])
        count = len(values)
        buckets.append({
            "start": start, "count": count,
            "tpm": count / max(b.seconds(i), 1.0) * 60,
            "avg": sum(values) / count if count else None,
            **{f"p{p}": nearest_rank(values, p) for p in (50, 95, 99)},
            "failures": failures[i], "with_outcome": known[i],
            "error_rate": failures[i] / known[i] if known[i] else None,
        })
    count = sum(len(d) for d in durations)
    if groups:
        first = min(g.first for g in groups.values())
        last = max(g.last for g in groups.values())
    series = {"window": b.window, "step": b.step // 1_000_000, "since": b.since,
              "until": b.until, "buckets": buckets, "count": count, "first": first,
              "last": last, "tpm": rate_per_minute(count, first, last),
              "error_rate": sum(failures) / sum(known) if sum(known) else None}
    everything = sorted(d for g in groups.values() for d in g.durations)
    out: dict[str, Any] = {"series": series, "distribution": _distribution(b, everything)}
    if name is None:
        minutes = max((last or 0) - (first or 0), 1_000_000) / 60e6
        out["groups"] = sorted((g.summary(n, t, minutes) for (n, t), g in groups.items()),
                               key=lambda g: -g["total"])
    return out


class _Group:
    """The transactions of one name and type, as the pass over them goes."""

    __slots__ = ("durations", "failures", "known", "first", "last")

    def __init__(self, timestamp: int) -> None:
        self.durations: list[float] = []
        self.failures = self.known = 0
        self.first = self.last = timestamp

    def summary(self, name: str, kind: str, minutes: float) -> dict[str, Any]:
        values = sorted(self.durations)
        total = sum(values)
        return {"name": name, "type": kind, "count": len(values), "avg": total / len(values),
                "total": total, **{f"p{p}": nearest_rank(values, p) for p in (50, 95, 99)},
                "failures": self.failures, "with_outcome": self.known, "first": self.first,
                "last": self.last, "tpm": len(values) / minutes,
                "error_rate": self.failures / self.known if self.known else None}


def nearest_rank(ordered: list[float], p: int) -> float | None:
    """The smallest value with at least p% of `ordered` (ascending) at or below it."""
    return ordered[(len(ordered) * p + 99) // 100 - 1] if ordered else None


# Renard series: log-spaced, round-looking bounds (ms). Fewer per decade for wider ranges.
_MANTISSAS = ((1, 1.25, 1.6, 2, 2.5, 3.15, 4, 5, 6.3, 8), (1, 1.6, 2.5, 4, 6.3), (1, 2, 5))
_SMALLEST = 0.001  # ms; anything shorter (0, negative) falls in the first bucket


def log_bounds(low: float, high: float, max_buckets: int = 40) -> list[float]:
    """Bucket bounds from the largest at or below `low` to the first above `high`, log
    spaced (10, 5 or 3 per decade, whichever fits in `max_buckets`)."""
    low, high = max(low, _SMALLEST), max(high, low, _SMALLEST)
    bottom, top = math.floor(math.log10(low)), math.floor(math.log10(high)) + 1
    bounds: list[float] = []
    for mantissas in _MANTISSAS:
        bounds = [round(m * 10.0 ** e, 12) for e in range(bottom, top + 1) for m in mantissas]
        start = bisect.bisect_right(bounds, low) - 1
        stop = bisect.bisect_right(bounds, high) + 1
        bounds = bounds[start:stop]
        if len(bounds) - 1 <= max_buckets:
            break
    return bounds


def distribution(
    conn: sqlite3.Connection, service: str, name: str, window: str = DEFAULT_WINDOW,
    now_us: int | None = None,
) -> dict[str, Any]:
    """The latency distribution of transactions `name` of `service` in the window: log
    spaced `buckets` [{low, high, count}] (ms, low inclusive, high exclusive; the first
    starts at 0 when a duration is below its bound) covering every duration, plus `count`
    and nearest-rank `p50`/`p95`/`p99`. `samples()` lists a bucket's transactions."""
    b = bucketing(window, now_us)
    durations = sorted(row[0] for row in conn.execute(
        "SELECT duration FROM transactions WHERE service = ? AND name = ? "
        "AND timestamp >= ? AND timestamp < ?", (service, name, b.first, b.end)))
    return _distribution(b, durations)


def _distribution(b: Buckets, durations: list[float]) -> dict[str, Any]:
    """`durations` (ascending) in log-spaced buckets, as `distribution` returns them."""
    out: dict[str, Any] = {"window": b.window, "since": b.since, "until": b.until,
                           "count": len(durations), "buckets": []}
    for p in (50, 95, 99):
        out[f"p{p}"] = nearest_rank(durations, p)
    if not durations:
        return out
    bounds = log_bounds(durations[0], durations[-1])
    if durations[0] < bounds[0]:
        bounds[0] = 0.0
    counts = [0] * (len(bounds) - 1)
    for duration in durations:
        counts[min(max(bisect.bisect_right(bounds, duration) - 1, 0), len(counts) - 1)] += 1
    out["buckets"] = [{"low": bounds[i], "high": bounds[i + 1], "count": counts[i]}
                      for i in range(len(counts))]
    return out


def samples(
    conn: sqlite3.Connection, service: str, name: str, low: float, high: float,
    window: str = DEFAULT_WINDOW, now_us: int | None = None, limit: int = 20,
) -> list[dict[str, Any]]:
    """The latest transactions `name` of `service` in the window lasting at least `low` and
    less than `high` ms (a distribution bucket), to open in the waterfall."""
    b = bucketing(window, now_us)
    cursor = conn.execute("""
        SELECT id, trace_id, name, type, result, outcome, timestamp, duration, spans_started
        FROM transactions
        WHERE service = ? AND name = ? AND timestamp >= ? AND timestamp < ?
              AND duration >= ? AND duration < ?
        ORDER BY timestamp DESC LIMIT ?""", (service, name, b.first, b.end, low, high, limit))
    columns = [c[0] for c in cursor.description]
    return [dict(zip(columns, row, strict=True)) for row in cursor]


def _stacked(b: Buckets, rows: list[Any], max_keys: int) -> dict[str, Any]:
    """(bucket, key, total ms, count) rows as per-bucket totals of the `max_keys` biggest
    keys (the rest as OTHER), biggest first."""
    totals: dict[str, float] = {}
    for _, key, total, _ in rows:
        totals[key] = totals.get(key, 0.0) + total
    keys = sorted(totals, key=lambda k: (-totals[k], k))
    if len(keys) > max_keys:
        keep = set(keys[:max_keys - 1])
        keys = [*keys[:max_keys - 1], OTHER]
    else:
        keep = set(keys)
    spent = [dict.fromkeys(keys, 0.0) for _ in range(b.count)]
    spans = [dict.fromkeys(keys, 0) for _ in range(b.count)]
    for index, key, total, count in rows:
        key = key if key in keep else OTHER
        spent[index][key] += total
        spans[index][key] += count
    return {"window": b.window, "step": b.step // 1_000_000, "since": b.since,
            "until": b.until, "keys": keys,
            "buckets": [{"start": start, "total": spent[i], "count": spans[i]}
                        for i, start in enumerate(b.starts())],
            "totals": {k: sum(t[k] for t in spent) for k in keys}}


def span_type_series(
    conn: sqlite3.Connection, service: str, window: str = DEFAULT_WINDOW,
    name: str | None = None, now_us: int | None = None, max_keys: int = MAX_KEYS,
) -> dict[str, Any]:
    """Time spent in spans of `service` (of its transactions `name`) by span type per
    bucket: `keys` (types, most time first), `buckets` [{start, total: {type: ms},
    count: {type: spans}}], `totals`. Summed span durations, not self time: no agent sends
    breakdown metrics here, and the exit spans (db, external, cache) where the time goes are
    leaves, whose duration is their self time. Spans stored with only a relative `start`
    (no timestamp) are not counted."""
    return span_breakdown(conn, service, window, name, now_us, max_keys)["types"]


def dependency_series(
    conn: sqlite3.Connection, service: str, window: str = DEFAULT_WINDOW,
    name: str | None = None, now_us: int | None = None, max_keys: int = MAX_KEYS,
) -> dict[str, Any]:
    """As `span_type_series`, by dependency: the exit span's destination service resource
    ("postgresql/shop", "api.example.com:443"), else its service target as "type/name"."""
    return span_breakdown(conn, service, window, name, now_us, max_keys)["dependencies"]


def span_breakdown(
    conn: sqlite3.Connection, service: str, window: str = DEFAULT_WINDOW,
    name: str | None = None, now_us: int | None = None, max_keys: int = MAX_KEYS,
) -> dict[str, Any]:
    """Both `span_type_series` (`types`) and `dependency_series` (`dependencies`) from one
    pass over the same rows. For a whole service in buckets of whole minutes that is the
    writer's per-minute sums (`span_minutes`, exact: sums and counts add up); otherwise
    the spans themselves."""
    b = bucketing(window, now_us)
    cursor = conn.cursor()
    cursor.row_factory = None
    if name is None and b.step % 60_000_000 == 0:
        rows = cursor.execute("""
            SELECT CAST((minute - ?) / ? AS INTEGER), type, destination, sum(duration),
                   sum(spans)
            FROM span_minutes WHERE service = ? AND minute >= ? AND minute < ?
            GROUP BY 1, 2, 3""", (b.first, b.step, service, b.first, b.end)).fetchall()
    elif name is None:  # buckets of seconds (15m): each type's range of spans_type_time
        rows = []
        kind = cursor.execute("SELECT min(type) FROM spans WHERE service = ?",
                              (service,)).fetchone()[0]
        while kind is not None:
            rows += cursor.execute("""
                SELECT CAST((timestamp - ?) / ? AS INTEGER), type, ifnull(destination, ''),
                       sum(duration), count(*)
                FROM spans WHERE service = ? AND type = ? AND timestamp >= ? AND timestamp < ?
                GROUP BY 1, 3""", (b.first, b.step, service, kind, b.first, b.end)).fetchall()
            kind = cursor.execute("SELECT min(type) FROM spans WHERE service = ? AND type > ?",
                                  (service, kind)).fetchone()[0]
    else:
        # A transaction begun up to a bucket before the window contributes its spans in it.
        rows = cursor.execute("""
            SELECT CAST((s.timestamp - ?) / ? AS INTEGER), s.type, ifnull(s.destination, ''),
                   sum(s.duration), count(*)
            FROM transactions t JOIN spans s ON s.transaction_id = t.id
            WHERE t.service = ? AND t.name = ? AND t.timestamp >= ? AND t.timestamp < ?
                  AND s.timestamp >= ? AND s.timestamp < ?
            GROUP BY 1, 2, 3""", (b.first, b.step, service, name, b.first - b.step, b.end,
                                  b.first, b.end)).fetchall()
    types: dict[tuple[int, str], list[float]] = {}
    dependencies: dict[tuple[int, str], list[float]] = {}
    for index, kind, destination, total, count in rows:
        for found, key in ((types, kind), (dependencies, destination)):
            if key == "" and found is dependencies:
                continue  # not an exit span
            sums = found.setdefault((index, key), [0.0, 0])
            sums[0] += total
            sums[1] += count
    return {kind: _stacked(b, [(i, k, t, c) for (i, k), (t, c) in sorted(found.items())],
                           max_keys)
            for kind, found in (("types", types), ("dependencies", dependencies))}


def error_series(
    conn: sqlite3.Connection, service: str, grouping_key: str, window: str = DEFAULT_WINDOW,
    now_us: int | None = None,
) -> dict[str, Any]:
    """Occurrences of one error group per bucket: `buckets` [{start, count}], `count`, and
    `per_minute` over the time the occurrences cover."""
    b = bucketing(window, now_us)
    rows = conn.execute("""
        SELECT CAST((timestamp - ?) / ? AS INTEGER) AS b, count(*), min(timestamp),
               max(timestamp)
        FROM errors WHERE service = ? AND grouping_key = ? AND timestamp >= ? AND timestamp < ?
        GROUP BY b""", (b.first, b.step, service, grouping_key, b.first, b.end)).fetchall()
    found = {row[0]: row[1] for row in rows}
    count = sum(found.values())
    first = min((row[2] for row in rows), default=None)
    last = max((row[3] for row in rows), default=None)
    return {"window": b.window, "step": b.step // 1_000_000, "since": b.since,
            "until": b.until, "count": count, "first": first, "last": last,
            "per_minute": rate_per_minute(count, first, last),
            "buckets": [{"start": start, "count": found.get(i, 0)}
                        for i, start in enumerate(b.starts())]}


def _now_us() -> int:
    return time.time_ns() // 1000
