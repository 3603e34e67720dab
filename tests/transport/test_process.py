"""exporter_process=True: records cross a Unix socket to a child process that encodes and
sends them; what reaches the receiver is what the worker thread would have sent."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest

import beatlib
from beatlib.contrib.wsgi import record_request
from beatlib.transport import Transport
from beatlib.transport import process as exporter
from beatlib.transport.memory import MemorySender

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="SOCK_SEQPACKET, /proc")

ENVIRON = {
    "REQUEST_METHOD": "GET", "PATH_INFO": "/items/reset/tok3n", "QUERY_STRING": "page=2",
    "SERVER_NAME": "shop", "SERVER_PORT": "8000", "SERVER_PROTOCOL": "HTTP/1.1",
    "wsgi.url_scheme": "http", "HTTP_HOST": "shop:8000", "HTTP_COOKIE": "sessionid=abc; x=1",
    "HTTP_AUTHORIZATION": "Bearer abcdefghijklmnopqrstuvwxyz", "REMOTE_ADDR": "10.0.0.1",
    "wsgi.input": object(),  # an app object the environ copy still holds: never crosses
}  # fmt: skip


def drop_secret_spans(kind: str, event: dict[str, Any]) -> dict[str, Any] | None:
    """An importable before_send hook: the exporter process runs it."""
    if kind == "span" and event.get("name") == "secret":
        return None
    event.setdefault("context", {}).setdefault("custom", {})["hooked_in"] = os.getpid() \
        if kind in ("transaction", "error") else None
    return event


def record(client: beatlib.Client, n: int, spans: int = 3) -> None:
    for i in range(n):
        tx = client.begin_transaction("request")
        record_request(tx, dict(ENVIRON), client.config)
        tx.set_route_params({"token": "tok3n"})
        beatlib.label(order=i)
        for j in range(spans):
            with beatlib.capture_span(f"SELECT {j}", "db", "sqlite", "query") as span:
                span.context = {"db": {"statement": "SELECT * FROM t WHERE password = 'x'"}}
        client.end_transaction(f"GET /items/{i % 3}", "HTTP 2xx")


def process_client(receiver: Any, **settings: Any) -> beatlib.Client:
    base = {"service_name": "t", "server_url": receiver.url, "flush_interval": "100ms",
            "exporter_process": True, "shutdown_timeout": "10s"}
    return beatlib.Client(beatlib.config.Config(environ={}, **{**base, **settings}))


def test_the_default_is_the_worker_thread():
    client = beatlib.Client(beatlib.config.Config(environ={}, service_name="t"))
    assert type(client.transport) is Transport and not client.config.exporter_process


def test_a_record_crosses_unchanged_byte_for_byte():
    """The child encodes a rebuilt transaction (or error) to the very lines the worker
    thread writes for the original: redaction, truncation, span order and ids included."""
    client = beatlib.Client(beatlib.config.Config(environ={}, service_name="t",
                                                  span_stack_trace_min_duration=0),
                            sender=MemorySender())
    records: list[Any] = []
    client.tracer.queue = client.transport.queue = records.append  # type: ignore[method-assign]
    record(client, 3)
    client.begin_transaction("task")
    with beatlib.capture_span("outer"), beatlib.capture_span("inner", leaf=True):
        with beatlib.capture_span("below a leaf: not recorded"):
            pass
    client.end_transaction("nested")
    assert records[-1].spans[1].parent is records[-1].spans[0]
    try:
        raise ValueError("card 4111 1111 1111 1111")
    except ValueError:
        tx = client.begin_transaction("task")
        client.capture_exception(custom={"password": "hunter2"})
        client.end_transaction("job")
    error = records[-2]  # queued before its transaction ended
    assert type(error).__name__ == "ErrorSnapshot"
    for item in records:
        expected = client.pipeline.encode(item)
        crossed = exporter.decode_record(memoryview(exporter._encode_record(item)))
        assert client.pipeline.encode(crossed) == expected
    assert b"hunter2" not in b"".join(client.pipeline.encode(error))
    assert b"tok3n" not in b"".join(client.pipeline.encode(records[0]))
    assert tx.ended


def test_transactions_spans_and_errors_reach_the_receiver(receiver):
    client = process_client(receiver, before_send=drop_secret_spans)
    record(client, 40)
    with beatlib.capture_span("secret"):  # outside a transaction: nothing
        pass
    tx = client.begin_transaction("task")
    with beatlib.capture_span("secret"):
        pass
    try:
        {}["missing"]
    except KeyError:
        client.capture_exception()
    client.end_transaction("job", "ok")
    assert client.flush(30)
    assert type(client.transport).__name__ == "ProcessTransport"
    child = client.transport.worker
    assert child is not None and child.pid != os.getpid()
    txs = receiver.events("transaction")
    assert len(txs) == 41 and len(receiver.events("span")) == 120
    assert [e["exception"]["type"] for e in receiver.events("error")] == ["KeyError"]
    assert not [s for s in receiver.events("span") if s["name"] == "secret"]
    assert {t["context"]["custom"]["hooked_in"] for t in txs} == {child.pid}  # ran there
    assert {m["process"]["pid"] for m in receiver.metadata} == {os.getpid()}  # the app's
    assert b"tok3n" not in receiver.received() and b"hunter2" not in receiver.received()
    stats = client.stats()
    assert stats["sent_events"] >= 42 and stats["exporter_records"] == 42
    assert stats["dropped_by_hook"] == 1  # the secret span, in the child
    assert not {k: v for k, v in stats.items() if k.startswith("dropped_") and v
                and k != "dropped_by_hook"}
    assert client.close(30)
    assert child.poll() == 0  # the child exited
    assert tx.ended


def test_close_sends_what_was_never_flushed(receiver):
    client = process_client(receiver, flush_interval="60s")
    record(client, 25)
    assert client.close(30)
    assert len(receiver.events("transaction")) == 25


def test_what_reached_the_socket_is_sent_when_the_app_dies(receiver, tmp_path):
    """os._exit (or SIGKILL): no atexit, no close; the child sees the socket close and
    ships what it had."""
    script = tmp_path / "app.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {os.getcwd()!r})
        import beatlib
        from tests.transport.test_process import record
        client = beatlib.Client(service_name="t", server_url={receiver.url!r},
                                flush_interval="60s", exporter_process=True)
        record(client, 30)
        while client.transport.worker is None:  # started by a thread of its own
            time.sleep(0.01)
        print(client.transport.worker.pid, flush=True)
        os._exit(0)
    """))
    env = {k: v for k, v in os.environ.items() if not k.startswith("BEATLIB_")}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         env=env, timeout=60, check=True)
    child = int(out.stdout.split()[0])
    assert receiver.wait_for("transaction", 30, timeout=30), out.stderr
    assert len(receiver.events("transaction")) == 30
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{child}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{child}"), "the exporter outlived its work"


def test_a_full_socket_drops_and_counts_without_blocking(receiver):
    client = process_client(receiver)
    record(client, 1)
    assert client.flush(30)
    child = client.transport.worker
    os.kill(child.pid, signal.SIGSTOP)  # an exporter that is not reading
    try:
        took = []
        big = "x" * 20000
        for _ in range(600):
            start = time.perf_counter()
            tx = client.begin_transaction("task")
            tx.set_context("custom", {"pad": big})
            client.end_transaction("job")
            took.append(time.perf_counter() - start)
        stats = client.stats()
        assert stats["dropped_queue_full"] > 0
        took.sort()
        assert took[int(len(took) * 0.99)] < 0.05  # never waits for the child
    finally:
        os.kill(child.pid, signal.SIGCONT)
    assert not client.flush(30)  # it lost some: the flush says so
    sent = 600 - stats["dropped_queue_full"]
    assert len(receiver.events("transaction")) == 1 + sent
    assert client.close(30)


def test_a_dead_exporter_is_counted_and_replaced(receiver, monkeypatch):
    monkeypatch.setattr(exporter, "_RESTART_AFTER", 0.0)
    client = process_client(receiver)
    record(client, 2)
    assert client.flush(30)
    first = client.transport.worker
    os.kill(first.pid, signal.SIGKILL)
    first.wait(10)
    record(client, 1)  # sent into a dead socket: lost, counted
    record(client, 5)
    assert not client.flush(30)  # it lost one
    stats = client.stats()
    assert stats["exporter_restarts"] == 1 and stats["dropped_send_error"] >= 1
    assert client.transport.worker.pid != first.pid
    assert len(receiver.events("transaction")) == 2 + 6 - stats["dropped_send_error"]
    record(client, 1)
    assert client.flush(30)  # nothing lost since the last one
    assert client.close(30)


def test_a_forked_child_gets_its_own_exporter(receiver):
    client = process_client(receiver)
    record(client, 3)
    assert client.flush(30)
    parent_exporter = client.transport.worker.pid
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            assert client.transport.worker is None  # the parent's is not ours
            record(client, 4)
            ok = client.close(30) and client.transport.stats()["exporter_records"] == 4
            code = 0 if ok else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    record(client, 2)
    assert client.flush(30) and client.transport.worker.pid == parent_exporter
    assert len(receiver.events("transaction")) == 9
    pids = {m["process"]["pid"] for m in receiver.metadata}
    assert pids == {os.getpid(), pid}
    assert client.close(30)


def test_a_hook_the_child_cannot_import_keeps_the_worker_thread(receiver, caplog):
    client = process_client(receiver, before_send=lambda kind, event: event)
    assert type(client.transport) is Transport
    assert "exporter_process needs a before_send hook" in caplog.text
    record(client, 1)
    assert client.close(10) and len(receiver.events("transaction")) == 1


def test_process_metrics_are_the_apps(receiver):
    ballast = b"x" * (100 << 20)  # written: resident in this process, not in the exporter
    client = process_client(receiver)
    record(client, 1)
    assert client.close(30)
    rss = [m["samples"]["system.process.memory.rss.bytes"]["value"]
           for m in receiver.events("metricset")
           if "system.process.memory.rss.bytes" in m["samples"]]
    assert rss and min(rss) > len(ballast)
    del ballast


def big_transaction(client: beatlib.Client, name: str, spans: int = 300,
                    statement: int = 20000) -> None:
    """A transaction whose record (long statements: the truncation is the child's) is longer
    than one message."""
    client.begin_transaction("task")
    for j in range(spans):
        with beatlib.capture_span(f"INSERT {j}", "db", "postgresql", "query") as span:
            span.context = {"db": {"statement": f"INSERT INTO t VALUES ({j}, '"
                                   + "v" * statement + "')"}}
    client.end_transaction(name, "ok")


def sent_lines(receiver: Any) -> list[bytes]:
    return [line for line in receiver.received().splitlines()
            if line.startswith((b'{"transaction"', b'{"span"', b'{"error"'))]


@pytest.mark.parametrize("send_buffer", [None, 64 << 10], ids=["4mb", "linux-default-cap"])
def test_a_record_longer_than_a_message_arrives_in_parts(receiver, monkeypatch, send_buffer):
    """A record over the message limit (or over what the socket's buffer takes in one
    message: the kernel refuses it) goes in parts and is joined again in the child: the
    lines that arrive are those the worker thread writes for it, whatever came between."""
    if send_buffer is not None:
        monkeypatch.setattr(exporter, "SEND_BUFFER", send_buffer)
    client = process_client(receiver)
    records: list[Any] = []
    queue = client.tracer.queue
    client.tracer.queue = lambda item: (records.append(item), queue(item))  # type: ignore
    record(client, 2)
    big_transaction(client, "big one")
    record(client, 2)
    big_transaction(client, "big two", spans=40)
    assert len(exporter._encode_record(records[2])) > exporter.MAX_MESSAGE
    assert client.flush(60)
    expected = [line for item in records for line in b"".join(
        client.pipeline.encode(item)).splitlines()]
    assert sorted(sent_lines(receiver)) == sorted(expected)
    assert len(receiver.events("span")) == 4 * 3 + 300 + 40
    assert not receiver.invalid
    stats = client.stats()
    assert stats["exporter_records"] == 6 and stats["exporter_restarts"] == 0
    assert not {k: v for k, v in stats.items() if k.startswith("dropped_") and v}
    assert client.close(30)


def test_a_record_in_parts_that_cannot_finish_is_dropped_and_counted(receiver, monkeypatch):
    """A child that stops reading: the parts sender gives up after PART_WAIT (the app's
    thread never waits), the child lets the unfinished record go at the next one's first
    part; a record over MAX_HELD is refused at once."""
    monkeypatch.setattr(exporter, "SEND_BUFFER", 64 << 10)
    monkeypatch.setattr(exporter, "PART_WAIT", 0.3)
    client = process_client(receiver)
    record(client, 1)
    assert client.flush(30)
    child = client.transport.worker
    os.kill(child.pid, signal.SIGSTOP)
    try:
        start = time.perf_counter()
        big_transaction(client, "never whole", spans=50)
        assert time.perf_counter() - start < 1.0  # handed over, not sent, on this thread
        deadline = time.monotonic() + 10
        while client.stats()["dropped_queue_full"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.stats()["dropped_queue_full"] == 1
    finally:
        os.kill(child.pid, signal.SIGCONT)
    held = exporter.MAX_HELD
    monkeypatch.setattr(exporter, "MAX_HELD", 256 << 10)
    big_transaction(client, "too large", spans=50)
    assert client.stats()["dropped_too_large"] == 1
    monkeypatch.setattr(exporter, "MAX_HELD", held)
    big_transaction(client, "whole", spans=50)
    record(client, 1)
    assert not client.flush(30)  # it lost two: the flush says so
    assert client.flush(30)
    names = sorted(t["name"] for t in receiver.events("transaction"))
    assert names == ["GET /items/0", "GET /items/0", "whole"]
    assert len(receiver.events("span")) == 3 + 3 + 50
    assert client.transport.worker.pid == child.pid  # the same child all along
    assert client.close(30)


def test_stats_follow_the_exporter_without_a_flush(receiver):
    client = process_client(receiver)
    record(client, 5)
    deadline = time.monotonic() + 20
    while client.stats()["sent_events"] < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.stats()["sent_events"] == 5  # no flush: the child sent its counters
    assert client.close(30)


def closed_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_the_exporters_warnings_go_through_the_apps_logging(caplog, capfd):
    """The operator finds the child's warnings where the worker thread's would be: in the
    app's logging (its handlers, its format), marked as the exporter's, not on stderr."""
    caplog.set_level(logging.INFO, logger="beatlib")
    client = beatlib.Client(beatlib.config.Config(
        environ={}, service_name="t", server_url=closed_port(), exporter_process=True,
        flush_interval="100ms"))
    record(client, 1)
    deadline = time.monotonic() + 20
    while "unreachable" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)
    found = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert found and found[0].name == "beatlib.transport"
    assert found[0].levelno == logging.WARNING
    assert found[0].processName == "beatlib-exporter"
    assert found[0].process == client.transport.worker.pid
    client.close(1)
    assert "unreachable" not in capfd.readouterr().err


@pytest.fixture
def beatlib_logger():
    """The app's "beatlib" logger, its level put back after the test."""
    log = logging.getLogger("beatlib")
    level = log.level
    yield log
    log.setLevel(level)


def test_the_apps_log_level_holds_in_the_exporter(receiver, caplog, beatlib_logger):
    """log_level="info": the child's info records (a server back after an outage) reach
    the app, as the worker thread's do."""
    caplog.set_level(logging.DEBUG)
    receiver.respond_with(503, times=1)
    client = process_client(receiver, log_level="info")
    record(client, 1)
    deadline = time.monotonic() + 30
    while "taking data again" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "taking data again" in caplog.text
    assert client.close(30)


def test_a_quieter_beatlib_logger_in_the_app_quiets_the_exporter(capfd, beatlib_logger):
    beatlib_logger.setLevel(logging.ERROR)
    client = beatlib.Client(beatlib.config.Config(
        environ={}, service_name="t", server_url=closed_port(), exporter_process=True,
        flush_interval="100ms"))
    record(client, 1)
    assert not client.flush(3)
    client.close(1)
    assert "unreachable" not in capfd.readouterr().err
