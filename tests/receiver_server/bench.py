"""Numbers for `beatlib serve` on this machine (not a test; run it by hand):

    .venv/bin/python -m tests.receiver_server.bench

1. intake: the real Client sends transactions with 3 spans each to a receiver running in
   its own process; events per second until all are stored.
2. queries: the dashboard's queries on 100,000 stored transactions.
"""

from __future__ import annotations

import os
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import beatlib
from beatlib.receiver import Receiver, queries
from tests.receiver_server.conftest import ndjson, post


def intake(db: Path, transactions: int = 20_000) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "beatlib.receiver", "--port", "0",
                             "--db", str(db), "--max-queue-events", "100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().split(" on ")[1].strip()
        client = beatlib.Client(service_name="bench", server_url=url, flush_interval="1s",
                                max_queue_events=20_000)
        started = time.perf_counter()
        for i in range(transactions):
            client.begin_transaction("request")
            for n in range(3):
                with beatlib.capture_span(f"SELECT {n}", span_type="db", span_subtype="sqlite"):
                    pass
            client.end_transaction(f"GET /items/{i % 20}", "HTTP 2xx")
        recorded = time.perf_counter() - started
        client.close(timeout=120)
        sent = time.perf_counter() - started
        conn = sqlite3.connect(db)
        expected = transactions * 4
        while True:
            stored = conn.execute("SELECT (SELECT count(*) FROM transactions) + "
                                  "(SELECT count(*) FROM spans)").fetchone()[0]
            if stored >= expected or time.perf_counter() - started > 300:
                break
            time.sleep(0.05)
        total = time.perf_counter() - started
        print(f"intake: {stored}/{expected} events ({transactions} transactions x 4) "
              f"recorded in {recorded:.1f}s, sent by {sent:.1f}s, stored by {total:.1f}s: "
              f"{stored / total:,.0f} events/s end to end")
        with urllib.request.urlopen(url + "/") as resp:
            assert resp.status == 200
    finally:
        proc.terminate()
        proc.wait(10)


def query_times(db: Path, n: int = 100_000) -> None:
    rng = random.Random(1)
    now = time.time_ns() // 1000
    with Receiver(port=0, db_path=str(db), max_queue_events=200_000) as receiver:
        started = time.perf_counter()
        batch = []
        for i in range(n):
            batch.append(("transaction", {
                "id": f"{i:016x}", "trace_id": f"{i:032x}", "type": "request",
                "name": f"GET /items/{i % 25}", "duration": rng.lognormvariate(3, 1),
                "timestamp": now - rng.randrange(7 * 86400) * 1_000_000,
                "outcome": "failure" if rng.random() < 0.02 else "success",
                "span_count": {"started": 0}}))
            if len(batch) == 1000:
                assert post(receiver.url, ndjson(*batch))[0] == 202
                batch = []
        assert receiver.flush(120)
        print(f"stored {n:,} transactions in {time.perf_counter() - started:.1f}s; "
              f"database {os.path.getsize(db) / 2**20:.0f} MiB")
        with receiver.store.reader() as conn:
            for label, run in [
                ("services", lambda: queries.services(conn)),
                *[(f"transaction_groups {w}", lambda w=w: queries.transaction_groups(
                    conn, "shop", w)) for w in ("1h", "24h", "all")],
                ("transaction_samples", lambda: queries.transaction_samples(
                    conn, "shop", "GET /items/3")),
                ("transaction", lambda: queries.transaction(conn, f"{n // 2:016x}")),
                ("releases", lambda: queries.releases(conn)),
            ]:
                best = min(_timed(run) for _ in range(3))
                print(f"  {label:28s} {best * 1000:8.1f} ms")
        for page in ("", "transactions?service=shop&window=all", "releases"):
            started = time.perf_counter()
            with urllib.request.urlopen(f"{receiver.url}/ui/{page}") as resp:
                resp.read()
            print(f"  GET /ui/{page:37s} {(time.perf_counter() - started) * 1000:8.1f} ms")


def _timed(run: object) -> float:
    started = time.perf_counter()
    run()  # type: ignore[operator]
    return time.perf_counter() - started


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        intake(Path(tmp) / "intake.sqlite3")
        query_times(Path(tmp) / "queries.sqlite3")
