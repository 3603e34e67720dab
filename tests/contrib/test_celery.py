"""Celery end to end: real tasks run by a real worker (a thread on the memory broker; and a
prefork worker process on a filesystem broker), their events checked at the receiver."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import beatlib
from beatlib import context
from beatlib.contrib import celery as beat_celery
from beatlib.contrib.logging import LoggingHandler
from beatlib.tracing import outgoing_headers

celery = pytest.importorskip("celery")
from celery.contrib.testing.worker import start_worker  # noqa: E402

SRC = str(Path(beatlib.__file__).resolve().parents[1])


@pytest.fixture
def client(receiver):
    c = beatlib.Client(
        service_name="tasks", server_url=receiver.url, flush_interval="200ms", environ={}
    )
    beat_celery.register()
    yield c
    beat_celery.unregister()
    c.close(5)
    context.set_active(None)


@pytest.fixture(scope="module")
def app():
    app = celery.Celery("shop", broker="memory://", backend="cache+memory://")
    app.conf.broker_transport_options = {"polling_interval": 0.01}

    @app.task(name="shop.add")
    def add(x, y):
        with beatlib.capture_span("sum"):
            return x + y

    @app.task(name="shop.onward")
    def onward():  # the baggage the task's own outgoing calls would carry
        return (outgoing_headers() or {}).get("baggage")

    @app.task(name="shop.fail")
    def fail(order_id):
        raise LookupError(f"no order {order_id}")

    return app


@pytest.fixture(scope="module")
def worker(app):
    """One worker thread for the module; it reports to whichever client is the default."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=10):
        yield
    for handler in set(root.handlers) - set(handlers):  # the worker sets up logging
        root.removeHandler(handler)
    root.setLevel(level)


def test_task_is_a_transaction_continuing_the_publishers_trace(client, app, worker, receiver):
    publisher = client.begin_transaction("request")
    result = app.tasks["shop.add"].delay(2, 3)
    client.end_transaction("POST /orders", "HTTP 2xx")
    assert result.get(timeout=10) == 5
    assert receiver.wait_for("transaction", 2)

    by_type = {t["type"]: t for t in receiver.events("transaction")}
    task, request = by_type["celery"], by_type["request"]
    assert (task["name"], task["result"], task["outcome"]) == ("shop.add", "SUCCESS", "success")
    assert task["trace_id"] == publisher.trace_id == request["trace_id"]
    spans = {s["name"]: s for s in receiver.events("span")}
    send = spans["Celery send shop.add"]
    # The memory broker has no name among Elastic's messaging systems: subtype "celery".
    assert (send["type"], send["subtype"], send["action"]) == ("messaging", "celery", "send")
    assert send["context"]["message"] == {"queue": {"name": "celery"}}  # the default queue
    assert send["context"]["destination"] == {"service": {"resource": "celery/celery"}}
    assert send["transaction_id"] == request["id"] and send["outcome"] == "success"
    assert task["parent_id"] == send["id"]  # the worker's transaction hangs under the send
    assert spans["sum"]["transaction_id"] == task["id"]


def test_the_publishers_baggage_goes_on_from_the_task(client, app, worker, receiver):
    baggage = "userId=alice,order=7;p"
    client.begin_transaction("request", None, baggage)
    sent = app.tasks["shop.onward"].delay()
    client.end_transaction("POST /orders", "HTTP 2xx")
    assert sent.get(timeout=10) == baggage
    assert receiver.wait_for("transaction", 2)
    assert "alice" not in repr(receiver.events("transaction"))


def test_failure_is_captured_once_with_the_task_context(client, app, worker, receiver):
    handler = LoggingHandler()  # Celery also logs the failure: still one error
    logging.getLogger().addHandler(handler)
    try:
        result = app.tasks["shop.fail"].delay(42)
        with pytest.raises(LookupError):
            result.get(timeout=10)
        assert receiver.wait_for("transaction", 1) and client.flush(5)
    finally:
        logging.getLogger().removeHandler(handler)

    (task,) = receiver.events("transaction")
    assert (task["name"], task["result"], task["outcome"]) == ("shop.fail", "FAILURE", "failure")
    assert "parent_id" not in task  # published outside any transaction: a new trace
    (error,) = receiver.events("error")
    assert error["exception"]["type"] == "LookupError" and error["exception"]["handled"] is False
    assert error["transaction_id"] == task["id"]
    assert error["transaction"]["name"] == "shop.fail"
    ctx = error["context"]["custom"]["celery"]
    assert ctx["name"] == "shop.fail" and ctx["id"] == result.id and ctx["retries"] == 0


@pytest.mark.parametrize(("broker", "subtype"), [
    ("amqp://guest:secret@rabbit:5672//", "rabbitmq"), ("pyamqp://rabbit//", "rabbitmq"),
    ("sqs://", "sqs"), ("redis://localhost:6379/0", "celery"), (None, "rabbitmq"),
    ("sqla+postgresql://db/celery", "celery"), (["amqp://a//", "amqp://b//"], "rabbitmq"),
])  # fmt: skip
def test_publish_span_subtype_names_the_broker(broker, subtype):
    app = celery.Celery("names", broker=broker, set_as_current=False)
    assert beat_celery.broker_subtype(app) == subtype


def test_eager_task_inside_a_transaction_is_a_span(client, app, receiver):
    tx = client.begin_transaction("request")
    app.conf.task_always_eager = True
    try:
        assert app.tasks["shop.add"].delay(1, 1).get() == 2
    finally:
        app.conf.task_always_eager = False
    assert beatlib.get_current_transaction() is tx
    client.end_transaction("GET /eager")
    assert client.flush(5)
    (event,) = receiver.events("transaction")
    spans = {s["name"]: s for s in receiver.events("span")}
    eager = spans["shop.add"]
    assert (eager["type"], eager["subtype"], eager["action"]) == ("app", "internal", "celery")
    assert eager["outcome"] == "success" and "service" not in eager.get("context", {})
    assert spans["sum"]["parent_id"] == spans["shop.add"]["id"]
    assert event["name"] == "GET /eager"


def test_unregister_records_nothing(client, app, worker, receiver):
    beat_celery.unregister()
    assert app.tasks["shop.add"].delay(1, 2).get(timeout=10) == 3
    assert client.flush(5)
    assert receiver.events("transaction") == []


WORKER_APP = """
import os, time
import beatlib
from beatlib.contrib import celery as beat_celery
from celery import Celery

app = Celery("worker_app", broker="filesystem://", backend="file://{results}")
app.conf.broker_transport_options = {{
    "data_folder_in": "{queue}", "data_folder_out": "{queue}", "control_folder": "{queue}",
    "polling_interval": 0.05}}
app.conf.worker_prefetch_multiplier = 1
client = beatlib.Client(service_name="worker", flush_interval="60s")  # created before the fork
beat_celery.register()

@app.task(name="worker_app.work")
def work(i):
    beatlib.label(pid=os.getpid(), i=i)
    time.sleep(0.05)
    return os.getpid()
"""


def test_prefork_children_ship_their_own_events(client, receiver, tmp_path):
    queue, results = tmp_path / "queue", tmp_path / "results"
    queue.mkdir()
    results.mkdir()
    (tmp_path / "worker_app.py").write_text(textwrap.dedent(
        WORKER_APP.format(queue=queue, results=results)))
    env = {**os.environ, "BEATLIB_SERVER_URL": receiver.url,
           "PYTHONPATH": os.pathsep.join([str(tmp_path), SRC])}
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "worker_app", "worker", "--pool", "prefork",
         "--concurrency", "2", "--without-gossip", "--without-mingle", "--without-heartbeat",
         "--loglevel", "warning"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        sys.path.insert(0, str(tmp_path))
        import worker_app  # the publisher side: same app, this process's client

        worker_app.client.close(1)  # keep the test's client as the default
        publisher = client.begin_transaction("request")
        results_ = [worker_app.work.delay(i) for i in range(20)]
        client.end_transaction("POST /batch")
        pids = {r.get(timeout=30) for r in results_}
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("worker_app", None)
        worker.send_signal(signal.SIGTERM)  # warm shutdown: children flush as they leave
        output = worker.communicate(timeout=30)[0].decode()
    assert worker.returncode == 0, output

    assert receiver.wait_for("transaction", 21, timeout=10), output
    tasks = [t for t in receiver.events("transaction") if t["type"] == "celery"]
    assert sorted(t["context"]["tags"]["i"] for t in tasks) == list(range(20))  # each once
    assert {t["trace_id"] for t in tasks} == {publisher.trace_id}
    assert {t["context"]["tags"]["pid"] for t in tasks} == pids
    assert worker.pid not in pids and len(pids) == 2  # the children, not the main process
    metadata = [m for m in receiver.metadata if m["service"]["name"] == "worker"]
    assert {m["process"]["pid"] for m in metadata} == pids
