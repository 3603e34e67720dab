"""The writer's per-minute rollups (transaction_minutes, transaction_span_minutes): what they
count (each stored row once, a resent one not again), how close their percentiles are to
the exact ones, schema step 5 filling them from stored rows, retention of their minutes,
and the query plans of every page that reads them."""

from __future__ import annotations

import math
import random
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from beatlib.receiver import Receiver, rollup, schema, series, store, ui
from beatlib.receiver.retention import Retention
from beatlib.receiver.schema import connect, create_schema
from tests.receiver_server.conftest import transaction
from tests.receiver_server.test_series import MINUTE, NOW, SECOND, send


def nearest(values: list[float], p: int) -> float:
    ordered = sorted(values)
    return ordered[math.ceil(len(ordered) * p / 100) - 1]


def span(tx: dict[str, Any], n: int, kind: str, duration: float, at: int,
         resource: str | None = None) -> tuple[str, dict[str, Any]]:
    extra = {"context": {"destination": {"service": {"resource": resource}}}} if resource else {}
    return "span", {"id": f"s{n:015x}", "trace_id": tx["trace_id"], "parent_id": tx["id"],
                    "transaction_id": tx["id"], "name": f"{kind} {n}", "type": kind,
                    "duration": duration, "timestamp": at, **extra}


def test_buckets_bound_the_error_of_every_duration() -> None:
    assert rollup.ERROR_BOUND == pytest.approx(0.0443, abs=1e-4)
    previous = 0
    for i in range(20_000):
        duration = rollup.SMALLEST * 1.0007 ** i  # 1 µs to over 1 s
        index = rollup.bucket(duration)
        assert index >= previous  # monotonic
        previous = index
        assert rollup.value(index) == pytest.approx(duration, rel=rollup.ERROR_BOUND * 1.0001)
    for odd in (0.0, -5.0, None, float("nan")):
        assert rollup.bucket(odd) == 0 and rollup.value(0) == 0.0
    assert rollup.bucket(float("inf")) == rollup.LARGEST_BUCKET == rollup.bucket(1e300)


def test_percentiles_of_the_rollup_are_within_the_bound_of_the_exact_ones(serve: Receiver
                                                                          ) -> None:
    rng = random.Random(13)
    rows = []
    events = []
    for n in range(3000):
        ts = NOW - rng.randrange(23 * 3600 * SECOND)
        duration = round(rng.lognormvariate(3, 1.2), 3)
        name = rng.choice(["GET /a", "GET /b", "POST /c"])
        outcome = rng.choice(["success"] * 6 + ["failure", "unknown"])
        events.append(transaction(n, duration=duration, name=name, timestamp=ts,
                                  outcome=outcome, result="HTTP 2xx"))
        rows.append((ts, duration, name, outcome))
    send(serve, *events)
    with serve.store.reader() as conn:
        for window in ("1h", "24h"):
            b = series.bucketing(window, NOW, min_step=series.ROLLUP_STEP)
            inside = [r for r in rows if b.first <= r[0] < b.end]
            out = series.transaction_overview(conn, "shop", window, now_us=NOW)
            assert {g["name"] for g in out["groups"]} == {r[2] for r in inside}
            for group in out["groups"]:
                mine = [r for r in inside if r[2] == group["name"]]
                durations = [r[1] for r in mine]
                assert group["count"] == len(mine)
                assert group["total"] == pytest.approx(sum(durations))
                assert group["failures"] == sum(r[3] == "failure" for r in mine)
                assert group["with_outcome"] == len(mine)  # unknown + HTTP 2xx: a success
                assert (group["first"], group["last"]) == (min(r[0] for r in mine),
                                                           max(r[0] for r in mine))
                for p in (50, 95, 99):
                    exact = nearest(durations, p)
                    assert group[f"p{p}"] == pytest.approx(exact, rel=rollup.ERROR_BOUND)
                    assert group[f"p{p}"] != exact  # from the buckets, not the rows
            first, last = min(r[0] for r in inside), max(r[0] for r in inside)
            assert out["series"]["tpm"] == pytest.approx(len(inside) / ((last - first) / MINUTE))
            for bucket in out["series"]["buckets"]:
                durations = [r[1] for r in inside
                             if bucket["start"] <= r[0] < bucket["start"] + b.step]
                assert bucket["count"] == len(durations)
                if durations:
                    assert bucket["p95"] == pytest.approx(nearest(durations, 95),
                                                          rel=rollup.ERROR_BOUND)


def test_a_resent_batch_is_counted_once(serve: Receiver) -> None:
    _, tx = transaction(1, name="GET /a", timestamp=NOW - 5 * MINUTE, duration=30.0,
                        outcome="failure")
    batch = [span(tx, 1, "db", 4.0, tx["timestamp"], "postgresql/shop"),
             ("transaction", tx), span(tx, 2, "external", 6.0, tx["timestamp"] + 10)]
    send(serve, *batch)
    send(serve, *batch)  # a client retrying a batch the receiver had stored
    with serve.store.reader() as conn:
        assert [tuple(r) for r in conn.execute(
            "SELECT count, failures, with_outcome, duration FROM transaction_minutes")] == [
            (1, 1, 1, 30.0)]
        for table in ("span_minutes", "transaction_span_minutes"):
            assert tuple(conn.execute(f"SELECT sum(spans), sum(duration) FROM {table}"
                                      ).fetchone()) == (2, 10.0)
        out = series.transaction_series(conn, "shop", "1h", now_us=NOW)
        assert out["count"] == 1 and out["error_rate"] == 1.0


def test_span_sums_by_name_whichever_of_span_and_transaction_comes_first(
        serve: Receiver) -> None:
    _, a = transaction(1, name="GET /a", timestamp=NOW - 10 * MINUTE)
    _, b = transaction(2, name="GET /b", timestamp=NOW - 20 * MINUTE)
    send(serve, span(a, 1, "db", 5.0, a["timestamp"], "postgresql/shop"),
         span(a, 2, "db", 7.0, a["timestamp"] + 1000, "postgresql/shop"),
         ("transaction", a))  # spans first: counted when the transaction comes
    send(serve, ("transaction", b), span(b, 3, "cache", 2.0, b["timestamp"], "redis"))
    send(serve, span(a, 4, "external", 11.0, a["timestamp"] + 2000, "api:443"))  # late
    with serve.store.reader() as conn:
        only_a = series.span_breakdown(conn, "shop", "1h", name="GET /a", now_us=NOW)
        assert only_a["types"]["totals"] == {"external": 11.0, "db": 12.0}
        assert only_a["dependencies"]["totals"] == {"api:443": 11.0, "postgresql/shop": 12.0}
        only_b = series.span_breakdown(conn, "shop", "1h", name="GET /b", now_us=NOW)
        assert only_b["types"]["totals"] == {"cache": 2.0}
        everything = series.span_breakdown(conn, "shop", "1h", now_us=NOW)
        assert everything["types"]["totals"] == {"external": 11.0, "db": 12.0, "cache": 2.0}
        # 15 m: one-minute buckets, the rollups' size
        short = series.span_breakdown(conn, "shop", "15m", name="GET /a", now_us=NOW)
        assert short["types"]["step"] == 60 and short["types"]["totals"]["db"] == 12.0


def _old_database(path: str, rows: list[tuple[Any, ...]]) -> None:
    """A database of schema 4 as the receiver made it (with the indexes step 5 drops),
    with transactions and spans written straight into it."""
    conn = connect(path)
    create_schema(conn)
    conn.executescript("""
        DROP TABLE transaction_minutes; DROP TABLE transaction_span_minutes;
        CREATE INDEX transactions_stats
            ON transactions (service, timestamp, name, type, duration, outcome, result);
        CREATE INDEX transactions_by_name ON transactions (service, name, timestamp);
        CREATE INDEX transactions_release ON transactions (service, service_version);
        CREATE INDEX spans_type_time ON spans (service, type, timestamp, duration);
        CREATE INDEX spans_destination_time ON spans (service, destination, timestamp, duration);
        PRAGMA user_version=4;""")
    with conn:
        conn.executemany("INSERT INTO transactions (id, trace_id, service, name, type, result,"
                         " outcome, timestamp, duration) VALUES (?, ?, 'shop', ?, 'request', "
                         "?, ?, ?, ?)", rows)
        conn.executemany("INSERT INTO spans (id, transaction_id, trace_id, parent_id, service,"
                         " name, type, timestamp, duration, destination) VALUES (?, ?, ?, ?, "
                         "'shop', 'q', 'db', ?, 1.5, 'postgresql/shop')",
                         [(f"s{r[0]}", r[0], r[1], r[0], r[5] + 10) for r in rows])
    conn.close()


def test_schema_step_5_fills_the_rollups_from_stored_rows_and_drops_indexes(
        tmp_path: Path) -> None:
    path = str(tmp_path / "old.sqlite3")
    rng = random.Random(2)
    rows = [(f"t{n:015x}", f"{n:032x}", rng.choice(["GET /a", "GET /b"]),
             rng.choice(["HTTP 2xx", "HTTP 5xx", None]), rng.choice(["success", None]),
             NOW - rng.randrange(50 * MINUTE), round(rng.lognormvariate(2, 1), 3))
            for n in range(500)]
    _old_database(path, rows)
    conn = connect(path)
    create_schema(conn)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION == 5
    indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert not indexes & set(schema.DROPPED_INDEXES)
    for name in ("GET /a", "GET /b"):
        mine = [r for r in rows if r[2] == name]
        out = series.transaction_series(conn, "shop", "1h", name=name, now_us=NOW)
        assert out["count"] == len(mine)
        failed = [r for r in mine if (r[4] is None and r[3] == "HTTP 5xx")]
        known = [r for r in mine if r[4] is not None or r[3] is not None]
        assert sum(bk["failures"] for bk in out["buckets"]) == len(failed)
        assert sum(bk["with_outcome"] for bk in out["buckets"]) == len(known)
        spans = series.span_type_series(conn, "shop", "1h", name=name, now_us=NOW)
        assert spans["totals"] == {"db": pytest.approx(1.5 * len(mine))}
    # the writer's own sums agree with the step's: a transaction stored now adds to them
    conn.close()
    with Receiver(port=0, db_path=path) as receiver:
        send(receiver, transaction(9, name="GET /a", timestamp=NOW - MINUTE))
        with receiver.store.reader() as reader:
            assert series.transaction_series(reader, "shop", "1h", name="GET /a", now_us=NOW
                                             )["count"] == len(
                [r for r in rows if r[2] == "GET /a"]) + 1


def test_retention_deletes_rollup_minutes_before_the_cutoff(tmp_path: Path) -> None:
    path = str(tmp_path / "apm.sqlite3")
    now = time.time_ns() // 1000 // MINUTE * MINUTE + 30 * SECOND
    with Receiver(port=0, db_path=path) as receiver:
        events: list[Any] = []
        for n in range(40):  # old: 2 h ago and before, many rows in a few minutes
            _, tx = transaction(n, name=f"GET /{n % 3}", timestamp=now - 2 * 3600 * SECOND
                                - (n % 4) * MINUTE, duration=1.0 + n)
            events += [("transaction", tx), span(tx, n, f"t{n % 7}", 1.0, tx["timestamp"],
                                                 f"d{n % 5}")]
        _, kept = transaction(100, name="GET /0", timestamp=now - 10 * MINUTE)
        events += [("transaction", kept), span(kept, 100, "db", 2.0, kept["timestamp"])]
        send(receiver, *events)
    retention = Retention(path, 3600, batch_rows=2)  # batches smaller than one minute's rows
    deleted = retention.sweep(now_us=now)
    assert deleted["transactions"] == 40 and deleted["spans"] == 40
    conn = sqlite3.connect(path)
    for table in ("transaction_minutes", "transaction_span_minutes", "span_minutes"):
        assert deleted[table] > 0
        assert conn.execute(f"SELECT count(*), min(minute) FROM {table}").fetchone() == (
            1, kept["timestamp"] // MINUTE * MINUTE), table
    conn.close()
    assert not any(retention.sweep(now_us=now).values())


def test_the_minute_of_the_cutoff_keeps_its_sums(tmp_path: Path) -> None:
    path = str(tmp_path / "apm.sqlite3")
    minute = time.time_ns() // 1000 // MINUTE * MINUTE - 3600 * SECOND
    with Receiver(port=0, db_path=path) as receiver:
        send(receiver, transaction(1, timestamp=minute + 10 * SECOND),
             transaction(2, timestamp=minute - 50 * SECOND))
    deleted = Retention(path, 1).sweep(now_us=minute + 30 * SECOND + 1 * SECOND)
    assert deleted["transactions"] == 2 and deleted["transaction_minutes"] == 1
    conn = sqlite3.connect(path)
    assert [r[0] for r in conn.execute("SELECT minute FROM transaction_minutes")] == [minute]
    conn.close()


def test_no_page_scans_a_table(serve: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every query of every page searches an index (EXPLAIN QUERY PLAN): the pages of a
    service, a transaction name, a transaction, a trace, errors, an error group, releases,
    health and the services."""
    _, tx = transaction(1, name="GET /a", timestamp=NOW - MINUTE)
    error = {"id": "e1", "timestamp": NOW - MINUTE, "trace_id": tx["trace_id"],
             "transaction_id": tx["id"], "parent_id": tx["id"],
             "exception": {"type": "KeyError", "message": "x"}}
    send(serve, ("transaction", tx), span(tx, 1, "db", 1.0, tx["timestamp"], "redis"),
         ("error", error))
    with serve.store.reader() as conn:
        key = conn.execute("SELECT grouping_key FROM error_groups").fetchone()[0]
    statements: list[str] = []
    opened = store.connect

    def traced(path: str, timeout: float = 1.0) -> sqlite3.Connection:
        conn = opened(path, timeout)
        conn.set_trace_callback(statements.append)
        return conn

    monkeypatch.setattr(store, "connect", traced)
    pages = [("", {}), ("errors", {}), ("error", {"service": "shop", "key": key}),
             ("releases", {}), ("releases", {"service": "shop"}), ("health", {}),
             ("transaction", {"id": tx["id"]}), (ui.TRACES + tx["trace_id"], {})]
    for window in series.WINDOWS:
        pages += [("transactions", {"service": "shop", "window": window}),
                  ("transactions/group", {"service": "shop", "name": "GET /a",
                                          "window": window, "low": "0.5", "high": "20"})]
    for path, query in pages:
        assert ui.render(serve.store, ui.ROOT + path, query).status == 200, path
    monkeypatch.undo()
    assert len(statements) > 50
    conn = connect(serve.store.path)
    big = ("transactions", "spans", "errors", "metricsets", "transaction_minutes",
           "transaction_span_minutes", "span_minutes")
    for sql in {s for s in statements if s.lstrip().upper().startswith(("SELECT", "WITH"))}:
        plan = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql)]
        scans = [line for line in plan if line.startswith("SCAN ")
                 and line.split()[1] in big]
        assert scans == [], (sql, plan)
    conn.close()
