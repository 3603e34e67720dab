"""grpcio: an exit span per client call, a transaction per served call, the trace carried in
the call metadata. Real servers on 127.0.0.1 (generic handlers, bytes in and out)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

import beatlib
from beatlib import context
from beatlib.instrumentation.grpc import destination
from tests.instrumentation.http_server import TRACEPARENT, free_port

SERVICE = "test.Echo"
FAILING = {b"not-found": grpc.StatusCode.NOT_FOUND, b"internal": grpc.StatusCode.INTERNAL,
           b"invalid": grpc.StatusCode.INVALID_ARGUMENT}
seen_metadata: list[dict[str, str]] = []  # what each served call was sent


def _unary(request: bytes, ctx: grpc.ServicerContext) -> bytes:
    seen_metadata.append(dict(ctx.invocation_metadata()))
    if request in FAILING:
        ctx.abort(FAILING[request], "no")
    if request == b"raise":
        raise ValueError("handler broke")
    if request == b"set-code":
        ctx.set_code(grpc.StatusCode.UNAVAILABLE)
        return b""
    return b"echo:" + request


def _stream(request: bytes, ctx: grpc.ServicerContext) -> Iterator[bytes]:
    seen_metadata.append(dict(ctx.invocation_metadata()))
    for i in range(3):
        yield b"%s-%d" % (request, i)
    if request == b"raise":
        raise RuntimeError("stream broke")


def _collect(requests: Iterator[bytes], ctx: grpc.ServicerContext) -> bytes:
    return b"+".join(requests)


def _chat(requests: Iterator[bytes], ctx: grpc.ServicerContext) -> Iterator[bytes]:
    for r in requests:
        yield r.upper()


def echo_handler() -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(_unary),
        "Stream": grpc.unary_stream_rpc_method_handler(_stream),
        "Collect": grpc.stream_unary_rpc_method_handler(_collect),
        "Chat": grpc.stream_stream_rpc_method_handler(_chat),
    })


@pytest.fixture
def echo(traced) -> Iterator[int]:
    """An echo server (made after `instrument()`, so it is traced) on 127.0.0.1: its port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((echo_handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    seen_metadata.clear()
    try:
        yield port
    finally:
        server.stop(None)


def call(channel: grpc.Channel, method: str, request: bytes = b"hi", **kwargs) -> bytes:
    return channel.unary_unary(f"/{SERVICE}/{method}")(request, timeout=10, **kwargs)


def served(transactions: list[dict]) -> list[dict]:
    return [t for t in transactions if t["type"] == "request"]


def check_span(span: dict, port: int, method: str = "Unary", outcome: str = "success") -> None:
    assert span["name"] == f"/{SERVICE}/{method}"
    assert (span["type"], span["subtype"], span["outcome"]) == ("external", "grpc", outcome)
    assert span["context"]["destination"]["address"] == "127.0.0.1"
    assert span["context"]["destination"]["port"] == port
    assert span["context"]["destination"]["service"]["resource"] == f"127.0.0.1:{port}"
    assert span["context"]["service"]["target"] == {"type": "grpc", "name": f"127.0.0.1:{port}"}


def test_unary_call_span_and_served_transaction(traced, echo):
    tx = traced.begin()
    with grpc.insecure_channel(f"127.0.0.1:{echo}") as channel:
        assert call(channel, "Unary") == b"echo:hi"
    traced.end()
    transactions, (span,), errors = traced.shipped()
    check_span(span, echo)
    assert span["parent_id"] == "%016x" % tx.id and errors == []
    (server_tx,) = served(transactions)
    assert server_tx["name"] == f"/{SERVICE}/Unary"
    assert (server_tx["result"], server_tx["outcome"]) == ("OK", "success")
    assert server_tx["trace_id"] == tx.trace_id and server_tx["parent_id"] == span["id"]
    assert seen_metadata[0]["traceparent"].split("-")[2] == span["id"]
    assert seen_metadata[0]["tracestate"] == tx.tracestate


@pytest.mark.parametrize("request_, code, server_outcome", [
    (b"not-found", "NOT_FOUND", "success"),  # the caller's doing, as the server sees it
    (b"invalid", "INVALID_ARGUMENT", "success"),
    (b"internal", "INTERNAL", "failure"),
])
def test_status_codes(traced, echo, request_, code, server_outcome):
    traced.begin()
    with grpc.insecure_channel(f"127.0.0.1:{echo}") as channel:
        with pytest.raises(grpc.RpcError) as raised:
            call(channel, "Unary", request_)
    traced.end()
    assert raised.value.code().name == code and raised.value.details() == "no"
    transactions, (span,), errors = traced.shipped()
    check_span(span, echo, outcome="failure")  # a client fails on anything but OK
    (server_tx,) = served(transactions)
    assert (server_tx["result"], server_tx["outcome"]) == (code, server_outcome)
    assert errors == []  # an abort is an answer, not an error


def test_set_code_without_abort(traced, echo):
    traced.begin()
    with grpc.insecure_channel(f"127.0.0.1:{echo}") as channel:
        with pytest.raises(grpc.RpcError) as raised:
            call(channel, "Unary", b"set-code")
    traced.end()
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    transactions, (span,), _ = traced.shipped()
    assert span["outcome"] == "failure"
    (server_tx,) = served(transactions)
    assert (server_tx["result"], server_tx["outcome"]) == ("UNAVAILABLE", "failure")


def test_handler_exception_is_captured(traced, echo):
    with grpc.insecure_channel(f"127.0.0.1:{echo}") as channel:
        with pytest.raises(grpc.RpcError) as raised:
            call(channel, "Unary", b"raise")
    assert raised.value.code() == grpc.StatusCode.UNKNOWN
    transactions, spans, (error,) = traced.shipped()
    (server_tx,) = served(transactions)
    assert (server_tx["result"], server_tx["outcome"]) == ("UNKNOWN", "failure")
    assert error["exception"]["type"] == "ValueError"
    assert error["exception"]["handled"] is False
    assert error["transaction_id"] == server_tx["id"] and spans == []


def test_streaming_calls(traced, echo):
    traced.begin()
    with grpc.insecure_channel(f"127.0.0.1:{echo}") as channel:
        stream = channel.unary_stream(f"/{SERVICE}/Stream")(b"s", timeout=10)
        assert context.get_active() is context.current_transaction()  # the caller goes on
        assert list(stream) == [b"s-0", b"s-1", b"s-2"]
        collect = channel.stream_unary(f"/{SERVICE}/Collect")
        assert collect(iter([b"a", b"b"]), timeout=10) == b"a+b"
        chat = channel.stream_stream(f"/{SERVICE}/Chat")
        assert list(chat(iter([b"x", b"y"]), timeout=10)) == [b"X", b"Y"]
    traced.end()
    transactions, spans, _ = traced.shipped()
    for span, method in zip(spans, ("Stream", "Collect", "Chat"), strict=True):
        check_span(span, echo, method)
    assert sorted(t["name"] for t in served(transactions)) == [
        f"/{SERVICE}/{m}" for m in ("Chat", "Collect", "Stream")]
    assert {t["parent_id"] for t in served(transactions)} == {s["id"] for s in spans}
    stream_span = spans[0]
    assert stream_span["duration"] > 0


def test_failing_stream(traced, echo):
    traced.begin()
    with grpc.insecure_channel(f"127.0.0.1:{echo}") as channel:
        got = []
        with pytest.raises(grpc.RpcError) as raised:
            for item in channel.unary_stream(f"/{SERVICE}/Stream")(b"raise", timeout=10):
                got.append(item)
    traced.end()
    assert got == [b"raise-0", b"raise-1", b"raise-2"]
    assert raised.value.code() == grpc.StatusCode.UNKNOWN
    transactions, (span,), (error,) = traced.shipped()
    assert span["outcome"] == "failure"
    (server_tx,) = served(transactions)
    assert (server_tx["result"], server_tx["outcome"]) == ("UNKNOWN", "failure")
    assert error["exception"]["type"] == "RuntimeError"


def test_future_ends_its_span_when_done(traced, echo):
    tx = traced.begin()
    with grpc.insecure_channel(f"127.0.0.1:{echo}") as channel:
        future = channel.unary_unary(f"/{SERVICE}/Unary").future(b"f", timeout=10)
        assert context.get_active() is tx
        assert future.result() == b"echo:f"
    traced.end()
    _, (span,), _ = traced.shipped()
    check_span(span, echo)
    assert span["parent_id"] == "%016x" % tx.id
    assert "unfinished" not in (span.get("context") or {}).get("tags", {})


def test_unavailable_server_fails_the_span(traced):
    port = free_port()
    traced.begin()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        with pytest.raises(grpc.RpcError) as raised:
            call(channel, "Unary")
    traced.end()
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    _, (span,), _ = traced.shipped()
    check_span(span, port, outcome="failure")


def test_outside_a_transaction_no_span_no_metadata(traced, echo):
    with grpc.insecure_channel(f"127.0.0.1:{echo}") as channel:
        assert call(channel, "Unary") == b"echo:hi"
    transactions, spans, _ = traced.shipped()
    assert spans == [] and "traceparent" not in seen_metadata[0]
    (server_tx,) = served(transactions)
    assert "parent_id" not in server_tx  # a trace of its own


def test_callers_traceparent_is_kept(traced, echo):
    traced.begin()
    with grpc.insecure_channel(f"127.0.0.1:{echo}") as channel:
        call(channel, "Unary", metadata=(("traceparent", TRACEPARENT), ("x-app", "1")))
    traced.end()
    transactions, (span,), _ = traced.shipped()
    assert seen_metadata[0]["traceparent"] == TRACEPARENT and seen_metadata[0]["x-app"] == "1"
    (server_tx,) = served(transactions)
    assert server_tx["trace_id"] == TRACEPARENT.split("-")[1]


def test_baggage_goes_in_the_metadata_as_it_came(traced, echo):
    baggage = "userId=alice,region=eu%2Dwest;p"
    traced.client.begin_transaction("request", TRACEPARENT, baggage)
    with grpc.insecure_channel(f"127.0.0.1:{echo}") as channel:
        call(channel, "Unary")
        call(channel, "Unary", metadata=(("baggage", "mine=1"),))  # the caller's kept
    traced.end()
    assert seen_metadata[0]["baggage"] == baggage
    assert seen_metadata[1]["baggage"] == "mine=1"
    transactions, _, _ = traced.shipped()
    assert "alice" not in repr(transactions)


def test_app_interceptors_still_run(traced, echo):
    class AddHeader(grpc.UnaryUnaryClientInterceptor):
        def intercept_unary_unary(self, continuation, details, request):
            details = details._replace(metadata=[*(details.metadata or ()), ("x-mine", "1")])
            return continuation(details, request)

    traced.begin()
    with grpc.insecure_channel(f"127.0.0.1:{echo}") as raw:
        channel = grpc.intercept_channel(raw, AddHeader())
        assert call(channel, "Unary") == b"echo:hi"
    traced.end()
    assert seen_metadata[0]["x-mine"] == "1" and "traceparent" in seen_metadata[0]
    assert len(traced.spans()) == 1


def test_disabled_and_uninstrumented(receiver):
    plain, plain_server, plain_aio = grpc.insecure_channel, grpc.server, grpc.aio.server
    client = beatlib.Client(service_name="t", server_url=receiver.url, environ={},
                            disabled_instrumentations=["grpc"])
    try:
        beatlib.instrument(client.config)
        assert grpc.insecure_channel is plain
        beatlib.uninstrument()
        beatlib.instrument(beatlib.Client(service_name="t", server_url=receiver.url,
                                          environ={}).config)
        assert grpc.insecure_channel is not plain and grpc.server is not plain_server
        assert grpc.aio.server is not plain_aio
        beatlib.uninstrument()
        assert grpc.insecure_channel is plain and grpc.server is plain_server
        assert grpc.aio.server is plain_aio
    finally:
        beatlib.uninstrument()
        client.close(5)


@pytest.mark.parametrize("target, expected", [
    ("127.0.0.1:50051", ("127.0.0.1", 50051)),
    ("localhost", ("localhost", 443)),
    ("dns:///api.example.com:8443", ("api.example.com", 8443)),
    ("dns://8.8.8.8/api.example.com", ("api.example.com", 443)),
    ("ipv4:10.0.0.1:81", ("10.0.0.1", 81)),
    ("[::1]:50051", ("::1", 50051)),
    ("unix:/tmp/sock", ("", None)),
])
def test_destination(target, expected):
    assert destination(target) == expected


SERVER_SCRIPT = textwrap.dedent("""
    import os, sys
    from concurrent import futures
    import beatlib
    client = beatlib.Client(service_name="grpc-server", server_url=os.environ["RECEIVER_URL"],
                            flush_interval="100ms", environ={})
    beatlib.instrument(client.config)
    import grpc  # after instrument(): patched on import
    from tests.instrumentation.test_grpc import echo_handler
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((echo_handler(),))
    print(server.add_insecure_port("127.0.0.1:0"), flush=True)
    server.start()
    sys.stdin.read()  # until the test closes it
    server.stop(None)
    assert client.flush(10)
""")


def test_trace_continues_in_a_server_process(traced):
    env = {**os.environ, "RECEIVER_URL": traced.receiver.url}
    proc = subprocess.Popen([sys.executable, "-c", SERVER_SCRIPT], env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            cwd=Path(__file__).parents[2])  # where `tests` imports from
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        tx = traced.begin()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert call(channel, "Unary", b"far") == b"echo:far"
        traced.end()
    finally:
        proc.communicate("", timeout=60)
    assert proc.returncode == 0
    transactions, (span,), _ = traced.shipped()
    (server_tx,) = served(transactions)
    assert server_tx["trace_id"] == tx.trace_id and server_tx["parent_id"] == span["id"]
    assert (server_tx["name"], server_tx["result"]) == (f"/{SERVICE}/Unary", "OK")


def test_secure_channel(traced):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((echo_handler(),))
    port = server.add_secure_port("127.0.0.1:0", grpc.local_server_credentials())
    server.start()
    try:
        tx = traced.begin()
        credentials = grpc.local_channel_credentials()
        with grpc.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
            assert call(channel, "Unary", b"tls") == b"echo:tls"
        traced.end()
    finally:
        server.stop(None)
    transactions, (span,), _ = traced.shipped()
    check_span(span, port)
    (server_tx,) = served(transactions)
    assert server_tx["trace_id"] == tx.trace_id and server_tx["parent_id"] == span["id"]


def test_unsampled_transaction_sends_its_decision(receiver, echo):
    client = beatlib.Client(service_name="t", server_url=receiver.url, environ={},
                            transaction_sample_rate=0.0)  # the default client while it lives
    try:
        tx = client.begin_transaction("test")
        with grpc.insecure_channel(f"127.0.0.1:{echo}") as channel:
            assert call(channel, "Unary") == b"echo:hi"
        client.end_transaction("test", "success")
        assert client.flush(10)
    finally:
        client.close(5)
        context.set_active(None)
    assert seen_metadata[0]["traceparent"] == f"00-{tx.trace_id}-{tx.id:016x}-02"
    assert receiver.events("span") == []


def test_channel_made_before_instrument_traced_through_intercept_channel(traced, echo):
    beatlib.uninstrument()
    raw = grpc.insecure_channel(f"127.0.0.1:{echo}")
    beatlib.instrument(traced.client.config)
    try:
        traced.begin()
        assert call(raw, "Unary", b"raw") == b"echo:raw"  # as it was made: untraced
        channel = grpc.intercept_channel(raw)
        assert call(channel, "Unary") == b"echo:hi"
        mine = grpc.intercept_channel(grpc.insecure_channel(f"127.0.0.1:{echo}"))
        assert call(mine, "Unary") == b"echo:hi"  # made since: traced as before
        traced.end()
    finally:
        raw.close()
    _, spans, _ = traced.shipped()
    assert len(spans) == 2
    for span in spans:
        check_span(span, echo)
    assert ["traceparent" in m for m in seen_metadata] == [False, True, True]
