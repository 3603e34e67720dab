"""kombu against a real RabbitMQ: the publish span and its trace headers (the caller's headers
untouched), a consumer continuing the trace, failures, and Celery over kombu keeping its one
send span and its task transactions."""

from __future__ import annotations

import logging

import kombu
import pytest
import wrapt
from celery.contrib.testing.worker import start_worker
from kombu.messaging import Producer

import beatlib
from beatlib.config import Config
from beatlib.contrib import celery as beat_celery
from beatlib.tracing import outgoing_headers
from tests.databases import run_instrumented


@pytest.fixture
def connection(rabbitmq):
    with kombu.Connection(rabbitmq.url) as conn:
        yield conn


def test_publish_is_a_send_span_with_trace_headers_in_a_copy(traced, connection):
    exchange = kombu.Exchange("beatlib-shop", "direct", auto_delete=True)
    queue = kombu.Queue("beatlib-invoices", exchange, "invoice", auto_delete=True)
    received = []
    headers = {"kind": "invoice"}
    with connection.Consumer(queue, callbacks=[lambda body, m: received.append(m)]):
        tx = traced.begin()
        producer = connection.Producer(exchange=exchange)
        producer.publish({"secret": "value"}, routing_key="invoice", headers=headers,
                         declare=[queue])
        connection.Producer().publish("to the queue", routing_key="beatlib-invoices")
        traced.end()
        while len(received) < 2:
            connection.drain_events(timeout=5)
    assert headers == {"kind": "invoice"}  # the caller's dict is untouched
    first, second = traced.spans()
    assert (first["name"], first["type"], first["subtype"], first["action"]) == (
        "RabbitMQ SEND to beatlib-shop", "messaging", "rabbitmq", "send")
    assert first["context"]["message"] == {"queue": {"name": "beatlib-shop"},
                                           "routing_key": "invoice"}
    assert first["context"]["service"]["target"] == {"type": "rabbitmq", "name": "beatlib-shop"}
    assert second["name"] == "RabbitMQ SEND to beatlib-invoices"
    assert received[0].payload == {"secret": "value"}
    assert received[0].headers == {"kind": "invoice", "tracestate": tx.tracestate,
                                   "traceparent": f"00-{tx.trace_id}-{first['id']}-03"}
    assert received[1].headers["traceparent"] == f"00-{tx.trace_id}-{second['id']}-03"
    assert "secret" not in str(first) and "kind" not in str(first)


def test_the_consumer_continues_the_trace_with_beatlib_transaction(traced, connection):
    queue = kombu.Queue("beatlib-kombu-jobs", auto_delete=True)

    def handle(body, message):
        with beatlib.transaction("handle job", "messaging", headers=message.headers):
            message.ack()

    with connection.Consumer(queue, callbacks=[handle]):
        publisher = traced.begin()
        connection.Producer().publish("x", routing_key="beatlib-kombu-jobs")
        traced.end()
        connection.drain_events(timeout=5)
    txs, (send,), _ = traced.shipped()
    job = next(t for t in txs if t["name"] == "handle job")
    assert (job["trace_id"], job["parent_id"]) == (publisher.trace_id, send["id"])


def test_baggage_goes_in_the_message_headers_and_on_from_the_consumer(traced, connection):
    queue = kombu.Queue("beatlib-kombu-baggage", auto_delete=True)
    baggage = "userId=alice,cart=42;p"
    onward = []

    def handle(body, message):
        with beatlib.transaction("handle job", "messaging", headers=message.headers):
            onward.append(outgoing_headers())
            message.ack()

    received = []
    with connection.Consumer(queue, callbacks=[lambda body, m: received.append(m), handle]):
        traced.client.begin_transaction("request", None, baggage)
        connection.Producer().publish("x", routing_key="beatlib-kombu-baggage")
        connection.Producer().publish("y", routing_key="beatlib-kombu-baggage",
                                      headers={"baggage": "mine=1"})
        traced.end()
        while len(received) < 2:
            connection.drain_events(timeout=5)
    assert received[0].headers["baggage"] == baggage
    assert received[1].headers["baggage"] == "mine=1"  # the app's own is kept
    assert onward[0]["baggage"] == baggage and onward[1]["baggage"] == "mine=1"
    assert "alice" not in repr(traced.shipped())


def test_outside_a_transaction_and_failures(traced, connection):
    queue = kombu.Queue("beatlib-kombu-plain", auto_delete=True)
    received = []
    with connection.Consumer(queue, callbacks=[lambda body, m: received.append(m)]):
        connection.Producer().publish("x", routing_key="beatlib-kombu-plain")
        connection.drain_events(timeout=5)
        traced.begin()
        with pytest.raises(kombu.exceptions.EncodeError):
            connection.Producer().publish(object(), routing_key="beatlib-kombu-plain")
        traced.end()
    assert received[0].headers == {}
    (span,) = traced.spans()
    assert (span["name"], span["outcome"]) == ("RabbitMQ SEND to beatlib-kombu-plain", "failure")


def test_uninstrument_restores_and_disabling_skips_it(traced):
    wrapped = vars(Producer)["publish"]
    assert isinstance(wrapped, wrapt.FunctionWrapper)
    beatlib.uninstrument()
    assert vars(Producer)["publish"] is wrapped.__wrapped__
    beatlib.instrument(Config(disabled_instrumentations="kombu", environ={}))
    assert vars(Producer)["publish"] is wrapped.__wrapped__


def test_instrumenting_before_kombu_is_imported(receiver, rabbitmq):
    run_instrumented(f"""
        import kombu
        with kombu.Connection({rabbitmq.url!r}) as conn:
            client.begin_transaction("test")
            conn.Producer().publish("x", routing_key="beatlib-kombu-late")
            client.end_transaction("t", "success")
    """, receiver.url)
    assert [s["name"] for s in receiver.events("span")] == ["RabbitMQ SEND to beatlib-kombu-late"]


def test_celery_over_rabbitmq_keeps_its_one_send_span_and_task_transaction(traced, rabbitmq):
    app = __import__("celery").Celery("brokered", broker=rabbitmq.url,
                                      backend="cache+memory://", set_as_current=False)

    @app.task(name="brokered.add")
    def add(x, y):
        return x + y

    beat_celery.register()
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=10):
            with app.connection_for_write() as conn:
                publisher = traced.begin()
                add.apply_async((2, 3), connection=conn)
                traced.end()
            assert traced.receiver.wait_for("transaction", 2, timeout=20)
    finally:
        beat_celery.unregister()
        for handler in set(root.handlers) - set(handlers):
            root.removeHandler(handler)
        root.setLevel(level)
    txs, spans, errors = traced.shipped()
    assert not errors
    (send,) = spans
    assert (send["name"], send["subtype"]) == ("Celery send brokered.add", "rabbitmq")
    by_type = {t["type"]: t for t in txs}
    assert set(by_type) == {"test", "celery"}  # no consumer transaction beside the task's
    task = by_type["celery"]
    assert (task["trace_id"], task["parent_id"]) == (publisher.trace_id, send["id"])
