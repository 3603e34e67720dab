"""What the real beatlib Client sends is stored and can be queried: transactions, spans,
errors (grouped, with stacks, locals and assignee), metricsets and releases."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest

import beatlib
from beatlib.receiver import Receiver, queries
from tests.receiver_server.conftest import get, ndjson, post, transaction

ASSIGNEE = {"name": "Ann Author", "email": "Ann@Example.org", "commit": "0123456789abcdef",
            "date": "2025-06-01T10:00:00+00:00"}


@pytest.fixture
def client(serve: Receiver) -> Iterator[beatlib.Client]:
    c = beatlib.Client(service_name="shop", server_url=serve.url, service_version="2.0",
                       environment="test", flush_interval="50ms", assign_errors=False)
    try:
        yield c
    finally:
        c.close()


def charge(order: dict[str, Any]) -> None:
    card_number = "4111"  # noqa: F841 - a local the error must carry (redacted)
    total = order["total"]
    raise ValueError(f"cannot charge {total}")


def test_round_trip(serve: Receiver, client: beatlib.Client) -> None:
    tx = client.begin_transaction("request")
    with beatlib.capture_span("SELECT * FROM orders", span_type="db", span_subtype="sqlite",
                              span_action="query"):
        with beatlib.capture_span("decode rows", span_type="app"):
            time.sleep(0.002)
    with beatlib.capture_span("GET api.example.org", span_type="external", span_subtype="http"):
        pass
    try:
        charge({"total": 12})
    except ValueError:
        error_id = client.capture_exception(custom={"assignee": ASSIGNEE})
    client.end_transaction("POST /orders", "HTTP 5xx")
    tx_id = "%016x" % tx.id
    client.capture_message("disk %s almost full", param_message="disk %s almost full",
                           level="warning")
    assert client.flush(10)
    client.close()  # sends the metricsets
    assert serve.flush(10)
    assert serve.store.counts["skipped"] == 0

    with serve.store.reader() as conn:
        [service] = queries.services(conn)
        assert (service["name"], service["version"], service["environment"]) == \
            ("shop", "2.0", "test")
        assert service["agent"].startswith("beatlib ")
        assert service["cpu_pct"] is not None and service["rss_bytes"] > 0

        detail = queries.transaction(conn, tx_id)
        assert detail is not None
        assert (detail["name"], detail["result"], detail["type"]) == \
            ("POST /orders", "HTTP 5xx", "request")
        names = [(s["name"], s["depth"]) for s in detail["spans"]]
        assert names == [("SELECT * FROM orders", 0), ("decode rows", 1),
                         ("GET api.example.org", 0)]
        db, inner, external = detail["spans"]
        assert (db["type"], db["subtype"], db["action"]) == ("db", "sqlite", "query")
        assert 0 <= db["offset"] <= inner["offset"] <= external["offset"] <= detail["duration"]
        assert inner["duration"] >= 2.0
        assert [e["id"] for e in detail["errors"]] == [error_id]

        groups = queries.error_groups(conn, "shop")
        assert len(groups) == 2
        exc_group = next(g for g in groups if g["type"] == "ValueError")
        assert exc_group["culprit"] == f"{__name__} in charge"
        assert exc_group["message"] == "cannot charge 12"
        assert exc_group["first_version"] == "2.0"
        assert (exc_group["assignee_name"], exc_group["assignee_key"]) == \
            ("Ann Author", "ann@example.org")
        log_group = next(g for g in groups if g["type"] is None)
        assert log_group["message"] == "disk %s almost full"

        full = queries.error_group(conn, "shop", exc_group["grouping_key"])
        assert full is not None
        frame = full["latest"]["exception"]["stacktrace"][0]
        assert frame["function"] == "charge"
        assert "raise ValueError" in frame["context_line"]
        assert frame["pre_context"] and frame["vars"]["total"] == 12
        assert frame["vars"]["card_number"] == "[REDACTED]"
        assert full["occurrences"][0]["transaction_id"] == tx_id

        assert [p["key"] for p in queries.assignees(conn)] == ["ann@example.org"]
        assert queries.error_groups(conn, assignee="ann@example.org") == [exc_group]

        [release] = queries.releases(conn, "shop")
        assert release["version"] == "2.0" and release["errors"] == 2
        assert {g["grouping_key"] for g in release["new_error_groups"]} == \
            {g["grouping_key"] for g in groups}

        [stats] = queries.transaction_groups(conn, "shop", "15m")
        assert stats["name"] == "POST /orders" and stats["count"] == 1
        assert stats["p50"] == stats["p99"] == detail["duration"]

        histograms = [json.loads(r["samples"]) for r in conn.execute(
            "SELECT samples FROM metricsets WHERE transaction_name = 'POST /orders'")]
        assert histograms
        assert histograms[0]["transaction.duration.count"]["value"] == 1
        assert queries.metricset_count(conn, "shop") >= 2


def test_errors_group_by_function_not_line_or_message(serve: Receiver,
                                                      client: beatlib.Client) -> None:
    def lookup(key: str) -> None:
        if key == "a":
            raise KeyError(key)  # two raise statements on different lines ...
        raise KeyError(key + "!")  # ... and different messages: one group

    def other(key: str) -> None:
        raise KeyError(key)  # the same type from another function: its own group

    for fn, key in ((lookup, "a"), (lookup, "b"), (other, "c"), (lookup, "a")):
        try:
            fn(key)
        except KeyError:
            client.capture_exception()
    assert client.flush(10) and serve.flush(10)
    with serve.store.reader() as conn:
        groups = queries.error_groups(conn, "shop")
        counts = sorted((g["culprit"].split(" in ")[1], g["count"]) for g in groups)
        assert counts == [("lookup", 3), ("other", 1)]
        lines = {json.loads(r["body"])["exception"]["stacktrace"][0]["lineno"]
                 for r in conn.execute("SELECT body FROM errors WHERE culprit LIKE '%lookup'")}
        assert len(lines) == 2


def test_resent_events_are_not_counted_twice(serve: Receiver) -> None:
    error = ("error", {"id": "e1", "exception": {"type": "E", "message": "m"}})
    body = ndjson(transaction(1), error)
    assert post(serve.url, body)[0] == 202
    assert post(serve.url, body)[0] == 202  # a client retrying after a timeout
    assert serve.flush(10)
    with serve.store.reader() as conn:
        assert conn.execute("SELECT count(*) FROM transactions").fetchone()[0] == 1
        [group] = queries.error_groups(conn)
        assert group["count"] == 1


def test_event_may_name_its_own_service(serve: Receiver) -> None:
    kind, tx = transaction(1)
    tx["context"] = {"service": {"name": "billing", "version": "9"}}
    assert post(serve.url, ndjson((kind, tx)))[0] == 202
    assert serve.flush(10)
    with serve.store.reader() as conn:
        row = conn.execute("SELECT service, service_version FROM transactions").fetchone()
        assert tuple(row) == ("billing", "9")


def test_dashboard_pages_answer(serve: Receiver, client: beatlib.Client) -> None:
    client.begin_transaction("request")
    client.end_transaction("GET /<b>&'\"", "HTTP 2xx")
    assert client.flush(10) and serve.flush(10)
    status, page = get(serve.url + "/ui/transactions?service=shop&window=15m")
    assert status == 200
    assert b"GET /&lt;b&gt;&amp;&#39;&#34;" in page and b"<b>&" not in page  # markupsafe's
    assert get(serve.url + "/ui")[0] == 200  # redirected
    assert get(serve.url + "/ui/transaction?id=nope")[0] == 404
    assert get(serve.url + "/ui/error?service=shop")[0] == 404
    assert get(serve.url + "/ui/transactions?service=shop&window=bogus")[0] == 200
    assert get(serve.url + "/ui/no-such-page")[0] == 404


def test_dashboard_copes_with_odd_data_and_parameters(serve: Receiver) -> None:
    deep: Any = "bottom"
    for _ in range(800):
        deep = {"d": deep}
    odd = "<script>alert(1)</script>\u202e\x00 ünïcode"
    error = ("error", {"id": "e1", "transaction_id": "0000000000000001",
                       "context": {"custom": {"deep": deep}},
                       "exception": {"type": odd, "message": odd, "stacktrace": [
                           {"function": odd, "filename": odd, "lineno": 3, "context_line": odd,
                            "pre_context": [odd, 7], "vars": {odd: deep}}]}})
    kind, tx = transaction(1, name=odd, context={"custom": {"deep": deep}})
    metadata = {"service": {"name": odd, "version": odd, "agent": {"name": odd, "version": "1"}}}
    assert post(serve.url, ndjson((kind, tx), error, metadata=metadata))[0] == 202
    assert serve.flush(10)
    with serve.store.reader() as conn:
        [group] = queries.error_groups(conn)
    pages = ["", "transactions", f"transactions?service={odd}&window=all",
             f"transactions/group?service={odd}&name={odd}", "transaction?id=0000000000000001",
             "errors", f"errors?assignee={odd}", "releases",
             f"error?service={odd}&key={group['grouping_key']}", "error?service=%ff%00&key=%zz"]
    for page in pages:
        status, body = get(serve.url + "/ui/" + quote(page, safe="/?=&%"))
        assert status == (404 if "%zz" in page else 200), (page, status)
        assert b"<script>" not in body, page


def test_a_metricset_sent_again_is_stored_once(tmp_path) -> None:
    from beatlib.receiver import Receiver
    from tests.receiver_server.conftest import ndjson, post

    metricset = ("metricset", {"timestamp": 1_700_000_000_000_000,
                               "samples": {"system.process.memory.rss.bytes": {"value": 1}}})
    with Receiver(port=0, db_path=str(tmp_path / "m.db")) as receiver:
        for _ in range(3):  # a reply lost on the way: the client sends the batch again
            assert post(receiver.url, ndjson(metricset))[0] == 202
        assert receiver.flush(10)
        with receiver.store.reader() as conn:
            assert conn.execute("SELECT count(*) FROM metricsets").fetchone()[0] == 1


def test_a_schema_1_database_is_migrated_and_keeps_its_rows(tmp_path) -> None:
    import sqlite3

    from beatlib.receiver import Receiver
    from beatlib.receiver.schema import SCHEMA_VERSION

    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE metricsets (service TEXT NOT NULL, timestamp INTEGER NOT NULL,
            transaction_name TEXT, transaction_type TEXT, span_type TEXT, span_subtype TEXT,
            tags TEXT, samples TEXT NOT NULL);
        CREATE TABLE error_groups (service TEXT NOT NULL, grouping_key TEXT NOT NULL,
            type TEXT, message TEXT, culprit TEXT, count INTEGER NOT NULL,
            first_seen INTEGER NOT NULL, last_seen INTEGER NOT NULL, first_version TEXT,
            latest_error_id TEXT NOT NULL, assignee_key TEXT, assignee_name TEXT,
            assignee_email TEXT, assignee_commit TEXT, assignee_date TEXT,
            PRIMARY KEY (service, grouping_key));
        CREATE TABLE spans (id TEXT NOT NULL, transaction_id TEXT, trace_id TEXT NOT NULL,
            parent_id TEXT NOT NULL, service TEXT NOT NULL, name TEXT NOT NULL,
            type TEXT NOT NULL, subtype TEXT, action TEXT, timestamp INTEGER, start REAL,
            duration REAL NOT NULL, outcome TEXT, sync INTEGER, context TEXT, stacktrace TEXT);
        INSERT INTO metricsets (service, timestamp, samples) VALUES ('shop', 1, '{}');
        PRAGMA user_version=1;
    """)
    old.close()
    with Receiver(port=0, db_path=str(path)) as receiver, receiver.store.reader() as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert [tuple(r) for r in conn.execute("SELECT service, key FROM metricsets")] == [
            ("shop", None)]


def test_a_deleted_database_file_is_noticed_and_made_again(tmp_path, caplog) -> None:
    import logging
    import os

    from beatlib.receiver import Receiver
    from tests.receiver_server.conftest import ndjson, post, transaction

    path = tmp_path / "gone.db"
    with caplog.at_level(logging.WARNING, logger="beatlib.receiver"), \
            Receiver(port=0, db_path=str(path)) as receiver:
        assert post(receiver.url, ndjson(transaction(1)))[0] == 202
        assert receiver.flush(10)
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(f"{path}{suffix}"):
                os.remove(f"{path}{suffix}")
        assert post(receiver.url, ndjson(transaction(2)))[0] == 202
        assert receiver.flush(10)
        with receiver.store.reader() as conn:
            assert [r[0] for r in conn.execute("SELECT id FROM transactions")] == [f"{2:016x}"]
    assert "was removed or replaced" in caplog.text


def test_a_broken_database_is_told_from_a_busy_one(tmp_path, caplog) -> None:
    """A table gone (a schema that does not fit) is not "busy": it is logged as an error and
    the writer opens the database again, which puts the schema back."""
    import logging
    import sqlite3

    from beatlib.receiver import Receiver
    from tests.receiver_server.conftest import ndjson, post, transaction

    path = tmp_path / "broken.db"
    with caplog.at_level(logging.ERROR, logger="beatlib.receiver"), \
            Receiver(port=0, db_path=str(path)) as receiver:
        assert post(receiver.url, ndjson(transaction(1)))[0] == 202
        assert receiver.flush(10)
        other = sqlite3.connect(path)
        other.execute("DROP TABLE transactions")
        other.commit()
        other.close()
        assert post(receiver.url, ndjson(transaction(2)))[0] == 202
        assert receiver.flush(10)
        with receiver.store.reader() as conn:
            assert [r[0] for r in conn.execute("SELECT id FROM transactions")] == [f"{2:016x}"]
        assert receiver.store.health()["writer_running"]
    assert "cannot write to" in caplog.text and "no such table" in caplog.text


def test_a_database_of_this_version_opens_as_it_is_and_takes_a_new_step(tmp_path,
                                                                        monkeypatch) -> None:
    """Made by this receiver, it opens again with its rows; a step appended to MIGRATIONS (as
    schema.py's docstring shows) upgrades it in place."""
    import sqlite3

    from beatlib.receiver import Receiver, schema
    from tests.receiver_server.conftest import ndjson, post, transaction

    path = str(tmp_path / "now.db")
    error = ("error", {"id": "e" * 32, "exception": {"type": "E", "message": "boom"}})
    with Receiver(port=0, db_path=path) as receiver:
        assert post(receiver.url, ndjson(transaction(1), error))[0] == 202
        assert receiver.flush(10)
    with Receiver(port=0, db_path=path) as receiver, receiver.store.reader() as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION
        assert conn.execute("SELECT count(*) FROM transactions").fetchone()[0] == 1

    step = schema.Migration(schema.SCHEMA_VERSION + 1, "error groups can have a note", (
        "ALTER TABLE error_groups ADD COLUMN note TEXT NOT NULL DEFAULT 'none'",))
    monkeypatch.setattr(schema, "MIGRATIONS", [*schema.MIGRATIONS, step])
    monkeypatch.setattr(schema, "SCHEMA_VERSION", step.version)
    with Receiver(port=0, db_path=path) as receiver, receiver.store.reader() as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == step.version
        assert [tuple(r) for r in conn.execute("SELECT message, note FROM error_groups")] == [
            ("boom", "none")]
        assert conn.execute("SELECT count(*) FROM transactions").fetchone()[0] == 1
    monkeypatch.undo()
    conn = sqlite3.connect(path)  # and this receiver, older than that database now, refuses it
    with pytest.raises(sqlite3.DatabaseError, match="newer than this receiver's"):
        schema.create_schema(conn)
    conn.close()
