"""Flask: the realistic app (tests/contrib/flask_app.py) traced through Beat, over Flask's test
client and a real werkzeug server; every event checked against the intake schemas."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from werkzeug.serving import make_server

import beatlib
from beatlib import context
from beatlib.contrib.flask import Beat
from tests.contrib.flask_app import create_app
from tests.instrumentation.http_server import HTTPServer
from tests.receiver import Receiver

PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture
def weather() -> Iterator[HTTPServer]:
    with HTTPServer() as server:
        yield server


class Apps:
    """Makes traced (or plain) apps on fresh SQLite files; closes their clients after."""

    def __init__(self, receiver: Receiver, weather: HTTPServer, tmp_path: Path) -> None:
        self.receiver, self.weather, self.tmp_path = receiver, weather, tmp_path
        self.clients: list[beatlib.Client] = []
        self.servers: list[Any] = []
        self.count = 0

    def make(self, traced: bool = True, beat: Beat | None = None, receiver: Receiver | None = None,
             **settings: Any) -> Flask:
        self.count += 1
        database = f"sqlite:///{self.tmp_path / f'blog{self.count}.db'}"
        config: dict[str, Any] = {}
        if traced:
            config["BEATLIB"] = {"server_url": (receiver or self.receiver).url,
                                 "flush_interval": "50ms", **settings}
        app = create_app(database, self.weather.url("/ok"), **config)
        if traced:
            (beat or Beat()).init_app(app)
            self.clients.append(app.extensions["beatlib"])
        return app

    def flush(self, transactions: int = 0) -> None:
        """Send what was recorded; first wait for `transactions` (ended on close, which
        a real server does after the client has read the response)."""
        assert self.receiver.wait_for("transaction", transactions)
        for client in self.clients:
            assert client.flush(5)

    def serve(self, app: Flask) -> str:
        """`app` on a real threaded werkzeug server on 127.0.0.1; its base URL."""
        server = make_server("127.0.0.1", 0, app, threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.servers.append(server)
        return f"http://127.0.0.1:{server.server_port}"

    def close(self) -> None:
        for server in self.servers:
            server.shutdown()
        for client in self.clients:
            client.close(5)


@pytest.fixture
def apps(receiver, weather, tmp_path) -> Iterator[Apps]:
    made = Apps(receiver, weather, tmp_path)
    try:
        yield made
    finally:
        made.close()
        beatlib.uninstrument()
        context.set_active(None)


def get(app: Flask, path: str, **kwargs: Any) -> Any:
    """A test-client request, buffered: the response is closed, so the transaction ends."""
    return app.test_client().open(path, buffered=True, **kwargs)


def test_realistic_app_over_a_real_server(apps, receiver, weather):
    url = apps.serve(apps.make())
    assert "Hello by ann" in requests.get(url + "/posts").text
    boom = requests.get(url + "/boom")
    assert boom.status_code == 500 and boom.text == "<h1>Sorry, ZeroDivisionError</h1>"
    apps.flush(transactions=2)

    ok, failed = receiver.events("transaction")
    assert (ok["name"], ok["type"], ok["result"], ok["outcome"]) == (
        "GET /posts", "request", "HTTP 2xx", "success")
    spans = sorted((s for s in receiver.events("span") if s["transaction_id"] == ok["id"]),
                   key=lambda s: s["timestamp"])
    assert [(s["type"], s["subtype"]) for s in spans[:3]] == [
        ("db", "sqlite"), ("external", "http"), ("template", "jinja2")]
    assert spans[0]["name"] == "SELECT FROM posts"
    assert spans[1]["name"] == f"GET 127.0.0.1:{weather.port}"
    assert spans[2]["name"] == "posts.html"
    # The authors are loaded while the template renders: their queries are its children.
    assert spans[3:] and all(s["name"] == "SELECT FROM users" and s["parent_id"] == spans[2]["id"]
                             for s in spans[3:])
    assert ok["context"]["request"]["url"]["full"] == url + "/posts"
    assert ok["context"]["response"]["status_code"] == 200
    assert ok["context"]["response"]["headers"]["Content-Type"] == "text/html; charset=utf-8"

    assert (failed["name"], failed["result"], failed["outcome"]) == (
        "GET /boom", "HTTP 5xx", "failure")
    (error,) = receiver.events("error")
    assert error["exception"]["type"] == "ZeroDivisionError"
    assert error["exception"]["handled"] is False
    assert error["transaction_id"] == failed["id"] and error["trace_id"] == failed["trace_id"]
    assert error["transaction"]["name"] == "GET /boom"
    assert error["context"]["request"]["url"]["pathname"] == "/boom"
    assert error["context"]["request"]["method"] == "GET"
    boom_spans = [s for s in receiver.events("span") if s["transaction_id"] == failed["id"]]
    # The errorhandler(500) page is rendered inside the same transaction.
    assert [s["name"] for s in boom_spans] == ["SELECT FROM posts", "500.html"]


def test_names_from_url_rules(apps, receiver):
    app = apps.make()
    assert get(app, "/posts/2").status_code == 200
    assert get(app, "/posts/9").status_code == 404  # abort(404) in a matched route
    assert get(app, "/no/such/page").status_code == 404
    assert get(app, "/posts/1", method="DELETE").status_code == 405
    apps.flush()
    assert [(t["name"], t["result"], t["outcome"]) for t in receiver.events("transaction")] == [
        ("GET /posts/<int:post_id>", "HTTP 2xx", "success"),
        ("GET /posts/<int:post_id>", "HTTP 4xx", "success"),
        ("GET unknown route", "HTTP 4xx", "success"),
        ("DELETE unknown route", "HTTP 4xx", "success"),
    ]
    assert receiver.events("error") == []  # 404s and 405s are answers, not errors


def test_streamed_response_is_timed_whole(apps, receiver):
    url = apps.serve(apps.make())
    assert requests.get(url + "/stream").text == "/stream 0\n/stream 1\n/stream 2\n"
    apps.flush(transactions=1)
    (tx,) = receiver.events("transaction")
    assert tx["name"] == "GET /stream" and tx["duration"] >= 150
    spans = receiver.events("span")
    assert sorted(s["name"] for s in spans) == ["chunk 0", "chunk 1", "chunk 2"]
    assert all(s["parent_id"] == tx["id"] for s in spans)


def test_unread_response_is_no_error(apps, receiver):
    app = apps.make()
    response = app.test_client().get("/stream")
    assert next(response.response) == b"/stream 0\n"
    response.close()  # the client went away mid-stream
    del response
    gc.collect()  # the unfinished body generator is closed now
    apps.flush()
    (tx,) = receiver.events("transaction")
    assert tx["result"] == "HTTP 2xx"
    assert receiver.events("error") == []


def test_exception_while_streaming(apps, receiver):
    with pytest.raises(ConnectionError):
        get(apps.make(), "/stream?fail=1")
    apps.flush()
    (tx,) = receiver.events("transaction")
    assert (tx["result"], tx["outcome"]) == ("HTTP 2xx", "failure")  # headers were sent
    (error,) = receiver.events("error")
    assert error["exception"]["type"] == "ConnectionError"
    assert error["transaction_id"] == tx["id"]
    assert error["context"]["request"]["url"]["search"] == "?fail=1"


def test_error_handling_unchanged(apps, receiver):
    plain, traced = apps.make(traced=False), apps.make()
    requests_ = [("/boom", {}), ("/no/such/page", {}), ("/posts/9", {}),
                 ("/posts", {"method": "POST", "data": {"title": ""}}),
                 ("/posts", {"method": "POST", "json": {"title": ""}})]
    for path, kwargs in requests_:
        before, after = get(plain, path, **kwargs), get(traced, path, **kwargs)
        assert (after.status, after.headers, after.data) == (before.status, before.headers,
                                                             before.data), path
    apps.flush()
    assert [t["result"] for t in receiver.events("transaction")] == [
        "HTTP 5xx", "HTTP 4xx", "HTTP 4xx", "HTTP 4xx", "HTTP 4xx"]
    # One rule for every framework: an exception the app raised is an error whatever turned
    # it into a response (InvalidPost's errorhandler answered 400); abort(404) is not.
    assert [e["exception"]["type"] for e in receiver.events("error")] == [
        "ZeroDivisionError", "InvalidPost", "InvalidPost"]


@pytest.mark.parametrize("setting", ["DEBUG", "TESTING", "PROPAGATE_EXCEPTIONS"])
def test_propagated_exceptions_still_propagate_and_are_captured_once(apps, receiver, setting):
    for traced in (False, True):
        app = apps.make(traced=traced)
        app.config[setting] = True
        with pytest.raises(ZeroDivisionError):
            get(app, "/boom")
    apps.flush()
    (tx,) = receiver.events("transaction")
    assert (tx["name"], tx["result"], tx["outcome"]) == ("GET /boom", "HTTP 5xx", "failure")
    (error,) = receiver.events("error")
    assert error["transaction_id"] == tx["id"]


def test_debugger_page_still_shown(apps, receiver):
    from werkzeug.debug import DebuggedApplication

    app = apps.make()
    app.debug = True
    app.wsgi_app = DebuggedApplication(app.wsgi_app)  # type: ignore[method-assign]
    response = get(app, "/boom")
    assert response.status_code == 500 and b"Werkzeug Debugger" in response.data
    apps.flush()
    (tx,) = receiver.events("transaction")
    assert tx["result"] == "HTTP 5xx"
    assert len(receiver.events("error")) == 1


@pytest.mark.parametrize("kind", ["json", "form"])
def test_captured_body_redacted_and_still_readable_by_the_app(apps, receiver, kind):
    app = apps.make(capture_body="all")
    response = get(app, "/posts", method="POST",
                   **{"json" if kind == "json" else "data": {"title": "New", "password": "pw1"}})
    assert response.status_code == 201
    assert response.json == {"id": 3, "title": "New", "password": "pw1"}  # the app read it
    apps.flush()
    (tx,) = receiver.events("transaction")
    assert tx["context"]["request"]["body"] == {"title": "New", "password": "[REDACTED]"}
    assert "pw1" not in str(receiver.events())


def test_body_not_captured_by_default(apps, receiver):
    app = apps.make()
    assert get(app, "/posts", method="POST", json={"title": "New"}).status_code == 201
    apps.flush()
    (tx,) = receiver.events("transaction")
    assert "body" not in tx["context"]["request"]


def test_flask_login_user(apps, receiver):
    app = apps.make()
    client = app.test_client()
    assert client.get("/me", buffered=True).status_code == 401
    assert client.get("/login/1", buffered=True).text == "welcome"
    assert client.get("/me", buffered=True).text == "you are ann"
    apps.flush()
    anonymous, login, me = receiver.events("transaction")
    assert "user" not in anonymous["context"]
    assert me["context"]["user"] == {"id": "1", "username": "ann", "email": "ann@example.com"}
    assert login["context"]["user"]["id"] == "1"  # logged in during the request


def test_two_apps_in_one_process(apps, receiver):
    """One Beat (app factory style), two apps, each with its own config, client and server."""
    beat = Beat()
    with Receiver() as other:
        shop = apps.make(beat=beat, service_name="shop")
        blog = apps.make(beat=beat, receiver=other, service_name="blog")
        assert shop.extensions["beatlib"] is not blog.extensions["beatlib"]
        assert beat.client is blog.extensions["beatlib"]
        get(shop, "/posts/1")
        get(blog, "/posts/2")
        get(blog, "/no/such/page")
        apps.flush()
        assert other.invalid == []
        assert {m["service"]["name"] for m in receiver.metadata} == {"shop"}
        assert {m["service"]["name"] for m in other.metadata} == {"blog"}
        assert [t["context"]["request"]["url"]["pathname"]
                for t in receiver.events("transaction")] == ["/posts/1"]
        assert [t["context"]["request"]["url"]["pathname"]
                for t in other.events("transaction")] == ["/posts/2", "/no/such/page"]
        assert receiver.metadata[0]["service"]["framework"]["name"] == "flask"


def test_given_client_and_init_twice(apps, receiver, tmp_path, weather):
    client = beatlib.Client(server_url=receiver.url, service_name="given", environ={})
    apps.clients.append(client)
    app = create_app(f"sqlite:///{tmp_path / 'given.db'}", weather.url("/ok"))
    beat = Beat(app, client=client)
    beat.init_app(app)  # again: nothing doubles
    assert beat.client is client and app.extensions["beatlib"] is client
    get(app, "/posts/1")
    apps.flush()
    assert len(receiver.events("transaction")) == 1
    assert receiver.metadata[0]["service"]["name"] == "given"


def test_environment_wins_over_app_config(apps, receiver, monkeypatch):
    monkeypatch.setenv("BEATLIB_SERVICE_NAME", "from-env")
    get(apps.make(service_name="from-config"), "/posts/1")
    apps.flush()
    assert receiver.metadata[0]["service"]["name"] == "from-env"


def test_incoming_traceparent_continues_the_trace(apps, receiver):
    get(apps.make(), "/posts/1", headers={"traceparent": PARENT})
    apps.flush()
    (tx,) = receiver.events("transaction")
    assert tx["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    assert tx["parent_id"] == "b7ad6b7169203331"
    assert all(s["trace_id"] == tx["trace_id"] for s in receiver.events("span"))


def test_ignored_urls(apps, receiver):
    app = apps.make(transaction_ignore_urls="/posts/*,/boom")
    get(app, "/posts/1")
    get(app, "/posts")
    get(app, "/boom")
    apps.flush()
    assert [t["name"] for t in receiver.events("transaction")] == ["GET /posts"]
    (error,) = receiver.events("error")  # an ignored URL's exception is still an error
    assert error["context"]["request"]["url"]["pathname"] == "/boom"
    assert "transaction_id" not in error


def test_async_view_and_renamed_transaction(apps, receiver):
    pytest.importorskip("asgiref")
    app = apps.make()

    @app.get("/async/<name>")
    async def greet(name: str) -> str:
        beatlib.set_transaction_name("greeting")
        with beatlib.capture_span("awaited"):
            await asyncio.sleep(0.01)
        return f"hi {name}"

    assert get(app, "/async/ann").text == "hi ann"
    apps.flush()
    (tx,) = receiver.events("transaction")
    (span,) = receiver.events("span")
    assert tx["name"] == "greeting" and span["parent_id"] == tx["id"]


def test_import_without_flask_says_so():
    code = ("import sys; sys.modules['flask'] = None\n"
            "try:\n    import beatlib.contrib.flask\n"
            "except ImportError as exc:\n    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "needs Flask (pip install flask)" in out.stdout


def test_an_app_is_freed_at_zero_refcount(apps):
    """As Flask's own test_app_freed_on_zero_refcount: Beat(app) adds no reference cycle."""
    import gc
    import weakref

    from flask import Flask

    gc.disable()
    try:
        app = Flask(__name__)
        Beat(app, client=apps.make().extensions["beatlib"])
        ref = weakref.ref(app)
        del app
        assert ref() is None
    finally:
        gc.enable()


def test_a_response_never_closed_still_ends_and_leaves_the_thread_clean(apps, receiver):
    """Werkzeug's test client without buffered=True never closes the body: the transaction
    ends when the body is read through, and it is not left active on the thread, so a job run
    there later is a transaction of its own, not a span of a request long gone."""
    app = apps.make()
    response = app.test_client().get("/posts/1")  # not buffered: nothing closes the body
    assert response.status_code == 200 and b"Hello" in response.data
    assert beatlib.get_current_transaction() is None

    @beatlib.transaction("nightly")
    def job():
        with beatlib.capture_span("step"):
            return 1

    assert job() == 1
    apps.flush()
    names = sorted(t["name"] for t in receiver.events("transaction"))
    assert names == ["GET /posts/<int:post_id>", "nightly"]
