"""grpc.aio: unary-unary calls as exit spans, served unary-unary calls as transactions
(streaming calls: test_grpc_aio_streams.py)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from beatlib import context
from tests.instrumentation.test_grpc_aio_streams import CLIENT_STREAMS_TRACED

SERVICE = "test.AioEcho"
seen_metadata: list[dict[str, str]] = []


async def _unary(request: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
    seen_metadata.append(dict(ctx.invocation_metadata()))
    if request == b"internal":
        await ctx.abort(grpc.StatusCode.INTERNAL, "no")
    if request == b"not-found":
        await ctx.abort(grpc.StatusCode.NOT_FOUND, "no")
    if request == b"raise":
        raise ValueError("handler broke")
    return b"echo:" + request


async def _stream(request: bytes, ctx: grpc.aio.ServicerContext):
    for i in range(2):
        yield b"%d" % i


def run(traced, body):
    """Run `body(port)` on a fresh loop with an asyncio echo server made after instrument()."""
    async def main():
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
            "Unary": grpc.unary_unary_rpc_method_handler(_unary),
            "Stream": grpc.unary_stream_rpc_method_handler(_stream),
        }),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            return await body(port)
        finally:
            await server.stop(None)

    seen_metadata.clear()
    return asyncio.run(main())


def served(transactions):
    return [t for t in transactions if t["type"] == "request"]


def test_unary_call_and_served_transaction(traced):
    async def body(port):
        tx = traced.begin()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert await channel.unary_unary(f"/{SERVICE}/Unary")(b"hi", timeout=10) == b"echo:hi"
            assert context.get_active() is tx
        traced.end()
        return tx

    tx = run(traced, body)
    transactions, (span,), errors = traced.shipped()
    assert span["name"] == f"/{SERVICE}/Unary" and span["parent_id"] == "%016x" % tx.id
    assert (span["type"], span["subtype"], span["outcome"]) == ("external", "grpc", "success")
    assert span["context"]["service"]["target"]["name"].startswith("127.0.0.1:")
    (server_tx,) = served(transactions)
    assert server_tx["trace_id"] == tx.trace_id and server_tx["parent_id"] == span["id"]
    assert (server_tx["name"], server_tx["result"], server_tx["outcome"]) == (
        f"/{SERVICE}/Unary", "OK", "success")
    assert seen_metadata[0]["traceparent"].split("-")[2] == span["id"] and errors == []


@pytest.mark.parametrize("request_, code, outcome, error", [
    (b"not-found", "NOT_FOUND", "success", None),
    (b"internal", "INTERNAL", "failure", None),
    (b"raise", "UNKNOWN", "failure", "ValueError"),
])
def test_status_codes(traced, request_, code, outcome, error):
    async def body(port):
        traced.begin()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await channel.unary_unary(f"/{SERVICE}/Unary")(request_, timeout=10)
        traced.end()
        return raised.value.code().name

    assert run(traced, body) == code
    transactions, (span,), errors = traced.shipped()
    assert span["outcome"] == "failure"
    (server_tx,) = served(transactions)
    assert (server_tx["result"], server_tx["outcome"]) == (code, outcome)
    assert [e["exception"]["type"] for e in errors] == ([error] if error else [])


def test_app_interceptors_still_run(traced):
    class AddHeader(grpc.aio.UnaryUnaryClientInterceptor):
        async def intercept_unary_unary(self, continuation, details, request):
            metadata = grpc.aio.Metadata(*(details.metadata or ()), ("x-mine", "1"))
            details = grpc.aio.ClientCallDetails(details.method, details.timeout, metadata,
                                                 details.credentials, details.wait_for_ready)
            return await continuation(details, request)

    async def body(port):
        traced.begin()
        target = f"127.0.0.1:{port}"
        async with grpc.aio.insecure_channel(target, None, None, [AddHeader()]) as channel:
            assert await channel.unary_unary(f"/{SERVICE}/Unary")(b"x", timeout=10) == b"echo:x"
            stream = channel.unary_stream(f"/{SERVICE}/Stream")(b"", timeout=10)
            assert [m async for m in stream] == [b"0", b"1"]
        traced.end()

    run(traced, body)
    assert seen_metadata[0]["x-mine"] == "1" and "traceparent" in seen_metadata[0]
    transactions, spans, _ = traced.shipped()
    streams = [f"/{SERVICE}/Stream"] if CLIENT_STREAMS_TRACED else []
    assert [s["name"] for s in spans] == [f"/{SERVICE}/Unary", *streams]
    assert sorted(t["name"] for t in served(transactions)) == [
        f"/{SERVICE}/Stream", f"/{SERVICE}/Unary"]
