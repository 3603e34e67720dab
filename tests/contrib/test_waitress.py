"""waitress (a thread pool) under concurrent requests: every transaction arrives once, with
exactly its own spans and labels, for a Flask app, a Bottle app and for BeatMiddleware around
a plain app."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests
from flask import Flask

import beatlib
from beatlib import context
from beatlib.contrib.flask import Beat
from beatlib.contrib.wsgi import BeatMiddleware

waitress_server = pytest.importorskip("waitress.server")

CALLERS, REQUESTS_EACH, SERVER_THREADS, SPANS = 20, 25, 8, 3


def work(request_id: str) -> bytes:
    """What each request does: a few spans named after it, a label; sleeps let requests
    interleave on the server's threads."""
    beatlib.label(request_id=request_id)
    for step in range(SPANS):
        with beatlib.capture_span(f"{request_id} step {step}", span_type="app") as span:
            if span is not None:
                span.set_label("request_id", request_id)
            time.sleep(0.001)
    return request_id.encode()


def flask_app(client: beatlib.Client) -> Any:
    app = Flask("concurrency")

    @app.get("/work/<request_id>")
    def handle(request_id: str) -> bytes:
        return work(request_id)

    Beat(app, client=client)
    return app


def bottle_app(client: beatlib.Client) -> Any:
    import bottle

    from beatlib.contrib.bottle import BeatPlugin

    app = bottle.Bottle()

    @app.get("/work/<request_id>")
    def handle(request_id: str) -> bytes:
        return work(request_id)

    app.install(BeatPlugin(client))
    return app


def plain_app(client: beatlib.Client) -> Any:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        body = work(environ["PATH_INFO"].rsplit("/", 1)[1])
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [body]

    return BeatMiddleware(app, client, namer=lambda environ: "GET /work/<request_id>")


@pytest.fixture
def serve(receiver) -> Iterator[Callable[[Callable[[beatlib.Client], Any]], str]]:
    started: list[tuple[Any, beatlib.Client]] = []

    def start(make_app: Callable[[beatlib.Client], Any]) -> str:
        client = beatlib.Client(server_url=receiver.url, flush_interval="100ms", environ={})
        server = waitress_server.create_server(make_app(client), host="127.0.0.1", port=0,
                                               threads=SERVER_THREADS)
        threading.Thread(target=server.run, daemon=True).start()
        started.append((server, client))
        return f"http://127.0.0.1:{server.effective_port}"

    yield start
    for server, client in started:
        server.close()
        client.close(5)
    beatlib.uninstrument()
    context.set_active(None)


@pytest.mark.parametrize("make_app", [flask_app, bottle_app, plain_app],
                         ids=["flask", "bottle", "middleware"])
def test_concurrent_requests_do_not_mix(serve, receiver, make_app):
    url = serve(make_app)

    def caller(n: int) -> list[str]:
        with requests.Session() as session:
            ids = [f"c{n}r{i}" for i in range(REQUESTS_EACH)]
            for request_id in ids:
                response = session.get(f"{url}/work/{request_id}", timeout=10)
                assert response.status_code == 200 and response.text == request_id
            return ids

    with ThreadPoolExecutor(CALLERS) as pool:
        sent = [rid for ids in pool.map(caller, range(CALLERS)) for rid in ids]
    total = CALLERS * REQUESTS_EACH
    assert receiver.wait_for("transaction", total, timeout=30)
    assert receiver.wait_for("span", total * SPANS, timeout=30)
    time.sleep(0.3)  # anything extra (a double) would arrive now

    transactions = receiver.events("transaction")
    by_request = {tx["context"]["tags"]["request_id"]: tx for tx in transactions}
    assert len(transactions) == total and sorted(by_request) == sorted(sent)
    spans = receiver.events("span")
    assert len(spans) == total * SPANS
    assert len({tx["trace_id"] for tx in transactions}) == total
    spans_of = Counter(span["transaction_id"] for span in spans)
    for span in spans:
        owner = by_request[span["context"]["tags"]["request_id"]]
        assert span["transaction_id"] == span["parent_id"] == owner["id"]
        assert span["trace_id"] == owner["trace_id"]
        assert span["name"].startswith(owner["context"]["tags"]["request_id"] + " step ")
    for request_id, tx in by_request.items():
        assert spans_of[tx["id"]] == SPANS
        assert tx["name"] == "GET /work/<request_id>" and tx["result"] == "HTTP 2xx"
        assert tx["context"]["request"]["url"]["pathname"] == f"/work/{request_id}"
        assert tx["span_count"] == {"started": SPANS, "dropped": 0}
