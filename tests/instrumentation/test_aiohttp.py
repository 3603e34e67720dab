"""aiohttp client: one HTTP exit span per request, W3C trace headers, context under gather."""

from __future__ import annotations

import asyncio
import inspect
import time

import aiohttp
import pytest
import wrapt

import beatlib
from beatlib.config import Config
from beatlib.tracing import TraceParent
from tests.instrumentation.http_server import (
    STREAM_CHUNKS,
    TRACEPARENT,
    check_span,
    free_port,
    run_script,
)


def fetch(url: str, method: str = "GET", **kwargs):
    """(status, body) of one request in a fresh session, run to completion."""

    async def main():
        async with aiohttp.ClientSession() as session:
            async with session.request(method, url, **kwargs) as response:
                return response.status, await response.read()

    return asyncio.run(main())


def echoed(url: str, **kwargs) -> dict:
    """The request headers the server saw (/headers)."""

    async def main():
        async with aiohttp.ClientSession(**kwargs.pop("session", {})) as session:
            async with session.get(url, **kwargs) as response:
                return await response.json()

    return asyncio.run(main())


def test_span_fields(traced, server):
    tx = traced.begin()
    assert fetch(server.url("/ok")) == (200, b"ok")
    traced.end()
    (span,) = traced.spans()
    check_span(span, server, server.url("/ok"))
    assert span["parent_id"] == "%016x" % tx.id


def test_credentials_params_and_secret_query_redacted(traced, server):
    traced.begin()
    fetch(f"http://user:secret@127.0.0.1:{server.port}/ok?token=abc", params={"page": "2"})
    traced.end()
    (span,) = traced.spans()
    url = f"http://user:[REDACTED]@127.0.0.1:{server.port}/ok?token=[REDACTED]&page=2"
    check_span(span, server, url)


def test_base_url_is_joined(traced, server):
    async def main():
        async with aiohttp.ClientSession(base_url=server.url("/")) as session:
            async with session.get("/ok") as response:
                return response.status

    traced.begin()
    assert asyncio.run(main()) == 200
    traced.end()
    (span,) = traced.spans()
    check_span(span, server, server.url("/ok"))


def test_server_and_client_errors_are_failures(traced, server):
    traced.begin()
    assert fetch(server.url("/error"), "POST", data=b"x") == (500, b"boom")
    assert fetch(server.url("/missing"))[0] == 404
    traced.end()
    error, missing = traced.spans()
    check_span(error, server, server.url("/error"), 500, "failure", method="POST")
    check_span(missing, server, server.url("/missing"), 404, "failure")


def test_raise_for_status_keeps_the_status_and_the_exception(traced, server):
    traced.begin()
    with pytest.raises(aiohttp.ClientResponseError) as raised:
        fetch(server.url("/error"), raise_for_status=True)
    traced.end()
    assert raised.value.status == 500
    (span,) = traced.spans()
    check_span(span, server, server.url("/error"), 500, "failure")


def test_connection_refused_fails_the_span_with_the_same_exception(traced):
    port = free_port()
    traced.begin()
    with pytest.raises(aiohttp.ClientConnectorError):
        fetch(f"http://127.0.0.1:{port}/ok")
    traced.end()
    (span,) = traced.spans()
    assert span["name"] == f"GET 127.0.0.1:{port}" and span["outcome"] == "failure"


def test_redirect_is_one_span(traced, server):
    async def main():
        async with aiohttp.ClientSession() as session:
            async with session.get(server.url("/redirect")) as response:
                return response.status, [r.status for r in response.history]

    traced.begin()
    assert asyncio.run(main()) == (200, [302])
    traced.end()
    (span,) = traced.spans()
    check_span(span, server, server.url("/redirect"))


def test_trace_headers_name_the_span(traced, server):
    parent = TraceParent("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331", True, "es=s:1")
    traced.client.begin_transaction("test", parent)
    mine = {"X-Mine": "1"}
    seen = echoed(server.url("/headers"), headers=mine)
    traced.end()
    (span,) = traced.spans()
    assert seen["traceparent"] == f"00-{parent.trace_id}-{span['id']}-01"
    assert seen["tracestate"] == "es=s:1" and seen["x-mine"] == "1"
    assert mine == {"X-Mine": "1"}  # the caller's headers are left as they were


def test_trace_headers_go_before_a_framing_header_the_caller_set(traced, server):
    async def main():
        async with aiohttp.ClientSession() as session:
            headers = [("X-Mine", "1"), ("Content-Length", "4")]
            async with session.post(server.url("/headers"), data=b"body",
                                    headers=headers) as response:
                return list(await response.json())

    traced.begin()
    names = asyncio.run(main())
    traced.end()
    assert names.index("x-mine") < names.index("traceparent") < names.index("content-length")


@pytest.mark.parametrize("where", ["request", "session"])
def test_users_own_traceparent_is_kept(traced, server, where):
    mine = {"Traceparent": TRACEPARENT}
    kwargs = {"headers": mine} if where == "request" else {"session": {"headers": mine}}
    traced.begin()
    seen = echoed(server.url("/headers"), **kwargs)
    traced.end()
    assert seen["traceparent"] == TRACEPARENT
    assert len(traced.spans()) == 1


def test_users_own_tracestate_is_kept(traced, server):
    parent = TraceParent("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331", True, "es=s:1")
    traced.client.begin_transaction("test", parent)
    seen = echoed(server.url("/headers"), headers={"tracestate": "mine=1"})
    traced.end()
    (span,) = traced.spans()
    assert seen["traceparent"] == f"00-{parent.trace_id}-{span['id']}-01"
    assert seen["tracestate"] == "mine=1"


def test_unsampled_transaction_sends_the_header_without_a_span(receiver, server, traced):
    client = beatlib.Client(service_name="unsampled", server_url=receiver.url,
                            transaction_sample_rate=0, environ={})
    try:
        tx = client.begin_transaction("test")
        seen = echoed(server.url("/headers"))
        client.end_transaction("test", "success")
        assert client.flush(10)
    finally:
        client.close(5)
    assert seen["traceparent"] == f"00-{tx.trace_id}-{'%016x' % tx.id}-02"
    assert receiver.events("span") == []


def test_nothing_outside_a_transaction(traced, server):
    assert "traceparent" not in echoed(server.url("/headers"))
    traced.begin()
    traced.end()
    assert traced.spans() == []


def test_gather_each_request_under_its_own_task_span(traced, server):
    """Concurrent tasks, each with a span of its own around a request: every HTTP span is the
    child of its task's span, and the traceparent each request carried names its HTTP span."""

    async def task(session, n):
        with beatlib.capture_span(f"task {n}"):
            await asyncio.sleep(0.01 * (3 - n))  # finish out of order
            async with session.get(server.url("/headers")) as response:
                return n, (await response.json())["traceparent"]

    async def main():
        async with aiohttp.ClientSession() as session:
            return await asyncio.gather(*(task(session, n) for n in range(3)))

    tx = traced.begin()
    sent = dict(asyncio.run(main()))
    traced.end()
    spans = traced.spans()
    tasks = {s["name"]: s for s in spans if s["name"].startswith("task")}
    http = {s["id"]: s for s in spans if s["type"] == "external"}
    assert len(tasks) == len(http) == 3
    for n, traceparent in sent.items():
        span = http[traceparent.split("-")[2]]
        check_span(span, server, server.url("/headers"))
        assert span["parent_id"] == tasks[f"task {n}"]["id"]
        assert tasks[f"task {n}"]["parent_id"] == "%016x" % tx.id


def test_span_ends_with_the_headers_and_the_body_stays_readable(traced, server):
    async def main():
        async with aiohttp.ClientSession() as session:
            start = time.perf_counter()
            async with session.get(server.url("/stream")) as response:
                returned_ms = (time.perf_counter() - start) * 1000
                return returned_ms, await response.read()

    traced.begin()
    returned_ms, body = asyncio.run(main())
    traced.end()
    assert body == b"".join(STREAM_CHUNKS)
    (span,) = traced.spans()
    check_span(span, server, server.url("/stream"))
    assert span["duration"] <= returned_ms


def test_the_same_coroutine_function_and_a_cancelled_request(traced, server):
    async def main():
        async with aiohttp.ClientSession() as session:
            request = asyncio.ensure_future(session.get(server.url("/stream")))
            await asyncio.sleep(0)
            request.cancel()
            with pytest.raises(asyncio.CancelledError):
                await request

    assert inspect.iscoroutinefunction(aiohttp.ClientSession._request)
    traced.begin()
    asyncio.run(main())
    traced.end()
    assert [s["outcome"] for s in traced.spans()] == ["failure"]


def test_uninstrument_restores_and_disabling_skips_it(traced):
    wrapped = aiohttp.ClientSession.__dict__["_request"]
    assert isinstance(wrapped, wrapt.FunctionWrapper)
    beatlib.uninstrument()
    assert aiohttp.ClientSession.__dict__["_request"] is wrapped.__wrapped__
    beatlib.instrument(Config(disabled_instrumentations="aiohttp", environ={}))
    assert aiohttp.ClientSession.__dict__["_request"] is wrapped.__wrapped__
    beatlib.uninstrument()
    beatlib.instrument(traced.client.config)
    assert isinstance(aiohttp.ClientSession.__dict__["_request"], wrapt.FunctionWrapper)


def test_instrument_before_import(receiver, server):
    run_script("""
        assert "aiohttp" not in sys.modules
        import asyncio
        import aiohttp

        async def get():
            async with aiohttp.ClientSession() as http:
                async with http.get(os.environ["TARGET_URL"]) as response:
                    return response.status

        client.begin_transaction("script")
        assert asyncio.run(get()) == 200
        client.end_transaction("before import", "success")
        assert client.close(10)
    """, receiver.url, server)
    (span,) = receiver.events("span")
    check_span(span, server, server.url("/ok"))
