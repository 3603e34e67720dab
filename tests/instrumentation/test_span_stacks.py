"""Slow spans carry the stack that started them, with the app's frames marked."""

from __future__ import annotations

import sqlite3

import beatlib
from beatlib import context


def issue_query(db):
    return db.execute("SELECT 1").fetchall()


def test_span_over_the_threshold_has_a_stack_trace(receiver):
    client = beatlib.Client(server_url=receiver.url, span_stack_trace_min_duration=0,
                            environ={})
    beatlib.instrument(client.config)
    try:
        db = sqlite3.connect(":memory:")
        client.begin_transaction("task")
        issue_query(db)
        client.end_transaction("job")
        assert client.flush(5)
    finally:
        beatlib.uninstrument()
        client.close(5)
        context.set_active(None)
    (span,) = receiver.events("span")
    frames = span["stacktrace"]
    app = [f for f in frames if not f["library_frame"]]
    assert app[0]["function"] == "issue_query"
    assert app[0]["context_line"].strip() == 'return db.execute("SELECT 1").fetchall()'
    assert all(f["module"].startswith("beatlib") for f in frames[: frames.index(app[0])])


def test_spans_under_the_threshold_have_none(receiver):
    client = beatlib.Client(server_url=receiver.url, span_stack_trace_min_duration="10s",
                            environ={})
    client.begin_transaction("task")
    with beatlib.capture_span("quick"):
        pass
    client.end_transaction("job")
    assert client.flush(5)
    client.close(5)
    assert "stacktrace" not in receiver.events("span")[0]
