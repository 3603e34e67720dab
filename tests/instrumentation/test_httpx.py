"""httpx: one HTTP exit span per Client.send / AsyncClient.send, W3C trace headers."""

from __future__ import annotations

import asyncio
import inspect
import time

import httpx
import pytest
import wrapt

import beatlib
from beatlib.tracing import TraceParent
from tests.instrumentation.http_server import (
    STREAM_CHUNKS,
    TRACEPARENT,
    check_span,
    free_port,
    run_script,
)


def test_span_fields(traced, server):
    tx = traced.begin()
    with httpx.Client() as client:
        response = client.get(server.url("/ok"))
    traced.end()
    assert response.status_code == 200 and response.text == "ok"
    (span,) = traced.spans()
    check_span(span, server, server.url("/ok"))
    assert span["parent_id"] == "%016x" % tx.id


def test_credentials_and_secret_query_params_redacted(traced, server):
    traced.begin()
    httpx.get(f"http://user:secret@127.0.0.1:{server.port}/ok?token=abc&page=2")
    traced.end()
    (span,) = traced.spans()
    url = f"http://user:[REDACTED]@127.0.0.1:{server.port}/ok?token=[REDACTED]&page=2"
    check_span(span, server, url)


def test_server_error_is_a_failure(traced, server):
    traced.begin()
    assert httpx.post(server.url("/error"), content=b"x").status_code == 500
    traced.end()
    (span,) = traced.spans()
    check_span(span, server, server.url("/error"), 500, "failure", method="POST")


def test_client_error_is_a_failure(traced, server):
    traced.begin()
    assert httpx.get(server.url("/missing")).status_code == 404
    traced.end()
    (span,) = traced.spans()
    check_span(span, server, server.url("/missing"), 404, "failure")


def test_connection_refused_fails_the_span(traced):
    port = free_port()
    traced.begin()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/ok")
    traced.end()
    (span,) = traced.spans()
    assert span["name"] == f"GET 127.0.0.1:{port}" and span["outcome"] == "failure"


class FailingTransport(httpx.BaseTransport, httpx.AsyncBaseTransport):
    def __init__(self, error: BaseException) -> None:
        self.error = error

    def handle_request(self, request):
        raise self.error

    async def handle_async_request(self, request):
        raise self.error


def test_the_original_exception_object_is_reraised(traced):
    error = httpx.ConnectError("refused")
    traced.begin()
    with pytest.raises(httpx.ConnectError) as raised:
        httpx.Client(transport=FailingTransport(error)).get("http://example.invalid/")
    with pytest.raises(httpx.ConnectError) as raised_async:
        client = httpx.AsyncClient(transport=FailingTransport(error))
        asyncio.run(client.get("http://example.invalid/"))
    traced.end()
    assert raised.value is error and raised_async.value is error
    assert [s["outcome"] for s in traced.spans()] == ["failure", "failure"]
    assert traced.spans()[0]["name"] == "GET example.invalid"  # default port: host alone


def test_redirect_is_one_span(traced, server):
    traced.begin()
    response = httpx.get(server.url("/redirect"), follow_redirects=True)
    traced.end()
    assert response.status_code == 200 and [r.status_code for r in response.history] == [302]
    (span,) = traced.spans()
    check_span(span, server, server.url("/redirect"))


def test_trace_headers_name_the_span(traced, server):
    parent = TraceParent("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331", True, "es=s:1")
    traced.client.begin_transaction("test", parent)
    with httpx.Client() as client:
        request = client.build_request("GET", server.url("/headers"))
        echoed = client.send(request).json()
    traced.end()
    (span,) = traced.spans()
    assert echoed["traceparent"] == f"00-{parent.trace_id}-{span['id']}-01"
    assert echoed["tracestate"] == "es=s:1"
    # The caller's request is left as it was: sent again later, it gets fresh headers.
    assert "traceparent" not in request.headers and "tracestate" not in request.headers


def test_trace_headers_go_before_the_framing_headers(traced, server):
    traced.begin()
    with httpx.Client() as client:
        request = client.build_request("POST", server.url("/headers"), content=b"body",
                                       headers={"X-Mine": "1"})
        names = list(client.send(request).json())
    traced.end()
    assert names.index("traceparent") < names.index("content-length")
    assert names.index("tracestate") < names.index("content-length")  # es=s:1, ours
    assert names.index("x-mine") < names.index("traceparent")
    assert [k.lower() for k in request.headers] == [
        n for n in names if n not in ("traceparent", "tracestate")]


def test_users_own_traceparent_is_kept(traced, server):
    traced.begin()
    echoed = httpx.get(server.url("/headers"), headers={"Traceparent": TRACEPARENT}).json()
    traced.end()
    assert echoed["traceparent"] == TRACEPARENT
    assert len(traced.spans()) == 1


def test_users_own_tracestate_is_kept(traced, server):
    parent = TraceParent("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331", True, "es=s:1")
    traced.client.begin_transaction("test", parent)
    echoed = httpx.get(server.url("/headers"), headers={"tracestate": "mine=1"}).json()
    traced.end()
    (span,) = traced.spans()
    assert echoed["traceparent"] == f"00-{parent.trace_id}-{span['id']}-01"
    assert echoed["tracestate"] == "mine=1"


def test_unsampled_transaction_sends_the_header_without_a_span(traced, receiver, server):
    client = beatlib.Client(service_name="unsampled", server_url=receiver.url,
                            transaction_sample_rate=0, environ={})
    try:
        tx = client.begin_transaction("test")
        echoed = httpx.get(server.url("/headers")).json()
        client.end_transaction("test", "success")
        assert client.flush(10)
    finally:
        client.close(5)
    assert echoed["traceparent"] == f"00-{tx.trace_id}-{'%016x' % tx.id}-02"
    assert receiver.events("span") == []


def test_nothing_outside_a_transaction(traced, server):
    assert "traceparent" not in httpx.get(server.url("/headers")).json()
    traced.begin()
    traced.end()
    assert traced.spans() == []


def test_async_client(traced, server):
    """Concurrent requests in tasks: one span each, both children of the transaction, each
    request's traceparent naming its own span."""

    async def main():
        async with httpx.AsyncClient() as client:
            return await asyncio.gather(*(client.get(server.url("/headers")) for _ in range(2)))

    tx = traced.begin()
    responses = asyncio.run(main())
    traced.end()
    spans = traced.spans()
    assert len(spans) == 2
    for span in spans:
        check_span(span, server, server.url("/headers"))
        assert span["parent_id"] == "%016x" % tx.id
    sent = {r.json()["traceparent"].split("-")[2] for r in responses}
    assert sent == {s["id"] for s in spans}
    assert inspect.iscoroutinefunction(httpx.AsyncClient.send)


def test_streaming_span_ends_with_the_headers_and_the_body_stays_readable(traced, server):
    async def stream_async():
        async with httpx.AsyncClient() as client:
            async with client.stream("GET", server.url("/stream")) as response:
                return b"".join([chunk async for chunk in response.aiter_bytes()])

    traced.begin()
    start = time.perf_counter()
    with httpx.stream("GET", server.url("/stream")) as response:
        returned_ms = (time.perf_counter() - start) * 1000
        body = response.read()
    body_async = asyncio.run(stream_async())
    traced.end()
    assert body == body_async == b"".join(STREAM_CHUNKS)
    first, second = traced.spans()
    check_span(first, server, server.url("/stream"))
    check_span(second, server, server.url("/stream"))
    assert first["duration"] <= returned_ms


def test_uninstrument_restores_the_originals(traced):
    wrapped = [httpx.Client.__dict__["send"], httpx.AsyncClient.__dict__["send"]]
    assert all(isinstance(w, wrapt.FunctionWrapper) for w in wrapped)
    beatlib.uninstrument()
    assert httpx.Client.__dict__["send"] is wrapped[0].__wrapped__
    assert httpx.AsyncClient.__dict__["send"] is wrapped[1].__wrapped__
    beatlib.instrument(traced.client.config)
    assert isinstance(httpx.AsyncClient.__dict__["send"], wrapt.FunctionWrapper)


def test_instrument_before_import(receiver, server):
    run_script("""
        assert "httpx" not in sys.modules
        import asyncio
        import httpx

        async def get():
            async with httpx.AsyncClient() as http:
                return await http.get(os.environ["TARGET_URL"])

        client.begin_transaction("script")
        assert httpx.get(os.environ["TARGET_URL"]).status_code == 200
        assert asyncio.run(get()).status_code == 200
        client.end_transaction("before import", "success")
        assert client.close(10)
    """, receiver.url, server)
    spans = receiver.events("span")
    assert len(spans) == 2
    for span in spans:
        check_span(span, server, server.url("/ok"))
