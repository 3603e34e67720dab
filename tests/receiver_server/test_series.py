"""Chart data on known rows: bucketing, exact per-bucket percentiles (against a Python
computation on the same rows), rates over the time covered, distributions and their samples,
time by span type and dependency, error occurrences; and the index each query uses."""

from __future__ import annotations

import json
import random
import sqlite3
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import Any

import pytest

from beatlib.receiver import Receiver, queries, rollup, rows, schema, series, svg
from beatlib.receiver.schema import connect, create_schema
from tests.receiver_server.conftest import ndjson, post, transaction

SECOND = 1_000_000
MINUTE = 60 * SECOND
# A round minute, so bucket bounds are easy to reason about.
NOW = (time.time_ns() // 1000) // (3600 * SECOND) * (3600 * SECOND) + 30 * MINUTE


def send(receiver: Receiver, *events: Any) -> None:
    for start in range(0, len(events), 500):
        assert post(receiver.url, ndjson(*events[start:start + 500]))[0] == 202
    assert receiver.flush(10)


@pytest.fixture
def charts(serve: Receiver) -> Iterator[Receiver]:
    yield serve  # the store's schema has the charts' indexes


@pytest.mark.parametrize(("window", "step", "buckets"), [
    ("15m", 30, 31), ("1h", 60, 61), ("6h", 600, 37), ("24h", 1800, 49), ("7d", 3 * 3600, 57),
])
def test_bucketing(window: str, step: int, buckets: int) -> None:
    now = NOW + 7 * SECOND  # inside a bucket: the window starts at a bucket bound before
    b = series.bucketing(window, now)
    assert b.step == step * SECOND
    assert b.first % b.step == 0 and b.first <= now - series.WINDOWS[window] * SECOND
    assert b.count == buckets and b.first + (b.count - 1) * b.step <= now < b.end
    assert 30 <= b.count <= 61
    assert b.seconds(b.count - 1) == pytest.approx((now - b.starts()[-1]) / SECOND)
    assert b.seconds(0) == step
    assert series.bucketing("bogus", now) == series.bucketing("1h", now)


def test_step_for_rounds_up_to_a_nice_size() -> None:
    assert [series.step_for(s) for s in (60, 600, 900, 3600, 4000, 86400, 60 * 86400)] == [
        10, 10, 30, 60, 300, 1800, 86400]


def test_rate_over_covered_time() -> None:
    assert series.rate_per_minute(745, 0, 5 * SECOND) == pytest.approx(745 / 5 * 60)
    assert series.rate_per_minute(1, 10, 10) == 60  # at least a second
    assert series.rate_per_minute(0, None, None) is None


def test_transaction_groups_rate_over_covered_time_not_window(serve: Receiver) -> None:
    # The figure: 745 transactions in 5 s read 12.4/min over a 1 h window.
    send(serve, *[transaction(n, timestamp=NOW - 5 * SECOND + n * 5 * SECOND // 744)
                  for n in range(745)])
    with serve.store.reader() as conn:
        [group] = queries.transaction_groups(conn, "shop", "1h", NOW)
    assert group["tpm"] == pytest.approx(745 / 5 * 60, rel=0.01)


def nearest(values: list[float], p: int) -> float | None:
    ordered = sorted(values)
    if not ordered:
        return None
    rank = max(1, -(-len(ordered) * p // 100))
    return ordered[rank - 1]


def test_percentiles_throughput_error_rate_per_bucket(charts: Receiver) -> None:
    rng = random.Random(5)
    events, rows = [], []
    for n in range(1500):
        ts = NOW - rng.randrange(59 * MINUTE)
        duration = round(rng.lognormvariate(3, 1), 3)
        name = rng.choice(["GET /a", "GET /b"])
        outcome = rng.choice(["success", "success", "failure", "unknown"])
        events.append(transaction(n, duration=duration, name=name, timestamp=ts,
                                  outcome=outcome))
        rows.append((ts, duration, name, outcome))
    events.append(transaction(9999, duration=1.0, timestamp=NOW - 2 * 3600 * SECOND))  # outside
    send(charts, *events)
    with charts.store.reader() as conn:
        for name in (None, "GET /a"):
            out = series.transaction_series(conn, "shop", "1h", name=name, now_us=NOW)
            b = series.bucketing("1h", NOW)
            assert [bk["start"] for bk in out["buckets"]] == b.starts()
            chosen = [r for r in rows if name is None or r[2] == name]
            assert out["count"] == len(chosen)
            for bucket in out["buckets"]:
                inside = [r for r in chosen if bucket["start"] <= r[0] < bucket["start"] + b.step]
                durations = [r[1] for r in inside]
                assert bucket["count"] == len(inside)
                for p in (50, 95, 99):  # from the rollup's buckets: within its bound
                    exact = nearest(durations, p)
                    if exact is None:
                        assert bucket[f"p{p}"] is None
                    else:
                        assert bucket[f"p{p}"] == pytest.approx(exact,
                                                                rel=rollup.ERROR_BOUND)
                assert bucket["avg"] == (pytest.approx(sum(durations) / len(durations))
                                         if durations else None)
                failures = sum(r[3] == "failure" for r in inside)
                known = len(inside)  # "unknown" with an HTTP 2xx result counts as a success
                assert bucket["error_rate"] == (failures / known if known else None)
                assert bucket["tpm"] == pytest.approx(len(inside) / max(
                    min(bucket["start"] + b.step, NOW) - bucket["start"], SECOND) * MINUTE)
            first, last = min(r[0] for r in chosen), max(r[0] for r in chosen)
            assert out["tpm"] == pytest.approx(len(chosen) / ((last - first) / MINUTE))


def test_empty_window(charts: Receiver) -> None:
    with charts.store.reader() as conn:
        out = series.transaction_series(conn, "shop", "15m", now_us=NOW)
        assert out["count"] == 0 and out["tpm"] is None and out["error_rate"] is None
        assert all(b["count"] == 0 and b["p95"] is None for b in out["buckets"])
        assert series.distribution(conn, "shop", "GET /a", "1h", NOW)["buckets"] == []
        assert series.span_type_series(conn, "shop", "1h", now_us=NOW)["keys"] == []
        assert series.error_series(conn, "shop", "nokey", "1h", NOW)["count"] == 0


def test_distribution_and_its_samples(charts: Receiver) -> None:
    durations = [0.0, 0.4, 1.0, 1.2, 1.25, 3.0, 9.9, 10.0, 250.0, 4000.0]
    send(charts, *[transaction(n, duration=d, timestamp=NOW - n * SECOND)
                   for n, d in enumerate(durations)])
    with charts.store.reader() as conn:
        out = series.distribution(conn, "shop", "GET /orders", "1h", NOW)
        buckets = out["buckets"]
        assert sum(b["count"] for b in buckets) == len(durations) == out["count"]
        assert buckets[0]["low"] == 0.0 and buckets[-1]["high"] > 4000.0
        assert all(a["high"] == b["low"] for a, b in zip(buckets, buckets[1:], strict=False))
        ratios = [b["high"] / b["low"] for b in buckets[1:]]
        assert all(1.1 < r < 2.6 for r in ratios)  # log spaced
        assert len(buckets) <= 40
        assert (out["p50"], out["p95"], out["p99"]) == (
            nearest(durations, 50), nearest(durations, 95), nearest(durations, 99))
        for b in buckets:  # each bucket's samples are exactly the rows in its range
            found = series.samples(conn, "shop", "GET /orders", b["low"], b["high"], "1h", NOW)
            assert sorted(s["duration"] for s in found) == sorted(
                d for d in durations if b["low"] <= d < b["high"])
            assert len(found) == b["count"]
        found = series.samples(conn, "shop", "GET /orders", 1.0, 1.6, "1h", NOW)
        assert [s["duration"] for s in found] == [1.0, 1.2, 1.25]  # latest first
        assert [s["timestamp"] for s in found] == sorted(
            (s["timestamp"] for s in found), reverse=True)


def test_log_bounds() -> None:
    assert series.log_bounds(1.0, 9.0) == [1, 1.25, 1.6, 2, 2.5, 3.15, 4, 5, 6.3, 8, 10]
    wide = series.log_bounds(0.01, 100_000)
    assert len(wide) - 1 <= 40 and wide[0] <= 0.01 and wide[-1] > 100_000


def span(tx: dict[str, Any], n: int, kind: str, duration: float, at: int,
         resource: str | None = None, target: dict[str, str] | None = None,
         **extra: Any) -> tuple[str, dict[str, Any]]:
    context: dict[str, Any] = {}
    if resource:
        context["destination"] = {"service": {"resource": resource}}
    if target:
        context["service"] = {"target": target}
    return "span", {"id": f"{n:016x}", "trace_id": tx["trace_id"], "parent_id": tx["id"],
                    "transaction_id": tx["id"], "name": f"{kind} {n}", "type": kind,
                    "duration": duration, "timestamp": at, **(
                        {"context": context} if context else {}), **extra}


def test_time_by_span_type_and_dependency(charts: Receiver) -> None:
    _, a = transaction(1, name="GET /a", timestamp=NOW - 10 * MINUTE)
    _, b = transaction(2, name="GET /b", timestamp=NOW - 5 * MINUTE)
    events = [("transaction", a), ("transaction", b),
              span(a, 10, "db", 5.0, a["timestamp"], "postgresql/shop"),
              span(a, 11, "db", 7.0, a["timestamp"] + 1000, "postgresql/shop"),
              span(a, 12, "external", 20.0, a["timestamp"] + 2000,
                   target={"type": "http", "name": "api.example.com:443"}),
              span(b, 13, "template", 3.0, b["timestamp"]),
              span(b, 14, "db", 1.0, b["timestamp"] + 10, "redis"),
              # relative start only: not on the time axis
              ("span", {"id": "rel", "trace_id": b["trace_id"], "parent_id": b["id"],
                        "transaction_id": b["id"], "name": "r", "type": "db", "duration": 99.0,
                        "start": 1.0})]
    send(charts, *events)
    with charts.store.reader() as conn:
        by_type = series.span_type_series(conn, "shop", "1h", now_us=NOW)
        assert by_type["keys"] == ["external", "db", "template"]
        assert by_type["totals"] == {"external": 20.0, "db": 13.0, "template": 3.0}
        step = series.bucketing("1h", NOW).step
        [busy] = [bk for bk in by_type["buckets"] if bk["start"] <= a["timestamp"] <
                  bk["start"] + step]
        assert busy["total"]["db"] == 12.0 and busy["count"]["db"] == 2
        only_b = series.span_type_series(conn, "shop", "1h", name="GET /b", now_us=NOW)
        assert only_b["totals"] == {"template": 3.0, "db": 1.0}
        deps = series.dependency_series(conn, "shop", "1h", now_us=NOW)
        assert deps["totals"] == {"http/api.example.com:443": 20.0, "postgresql/shop": 12.0,
                                  "redis": 1.0}
        folded = series.dependency_series(conn, "shop", "1h", now_us=NOW, max_keys=2)
        assert folded["keys"] == ["http/api.example.com:443", series.OTHER]
        assert folded["totals"][series.OTHER] == 13.0


def test_error_occurrences(charts: Receiver) -> None:
    error = {"exception": {"type": "KeyError", "message": "x",
                           "stacktrace": [{"module": "m", "function": "f", "lineno": 1}]}}
    send(charts, *[("error", {**error, "id": f"e{n}", "timestamp": NOW - n * 30 * SECOND})
                   for n in range(10)])
    with charts.store.reader() as conn:
        [group] = queries.error_groups(conn, "shop")
        out = series.error_series(conn, "shop", group["grouping_key"], "15m", NOW)
    assert out["count"] == 10 and sum(b["count"] for b in out["buckets"]) == 10
    assert [b["count"] for b in out["buckets"] if b["count"]] == [1] * 10  # 30 s buckets
    assert out["per_minute"] == pytest.approx(10 / 4.5)  # over the 4.5 min they cover


def test_every_query_uses_an_index(charts: Receiver) -> None:
    _, tx = transaction(1, name="GET /a")
    send(charts, ("transaction", tx), span(tx, 2, "", 1.0, tx["timestamp"], "redis"),
         span(tx, 3, "db", 1.0, tx["timestamp"], "redis"))
    conn = connect(charts.store.path)
    assert series.span_type_series(conn, "shop")["keys"] == ["", "db"]  # even an empty type
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    series.transaction_series(conn, "shop", "1h")
    series.transaction_series(conn, "shop", "1h", name="GET /a")
    series.distribution(conn, "shop", "GET /a")
    series.samples(conn, "shop", "GET /a", 1.0, 2.0)
    for name in (None, "GET /a"):
        series.span_type_series(conn, "shop", name=name)
        series.dependency_series(conn, "shop", name=name)
    series.error_series(conn, "shop", "key")
    conn.set_trace_callback(None)
    assert len(statements) >= 9
    for sql in statements:
        plan = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql)]
        scans = [line for line in plan if line.startswith("SCAN ")]
        assert scans == [], (sql, plan)
        assert any("USING" in line and ("INDEX" in line or "PRIMARY KEY" in line)
                   for line in plan), (sql, plan)
    conn.close()


def test_destination_of_a_span_context() -> None:
    assert rows.destination({"destination": {"service": {"resource": "redis"}},
                             "service": {"target": {"type": "redis", "name": "x"}}}) == "redis"
    assert rows.destination({"destination": {"service": {"resource": ""}},
                             "service": {"target": {"type": "http", "name": "a:1"}}}) == "http/a:1"
    for odd in (None, "x", [], {"destination": "x"}, {"destination": {"service": []}},
                {"service": {"target": {"type": "http"}}},
                {"service": {"target": {"type": "db", "name": {"nested": 1}}}}):
        assert rows.destination(odd) is None, odd


def test_schema_step_4_fills_the_destination_of_stored_spans(tmp_path: Any) -> None:
    # A database of schema 3 (as the receiver made it, with the expression index an earlier
    # series.create_indexes added): step 4 adds the column from each span's context.
    path = str(tmp_path / "old.sqlite3")
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE spans (id TEXT NOT NULL, transaction_id TEXT, trace_id TEXT NOT NULL,
            parent_id TEXT NOT NULL, service TEXT NOT NULL, name TEXT NOT NULL,
            type TEXT NOT NULL, subtype TEXT, action TEXT, timestamp INTEGER, start REAL,
            duration REAL NOT NULL, outcome TEXT, sync INTEGER, context TEXT, stacktrace TEXT);
        CREATE INDEX spans_dependency ON spans (service, (CASE WHEN json_valid(context)
            THEN json_extract(context, '$.destination.service.resource') END));
        PRAGMA user_version=3;""")
    contexts = [{"destination": {"service": {"resource": "postgresql/shop"}}},
                {"service": {"target": {"type": "http", "name": "api:443"}}}, None, "{bad"]
    conn.executemany("INSERT INTO spans (id, trace_id, parent_id, service, name, type, "
                     "timestamp, duration, context) VALUES (?, 't', 'p', 'shop', 'n', 'db', "
                     "?, 1.0, ?)",
                     [(f"s{n}", NOW - MINUTE, c if isinstance(c, str) or c is None
                       else json.dumps(c)) for n, c in enumerate(contexts)])
    conn.commit()
    conn.close()
    conn = connect(path)
    create_schema(conn)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION
    assert [r[0] for r in conn.execute("SELECT destination FROM spans ORDER BY id")] == [
        "postgresql/shop", "http/api:443", None, None]
    indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "spans_dependency" not in indexes
    assert series.dependency_series(conn, "shop", "1h", now_us=NOW)["totals"] == {
        "postgresql/shop": 1.0, "http/api:443": 1.0}
    conn.close()


def test_charts_of_stored_data(charts: Receiver) -> None:
    # Every chart of the dashboard from the series of real stored events: drawn with data,
    # valid SVG, a dependency named with markup escaped, distribution bars linked.
    evil = '<img src=x onerror="alert(1)">'
    _, tx = transaction(1, duration=40.0, timestamp=NOW - 2 * MINUTE, outcome="failure")
    events: list[Any] = [("transaction", tx), *[
        transaction(n, duration=float(n), timestamp=NOW - n * SECOND) for n in range(2, 50)]]
    events.append(span(tx, 100, "external", 30.0, tx["timestamp"], evil))
    error = {"id": "e1", "timestamp": NOW - MINUTE,
             "exception": {"type": "KeyError", "message": "x"}}
    send(charts, *events, ("error", error))
    with charts.store.reader() as conn:
        data = series.transaction_series(conn, "shop", "1h", now_us=NOW)
        dist = series.distribution(conn, "shop", "GET /orders", "1h", NOW)
        deps = series.dependency_series(conn, "shop", "1h", now_us=NOW)
        [group] = queries.error_groups(conn, "shop")
        errors = series.error_series(conn, "shop", group["grouping_key"], "1h", NOW)
    drawn = [svg.latency_chart(data), svg.throughput_chart(data), svg.error_rate_chart(data),
             svg.distribution_chart(dist, lambda lo, hi: f"?min={lo!r}&max={hi!r}"),
             svg.stacked_time_chart(deps, title="Time by dependency"),
             svg.occurrences_chart(errors)]
    for chart in drawn:
        ET.fromstring(chart.svg)
        assert not chart.empty and chart.rows
    assert "<img" not in drawn[4].svg and evil in drawn[4].header
    links = [a.get("href") for a in ET.fromstring(drawn[3].svg).iter(
        "{http://www.w3.org/2000/svg}a")]
    assert len(links) == sum(1 for b in dist["buckets"] if b["count"])


def test_chart_pages_escape_what_apps_sent(charts: Receiver) -> None:
    from beatlib.receiver import ui

    evil = '<img src=x onerror="alert(1)">'
    _, tx = transaction(1, name=evil, timestamp=time.time_ns() // 1000 - SECOND)
    send(charts, ("transaction", tx), span(tx, 2, evil, 3.0, tx["timestamp"], evil))
    for path, query in [("transactions", {"service": "shop", "window": "15m"}),
                        ("transactions/group", {"service": "shop", "name": evil,
                                                "low": "0", "high": "1e9"}),
                        ("transactions/group", {"service": "shop", "name": evil,
                                                "low": "nan", "high": "x", "window": evil})]:
        page = ui.render(charts.store, ui.ROOT + path, query)
        assert page.status == 200, page.body[:300]
        body = page.body.decode()
        assert "<img" not in body and "&lt;img" in body
    listed = ui.render(charts.store, ui.ROOT + "transactions/group",
                       {"service": "shop", "name": evil, "low": "0", "high": "1e9"})
    assert b'id="samples"' in listed.body and tx["id"].encode() in listed.body
