"""The service the W3C harness drives (w3c_service.py), run here without the harness: a caller's
trace context goes in through a real server and comes out on the calls it makes."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from werkzeug.serving import make_server

import beatlib
from beatlib import context
from beatlib.contrib.flask import EXTENSION
from beatlib.transport.memory import MemorySender
from tests.conformance.w3c_service import create_app


class Callee(ThreadingHTTPServer):
    """Takes POSTs on 127.0.0.1 and keeps each one's header pairs (repeats included)."""

    def __init__(self) -> None:
        self.received: dict[str, list[tuple[str, str]]] = {}
        callee = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                callee.received[self.path] = list(self.headers.items())
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.daemon_threads = True

    def headers(self, path: str, name: str) -> list[str]:
        return [v for k, v in self.received[path] if k.lower() == name]


def serve(server) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def callee() -> Iterator[Callee]:
    server = Callee()
    serve(server)
    yield server
    server.shutdown()
    server.server_close()


class Service:
    """w3c_service's app on a real server on 127.0.0.1, its events kept in memory."""

    def __init__(self, http_client: str) -> None:
        self.sender = MemorySender()
        app = create_app(self.sender, http_client)
        self.client: beatlib.Client = app.extensions[EXTENSION]
        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.address = f"127.0.0.1:{self.server.server_port}"
        serve(self.server)

    def transactions(self, count: int) -> list[dict]:
        """The service's `/test` transactions, once `count` of them have been shipped (each
        ends when the server closes the response, just after the caller has read it). Polled:
        a flush made while the request thread is starting the worker may return early."""
        deadline = time.monotonic() + 10
        while True:
            self.client.flush(5)
            found = [t for t in self.sender.events("transaction") if t["name"] == "POST /test"]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.client.close(5)
        beatlib.uninstrument()
        context.set_active(None)


@pytest.fixture(params=["requests", "urllib3", "httpx"])
def service(request) -> Iterator[Service]:
    running = Service(request.param)
    yield running
    running.stop()


def post(address: str, body: object, headers: list[tuple[str, str]]) -> list[int]:
    connection = http.client.HTTPConnection(address, timeout=10)
    connection.putrequest("POST", "/test")
    for name, value in [("Content-Type", "application/json"), *headers]:
        connection.putheader(name, value)  # repeated names go out as separate header fields
    data = json.dumps(body).encode()
    connection.putheader("Content-Length", str(len(data)))
    connection.endheaders(data)
    reply = connection.getresponse()
    assert reply.status == 200
    return json.loads(reply.read())


def test_the_callers_context_is_continued_on_every_call(service, callee):
    caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-03"
    calls = [{"url": f"http://127.0.0.1:{callee.server_port}/{n}", "arguments": []}
             for n in range(2)]
    headers = [("TraceParent", caller), ("tracestate", "congo=t61rcWkgMzE,acme@=x"),
               ("tracestate", ""), ("tracestate", "rojo=00f067aa0ba902b7, congo=older")]
    assert post(service.address, calls, headers) == [200, 200]
    parents = set()
    for n in range(2):
        (sent,) = callee.headers(f"/{n}", "traceparent")
        version, trace_id, parent_id, flags = sent.split("-")
        assert (version, trace_id, flags) == ("00", "4bf92f3577b34da6a3ce929d0e0e4736", "03")
        parents.add(parent_id)
        assert callee.headers(f"/{n}", "tracestate") == [
            "congo=t61rcWkgMzE,acme@=x,rojo=00f067aa0ba902b7"]
    assert len(parents) == 2 and "00f067aa0ba902b7" not in parents
    (tx,) = service.transactions(1)
    assert tx["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert tx["parent_id"] == "00f067aa0ba902b7"
    spans = service.sender.events("span")
    assert {s["id"] for s in spans} == parents


def test_a_broken_traceparent_starts_a_new_trace_without_the_callers_tracestate(service,
                                                                               callee):
    url = f"http://127.0.0.1:{callee.server_port}/0"
    headers = [("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x"),
               ("tracestate", "congo=t61rcWkgMzE")]
    assert post(service.address, [{"url": url, "arguments": []}], headers) == [200]
    (sent,) = callee.headers("/0", "traceparent")
    assert sent.split("-")[1] != "4bf92f3577b34da6a3ce929d0e0e4736"
    # The caller's state went with its broken context; the new trace has only ours: the
    # rate it was sampled with, in the `es` member Elastic's agents read.
    assert callee.headers("/0", "tracestate") == ["es=s:1"]
