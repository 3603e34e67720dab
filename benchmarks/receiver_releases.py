"""How fast the error and releases pages answer on a big database (not a test; run by hand):

    .venv/bin/python benchmarks/receiver_releases.py

Fills a database with 100,000 transactions over the last 24 h (four services, ten releases
each, a dozen transaction names) and 20,000 errors in 40 groups (some resolved, some regressed)
straight through executemany, then starts the real receiver on it and times each page over
HTTP (best of 3), and prints the query plans of the pages' queries.
"""

from __future__ import annotations

import json
import random
import sqlite3
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from beatlib.receiver import Receiver, queries
from beatlib.receiver.store import connect, create_schema

TRANSACTIONS = 100_000
ERRORS = 20_000
SERVICES = ["shop", "api", "worker", "auth"]
RELEASES = 10
NOW = time.time_ns() // 1000
DAY = 86_400_000_000


def fill(conn: sqlite3.Connection) -> None:
    rng = random.Random(13)
    conn.execute("PRAGMA synchronous=OFF")
    names = [f"{verb} /{thing}" for verb in ("GET", "POST")
             for thing in ("items", "orders", "cart", "users", "search", "health")]
    rows = []
    for i in range(TRANSACTIONS):
        service = SERVICES[i % len(SERVICES)]
        ts = NOW - DAY + DAY * i // TRANSACTIONS  # releases follow each other in time
        version = f"1.{i * RELEASES // TRANSACTIONS}"
        failed = rng.random() < 0.03
        rows.append((f"{i:016x}", f"{i:032x}", None, service, version, "production",
                     rng.choice(names), "request", "HTTP 5xx" if failed else "HTTP 2xx",
                     "failure" if failed else "success", ts, rng.lognormvariate(3, 0.9), 1,
                     0, 0, None))
    errors = []
    for i in range(ERRORS):
        tx = rows[rng.randrange(TRANSACTIONS)]
        key = f"group{i % 40:02d}"
        body = json.dumps({"id": f"e{i:031x}", "exception": {
            "type": "KeyError", "message": "'user'", "handled": False, "stacktrace": [
                {"filename": "shop/views.py", "function": "checkout", "lineno": 12,
                 "vars": {"user": None, "cart": list(range(20))}}]}})
        errors.append((f"e{i:031x}", tx[3], tx[4], "production", key, tx[10], tx[1], tx[0],
                       tx[0], tx[6], "shop/views.py in checkout", "KeyError", "'user'", 0,
                       None, None, body))
    with conn:
        conn.executemany(f"INSERT INTO transactions VALUES ({', '.join('?' * 16)})", rows)
        conn.executemany(f"""INSERT INTO errors (id, service, service_version, environment,
                             grouping_key, timestamp, trace_id, transaction_id, parent_id,
                             transaction_name, culprit, type, message, handled, level,
                             assignee_key, body) VALUES ({', '.join('?' * 17)})""", errors)
        conn.execute("""INSERT INTO releases (service, version, first_seen, last_seen)
                        SELECT service, service_version, min(timestamp), max(timestamp)
                        FROM transactions GROUP BY service, service_version""")
        conn.execute("""INSERT INTO error_groups (service, grouping_key, type, message,
                            culprit, count, first_seen, last_seen, first_version,
                            latest_error_id, status, regressed_in, regressed_at, regressions)
                        SELECT service, grouping_key, 'KeyError', '''user''', max(culprit),
                               count(*), min(timestamp), max(timestamp), min(service_version),
                               max(id), CASE WHEN grouping_key < 'group10' THEN 'resolved'
                                             ELSE 'open' END,
                               CASE WHEN grouping_key > 'group30' THEN '1.7' END,
                               CASE WHEN grouping_key > 'group30' THEN max(timestamp) END,
                               grouping_key > 'group30'
                        FROM errors GROUP BY service, grouping_key""")
    conn.execute("ANALYZE")


def main() -> None:
    tmp = tempfile.TemporaryDirectory()
    path = str(Path(tmp.name) / "releases.sqlite3")
    conn = connect(path)
    create_schema(conn)
    started = time.perf_counter()
    fill(conn)
    print(f"filled {TRANSACTIONS:,} transactions, {ERRORS:,} errors in "
          f"{time.perf_counter() - started:.1f} s; sqlite {sqlite3.sqlite_version}")
    group = conn.execute("""SELECT service, grouping_key, count FROM error_groups
                            ORDER BY count DESC LIMIT 1""").fetchone()
    middle = conn.execute("""SELECT id FROM errors WHERE service = ? AND grouping_key = ?
                             ORDER BY timestamp LIMIT 1 OFFSET ?""",
                          (group[0], group[1], group[2] // 2)).fetchone()[0]
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    queries.releases(conn, "shop")
    queries.error_occurrence(conn, group[0], group[1], middle)
    queries.group_statuses(conn)
    conn.set_trace_callback(None)
    for plan in sorted({row[3] for sql in statements
                        for row in conn.execute("EXPLAIN QUERY PLAN " + sql)}):
        print(f"      plan: {plan}")
    conn.close()

    receiver = Receiver(port=0, db_path=path).start()
    try:
        pages = {
            "releases (all services)": "/ui/releases",
            "releases shop": "/ui/releases?service=shop",
            "errors (open)": "/ui/errors",
            "errors all": "/ui/errors?status=all",
            f"error group ({group[2]} occurrences), latest":
                f"/ui/error?service={group[0]}&key={group[1]}",
            "error group, the middle occurrence":
                f"/ui/error?service={group[0]}&key={group[1]}&occurrence={middle}",
        }
        for label, url in pages.items():
            best = float("inf")
            for _ in range(3):
                started = time.perf_counter()
                with urllib.request.urlopen(receiver.url + url, timeout=30) as resp:
                    assert resp.status == 200
                    resp.read()
                best = min(best, time.perf_counter() - started)
            print(f"  {label:45s} {best * 1000:8.1f} ms")
    finally:
        receiver.stop()
        tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
