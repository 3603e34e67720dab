"""OTLP/HTTP into `beatlib serve`: the real OpenTelemetry Python SDK's exporters (protobuf)
and hand-built JSON bodies, stored as intake's events and shown on the dashboard beside a
beatlib service; garbage, bombs and a full queue answered as OTLP says."""

from __future__ import annotations

import gzip
import html
import json
import logging
import os
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from google.protobuf import json_format
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

import beatlib
from beatlib.receiver import Receiver, otlp
from beatlib.receiver.grouping import grouping_key
from tests.receiver import validator
from tests.receiver_server.conftest import get, ndjson, transaction
from tests.receiver_server.conftest import post as intake_post
from tests.receiver_server.test_pages import crawl, mark

EVIL = mark("otel")  # markup in every name the OTel service gives


def rows(receiver: Receiver, sql: str, *params: Any) -> list[dict[str, Any]]:
    assert receiver.flush(10)
    conn = sqlite3.connect(receiver.db_path)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql, params)]
    finally:
        conn.close()


def post(url: str, body: bytes, content_type: str = "application/x-protobuf",
         **headers: str) -> tuple[int, bytes, Any]:
    """(status, body, response headers)."""
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": content_type, **headers})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, resp.read(), resp.headers
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers


class OtelApp:
    """A service instrumented with the OpenTelemetry SDK, exporting to `receiver` with the
    SDK's own OTLP/HTTP protobuf exporters."""

    def __init__(self, receiver: Receiver, name: str = "otel-shop") -> None:
        self.resource = Resource.create({
            "service.name": name, "service.version": "2.0.0",
            "deployment.environment.name": "dev", "host.name": "otel-host"})
        self.tracer_provider = TracerProvider(resource=self.resource)
        self.tracer_provider.add_span_processor(BatchSpanProcessor(
            OTLPSpanExporter(endpoint=receiver.url + otlp.TRACES_PATH)))
        self.tracer = self.tracer_provider.get_tracer("otel-shop.app")
        self.logger_provider = LoggerProvider(resource=self.resource)
        self.logger_provider.add_log_record_processor(BatchLogRecordProcessor(
            OTLPLogExporter(endpoint=receiver.url + otlp.LOGS_PATH)))
        self.logger = logging.getLogger("otel_shop.payments")
        self.handler = LoggingHandler(logger_provider=self.logger_provider)
        self.logger.addHandler(self.handler)
        self.logger.propagate = False

    def close(self) -> None:
        self.logger.removeHandler(self.handler)
        self.tracer_provider.shutdown()
        self.logger_provider.shutdown()


@pytest.fixture
def otel(serve: Receiver) -> Iterator[OtelApp]:
    app = OtelApp(serve)
    try:
        yield app
    finally:
        app.close()


def charge(order: int) -> None:
    raise ValueError(f"card declined for order {order}")


def handle_order(app: OtelApp, order: int, parent: Any = None) -> Any:
    """A request: a server span with a DB query, an HTTP call, an exception, a log."""
    with app.tracer.start_as_current_span(
            f"GET /orders/{{id}}{EVIL}", kind=SpanKind.SERVER, context=parent, attributes={
                "http.request.method": "GET", "http.route": "/orders/{id}",
                "url.path": f"/orders/{order}", "http.response.status_code": 500,
                "order.evil": EVIL}) as server:
        with app.tracer.start_as_current_span("SELECT orders", kind=SpanKind.CLIENT,
                                              attributes={
                "db.system.name": "postgresql", "db.namespace": "shop",
                "db.query.text": f"SELECT * FROM orders WHERE id = $1 -- {EVIL}"}):
            time.sleep(0.002)
        with app.tracer.start_as_current_span("GET", kind=SpanKind.CLIENT, attributes={
                "http.request.method": "GET", "url.full": "http://prices.test:8080/p/1",
                "http.response.status_code": 200}):
            pass
        try:
            charge(order)
        except ValueError as exc:
            server.record_exception(exc)
            server.set_status(Status(StatusCode.ERROR, str(exc)))
            app.logger.exception("payment failed for order %s", order)
        app.logger.error("stock low for order %s", order)
        app.logger.warning("a warning is not an error")
        return server.get_span_context()


def test_the_sdk_exporter_s_spans_and_logs_are_stored_as_intake_events(serve: Receiver,
                                                                         otel: OtelApp) -> None:
    context = handle_order(otel, 41)
    assert otel.tracer_provider.force_flush(10) and otel.logger_provider.force_flush(10)
    trace_id, server_id = f"{context.trace_id:032x}", f"{context.span_id:016x}"

    [service] = rows(serve, "SELECT * FROM services")
    assert (service["name"], service["version"], service["environment"], service["hostname"]
            ) == ("otel-shop", "2.0.0", "dev", "otel-host")
    assert service["agent"].startswith("opentelemetry ") and service["language"] == "python"

    [tx] = rows(serve, "SELECT * FROM transactions")
    assert (tx["id"], tx["trace_id"], tx["parent_id"], tx["type"], tx["result"], tx["outcome"]
            ) == (server_id, trace_id, None, "request", "HTTP 5xx", "failure")
    assert tx["name"] == f"GET /orders/{{id}}{EVIL}" and tx["spans_started"] == 2
    assert json.loads(tx["context"])["request"]["method"] == "GET"

    spans = {s["name"]: s for s in rows(serve, "SELECT * FROM spans")}
    db, http = spans["SELECT orders"], spans["GET"]
    assert (db["type"], db["subtype"], db["action"], db["transaction_id"], db["parent_id"],
            db["destination"]) == ("db", "postgresql", "query", server_id, server_id,
                                   "postgresql/shop")
    assert json.loads(db["context"])["db"]["statement"].startswith("SELECT * FROM orders")
    assert db["duration"] >= 2.0
    assert (http["type"], http["subtype"], http["action"], http["destination"]) == (
        "external", "http", "GET", "prices.test:8080")
    assert json.loads(http["context"])["http"]["url"] == "http://prices.test:8080/p/1"

    errors = rows(serve, "SELECT * FROM errors ORDER BY timestamp")
    by_kind = {(e["type"], e["level"]): e for e in errors}
    assert set(by_kind) == {("ValueError", None), ("ValueError", "error"), (None, "error")}
    span_error = by_kind[("ValueError", None)]
    assert (span_error["trace_id"], span_error["transaction_id"], span_error["parent_id"],
            span_error["message"], span_error["transaction_name"]) == (
        trace_id, server_id, server_id, "card declined for order 41", tx["name"])
    body = json.loads(span_error["body"])
    frames = body["exception"]["stacktrace"]
    assert frames[0]["function"] == "charge" and frames[0]["filename"] == __file__
    assert frames[0]["context_line"].startswith("raise ValueError")
    assert span_error["culprit"] == f"{__file__} in charge"
    logged = by_kind[("ValueError", "error")]  # logger.exception: the record's exception
    assert logged["grouping_key"] == span_error["grouping_key"]
    assert logged["trace_id"] == trace_id and logged["parent_id"] == server_id
    message = by_kind[(None, "error")]
    assert json.loads(message["body"])["log"]["logger_name"] == "otel_shop.payments"
    assert message["message"] == "stock low for order 41"


def test_the_same_failure_groups_once_and_the_pages_show_the_otel_service(
        serve: Receiver, otel: OtelApp) -> None:
    """Beside a beatlib service that called it with a traceparent: the services page, the
    transactions and their group, the waterfall with the DB span, the error group, and the
    trace page with both services; OTel-provided names escaped on every page."""
    client = beatlib.Client(service_name="beatlib-web", server_url=serve.url,
                            flush_interval="50ms", environ={})
    try:
        client.begin_transaction("request")
        with beatlib.capture_span("GET otel-shop", span_type="external", span_subtype="http"
                                  ) as span:
            carrier = {"traceparent": span.traceparent()}
            parent = TraceContextTextMapPropagator().extract(carrier)
            context = handle_order(otel, 42, parent)
        client.end_transaction("POST /checkout", "HTTP 2xx")
        handle_order(otel, 43)
        assert client.flush(10)
    finally:
        client.close()
    assert otel.tracer_provider.force_flush(10) and otel.logger_provider.force_flush(10)
    trace_id = f"{context.trace_id:032x}"
    [called] = rows(serve, "SELECT * FROM transactions WHERE trace_id = ? AND service = ?",
                    trace_id, "otel-shop")
    assert called["parent_id"] == f"{span.id:016x}"

    groups = rows(serve, "SELECT * FROM error_groups WHERE service = 'otel-shop' ORDER BY "
                  "count DESC")
    assert [(g["type"], g["count"]) for g in groups] == [("ValueError", 4), (None, 2)]

    pages = crawl(serve)
    for url, page in pages.items():
        assert "<b id=x-otel>" not in page and "<script>" not in page, url
    escaped = html.escape(EVIL).replace("&#x27;", "&#39;").replace("&quot;", "&#34;")
    services = get(serve.dashboard_url)[1].decode()
    assert "otel-shop" in services and "beatlib-web" in services
    listing = get(serve.dashboard_url + "transactions?service=otel-shop")[1].decode()
    assert escaped in listing
    group = get(serve.dashboard_url + "transactions/group?" + urlencode(
        {"service": "otel-shop", "name": called["name"]}))[1].decode()
    assert escaped in group and f"transaction?id={called['id']}" in group
    assert "transactions/group?" in listing  # the listing links to the group
    waterfall = get(serve.dashboard_url + "transaction?id=" + called["id"])[1].decode()
    assert "SELECT orders" in waterfall and "postgresql" in waterfall
    error_page = get(serve.dashboard_url + "error?" + urlencode(
        {"service": "otel-shop", "key": groups[0]["grouping_key"]}))[1].decode()
    assert "card declined for order" in error_page and "charge" in error_page
    trace_page = get(serve.dashboard_url + "traces/" + trace_id)[1].decode()
    assert "beatlib-web" in trace_page and "otel-shop" in trace_page
    assert "SELECT orders" in trace_page


def test_metrics_from_the_sdk_become_metricsets(serve: Receiver,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    offered: list[tuple[str, dict[str, Any]]] = []
    offer = serve.store.offer
    monkeypatch.setattr(serve.store, "offer", lambda meta, events: offered.extend(
        events) or offer(meta, events))
    reader = PeriodicExportingMetricReader(OTLPMetricExporter(
        endpoint=serve.url + otlp.METRICS_PATH), export_interval_millis=60_000)
    provider = MeterProvider(resource=Resource.create({"service.name": "otel-metrics"}),
                             metric_readers=[reader])
    meter = provider.get_meter("app")
    meter.create_histogram("http.server.request.duration", unit="s",
                           explicit_bucket_boundaries_advisory=[0.01, 0.05, 0.1]).record(
        0.03, {"http.route": "/a"})
    meter.create_counter("orders").add(3, {"shop": "eu"})
    meter.create_observable_gauge("process.memory.usage", callbacks=[
        lambda _: [__import__("opentelemetry.metrics").metrics.Observation(123_456_789)]])
    assert provider.force_flush(10)
    provider.shutdown()
    sets = rows(serve, "SELECT * FROM metricsets WHERE service = 'otel-metrics'")
    assert len(offered) == len(sets) >= 3  # (force_flush and shutdown both export)
    for kind, event in offered:
        assert kind == "metricset" and not list(validator(kind).iter_errors(event)), event
    samples = {name: (json.loads(s["tags"] or "null"), sample)
               for s in sets for name, sample in json.loads(s["samples"]).items()}
    tags, histogram = samples["http.server.request.duration"]
    assert tags == {"http_route": "/a"} and histogram["type"] == "histogram"
    assert histogram["counts"] == [1]
    assert histogram["values"] == [pytest.approx(0.03)]  # the middle of (0.01, 0.05]
    assert samples["orders"] == ({"shop": "eu"}, {"value": 3, "type": "counter"})
    assert samples["system.process.memory.rss.bytes"][1]["value"] == 123_456_789
    services = get(serve.dashboard_url)[1].decode()
    assert "otel-metrics" in services and "118&nbsp;MiB" in services  # RSS


# --- JSON encoding ---------------------------------------------------------------------

TRACE_ID, ROOT_ID, CHILD_ID = "5b8efff798038103d269b633813fc60c", "eee19b7ec3c1b174", \
    "eee19b7ec3c1b173"
NOW_NS = time.time_ns()


def attr(key: str, value: Any) -> dict[str, Any]:
    kind = {bool: "boolValue", int: "intValue", float: "doubleValue"}.get(type(value),
                                                                          "stringValue")
    return {"key": key, "value": {kind: str(value) if kind == "intValue" else value}}


def json_traces(*spans: dict[str, Any], service: str = "json-svc") -> dict[str, Any]:
    return {"resourceSpans": [{
        "resource": {"attributes": [attr("service.name", service),
                                    attr("telemetry.sdk.name", "opentelemetry"),
                                    attr("telemetry.sdk.language", "go"),
                                    attr("telemetry.sdk.version", "1.30.0"),
                                    attr("process.pid", 4242)]},
        "scopeSpans": [{"scope": {"name": "handmade"}, "spans": list(spans)}]}]}


def json_span(span_id: str, name: str, kind: int, parent: str = "", offset_ms: int = 0,
              duration_ms: int = 10, attributes: list[Any] = (), **extra: Any
              ) -> dict[str, Any]:
    start = NOW_NS + offset_ms * 1_000_000
    return {"traceId": TRACE_ID, "spanId": span_id, "parentSpanId": parent, "name": name,
            "kind": kind, "startTimeUnixNano": str(start),
            "endTimeUnixNano": str(start + duration_ms * 1_000_000),
            "attributes": list(attributes), "unknownFieldIgnored": 1, **extra}


def test_json_requests_decode_and_answer_in_json(serve: Receiver) -> None:
    body = json_traces(
        json_span(ROOT_ID, "orders.process", 5, "00f067aa0ba902b7", duration_ms=40,
                  attributes=[attr("messaging.system", "kafka"),
                              attr("messaging.operation.type", "process")],
                  status={"code": 2, "message": "boom"}),
        json_span(CHILD_ID, "publish shipments", 4, ROOT_ID, 5, attributes=[
            attr("messaging.system", "kafka"), attr("messaging.destination.name", "ships"),
            attr("messaging.operation.type", "send")]),
        json_span("eee19b7ec3c1b175", "/Inventory/Reserve", 3, ROOT_ID, 10, attributes=[
            attr("rpc.system", "grpc"), attr("rpc.method", "Reserve"),
            attr("server.address", "inventory")],
            events=[{"name": "exception", "timeUnixNano": str(NOW_NS + 11_000_000),
                     "attributes": [attr("exception.type", "java.io.IOException"),
                                    attr("exception.message", "timeout after 3000 ms"),
                                    attr("exception.stacktrace",
                                         "java.io.IOException: timeout\n\tat a.B.c(B.java:1)"
                                         "\n\tat a.Main.main(Main.java:9)")]}]),
    )
    # The official definitions read what we send (hex ids given as the spec writes them).
    parsed = trace_service_pb2.ExportTraceServiceRequest()
    json_format.ParseDict(otlp._hex_ids_to_base64(body), parsed, ignore_unknown_fields=True)
    assert parsed.resource_spans[0].scope_spans[0].spans[0].span_id.hex() == ROOT_ID
    status, answer, headers = post(serve.url + otlp.TRACES_PATH, gzip.compress(
        json.dumps(body).encode()), "application/json", **{"Content-Encoding": "gzip"})
    assert (status, json.loads(answer), headers["Content-Type"]) == (200, {},
                                                                     "application/json")

    [tx] = rows(serve, "SELECT * FROM transactions")
    assert (tx["id"], tx["parent_id"], tx["type"], tx["outcome"], tx["result"], tx["duration"]
            ) == (ROOT_ID, "00f067aa0ba902b7", "messaging", "failure", "Error", 40.0)
    spans = {s["id"]: s for s in rows(serve, "SELECT * FROM spans")}
    assert (spans[CHILD_ID]["type"], spans[CHILD_ID]["subtype"], spans[CHILD_ID]["action"],
            spans[CHILD_ID]["destination"]) == ("messaging", "kafka", "send", "kafka/ships")
    rpc = spans["eee19b7ec3c1b175"]
    assert (rpc["type"], rpc["subtype"], rpc["action"], rpc["transaction_id"]) == (
        "external", "grpc", "Reserve", ROOT_ID)
    [service] = rows(serve, "SELECT * FROM services")
    assert service["agent"] == "opentelemetry 1.30.0" and service["language"] == "go"
    [error] = rows(serve, "SELECT * FROM errors")
    assert (error["type"], error["transaction_id"], error["culprit"]) == (
        "java.io.IOException", ROOT_ID, "at a.B.c(B.java:1)")
    assert "B.java" in json.loads(error["body"])["context"]["custom"]["stacktrace"]
    # Not a Python traceback: grouped by type and message pattern.
    again = json.loads(error["body"])
    again["exception"]["message"] = "timeout after 5000 ms"
    assert grouping_key(again) == error["grouping_key"]
    again["exception"]["message"] = "connection refused"
    assert grouping_key(again) != error["grouping_key"]


def test_mapped_events_validate_against_the_intake_schemas(serve: Receiver, otel: OtelApp,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """Everything offered to the store, from the SDK's requests and a JSON one, is valid
    intake v2 (metadata included), as an agent's events would be."""
    offered: list[tuple[dict[str, Any], list[Any]]] = []
    offer = serve.store.offer
    monkeypatch.setattr(serve.store, "offer", lambda meta, events: offered.append(
        (meta, events)) or offer(meta, events))
    handle_order(otel, 7)
    assert otel.tracer_provider.force_flush(10) and otel.logger_provider.force_flush(10)
    body = json_traces(json_span(ROOT_ID, "GET /", 2, attributes=[
        attr("http.request.method", "GET"), attr("url.full", "http://a.test/?q=1"),
        attr("http.response.status_code", 404), attr("list", 1.5)]),
        json_span(CHILD_ID, "work", 1, ROOT_ID, attributes=[attr("big", 2**62)]))
    assert post(serve.url + otlp.TRACES_PATH, json.dumps(body).encode(),
                "application/json")[0] == 200
    kinds = []
    for meta, events in offered:
        assert not list(validator("metadata").iter_errors(meta)), meta
        for kind, event in events:
            assert not list(validator(kind).iter_errors(event)), (kind, event)
            kinds.append(kind)
    assert sorted(set(kinds)) == ["error", "span", "transaction"]
    [json_tx] = [e for _, events in offered for k, e in events if e.get("id") == ROOT_ID]
    assert json_tx["context"]["tags"] == {"list": 1.5}  # the mapped ones not repeated


# --- protections -------------------------------------------------------------------------


def test_garbage_is_answered_400_and_the_receiver_keeps_serving(serve: Receiver) -> None:
    url = serve.url + otlp.TRACES_PATH
    for body, content_type in [
        (b"\xff\xff\xff\xff\x0f", "application/x-protobuf"),
        (b"\x0a\xff\xff\xff\xff\x0f" + b"x" * 10, "application/x-protobuf"),
        (b"\x0a" * 5000, "application/x-protobuf"),
        (b"{", "application/json"),
        (b"[1, 2]", "application/json"),
        (b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "zz"}]}]}]}',
         "application/json"),
        (b'{"resourceSpans": "no"}', "application/json"),
        (b'{"resourceSpans": [{"resource": {"attributes": [{"key": "a", "value": '
         b'{"intValue": "x"}}]}}]}', "application/json"),
        (b"[" * 100_000, "application/json"),
        (b"\xc3\x28", "application/json"),
    ]:
        status, answer, headers = post(url, body, content_type)
        assert status == 400, (body[:40], status, answer)
        assert headers["Content-Type"] == content_type
        if content_type == "application/json":
            assert json.loads(answer)["code"] == 400
        else:
            assert b"cannot decode" in answer
    assert post(url, b"{}", "text/plain")[0] == 415
    assert post(url, b"x", "application/x-protobuf", **{"Content-Encoding": "gzip"})[0] == 400
    bomb = gzip.compress(b"\0" * (65 * 1024 * 1024))
    assert post(url, bomb, **{"Content-Encoding": "gzip"})[0] == 413
    assert get(serve.url + "/")[0] == 200


def test_invalid_spans_are_rejected_in_partial_success(serve: Receiver) -> None:
    body = json_traces(json_span(ROOT_ID, "ok", 2),
                       {**json_span("0000000000000000", "zero id", 2), "traceId": TRACE_ID},
                       {**json_span(CHILD_ID, "short trace id", 1, ROOT_ID), "traceId": "ab"})
    status, answer, _ = post(serve.url + otlp.TRACES_PATH, json.dumps(body).encode(),
                             "application/json")
    assert status == 200
    partial = json.loads(answer)["partialSuccess"]
    assert partial["rejectedSpans"] == "2" and "valid trace id" in partial["errorMessage"]
    assert [t["name"] for t in rows(serve, "SELECT name FROM transactions")] == ["ok"]


def test_a_full_queue_answers_503_with_retry_after(tmp_path: Path) -> None:
    receiver = Receiver(port=0, db_path=str(tmp_path / "apm.sqlite3"), max_queue_events=1)
    receiver.start()
    try:
        url = receiver.url + otlp.TRACES_PATH
        request = trace_service_pb2.ExportTraceServiceRequest()
        json_format.ParseDict(otlp._hex_ids_to_base64(json_traces(
            json_span(ROOT_ID, "a", 2), json_span(CHILD_ID, "b", 1, ROOT_ID))), request,
            ignore_unknown_fields=True)
        body = request.SerializeToString()
        lock = sqlite3.connect(receiver.db_path, timeout=0, isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")  # the writer retries; its queue (1 event) stays full
        try:
            # Two resources: the first one's batch is taken, the second's no longer fits.
            two = json_traces(json_span(ROOT_ID, "first", 2))
            two["resourceSpans"] += json_traces(json_span("eee19b7ec3c1b175", "second", 2),
                                                service="other")["resourceSpans"]
            status, answer, _ = post(url, json.dumps(two).encode(), "application/json")
            assert (status, json.loads(answer)) == (200, {"partialSuccess": {
                "rejectedSpans": "1", "errorMessage": "queue is full"}})
            status, answer, headers = post(url, body)
            assert status == 503 and headers["Retry-After"] == otlp.RETRY_AFTER
            assert b"queue is full" in answer
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        assert [r["name"] for r in rows(receiver, "SELECT name FROM transactions")] == [
            "first"]
    finally:
        receiver.stop()


def test_without_the_message_definitions_otlp_answers_501_and_intake_works(
        serve: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(otlp, "json_format", None)
    status, answer, _ = post(serve.url + otlp.TRACES_PATH, b"{}", "application/json")
    assert status == 501 and ".[serve]" in json.loads(answer)["message"]
    assert intake_post(serve.url, ndjson(transaction(1)))[0] == 202


def test_python_tracebacks_parse_into_frames_and_causes() -> None:
    try:
        try:
            charge(1)
        except ValueError as exc:
            raise KeyError("wrapped") from exc
    except KeyError:
        import traceback
        text = traceback.format_exc()
    exc = otlp.stack_exception(text)
    assert exc["type"] == "KeyError" and exc["stacktrace"][0]["lineno"] > 0
    [cause] = exc["cause"]
    assert cause["type"] == "ValueError" and cause["stacktrace"][0]["function"] == "charge"
    assert otlp.stack_exception("not a traceback") == {}


def test_mangled_protobuf_never_raises(serve: Receiver) -> None:
    """Every byte of a real request flipped, cut or repeated: an answer each time, never
    an exception (the handler is called directly, then a few over HTTP)."""
    request = trace_service_pb2.ExportTraceServiceRequest()
    json_format.ParseDict(otlp._hex_ids_to_base64(json_traces(
        json_span(ROOT_ID, "GET /", 2, attributes=[attr("http.response.status_code", 200)],
                  events=[{"name": "exception", "attributes": [
                      attr("exception.type", "E"), attr("exception.stacktrace", "x")]}]),
        json_span(CHILD_ID, "q", 3, ROOT_ID, attributes=[attr("db.system", "sqlite")]))),
        request, ignore_unknown_fields=True)
    good = request.SerializeToString()
    offered: list[Any] = []
    headers = {"Content-Type": "application/x-protobuf"}
    statuses = set()
    for i in range(len(good)):
        for body in (good[:i] + bytes([good[i] ^ 0xFF]) + good[i + 1:], good[:i],
                     good[:i] + good[i:i + 8] * 3 + good[i + 8:]):
            reply = otlp.handle(otlp.TRACES_PATH, body, headers,
                                lambda meta, events: offered.append(events) or True)
            statuses.add(reply.status)
    assert statuses <= {200, 400} and offered
    for body in (good[:len(good) // 2], good[:7] + b"\xff" + good[8:]):
        assert post(serve.url + otlp.TRACES_PATH, body)[0] in (200, 400)
    assert post(serve.url + otlp.TRACES_PATH, good)[0] == 200


def test_the_secret_token_guards_otlp_too(tmp_path: Path) -> None:
    with Receiver(port=0, db_path=str(tmp_path / "apm.sqlite3"), secret_token="s3cret") as rcv:
        url = rcv.url + otlp.LOGS_PATH
        assert post(url, b"")[0] == 401
        assert post(url, b"", Authorization="Bearer wrong")[0] == 401
        status, answer, headers = post(url, b"", Authorization="Bearer s3cret")
        assert (status, answer, headers["Content-Type"]) == (200, b"", "application/x-protobuf")


APP = """
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind

provider = TracerProvider()
provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
with provider.get_tracer("app").start_as_current_span("GET /health", kind=SpanKind.SERVER,
        attributes={"http.request.method": "GET", "http.response.status_code": 204}):
    pass
provider.shutdown()
"""


def test_an_sdk_configured_by_the_documented_environment_reaches_the_receiver(
        serve: Receiver) -> None:
    """docs/receiver.md: OTEL_EXPORTER_OTLP_ENDPOINT is the receiver's URL, nothing else."""
    env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": serve.url,
           "OTEL_SERVICE_NAME": "otel-subprocess", "OTEL_RESOURCE_ATTRIBUTES":
           "deployment.environment.name=staging,service.version=3.1"}
    subprocess.run([sys.executable, "-c", APP], env=env, check=True, timeout=60)
    [tx] = rows(serve, "SELECT * FROM transactions")
    assert (tx["service"], tx["environment"], tx["service_version"], tx["name"],
            tx["result"]) == ("otel-subprocess", "staging", "3.1", "GET /health", "HTTP 2xx")


def test_deep_chains_and_cycles_of_parents_are_walked_once() -> None:
    """A chain of 20,000 spans under one transaction, and two spans naming each other as
    parent: every span gets a transaction id, in well under a second."""
    depth = 20_000
    ids = [f"{n + 1:016x}" for n in range(depth)]
    spans = [json_span(ids[0], "root", 2)] + [
        json_span(ids[n], f"s{n}", 1, ids[n - 1]) for n in range(1, depth)] + [
        json_span("00000000000a0001", "loop a", 1, "00000000000a0002"),
        json_span("00000000000a0002", "loop b", 1, "00000000000a0001")]
    request = trace_service_pb2.ExportTraceServiceRequest()
    json_format.ParseDict(otlp._hex_ids_to_base64(json_traces(*spans)), request,
                          ignore_unknown_fields=True)
    started = time.monotonic()
    [(_, events)], rejected, _ = otlp._convert_traces(request)
    assert time.monotonic() - started < 5  # each span walked to the root: 2e8 steps
    owners = {e["id"]: e.get("transaction_id") for kind, e in events if kind == "span"}
    assert rejected == 0 and len(owners) == depth + 1
    assert all(owners[i] == ids[0] for i in ids[1:])
    assert {owners["00000000000a0001"], owners["00000000000a0002"]} <= {
        "00000000000a0001", "00000000000a0002"}
