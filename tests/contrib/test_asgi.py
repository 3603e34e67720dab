"""BeatMiddleware around plain ASGI 3 apps, driven message by message: what the app gets
is what the server gave, transactions end with the last byte sent, disconnections are
recorded as such, lifespan and (by default) websockets pass untouched, beatlib's own
failures never reach the app."""

from __future__ import annotations

import asyncio

import pytest

import beatlib
from beatlib import context
from beatlib.contrib.asgi import BeatMiddleware

PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def http_scope(path="/orders/7", method="GET", headers=(), **extra):
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1", "method": method, "scheme": "https", "path": path,
        "raw_path": path.encode(), "query_string": b"page=2", "root_path": "",
        "headers": [(b"host", b"shop.test:8443"), *headers],
        "client": ("10.0.0.9", 50123), "server": ("10.0.0.1", 8443),
    }
    scope.update(extra)
    return scope


async def drive(app, scope, inbound=(), wait_after=None):
    """Run `app` like a server: `inbound` messages to receive (then it waits, or gets a
    disconnect once the response is complete); returns what the app sent and received."""
    inbound = list(inbound)
    sent, received = [], []
    complete = asyncio.Event()

    async def receive():
        if inbound:
            message = inbound.pop(0)
        else:
            await (wait_after or complete).wait()
            message = {"type": "http.disconnect"}
        received.append(message)
        return message

    async def send(message):
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            complete.set()

    await app(scope, receive, send)
    return sent, received


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def client(receiver):
    made = []

    def make(**settings):
        c = beatlib.Client(server_url=receiver.url, environ={}, **settings)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close(5)
    beatlib.uninstrument()
    context.set_active(None)


def flushed(receiver, c, kind="transaction"):
    assert c.flush(5)
    return receiver.events(kind)


async def hello(scope, receive, send):
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"x-thing", b"1")]})
    await send({"type": "http.response.body", "body": b"hello"})


def test_a_request_is_one_transaction_with_the_context_wsgi_records(client, receiver):
    c = client()
    scope = http_scope(headers=[(b"traceparent", PARENT.encode()), (b"x-forwarded-for", b"1.2.3.4"),
                                (b"accept", b"text/html"), (b"accept", b"*/*"),
                                (b"authorization", b"Bearer s3cr3t")])
    sent, _ = run(drive(BeatMiddleware(hello, c), scope))
    assert sent[1]["body"] == b"hello"
    (tx,) = flushed(receiver, c)
    assert tx["name"] == "GET" and tx["result"] == "HTTP 2xx" and tx["outcome"] == "success"
    assert tx["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    request = tx["context"]["request"]
    assert request["url"] == {"full": "https://shop.test:8443/orders/7?page=2",
                              "protocol": "https:", "hostname": "shop.test", "port": 8443,
                              "pathname": "/orders/7", "search": "?page=2"}
    assert request["socket"] == {"remote_address": "10.0.0.9"}
    assert request["headers"]["Accept"] == "text/html, */*"  # repeated: joined, as in WSGI
    assert request["headers"]["Authorization"] == "[REDACTED]"
    assert request["headers"]["X-Forwarded-For"] == "1.2.3.4"
    assert tx["context"]["response"] == {
        "status_code": 200, "finished": True, "headers_sent": True,
        "headers": {"content-type": "text/plain", "x-thing": "1"}}


def test_a_non_ascii_path_is_recorded_as_sent(client, receiver):
    c = client()
    run(drive(BeatMiddleware(hello, c), http_scope(path="/caf\u00e9/\u65e5\u672c")))
    (tx,) = flushed(receiver, c)
    assert tx["context"]["request"]["url"]["pathname"] == "/caf\u00e9/\u65e5\u672c"
    assert tx["context"]["request"]["url"]["full"].startswith(
        "https://shop.test:8443/caf%C3%A9/%E6%97%A5%E6%9C%AC")


def test_the_app_receives_the_body_as_the_server_sent_it(client, receiver):
    """capture_body reads nothing ahead: the app gets every message, in its pieces."""
    c = client(capture_body="all")
    got = []

    async def echo(scope, receive, send):
        while True:
            message = await receive()
            got.append(message)
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body",
                    "body": b"".join(m["body"] for m in got)})

    inbound = [{"type": "http.request", "body": b'{"user": "ann", ', "more_body": True},
               {"type": "http.request", "body": b'"password": "x"}', "more_body": False}]
    headers = [(b"content-type", b"application/json"), (b"content-length", b"32")]
    sent, _ = run(drive(BeatMiddleware(echo, c), http_scope(method="POST", headers=headers),
                        [dict(m) for m in inbound]))
    assert got == inbound
    assert sent[1]["body"] == b'{"user": "ann", "password": "x"}'
    (tx,) = flushed(receiver, c)
    assert tx["context"]["request"]["body"] == {"user": "ann", "password": "[REDACTED]"}


def test_a_body_longer_than_the_limit_is_noted_by_its_size(client, receiver):
    c = client(capture_body="all")
    size = 70 * 1024

    async def read_all(scope, receive, send):
        while (await receive()).get("more_body"):
            pass
        await hello(scope, receive, send)

    inbound = [{"type": "http.request", "body": b"x" * (size // 2), "more_body": True},
               {"type": "http.request", "body": b"x" * (size // 2)}]
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(size).encode())]
    run(drive(BeatMiddleware(read_all, c), http_scope(method="POST", headers=headers), inbound))
    (tx,) = flushed(receiver, c)
    assert tx["context"]["request"]["body"] == f"[body of {size} bytes not recorded]"


def test_a_streamed_response_ends_with_its_last_chunk_not_with_the_app(client, receiver):
    c = client()

    async def streaming(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(3):
            with beatlib.capture_span("chunk"):
                await asyncio.sleep(0.05)
            await send({"type": "http.response.body", "body": b"x", "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        await asyncio.sleep(0.5)  # cleanup after the response: not the client's wait

    run(drive(BeatMiddleware(streaming, c), http_scope()))
    (tx,) = flushed(receiver, c)
    assert 150 <= tx["duration"] < 450
    spans = flushed(receiver, c, "span")
    assert len(spans) == 3 and {s["transaction_id"] for s in spans} == {tx["id"]}


def test_a_response_with_trailers_ends_after_them(client, receiver):
    c = client()

    async def with_trailers(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [],
                    "trailers": True})
        await send({"type": "http.response.body", "body": b"x"})
        await asyncio.sleep(0.2)
        await send({"type": "http.response.trailers", "headers": [(b"x-sum", b"1")]})

    run(drive(BeatMiddleware(with_trailers, c), http_scope()))
    (tx,) = flushed(receiver, c)
    assert tx["duration"] >= 200 and tx["result"] == "HTTP 2xx"


def test_a_client_gone_before_the_response_is_a_disconnection_not_an_error(client, receiver):
    c = client()

    async def waits_for_body(scope, receive, send):
        message = await receive()
        assert message["type"] == "http.disconnect"  # the client left: nothing to answer

    inbound = [{"type": "http.disconnect"}]
    run(drive(BeatMiddleware(waits_for_body, c), http_scope(method="POST"), inbound))
    (tx,) = flushed(receiver, c)
    assert tx["outcome"] == "unknown" and tx["result"] == "HTTP 4xx"
    assert tx["context"]["tags"]["client_disconnected"] is True
    assert tx["context"]["response"] == {"status_code": 499, "finished": False,
                                         "headers_sent": False}
    assert flushed(receiver, c, "error") == []


def test_a_client_gone_in_the_middle_of_a_stream(client, receiver):
    c = client()

    class ClientDisconnect(Exception):  # as Starlette names what it raises then
        pass

    async def stream(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x", "more_body": True})
        if (await receive())["type"] == "http.disconnect":
            raise ClientDisconnect()

    gone = asyncio.Event()
    gone.set()
    with pytest.raises(ClientDisconnect):
        run(drive(BeatMiddleware(stream, c), http_scope(), wait_after=gone))
    (tx,) = flushed(receiver, c)
    assert tx["outcome"] == "unknown" and tx["result"] == "HTTP 2xx"
    assert tx["context"]["response"]["finished"] is False
    assert tx["context"]["response"]["headers_sent"] is True
    assert tx["context"]["tags"]["client_disconnected"] is True
    assert flushed(receiver, c, "error") == []


def test_an_exception_reaches_the_server_unchanged_and_is_captured_once(client, receiver):
    c = client()
    boom = KeyError("no such order")

    async def failing(scope, receive, send):
        raise boom

    with pytest.raises(KeyError) as raised:
        run(drive(BeatMiddleware(BeatMiddleware(failing, c), c), http_scope()))
    assert raised.value is boom
    (tx,) = flushed(receiver, c)
    (error,) = flushed(receiver, c, "error")
    assert tx["result"] == "HTTP 5xx" and tx["outcome"] == "failure"
    assert error["transaction_id"] == tx["id"] and error["exception"]["type"] == "KeyError"


def test_lifespan_passes_untouched_and_shutdown_sends_what_is_queued(client, receiver):
    c = client()
    seen, forwarded = [], []

    async def app(scope, receive, send):
        seen.append((scope, receive))
        assert (await receive())["type"] == "lifespan.startup"
        await send({"type": "lifespan.startup.complete"})
        assert (await receive())["type"] == "lifespan.shutdown"
        c.capture_message("cleaning up")  # queued during the app's own shutdown
        await send({"type": "lifespan.shutdown.complete"})

    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    inbound = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]

    async def receive():
        return inbound.pop(0)

    async def send(message):
        # What the server sees, and whether the error had been sent before it saw it.
        forwarded.append((dict(message), len(receiver.events("error"))))

    run(BeatMiddleware(app, c)(scope, receive, send))
    assert seen == [(scope, receive)]
    assert scope == {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    assert forwarded == [({"type": "lifespan.startup.complete"}, 0),
                         ({"type": "lifespan.shutdown.complete"}, 1)]
    assert flushed(receiver, c) == []


def websocket_scope():
    scope = http_scope(path="/chat", type="websocket", scheme="wss", subprotocols=[])
    del scope["method"]
    return scope


async def chat(scope, receive, send):
    assert (await receive())["type"] == "websocket.connect"
    await send({"type": "websocket.accept"})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        with beatlib.capture_span("message"):
            await send({"type": "websocket.send", "text": message["text"]})


WS_INBOUND = [{"type": "websocket.connect"}, {"type": "websocket.receive", "text": "hi"},
              {"type": "websocket.disconnect", "code": 1001}]


def test_websockets_pass_untouched_by_default(client, receiver):
    c = client()
    seen = []

    async def app(scope, receive, send):
        seen.append((receive, send))

    async def receive():
        return {}

    async def send(message):
        pass

    run(BeatMiddleware(app, c)(websocket_scope(), receive, send))
    assert seen == [(receive, send)]
    sent, _ = run(drive(BeatMiddleware(chat, c), websocket_scope(), list(WS_INBOUND)))
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.send"]
    assert flushed(receiver, c) == []


def test_a_websocket_connection_is_one_transaction_when_asked(client, receiver):
    c = client()
    sent, _ = run(drive(BeatMiddleware(chat, c, websockets=True), websocket_scope(),
                        list(WS_INBOUND)))
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.send"]
    (tx,) = flushed(receiver, c)
    assert tx["type"] == "websocket" and tx["name"] == "WEBSOCKET"
    assert tx["context"]["response"]["status_code"] == 101
    assert tx["context"]["tags"]["websocket_close_code"] == 1001
    assert tx["context"]["request"]["url"]["full"] == "wss://shop.test:8443/chat?page=2"
    (span,) = flushed(receiver, c, "span")
    assert span["transaction_id"] == tx["id"]


def test_beatlib_failing_on_a_strange_scope_leaves_the_request_alone(client, receiver):
    c = client()
    scope = http_scope(headers=[("not", "bytes")])  # no server sends this; we must not care
    sent, _ = run(drive(BeatMiddleware(hello, c), scope))
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert flushed(receiver, c) == []
    assert c.stats()["internal_errors"] >= 1


def test_ignored_urls_are_not_traced(client, receiver):
    c = client(transaction_ignore_urls="/health*")
    app = BeatMiddleware(hello, c)
    run(drive(app, http_scope(path="/healthz")))
    run(drive(app, http_scope(path="/orders/1")))
    assert [t["context"]["request"]["url"]["pathname"]
            for t in flushed(receiver, c)] == ["/orders/1"]


def test_a_full_queue_drops_and_never_waits_on_the_event_loop(client, receiver):
    """The APM server takes requests and never answers: the queue fills up, and the event
    loop running the requests drops events rather than waiting for beatlib's worker (a plain
    thread waits a little, see the transport's backpressure)."""
    receiver.hang(5)
    c = client(max_queue_events=100)
    app = BeatMiddleware(hello, c)

    async def many():
        for _ in range(3000):
            await drive(app, http_scope())

    run(many())
    stats = c.stats()
    assert stats["dropped_queue_full"] > 0 and stats["backpressure_waits"] == 0
    receiver.behave()
    c.close(0.5)


@pytest.mark.parametrize("make, error", [
    (lambda: KeyError("x"), True),
    (lambda: type("HTTPException", (Exception,), {"status_code": 404})(), False),
    (lambda: type("HTTPException", (Exception,), {"status_code": 503})(), True),
    (lambda: type("RequestValidationError", (ValueError,), {})(), False),
    (lambda: type("WebSocketException", (Exception,), {"code": 1008})(), False),
    (lambda: type("WebSocketException", (Exception,), {"code": 1011})(), True),
    (lambda: type("ClientDisconnect", (Exception,), {})(), False),
    (lambda: asyncio.CancelledError(), False),
])
def test_the_error_rule(make, error):
    from beatlib.contrib.asgi import is_error

    assert is_error(make()) is error


def test_a_served_request_leaves_no_cycle_for_the_garbage_collector(client, receiver):
    """The scope (and what the app put in it) is freed when the server lets go of it, as
    without beatlib: the request in the scope does not hold the scope in turn."""
    import gc
    import weakref

    class Probe:
        pass

    c = client()
    app = BeatMiddleware(hello, c)
    scope = http_scope()
    probe = Probe()
    scope["probe"] = probe
    gone = weakref.ref(probe)
    del probe
    gc.disable()
    try:
        run(drive(app, scope))
        del scope
        assert gone() is None
    finally:
        gc.enable()
    (tx,) = flushed(receiver, c)
    assert tx["name"] == "GET" and tx["context"]["response"]["status_code"] == 200
