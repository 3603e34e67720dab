"""The Django integration under ASGI, through Django's AsyncClient: async views and the async
ORM traced in the request's transaction, the middleware on the event loop (no thread hop of
ours), errors once, async streaming timed to its end, bodies, route names and redaction, and
the middleware next to sync-only and async-only neighbours."""

from __future__ import annotations

import asyncio
import inspect
import threading
from typing import Any

import pytest
from asgiref.sync import SyncToAsync, sync_to_async
from django.db import connection
from django.test import AsyncClient, Client, override_settings

from tests.contrib.django.conftest import UPSTREAM

PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
MIDDLEWARE = "beatlib.contrib.django.middleware.TracingMiddleware"
SUBTYPE = {"sqlite": "sqlite", "postgresql": "postgresql"}[connection.vendor]


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


async def login(client: AsyncClient, user: Any) -> None:
    if hasattr(client, "aforce_login"):  # Django 5.0+
        await client.aforce_login(user)
    else:
        await sync_to_async(client.force_login)(user)


async def get(path: str, client: AsyncClient | None = None, **kwargs: Any) -> Any:
    return await (client or AsyncClient()).get(path, **kwargs)


def test_async_view_and_async_orm_in_the_request(beat, shop_data):
    post = shop_data[0]

    async def request() -> tuple[Any, int]:
        resp = await get(f"/async/posts/{post.pk}/?ref=mail", headers={"traceparent": PARENT})
        return resp, threading.get_ident()

    resp, loop_thread = run(request())
    assert resp.status_code == 200
    body = resp.json()
    assert body["title"] == "Gears" and body["count"] >= 1 and "Gears" in body["titles"]
    assert body["thread"] == loop_thread  # the view ran on the event loop, not in a thread
    (tx,), spans, errors = beat.shipped()
    assert not errors
    assert body["transaction"] == tx["id"]
    assert tx["name"] == "GET async/posts/<int:pk>/" and tx["result"] == "HTTP 2xx"
    assert (tx["trace_id"], tx["parent_id"]) == ("0af7651916cd43dd8448eb211c80319c",
                                                 "b7ad6b7169203331")
    request = tx["context"]["request"]
    assert request["url"]["full"] == f"http://testserver/async/posts/{post.pk}/?ref=mail"
    assert request["http_version"] == "1.1"
    assert tx["context"]["response"]["status_code"] == 200
    # aget, acount and the async iteration: each run by Django in a thread, each a span of
    # this transaction; then the view's own span on the loop.
    queries = [s for s in spans if "shop_post" in s["name"]]
    assert [s["name"] for s in queries] == ["SELECT FROM shop_post"] * 3
    assert all(s["subtype"] == SUBTYPE for s in queries)
    statements = [s["context"]["db"]["statement"] for s in queries]
    assert "LIMIT" in statements[0] and "COUNT(*)" in statements[1]
    assert spans[-1]["name"] == "price lookup"
    assert all(s["transaction_id"] == tx["id"] and s["parent_id"] == tx["id"] for s in spans)


def test_the_scheme_and_http_version_come_from_the_asgi_scope(beat):
    assert run(get("/async/wait/?s=0", secure=True)).status_code == 200
    request = beat.transaction()["context"]["request"]
    assert request["url"]["full"] == "https://testserver/async/wait/?s=0"
    assert (request["url"]["protocol"], request["http_version"]) == ("https:", "1.1")


def _owner(func: Any) -> str:
    return str(getattr(inspect.unwrap(func), "__module__", "") or "")


def test_no_thread_hop_of_ours_under_asgi(beat, monkeypatch):
    """Django runs every sync-only piece of an async chain through sync_to_async (a thread
    hop per request): none of them is beatlib's."""
    entered: list[Any] = []
    call = SyncToAsync.__call__

    def spy(self: SyncToAsync, *args: Any, **kwargs: Any) -> Any:
        entered.append(self.func)
        return call(self, *args, **kwargs)

    async def requests() -> None:
        client = AsyncClient()
        await get("/async/wait/?s=0", client)  # the middleware chain built
        monkeypatch.setattr(SyncToAsync, "__call__", spy)
        assert (await get("/async/wait/?s=0", client)).status_code == 200
        assert (await get("/async/reset/tok3n-4d5e6f/", client)).status_code == 200

    run(requests())
    assert entered  # Django's own (its MiddlewareMixin hooks, response.close) are seen
    assert not [f for f in entered if _owner(f).startswith("beatlib")], entered
    assert [t["name"] for t in beat.shipped()[0]] == ["GET async/wait/",
                                                      "GET async/wait/",
                                                      "GET async/reset/<str:token>/"]


def test_concurrent_async_requests_each_their_own_transaction(beat, shop_data):
    post = shop_data[0]

    async def requests() -> list[Any]:
        client = AsyncClient()
        return await asyncio.gather(*(get(f"/async/posts/{post.pk}/", client)
                                      for _ in range(10)))

    responses = run(requests())
    assert beat.receiver.wait_for("transaction", 10)
    txs, spans, _ = beat.shipped()
    assert sorted(r.json()["transaction"] for r in responses) == sorted(t["id"] for t in txs)
    for tx in txs:
        mine = [s for s in spans if s["transaction_id"] == tx["id"]]
        assert [s["name"] for s in mine].count("SELECT FROM shop_post") == 3
        assert sum(1 for s in mine if s["name"] == "price lookup") == 1


def test_an_async_view_that_raises_is_captured_once(beat, shop_data):
    async def request() -> Any:
        client = AsyncClient(raise_request_exception=False)
        await login(client, shop_data[1])
        return await get("/async/boom/?page=2", client)

    resp = run(request())
    assert resp.status_code == 500 and resp.content == b"our own 500 page"  # handler500
    (tx,), spans, (error,) = beat.shipped()  # the signal and the django.request log record
    assert tx["name"] == "GET async/boom/"
    assert tx["result"] == "HTTP 5xx" and tx["outcome"] == "failure"
    assert error["exception"]["type"] == "OutOfStock"
    assert error["exception"]["message"] == "nothing left for ann"
    assert error["culprit"].startswith("tests.contrib.django.shop.views in async_boom")
    assert (error["transaction_id"], error["trace_id"]) == (tx["id"], tx["trace_id"])
    assert error["transaction"]["name"] == "GET async/boom/"
    assert error["context"]["request"]["url"]["full"] == "http://testserver/async/boom/?page=2"
    assert error["context"]["user"]["username"] == "ann"  # looked up by `await auser()`
    assert tx["context"]["user"]["username"] == "ann"
    assert [s["name"] for s in spans if "shop_post" in s["name"]] == ["SELECT FROM shop_post"]


def test_the_exception_still_reaches_the_async_test_client(beat):
    with pytest.raises(Exception, match="nothing left for anyone"):
        run(get("/async/boom/"))
    assert len(beat.shipped()[2]) == 1


def test_async_streaming_response_ends_when_consumed(beat, shop_data):
    async def request() -> tuple[Any, list[dict], bytes]:
        resp = await get("/async/stream/")
        assert resp.streaming and resp.is_async
        shipped_before = beat.shipped()[0]  # the view returned; the body is still to come
        body = b"".join([chunk async for chunk in resp.streaming_content])
        return resp, shipped_before, body

    resp, before, body = run(request())
    assert before == [] and body == b"0;1;2;"
    (tx,), spans, _ = beat.shipped()
    assert tx["name"] == "GET async/stream/" and tx["duration"] >= 150
    chunks = [s for s in spans if s["name"].startswith("chunk")]
    assert [s["name"] for s in chunks] == ["chunk 0", "chunk 1", "chunk 2"]
    queries = [s for s in spans if s["type"] == "db"]
    assert [q["parent_id"] for q in queries] == [c["id"] for c in chunks]  # in their chunk
    assert all(s["transaction_id"] == tx["id"] for s in spans)


def test_an_exception_while_streaming_async_is_captured(beat):
    async def request() -> None:
        resp = await get("/async/stream-fail/")
        with pytest.raises(Exception, match="ran out while streaming"):
            [chunk async for chunk in resp.streaming_content]

    run(request())
    (tx,), _, (error,) = beat.shipped()
    assert tx["name"] == "GET async/stream-fail/" and tx["outcome"] == "failure"
    assert error["exception"]["type"] == "OutOfStock" and error["transaction_id"] == tx["id"]
    assert error["context"]["request"]["url"]["pathname"] == "/async/stream-fail/"


@pytest.mark.filterwarnings("ignore:StreamingHttpResponse must consume")
def test_async_streaming_under_wsgi(beat):
    """A sync server serving an async stream (Django consumes it through async_to_sync)."""
    resp = Client().get("/async/stream/")
    assert b"".join(resp) == b"0;1;2;"
    (tx,), spans, _ = beat.shipped()
    assert tx["name"] == "GET async/stream/" and tx["duration"] >= 150
    assert [s["name"] for s in spans if s["type"] != "db"] == ["chunk 0", "chunk 1", "chunk 2"]


def test_a_sync_view_under_asgi(beat, shop_data):
    post, user = shop_data

    async def request() -> Any:
        client = AsyncClient()
        await login(client, user)
        return await get(f"/posts/{post.pk}/", client)

    resp = run(request())
    assert resp.status_code == 200 and b"<h1>Gears</h1>" in resp.content
    (tx,), spans, _ = beat.shipped()
    assert tx["name"] == "GET posts/<int:pk>/"
    assert tx["context"]["user"]["username"] == "ann"
    named = [(s["type"], s["name"]) for s in spans if s["subtype"] != SUBTYPE
             or "shop_post" in s["name"]]
    assert named == [
        ("db", "SELECT FROM shop_post"),
        ("external", f"GET 127.0.0.1:{UPSTREAM.port}"),
        ("template", "shop/post_detail.html"),
    ]
    assert all(s["transaction_id"] == tx["id"] for s in spans)


@pytest.mark.parametrize("path", ["/async/wait/?s=0", "/api/items/x/"])
def test_ignored_urls_under_asgi(beat, monkeypatch, path):
    monkeypatch.setattr(beat.client.config, "transaction_ignore_urls", ("/async/wait*",))
    resp = run(get(path))
    assert resp.status_code == 200
    names = [t["name"] for t in beat.shipped()[0]]
    assert names == ([] if path.startswith("/async/wait") else ["GET api/items/<slug:slug>/"])


def test_bodies_under_asgi(beat, monkeypatch):
    monkeypatch.setattr(beat.client.config, "capture_body", "all")

    async def requests() -> list[Any]:
        client = AsyncClient()
        return [
            await client.post("/async/signup/", "username=bob&password=hunter2",
                              content_type="application/x-www-form-urlencoded"),
            await client.post("/async/signup/", {"username": "eve", "api_key": "k3y"},
                              content_type="application/json"),
            await client.post("/async/signup/", {"username": "kim", "secret": "s3cr3t"}),
        ]

    form, data, multipart = run(requests())
    assert form.json() == {"user": "bob", "fields": ["password", "username"]}  # still read
    assert data.json() == {"user": "eve", "fields": ["api_key", "username"]}
    assert multipart.json() == {"user": "kim", "fields": ["secret", "username"]}
    bodies = [t["context"]["request"]["body"] for t in beat.shipped()[0]]
    assert bodies == [{"username": "bob", "password": "[REDACTED]"},
                      {"username": "eve", "api_key": "[REDACTED]"},
                      {"username": "kim", "secret": "[REDACTED]"}]  # the parsed fields
    assert "hunter2" not in str(beat.receiver.received())


def test_sensitive_route_variables_are_redacted_under_asgi(beat):
    resp = run(get("/async/reset/tok3n-4d5e6f/?page=2"))
    assert resp.status_code == 200 and resp.content == b"reset"
    (tx,), _, (error,) = beat.shipped()
    assert tx["name"] == "GET async/reset/<str:token>/"
    assert tx["context"]["request"]["url"]["pathname"] == "/async/reset/[REDACTED]/"
    assert error["log"]["message"] == "reset for /async/reset/[REDACTED]/ failed"
    assert "tok3n-4d5e6f" not in str(beat.receiver.received())


NEIGHBOURS = "tests.contrib.django.shop.middleware"


@pytest.mark.parametrize(("neighbour", "server"), [
    ("SyncOnly", "asgi"),  # below it, Django calls us sync (in a thread), views async
    ("AsyncOnly", "wsgi"),  # below it, Django calls us async (async_to_sync), views sync
])
def test_next_to_single_mode_middleware(beat, neighbour, server):
    with override_settings(MIDDLEWARE=[MIDDLEWARE, f"{NEIGHBOURS}.{neighbour}"]):
        if server == "asgi":
            resp = run(get("/async/reset/tok3n-4d5e6f/"))
        else:
            resp = Client().get("/reset/tok3n-4d5e6f/")
    assert resp.status_code == 200 and resp["X-Neighbour"] == neighbour
    (tx,), _, (error,) = beat.shipped()
    assert tx["name"].endswith("reset/<str:token>/") and tx["result"] == "HTTP 2xx"
    assert error["transaction_id"] == tx["id"]
    assert "tok3n-4d5e6f" not in str(beat.receiver.received())
