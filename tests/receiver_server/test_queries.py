"""Dashboard statistics on known data (percentiles, throughput, error rate, windows) and the
receiver's grouping key."""

from __future__ import annotations

import copy
import time
from typing import Any

import pytest

from beatlib.receiver import Receiver, queries
from beatlib.receiver.grouping import culprit, grouping_key
from tests.receiver_server.conftest import ndjson, post, transaction

NOW = time.time_ns() // 1000
MINUTE = 60_000_000


def send(receiver: Receiver, *events: Any) -> None:
    for start in range(0, len(events), 500):
        assert post(receiver.url, ndjson(*events[start:start + 500]))[0] == 202
    assert receiver.flush(10)


def test_percentiles_average_throughput_error_rate(serve: Receiver) -> None:
    # 1..100 ms, shuffled in time: nearest rank gives p50 = 50, p95 = 95, p99 = 99.
    events = [transaction(n, duration=float(n), timestamp=NOW - (n * 7919 % 100) * 1000,
                          outcome="failure" if n % 10 == 0 else "success")
              for n in range(1, 101)]
    events += [transaction(1000 + n, duration=5.0, name="GET /health", timestamp=NOW,
                           outcome="unknown", result="ok") for n in range(3)]
    # No outcome: an HTTP 5xx result is a failure.
    events += [transaction(1100 + n, duration=1.0, name="GET /legacy", timestamp=NOW,
                           outcome=None, result=f"HTTP {n + 3}xx") for n in range(3)]
    # Two hours ago: outside the 1h window, inside "all".
    events.append(transaction(2000, duration=1000.0, timestamp=NOW - 120 * MINUTE))
    send(serve, *events)
    with serve.store.reader() as conn:
        groups = {g["name"]: g for g in queries.transaction_groups(conn, "shop", "1h", NOW)}
        orders = groups["GET /orders"]
        assert orders["count"] == 100
        assert orders["avg"] == pytest.approx(50.5)
        assert (orders["p50"], orders["p95"], orders["p99"]) == (50.0, 95.0, 99.0)
        assert orders["tpm"] == pytest.approx(100 * 60)  # 0.1 s of data: over 1 s, at least
        assert orders["error_rate"] == pytest.approx(0.1)
        health = groups["GET /health"]
        assert (health["count"], health["p50"], health["p99"]) == (3, 5.0, 5.0)
        assert health["error_rate"] is None  # no outcome known: no rate, rather than 0%
        assert groups["GET /legacy"]["error_rate"] == pytest.approx(1 / 3)
        assert list(groups) == ["GET /orders", "GET /health", "GET /legacy"]  # by total time

        everything = {g["name"]: g for g in queries.transaction_groups(conn, "shop", "all", NOW)}
        assert everything["GET /orders"]["count"] == 101
        assert everything["GET /orders"]["p99"] == 100.0  # rank ceil(0.99*101) = 100
        assert everything["GET /orders"]["tpm"] == pytest.approx(101 / 120, rel=0.01)
        assert queries.transaction_groups(conn, "shop", "15m", NOW + 20 * MINUTE) == []
        assert queries.transaction_groups(conn, "nobody", "1h", NOW) == []


@pytest.mark.parametrize(("n", "p50", "p95", "p99"), [
    (1, 1, 1, 1), (2, 1, 2, 2), (10, 5, 10, 10), (20, 10, 19, 20), (1000, 500, 950, 990),
])
def test_nearest_rank(serve: Receiver, n: int, p50: int, p95: int, p99: int) -> None:
    send(serve, *[transaction(i, duration=float(i), timestamp=NOW) for i in range(1, n + 1)])
    with serve.store.reader() as conn:
        [g] = queries.transaction_groups(conn, "shop", "1h", NOW)
    assert (g["p50"], g["p95"], g["p99"]) == (p50, p95, p99)


def test_waterfall_order_and_orphans(serve: Receiver) -> None:
    _, tx = transaction(1, duration=100.0, timestamp=NOW)

    def span(sid: str, parent: str, start_ms: float, **extra: Any) -> tuple[str, dict[str, Any]]:
        return "span", {"id": sid, "trace_id": tx["trace_id"], "parent_id": parent,
                        "transaction_id": tx["id"], "name": sid, "type": "db", "duration": 5.0,
                        "timestamp": NOW + int(start_ms * 1000), **extra}

    send(serve, ("transaction", tx), span("b", tx["id"], 50), span("a", tx["id"], 10),
         span("a1", "a", 12), span("lost", "gone", 1),
         ("span", {"id": "rel", "trace_id": tx["trace_id"], "parent_id": tx["id"],
                   "transaction_id": tx["id"], "name": "rel", "type": "app", "duration": 1,
                   "start": 70.0}))
    with serve.store.reader() as conn:
        detail = queries.transaction(conn, tx["id"])
    assert detail is not None
    assert [(s["name"], s["depth"], s["offset"]) for s in detail["spans"]] == [
        ("a", 0, 10.0), ("a1", 1, 12.0), ("b", 0, 50.0), ("rel", 0, 70.0), ("lost", 0, 1.0)]


# --- grouping key ---------------------------------------------------------------------------

ERROR: dict[str, Any] = {
    "id": "1",
    "exception": {
        "type": "KeyError", "message": "'user 17'",
        "stacktrace": [
            {"module": "shop.cart", "function": "total", "lineno": 40, "library_frame": False},
            {"module": "shop.views", "function": "checkout", "lineno": 12,
             "library_frame": False},
            {"module": "flask.app", "function": "dispatch", "lineno": 900,
             "library_frame": True},
        ],
    },
}


def variant(**changes: Any) -> dict[str, Any]:
    error = copy.deepcopy(ERROR)
    frames = error["exception"]["stacktrace"]
    for key, value in changes.items():
        if key == "message":
            error["exception"]["message"] = value
        elif key == "library_function":
            frames[2]["function"] = value
        else:
            index, field = key.split("_", 1)
            frames[int(index[1:])][field] = value
    return error


def test_grouping_ignores_lines_messages_and_library_frames() -> None:
    key = grouping_key(ERROR)
    assert grouping_key(variant(f0_lineno=41, f1_lineno=99)) == key
    assert grouping_key(variant(message="'user 18'")) == key
    assert grouping_key(variant(library_function="full_dispatch")) == key
    assert len(key) == 32


def test_grouping_follows_app_functions_and_types() -> None:
    key = grouping_key(ERROR)
    assert grouping_key(variant(f0_function="subtotal")) != key
    assert grouping_key(variant(f1_module="shop.api")) != key
    other_type = copy.deepcopy(ERROR)
    other_type["exception"]["type"] = "IndexError"
    assert grouping_key(other_type) != key
    caused = copy.deepcopy(ERROR)
    caused["exception"]["cause"] = [{"type": "OSError", "message": "x"}]
    assert grouping_key(caused) != key


def test_grouping_of_log_messages() -> None:
    def log(message: str, param: str | None = None) -> dict[str, Any]:
        return {"id": "1", "log": {"message": message, "param_message": param}}

    assert grouping_key(log("disk 1 full", "disk %s full")) == \
        grouping_key(log("disk 2 full", "disk %s full"))
    assert grouping_key(log("disk 1 full")) != grouping_key(log("disk 2 full"))


def test_culprit() -> None:
    assert culprit(ERROR) == "shop.cart in total"
    assert culprit({**ERROR, "culprit": "given"}) == "given"
    only_library = {"id": "1", "exception": {"type": "E", "stacktrace": [
        {"filename": "lib.py", "function": "f", "library_frame": True}]}}
    assert culprit(only_library) == "lib.py in f"
    assert culprit({"id": "1", "log": {"message": "m"}}) is None
