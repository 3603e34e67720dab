"""The Django app under a real ASGI server (uvicorn) on 127.0.0.1: async views and the async
ORM, a trace across two of its requests (an httpx call from an async view), an async stream
ended when the server has sent it (or the client went away), a 500 captured once; the events
reach the receiver."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import requests

uvicorn = pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def server():
    from beatlib.contrib.django.asgi import get_asgi_application

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(get_asgi_application(), lifespan="on", log_level="warning",
                            access_log=False)
    httpd = uvicorn.Server(config)
    thread = threading.Thread(target=httpd.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not httpd.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    httpd.should_exit = True
    thread.join(10)
    sock.close()


def test_async_view_and_orm_under_uvicorn(beat, shop_data, server):
    post = shop_data[0]
    resp = requests.get(f"{server}/async/posts/{post.pk}/")
    assert resp.status_code == 200 and resp.json()["title"] == "Gears"
    assert beat.receiver.wait_for("transaction", 1)
    (tx,), spans, _ = beat.shipped()
    assert tx["name"] == "GET async/posts/<int:pk>/" and tx["id"] == resp.json()["transaction"]
    request = tx["context"]["request"]
    assert request["url"]["full"] == f"{server}/async/posts/{post.pk}/"
    assert request["socket"]["remote_address"] == "127.0.0.1"
    assert request["http_version"] == "1.1"
    assert [s["name"] for s in spans if "shop_post" in s["name"]] == ["SELECT FROM shop_post"] * 3
    assert all(s["transaction_id"] == tx["id"] for s in spans)


def test_trace_across_two_requests_under_uvicorn(beat, server):
    resp = requests.get(f"{server}/async/call/", params={"url": f"{server}/api/items/gear/"})
    assert resp.status_code == 200 and '"item": "gear"' in resp.text
    assert beat.receiver.wait_for("transaction", 2)
    txs, spans, _ = beat.shipped()
    outer = next(t for t in txs if t["name"] == "GET async/call/")
    inner = next(t for t in txs if t["name"] == "GET api/items/<slug:slug>/")
    call = next(s for s in spans if s["type"] == "external")
    assert call["transaction_id"] == outer["id"] and call["subtype"] == "http"
    assert (inner["trace_id"], inner["parent_id"]) == (outer["trace_id"], call["id"])


def test_async_stream_under_uvicorn_ends_when_sent(beat, server):
    assert requests.get(f"{server}/async/stream/").text == "0;1;2;"
    assert beat.receiver.wait_for("transaction", 1)
    (tx,), spans, _ = beat.shipped()
    assert tx["name"] == "GET async/stream/" and tx["duration"] >= 150
    assert [s["name"] for s in spans if s["type"] != "db"] == ["chunk 0", "chunk 1", "chunk 2"]


def test_a_500_under_uvicorn(beat, server):
    resp = requests.get(f"{server}/async/boom/")
    assert resp.status_code == 500 and resp.text == "our own 500 page"
    assert beat.receiver.wait_for("error", 1)
    (tx,), _, (error,) = beat.shipped()
    assert tx["outcome"] == "failure" and error["transaction_id"] == tx["id"]
    assert error["context"]["request"]["url"]["pathname"] == "/async/boom/"


def test_a_client_gone_mid_stream_still_ends_the_transaction(beat, server):
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as conn:
        conn.sendall(b"GET /async/stream/ HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"0;" in conn.recv(4096) or b"0;" in conn.recv(4096)
    assert beat.receiver.wait_for("transaction", 1)
    (tx,), _, errors = beat.shipped()
    assert tx["name"] == "GET async/stream/" and tx["result"] == "HTTP 2xx" and not errors
