"""How fast the dashboard answers on a big database (not a test; run by hand):

    .venv/bin/python benchmarks/receiver_pages.py [--db PATH] [--keep] [--pages]
    .venv/bin/python benchmarks/receiver_pages.py --writer [--profile]

Fills a database with 100,000 transactions and 1,000,000 spans over the last 24 h (four
services, a dozen transaction names each, ten spans per transaction of the usual types, exit
spans with their destination) and 5,000 errors in 20 groups, straight through executemany
(the per-minute sums as schema steps 4 and 5 make them); then times each query of
`beatlib.receiver.series` (best of 3, with its query plan) and every page through
`ui.render` (best of 3), and prints a table. `--keep` on a database an older receiver
filled migrates it first (and says how long that took). `--writer` times the store's
writer instead: events per second stored into a new database; `--profile` also says
where its time goes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

from beatlib.receiver import schema, series, ui
from beatlib.receiver.store import Store, connect, create_schema

TRANSACTIONS = 100_000
SPANS_PER_TRANSACTION = 10
ERRORS = 5_000
SERVICES = {"shop": 0.5, "api": 0.25, "worker": 0.15, "auth": 0.1}  # share of transactions
# (type, subtype, action, destination resource, target name), weighted by position
SPAN_KINDS = [
    ("db", "postgresql", "query", "postgresql/shop", "shop"),
    ("db", "postgresql", "query", "postgresql/shop", "shop"),
    ("db", "postgresql", "query", "postgresql/shop", "shop"),
    ("cache", "redis", "query", "redis", None),
    ("cache", "redis", "query", "redis", None),
    ("external", "http", "GET", "payments.example.com:443", "payments.example.com:443"),
    ("external", "http", "GET", "prices.internal:8080", "prices.internal:8080"),
    ("template", "jinja2", "render", None, None),
    ("app", None, None, None, None),
    ("db", "sqlite", "query", "sqlite/local", "local"),
]
SPAN_COLUMNS = ("id, transaction_id, trace_id, parent_id, service, name, type, subtype, action, "
                "timestamp, start, duration, outcome, sync, context, stacktrace, destination")
NOW = time.time_ns() // 1000
DAY = 86_400_000_000


def transactions(rng: random.Random) -> Iterator[tuple[Any, ...]]:
    names = {s: [f"{verb} /{s}/{thing}" for verb in ("GET", "POST")
                 for thing in ("items", "orders", "cart", "users", "search", "health")]
             for s in SERVICES}
    services, weights = list(SERVICES), list(SERVICES.values())
    for i in range(TRANSACTIONS):
        service = rng.choices(services, weights)[0]
        # more traffic by day than by night
        ts = NOW - int(DAY * rng.random() ** 1.3)
        failed = rng.random() < 0.03
        yield (f"{i:016x}", f"{i:032x}", None, service, "1.0", "production",
               rng.choice(names[service]), "request", "HTTP 5xx" if failed else "HTTP 2xx",
               "failure" if failed else "success", ts, rng.lognormvariate(3, 0.9), 1,
               SPANS_PER_TRANSACTION, 0, None)


def spans(rows: list[tuple[Any, ...]], rng: random.Random) -> Iterator[tuple[Any, ...]]:
    from beatlib.receiver.rows import destination

    for tx in rows:
        tx_id, trace_id, service, ts, duration = tx[0], tx[1], tx[3], tx[10], tx[11]
        for n in range(SPANS_PER_TRANSACTION):
            kind, subtype, action, resource, target = SPAN_KINDS[n]
            context: dict[str, Any] | None = None
            if resource:
                context = {"destination": {"service": {"resource": resource}},
                           "service": {"target": {"type": subtype, "name": target}}}
                if kind == "db":
                    context["db"] = {"statement": "SELECT * FROM items WHERE id = ?",
                                     "type": "sql"}
            yield (f"{tx_id[:12]}{n:04x}", tx_id, trace_id, tx_id, service,
                   f"{kind} {n}", kind, subtype, action,
                   ts + int(duration * 1000 * n / SPANS_PER_TRANSACTION), None,
                   duration / SPANS_PER_TRANSACTION * rng.random(), "success", 1,
                   None if context is None else json.dumps(context), None,
                   destination(context))


def errors(rows: list[tuple[Any, ...]], rng: random.Random) -> Iterator[tuple[Any, ...]]:
    for i in range(ERRORS):
        tx = rng.choice(rows)
        body = json.dumps({"id": f"e{i:015x}", "exception": {"type": "KeyError"}})
        yield (f"e{i:015x}", tx[3], "1.0", "production", f"group{i % 20:02d}", tx[10], tx[1],
               tx[0], tx[0], tx[6], "shop/views.py in checkout", "KeyError", "'user'", 0,
               None, None, body)


def fill(conn: sqlite3.Connection) -> None:
    rng = random.Random(13)
    started = time.perf_counter()
    conn.execute("PRAGMA synchronous=OFF")  # a throwaway database: no fsync while filling
    conn.execute("PRAGMA cache_size=-262144")
    tx_rows = list(transactions(rng))
    with conn:
        conn.executemany(f"INSERT INTO transactions VALUES ({', '.join('?' * 16)})", tx_rows)
        conn.executemany(f"INSERT INTO spans ({SPAN_COLUMNS}) VALUES ({', '.join('?' * 17)})",
                         spans(tx_rows, rng))
        conn.execute("""INSERT INTO span_minutes
            SELECT service, timestamp / 60000000 * 60000000, type, ifnull(destination, ''),
                   count(*), sum(duration)
            FROM spans WHERE timestamp IS NOT NULL GROUP BY 1, 2, 3, 4""")
        schema.fill_rollups(conn)  # the transaction rollups, as schema step 5 makes them
        conn.executemany("""INSERT INTO errors (id, service, service_version, environment,
                            grouping_key, timestamp, trace_id, transaction_id, parent_id,
                            transaction_name, culprit, type, message, handled, level,
                            assignee_key, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?,
                            ?, ?, ?, ?, ?)""", errors(tx_rows, rng))
    print(f"filled {TRANSACTIONS:,} transactions, {TRANSACTIONS * SPANS_PER_TRANSACTION:,} "
          f"spans, {ERRORS:,} errors in {time.perf_counter() - started:.1f} s")
    started = time.perf_counter()
    conn.execute("ANALYZE")
    print(f"ANALYZE in {time.perf_counter() - started:.1f} s")


def plans(conn: sqlite3.Connection, run: Callable[[], Any]) -> list[str]:
    """The query plan of every statement `run` executes (a trace callback catches them)."""
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    try:
        run()
    finally:
        conn.set_trace_callback(None)
    out = []
    for sql in statements:
        plan = conn.execute("EXPLAIN QUERY PLAN " + sql).fetchall()
        out.extend(row[3] for row in plan)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", help="database to fill (default: a temporary file)")
    parser.add_argument("--keep", action="store_true", help="reuse --db if already filled")
    parser.add_argument("--pages", action="store_true", help="time the pages only")
    parser.add_argument("--writer", action="store_true", help="time the writer instead")
    parser.add_argument("--profile", action="store_true",
                        help="with --writer: where the writer's time goes (cProfile of its "
                             "batches, and the time of each statement)")
    args = parser.parse_args()
    if args.writer:
        return writer(profile=args.profile)
    tmp = tempfile.TemporaryDirectory()
    path = args.db or os.path.join(tmp.name, "pages.sqlite3")
    conn = connect(path)
    started = time.perf_counter()
    create_schema(conn)  # an older database (--keep): migrated here
    print(f"schema {schema.SCHEMA_VERSION} ready in {time.perf_counter() - started:.1f} s")
    if not (args.keep and conn.execute("SELECT count(*) FROM spans").fetchone()[0]):
        conn.execute("DELETE FROM spans")
        conn.execute("DELETE FROM transactions")
        conn.execute("DELETE FROM errors")
        for table in ("span_minutes", "transaction_minutes", "transaction_span_minutes"):
            conn.execute(f"DELETE FROM {table}")
        fill(conn)
    print(f"database {os.path.getsize(path) / 2**20:.0f} MiB; sqlite {sqlite3.sqlite_version}")
    name = "GET /shop/items"
    cases: list[tuple[str, Callable[[], Any]]] = []
    for window in ("1h", "24h", "7d") if not args.pages else ():
        cases += [
            (f"transaction_series shop {window}",
             lambda w=window: series.transaction_series(conn, "shop", w)),
            (f"transaction_series shop+name {window}",
             lambda w=window: series.transaction_series(conn, "shop", w, name=name)),
            (f"distribution {window}", lambda w=window: series.distribution(conn, "shop", name, w)),
            (f"samples 10-20 ms {window}",
             lambda w=window: series.samples(conn, "shop", name, 10.0, 20.0, w)),
            (f"samples 5000+ ms {window}",
             lambda w=window: series.samples(conn, "shop", name, 5000.0, 1e9, w)),
            (f"span_type_series shop {window}",
             lambda w=window: series.span_type_series(conn, "shop", w)),
            (f"span_type_series shop+name {window}",
             lambda w=window: series.span_type_series(conn, "shop", w, name=name)),
            (f"dependency_series shop {window}",
             lambda w=window: series.dependency_series(conn, "shop", w)),
            (f"dependency_series shop+name {window}",
             lambda w=window: series.dependency_series(conn, "shop", w, name=name)),
            (f"error_series {window}",
             lambda w=window: series.error_series(conn, "shop", "group03", w)),
        ]
    seen_plans: set[str] = set()
    for label, run in cases:
        best = min(_timed(run) for _ in range(3))
        print(f"  {label:38s} {best * 1000:8.1f} ms")
        for line in plans(conn, run):
            if line not in seen_plans:
                seen_plans.add(line)
                print(f"      plan: {line}")
    groups(conn)
    tx_id, trace_id = conn.execute("SELECT id, trace_id FROM transactions WHERE service = "
                                   "'shop' ORDER BY timestamp DESC LIMIT 1").fetchone()
    conn.close()
    pages(Store(path), name, tx_id, trace_id)
    tmp.cleanup()


def groups(conn: sqlite3.Connection) -> None:
    """The services, releases and error groups of the filled rows (as the writer keeps them)."""
    if conn.execute("SELECT count(*) FROM error_groups").fetchone()[0]:
        return
    with conn:
        conn.execute("""INSERT INTO services (name, environment, version, agent, first_seen,
                            last_seen)
                        SELECT service, 'production', '1.0', 'beatlib 0', min(timestamp),
                               max(timestamp) FROM transactions GROUP BY service""")
        conn.execute("""INSERT INTO releases (service, version, first_seen, last_seen)
                        SELECT service, '1.0', min(timestamp), max(timestamp)
                        FROM transactions GROUP BY service""")
        conn.execute("""INSERT INTO error_groups (service, grouping_key, type, message, culprit,
                            count, first_seen, last_seen, first_version, latest_error_id)
                        SELECT service, grouping_key, 'KeyError', 'user', 'checkout',
                               count(*), min(timestamp), max(timestamp), '1.0', max(id)
                        FROM errors GROUP BY service, grouping_key""")


def pages(store: Store, name: str, tx_id: str, trace_id: str) -> None:
    """Every page through ui.render, best of 3, as a table."""
    cases: list[tuple[str, dict[str, str]]] = [
        ("", {}), ("errors", {}), ("errors", {"service": "shop"}),
        ("errors", {"status": "all"}), ("releases", {}), ("releases", {"service": "shop"}),
        ("transaction", {"id": tx_id}), ("traces/" + trace_id, {})]
    cases += [("health", {"window": window}) for window in ("15m", "24h", "all")]
    for window in series.WINDOWS:
        cases += [("transactions", {"service": "shop", "window": window}),
                  ("transactions/group", {"service": "shop", "name": name, "window": window}),
                  ("error", {"service": "shop", "key": "group03", "window": window})]
    cases.append(("transactions/group", {"service": "shop", "name": name, "window": "24h",
                                         "low": "10.0", "high": "12.5"}))
    print("\n| page | query | ms (best of 3) |\n| --- | --- | ---: |")
    for path, query in cases:
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            page = ui.render(store, ui.ROOT + path, query)
            best = min(best, time.perf_counter() - started)
            assert page.status == 200, (path, query, page.status, page.body[:300])
        shown = "&".join(f"{k}={v}" for k, v in query.items())
        print(f"| /ui/{path} | {shown} | {best * 1000:.0f} |")


class _TimedConnection:
    """A connection whose execute() adds its time to `spent`, by statement."""

    def __init__(self, conn: sqlite3.Connection, spent: dict[str, list[float]]) -> None:
        self._conn, self._spent = conn, spent

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        started = time.perf_counter()
        try:
            return self._conn.execute(sql, *args)
        finally:
            key = " ".join(sql.split())[:60]
            total = self._spent.setdefault(key, [0.0, 0])
            total[0] += time.perf_counter() - started
            total[1] += 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def _profiled(spent: dict[str, list[float]]) -> Any:
    """Store._write under cProfile, its connection timed by statement."""
    import cProfile

    profile = cProfile.Profile()
    original = Store._write

    def write(self: Store, conn: sqlite3.Connection, batches: Any) -> None:
        profile.enable()
        try:
            original(self, _TimedConnection(conn, spent), batches)  # type: ignore[arg-type]
        finally:
            profile.disable()

    Store._write = write  # type: ignore[method-assign]
    return profile


def writer(transactions: int = 20_000, per_request: int = 10, profile: bool = False) -> None:
    """Events per second the writer stores: requests of `per_request` transactions with
    SPANS_PER_TRANSACTION spans each, offered as fast as the queue takes them."""
    rng = random.Random(4)
    spent: dict[str, list[float]] = {}
    profiler = _profiled(spent) if profile else None
    tmp = tempfile.TemporaryDirectory()
    store = Store(os.path.join(tmp.name, "writer.sqlite3"), max_queue_events=200_000)
    store.start()
    metadata = {"service": {"name": "shop", "agent": {"name": "beatlib", "version": "0"}}}
    requests = []
    for r in range(transactions // per_request):
        events: list[tuple[str, dict[str, Any]]] = []
        for t in range(per_request):
            tx_id = f"{r:08x}{t:08x}"
            ts = NOW - rng.randrange(DAY)
            events.append(("transaction", {
                "id": tx_id, "trace_id": tx_id * 2, "name": "GET /items", "type": "request",
                "duration": 12.5, "timestamp": ts, "outcome": "success",
                "span_count": {"started": SPANS_PER_TRANSACTION}}))
            for n in range(SPANS_PER_TRANSACTION):
                kind, subtype, action, resource, target = SPAN_KINDS[n]
                context = ({"destination": {"service": {"resource": resource}},
                            "service": {"target": {"type": subtype, "name": target}}}
                           if resource else None)
                events.append(("span", {
                    "id": f"{tx_id}{n:04x}", "transaction_id": tx_id, "trace_id": tx_id * 2,
                    "parent_id": tx_id, "name": f"{kind} {n}", "type": kind,
                    "subtype": subtype, "action": action, "timestamp": ts + n,
                    "duration": 1.0, **({"context": context} if context else {})}))
        requests.append(events)
    total = sum(len(e) for e in requests)
    started = time.perf_counter()
    for events in requests:
        while not store.offer(metadata, events):
            time.sleep(0.001)
    store.flush(600)
    elapsed = time.perf_counter() - started
    store.stop()
    print(f"writer: {total:,} events ({transactions:,} transactions x "
          f"{SPANS_PER_TRANSACTION + 1}) in {elapsed:.1f} s: {total / elapsed:,.0f} events/s")
    tmp.cleanup()
    if profiler is not None:
        import pstats

        print("\nstatements (s, calls, µs per call):")
        for sql, (seconds, calls) in sorted(spent.items(), key=lambda kv: -kv[1][0]):
            print(f"  {seconds:7.2f} {calls:8d} {seconds / calls * 1e6:7.1f}  {sql}")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(15)


def _timed(run: Callable[[], Any]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


if __name__ == "__main__":
    sys.exit(main())
