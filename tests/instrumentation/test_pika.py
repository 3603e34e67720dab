"""pika against a real RabbitMQ: the publish span and its trace headers, consumer callbacks as
transactions continuing the trace, basic_get as a poll span, failures, transparency."""

from __future__ import annotations

import pika
import pytest
from pika.adapters.blocking_connection import BlockingChannel

import beatlib
from beatlib import context
from beatlib.config import Config
from tests.databases import run_instrumented

ORIGINALS = (vars(BlockingChannel)["basic_publish"], vars(BlockingChannel)["basic_consume"],
             vars(BlockingChannel)["basic_get"])


@pytest.fixture
def channel(rabbitmq):
    credentials = pika.PlainCredentials(rabbitmq.user, rabbitmq.password)
    connection = pika.BlockingConnection(pika.ConnectionParameters(
        rabbitmq.host, rabbitmq.port, credentials=credentials))
    ch = connection.channel()
    yield ch
    if connection.is_open:
        connection.close()


def queue(channel, name):
    channel.queue_declare(name, auto_delete=True)
    channel.queue_purge(name)
    return name


def test_publish_is_a_send_span_with_trace_headers_in_a_copy(traced, channel):
    q = queue(channel, "beatlib-orders")
    channel.exchange_declare("beatlib-events", "fanout", auto_delete=True)
    channel.queue_bind(q, "beatlib-events")
    props = pika.BasicProperties(content_type="text/plain", headers={"kind": "order"})
    tx = traced.begin()
    channel.basic_publish("", q, b"secret-body", props)
    channel.basic_publish("beatlib-events", "ignored", b"to all")
    traced.end()
    assert props.headers == {"kind": "order"}  # the caller's properties are untouched

    _, got, body = channel.basic_get(q, auto_ack=True)
    _, fanned, _ = channel.basic_get(q, auto_ack=True)
    assert body == b"secret-body" and got.content_type == "text/plain"
    (first, second), errors = traced.shipped()[1:]
    assert not errors
    assert (first["name"], first["type"], first["subtype"], first["action"]) == (
        "RabbitMQ SEND to beatlib-orders", "messaging", "rabbitmq", "send")
    assert first["context"]["message"] == {"queue": {"name": q}, "routing_key": q}
    assert first["context"]["service"]["target"] == {"type": "rabbitmq", "name": q}
    assert first["context"]["destination"]["service"]["resource"] == f"rabbitmq/{q}"
    assert second["name"] == "RabbitMQ SEND to beatlib-events"
    assert second["context"]["message"]["routing_key"] == "ignored"
    assert got.headers == {"kind": "order", "traceparent": f"00-{tx.trace_id}-{first['id']}-03",
                           "tracestate": tx.tracestate}
    assert fanned.headers["traceparent"] == f"00-{tx.trace_id}-{second['id']}-03"
    assert "secret-body" not in str(first) and "kind" not in str(first)


def test_a_traceparent_of_the_callers_is_kept(traced, channel):
    q = queue(channel, "beatlib-own")
    mine = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    traced.begin()
    channel.basic_publish("", q, b"x", pika.BasicProperties(headers={"traceparent": mine}))
    traced.end()
    assert channel.basic_get(q, auto_ack=True)[1].headers == {"traceparent": mine}
    assert len(traced.spans()) == 1


def test_outside_a_transaction_the_message_goes_as_it_is(traced, channel):
    q = queue(channel, "beatlib-plain")
    channel.basic_publish("", q, b"x")
    assert channel.basic_get(q, auto_ack=True)[1].headers is None
    assert traced.shipped() == ([], [], [])


def test_a_failed_publish_is_a_failed_span_and_the_same_exception(traced, channel):
    channel.confirm_delivery()
    traced.begin()
    with pytest.raises(pika.exceptions.UnroutableError):
        channel.basic_publish("", "beatlib-nowhere", b"x", mandatory=True)
    traced.end()
    (span,) = traced.spans()
    assert (span["name"], span["outcome"]) == ("RabbitMQ SEND to beatlib-nowhere", "failure")


def test_each_delivery_to_a_consumer_is_a_transaction_continuing_the_trace(traced, channel):
    q = queue(channel, "beatlib-work")
    publisher = traced.begin()
    channel.basic_publish("", q, b"one")
    channel.basic_publish("", q, b"boom")
    traced.end()
    seen = []

    def on_message(ch, method, properties, body):
        seen.append((body, context.current_transaction()))
        with beatlib.capture_span("handle"):
            ch.basic_ack(method.delivery_tag)
        if body == b"boom":
            raise ValueError("bad message")
        if len(seen) == 2:
            ch.stop_consuming()

    channel.basic_consume(q, on_message)
    with pytest.raises(ValueError, match="bad message"):  # pika lets it through, as ever
        channel.start_consuming()
    assert [body for body, _ in seen] == [b"one", b"boom"]
    assert all(tx is not None for _, tx in seen) and context.current_transaction() is None
    txs, spans, errors = traced.shipped()
    sends = {s["id"] for s in spans if s.get("action") == "send"}
    consumed = [t for t in txs if t["type"] == "messaging"]
    assert len(consumed) == 2
    for tx in consumed:
        assert tx["name"] == "RabbitMQ RECEIVE from beatlib-work"
        assert tx["trace_id"] == publisher.trace_id and tx["parent_id"] in sends
        assert tx["context"]["message"] == {"queue": {"name": q}, "routing_key": q}
    assert sorted(t["outcome"] for t in consumed) == ["failure", "success"]
    assert [e["exception"]["message"] for e in errors] == ["bad message"]
    assert len([s for s in spans if s["name"] == "handle"]) == 2


def test_basic_get_in_a_transaction_is_a_poll_span(traced, channel):
    q = queue(channel, "beatlib-poll")
    channel.basic_publish("", q, b"x")
    traced.begin()
    method, properties, body = channel.basic_get(q, auto_ack=True)
    assert channel.basic_get(q, auto_ack=True) == (None, None, None)
    traced.end()
    assert body == b"x"
    spans = traced.spans()
    assert [(s["name"], s["action"], s["outcome"]) for s in spans] == [
        ("RabbitMQ POLL from beatlib-poll", "poll", "success")] * 2
    assert spans[0]["context"]["service"]["target"] == {"type": "rabbitmq", "name": q}


def test_the_consumer_continues_a_trace_with_beatlib_transaction(traced, channel):
    q = queue(channel, "beatlib-job")
    publisher = traced.begin()
    channel.basic_publish("", q, b"x")
    traced.end()
    _, properties, _ = channel.basic_get(q, auto_ack=True)
    with beatlib.transaction("handle job", "messaging", headers=properties.headers):
        pass
    job = next(t for t in traced.shipped()[0] if t["name"] == "handle job")
    assert job["trace_id"] == publisher.trace_id


def test_disabled_and_uninstrumented_leave_pika_as_it_was(traced, channel):
    q = queue(channel, "beatlib-later")
    seen = []

    def on_message(ch, method, properties, body):
        seen.append(context.current_transaction())
        ch.stop_consuming()

    channel.basic_consume(q, on_message)  # while instrumented
    beatlib.uninstrument()
    assert (vars(BlockingChannel)["basic_publish"], vars(BlockingChannel)["basic_consume"],
            vars(BlockingChannel)["basic_get"]) == ORIGINALS
    beatlib.instrument(Config(disabled_instrumentations="pika", environ={}))
    assert vars(BlockingChannel)["basic_publish"] is ORIGINALS[0]
    traced.begin()
    channel.basic_publish("", q, b"x")
    traced.end()
    channel.start_consuming()
    assert seen == [None]  # the callback wrapped before runs plain
    assert traced.spans() == []


def test_instrumenting_before_pika_is_imported(receiver, rabbitmq):
    run_instrumented(f"""
        import pika
        params = pika.ConnectionParameters("127.0.0.1", {rabbitmq.port}, credentials=
            pika.PlainCredentials({rabbitmq.user!r}, {rabbitmq.password!r}))
        ch = pika.BlockingConnection(params).channel()
        ch.queue_declare("beatlib-late", auto_delete=True)
        client.begin_transaction("test")
        ch.basic_publish("", "beatlib-late", b"x")
        client.end_transaction("t", "success")
    """, receiver.url)
    assert [s["name"] for s in receiver.events("span")] == ["RabbitMQ SEND to beatlib-late"]
