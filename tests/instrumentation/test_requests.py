"""requests: one HTTP exit span per Session.send, W3C trace headers, against a real server."""

from __future__ import annotations

import time

import pytest
import requests
import wrapt
from requests.adapters import HTTPAdapter

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
    response = requests.get(server.url("/ok"))
    traced.end()
    assert response.status_code == 200 and response.text == "ok"
    (span,) = traced.spans()
    check_span(span, server, server.url("/ok"))
    assert span["parent_id"] == span["transaction_id"] == "%016x" % tx.id


def test_credentials_and_secret_query_params_redacted(traced, server):
    traced.begin()
    requests.get(f"http://user:secret@127.0.0.1:{server.port}/ok?token=abc&page=2")
    traced.end()
    (span,) = traced.spans()
    url = f"http://user:[REDACTED]@127.0.0.1:{server.port}/ok?token=[REDACTED]&page=2"
    check_span(span, server, url)


def test_server_error_is_a_failure(traced, server):
    traced.begin()
    assert requests.post(server.url("/error"), data=b"x").status_code == 500
    traced.end()
    (span,) = traced.spans()
    check_span(span, server, server.url("/error"), 500, "failure", method="POST")


def test_client_error_is_a_failure_of_the_call(traced, server):
    # From the caller's side a 4xx is a failed call (the callee's transaction is a success).
    traced.begin()
    assert requests.get(server.url("/missing")).status_code == 404
    traced.end()
    (span,) = traced.spans()
    check_span(span, server, server.url("/missing"), 404, "failure")


class RecordingAdapter(HTTPAdapter):
    """Remembers the exception requests itself raised, to compare with what the caller got."""

    raised: BaseException | None = None

    def send(self, *args, **kwargs):
        try:
            return super().send(*args, **kwargs)
        except BaseException as exc:
            self.raised = exc
            raise


class ForwardingAdapter(HTTPAdapter):
    """A transport adapter for a scheme of its own (as docker's `http+docker://` or a test's
    `mock://` are), answering from the real server."""

    def __init__(self, server):
        super().__init__()
        self.server = server

    def send(self, request, *args, **kwargs):
        request.url = self.server.url("/ok")
        return super().send(request, *args, **kwargs)


def test_schemes_without_a_default_port_or_a_host_give_sane_names(traced, server):
    session = requests.Session()
    session.mount("http+docker://", ForwardingAdapter(server))
    session.mount("mock://", ForwardingAdapter(server))
    traced.begin()
    assert session.get("http+docker://localhost/v1.43/info").text == "ok"
    assert session.get("mock:///anything").text == "ok"
    traced.end()
    docker, mock = traced.spans()  # the receiver validated both against the schema
    assert docker["name"] == "GET localhost"  # no port known: none shown (was "localhost:None")
    assert docker["context"]["destination"] == {"address": "localhost",
                                                "service": {"resource": "localhost"}}
    assert docker["context"]["service"]["target"] == {"type": "http", "name": "localhost"}
    assert mock["name"] == "GET"  # no host: the method alone (was "GET ")
    assert mock["context"]["service"]["target"] == {"type": "http"}
    assert mock["context"]["destination"] == {"service": {"resource": "http"}}


def test_connection_refused_fails_the_span_and_reraises_the_same_exception(traced):
    port = free_port()
    session = requests.Session()
    adapter = RecordingAdapter()
    session.mount("http://", adapter)
    traced.begin()
    with pytest.raises(requests.ConnectionError) as raised:
        session.get(f"http://127.0.0.1:{port}/ok")
    traced.end()
    assert raised.value is adapter.raised
    (span,) = traced.spans()
    assert span["name"] == f"GET 127.0.0.1:{port}" and span["outcome"] == "failure"
    assert "response" not in span["context"]["http"]


def test_redirect_is_one_span_and_requests_over_urllib3_records_one_span(traced, server):
    traced.begin()
    response = requests.get(server.url("/redirect"))
    traced.end()
    assert response.status_code == 200 and [r.status_code for r in response.history] == [302]
    (span,) = traced.spans()  # not one more for urllib3, nor for the redirected request
    check_span(span, server, server.url("/redirect"))


def test_trace_headers_name_the_span(traced, server):
    parent = TraceParent("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331", True, "es=s:1")
    traced.client.begin_transaction("test", parent)
    prepared = requests.Request("GET", server.url("/headers")).prepare()
    response = requests.Session().send(prepared)
    traced.end()
    (span,) = traced.spans()
    echoed = response.json()
    assert echoed["traceparent"] == f"00-{parent.trace_id}-{span['id']}-01"
    assert echoed["tracestate"] == "es=s:1"
    assert "traceparent" not in prepared.headers  # the caller's request is left as it was


def test_users_own_traceparent_is_kept(traced, server):
    traced.begin()
    response = requests.get(server.url("/headers"), headers={"TraceParent": TRACEPARENT})
    traced.end()
    assert response.json()["traceparent"] == TRACEPARENT
    assert len(traced.spans()) == 1


def test_unsampled_transaction_sends_the_header_without_a_span(traced, receiver, server):
    client = beatlib.Client(service_name="unsampled", server_url=receiver.url,
                            transaction_sample_rate=0, environ={})
    try:
        tx = client.begin_transaction("test")
        echoed = requests.get(server.url("/headers")).json()
        client.end_transaction("test", "success")
        assert client.flush(10)
    finally:
        client.close(5)
    assert echoed["traceparent"] == f"00-{tx.trace_id}-{'%016x' % tx.id}-02"
    assert receiver.events("span") == []


def test_nothing_outside_a_transaction(traced, server):
    echoed = requests.get(server.url("/headers")).json()
    assert "traceparent" not in echoed
    traced.begin()
    traced.end()
    assert traced.spans() == []


def test_streaming_span_ends_with_the_headers_and_the_body_stays_readable(traced, server):
    traced.begin()
    start = time.perf_counter()
    response = requests.get(server.url("/stream"), stream=True)
    returned_ms = (time.perf_counter() - start) * 1000
    body = b"".join(response.iter_content(chunk_size=None))
    traced.end()
    assert body == b"".join(STREAM_CHUNKS)
    (span,) = traced.spans()
    check_span(span, server, server.url("/stream"))
    assert span["duration"] <= returned_ms


def test_uninstrument_restores_the_original(traced):
    wrapped = requests.Session.__dict__["send"]
    assert isinstance(wrapped, wrapt.FunctionWrapper)
    beatlib.uninstrument()
    assert requests.Session.__dict__["send"] is wrapped.__wrapped__
    beatlib.instrument(traced.client.config)
    assert isinstance(requests.Session.__dict__["send"], wrapt.FunctionWrapper)


def test_instrument_before_import(receiver, server):
    run_script("""
        assert "requests" not in sys.modules
        import requests
        client.begin_transaction("script")
        assert requests.get(os.environ["TARGET_URL"]).status_code == 200
        client.end_transaction("before import", "success")
        assert client.close(10)
    """, receiver.url, server)
    (span,) = receiver.events("span")
    check_span(span, server, server.url("/ok"))
