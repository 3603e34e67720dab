"""The Django app on a real server (Django's own threaded WSGI server, as runserver uses) on
127.0.0.1: a trace across two of its requests, streaming and file responses ended when the
server closes them, a 500 captured once."""

from __future__ import annotations

import threading

import pytest
import requests
from django.core.servers.basehttp import ThreadedWSGIServer, WSGIRequestHandler
from django.core.wsgi import get_wsgi_application
from django.test import override_settings


class QuietHandler(WSGIRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadedWSGIServer(("127.0.0.1", 0), QuietHandler)
    httpd.set_app(get_wsgi_application())
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    httpd.server_close()


def test_trace_across_two_requests(beat, shop_data, server):
    post = shop_data[0]
    with override_settings(UPSTREAM_URL=f"{server}/api/items/gear/"):
        resp = requests.get(f"{server}/posts/{post.pk}/")
    assert resp.status_code == 200 and "gear" in resp.text
    assert beat.receiver.wait_for("transaction", 2)
    txs, spans, errors = beat.shipped()
    outer = next(t for t in txs if t["name"] == "GET posts/<int:pk>/")
    inner = next(t for t in txs if t["name"] == "GET api/items/<slug:slug>/")
    call = next(s for s in spans if s["type"] == "external")
    assert inner["trace_id"] == outer["trace_id"] and inner["parent_id"] == call["id"]
    assert call["transaction_id"] == outer["id"]
    assert inner["context"]["request"]["socket"]["remote_address"] == "127.0.0.1"
    assert inner["context"]["request"]["http_version"] == "1.1"


def test_streaming_and_files_end_when_the_server_closes_them(beat, server):
    assert requests.get(f"{server}/stream/").text == "0;1;2;"
    assert "def download" in requests.get(f"{server}/download/").text
    assert beat.receiver.wait_for("transaction", 2)
    streamed, downloaded = sorted(beat.shipped()[0], key=lambda t: t["name"])[::-1]
    assert streamed["name"] == "GET stream/" and streamed["duration"] >= 150
    assert downloaded["name"] == "GET download/"
    assert downloaded["result"] == "HTTP 2xx"


def test_a_500_on_a_real_server(beat, server):
    resp = requests.get(f"{server}/boom/")
    assert resp.status_code == 500 and resp.text == "our own 500 page"
    assert beat.receiver.wait_for("error", 1)
    (tx,), _, (error,) = beat.shipped()
    assert tx["outcome"] == "failure" and error["transaction_id"] == tx["id"]
    assert error["context"]["request"]["url"]["pathname"] == "/boom/"
