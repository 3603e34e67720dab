"""The OTLP exporter's delivery rules, against a real collector on loopback: retries on
429/502/503/504 (Retry-After honoured), partial success counted and not retried, 400 and
other errors not retried, 413 split, a bounded buffer while the endpoint is away, and the
settings checked at start-up (headers are secrets)."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

import beatlib
from beatlib.config import Config, ConfigError
from tests.otlp_collector import Collector


@pytest.fixture
def collector() -> Iterator[Collector]:
    with Collector() as c:
        yield c
        assert not c.problems, c.problems


def make_client(endpoint: str, **settings: Any) -> beatlib.Client:
    settings = {"flush_interval": "50ms", **settings}
    return beatlib.Client(service_name="jobs", exporter="otlp", otlp_endpoint=endpoint,
                          environ={}, **settings)


def run(client: beatlib.Client, n: int = 1) -> None:
    for i in range(n):
        client.begin_transaction("task")
        with beatlib.capture_span(f"step {i}"):
            pass
        client.end_transaction(f"job {i}", "success")


def trace_requests(collector: Collector) -> list[dict[str, Any]]:
    return [r for r in collector.requests if r["path"] == "/v1/traces"]


@pytest.mark.parametrize("status", [429, 502, 503, 504])
def test_retried_after_retry_after(collector, status):
    collector.respond_with(status, {"message": "busy"}, {"Retry-After": "1"})
    client = make_client(collector.url)
    try:
        run(client)
        started = time.monotonic()
        assert client.flush(10)
        assert time.monotonic() - started >= 1.0  # waited as told
        first, second = trace_requests(collector)[:2]
        assert not first["accepted"] and second["accepted"]
        assert second["json"] == first["json"]  # the same request again
        assert client.stats()["retried"] == 1
        assert len(collector.spans()) == 2
    finally:
        client.close(5)


@pytest.mark.parametrize("status", [400, 401, 500])
def test_other_errors_are_not_retried(collector, status, caplog):
    collector.respond_with(status, {"code": 3, "message": "invalid span"})
    client = make_client(collector.url, otlp_headers={"api-key": "k3y-v4lu3"})
    try:
        run(client)
        assert not client.flush(5)
        time.sleep(0.3)
        assert len(trace_requests(collector)) == 1
        assert client.stats()["dropped_rejected"] == 1
        assert "invalid span" in caplog.text and "k3y-v4lu3" not in caplog.text
    finally:
        client.close(5)


def test_partial_success_is_counted_logged_once_and_not_retried(collector, caplog):
    partial = {"partialSuccess": {"rejectedSpans": "3", "errorMessage": "spans too old"}}
    collector.respond_with(200, partial, times=2)
    client = make_client(collector.url)
    caplog.set_level(logging.WARNING, "beatlib.transport")
    try:
        run(client)
        assert not client.flush(5)  # data was lost
        run(client)
        assert not client.flush(5)
        time.sleep(0.2)
        assert len(trace_requests(collector)) == 2
        stats = client.stats()
        assert stats["dropped_partial_success"] == 6 and stats["retried"] == 0
        assert stats["sent_requests"] >= 2
        warnings = [r for r in caplog.records if "partial success" in r.getMessage()]
        assert len(warnings) == 1 and "spans too old" in warnings[0].getMessage()
        run(client)
        assert client.flush(5)  # an answer of 200 {} loses nothing
    finally:
        client.close(5)


def test_warning_without_rejections_loses_nothing(collector):
    collector.respond_with(200, {"partialSuccess": {"errorMessage": "deprecated attribute"}})
    client = make_client(collector.url)
    try:
        run(client)
        assert client.flush(5)
        assert client.stats()["dropped_partial_success"] == 0
    finally:
        client.close(5)


def test_too_large_request_is_split(collector):
    collector.respond_with(413, {"message": "too large"})
    client = make_client(collector.url, flush_interval="10s")
    try:
        run(client, 4)
        assert client.flush(5)
        first, *rest = trace_requests(collector)
        assert not first["accepted"] and len(rest) == 2
        assert len(collector.spans()) == 8
        assert client.stats()["sent_events"] == 4
    finally:
        client.close(5)


def test_buffer_is_bounded_while_the_endpoint_is_away():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there
    client = make_client(f"http://127.0.0.1:{port}", max_request_size="2kb",
                         max_buffer_size="8kb", server_timeout="200ms")
    try:
        for _ in range(40):
            run(client, 20)
            time.sleep(0.01)
        time.sleep(0.3)
        stats = client.stats()
        assert stats["dropped_buffer_full"] > 0
        assert stats["buffered_bytes"] <= 8 * 1024 + 2 * 1024 * 3  # the head in flight aside
    finally:
        client.close(0.5)


def test_batches_are_gzip_json_with_the_headers(collector):
    client = make_client(collector.url, otlp_headers="x-tenant=acme,api-key=a%3Db")
    try:
        run(client)
        client.capture_message("disk almost full", level="warning")
        assert client.flush(5)
        client.close(5)
    finally:
        client.close(5)
    assert {r["path"] for r in collector.requests} == {"/v1/traces", "/v1/logs", "/v1/metrics"}
    for request in collector.requests:
        assert request["headers"]["x-tenant"] == "acme" and request["headers"]["api-key"] == "a=b"
    (log,) = collector.log_records()
    assert log.severity_number == 13 and log.body.string_value == "disk almost full"


def test_settings_are_checked_at_start_up():
    config = Config(environ={"BEATLIB_EXPORTER": "OTLP",
                             "BEATLIB_OTLP_HEADERS": "api-key=hunter2secret"})
    assert config.exporter == "otlp" and config.otlp_headers == {"api-key": "hunter2secret"}
    assert config.otlp_endpoint == "http://127.0.0.1:4318"
    assert "hunter2secret" not in repr(config) and "otlp_headers='***'" in repr(config)
    assert Config(environ={}).exporter == "intake"
    for setting, value in [("exporter", "zipkin"), ("otlp_endpoint", "grpc://collector:4317"),
                           ("otlp_headers", "no-equals-sign"), ("otlp_headers", {"a b": "c"}),
                           ("otlp_headers", "api-key=line\nbreak")]:
        with pytest.raises(ConfigError) as raised:
            Config(environ={}, **{setting: value})
        assert raised.value.setting == setting and str(raised.value).startswith(setting)
        if setting == "otlp_headers":
            assert "line" not in str(raised.value) and "'***'" in str(raised.value)
