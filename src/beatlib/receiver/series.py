"""Time series and distributions for the dashboard's charts: plain functions of a connection
returning dicts and lists (µs timestamps, ms durations), each on an index of
`schema.SCHEMA`. Transaction charts read the writer's per-minute rollups (percentiles
from fixed duration buckets, within `rollup.ERROR_BOUND` of the nearest rank); a
distribution is exact; rates are per minute over the time a bucket (or the data) covers.
"""

from __future__ import annotations

import bisect
import math
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from beatlib.receiver import rollup

# Chart windows: label -> seconds.
WINDOWS: dict[str, int] = {
    "15m": 15 * 60, "1h": 3600, "6h": 6 * 3600, "24h": 86400, "7d": 7 * 86400,
}
DEFAULT_WINDOW = "1h"
# Bucket sizes (s) a window may be cut in: the smallest that gives at most MAX_BUCKETS.
STEPS = (10, 30, 60, 5 * 60, 10 * 60, 30 * 60, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400)
MAX_BUCKETS = 60
# The rollups' bucket (s): charts read from them have buckets of at least a minute (a 15 m
# window: 16 one-minute buckets).
ROLLUP_STEP = 60
# Series beyond this many (span types, dependencies) are added up as "other".
MAX_KEYS = 8
OTHER = "other"

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


def bucketing(window: str = DEFAULT_WINDOW, now_us: int | None = None,
              min_step: int = 0) -> Buckets:
    """The buckets of `window` (one of WINDOWS; anything else is the default) ending now,
    each at least `min_step` s long."""
    if window not in WINDOWS:
        window = DEFAULT_WINDOW
    now = _now_us() if now_us is None else now_us
    step = max(step_for(WINDOWS[window]), min_step) * 1_000_000
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
    per bucket (at least a minute: the rollup's): every bucket of the window, in order,
    with `start` (µs), `count`, `tpm` (per minute over the part of the bucket inside the
    window), `avg` (ms, exact), `p50`/`p95`/`p99` (ms, from the rollup's duration buckets:
    within `rollup.ERROR_BOUND` of the exact nearest rank; None when empty), `failures`,
    `with_outcome` and `error_rate` (failures over those with a known outcome; None when
    none has one). The summary: `count`, `tpm` over the time the data covers (`first` to
    `last`, the window's first and last transaction), `error_rate`."""
    return transaction_overview(conn, service, window, name, now_us)["series"]


def transaction_overview(
    conn: sqlite3.Connection, service: str, window: str = DEFAULT_WINDOW,
    name: str | None = None, now_us: int | None = None,
) -> dict[str, Any]:
    """What a page shows of the transactions of `service` (or of those named `name`) in the
    window, from the writer's per-minute rollup (`transaction_minutes`): `series` (as
    `transaction_series`); with `name`, `distribution` (as `distribution`, exact, from the
    rows); without, `groups`: by name and type, as `queries.transaction_groups` (count,
    avg, total, p50/p95/p99 from the rollup, failures, with_outcome, error_rate, first and
    last of the name, tpm over the time the service's data covers), most total time first.
    """
    b = bucketing(window, now_us, min_step=ROLLUP_STEP)
    cursor = conn.cursor()
    cursor.row_factory = None
    histograms: list[dict[int, int]] = [{} for _ in range(b.count)]
    counts = [0] * b.count
    failures = [0] * b.count
    known = [0] * b.count
    totals = [0.0] * b.count
    groups: list[dict[str, Any]] = []
    first = last = None
    for tx_name, tx_type in _rollup_keys(cursor, service, name):
        rows = cursor.execute("""
            SELECT (minute - ?) / ?, bucket, sum(count), sum(failures), sum(with_outcome),
                   sum(duration)
            FROM transaction_minutes
            WHERE service = ? AND name = ? AND type = ? AND minute >= ? AND minute < ?
            GROUP BY 1, 2""", (b.first, b.step, service, tx_name, tx_type, b.first,
                               b.end)).fetchall()
        if not rows:
            continue
        group: dict[int, int] = {}
        group_failures = group_known = 0
        group_total = 0.0
        for i, index, count, failed, with_outcome, total in rows:
            histogram = histograms[i]
            histogram[index] = histogram.get(index, 0) + count
            group[index] = group.get(index, 0) + count
            counts[i] += count
            failures[i] += failed
            known[i] += with_outcome
            totals[i] += total
            group_failures += failed
            group_known += with_outcome
            group_total += total
        tx_first, tx_last = _first_last(cursor, service, tx_name, b)
        if tx_first is not None and (first is None or tx_first < first):
            first = tx_first
        if tx_last is not None and (last is None or tx_last > last):
            last = tx_last
        count = sum(group.values())
        groups.append({"name": tx_name, "type": tx_type, "count": count,
                       "avg": group_total / count, "total": group_total,
                       **rollup.percentiles(group), "failures": group_failures,
                       "with_outcome": group_known, "first": tx_first, "last": tx_last,
                       "error_rate": group_failures / group_known if group_known else None})
    buckets = []
    for i, start in enumerate(b.starts()):
        count = counts[i]
        buckets.append({
            "start": start, "count": count,
            "tpm": count / max(b.seconds(i), 1.0) * 60,
            "avg": totals[i] / count if count else None,
            **rollup.percentiles(histograms[i]),
            "failures": failures[i], "with_outcome": known[i],
            "error_rate": failures[i] / known[i] if known[i] else None,
        })
    count = sum(counts)
    series = {"window": b.window, "step": b.step // 1_000_000, "since": b.since,
              "until": b.until, "buckets": buckets, "count": count, "first": first,
              "last": last, "tpm": rate_per_minute(count, first, last),
              "error_rate": sum(failures) / sum(known) if sum(known) else None}
    out: dict[str, Any] = {"series": series}
    if name is not None:
        out["distribution"] = distribution(conn, service, name, window, now_us)
    else:
        minutes = max((last or 0) - (first or 0), 1_000_000) / 60e6
        for summary in groups:
            summary["tpm"] = summary["count"] / minutes
        out["groups"] = sorted(groups, key=lambda g: -g["total"])
    return out


def _rollup_keys(cursor: sqlite3.Cursor, service: str,
                 name: str | None) -> list[tuple[str, str]]:
    """The (name, type) pairs of `service` (of `name`) in the rollup, one primary-key
    search each (a skip scan: not every row of every minute)."""
    keys: list[tuple[str, str]] = []
    where, params = ("name = ?", [name]) if name is not None else ("1", [])
    row = cursor.execute(f"""SELECT name, type FROM transaction_minutes
                             WHERE service = ? AND {where} ORDER BY name, type LIMIT 1""",
                         (service, *params)).fetchone()
    while row is not None:
        keys.append(row)
        row = cursor.execute(f"""SELECT name, type FROM transaction_minutes
                                 WHERE service = ? AND {where} AND (name, type) > (?, ?)
                                 ORDER BY name, type LIMIT 1""",
                             (service, *params, *row)).fetchone()
    return keys


def _first_last(cursor: sqlite3.Cursor, service: str, name: str,
                b: Buckets) -> tuple[int | None, int | None]:
    """The first and last transaction `name` of `service` in the window (two searches of
    transactions_name_time)."""
    sql = ("SELECT {}(timestamp) FROM transactions WHERE service = ? AND name = ? "
           "AND timestamp >= ? AND timestamp < ?")
    params = (service, name, b.first, b.end)
    return (cursor.execute(sql.format("min"), params).fetchone()[0],
            cursor.execute(sql.format("max"), params).fetchone()[0])


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
    b = bucketing(window, now_us, min_step=ROLLUP_STEP)
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
    b = bucketing(window, now_us, min_step=ROLLUP_STEP)
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
    pass over the writer's per-minute sums (exact: sums and counts add up): `span_minutes`
    for a whole service, `transaction_span_minutes` for the transactions `name`."""
    b = bucketing(window, now_us, min_step=ROLLUP_STEP)
    cursor = conn.cursor()
    cursor.row_factory = None
    table, where, params = "span_minutes", "service = ?", [service]
    if name is not None:
        table, where = "transaction_span_minutes", "service = ? AND name = ?"
        params.append(name)
    rows = cursor.execute(f"""
        SELECT (minute - ?) / ?, type, destination, sum(duration), sum(spans)
        FROM {table} WHERE {where} AND minute >= ? AND minute < ?
        GROUP BY 1, 2, 3""", (b.first, b.step, *params, b.first, b.end)).fetchall()
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
