"""Readable context tables, times to the millisecond, sortable lists, agent health from a
real client's transport counters, and retention (`serve --retention`)."""

from __future__ import annotations

import html
import re
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from markupsafe import escape

import beatlib
from beatlib.receiver import Receiver, server, ui
from beatlib.receiver.retention import Retention, parse_duration
from tests.receiver_server.conftest import get, ndjson, post, transaction

EVIL = "\"'><script>alert(1)</script>"


def page(receiver: Receiver, path: str) -> str:
    status, body = get(receiver.dashboard_url + path)
    assert status == 200, path
    return body.decode()


# --- context tables -------------------------------------------------------------------------


def test_context_is_tables_with_nested_values_and_everything_escaped(serve: Receiver) -> None:
    long_value = "x" * 3000
    context = {
        "request": {"method": "POST", "url": {"full": "http://h/p?q=" + EVIL},
                    "headers": {"user-agent": EVIL, "x-list": ["a", EVIL]}},
        "response": {"status_code": 500, "finished": True},
        "user": {"id": 7, "email": EVIL},
        "tags": {EVIL: "label"},
        "custom": {"long": long_value, "deep": {"a": {"b": {"c": {"d": {"e": {"f": {"g": 1}}}}}}}},
    }
    tx_line = transaction(1, context=context)
    error = {"id": "e" * 32, "timestamp": tx_line[1]["timestamp"], "context": context,
             "exception": {"type": "ValueError", "message": "boom"},
             "transaction_id": tx_line[1]["id"], "trace_id": tx_line[1]["trace_id"],
             "parent_id": tx_line[1]["id"]}
    assert post(serve.url, ndjson(tx_line, ("error", error)))[0] == 202
    assert serve.flush(10)
    tx_page = page(serve, "transaction?id=" + tx_line[1]["id"])
    status, error_list = get(serve.dashboard_url + "errors")
    key = re.search(r'href="/ui/error\?([^"]+)"', error_list.decode())
    assert key is not None
    error_page = page(serve, "error?" + html.unescape(key[1]))
    for body in (tx_page, error_page):
        assert "<script>" not in body and "<pre>{" not in body  # no raw JSON dump
        assert str(escape(EVIL)) in body
        titles = re.findall(r'<h4 class="ctx-title">([^<]+)</h4>', body)
        assert titles[:5] == ["Request", "Response", "User", "Labels", "Custom"]
        # nested objects are nested tables, keyed
        assert re.search(r'<th scope="row">headers</th><td><table class="ctx">', body)
        assert '<th scope="row">user-agent</th>' in body
        assert '<th scope="row">1</th>' in body  # a list's items by index
        assert '<span class="ctx-value">500</span>' in body
        assert '<span class="ctx-value">true</span>' in body
        assert long_value in body  # whole, wrapped by the stylesheet, not cut
        assert '<span class="ctx-value">{&#34;g&#34;: 1}</span>' in body  # below the depth


def test_context_sections_order_and_shapes() -> None:
    sections = ui.context_sections({"zeta": {"k": 1}, "custom": {"a": [1, {"b": None}]},
                                    "request": {"method": "GET"}, "empty": {}})
    assert [s["title"] for s in sections] == ["Request", "Custom", "Zeta"]
    custom = sections[1]["rows"][0]
    assert custom["key"] == "a" and custom["rows"][0] == {"key": "0", "rows": None, "value": "1"}
    assert custom["rows"][1]["rows"] == [{"key": "b", "rows": None, "value": "null"}]
    assert ui.context_sections(None) == [] and ui.context_sections("text")[0]["title"] == "Context"


# --- times ----------------------------------------------------------------------------------


def test_times_have_milliseconds_the_zone_and_a_relative_form(monkeypatch) -> None:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    try:
        us = 1_796_133_787_123_456  # 2026-12-01 14:03:07.123456 UTC
        assert str(ui._when(us)) == ('<time datetime="2026-12-01T14:03:07.123+00:00">'
                                     '2026-12-01 14:03:07.123 UTC</time>')
        assert str(ui._ago(us, now_us=us + 185_000_000)) == (
            '<time datetime="2026-12-01T14:03:07.123+00:00" title="2026-12-01 14:03:07.123 UTC">'
            '3 min ago</time>')
        monkeypatch.setenv("TZ", "Europe/Berlin")
        time.tzset()
        assert "15:03:07.123 CET" in str(ui._when(us)) and "+01:00" in str(ui._when(us))
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    assert [ui.relative(d * 1_000_000) for d in (0, 42, 3600 * 5, 86400 * 2, -180)] == [
        "just now", "42 s ago", "5 h ago", "2 d ago", "in 3 min"]


# --- sortable tables ------------------------------------------------------------------------


def test_list_headers_are_sort_links_and_sort_the_right_set(serve: Receiver) -> None:
    lines = [transaction(i, duration=d, name=n) for i, (n, d) in enumerate(
        [("GET /a", 5.0), ("GET /b", 50.0), ("GET /b", 40.0), ("GET /c", 1.0), ("GET /c", 1.0),
         ("GET /c", 1.0)], start=1)]
    assert post(serve.url, ndjson(*lines))[0] == 202
    assert serve.flush(10)
    names = lambda body: re.findall(r'name=GET\+%2F(\w)', body)  # noqa: E731
    default = page(serve, "transactions?service=shop")
    assert names(default) == ["b", "a", "c"]  # by total time
    by_count = page(serve, "transactions?service=shop&sort=count&dir=desc")
    assert names(by_count) == ["c", "b", "a"]
    assert names(page(serve, "transactions?service=shop&sort=name&dir=asc")) == ["a", "b", "c"]
    assert names(page(serve, "transactions?service=shop&sort=nonsense")) == ["b", "a", "c"]
    # the sorted column is marked and its link turns the order round; the others sort first
    # their own way, keeping the page's query
    th = re.search(r'<th class="sortable sorted" aria-sort="descending"><a href="([^"]+)">'
                   r'Count <span class="arrow">▼</span>', by_count)
    assert th is not None
    assert html.unescape(th[1]) == "/ui/transactions?service=shop&window=1h&sort=count&dir=asc"
    assert 'href="/ui/transactions?service=shop&amp;window=1h&amp;sort=name&amp;dir=asc"' \
        in by_count
    assert 'href="/ui/?sort=name&amp;dir=asc">Service</a>' in page(serve, "")


def test_error_groups_are_sorted_in_sql_before_the_limit(serve: Receiver) -> None:
    """The list shows the first 500 groups: sorted by count, the most frequent must be
    among them even when it was seen first of all."""
    now = time.time_ns() // 1000
    events = []
    for i in range(505):
        for j in range(30 if i == 0 else 1):
            events.append(("error", {"id": f"{i:016x}{j:016x}", "timestamp": now + i * 1000 + j,
                                     "log": {"message": f"message {i}"}}))
    assert post(serve.url, ndjson(*events))[0] == 202
    assert serve.flush(20)
    body = page(serve, "errors?sort=count&dir=desc")
    messages = re.findall(r"message (\d+)</a>", body)
    assert len(messages) == 500 and messages[0] == "0"
    assert "message 0</a>" not in page(serve, "errors")  # by last seen it is past the 500th
    plan = " ".join(r[3] for r in sqlite3.connect(serve.db_path).execute(
        "EXPLAIN QUERY PLAN SELECT * FROM error_groups ORDER BY count DESC NULLS LAST, "
        "service, grouping_key LIMIT 500"))
    assert "SCAN error_groups" in plan  # groups are few: one pass over them, no join


# --- agent health ---------------------------------------------------------------------------


def test_agent_health_shows_a_real_clients_counters(serve: Receiver) -> None:
    client = beatlib.Client(service_name="healthy", server_url=serve.url, environ={},
                            flush_interval="50ms", max_queue_events=5)
    try:
        # More than the queue holds at once, from threads racing the worker: some are dropped.
        def burst() -> None:
            for _ in range(200):
                client.begin_transaction("task")
                client.end_transaction("job", "success")
        threads = [threading.Thread(target=burst) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        client.flush(10)  # False: events were lost
        time.sleep(0.2)  # a tick: a metricset with the counters after the flush
        assert client.flush(10)
        stats = client.stats()
    finally:
        client.close(5)
    assert serve.flush(10)
    assert stats["dropped_queue_full"] > 0
    with serve.store.reader() as conn:
        (row,) = ui.health.agent_health(conn, "1h")
    assert row["service"] == "healthy"
    latest = row["latest"]
    # The last report was taken at close, after everything above was sent or dropped.
    assert latest["dropped"] == {"queue full": stats["dropped_queue_full"]}
    assert latest["sent_events"] == stats["sent_events"]
    assert latest["retried"] == stats["retried"] == 0
    assert row["window"] == {k: v for k, v in latest.items() if k != "timestamp"}
    body = page(serve, "health")
    assert "Agent health</a>" in body
    assert f">{stats['dropped_queue_full']}</span> queue full" in body


def metricset(timestamp: int, **counters: int) -> tuple[str, dict]:
    return "metricset", {"timestamp": timestamp, "samples": {
        f"beatlib.transport.{k}": {"type": "counter", "value": v} for k, v in counters.items()}}


def test_health_counts_the_window_from_the_report_before_it_and_across_restarts(
        serve: Receiver) -> None:
    now = time.time_ns() // 1000
    hour = 3600 * 1_000_000
    assert post(serve.url, ndjson(
        metricset(now - 2 * hour, sent_events=100, retried=1),  # before the 1h window
        metricset(now - 30 * 60 * 1_000_000, sent_events=150, retried=3, dropped_send_error=4),
        metricset(now - 10 * 60 * 1_000_000, sent_events=20, dropped_queue_full=2),  # restarted
        metricset(now - 60 * 1_000_000, sent_events=25, dropped_queue_full=2),
    ))[0] == 202
    assert serve.flush(10)
    with serve.store.reader() as conn:
        (row,) = ui.health.agent_health(conn, "1h", now_us=now)
        (all_time,) = ui.health.agent_health(conn, "all", now_us=now)
    assert row["window"]["sent_events"] == 50 + 20 + 5
    assert row["window"]["retried"] == 2
    assert row["window"]["dropped"] == {"send error": 4, "queue full": 2}
    assert row["latest"]["sent_events"] == 25 and row["latest"]["timestamp"] == now - 60_000_000
    assert all_time["window"]["sent_events"] == 100 + 50 + 20 + 5


def test_health_page_escapes_service_names(serve: Receiver) -> None:
    metadata = {"service": {"name": EVIL, "agent": {"name": "beatlib", "version": "0.1"}}}
    assert post(serve.url, ndjson(metricset(time.time_ns() // 1000, sent_events=1,
                                            **{"dropped_rejected": 3}),
                                  metadata=metadata))[0] == 202
    assert serve.flush(10)
    body = page(serve, "health")
    assert "<script>" not in body and str(escape(EVIL)) in body and "3</span> rejected" in body


# --- retention ------------------------------------------------------------------------------


def test_retention_flag_parses_units_and_refuses_bad_values(tmp_path: Path, monkeypatch,
                                                            capsys) -> None:
    assert [parse_duration(t) for t in ("90s", "30m", "12h", "7d", "1.5h")] == [
        90, 1800, 43200, 604800, 5400]
    for bad in ("7", "7w", "-1d", "0d", "d", ""):
        with pytest.raises(ValueError):
            parse_duration(bad)
    assert server.main(["--retention", "7w", "--db", str(tmp_path / "x.db")]) == 2
    assert "--retention" in capsys.readouterr().err
    monkeypatch.setenv("BEATLIB_SERVE_RETENTION", "soon")
    assert server.main(["--db", str(tmp_path / "x.db")]) == 2
    assert "'soon'" in capsys.readouterr().err


def _fill_old(path: str, n_tx: int, spans_per_tx: int, old_us: int) -> None:
    """Old data written straight into a database made by the receiver."""
    conn = sqlite3.connect(path)
    with conn:
        conn.executemany(
            "INSERT INTO transactions (id, trace_id, service, name, type, timestamp, duration)"
            " VALUES (?, ?, 'shop', 'old', 'request', ?, 1.0)",
            [(f"o{i:015x}", f"{i:032x}", old_us + i) for i in range(n_tx)])
        conn.executemany(
            "INSERT INTO spans (id, transaction_id, trace_id, parent_id, service, name, type,"
            " timestamp, start, duration) VALUES (?, ?, ?, ?, 'shop', 'q', 'db', ?, ?, 1.0)",
            [(f"s{i:07x}{j:08x}", f"o{i:015x}", f"{i:032x}", f"o{i:015x}",
              None if j == 0 else old_us + i, 0.5 if j == 0 else None)
             for i in range(n_tx) for j in range(spans_per_tx)])
        conn.executemany(
            "INSERT INTO errors (id, service, grouping_key, timestamp, body) VALUES "
            "(?, 'shop', 'k', ?, '{}')", [(f"e{i:031x}", old_us + i) for i in range(n_tx)])
        conn.executemany(
            "INSERT INTO metricsets (service, timestamp, samples) VALUES ('shop', ?, '{}')",
            [(old_us + i,) for i in range(n_tx)])
    conn.close()


def test_retention_deletes_old_rows_keeps_new_ones_and_groups_and_shrinks_the_file(
        tmp_path: Path) -> None:
    path = str(tmp_path / "apm.sqlite3")
    receiver = Receiver(port=0, db_path=path).start()
    now = time.time_ns() // 1000
    old = now - 8 * 86400 * 1_000_000
    try:
        old_error = {"id": "a" * 32, "timestamp": old, "log": {"message": "old one"}}
        new_error = {"id": "b" * 32, "timestamp": now, "log": {"message": "old one"}}
        assert post(receiver.url, ndjson(("error", old_error), ("error", new_error),
                                         transaction(1), transaction(2, timestamp=old)))[0] == 202
        assert receiver.flush(10)
    finally:
        receiver.stop()
    _fill_old(path, 3000, 4, old)
    size_before = Path(path).stat().st_size
    retention = Retention(path, parse_duration("7d"))
    deleted = retention.sweep()
    assert deleted == {"transactions": 3001, "spans": 12000, "errors": 3001,
                       "metricsets": 3000, "span_minutes": 0, "transaction_minutes": 1,
                       "transaction_span_minutes": 0}  # old rows written straight: no sums
    conn = sqlite3.connect(path)
    assert [r[0] for r in conn.execute("SELECT id FROM transactions")] == [f"{1:016x}"]
    assert conn.execute("SELECT count(*) FROM spans").fetchone()[0] == 0
    assert [r[0] for r in conn.execute("SELECT id FROM errors")] == ["b" * 32]
    # The group keeps its history: both occurrences counted, first seen the old one.
    assert conn.execute("SELECT count, first_seen FROM error_groups WHERE message = 'old one'"
                        ).fetchone() == (2, old)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    assert Path(path).stat().st_size < size_before / 2
    assert not any(retention.sweep().values())


def test_intake_keeps_answering_202_during_a_large_deletion(tmp_path: Path) -> None:
    path = str(tmp_path / "apm.sqlite3")
    Receiver(port=0, db_path=path).start().stop()
    old = time.time_ns() // 1000 - 30 * 86400 * 1_000_000
    _fill_old(path, 4_000, 5, old)  # 20,000 old spans
    receiver = Receiver(port=0, db_path=path, retention=7 * 86400)
    receiver.retention.interval = 0.05  # type: ignore[union-attr]
    receiver.start()
    statuses, latencies = [], []
    try:
        n = 1000
        started = time.monotonic()
        # The sweep's batches share the writer with the posts: on a loaded machine the
        # whole deletion took over 120 s (10,000 transactions then), hence the wide bound.
        while receiver.retention.sweeps == 0 and time.monotonic() - started < 300:  # type: ignore[union-attr]
            t0 = time.monotonic()
            statuses.append(post(receiver.url, ndjson(*[transaction(n + i) for i in range(20)]))[0])
            latencies.append(time.monotonic() - t0)
            n += 20
            time.sleep(0.02)  # about 1,000 transactions a second: well within what the
            # writer stores, so a 503 here would be the deletion's doing, not a full queue's
        took = time.monotonic() - started
        assert receiver.retention.sweeps >= 1  # type: ignore[union-attr]
        assert receiver.flush(20)
    finally:
        receiver.stop()
    assert len(statuses) > 10 and set(statuses) == {202}
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    print(f"deletion of 4,000 tx + 20,000 spans + 8,000 rows took {took:.1f} s; "
          f"{len(statuses)} posts, p50 {latencies[len(latencies) // 2] * 1000:.1f} ms, "
          f"p99 {p99 * 1000:.1f} ms")
    assert p99 < 1.0
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM spans").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM transactions").fetchone()[0] == n - 1000
    conn.close()
