"""Pyramid through `config.include("beatlib.contrib.pyramid")`, driven by WebTest and a real
server: route-named transactions with their spans, errors once (also those an exception view
answered), 404s that are no errors, the user, trace continuation and `beatlib.*` settings."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest
import requests

pytest.importorskip("pyramid")
webtest = pytest.importorskip("webtest")

import beatlib  # noqa: E402
from beatlib import context  # noqa: E402
from beatlib.contrib.pyramid import REGISTRY_KEY  # noqa: E402
from tests.contrib.pyramid_app import make_app  # noqa: E402
from tests.instrumentation.http_server import HTTPServer  # noqa: E402

PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture
def weather() -> Iterator[HTTPServer]:
    with HTTPServer() as server:
        yield server


@pytest.fixture
def shop(receiver, weather, monkeypatch):
    """make(**beatlib_settings) -> (the WSGI app, its client); cleaned up after the test."""
    for name in list(os.environ):
        if name.startswith("BEATLIB_"):
            monkeypatch.delenv(name)
    apps = []

    def make(**settings):
        app = make_app({"shop.weather_url": weather.url("/ok"),
                        "beatlib.server_url": receiver.url, "beatlib.service_name": "shop",
                        **{f"beatlib.{key}": value for key, value in settings.items()}})
        apps.append(app)
        return app, app.registry[REGISTRY_KEY]

    yield make
    for app in apps:
        app.registry[REGISTRY_KEY].close(5)
    beatlib.uninstrument()
    context.set_active(None)


def shipped(client, receiver):
    assert client.flush(5)
    spans = sorted(receiver.events("span"), key=lambda s: s["timestamp"])
    return receiver.events("transaction"), spans, receiver.events("error")


def test_route_named_transaction_with_its_spans_in_order(shop, receiver, weather):
    app, client = shop()
    page = webtest.TestApp(app).get("/posts/1", headers={"X-User": "ann"})
    assert "<h1>Hello</h1>" in page.text and "<footer>200</footer>" in page.text
    (tx,), spans, errors = shipped(client, receiver)
    assert errors == []
    assert (tx["name"], tx["type"], tx["result"], tx["outcome"]) == (
        "GET /posts/{id}", "request", "HTTP 2xx", "success")
    request = tx["context"]["request"]
    assert request["method"] == "GET" and request["url"]["pathname"] == "/posts/1"
    assert tx["context"]["response"]["status_code"] == 200
    assert tx["context"]["response"]["headers"]["Content-Type"].startswith("text/html")
    assert tx["context"]["user"] == {"id": "ann"}
    assert [(s["type"], s["subtype"]) for s in spans] == [
        ("db", "sqlite"), ("external", "http"), ("template", "jinja2")]
    assert spans[0]["context"]["db"]["statement"].startswith("SELECT posts.id")
    assert spans[1]["name"] == f"GET 127.0.0.1:{weather.port}"
    assert spans[2]["name"] == "post.html"
    assert all(s["transaction_id"] == s["parent_id"] == tx["id"] for s in spans)
    assert receiver.metadata[0]["service"]["framework"]["name"] == "pyramid"


def test_incoming_traceparent_continues_the_trace(shop, receiver):
    app, client = shop()
    webtest.TestApp(app).get("/posts/2", headers={"traceparent": PARENT})
    (tx,), spans, _ = shipped(client, receiver)
    assert tx["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    assert tx["parent_id"] == "b7ad6b7169203331"
    assert {s["trace_id"] for s in spans} == {tx["trace_id"]}


def test_a_view_that_raises_is_one_error_with_the_request(shop, receiver):
    app, client = shop()
    with pytest.raises(KeyError):  # no exception view: it goes to the server, as before
        webtest.TestApp(app).get("/boom?id=7", headers={"X-User": "bob"})
    (tx,), _, (error,) = shipped(client, receiver)
    assert (tx["name"], tx["result"], tx["outcome"]) == ("GET /boom", "HTTP 5xx", "failure")
    assert error["exception"]["type"] == "KeyError" and error["exception"]["handled"] is False
    assert error["transaction_id"] == tx["id"] and error["trace_id"] == tx["trace_id"]
    assert error["transaction"]["name"] == "GET /boom"
    assert error["context"]["request"]["url"]["full"].endswith("/boom?id=7")
    assert error["context"]["user"] == {"id": "bob"}


def test_an_exception_answered_by_an_exception_view_is_still_an_error(shop, receiver):
    app, client = shop()
    response = webtest.TestApp(app).get("/pay/7", status=402)
    assert response.json == {"error": "card declined for order 7"}  # the app's answer, unchanged
    (tx,), _, (error,) = shipped(client, receiver)
    assert (tx["name"], tx["result"], tx["outcome"]) == ("GET /pay/{order}", "HTTP 4xx", "success")
    assert tx["context"]["response"]["status_code"] == 402
    assert error["exception"]["type"] == "PaymentDeclined"
    assert error["exception"]["message"] == "card declined for order 7"
    assert error["transaction_id"] == tx["id"]
    assert error["context"]["request"]["url"]["pathname"] == "/pay/7"
    assert any(f["function"] == "pay" for f in error["exception"]["stacktrace"])


def test_not_found_is_no_error(shop, receiver):
    app, client = shop()
    test_app = webtest.TestApp(app)
    assert test_app.get("/no/such/page", status=404).text == "nothing here"
    assert test_app.get("/posts/99", status=404).text == "nothing here"  # HTTPNotFound raised
    txs, _, errors = shipped(client, receiver)
    assert errors == []
    assert [(t["name"], t["result"]) for t in txs] == [
        ("GET unknown route", "HTTP 4xx"), ("GET /posts/{id}", "HTTP 4xx")]


def test_subrequest_is_part_of_its_parents_transaction(shop, receiver):
    app, client = shop()
    assert webtest.TestApp(app).get("/sub").text == "inner said 200"
    (tx,), spans, _ = shipped(client, receiver)
    assert tx["name"] == "GET /sub"
    assert len(spans) == 3 and all(s["transaction_id"] == tx["id"] for s in spans)


def test_ignored_urls_are_not_traced(shop, receiver):
    app, client = shop(transaction_ignore_urls="/health*")
    test_app = webtest.TestApp(app)
    assert test_app.get("/health").text == "ok"
    test_app.get("/posts/1")
    txs, _, _ = shipped(client, receiver)
    assert [t["name"] for t in txs] == ["GET /posts/{id}"]


class QuietHandler(WSGIRequestHandler):
    def log_message(self, *args):
        pass


def test_streamed_response_on_a_real_server_ends_when_the_body_is_closed(shop, receiver):
    app, client = shop()
    server = make_server("127.0.0.1", 0, app, WSGIServer, handler_class=QuietHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        assert requests.get(url + "/stream", timeout=5).text == "chunk 0\nchunk 1\nchunk 2\n"
        page = requests.get(url + "/posts/1", timeout=5)
        assert page.headers["Content-Length"] == str(len(page.content))  # kept as the app set it
    finally:
        server.shutdown()
        server.server_close()
    txs, spans, _ = shipped(client, receiver)
    stream, post = txs
    assert stream["name"] == "GET /stream" and stream["duration"] >= 150
    assert [s["name"] for s in spans if s["transaction_id"] == stream["id"]] == [
        "chunk 0", "chunk 1", "chunk 2"]
    assert post["context"]["request"]["socket"]["remote_address"] == "127.0.0.1"


INI = """\
[app:main]
use = call:tests.contrib.pyramid_app:main
shop.weather_url = {weather}
beatlib.service_name = shop-from-ini
beatlib.environment = staging
beatlib.server_url = {receiver}
beatlib.capture_body = all
"""


@pytest.mark.parametrize("env_name", [None, "shop-from-env"])
def test_settings_from_the_ini_file_and_env_wins(receiver, weather, tmp_path, monkeypatch,
                                                 env_name):
    from pyramid.paster import get_app

    if env_name:
        monkeypatch.setenv("BEATLIB_SERVICE_NAME", env_name)
    ini = tmp_path / "shop.ini"
    ini.write_text(INI.format(weather=weather.url("/ok"), receiver=receiver.url))
    app = get_app(str(ini))
    client = app.registry[REGISTRY_KEY]
    try:
        assert client.config.capture_body == "all"
        with pytest.raises(KeyError):
            webtest.TestApp(app).post("/boom", {"card": "4111", "note": "hi"})
        assert client.flush(5)
    finally:
        client.close(5)
        beatlib.uninstrument()
        context.set_active(None)
    service = receiver.metadata[0]["service"]
    assert service["name"] == (env_name or "shop-from-ini")
    assert service["environment"] == "staging"
    (error,) = receiver.events("error")
    assert error["context"]["request"]["body"] == {"card": "[REDACTED]", "note": "hi"}


def test_without_beatlib_settings_the_process_default_client_is_used(receiver, weather):
    client = beatlib.Client(server_url=receiver.url, service_name="default", environ={})
    try:
        app = make_app({"shop.weather_url": weather.url("/ok")})
        assert app.registry[REGISTRY_KEY] is client
        webtest.TestApp(app).get("/posts/1")
        assert client.flush(5)
    finally:
        client.close(5)
        beatlib.uninstrument()
        context.set_active(None)
    (tx,) = receiver.events("transaction")
    assert tx["name"] == "GET /posts/{id}"
    assert receiver.metadata[0]["service"]["name"] == "default"


def test_a_name_the_view_set_is_kept(shop, receiver):
    app, client = shop()
    webtest.TestApp(app).get("/named")
    (tx,), _, _ = shipped(client, receiver)
    assert tx["name"] == "report by region"


def test_sensitive_route_variables_are_redacted_everywhere(shop, receiver):
    import logging

    from beatlib.contrib.logging import LoggingHandler

    app, client = shop()
    handler = LoggingHandler(client)
    logging.getLogger("shop.reset").addHandler(handler)
    try:
        webtest.TestApp(app).get("/reset/tok3n-9f8e7d?page=2")
    finally:
        logging.getLogger("shop.reset").removeHandler(handler)
    (tx,), _, (error,) = shipped(client, receiver)
    assert tx["name"] == "GET /reset/{token}"
    assert tx["context"]["request"]["url"]["pathname"] == "/reset/[REDACTED]"
    assert error["log"]["message"] == "reset for /reset/[REDACTED] failed"
    assert "tok3n-9f8e7d" not in str(receiver.received())


def test_raised_http_exceptions_keep_their_generated_body(shop, receiver):
    """WebOb writes an HTTP exception's body when the response is served; wrapping its body
    first made it think there was one, and the answer came back empty."""
    from pyramid.config import Configurator

    from tests.contrib.pyramid_app import forbidden, moved

    with Configurator() as config:  # the same views, no beatlib
        for name, view in (("moved", moved), ("forbidden", forbidden)):
            config.add_route(name, "/" + name)
            config.add_view(view, route_name=name)
    plain = webtest.TestApp(config.make_wsgi_app())
    traced = webtest.TestApp(shop()[0])
    for path, status in (("/moved", 303), ("/forbidden", 403)):
        expected = plain.get(path, status=status)
        got = traced.get(path, status=status)
        assert got.body == expected.body and b"not for you" in plain.get(
            "/forbidden", status=403).body
        assert got.headers.get("Location") == expected.headers.get("Location")


def test_http_exceptions_are_errors_from_500_on(shop, receiver):
    app, client = shop()
    test_app = webtest.TestApp(app)
    test_app.get("/moved", status=303)
    test_app.get("/forbidden", status=403)
    test_app.get("/unavailable", status=503)
    _, _, errors = shipped(client, receiver)
    assert [e["exception"]["type"] for e in errors] == ["HTTPServiceUnavailable"]
