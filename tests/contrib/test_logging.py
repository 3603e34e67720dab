"""`LoggingHandler` and `TraceContextFilter` with real loggers, events checked at the receiver."""

from __future__ import annotations

import io
import logging
import threading

import pytest

import beatlib
from beatlib import context
from beatlib.contrib.logging import LoggingHandler, TraceContextFilter


@pytest.fixture
def client(receiver):
    c = beatlib.Client(
        service_name="logs", server_url=receiver.url, flush_interval="200ms", environ={}
    )
    yield c
    c.close(5)
    context.set_active(None)


@pytest.fixture
def log(client):
    """The logger `app.orders`, with a LoggingHandler on the root logger."""
    root = logging.getLogger()
    handler = LoggingHandler()
    root.addHandler(handler)
    log = logging.getLogger("app.orders")
    log.setLevel(logging.DEBUG)  # whatever earlier tests (Celery's worker) did to the root
    yield log
    log.setLevel(logging.NOTSET)
    root.removeHandler(handler)


def test_error_without_exc_info_is_a_message(client, log, receiver):
    tx = client.begin_transaction("request")
    log.error("order %s not found", 42)
    client.end_transaction("GET /orders/<id>")
    assert client.flush(5)

    (error,) = receiver.events("error")
    assert error["log"]["message"] == "order 42 not found"
    assert error["log"]["param_message"] == "order %s not found"
    assert error["log"]["level"] == "error"
    assert error["log"]["logger_name"] == "app.orders"
    assert error["culprit"].endswith("in test_error_without_exc_info_is_a_message")
    assert error["transaction_id"] == "%016x" % tx.id


def test_exception_with_exc_info_is_captured_with_the_message(client, log, receiver):
    try:
        {}["sku"]
    except KeyError:
        log.exception("could not price order")
        log.critical("plain %s", "critical", exc_info=False)
    assert client.flush(5)

    errors = receiver.events("error")
    (exc,) = [e for e in errors if "exception" in e]
    assert exc["exception"]["type"] == "KeyError" and exc["exception"]["handled"] is True
    assert exc["log"] == {  # the record's message beside its exception
        "message": "could not price order", "level": "error", "logger_name": "app.orders"}
    assert "log" not in exc.get("context", {}).get("custom", {})
    (msg,) = [e for e in errors if "exception" not in e]
    assert msg["log"]["level"] == "critical" and "param_message" in msg["log"]


def test_records_below_the_level_are_ignored(client, log, receiver):
    log.warning("slow query")
    log.info("hello")
    warnings = LoggingHandler(level=logging.WARNING)
    log.addHandler(warnings)
    try:
        log.warning("disk %d%% full", 91)
    finally:
        log.removeHandler(warnings)
    assert client.flush(5)
    (error,) = receiver.events("error")
    assert error["log"]["message"] == "disk 91% full" and error["log"]["level"] == "warning"


def test_beatlibs_own_records_and_reentry_are_not_captured(client, receiver, monkeypatch):
    root = logging.getLogger()
    handler = LoggingHandler(level=logging.DEBUG)
    root.addHandler(handler)
    capture = client.capture_message

    def capture_and_log(*args, **kwargs):  # something logs while the handler captures
        logging.getLogger("app.inner").error("logged during a capture")
        return capture(*args, **kwargs)

    monkeypatch.setattr(client, "capture_message", capture_and_log)
    pool_log = logging.getLogger("urllib3.connectionpool")
    pool_level = pool_log.level
    try:
        logging.getLogger("beatlib").error("beatlib: could not send")
        logging.getLogger("beatlib.transport").error("beatlib: batch dropped")
        # What the sending thread logs (urllib3 warnings about the APM server) is about sending.
        pool_log.setLevel(logging.DEBUG)
        sender = threading.Thread(name="beatlib-transport", target=lambda: pool_log.warning(
            "Retrying after connection broken"))
        sender.start()
        sender.join()
        logging.getLogger("app").error("one")
    finally:
        root.removeHandler(handler)
        pool_log.setLevel(pool_level)
    assert client.flush(5)
    assert [e["log"]["message"] for e in receiver.events("error")] == ["one"]


def test_a_broken_client_never_raises_into_the_app(client, log, monkeypatch, capsys):
    def broken(*a, **kw):
        raise RuntimeError("boom")

    monkeypatch.setattr(client, "capture_message", broken)
    log.error("still fine")
    assert "Logging error" not in capsys.readouterr().err  # not even logging.handleError


def test_no_client_means_nothing_happens(log, client):
    client.close(5)
    assert beatlib.get_client() is None
    log.error("nobody listens")


def test_filter_sets_ids_inside_and_outside_a_transaction(client):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(TraceContextFilter())
    handler.setFormatter(logging.Formatter(
        "%(message)s trace.id=%(trace_id)s transaction.id=%(transaction_id)s "
        "span.id=%(span_id)s"))
    log = logging.getLogger("app.filter")
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    log.propagate = False
    try:
        log.warning("outside")
        tx = client.begin_transaction("task")
        log.warning("in transaction")
        with beatlib.capture_span("work") as span:
            log.warning("in span")
        thread = threading.Thread(target=log.warning, args=("other thread",))
        thread.start()
        thread.join()
        client.end_transaction("job")
        log.warning("after")
    finally:
        log.removeHandler(handler)
        log.setLevel(logging.NOTSET)
        log.propagate = True

    txid, spanid = "%016x" % tx.id, "%016x" % span.id
    assert stream.getvalue().splitlines() == [
        "outside trace.id= transaction.id= span.id=",
        f"in transaction trace.id={tx.trace_id} transaction.id={txid} span.id=",
        f"in span trace.id={tx.trace_id} transaction.id={txid} span.id={spanid}",
        "other thread trace.id= transaction.id= span.id=",
        "after trace.id= transaction.id= span.id=",
    ]


def test_framework_handlers_add_context_through_the_hooks(client, receiver):
    class RequestHandler(LoggingHandler):
        def find_client(self):
            return client

        def record_context(self, record, client):
            return {"request": {"method": record.method, "url": {"full": "http://x/orders"}}}

    log = logging.getLogger("app.hooks")
    handler = RequestHandler()
    log.addHandler(handler)
    try:
        log.error("payment declined", extra={"method": "POST"})
    finally:
        log.removeHandler(handler)
    assert client.flush(5)
    (error,) = receiver.events("error")
    assert error["context"]["request"]["method"] == "POST"
