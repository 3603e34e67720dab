"""http.client and urllib.request: one HTTP exit span per request, W3C trace headers, nothing
more under urllib3/requests, and beatlib's own transport never traced."""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request

import pytest
import requests
import urllib3
import wrapt

import beatlib
from beatlib.config import Config
from tests.instrumentation.http_server import (
    STREAM_CHUNKS,
    TRACEPARENT,
    check_span,
    free_port,
    run_script,
)


@pytest.fixture
def conn(server):
    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    yield c
    c.close()


def test_request_and_getresponse(traced, server, conn):
    tx = traced.begin()
    conn.request("GET", "/ok")
    response = conn.getresponse()
    assert response.status == 200 and response.read() == b"ok"
    traced.end()
    (span,) = traced.spans()
    check_span(span, server, server.url("/ok"))
    assert span["parent_id"] == "%016x" % tx.id


def test_low_level_api(traced, server, conn):
    traced.begin()
    conn.putrequest("POST", "/headers")
    conn.putheader("X-Mine", "1")
    conn.putheader("Content-Length", "4")
    conn.endheaders()
    conn.send(b"body")
    response = conn.getresponse()
    echoed = json.loads(response.read())
    traced.end()
    (span,) = traced.spans()
    check_span(span, server, server.url("/headers"), method="POST")
    assert echoed["traceparent"] == f"00-{span['trace_id']}-{span['id']}-03"
    names = list(echoed)
    assert names.index("x-mine") < names.index("traceparent") < names.index("content-length")


def test_request_puts_trace_headers_before_the_framing_headers(traced, server, conn):
    headers = {"X-Mine": "1"}
    traced.begin()
    conn.request("POST", "/headers", body=b"body", headers=headers)
    names = list(json.loads(conn.getresponse().read()))
    traced.end()
    # http.client itself puts Content-Length before the caller's headers.
    assert names.index("traceparent") < names.index("content-length") < names.index("x-mine")
    assert headers == {"X-Mine": "1"}


def test_keep_alive_connection_gives_one_span_per_request(traced, server, conn):
    traced.begin()
    for path in ("/ok", "/error", "/missing"):
        conn.request("GET", path)
        conn.getresponse().read()
    traced.end()
    ok, error, missing = traced.spans()
    check_span(ok, server, server.url("/ok"))
    check_span(error, server, server.url("/error"), 500, "failure")
    check_span(missing, server, server.url("/missing"), 404, "failure")


def test_secret_query_params_redacted(traced, server):
    traced.begin()
    urllib.request.urlopen(server.url("/ok?token=tok-qwz&page=2"), timeout=10).read()
    traced.end()
    (span,) = traced.spans()
    check_span(span, server, server.url("/ok?token=[REDACTED]&page=2"))
    assert "tok-qwz" not in json.dumps(span)


def test_response_closing_the_connection(traced, server, conn):
    """getresponse closes the connection itself when the response says `Connection: close`:
    the span still ends with the response's status."""
    traced.begin()
    conn.request("GET", "/close")
    response = conn.getresponse()
    assert response.will_close and response.read() == b"bye"
    traced.end()
    (span,) = traced.spans()
    check_span(span, server, server.url("/close"))


def test_https_proxy_refusing_the_tunnel(traced, server):
    """CONNECT refused (our server answers 501): http.client closes the connection and
    raises; the span names the tunnel's far end and fails."""
    conn = http.client.HTTPSConnection("127.0.0.1", server.port, timeout=10)
    conn.set_tunnel("api.example.com", 8443)
    traced.begin()
    with pytest.raises(OSError, match="Tunnel connection failed"):
        conn.request("GET", "/pay")
    traced.end()
    (span,) = traced.spans()
    assert span["name"] == "GET api.example.com:8443" and span["outcome"] == "failure"
    assert span["context"]["http"]["url"] == "https://api.example.com:8443/pay"


def test_nothing_under_another_exit_span(traced, server, conn):
    """Inside any leaf span (a library's own, e.g. an AWS SDK call) the request is that
    span's business: no span and no trace headers from here."""
    traced.begin()
    with beatlib.capture_span("S3 GetObject", "storage", "s3", "GetObject", leaf=True):
        conn.request("GET", "/headers")
        echoed = json.loads(conn.getresponse().read())
    traced.end()
    (span,) = traced.spans()
    assert span["name"] == "S3 GetObject" and "traceparent" not in echoed


def test_credentials_in_a_urllib_url_are_redacted(traced, server):
    """urllib.request hands `user:password@host` to http.client as the host (which then
    fails to resolve it): the span has the URL with the password redacted."""
    traced.begin()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://bob:hunter2@127.0.0.1:{server.port}/ok", timeout=10)
    traced.end()
    (span,) = traced.spans()
    assert span["context"]["http"]["url"] == (
        f"http://bob:[REDACTED]@127.0.0.1:{server.port}/ok")
    assert span["outcome"] == "failure" and "hunter2" not in json.dumps(span)


def test_absolute_url_with_credentials_is_redacted(traced, server, conn):
    traced.begin()
    conn.request("GET", f"http://bob:hunter2@127.0.0.1:{server.port}/ok")  # as to a proxy
    conn.getresponse().read()
    traced.end()
    (span,) = traced.spans()
    assert span["context"]["http"]["url"] == (
        f"http://bob:[REDACTED]@127.0.0.1:{server.port}/ok")


def test_urllib_request(traced, server):
    traced.begin()
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(server.url("/error"), timeout=10)
    raised.value.close()
    response = urllib.request.urlopen(server.url("/headers"), timeout=10)
    echoed = json.loads(response.read())
    traced.end()
    error, ok = traced.spans()
    check_span(error, server, server.url("/error"), 500, "failure")
    check_span(ok, server, server.url("/headers"))
    assert echoed["traceparent"] == f"00-{ok['trace_id']}-{ok['id']}-03"


def test_urllib_redirect_gives_one_span_per_hop(traced, server):
    traced.begin()
    assert urllib.request.urlopen(server.url("/redirect"), timeout=10).read() == b"ok"
    traced.end()
    first, second = traced.spans()
    check_span(first, server, server.url("/redirect"), 302)
    check_span(second, server, server.url("/ok"))


@pytest.mark.parametrize("name", ["traceparent", "Traceparent", "TRACEPARENT"])
def test_users_own_traceparent_is_kept(traced, server, conn, name):
    traced.begin()
    conn.request("GET", "/headers", headers={name: TRACEPARENT})
    echoed = json.loads(conn.getresponse().read())
    request = urllib.request.Request(server.url("/headers"), headers={name: TRACEPARENT})
    via_urllib = json.loads(urllib.request.urlopen(request, timeout=10).read())
    traced.end()
    assert echoed["traceparent"] == TRACEPARENT == via_urllib["traceparent"]


def test_connection_refused_fails_the_span(traced):
    port = free_port()
    traced.begin()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    with pytest.raises(ConnectionRefusedError):
        conn.request("GET", "/ok")
    traced.end()
    (span,) = traced.spans()
    assert span["name"] == f"GET 127.0.0.1:{port}" and span["outcome"] == "failure"


def test_the_original_exception_object_is_reraised(traced, server, conn):
    error = RuntimeError("no response for you")

    class Response(http.client.HTTPResponse):
        def begin(self):
            raise error

    conn.response_class = Response
    traced.begin()
    conn.request("GET", "/ok")
    with pytest.raises(RuntimeError) as raised:
        conn.getresponse()
    traced.end()
    assert raised.value is error
    assert traced.spans()[0]["outcome"] == "failure"


def test_streamed_body_is_not_part_of_the_span(traced, server, conn):
    traced.begin()
    conn.request("GET", "/stream")
    response = conn.getresponse()
    assert response.read() == b"".join(STREAM_CHUNKS)
    traced.end()
    (span,) = traced.spans()
    check_span(span, server, server.url("/stream"))
    # Three chunks 50 ms apart come after the headers: none of that is in the span.
    assert span["duration"] < 100


def test_response_never_asked_for(traced, server, conn):
    """A request sent and the connection closed without getresponse: the span ends there,
    outcome unknown; spans after it are recorded (it was never left active)."""
    traced.begin()
    conn.request("GET", "/ok")
    with beatlib.capture_span("after"):
        pass
    conn.close()
    traced.end()
    sent, after = traced.spans()
    check_span(sent, server, server.url("/ok"), None, "unknown")
    assert after["name"] == "after" and after["parent_id"] == sent["parent_id"]


def test_response_never_asked_for_nor_closed(traced, server, conn):
    traced.begin()
    conn.request("GET", "/ok")
    traced.end()
    (span,) = traced.spans()
    check_span(span, server, server.url("/ok"), None, "unknown")
    assert span["context"]["tags"]["unfinished"] is True


def test_response_never_read(traced, server, conn):
    traced.begin()
    conn.request("GET", "/ok")
    response = conn.getresponse()  # the body stays unread
    traced.end()
    (span,) = traced.spans()
    check_span(span, server, server.url("/ok"))
    assert response.read() == b"ok"


def test_https_and_default_ports_are_named_by_the_scheme():
    from beatlib.instrumentation.http_client import _url

    https = http.client.HTTPSConnection("example.com")
    assert _url(https, "/x") == "https://example.com/x"
    assert _url(http.client.HTTPConnection("example.com"), "/") == "http://example.com/"
    assert _url(http.client.HTTPConnection("::1", 8080), "/") == "http://[::1]:8080/"
    https.set_tunnel("api.example.com", 8443)
    assert _url(https, "/y") == "https://api.example.com:8443/y"


def test_no_second_span_under_urllib3_or_requests(traced, server):
    traced.begin()
    urllib3_response = urllib3.PoolManager().request("GET", server.url("/headers"))
    requests_response = requests.get(server.url("/headers"), timeout=10)
    traced.end()
    via_urllib3, via_requests = traced.spans()
    check_span(via_urllib3, server, server.url("/headers"))
    check_span(via_requests, server, server.url("/headers"))
    # One traceparent each, naming the library's own span.
    assert json.loads(urllib3_response.data)["traceparent"].split("-")[2] == via_urllib3["id"]
    assert requests_response.json()["traceparent"].split("-")[2] == via_requests["id"]


def test_urllib3_disabled_gives_the_http_client_span(receiver, server):
    client = beatlib.Client(service_name="t", server_url=receiver.url, flush_interval="100ms",
                            environ={})
    beatlib.instrument(Config(environ={"BEATLIB_DISABLED_INSTRUMENTATIONS": "urllib3"}))
    try:
        client.begin_transaction("test")
        assert urllib3.PoolManager().request("GET", server.url("/ok")).status == 200
        client.end_transaction("t", "success")
        assert client.flush(10)
    finally:
        beatlib.uninstrument()
        client.close(5)
    (span,) = receiver.events("span")
    check_span(span, server, server.url("/ok"))


def test_unsampled_transaction_sends_the_header_and_records_nothing(receiver, server):
    client = beatlib.Client(service_name="t", server_url=receiver.url, flush_interval="100ms",
                            transaction_sample_rate=0, environ={})
    beatlib.instrument(client.config)
    try:
        tx = client.begin_transaction("test")
        echoed = json.loads(urllib.request.urlopen(server.url("/headers"), timeout=10).read())
        client.end_transaction("t", "success")
        assert client.flush(10)
    finally:
        beatlib.uninstrument()
        client.close(5)
    assert echoed["traceparent"] == f"00-{tx.trace_id}-{tx.id:016x}-02"
    assert receiver.events("span") == []


def test_nothing_outside_a_transaction(traced, server, conn):
    conn.request("GET", "/headers")
    assert "traceparent" not in json.loads(conn.getresponse().read())
    traced.begin()
    traced.end()
    assert traced.spans() == []


def test_the_transport_is_not_traced(traced, server):
    """The transport POSTs (urllib3 over http.client) from its worker thread while a
    transaction is open here: no span for it and no trace headers on it."""
    traced.begin()
    traced.end("first")
    tx = traced.begin()
    assert traced.client.flush(10)  # "first" goes out now, during `tx`
    urllib.request.urlopen(server.url("/ok"), timeout=10).read()
    traced.end("second")
    transactions, spans, _ = traced.shipped()
    assert [t["name"] for t in transactions] == ["first", "second"]
    (span,) = spans
    assert span["transaction_id"] == "%016x" % tx.id
    requests_ = traced.receiver.requests
    assert len(requests_) >= 2
    assert not any("traceparent" in {k.lower() for k in r["headers"]} for r in requests_)


def test_uninstrument_restores_the_original(traced):
    wrapped = http.client.HTTPConnection.__dict__["getresponse"]
    assert isinstance(wrapped, wrapt.FunctionWrapper)
    beatlib.uninstrument()
    assert http.client.HTTPConnection.__dict__["getresponse"] is wrapped.__wrapped__
    beatlib.instrument(traced.client.config)
    assert isinstance(http.client.HTTPConnection.__dict__["getresponse"], wrapt.FunctionWrapper)


def test_instrument_before_import(receiver, server):
    # http.client itself is imported with beatlib's transport (urllib3); urllib.request is not.
    run_script("""
        assert "urllib.request" not in sys.modules
        import urllib.request
        client.begin_transaction("script")
        assert urllib.request.urlopen(os.environ["TARGET_URL"], timeout=10).status == 200
        client.end_transaction("before import", "success")
        assert client.close(10)
    """, receiver.url, server)
    (span,) = receiver.events("span")
    check_span(span, server, server.url("/ok"))
