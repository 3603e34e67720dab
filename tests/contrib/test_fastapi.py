"""FastAPI and Starlette behind `app.add_middleware(BeatMiddleware)`, in-process through
httpx's ASGITransport: route names (routers' prefixes, mounts), errors once whatever
answered them, streaming timed whole, background tasks in the trace, context carried into
threads and tasks, bodies, and the app's responses unchanged."""

from __future__ import annotations

import asyncio

import httpx
import pytest

import beatlib
from beatlib import context
from tests.contrib import fastapi_app

PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture
def traced(receiver):
    """(app, client): the test app behind BeatMiddleware, sending to the receiver."""
    made = []

    def make(**settings):
        options = {k: settings.pop(k) for k in ("websockets",) if k in settings}
        client = beatlib.Client(server_url=receiver.url, environ={}, **settings)
        made.append(client)
        return fastapi_app.make_app(client, **options), client

    yield make
    for client in made:
        client.close(5)
    beatlib.uninstrument()
    context.set_active(None)


def call(app, *requests):
    """Each (method, path, keywords) through httpx's ASGITransport; the responses."""
    async def go():
        transport = httpx.ASGITransport(app=app, client=("10.1.2.3", 4567))
        async with httpx.AsyncClient(transport=transport, base_url="http://shop.test") as c:
            return [await c.request(method, path, **kw) for method, path, kw in requests]

    return asyncio.run(go())


def get(app, *paths, **kw):
    return call(app, *[("GET", path, kw) for path in paths])


def transactions(receiver, client, n=None):
    assert client.flush(5)
    if n is not None:
        assert receiver.wait_for("transaction", n, timeout=5)
    return receiver.events("transaction")


@pytest.mark.parametrize("path, name", [
    ("/api/items/3", "GET /api/items/{item_id}"),  # a router included with a prefix
    ("/api/v2/things/x", "GET /api/v2/things/{thing}"),  # a router inside that router
    ("/sync/4", "GET /sync/{n}"),
    ("/sub/hello/bob", "GET /sub/hello/{name}"),  # a mounted FastAPI app
    ("/star/t/acme/pages/2", "GET /star/t/{tenant}/pages/{page}"),  # mounts with parameters
    ("/nope", "GET unknown route"),  # no route: a 404
    ("/sub/nope", "GET unknown route"),  # none in the mounted app either
])
def test_transactions_are_named_by_the_route_template(traced, receiver, path, name):
    app, client = traced()
    (response,) = get(app, path)
    assert response.status_code in (200, 404)
    (tx,) = transactions(receiver, client)
    assert tx["name"] == name and tx["type"] == "request"
    assert tx["result"] == f"HTTP {response.status_code // 100}xx"


def test_method_not_allowed_is_named_by_the_route_it_partly_matched(traced, receiver):
    app, client = traced()
    (response,) = call(app, ("POST", "/sync/1", {}))
    assert response.status_code == 405
    (tx,) = transactions(receiver, client)
    assert tx["name"] == "POST /sync/{n}" and tx["outcome"] == "success"


def test_a_name_set_by_the_app_is_kept(traced, receiver):
    app, client = traced()
    get(app, "/named")
    (tx,) = transactions(receiver, client)
    assert tx["name"] == "custom name"


def test_request_context_continues_the_trace_and_is_redacted(traced, receiver):
    app, client = traced()
    (response,) = get(app, "/api/items/3?q=x&token=abc", headers={
        "traceparent": PARENT, "tracestate": "vendor=1", "Authorization": "Bearer s3",
        "Cookie": "sessionid=zzz; theme=dark"})
    assert response.json() == {"id": 3, "q": "x"}
    (tx,) = transactions(receiver, client)
    assert tx["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    assert tx["parent_id"] == "b7ad6b7169203331"
    assert tx["result"] == "HTTP 2xx" and tx["outcome"] == "success"
    request = tx["context"]["request"]
    assert request["method"] == "GET" and request["http_version"] == "1.1"
    assert request["url"] == {
        "full": "http://shop.test/api/items/3?q=x&token=[REDACTED]", "protocol": "http:",
        "hostname": "shop.test", "pathname": "/api/items/3",
        "search": "?q=x&token=[REDACTED]"}
    assert request["socket"] == {"remote_address": "10.1.2.3"}
    assert request["headers"]["Authorization"] == "[REDACTED]"
    assert request["headers"]["Host"] == "shop.test"
    assert request["cookies"] == {"sessionid": "[REDACTED]", "theme": "dark"}
    response_context = tx["context"]["response"]
    assert response_context["status_code"] == 200 and response_context["finished"] is True
    assert response_context["headers"]["content-type"] == "application/json"
    (span,) = receiver.events("span")
    assert span["name"] == "load item" and span["transaction_id"] == tx["id"]


def test_the_app_answers_the_same_with_and_without_beatlib(traced, receiver):
    app, _ = traced(capture_body="all")
    plain = fastapi_app.make_app(None)
    requests = [("GET", p, {}) for p in (
        "/api/items/3?q=1", "/sync/4", "/sub/hello/x", "/nope", "/missing", "/unavailable",
        "/out-of-stock", "/overloaded", "/stream", "/background", "/api/items/x")]
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    requests += [("POST", "/echo", {"content": b"a=1&password=2", "headers": form}),
                 ("POST", "/json", {"json": {"a": [1, 2]}}),
                 ("POST", "/json", {"content": b"not json"})]

    def seen(responses):
        return [(r.status_code, sorted(r.headers.multi_items()), r.content) for r in responses]

    assert seen(call(app, *requests)) == seen(call(plain, *requests))
    # What the app raises, the server sees raised, with or without beatlib.
    for path in ("/boom", "/dependency"):
        with pytest.raises((KeyError, LookupError)):
            get(app, path)
        with pytest.raises((KeyError, LookupError)):
            get(plain, path)


@pytest.mark.parametrize("path, exc_type", [
    ("/boom", "KeyError"),  # raised by an async endpoint, answered by ServerErrorMiddleware
    ("/sync-boom", "ValueError"),  # raised in the thread pool
    ("/dependency", "LookupError"),  # raised by a dependency
])
def test_an_unanswered_exception_is_captured_once_with_the_request(traced, receiver, path,
                                                                   exc_type):
    app, client = traced()
    with pytest.raises((KeyError, ValueError, LookupError)) as raised:
        get(app, path)
    assert type(raised.value).__name__ == exc_type
    (tx,) = transactions(receiver, client)
    (error,) = receiver.events("error")
    assert tx["result"] == "HTTP 5xx" and tx["outcome"] == "failure"
    assert tx["context"]["response"]["status_code"] == 500
    assert error["exception"]["type"] == exc_type and error["exception"]["handled"] is False
    assert error["transaction_id"] == tx["id"] and error["trace_id"] == tx["trace_id"]
    assert error["transaction"]["name"] == tx["name"]
    assert error["context"]["request"]["url"]["pathname"] == path


@pytest.mark.parametrize("path, status, exc_type", [
    ("/out-of-stock", 409, "OutOfStock"),  # the app's async exception handler answered
    ("/overloaded", 503, "Overloaded"),  # the app's sync handler answered, in the pool
    ("/unavailable", 503, "HTTPException"),  # a 5xx HTTPException: the one rule
])
def test_an_exception_an_exception_handler_answered_is_still_an_error(traced, receiver, path,
                                                                      status, exc_type):
    app, client = traced()
    (response,) = get(app, path)
    assert response.status_code == status
    (tx,) = transactions(receiver, client)
    (error,) = receiver.events("error")
    assert error["exception"]["type"] == exc_type
    assert error["transaction_id"] == tx["id"]
    assert error["context"]["request"]["url"]["pathname"] == path
    assert tx["context"]["response"]["status_code"] == status
    assert tx["outcome"] == ("failure" if status >= 500 else "success")


def test_a_handler_added_to_a_serving_app_is_seen_too(traced, receiver):
    """Handlers are wrapped once per exception middleware, at its first request; one it is
    given later (its add_exception_handler) answers to us as well."""
    from fastapi.responses import JSONResponse
    from starlette.middleware.exceptions import ExceptionMiddleware

    app, client = traced()
    get(app, "/sync/1")
    middleware = app.middleware_stack
    while not isinstance(middleware, ExceptionMiddleware):
        middleware = middleware.app

    async def answer(request, exc):
        return JSONResponse({"answered": str(exc)}, status_code=502)

    middleware.add_exception_handler(KeyError, answer)
    (response,) = get(app, "/boom")
    assert response.status_code == 502
    first, tx = transactions(receiver, client, 2)
    (error,) = receiver.events("error")
    assert error["exception"]["type"] == "KeyError" and error["transaction_id"] == tx["id"]
    assert tx["context"]["response"]["status_code"] == 502 and tx["outcome"] == "failure"


@pytest.mark.parametrize("path, status", [
    ("/missing", 404),  # HTTPException(404)
    ("/api/items/notanumber", 422),  # FastAPI's RequestValidationError
])
def test_client_errors_are_not_errors(traced, receiver, path, status):
    app, client = traced()
    (response,) = get(app, path)
    assert response.status_code == status
    (tx,) = transactions(receiver, client)
    assert tx["result"] == "HTTP 4xx" and tx["outcome"] == "success"
    assert receiver.events("error") == []


def test_a_streamed_response_is_timed_to_its_last_chunk(traced, receiver):
    app, client = traced()
    (response,) = get(app, "/stream")
    assert response.text == "data: 0\n\ndata: 1\n\ndata: 2\n\n"
    (tx,) = transactions(receiver, client)
    assert tx["name"] == "GET /stream" and tx["duration"] >= 150
    spans = receiver.events("span")
    assert sorted(s["name"] for s in spans) == ["chunk 0", "chunk 1", "chunk 2"]
    assert {s["transaction_id"] for s in spans} == {tx["id"]}


def test_background_tasks_are_transactions_of_the_same_trace(traced, receiver):
    fastapi_app.DONE.clear()
    app, client = traced()
    get(app, "/background", headers={"traceparent": PARENT})
    assert fastapi_app.DONE == ["notify 1", "record 2"]
    txs = transactions(receiver, client, 3)
    (request,) = [t for t in txs if t["type"] == "request"]
    tasks = {t["name"].rsplit(".", 1)[-1]: t for t in txs if t["type"] == "task"}
    assert sorted(tasks) == ["notify", "record"]
    for task in tasks.values():
        assert task["trace_id"] == request["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
        assert task["parent_id"] == request["id"]
        assert task["result"] == "success" and task["outcome"] == "success"
    spans = {s["name"]: s for s in receiver.events("span")}
    assert spans["send mail"]["transaction_id"] == tasks["notify"]["id"]
    # The sync task ran in the thread pool: its query is its transaction's.
    assert spans["SELECT"]["transaction_id"] == tasks["record"]["id"]
    # The request ended when its response was sent, before its tasks ran.
    assert request["duration"] < tasks["notify"]["duration"] + 1000


def test_a_background_task_run_inside_the_request_is_a_span_of_it(traced, receiver):
    app, client = traced()
    get(app, "/inline-task")
    (tx,) = transactions(receiver, client)
    spans = {s["name"].rsplit(".", 1)[-1]: s for s in receiver.events("span")}
    assert sorted(spans) == ["fill cache", "warm_cache"]
    assert spans["warm_cache"]["type"] == "task" and spans["warm_cache"]["parent_id"] == tx["id"]
    assert spans["fill cache"]["parent_id"] == spans["warm_cache"]["id"]


def test_a_failing_background_task_is_captured_in_its_own_transaction(traced, receiver):
    app, client = traced()
    with pytest.raises(RuntimeError):
        get(app, "/background-boom")
    txs = transactions(receiver, client, 2)
    (request,) = [t for t in txs if t["type"] == "request"]
    (task,) = [t for t in txs if t["type"] == "task"]
    (error,) = receiver.events("error")
    assert request["result"] == "HTTP 2xx"  # the client got its answer
    assert task["outcome"] == "failure" and task["result"] == "failure"
    assert error["exception"]["type"] == "RuntimeError"
    assert error["transaction_id"] == task["id"]
    assert error["context"]["request"]["url"]["pathname"] == "/background-boom"


def test_threads_tasks_and_task_groups_record_into_the_request(traced, receiver):
    app, client = traced()
    get(app, "/concurrent")
    (tx,) = transactions(receiver, client)
    spans = receiver.events("span")
    names = sorted(s["name"] for s in spans)
    assert names == sorted(["gather 0", "gather 1", "gather 2", "gather 3", "thread 0",
                            "thread 1", "SELECT", "SELECT", "sqlite3.connect",
                            "sqlite3.connect"])
    assert {s["transaction_id"] for s in spans} == {tx["id"]}
    by_id = {s["id"]: s for s in spans}
    # The queries run in asyncio.to_thread and anyio's to_thread are under their spans.
    for query in (s for s in spans if s["name"] == "SELECT"):
        assert by_id[query["parent_id"]]["name"].startswith("thread ")


@pytest.mark.parametrize("capture_body, recorded", [
    ("all", {"a": "1", "password": "[REDACTED]"}),
    ("off", None),
])
def test_the_body_is_recorded_only_when_asked_and_still_read_by_the_app(
        traced, receiver, capture_body, recorded):
    app, client = traced(capture_body=capture_body)
    (response,) = call(app, ("POST", "/echo", {
        "content": b"a=1&password=hunter2",
        "headers": {"Content-Type": "application/x-www-form-urlencoded"}}))
    assert response.status_code == 201 and response.content == b"a=1&password=hunter2"
    (tx,) = transactions(receiver, client)
    assert tx["context"]["request"].get("body") == recorded
    assert b"hunter2" not in receiver.received()


def test_a_json_body_read_by_fastapi_is_recorded_parsed(traced, receiver):
    app, client = traced(capture_body="transactions")
    (response,) = call(app, ("POST", "/json", {"json": {"card_number": "4111", "n": 2}}))
    assert response.json() == {"keys": ["card_number", "n"]}
    (tx,) = transactions(receiver, client)
    assert tx["context"]["request"]["body"] == {"card_number": "[REDACTED]", "n": 2}


def test_ignored_urls_are_not_traced(traced, receiver):
    app, client = traced(transaction_ignore_urls="/sync/*,/sub/*")
    get(app, "/sync/1", "/sub/hello/x", "/api/items/1")
    assert [t["name"] for t in transactions(receiver, client)] == ["GET /api/items/{item_id}"]


def test_the_framework_is_in_the_metadata(traced, receiver):
    app, client = traced()
    get(app, "/api/items/1")
    transactions(receiver, client)
    assert receiver.metadata[-1]["service"]["framework"]["name"] == "fastapi"
