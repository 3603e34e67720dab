"""An instrumented background job, sent to the local validating receiver the tests use.

Runs a small "nightly report" job (SQLite queries, a render step, a failing item now and
then) under beatlib, then prints what the receiver got: transactions with their average and
p95 duration, spans by type, and the captured errors with their culprit and locals.
Run from the repository root: `python examples/job.py`.
"""

from __future__ import annotations

import random
import sqlite3
import statistics
import sys
from collections import Counter, defaultdict
from pathlib import Path

import beatlib

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from receiver import Receiver  # noqa: E402  (the tests' receiver, not an installed module)


def make_db() -> sqlite3.Connection:
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, customer TEXT, total REAL)")
    rng = random.Random(1)
    db.executemany(
        "INSERT INTO orders (customer, total) VALUES (?, ?)",
        [(f"customer-{rng.randrange(50)}", rng.uniform(5, 500)) for _ in range(5000)],
    )
    return db


@beatlib.capture_span(span_type="template", span_subtype="text", span_action="render")
def render_report(rows: list[tuple[str, float]]) -> str:
    return "\n".join(f"{customer:<14}{total:>10.2f}" for customer, total in rows)


def report_for(db: sqlite3.Connection, customer: str) -> str:
    # sqlite3 is instrumented: each query becomes a `db` span by itself.
    rows = db.execute(
        "SELECT customer, SUM(total) FROM orders WHERE customer = ? GROUP BY customer",
        (customer,),
    ).fetchall()
    (average,) = db.execute("SELECT AVG(total) FROM orders").fetchone()
    region = int(customer.split("-")[1]) % 5
    share = rows[0][1] / average / region  # a bug: region 0 divides by zero
    beatlib.label(customer=customer, share=round(share, 3))
    return render_report(rows)


def run_job(client: beatlib.Client, runs: int) -> None:
    db = make_db()
    rng = random.Random(2)
    for _ in range(runs):
        customer = f"customer-{rng.randrange(12)}"
        client.begin_transaction("task")
        try:
            report_for(db, customer)
            client.end_transaction("nightly report", "success")
        except Exception:
            client.capture_exception(handled=False)
            beatlib.set_transaction_outcome("failure")
            client.end_transaction("nightly report", "failure")


def summarize(receiver: Receiver) -> None:
    transactions = receiver.events("transaction")
    spans = receiver.events("span")
    errors = receiver.events("error")
    metricsets = receiver.events("metricset")
    print(f"received {len(transactions)} transactions, {len(spans)} spans, {len(errors)} errors,"
          f" {len(metricsets)} metricsets; invalid lines: {len(receiver.invalid)}")
    durations: dict[str, list[float]] = defaultdict(list)
    for tx in transactions:
        durations[f"{tx['name']} ({tx['result']})"].append(tx["duration"])
    print("\ntransaction                       count    avg ms    p95 ms")
    for name, values in sorted(durations.items()):
        p95 = statistics.quantiles(values, n=20)[-1] if len(values) > 1 else values[0]
        print(f"{name:<32}{len(values):>6}{statistics.mean(values):>10.3f}{p95:>10.3f}")
    print("\nspans:", dict(Counter(f"{s['name']} ({s['type']}/{s.get('subtype')})" for s in spans)))
    if errors:
        error = errors[0]["exception"]
        frame = next(f for f in error["stacktrace"] if not f["library_frame"])
        print(f"\nerror: {error['type']}: {error['message']}  (culprit {errors[0]['culprit']})")
        source = frame.get("context_line", "").strip()
        print(f"  at {frame['filename']}:{frame['lineno']}  {source}")
        print(f"  locals: {frame.get('vars')}")


def main() -> int:
    receiver = Receiver().start()
    try:
        client = beatlib.Client(
            service_name="example-job", server_url=receiver.url, flush_interval="1s"
        )
        beatlib.instrument()
        run_job(client, runs=200)
        if not client.close(10):
            print("beatlib could not send everything:", client.transport.stats())
            return 1
        summarize(receiver)
    finally:
        receiver.stop()
    return 1 if receiver.invalid else 0


if __name__ == "__main__":
    sys.exit(main())
