"""BeatMiddleware on a real WSGI server: transactions, trace continuation, errors once,
streaming timed whole, ignored URLs, bodies redacted."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest
import requests

import beatlib
from beatlib import context
from beatlib.contrib.wsgi import BeatMiddleware
from beatlib.tracing import outgoing_headers

PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def app(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/boom":
        raise KeyError("no such order")
    if path == "/missing":
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"no"]
    if path == "/handled":
        try:
            int("x")
        except ValueError:
            beatlib.get_client().capture_exception()
    if path == "/told":
        beatlib.set_transaction_outcome("success")
        raise KeyError("the app said success first")
    if path == "/baggage":  # what the app's outgoing calls would carry
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [(outgoing_headers() or {}).get("baggage", "none").encode()]
    if path == "/stream":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return stream()
    if path == "/form":
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        start_response("201 Created", [("Content-Type", "text/plain")])
        return [b"got " + body]
    start_response("200 OK", [("Content-Type", "text/plain"), ("X-Thing", "1")])
    return [b"hello"]


def stream() -> Iterator[bytes]:
    for i in range(3):
        with beatlib.capture_span(f"chunk {i}"):
            time.sleep(0.05)
        yield b"x"


class QuietHandler(WSGIRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def served(receiver):
    """Serve `app` behind BeatMiddleware on 127.0.0.1; yields (base URL, client)."""
    servers = []

    def start(**settings):
        client = beatlib.Client(server_url=receiver.url, environ={}, **settings)
        server = make_server("127.0.0.1", 0, BeatMiddleware(app, client), WSGIServer,
                             handler_class=QuietHandler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append((server, client))
        return f"http://127.0.0.1:{server.server_port}", client

    yield start
    for server, client in servers:
        server.shutdown()
        client.close(5)
    beatlib.uninstrument()
    context.set_active(None)


def test_request_transaction_continues_the_trace(served, receiver):
    url, client = served()
    resp = requests.get(url + "/hello?x=1&token=abc", headers={"traceparent": PARENT,
                                                               "Authorization": "Bearer s3"})
    assert resp.text == "hello"
    assert client.flush(5)
    (tx,) = receiver.events("transaction")
    assert tx["name"] == "GET" and tx["result"] == "HTTP 2xx" and tx["outcome"] == "success"
    assert tx["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    assert tx["parent_id"] == "b7ad6b7169203331"
    req = tx["context"]["request"]
    assert req["method"] == "GET" and req["url"]["pathname"] == "/hello"
    assert req["url"]["search"] == "?x=1&token=[REDACTED]"
    assert req["headers"]["Authorization"] == "[REDACTED]"
    assert req["socket"]["remote_address"] == "127.0.0.1"
    assert tx["context"]["response"]["status_code"] == 200
    assert tx["context"]["response"]["headers"]["X-Thing"] == "1"


def test_the_callers_baggage_goes_on_as_it_came_and_is_never_recorded(served, receiver):
    url, client = served(sanitize_field_names=["nothing"])  # not even with redaction off
    baggage = "userId=alice%40example.com,plan=gold;tier=1"
    resp = requests.get(url + "/baggage", headers={"traceparent": PARENT, "baggage": baggage})
    assert resp.text == baggage
    assert requests.get(url + "/baggage").text == "none"
    assert client.flush(5)
    first, second = receiver.events("transaction")
    assert first["context"]["request"]["headers"]["Baggage"] == "[REDACTED]"
    assert "alice" not in repr(receiver.events("transaction"))
    assert "Baggage" not in second["context"]["request"]["headers"]


def test_an_exception_is_captured_once_with_the_request(served, receiver):
    url, client = served()
    assert requests.get(url + "/boom").status_code == 500
    assert client.flush(5)
    (tx,) = receiver.events("transaction")
    (error,) = receiver.events("error")
    assert tx["result"] == "HTTP 5xx" and tx["outcome"] == "failure"
    assert error["exception"]["type"] == "KeyError" and error["exception"]["handled"] is False
    assert error["transaction_id"] == tx["id"]
    assert error["context"]["request"]["url"]["pathname"] == "/boom"


def test_streaming_response_ends_when_the_body_is_closed(served, receiver):
    url, client = served()
    assert requests.get(url + "/stream").text == "xxx"
    assert client.flush(5)
    (tx,) = receiver.events("transaction")
    assert tx["duration"] >= 150
    spans = receiver.events("span")
    assert sorted(s["name"] for s in spans) == ["chunk 0", "chunk 1", "chunk 2"]
    assert all(s["transaction_id"] == tx["id"] for s in spans)


def test_outcome_from_the_status_the_app_answered(served, receiver):
    # The server's view: a 4xx is the caller's mistake, not a failure; a handled error does
    # not change a 200; an unhandled one is a failure unless the app set the outcome itself.
    url, client = served()
    assert requests.get(url + "/missing").status_code == 404
    assert requests.get(url + "/handled").status_code == 200
    assert requests.get(url + "/told").status_code == 500
    assert client.flush(5)
    outcomes = {t["context"]["request"]["url"]["pathname"]: (t["result"], t["outcome"])
                for t in receiver.events("transaction")}
    assert outcomes == {"/missing": ("HTTP 4xx", "success"), "/handled": ("HTTP 2xx", "success"),
                        "/told": ("HTTP 5xx", "success")}
    assert len(receiver.events("error")) == 2


def test_ignored_urls_are_not_traced(served, receiver):
    url, client = served(transaction_ignore_urls="/health*,/static/*")
    requests.get(url + "/healthz")
    requests.get(url + "/static/app.css")
    requests.get(url + "/hello")
    assert client.flush(5)
    assert [t["context"]["request"]["url"]["pathname"]
            for t in receiver.events("transaction")] == ["/hello"]


def test_ignored_urls_match_as_wildcards_case_insensitively(served, receiver):
    # `*` is the only wildcard (`?` is a plain character); `(?-i)` makes a pattern
    # case-sensitive; the others ignore case, as the field name patterns do.
    url, client = served(transaction_ignore_urls="/Health*,(?-i)/Static/*,/a?c")
    for path in ("/HEALTH/live", "/healthz", "/Static/app.css", "/a?c"):
        requests.get(url + path.replace("?", "%3F"))
    for path in ("/static/app.css", "/abc", "/hello"):
        requests.get(url + path)
    assert client.flush(5)
    assert sorted(t["context"]["request"]["url"]["pathname"]
                  for t in receiver.events("transaction")) == ["/abc", "/hello",
                                                               "/static/app.css"]


def test_form_body_recorded_and_redacted_when_asked(served, receiver):
    url, client = served(capture_body="transactions")
    resp = requests.post(url + "/form", data={"user": "ann", "password": "hunter2"})
    assert resp.text == "got user=ann&password=hunter2"  # the app still reads its body
    assert client.flush(5)
    (tx,) = receiver.events("transaction")
    assert tx["context"]["request"]["body"] == {"user": "ann", "password": "[REDACTED]"}
    assert "hunter2" not in str(receiver.events())


def test_multipart_body_is_not_recorded(served, receiver):
    url, client = served(capture_body="all")
    resp = requests.post(url + "/form", files={"f": ("a.txt", b"data")},
                         data={"password": "hunter2"})
    assert resp.status_code == 201
    assert client.flush(5)
    (tx,) = receiver.events("transaction")
    assert tx["context"]["request"]["body"].endswith("bytes not recorded]")
    assert "hunter2" not in str(receiver.events())


def test_the_same_request_again_gives_the_same_context(served, receiver):
    """What the request context keeps from one request to the next (header names, parsed
    cookies) changes nothing: the same context each time, quoted where the path needs it."""
    from beatlib.contrib.wsgi import request_context

    url, client = served()
    for _ in range(3):
        requests.get(url + "/caf%C3%A9 x(1)", headers={"Cookie": "sessionid=s3; theme=dark",
                                                       "X-Custom-Thing": "1"})
    requests.get(url + "/plain", headers={"Cookie": "theme=light"})
    assert client.flush(5)
    *same, other = [tx["context"]["request"] for tx in receiver.events("transaction")]
    assert len(same) == 3 and same[0] == same[1] == same[2]
    assert same[0]["cookies"] == {"sessionid": "[REDACTED]", "theme": "dark"}
    assert same[0]["headers"]["X-Custom-Thing"] == "1"
    assert same[0]["url"]["pathname"] == "/café x(1)"
    assert same[0]["url"]["full"] == url + "/caf%C3%A9%20x(1)"
    assert other["cookies"] == {"theme": "light"} and other["url"]["full"] == url + "/plain"
    environ = {"HTTP_COOKIE": "a=1; b=2", "PATH_INFO": "/p"}
    request_context(environ, client.config, False)["cookies"]["a"] = "changed"
    assert request_context(environ, client.config, False)["cookies"] == {"a": "1", "b": "2"}
