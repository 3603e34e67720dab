"""urllib3: one HTTP exit span per HTTPConnectionPool.urlopen, W3C trace headers, and
beatlib's own transport (urllib3 too) never traced."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
import urllib3
import wrapt

import beatlib
from tests.instrumentation.http_server import (
    STREAM_CHUNKS,
    TRACEPARENT,
    check_span,
    free_port,
    run_script,
)


@pytest.fixture
def pool(server) -> Iterator[urllib3.HTTPConnectionPool]:
    with urllib3.HTTPConnectionPool("127.0.0.1", server.port) as p:
        yield p


def test_span_fields(traced, server):
    tx = traced.begin()
    response = urllib3.PoolManager().request("GET", server.url("/ok"))
    traced.end()
    assert response.status == 200 and response.data == b"ok"
    (span,) = traced.spans()
    check_span(span, server, server.url("/ok"))
    assert span["parent_id"] == "%016x" % tx.id


def test_secret_query_params_redacted(traced, server, pool):
    traced.begin()
    pool.request("GET", "/ok?token=abc&page=2")
    traced.end()
    (span,) = traced.spans()
    check_span(span, server, server.url("/ok?token=[REDACTED]&page=2"))


def test_server_error_is_a_failure(traced, server, pool):
    traced.begin()
    assert pool.urlopen("POST", "/error", body=b"x").status == 500
    traced.end()
    (span,) = traced.spans()
    check_span(span, server, server.url("/error"), 500, "failure", method="POST")


def test_client_error_is_a_failure(traced, server, pool):
    traced.begin()
    assert pool.urlopen("GET", "/missing").status == 404
    traced.end()
    (span,) = traced.spans()
    check_span(span, server, server.url("/missing"), 404, "failure")


def test_connection_refused_fails_the_span(traced):
    port = free_port()
    traced.begin()
    with pytest.raises(urllib3.exceptions.NewConnectionError):
        urllib3.HTTPConnectionPool("127.0.0.1", port).urlopen("GET", "/ok", retries=False)
    traced.end()
    (span,) = traced.spans()
    assert span["name"] == f"GET 127.0.0.1:{port}" and span["outcome"] == "failure"


def test_the_original_exception_object_is_reraised(traced, server, pool):
    error = RuntimeError("no connection for you")

    def get_conn(timeout=None):
        raise error

    pool._get_conn = get_conn  # urlopen lets an exception of this type through unwrapped
    traced.begin()
    with pytest.raises(RuntimeError) as raised:
        pool.urlopen("GET", "/ok")
    traced.end()
    assert raised.value is error
    assert traced.spans()[0]["outcome"] == "failure"


def test_redirects(traced, server, pool):
    """Followed inside one urlopen: one span. A PoolManager follows them itself, with one
    urlopen (maybe to another host) per hop: one span per hop."""
    traced.begin()
    assert pool.urlopen("GET", "/redirect").status == 200
    assert urllib3.PoolManager().request("GET", server.url("/redirect")).status == 200
    traced.end()
    same_pool, first_hop, second_hop = traced.spans()
    check_span(same_pool, server, server.url("/redirect"))
    check_span(first_hop, server, server.url("/redirect"), 302)
    check_span(second_hop, server, server.url("/ok"))


@pytest.mark.parametrize("how", ["none", "keyword", "positional", "pool default"])
def test_trace_headers_name_the_span(traced, server, how):
    pool = urllib3.HTTPConnectionPool("127.0.0.1", server.port, headers={"X-Pool": "1"})
    headers = {"X-Mine": "1"}
    traced.begin()
    if how == "none":
        response = pool.urlopen("GET", "/headers")
    elif how == "keyword":
        response = pool.urlopen("GET", "/headers", headers=headers)
    elif how == "positional":
        response = pool.urlopen("GET", "/headers", None, headers)
    else:
        response = pool.request("GET", "/headers")
    traced.end()
    (span,) = traced.spans()
    echoed = json.loads(response.data)
    assert echoed["traceparent"] == f"00-{span['trace_id']}-{span['id']}-03"
    assert ("x-mine" in echoed) == (how in ("keyword", "positional"))
    assert ("x-pool" in echoed) == (how in ("none", "pool default"))
    assert headers == {"X-Mine": "1"} and pool.headers == {"X-Pool": "1"}  # not mutated


@pytest.mark.parametrize("headers", [{"traceparent": TRACEPARENT},
                                     urllib3.HTTPHeaderDict({"TRACEPARENT": TRACEPARENT})])
def test_users_own_traceparent_is_kept(traced, server, pool, headers):
    traced.begin()
    response = pool.urlopen("GET", "/headers", headers=headers)
    traced.end()
    assert json.loads(response.data)["traceparent"] == TRACEPARENT


def test_nothing_outside_a_transaction(traced, server, pool):
    assert "traceparent" not in json.loads(pool.urlopen("GET", "/headers").data)
    traced.begin()
    traced.end()
    assert traced.spans() == []


def test_streaming_span_ends_with_the_headers_and_the_body_stays_readable(traced, server, pool):
    traced.begin()
    start = time.perf_counter()
    response = pool.urlopen("GET", "/stream", preload_content=False)
    returned_ms = (time.perf_counter() - start) * 1000
    body = b"".join(response.stream())
    traced.end()
    assert body == b"".join(STREAM_CHUNKS)
    (span,) = traced.spans()
    check_span(span, server, server.url("/stream"))
    assert span["duration"] <= returned_ms


def test_the_transport_is_not_traced(traced, server):
    """The transport POSTs from its worker thread while a transaction is open here: no span
    for that POST, and no trace headers on it."""
    traced.begin()
    traced.end("first")
    tx = traced.begin()
    assert traced.client.flush(10)  # "first" goes out now, during `tx`
    urllib3.PoolManager().request("GET", server.url("/ok"))
    traced.end("second")
    transactions, spans, _ = traced.shipped()
    assert [t["name"] for t in transactions] == ["first", "second"]
    (span,) = spans  # only the app's own request
    assert span["transaction_id"] == "%016x" % tx.id
    check_span(span, server, server.url("/ok"))
    requests = traced.receiver.requests
    assert len(requests) >= 2
    assert not any("traceparent" in {k.lower() for k in r["headers"]} for r in requests)


def test_uninstrument_restores_the_original(traced):
    wrapped = urllib3.HTTPConnectionPool.__dict__["urlopen"]
    assert isinstance(wrapped, wrapt.FunctionWrapper)
    beatlib.uninstrument()
    assert urllib3.HTTPConnectionPool.__dict__["urlopen"] is wrapped.__wrapped__
    beatlib.instrument(traced.client.config)
    assert isinstance(urllib3.HTTPConnectionPool.__dict__["urlopen"], wrapt.FunctionWrapper)


def test_instrument_before_import(receiver, server):
    # beatlib's transport imports urllib3, so it is imported when instrument() runs; the
    # post-import hook path is the same one the fixture exercises, from a fresh process.
    run_script("""
        import urllib3
        client.begin_transaction("script")
        assert urllib3.PoolManager().request("GET", os.environ["TARGET_URL"]).status == 200
        client.end_transaction("before import", "success")
        assert client.close(10)
    """, receiver.url, server)
    (span,) = receiver.events("span")
    check_span(span, server, server.url("/ok"))


def test_trace_headers_go_before_the_framing_headers(traced, server):
    pool = urllib3.HTTPConnectionPool("127.0.0.1", server.port)
    headers = urllib3.HTTPHeaderDict({"X-Mine": "1", "Content-Length": "4"})
    headers.add("X-Twice", "a")
    headers.add("X-Twice", "b")
    traced.begin()
    response = pool.urlopen("POST", "/headers", body=b"body", headers=headers)
    traced.end()
    names = list(json.loads(response.data))
    assert names.index("x-mine") < names.index("traceparent") < names.index("content-length")
    assert "traceparent" not in headers and headers.getlist("X-Twice") == ["a", "b"]

