"""OTLP export end to end: a real Flask app (SQLite through SQLAlchemy, an outgoing HTTP call,
an error) and the manual API, on a client with exporter="otlp", sending to a real HTTP
collector on loopback that decodes every request with opentelemetry-proto's json_format.
What arrives is held against what was recorded: the processed events a before_send hook
saw, the very events the intake encoder would have written."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from werkzeug.serving import make_server

import beatlib
from beatlib import context, metrics
from beatlib.contrib.flask import Beat
from beatlib.protocol import otlp
from beatlib.version import __version__
from tests.contrib.flask_app import create_app
from tests.instrumentation.http_server import HTTPServer
from tests.otlp_collector import Collector

SERVER, CLIENT, INTERNAL, PRODUCER, CONSUMER = 2, 3, 1, 4, 5


@pytest.fixture
def collector() -> Iterator[Collector]:
    with Collector() as c:
        yield c
        assert not c.problems, c.problems


@pytest.fixture
def weather() -> Iterator[HTTPServer]:
    with HTTPServer() as server:
        yield server


class Seen:
    """A before_send hook keeping every event it is handed (and passing it on)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, kind: str, event: dict[str, Any]) -> dict[str, Any]:
        self.events.append((kind, event))
        return event

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for k, e in self.events if k == kind]


def attrs(kvs: Any) -> dict[str, Any]:
    """KeyValues of a decoded message as a plain dict."""
    out: dict[str, Any] = {}
    for kv in kvs:
        which = kv.value.WhichOneof("value")
        val = getattr(kv.value, which)
        if which == "array_value":
            val = [getattr(v, v.WhichOneof("value")) for v in val.values]
        out[kv.key] = val
    return out


def nanos(event: dict[str, Any]) -> tuple[int, int]:
    start = event["timestamp"] * 1000
    return start, start + round(event["duration"] * 1_000_000)


@pytest.fixture
def flask_run(collector: Collector, weather: HTTPServer, tmp_path: Path) -> Iterator[Any]:
    seen = Seen()
    app = create_app(f"sqlite:///{tmp_path / 'blog.db'}", weather.url("/ok"), BEATLIB={
        "service_name": "blog", "exporter": "otlp", "otlp_endpoint": collector.url,
        "flush_interval": "50ms",
        "otlp_headers": "x-team=blog,authorization=Bearer%20s3cr3t", "before_send": seen,
        "service_version": "1.2.3", "environment": "staging"})
    Beat().init_app(app)
    client: beatlib.Client = app.extensions["beatlib"]
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        assert "Hello by ann" in requests.get(url + "/posts").text
        assert requests.get(url + "/boom").status_code == 500
        assert collector.wait_for("spans", 2)  # transactions end once the response is read
        assert client.flush(5)
        client.close(5)  # the last metrics go out at close
        yield url, seen, client
    finally:
        server.shutdown()
        client.close(5)
        beatlib.uninstrument()
        context.set_active(None)


def test_traces_match_what_was_recorded(flask_run, collector, weather):
    url, seen, _ = flask_run
    spans = {sp.span_id.hex(): sp for sp in collector.spans()}
    recorded = seen.of("transaction") + seen.of("span")
    assert len(spans) == len(recorded) >= 6
    for event in recorded:
        sp = spans[event["id"]]
        assert sp.trace_id.hex() == event["trace_id"]
        assert sp.parent_span_id.hex() == (event.get("parent_id") or "")
        assert (sp.start_time_unix_nano, sp.end_time_unix_nano) == nanos(event)
        assert sp.name == event["name"]
    ok, failed = seen.of("transaction")
    tx = spans[ok["id"]]
    assert tx.kind == SERVER and tx.parent_span_id == b"" and tx.status.code == 0
    a = attrs(tx.attributes)
    assert a["http.request.method"] == "GET" and a["url.full"] == url + "/posts"
    assert a["url.path"] == "/posts" and a["http.response.status_code"] == 200
    assert a["server.address"] == "127.0.0.1" and a["beatlib.transaction.result"] == "HTTP 2xx"
    assert a["http.response.header.content-type"] == ["text/html; charset=utf-8"]
    children = sorted((s for s in seen.of("span") if s["transaction_id"] == ok["id"]),
                      key=lambda s: s["timestamp"])
    db, http = spans[children[0]["id"]], spans[children[1]["id"]]
    assert db.kind == CLIENT and db.parent_span_id.hex() == ok["id"]
    a = attrs(db.attributes)
    assert a["db.system.name"] == "sqlite" and a["db.query.text"].startswith("SELECT")
    assert a["db.query.text"] == children[0]["context"]["db"]["statement"]
    assert http.kind == CLIENT
    a = attrs(http.attributes)
    assert a["http.request.method"] == "GET" and a["url.full"] == weather.url("/ok")
    assert a["http.response.status_code"] == 200
    assert (a["server.address"], a["server.port"]) == ("127.0.0.1", weather.port)
    template = spans[children[2]["id"]]
    assert template.kind == INTERNAL and attrs(template.attributes)["beatlib.span.type"] == \
        "template"
    # every span's parent is in the trace and contains it
    for sp in spans.values():
        if sp.parent_span_id:
            parent = spans[sp.parent_span_id.hex()]
            assert parent.trace_id == sp.trace_id
            assert parent.start_time_unix_nano <= sp.start_time_unix_nano
    boom = spans[failed["id"]]
    assert boom.status.code == 2 and boom.status.message == "HTTP 5xx"


def test_error_as_span_event_and_log_record(flask_run, collector):
    _, seen, _ = flask_run
    (error,) = seen.of("error")
    failed = seen.of("transaction")[1]
    holder = next(sp for sp in collector.spans() if sp.span_id.hex() == error["parent_id"])
    assert holder.span_id.hex() == failed["id"]  # raised in the view, outside any span
    (event,) = holder.events
    assert event.name == "exception" and event.time_unix_nano == error["timestamp"] * 1000
    a = attrs(event.attributes)
    assert a["exception.type"] == "ZeroDivisionError"
    assert a["exception.message"] == error["exception"]["message"]
    trace = a["exception.stacktrace"]
    assert trace.startswith("Traceback (most recent call last):\n  File ")
    assert trace.endswith("ZeroDivisionError: " + error["exception"]["message"])
    assert "in boom" in trace  # the view's frame
    (log,) = collector.log_records()
    assert log.severity_number == 17 and log.severity_text == "ERROR"
    assert log.trace_id.hex() == error["trace_id"] and log.span_id.hex() == error["parent_id"]
    assert log.time_unix_nano == error["timestamp"] * 1000
    la = attrs(log.attributes)
    assert {k: la[k] for k in a} == a
    assert la["url.path"] == "/boom" and la["http.request.method"] == "GET"
    assert log.body.string_value.startswith("ZeroDivisionError")


def test_resource_headers_and_metrics(flask_run, collector):
    _, seen, client = flask_run
    for request in collector.requests:
        assert request["headers"]["x-team"] == "blog"
        assert request["headers"]["authorization"] == "Bearer s3cr3t"
        assert request["headers"]["User-Agent"].startswith("beatlib/")
    assert {r["path"] for r in collector.requests} == {"/v1/traces", "/v1/logs", "/v1/metrics"}
    message = collector.messages("/v1/traces")[0]
    resource = attrs(message.resource_spans[0].resource.attributes)
    assert resource["service.name"] == "blog" and resource["service.version"] == "1.2.3"
    assert resource["deployment.environment.name"] == "staging"
    assert resource["telemetry.sdk.name"] == "beatlib"
    assert resource["telemetry.sdk.language"] == "python"
    assert resource["telemetry.sdk.version"] == __version__
    assert resource["process.pid"] > 0 and resource["host.name"]
    assert resource["process.runtime.name"] == "CPython"
    assert message.resource_spans[0].scope_spans[0].scope.name == "beatlib"

    by_name: dict[str, list[Any]] = {}
    for m in collector.metrics():
        by_name.setdefault(m.name, []).append(m)
    histograms = [m for m in by_name["transaction.duration"] if m.WhichOneof("data") ==
                  "histogram"]
    assert histograms and all(m.unit == "ms" for m in histograms)
    points = [p for m in histograms for p in m.histogram.data_points]
    assert all(m.histogram.aggregation_temporality == 1 for m in histograms)  # DELTA
    assert sum(p.count for p in points) == 2
    for p in points:
        assert len(p.bucket_counts) == len(p.explicit_bounds) + 1
        assert sum(p.bucket_counts) == p.count
        assert 0 < p.start_time_unix_nano <= p.time_unix_nano
    names = {attrs(p.attributes)["beatlib.transaction.name"] for p in points}
    assert names == {"GET /posts", "GET /boom"}
    recorded = {tx["name"]: tx["duration"] for tx in seen.of("transaction")}
    for p in points:
        duration = recorded[attrs(p.attributes)["beatlib.transaction.name"]]
        i = next(i for i, c in enumerate(p.bucket_counts) if c)
        low = p.explicit_bounds[i - 1] if i else 0.0
        assert low <= duration <= p.explicit_bounds[i] * 1.000001
    (sent,) = [m for m in by_name["beatlib.transport.sent_requests"]][-1:]
    assert sent.sum.is_monotonic and sent.sum.aggregation_temporality == 2  # CUMULATIVE
    assert sent.sum.data_points[0].as_int >= 1


def test_buckets_hold_their_durations():
    """The explicit bounds written for beatlib's sparse buckets put each duration in the
    bucket that counts it."""
    rng = random.Random(7)
    durations = [rng.lognormvariate(2, 2) for _ in range(500)] + [0.0005, 0.001, 0.0011]
    counts: dict[int, int] = {}
    for d in durations:
        counts[metrics.bucket_index(d)] = counts.get(metrics.bucket_index(d), 0) + 1
    indexes = sorted(counts)
    bounds, bucket_counts = otlp._buckets([metrics.bucket_value(i) for i in indexes],
                                          [counts[i] for i in indexes])
    assert len(bucket_counts) == len(bounds) + 1 and sum(bucket_counts) == len(durations)
    assert bounds == sorted(bounds)
    for d in durations:
        i = next((k for k, b in enumerate(bounds) if d <= b * (1 + 1e-9)), len(bounds))
        assert bucket_counts[i] > 0, d
    placed = [0] * len(bucket_counts)
    for d in durations:
        placed[next((k for k, b in enumerate(bounds) if d <= b * (1 + 1e-9)), len(bounds))] += 1
    assert placed == bucket_counts


def test_kinds_of_manual_work(collector):
    client = beatlib.Client(service_name="jobs", exporter="otlp", otlp_endpoint=collector.url,
                            flush_interval="50ms", environ={})
    try:
        client.begin_transaction("messaging")
        with beatlib.capture_span("RabbitMQ SEND to orders", span_type="messaging",
                                  span_subtype="rabbitmq", span_action="send",
                                  leaf=True) as sp:
            assert sp is not None
            sp.set_context("message", {"queue": {"name": "orders"}})
        with beatlib.capture_span("compute", span_type="app"):
            pass
        client.end_transaction("RabbitMQ RECEIVE from jobs", "success")
        client.begin_transaction("task")
        client.end_transaction("nightly", "success")
        assert client.flush(5)
    finally:
        client.close(5)
    spans = {sp.name: sp for sp in collector.spans()}
    assert spans["RabbitMQ RECEIVE from jobs"].kind == CONSUMER
    assert attrs(spans["RabbitMQ RECEIVE from jobs"].attributes)["messaging.operation.type"] \
        == "process"
    send = spans["RabbitMQ SEND to orders"]
    assert send.kind == PRODUCER
    a = attrs(send.attributes)
    assert (a["messaging.system"], a["messaging.destination.name"],
            a["messaging.operation.type"]) == ("rabbitmq", "orders", "send")
    assert spans["compute"].kind == INTERNAL and spans["nightly"].kind == INTERNAL


def test_unsampled_transactions_are_not_exported_as_spans(collector):
    client = beatlib.Client(service_name="jobs", exporter="otlp", otlp_endpoint=collector.url,
                            flush_interval="50ms", transaction_sample_rate=0, environ={})
    try:
        client.begin_transaction("task")
        client.end_transaction("skipped", "success")
        assert client.flush(5)
        client.close(5)
    finally:
        client.close(5)
    assert collector.spans() == []
    names = {attrs(p.attributes).get("beatlib.transaction.name")
             for m in collector.metrics() if m.name == "transaction.duration"
             for p in m.histogram.data_points}
    assert "skipped" in names  # still counted


def test_grpc_span_attributes():
    span = otlp.span({"id": "1" * 16, "trace_id": "2" * 32, "parent_id": "3" * 16,
                      "name": "/helloworld.Greeter/SayHello", "type": "external",
                      "subtype": "grpc", "timestamp": 1, "duration": 1.0, "outcome": "success",
                      "context": {"destination": {"address": "localhost", "port": 50051}}})
    a = {kv["key"]: kv["value"] for kv in span["attributes"]}
    assert a["rpc.system"] == {"stringValue": "grpc"}
    assert a["rpc.service"] == {"stringValue": "helloworld.Greeter"}
    assert a["rpc.method"] == {"stringValue": "SayHello"}
    assert a["server.port"] == {"intValue": "50051"} and span["kind"] == CLIENT


def test_spans_processed_field_by_field_as_whole_events(tmp_path):
    """Without a before_send hook, spans go through the processors field by field (the fast
    path); with one, as whole events: the OTLP written is the same, redaction included."""
    import sqlite3

    from beatlib.tracing import Transaction
    from beatlib.transport.memory import MemorySender

    records: list[Any] = []
    plain = beatlib.Client(service_name="s", exporter="otlp", sender=MemorySender(),
                           environ={})
    hooked = beatlib.Client(service_name="s", exporter="otlp", sender=MemorySender(),
                            before_send=lambda kind, event: event, environ={})
    encode = plain.pipeline.encode
    plain.pipeline.encode = lambda record: (records.append(record), encode(record))[1]
    beatlib.instrument(plain.config)
    try:
        db = sqlite3.connect(str(tmp_path / "t.db"))
        for i in range(3):
            plain.begin_transaction("request")
            db.execute("SELECT 'hunter2-secret', ?", (i,))
            with beatlib.capture_span("GET https://u:pw@example.test/?token=s3cr3t",
                                      span_type="external", span_subtype="http",
                                      leaf=True) as sp:
                assert sp is not None
                sp.set_context("http", {"url": "https://u:pw@example.test/?token=s3cr3t",
                                        "method": "GET"})
            plain.end_transaction(f"GET /{i}", "HTTP 2xx")
        assert plain.flush(5)
    finally:
        beatlib.uninstrument()
        plain.close(1)
        hooked.close(1)
    txs = [r for r in records if type(r) is Transaction]
    assert len(txs) == 3
    for tx in txs:
        fast, whole = plain.pipeline.encode_otlp(tx), hooked.pipeline.encode_otlp(tx)
        assert fast == whole
        assert b"hunter2-secret" not in fast[0][1] and b"s3cr3t" not in fast[0][1]
        assert b":pw@" not in fast[0][1]
