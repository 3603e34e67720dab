"""Bottle through `app.install(BeatPlugin())`: the realistic app (tests/contrib/bottle_app.py)
over a real server and in-process (WebTest): route-named transactions with their spans, errors
once by the one rule (also those `catchall` answered, and with catchall off), 404s that are no
errors, responses unchanged, the plugin API (skip, uninstall, mount) intact."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest
import requests

bottle = pytest.importorskip("bottle")
webtest = pytest.importorskip("webtest")

import beatlib  # noqa: E402
from beatlib import context  # noqa: E402
from beatlib.config import ConfigError  # noqa: E402
from beatlib.contrib.bottle import BeatPlugin  # noqa: E402
from tests.contrib.bottle_app import make_app  # noqa: E402
from tests.instrumentation.http_server import HTTPServer  # noqa: E402

PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
# Bottle 0.13 hands the exception its catchall answered to start_response; 0.12 does not, so
# there beatlib sees only what route callbacks raise (where its plugin applies).
CATCHALL_EXC_INFO = tuple(int(n) for n in bottle.__version__.split(".")[:2]) >= (0, 13)
OUTSIDE = "outside routes"  # an error only Bottle's catchall sees


@pytest.fixture
def weather() -> Iterator[HTTPServer]:
    with HTTPServer() as server:
        yield server


class QuietHandler(WSGIRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


class Shop:
    """Makes traced (or plain) shop apps; closes their clients and servers after."""

    def __init__(self, receiver: Any, weather: HTTPServer) -> None:
        self.receiver, self.weather = receiver, weather
        self.clients: list[beatlib.Client] = []
        self.servers: list[Any] = []

    def make(self, traced: bool = True, **settings: Any) -> Any:
        """The app, its `beatlib.*` config keys from `settings` (the plugin makes the client)."""
        if not traced:
            return make_app(self.weather.url("/ok"))
        plugin = BeatPlugin()
        config = {"beatlib.server_url": self.receiver.url, "beatlib.service_name": "shop",
                  "beatlib.flush_interval": "50ms",
                  **{f"beatlib.{key}": value for key, value in settings.items()}}
        app = make_app(self.weather.url("/ok"), plugin, **config)
        assert plugin.client is not None
        self.clients.append(plugin.client)
        return app

    def serve(self, app: Any) -> str:
        server = make_server("127.0.0.1", 0, app, WSGIServer, handler_class=QuietHandler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.servers.append(server)
        return f"http://127.0.0.1:{server.server_port}"

    def shipped(self, transactions: int = 0) -> tuple[list[Any], list[Any], list[Any]]:
        """(transactions, spans by start, errors) once every client flushed."""
        assert self.receiver.wait_for("transaction", transactions)
        for client in self.clients:
            assert client.flush(5)
        spans = sorted(self.receiver.events("span"), key=lambda s: s["timestamp"])
        return self.receiver.events("transaction"), spans, self.receiver.events("error")

    def close(self) -> None:
        for server in self.servers:
            server.shutdown()
            server.server_close()
        for client in self.clients:
            client.close(5)


@pytest.fixture
def shop(receiver, weather, monkeypatch) -> Iterator[Shop]:
    for name in list(os.environ):
        if name.startswith("BEATLIB_"):
            monkeypatch.delenv(name)
    made = Shop(receiver, weather)
    try:
        yield made
    finally:
        made.close()
        beatlib.uninstrument()
        context.set_active(None)


def call(app: Any, path: str, method: str = "GET", **kwargs: Any) -> Any:
    """An in-process request through WebTest (which checks WSGI compliance and closes the
    body); errors Bottle logged are expected here. `params`: a form body."""
    params = kwargs.pop("params", None)
    if params is not None:
        kwargs.update(body=urlencode(params).encode(),
                      content_type="application/x-www-form-urlencoded")
    return webtest.TestApp(app).request(path, method=method, expect_errors=True, **kwargs)


def test_realistic_app_over_a_real_server(shop, receiver, weather):
    url = shop.serve(shop.make())
    page = requests.get(url + "/posts/1", timeout=5)
    assert page.text == "<html><body><h1>Hello</h1><footer>200</footer></body></html>"
    boom = requests.get(url + "/boom", timeout=5)
    assert boom.status_code == 500 and boom.text == "<h1>Sorry (500)</h1>"  # the app's page
    assert requests.get(url + "/v1/items/7", timeout=5).json() == {"item": "7"}
    assert requests.get(url + "/nope", timeout=5).text == "nothing here"
    txs, spans, errors = shop.shipped(transactions=4)

    ok, failed, item, missing = txs
    assert (ok["name"], ok["type"], ok["result"], ok["outcome"]) == (
        "GET /posts/<post_id:int>", "request", "HTTP 2xx", "success")
    assert [(s["type"], s["subtype"]) for s in spans if s["transaction_id"] == ok["id"]] == [
        ("db", "sqlite"), ("external", "http"), ("template", "jinja2")]
    assert [s["name"] for s in spans if s["transaction_id"] == ok["id"]] == [
        "SELECT FROM posts", f"GET 127.0.0.1:{weather.port}", "post.html"]
    assert all(s["parent_id"] == ok["id"] for s in spans)
    request = ok["context"]["request"]
    assert request["url"]["full"] == url + "/posts/1" and request["method"] == "GET"
    assert request["socket"]["remote_address"] == "127.0.0.1"
    assert request["headers"]["User-Agent"].startswith("python-requests")
    response = ok["context"]["response"]
    assert response["status_code"] == 200
    assert response["headers"]["Content-Type"] == "text/html; charset=UTF-8"
    assert "X-Time" in response["headers"]  # the app's own plugin still ran
    assert receiver.metadata[0]["service"]["framework"] == {
        "name": "bottle", "version": bottle.__version__}

    assert (failed["name"], failed["result"], failed["outcome"]) == (
        "GET /boom", "HTTP 5xx", "failure")
    (error,) = errors
    assert error["exception"]["type"] == "ZeroDivisionError"
    assert error["exception"]["handled"] is False
    assert error["transaction_id"] == failed["id"] and error["trace_id"] == failed["trace_id"]
    assert error["transaction"]["name"] == "GET /boom"
    assert error["context"]["request"]["url"]["pathname"] == "/boom"
    assert any(f["function"] == "boom" for f in error["exception"]["stacktrace"])

    # The mounted app's route, with the prefix it is mounted at.
    assert (item["name"], item["result"]) == ("GET /v1/items/<item_id>", "HTTP 2xx")
    assert (missing["name"], missing["result"]) == ("GET unknown route", "HTTP 4xx")


def test_streamed_response_on_a_real_server_is_timed_whole(shop, receiver):
    url = shop.serve(shop.make())
    assert requests.get(url + "/stream", timeout=5).text == "chunk 0\nchunk 1\nchunk 2\n"
    (tx,), spans, errors = shop.shipped(transactions=1)
    assert tx["name"] == "GET /stream" and tx["duration"] >= 150 and errors == []
    assert [s["name"] for s in spans] == ["chunk 0", "chunk 1", "chunk 2"]
    assert all(s["parent_id"] == tx["id"] for s in spans)


def test_names_from_route_rules(shop, receiver):
    app = shop.make()
    assert call(app, "/posts/2").status_int == 200
    assert call(app, "/posts/9").status_int == 404  # abort(404) in a matched route
    assert call(app, "/no/such/page").status_int == 404
    assert call(app, "/posts/1", method="DELETE").status_int == 405
    assert call(app, "/api/posts/5").json == {"id": 5, "title": "Hello"}
    assert call(app, "/posts/1", method="HEAD").body == b""
    txs, _, errors = shop.shipped()
    assert [(t["name"], t["result"], t["outcome"]) for t in txs] == [
        ("GET /posts/<post_id:int>", "HTTP 2xx", "success"),
        ("GET /posts/<post_id:int>", "HTTP 4xx", "success"),
        ("GET unknown route", "HTTP 4xx", "success"),
        ("DELETE unknown route", "HTTP 4xx", "success"),
        ("GET /api/posts/<post_id:int>", "HTTP 2xx", "success"),
        ("HEAD /posts/<post_id:int>", "HTTP 2xx", "success"),
    ]
    assert errors == []  # 404s and 405s are answers, not errors


# (path, status, the error captured or None); in the order the test sends them.
ERROR_CASES = [
    ("/boom", 500, "ZeroDivisionError"),
    ("/abort/404", 404, None),
    ("/abort/403", 403, None),
    ("/abort/503", 503, "HTTPError"),  # raised by the app: 5xx is an error
    ("/returned", 503, None),  # returned, not raised: the app's answer
    ("/moved", 303, None),
    ("/hook-fails", 500, ("RuntimeError", OUTSIDE)),  # a before_request hook, before routing
    ("/bad-json", 500, ("TypeError", OUTSIDE)),  # in Bottle's JSONPlugin, outside beatlib's
    ("/v1/items/3/boom", 500, ("LookupError", OUTSIDE)),  # a mounted app's (without beatlib)
    ("/stream?fail=first", 500, "ConnectionError"),  # Bottle answers the first chunk's error
]


def captured(kind: str | tuple[str, str] | None) -> str | None:
    if isinstance(kind, tuple):
        return kind[0] if CATCHALL_EXC_INFO else None
    return kind


def test_the_one_error_rule_with_catchall(shop, receiver):
    app = shop.make()
    for path, status, _ in ERROR_CASES:
        assert call(app, path).status_int == status, path
    txs, _, errors = shop.shipped()
    assert [e["exception"]["type"] for e in errors] == [
        captured(kind) for _, _, kind in ERROR_CASES if captured(kind) is not None]
    assert [(t["result"], t["outcome"]) for t in txs] == [
        (f"HTTP {status // 100}xx", "failure" if status >= 500 else "success")
        for _, status, _ in ERROR_CASES]
    by_id = {t["id"]: t for t in txs}
    assert [by_id[e["transaction_id"]]["name"] for e in errors] == [
        "GET /boom", "GET /abort/<status:int>",
        *(["GET unknown route", "GET /bad-json", "GET /v1/items/<item_id>/boom"]
          if CATCHALL_EXC_INFO else []), "GET /stream"]
    assert all(e["exception"]["handled"] is False for e in errors)
    assert errors[1]["exception"]["message"] == "(503, 'aborted with 503')"


def test_responses_are_unchanged(shop, receiver):
    plain, traced = shop.make(traced=False), shop.make()
    sent = [(path, "GET", {}) for path, _, _ in ERROR_CASES] + [
        ("/posts/1", "GET", {}), ("/posts/1", "HEAD", {}), ("/posts/1", "DELETE", {}),
        ("/nope", "GET", {}), ("/api/posts/1", "GET", {}), ("/stream", "GET", {}),
        ("/v1/items/x", "GET", {}), ("/health", "GET", {}), ("/named", "GET", {}),
        ("/posts", "POST", {"params": {"title": "New"}}),
        ("/posts", "POST", {"params": {"title": ""}}),
        ("/posts", "POST", {"body": b'{"title": "J"}', "content_type": "application/json"}),
    ]
    for path, method, kwargs in sent:
        before, after = call(plain, path, method, **kwargs), call(traced, path, method, **kwargs)
        headers = [h for h in before.headerlist if h[0] != "X-Time"]
        assert (after.status, [h for h in after.headerlist if h[0] != "X-Time"],
                after.body) == (before.status, headers, before.body), (method, path)
        assert ("X-Time" in before.headers) == ("X-Time" in after.headers), path


def test_catchall_off_exceptions_still_propagate_and_are_captured_once(shop, receiver):
    for traced in (False, True):
        app = shop.make(traced=traced)
        app.config["catchall"] = False
        with pytest.raises(ZeroDivisionError):
            call(app, "/boom")
        with pytest.raises(RuntimeError):
            call(app, "/hook-fails")
        assert call(app, "/abort/503").status_int == 503  # HTTPError is a response still
    txs, _, errors = shop.shipped()
    assert [(t["name"], t["result"], t["outcome"]) for t in txs] == [
        ("GET /boom", "HTTP 5xx", "failure"), ("GET unknown route", "HTTP 5xx", "failure"),
        ("GET /abort/<status:int>", "HTTP 5xx", "failure")]
    assert [e["exception"]["type"] for e in errors] == [
        "ZeroDivisionError", "RuntimeError", "HTTPError"]
    assert [e["transaction_id"] for e in errors] == [t["id"] for t in txs]


def test_an_exception_mid_stream_is_the_requests_error(shop, receiver):
    with pytest.raises(ConnectionError):  # after the first chunk: Bottle lets it through
        call(shop.make(), "/stream?fail=later")
    (tx,), spans, (error,) = shop.shipped()
    assert (tx["result"], tx["outcome"]) == ("HTTP 2xx", "failure")  # headers were sent
    assert error["exception"]["type"] == "ConnectionError"
    assert error["transaction_id"] == tx["id"]
    assert error["context"]["request"]["url"]["search"] == "?fail=later"
    assert [s["name"] for s in spans] == ["chunk 0"]


def test_skip_and_the_apps_other_plugins(shop, receiver):
    app = shop.make()
    assert [type(p).__name__ for p in app.plugins] == [
        "JSONPlugin", "TemplatePlugin", "Timing", "BeatPlugin"]

    @app.get("/skip-beatlib", skip=["beatlib"])
    def skip_by_name() -> str:
        return "not wrapped"

    @app.get("/skip-class", skip=[BeatPlugin])
    def skip_by_class() -> str:
        raise bottle.HTTPError(503, "raised in a route that skips beatlib")

    health = call(app, "/health")  # skip=True: no plugin at all, Timing included
    assert health.text == "ok" and "X-Time" not in health.headers
    skipped = call(app, "/skip-beatlib")
    assert skipped.text == "not wrapped" and "X-Time" in skipped.headers
    assert call(app, "/skip-class").status_int == 503
    assert call(app, "/posts/1").status_int == 200
    txs, _, errors = shop.shipped()
    # The request is still traced (beatlib's WSGI side) and named by the matched route.
    assert [(t["name"], t["outcome"]) for t in txs] == [
        ("GET /health", "success"), ("GET /skip-beatlib", "success"),
        ("GET /skip-class", "failure"), ("GET /posts/<post_id:int>", "success")]
    assert errors == []  # a skipped route's raise is not seen


def test_uninstall_serves_the_app_as_before(shop, receiver):
    app = shop.make()
    wsgi_before = type(app).wsgi
    assert "wsgi" in app.__dict__
    call(app, "/posts/1")
    removed = app.uninstall("beatlib")
    assert [type(p).__name__ for p in removed] == ["BeatPlugin"]
    assert "wsgi" not in app.__dict__ and type(app).wsgi is wsgi_before
    assert call(app, "/posts/1").status_int == 200
    assert call(app, "/boom").status_int == 500
    txs, _, errors = shop.shipped()
    assert [t["name"] for t in txs] == ["GET /posts/<post_id:int>"] and errors == []


def test_one_plugin_in_two_apps_each_with_its_own_settings(shop, receiver, weather):
    from tests.receiver import Receiver

    plugin = BeatPlugin()
    with Receiver() as other:
        first = make_app(weather.url("/ok"), plugin, **{"beatlib.server_url": receiver.url,
                                                        "beatlib.service_name": "first"})
        first_client = plugin.client
        second = make_app(weather.url("/ok"), plugin, **{"beatlib.server_url": other.url,
                                                         "beatlib.service_name": "second"})
        shop.clients += [first_client, plugin.client]
        assert first_client is not plugin.client
        call(first, "/posts/1")
        call(second, "/posts/2")
        call(second, "/boom")
        shop.shipped()
        assert other.invalid == []
        assert [m["service"]["name"] for m in receiver.metadata] == ["first"]
        assert {m["service"]["name"] for m in other.metadata} == {"second"}
        assert [t["context"]["request"]["url"]["pathname"]
                for t in other.events("transaction")] == ["/posts/2", "/boom"]
        assert len(other.events("error")) == 1 and receiver.events("error") == []
        # Uninstalled from one app, the plugin keeps tracing the other.
        first.uninstall(plugin)
        call(first, "/posts/1")
        call(second, "/posts/1")
        shop.shipped()
        assert len(receiver.events("transaction")) == 1
        assert len(other.events("transaction")) == 3


def test_installed_twice_one_transaction(shop, receiver):
    app = shop.make()
    (client,) = shop.clients
    app.install(BeatPlugin(client))
    call(app, "/posts/1")
    call(app, "/boom")
    txs, _, errors = shop.shipped()
    assert [t["name"] for t in txs] == ["GET /posts/<post_id:int>", "GET /boom"]
    assert len(errors) == 1


def test_mounted_app_with_beatlib_of_its_own(shop, receiver):
    """The mounted app's own plugin wraps its routes: named before they run, its raised 5xx
    errors captured; the request stays the mounting app's one transaction."""
    app = shop.make()
    (client,) = shop.clients
    admin = bottle.Bottle()

    @admin.get("/users/<user_id:int>")
    def user(user_id: int) -> str:
        beatlib.label(seen_as=beatlib.get_current_transaction().name)
        return f"user {user_id}"

    @admin.get("/maintenance")
    def maintenance() -> None:
        bottle.abort(503, "back soon")

    admin.install(BeatPlugin(client))
    app.mount("/admin/", admin)
    assert call(app, "/admin/users/4").text == "user 4"
    assert call(app, "/admin/maintenance").status_int == 503
    txs, _, errors = shop.shipped()
    assert [(t["name"], t["result"]) for t in txs] == [
        ("GET /admin/users/<user_id:int>", "HTTP 2xx"), ("GET /admin/maintenance", "HTTP 5xx")]
    assert txs[0]["context"]["tags"] == {"seen_as": "GET /admin/users/<user_id:int>"}
    assert [e["exception"]["type"] for e in errors] == ["HTTPError"]


@pytest.mark.parametrize("traced_too", [False, True], ids=["plain", "traced"])
def test_app_mounted_as_a_wsgi_app_is_named_by_its_route(shop, receiver, traced_too):
    """`mount()` falls back to mounting a Bottle app as a plain WSGI app (a prefix without a
    trailing slash; always on Bottle 0.12): its routes are relative to the prefix. With a
    plugin of its own, its requests are still the mounting app's transactions, once."""
    app = shop.make()
    legacy = bottle.Bottle()
    if traced_too:
        legacy.install(BeatPlugin(shop.clients[0]))

    @legacy.get("/orders/<order_id>")
    def order(order_id: str) -> str:
        return f"order {order_id}"

    @legacy.get("/orders/<order_id>/boom")
    def order_boom(order_id: str) -> str:
        raise ValueError(order_id)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        app.mount("/legacy", legacy)
    assert call(app, "/legacy/orders/8").text == "order 8"
    assert call(app, "/legacy/nothing").status_int == 404
    assert call(app, "/legacy/orders/8/boom").status_int == 500
    txs, _, errors = shop.shipped()
    assert [(t["name"], t["result"]) for t in txs] == [
        ("GET /legacy/orders/<order_id>", "HTTP 2xx"), ("GET unknown route", "HTTP 4xx"),
        ("GET /legacy/orders/<order_id>/boom", "HTTP 5xx")]
    if not (traced_too or CATCHALL_EXC_INFO):
        assert errors == []
        return
    (error,) = errors  # the app's own exception, not the copies Bottle wraps it in
    assert (error["exception"]["type"], error["exception"]["message"]) == ("ValueError", "8")
    assert error["culprit"] == "tests.contrib.test_bottle in order_boom"


def test_sensitive_route_variables_are_redacted_everywhere(shop, receiver):
    from beatlib.contrib.logging import LoggingHandler

    app = shop.make()
    (client,) = shop.clients
    handler = LoggingHandler(client)
    logging.getLogger("shop.reset").addHandler(handler)
    try:
        assert call(app, "/reset/tok3n-9f8e7d?page=2").text == "reset"
    finally:
        logging.getLogger("shop.reset").removeHandler(handler)
    (tx,), _, (error,) = shop.shipped()
    assert tx["name"] == "GET /reset/<token>"
    assert tx["context"]["request"]["url"]["pathname"] == "/reset/[REDACTED]"
    assert error["log"]["message"] == "reset for /reset/[REDACTED] failed"
    assert "tok3n-9f8e7d" not in str(receiver.received())


def test_a_name_the_view_set_is_kept(shop, receiver):
    call(shop.make(), "/named")
    (tx,), _, _ = shop.shipped()
    assert tx["name"] == "report by region"


def test_incoming_traceparent_continues_the_trace(shop, receiver):
    call(shop.make(), "/posts/2", headers={"traceparent": PARENT})
    (tx,), spans, _ = shop.shipped()
    assert tx["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    assert tx["parent_id"] == "b7ad6b7169203331"
    assert spans and {s["trace_id"] for s in spans} == {tx["trace_id"]}


def test_ignored_urls_are_not_traced_but_their_errors_are_captured(shop, receiver):
    app = shop.make(transaction_ignore_urls="/health*,/boom")
    assert call(app, "/health").text == "ok"
    assert call(app, "/boom").status_int == 500
    call(app, "/posts/1")
    txs, _, (error,) = shop.shipped()
    assert [t["name"] for t in txs] == ["GET /posts/<post_id:int>"]
    assert error["context"]["request"]["url"]["pathname"] == "/boom"
    assert "transaction_id" not in error


@pytest.mark.parametrize("kind", ["json", "form"])
def test_captured_body_redacted_and_still_readable_by_the_app(shop, receiver, kind):
    app = shop.make(capture_body="all")
    fields = {"title": "New", "password": "pw1"}
    if kind == "json":
        response = call(app, "/posts", "POST", body=b'{"title": "New", "password": "pw1"}',
                        content_type="application/json")
    else:
        response = call(app, "/posts", "POST", params=fields)
    assert response.status_int == 201 and response.json == {"id": 3, **fields}  # the app read it
    (tx,), _, _ = shop.shipped()
    assert tx["context"]["request"]["body"] == {"title": "New", "password": "[REDACTED]"}
    assert "pw1" not in str(receiver.events())


INI = """\
[beatlib]
service_name = shop-from-ini
environment = staging
server_url = {receiver}
capture_body = errors
"""


@pytest.mark.parametrize("env_name", [None, "shop-from-env"])
def test_settings_from_the_apps_config_file_and_env_wins(receiver, weather, tmp_path,
                                                         monkeypatch, env_name):
    if env_name:
        monkeypatch.setenv("BEATLIB_SERVICE_NAME", env_name)
    ini = tmp_path / "shop.ini"
    ini.write_text(INI.format(receiver=receiver.url))
    app = make_app(weather.url("/ok"))
    app.config.load_config(str(ini))
    plugin = app.install(BeatPlugin())
    try:
        assert plugin.client.config.capture_body == "errors"
        app.route("/boom", "POST", lambda: 1 / 0)
        assert call(app, "/boom", "POST", params={"card": "4111", "note": "hi"}).status_int == 500
        assert plugin.client.flush(5)
    finally:
        plugin.client.close(5)
        beatlib.uninstrument()
        context.set_active(None)
    service = receiver.metadata[0]["service"]
    assert service["name"] == (env_name or "shop-from-ini")
    assert service["environment"] == "staging"
    (error,) = receiver.events("error")
    assert error["context"]["request"]["body"] == {"card": "[REDACTED]", "note": "hi"}


def test_without_settings_the_process_default_client_is_used(receiver, weather):
    client = beatlib.Client(server_url=receiver.url, service_name="default", environ={})
    try:
        plugin = BeatPlugin()
        app = make_app(weather.url("/ok"), plugin)
        assert plugin.client is client
        call(app, "/posts/1")
        assert client.flush(5)
    finally:
        client.close(5)
        beatlib.uninstrument()
        context.set_active(None)
    (tx,) = receiver.events("transaction")
    assert tx["name"] == "GET /posts/<post_id:int>"
    assert receiver.metadata[0]["service"]["name"] == "default"


def test_a_bad_setting_raises_at_install(weather):
    app = make_app(weather.url("/ok"), **{"beatlib.transaction_sample_rate": "lots"})
    with pytest.raises(ConfigError, match="transaction_sample_rate"):
        app.install(BeatPlugin())
    assert call(app, "/posts/1").status_int == 200  # and the app is left as it was
    assert "wsgi" not in app.__dict__


def test_import_without_bottle_says_so():
    code = ("import sys; sys.modules['bottle'] = None\n"
            "try:\n    import beatlib.contrib.bottle\n"
            "except ImportError as exc:\n    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "needs Bottle (pip install bottle)" in out.stdout


def test_a_route_called_outside_a_request_works_as_before(shop, receiver):
    """Unit tests call a route's callback, plugins applied, without a request (in a thread
    where Bottle's request was never bound, reading it raises)."""
    from concurrent.futures import ThreadPoolExecutor

    def unit_test(app: Any) -> str:
        route = {r.rule: r for r in app.routes}
        with pytest.raises(ZeroDivisionError):
            route["/boom"].call()
        return route["/hello/<name>"].call(name="ann")

    client = beatlib.Client(server_url=receiver.url, environ={})
    shop.clients.append(client)
    for traced in (False, True):
        app = bottle.Bottle()
        app.route("/boom", callback=lambda: 1 / 0)
        app.route("/hello/<name>", callback=lambda name: f"hello {name}")
        if traced:
            app.install(BeatPlugin(client))
        with ThreadPoolExecutor(1) as pool:
            assert pool.submit(unit_test, app).result() == "hello ann"
