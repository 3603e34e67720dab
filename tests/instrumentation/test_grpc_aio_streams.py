"""grpc.aio streaming calls: an exit span per call on the client, a transaction per served
call, for every handler style (async generators, `context.read`/`write`). Real asyncio
servers and channels on 127.0.0.1 (generic handlers, bytes in and out)."""

from __future__ import annotations

import asyncio
import gc

import grpc
import pytest
from packaging.version import Version

import beatlib
from beatlib import context

SERVICE = "test.AioStreams"
# Older grpc.aio changes what an intercepted stream's read() does at its end: no interceptor.
CLIENT_STREAMS_TRACED = Version(grpc.__version__) >= Version("1.65")
client_streams_traced = pytest.mark.skipif(not CLIENT_STREAMS_TRACED,
                                           reason="grpcio < 1.65: client streams untraced")
seen_metadata: list[dict[str, str]] = []
handler_stopped: list[str] = []  # the handlers' finally blocks, as they run


async def _numbers(request: bytes, ctx: grpc.aio.ServicerContext):
    """b"<name>:<n>" -> n messages; "raise" fails after two, "slow" waits between them."""
    seen_metadata.append(dict(ctx.invocation_metadata()))
    name, _, count = request.partition(b":")
    try:
        for i in range(int(count or 3)):
            with beatlib.capture_span(f"make {i}", "app"):  # the handler's own work
                if name == b"slow":
                    await asyncio.sleep(0.05)
            if name == b"raise" and i == 2:
                raise RuntimeError("stream broke")
            yield b"%s-%d" % (name, i)
    finally:
        handler_stopped.append(name.decode())


async def _written(request: bytes, ctx: grpc.aio.ServicerContext) -> None:
    seen_metadata.append(dict(ctx.invocation_metadata()))
    for i in range(3):
        with beatlib.capture_span("write", "app"):
            await ctx.write(b"w%d" % i)
    if request == b"abort":
        await ctx.abort(grpc.StatusCode.FAILED_PRECONDITION, "no")


async def _collect(requests, ctx: grpc.aio.ServicerContext) -> bytes:
    seen_metadata.append(dict(ctx.invocation_metadata()))
    return b"+".join([r async for r in requests])


async def _read_collect(requests, ctx: grpc.aio.ServicerContext) -> bytes:
    got = []
    while (message := await ctx.read()) is not grpc.aio.EOF:
        got.append(message)
    return b"+".join(got)


async def _chat(requests, ctx: grpc.aio.ServicerContext):
    async for r in requests:
        yield r.upper()


async def _read_write_chat(requests, ctx: grpc.aio.ServicerContext) -> None:
    while (message := await ctx.read()) is not grpc.aio.EOF:
        await ctx.write(message[::-1])


def run(body):
    """Run `body(channel)` on a fresh loop against an asyncio server, both made after
    instrument()."""
    async def main():
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
            "Numbers": grpc.unary_stream_rpc_method_handler(_numbers),
            "Written": grpc.unary_stream_rpc_method_handler(_written),
            "Collect": grpc.stream_unary_rpc_method_handler(_collect),
            "ReadCollect": grpc.stream_unary_rpc_method_handler(_read_collect),
            "Chat": grpc.stream_stream_rpc_method_handler(_chat),
            "ReadWriteChat": grpc.stream_stream_rpc_method_handler(_read_write_chat),
        }),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                return await body(channel), port
        finally:
            await server.stop(None)

    seen_metadata.clear()
    handler_stopped.clear()
    return asyncio.run(main())


def method(name: str) -> str:
    return f"/{SERVICE}/{name}"


def served(transactions):
    return {t["name"]: t for t in transactions if t["type"] == "request"}


def exits(spans):
    return [s for s in spans if s["type"] == "external"]


async def requests(*messages: bytes):
    for m in messages:
        yield m


@client_streams_traced
def test_every_kind_and_style_traced_across(traced):
    async def body(channel):
        tx = traced.begin()
        got = [
            [m async for m in channel.unary_stream(method("Numbers"))(b"n:3", timeout=10)],
            [m async for m in channel.unary_stream(method("Written"))(b"", timeout=10)],
            await channel.stream_unary(method("Collect"))(requests(b"a", b"b"), timeout=10),
            await channel.stream_unary(method("ReadCollect"))(requests(b"c", b"d"), timeout=10),
            [m async for m in channel.stream_stream(method("Chat"))(requests(b"x"), timeout=10)],
        ]
        chat = channel.stream_stream(method("ReadWriteChat"))(timeout=10)  # the write style
        await chat.write(b"ab")
        got.append(await chat.read())
        await chat.done_writing()
        got.append(await chat.read())
        assert context.get_active() is tx  # no span of a call left active in the caller
        traced.end()
        return tx

    tx, port = run(body)
    transactions, spans, errors = traced.shipped()
    names = ("Numbers", "Written", "Collect", "ReadCollect", "Chat", "ReadWriteChat")
    calls = exits(spans)
    assert [s["name"] for s in calls] == [method(n) for n in names] and errors == []
    for span in calls:
        assert (span["subtype"], span["outcome"], span["parent_id"]) == (
            "grpc", "success", "%016x" % tx.id)
        assert span["context"]["service"]["target"] == {"type": "grpc",
                                                        "name": f"127.0.0.1:{port}"}
    by_name = served(transactions)
    assert set(by_name) == {method(n) for n in names}
    for span in calls:
        server_tx = by_name[span["name"]]
        assert server_tx["trace_id"] == tx.trace_id and server_tx["parent_id"] == span["id"]
        assert (server_tx["result"], server_tx["outcome"]) == ("OK", "success")
    assert [m["traceparent"].split("-")[2] for m in seen_metadata] == [
        s["id"] for s in calls[:3]]
    # The handler's own spans sit in its transaction, each under it.
    for name, work in (("Numbers", ["make 0", "make 1", "make 2"]), ("Written", ["write"] * 3)):
        server_tx = by_name[method(name)]
        mine = [s for s in spans if s["transaction_id"] == server_tx["id"]]
        assert [s["name"] for s in mine] == work
        assert {s["parent_id"] for s in mine} == {server_tx["id"]}


@client_streams_traced
def test_stream_span_lasts_until_the_last_message(traced):
    async def body(channel):
        traced.begin()
        stream = channel.unary_stream(method("Numbers"))(b"slow:4", timeout=10)
        got = [m async for m in stream]
        traced.end()
        return got

    got, _ = run(body)
    assert got == [b"slow-0", b"slow-1", b"slow-2", b"slow-3"]
    transactions, spans, _ = traced.shipped()
    (span,) = exits(spans)
    assert span["duration"] >= 200 and span["outcome"] == "success"
    assert served(transactions)[method("Numbers")]["duration"] >= 200


@client_streams_traced
def test_handler_raising_mid_stream(traced):
    async def body(channel):
        traced.begin()
        got = []
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async for m in channel.unary_stream(method("Numbers"))(b"raise:5", timeout=10):
                got.append(m)
        traced.end()
        return got, raised.value.code()

    (got, code), _ = run(body)
    assert got == [b"raise-0", b"raise-1"] and code == grpc.StatusCode.UNKNOWN
    transactions, spans, (error,) = traced.shipped()
    (span,) = exits(spans)
    assert span["outcome"] == "failure"
    server_tx = served(transactions)[method("Numbers")]
    assert (server_tx["result"], server_tx["outcome"]) == ("UNKNOWN", "failure")
    assert error["exception"]["type"] == "RuntimeError" and error["exception"]["handled"] is False
    assert error["transaction_id"] == server_tx["id"]


@client_streams_traced
def test_abort_in_a_written_stream(traced):
    async def body(channel):
        traced.begin()
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            [m async for m in channel.unary_stream(method("Written"))(b"abort", timeout=10)]
        traced.end()
        return raised.value.code()

    code, _ = run(body)
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    transactions, spans, errors = traced.shipped()
    assert exits(spans)[0]["outcome"] == "failure" and errors == []
    server_tx = served(transactions)[method("Written")]
    assert (server_tx["result"], server_tx["outcome"]) == ("FAILED_PRECONDITION", "failure")


@client_streams_traced
def test_client_cancels_mid_stream(traced):
    async def body(channel):
        traced.begin()
        stream = channel.unary_stream(method("Numbers"))(b"slow:50", timeout=10)
        assert await stream.read() == b"slow-0"
        stream.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stream.read()
        await asyncio.sleep(0.3)  # the server sees the cancel
        traced.end()
        return await stream.code()

    code, _ = run(body)
    assert code == grpc.StatusCode.CANCELLED
    transactions, spans, errors = traced.shipped()
    (span,) = exits(spans)
    assert span["outcome"] == "failure" and span["duration"] < 1000
    assert "unfinished" not in span["context"].get("tags", {})
    server_tx = served(transactions)[method("Numbers")]
    assert server_tx["result"] == "CANCELLED"  # the caller's doing: not the server failing
    assert server_tx["outcome"] == "success" and errors == []
    assert handler_stopped == ["slow"]  # the handler's generator was closed, not left open


@client_streams_traced
def test_deadline_exceeded(traced):
    async def body(channel):
        traced.begin()
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            [m async for m in channel.unary_stream(method("Numbers"))(b"slow:50", timeout=0.2)]
        await asyncio.sleep(0.3)
        traced.end()
        return raised.value.code()

    code, _ = run(body)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    transactions, spans, errors = traced.shipped()
    (span,) = exits(spans)
    assert span["outcome"] == "failure" and 150 <= span["duration"] < 2000
    server_tx = served(transactions)[method("Numbers")]
    assert (server_tx["result"], server_tx["outcome"]) == ("DEADLINE_EXCEEDED", "failure")
    assert errors == []


@pytest.mark.parametrize(("remaining", "code"), [
    (None, "CANCELLED"), (5.0, "CANCELLED"), (0.05, "DEADLINE_EXCEEDED"),
    (0.0, "DEADLINE_EXCEEDED"), (-1.0, "DEADLINE_EXCEEDED")])
def test_a_cancel_at_the_callers_deadline_is_the_deadline(remaining, code):
    # The server's deadline starts after the caller's: a caller giving up at its deadline
    # cancels while the server has about the transit time left (a race on a busy machine).
    from types import SimpleNamespace

    from beatlib.instrumentation import grpc_aio

    inst = SimpleNamespace(grpc=grpc)  # what _stopped_code reads of the instrumentation

    class Context:
        def time_remaining(self):
            return remaining

    assert grpc_aio._stopped_code(inst, Context(), asyncio.CancelledError()) == getattr(
        grpc.StatusCode, code)
    assert grpc_aio._stopped_code(inst, Context(), ValueError()) is None


@client_streams_traced
@pytest.mark.parametrize("ended_by", ["deadline", "channel closed"])
def test_app_stops_reading_and_drops_the_call(traced, ended_by):
    # The span ends when the call does: at its deadline or when its channel is closed, or
    # sooner where grpc cancels a dropped call when it is collected (1.65 does, 1.85 not).
    async def body(channel):
        traced.begin()
        timeout = 0.5 if ended_by == "deadline" else 30
        stream = channel.unary_stream(method("Numbers"))(b"n:3", timeout=timeout)
        assert await stream.read() == b"n-0"
        del stream  # never read again, never cancelled
        gc.collect()
        if ended_by == "deadline":
            await asyncio.sleep(2.5)  # well past the deadline: its end is the call's, not ours
        else:
            await channel.close()
        traced.end()

    run(body)
    _, spans, _ = traced.shipped()
    (span,) = exits(spans)
    assert span["outcome"] == "failure"
    assert "unfinished" not in span["context"].get("tags", {})
    if ended_by == "deadline":
        assert span["duration"] < 2000  # 0.5 s and a loaded machine's delay, not the 2.5 s


@client_streams_traced
def test_gathered_streams_keep_their_own_parents(traced):
    async def one(channel, n):
        with beatlib.capture_span(f"caller {n}", "app"):
            stream = channel.unary_stream(method("Numbers"))(b"slow:%d" % (n + 2), timeout=10)
            return [m async for m in stream]

    async def body(channel):
        traced.begin()
        got = await asyncio.gather(*(one(channel, n) for n in range(3)))
        assert context.get_active() is context.current_transaction()
        traced.end()
        return got

    got, _ = run(body)
    assert [len(g) for g in got] == [2, 3, 4]
    transactions, spans, _ = traced.shipped()
    callers = {s["id"]: s["name"] for s in spans if s["name"].startswith("caller")}
    calls = exits(spans)
    assert sorted(callers[s["parent_id"]] for s in calls) == ["caller 0", "caller 1", "caller 2"]
    by_id = {t["parent_id"]: t for t in transactions if t["type"] == "request"}
    for call in calls:  # each served call continues its own caller, and holds its own work
        server_tx = by_id[call["id"]]
        count = int(callers[call["parent_id"]][-1]) + 2
        mine = [s for s in spans if s["transaction_id"] == server_tx["id"]]
        assert [s["name"] for s in mine] == [f"make {i}" for i in range(count)]
        assert {s["parent_id"] for s in mine} == {server_tx["id"]}


def test_outside_a_transaction_served_but_no_span(traced):
    async def body(channel):
        return [m async for m in channel.unary_stream(method("Numbers"))(b"n:2", timeout=10)]

    got, _ = run(body)
    assert got == [b"n-0", b"n-1"]
    transactions, spans, _ = traced.shipped()
    assert exits(spans) == [] and "traceparent" not in seen_metadata[0]
    assert "parent_id" not in served(transactions)[method("Numbers")]


def test_read_past_the_end_returns_eof_as_without_beatlib(traced):
    async def body(channel):
        traced.begin()
        stream = channel.unary_stream(method("Numbers"))(b"n:1", timeout=10)
        got = [await stream.read(), await stream.read(), await stream.read()]
        traced.end()
        return got

    got, _ = run(body)
    assert got == [b"n-0", grpc.aio.EOF, grpc.aio.EOF]
    _, spans, _ = traced.shipped()
    assert len(exits(spans)) == (1 if CLIENT_STREAMS_TRACED else 0)
