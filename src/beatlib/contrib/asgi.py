"""ASGI: `BeatMiddleware` for any ASGI 3 app (Starlette and FastAPI: `app.add_middleware`).

One transaction per HTTP request (and per websocket connection, when asked), built on what
the WSGI integration shares: the scope is read as a WSGI environ would be, so the request
context, ignored URLs, trace continuation, body rules, result and errors are the same.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.metadata
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from contextvars import ContextVar
from typing import Any

from beatlib.client import Client, get_client
from beatlib.context import get_active, set_active
from beatlib.contrib.wsgi import (
    begin_request,
    body_to_keep,
    body_value,
    capture_request_error,
    request_context,
    settle,
)
from beatlib.guard import guard, report
from beatlib.instrumentation.registry import instrument
from beatlib.tracing import Transaction, parse_traceparent

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

STATE = "beatlib.request"  # scope key: the `Request` being traced (frameworks find it there)
current_request: ContextVar[Request | None] = ContextVar("beatlib_asgi_request", default=None)

_END = guard("asgi: ending the request's transaction")
_RECORD_PLACE = "asgi: recording a message of the request"
_SHUTDOWN = guard("asgi: sending what is queued at shutdown")
# Not the app's errors: the client went away (Starlette's ClientDisconnect, a failed send).
_DISCONNECTS = frozenset({"ClientDisconnect", "CancelledError"})
# A framework's answer to a bad request (FastAPI's 422), like an HTTP exception below 500.
_CLIENT_ERRORS = frozenset({"RequestValidationError", "WebSocketRequestValidationError"})


def is_error(exc: BaseException) -> bool:
    """The one rule: an exception the app raised is an error whatever answered it; HTTP
    exceptions below 500 (Starlette's and FastAPI's `HTTPException`, validation errors
    answered with a 422), websocket closes other than 1011 (`WebSocketException`) and a
    client's going away are not."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    if names & (_DISCONNECTS | _CLIENT_ERRORS) or not isinstance(exc, Exception):
        return False
    if "HTTPException" in names:
        code = getattr(exc, "status_code", None)
        return not isinstance(code, int) or code >= 500
    if "WebSocketException" in names:  # a close the app chose; 1011 is its internal error
        return getattr(exc, "code", None) == 1011
    return True


def _asyncio_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def environ_of(scope: Scope) -> dict[str, Any]:
    """The request of an ASGI scope as a WSGI environ holds it (PEP 3333: the path as
    latin-1 text of its UTF-8 bytes, headers as HTTP_*), for the shared WSGI helpers."""
    path = scope.get("path", "")
    root_path = scope.get("root_path", "")
    if root_path and not path.startswith(root_path):  # older servers left it out of `path`
        path = root_path + path
    server = scope.get("server") or ("", None)
    client = scope.get("client") or ("", None)
    scheme = scope.get("scheme") or ("ws" if scope["type"] == "websocket" else "http")
    environ: dict[str, Any] = {
        "REQUEST_METHOD": scope.get("method", "GET"),
        "SCRIPT_NAME": "",
        "PATH_INFO": path.encode("utf-8", "surrogateescape").decode("latin-1"),
        "QUERY_STRING": scope.get("query_string", b"").decode("latin-1"),
        "SERVER_NAME": server[0] or "",
        "SERVER_PORT": "" if server[1] is None else str(server[1]),
        "SERVER_PROTOCOL": "HTTP/" + scope.get("http_version", "1.1"),
        "REMOTE_ADDR": client[0] or "",
        "wsgi.url_scheme": scheme,
    }
    for raw_name, raw_value in scope.get("headers") or ():
        name = raw_name.decode("latin-1").upper().replace("-", "_")
        key = name if name in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + name
        value = raw_value.decode("latin-1")
        if key in environ:  # repeated headers are joined, as WSGI servers do
            value = environ[key] + ("; " if key == "HTTP_COOKIE" else ", ") + value
        environ[key] = value
    return environ


# The request headers read on the request thread, by the WSGI names they would have (`-` or
# `_`, any case): trace context, and the body's type and length. The rest of the request
# becomes context on the worker thread, from a copy of the scope (see `Request.record`).
_READ_NOW = {b"traceparent": "HTTP_TRACEPARENT", b"tracestate": "HTTP_TRACESTATE",
             b"baggage": "HTTP_BAGGAGE", b"content-type": "CONTENT_TYPE",
             b"content_type": "CONTENT_TYPE", b"content-length": "CONTENT_LENGTH",
             b"content_length": "CONTENT_LENGTH"}
_lower = bytes.lower  # a header name that is not bytes raises here, as in environ_of


def headers_now(headers: Any) -> dict[str, str]:
    """The headers of `_READ_NOW` in the raw `headers` of a scope, under their WSGI names,
    repeated ones joined as in environ_of."""
    found: dict[str, str] = {}
    for raw_name, raw_value in headers:
        key = _READ_NOW.get(_lower(raw_name))
        if key is not None:
            value = raw_value.decode("latin-1")
            found[key] = found[key] + ", " + value if key in found else value
    return found


def scope_environ(scope: Scope, body: Any) -> dict[str, Any]:
    """environ_of a scope's copy, with the body recorded of the request (if any)."""
    environ = environ_of(scope)
    if body is not None:
        environ["beatlib.body"] = body
    return environ


def _request_context(scope: Scope, body: Any, config: Any) -> dict[str, Any] | None:
    """The transaction's `context.request` (on the worker thread): what the WSGI
    integration records of the same request."""
    try:
        return request_context(scope_environ(scope, body), config, False)
    except Exception:  # a scope no server sends (header values not bytes)
        report("asgi: the request's context")
        return None


def _response_context(code: int, finished: bool, headers_sent: bool,
                      headers: list[Any] | None) -> dict[str, Any]:
    """The transaction's `context.response` (on the worker thread), as end_request records
    it; `headers` as the app sent them (bytes), or None when not recorded."""
    response: dict[str, Any] = {"status_code": code, "finished": finished,
                                "headers_sent": headers_sent}
    if headers is not None:
        try:
            response["headers"] = {k.decode("latin-1"): v.decode("latin-1")
                                   for k, v in headers}
        except Exception:  # not bytes: left out, as a response we could not read
            report(_RECORD_PLACE)
    return response


class Request:
    """One traced HTTP request or websocket connection: its transaction, what was sent and
    received, and the end of the transaction when the response's last byte was sent.
    `receive` and `send` are what the app gets instead of the server's."""

    __slots__ = ("client", "scope", "copy", "tx", "name", "root_path", "route_of", "body",
                 "body_size", "kept_body", "content_type", "status", "headers", "trailers",
                 "complete", "disconnected", "close_code", "_receive", "_send")

    scope: Scope | None  # the live scope, while the request is served

    def __init__(self, client: Client, scope: Scope, copy: Scope, tx: Transaction,
                 route_of: Callable[[Scope, str], str | None] | None, receive: Receive,
                 send: Send, kept_body: Any = None, body_size: int = 0,
                 content_type: str = "") -> None:
        self.client = client
        self.scope = scope
        # The scope's values as the request began (the router lengthens `root_path`, a
        # middleware may rewrite the headers' list in place); what environ_of reads.
        self.copy = copy
        self.tx = tx
        self.name = tx.name  # the name it began with: a name set by the app is kept
        self.root_path = copy.get("root_path", "")
        self.route_of = route_of
        self._receive = receive
        self._send = send
        self.kept_body = kept_body  # the body as recorded (or a note of its size)
        self.content_type = content_type
        self.body: bytearray | None = None
        self.body_size = 0
        self.status: int | None = None
        self.headers: list[Any] | None = None  # the response's, as sent (bytes)
        self.trailers = False
        self.complete = False  # the whole response was sent (or the websocket closed)
        self.disconnected = False
        self.close_code: int | None = None
        if tx.sampled:
            self.body_size = body_size
            self.body = bytearray() if body_size else None

    @property
    def environ(self) -> dict[str, Any]:
        """The request as a WSGI environ (for errors: built when one is captured)."""
        return scope_environ(self.copy, self.kept_body)

    def record(self) -> None:
        """Set the request context (again when the body arrived); built on the worker."""
        tx = self.tx
        if tx.sampled:
            tx.set_context("request", functools.partial(
                _request_context, self.copy, self.kept_body, self.client.config))

    # -- what passes through --------------------------------------------------------------

    async def receive(self) -> Message:
        message = await self._receive()
        try:
            self.received(message)
        except Exception:
            report(_RECORD_PLACE)
        return message

    async def send(self, message: Message) -> None:
        kind = None
        try:
            kind = message.get("type")
            if kind == "http.response.start":
                self.status = message.get("status", 200)
                self.trailers = bool(message.get("trailers", False))
                if self.client.config.capture_headers:
                    self.headers = list(message.get("headers") or ())
            elif kind != "http.response.body":
                self.sending(message)
        except Exception:
            report(_RECORD_PLACE)
        try:
            await self._send(message)
        except OSError:
            self.disconnected = True  # the server could not send it: the client left
            raise
        try:
            if kind == "http.response.body":
                if not message.get("more_body", False) and not self.trailers:
                    self.complete = True
                    self.end()
            elif kind != "http.response.start":
                self.sent(message)
        except Exception:
            report(_RECORD_PLACE)

    def received(self, message: Message) -> None:
        """A message the app received: body chunks copied (within the declared length) and
        recorded when the last one arrives; a disconnection before the response was sent."""
        kind = message.get("type")
        if kind == "http.request":
            body = self.body
            if body is not None:
                body += message.get("body", b"")[:self.body_size - len(body)]
                if not message.get("more_body", False):
                    self.body = None
                    self.kept_body = body_value(bytes(body), self.content_type)
                    self.record()
        elif kind == "http.disconnect":
            self.disconnected = self.disconnected or not self.complete
        elif kind == "websocket.disconnect":
            self.close_code = message.get("code", 1005)
            self.complete = True

    def sending(self, message: Message) -> None:
        """A message the app sends: the status and headers of the response, a websocket
        accepted or closed."""
        kind = message.get("type")
        if kind in ("http.response.start", "websocket.http.response.start"):
            self.status = message.get("status", 200)
            self.trailers = bool(message.get("trailers", False))
            if self.client.config.capture_headers:
                self.headers = list(message.get("headers") or ())
        elif kind == "websocket.accept":
            self.status = 101
        elif kind == "websocket.close":
            self.close_code = message.get("code", 1000)
            if self.status is None:
                self.status = 403  # closed before accepting: the server refuses the upgrade

    def sent(self, message: Message) -> None:
        """After the server took `message`: with the last body chunk (or the file, or the
        last trailers) the response is complete and the transaction ends, so it is timed
        to the last byte of a streamed response and not to the background tasks after it."""
        kind = message.get("type")
        if kind in ("http.response.body", "websocket.http.response.body"):
            done = not message.get("more_body", False) and not self.trailers
        elif kind == "http.response.trailers":
            done = not message.get("more_trailers", False)
        else:
            done = kind in ("http.response.pathsend", "websocket.close")
        if done:
            self.complete = True
            self.end()

    # -- errors and the end -----------------------------------------------------------

    def capture(self, exc: BaseException) -> None:
        """An exception of the app (raised, or answered by a framework's handler): captured
        once, with the request, when the rule says it is an error."""
        if is_error(exc):
            self.name_by_route()  # the route is known by now: the error carries its name
            capture_request_error(self.client, self.environ,
                                  (type(exc), exc, exc.__traceback__))

    def failed(self, exc: BaseException) -> None:
        """The app raised `exc` (to the server, or to Starlette's ServerErrorMiddleware
        outside us, which answers 500)."""
        if {cls.__name__ for cls in type(exc).__mro__} & _DISCONNECTS or (
                self.disconnected and isinstance(exc, OSError)):
            self.disconnected = True
            return
        if not self.complete:
            self.status = 500
        self.capture(exc)

    def name_by_route(self) -> None:
        """`GET /items/{item_id}` once a framework routed the request, unless the app
        named the transaction itself."""
        tx = self.tx
        if tx.name == self.name and self.route_of is not None and self.scope is not None:
            route = self.route_of(self.scope, self.root_path)
            if route is not None:
                tx.name = f"{self.name} {route}"

    def end(self) -> None:
        tx = self.tx
        if tx.ended:
            return
        self.name_by_route()
        if self.close_code is not None:
            tx.set_label("websocket_close_code", self.close_code)
        left = self.disconnected and not self.complete
        if left:
            # The client went away before the whole response was sent: not the app's failure.
            tx.set_label("client_disconnected", True)
            tx.outcome = tx.outcome or "unknown"
        # 499 (as nginx logs it): the client closed the connection before any response.
        status = self.status if self.status is not None else 499 if left else 500
        # end_request's rules; the response context is built on the worker.
        code = settle(tx, status)
        if tx.sampled:
            tx.set_context("response", functools.partial(
                _response_context, code, not left, self.status is not None, self.headers))
        tx.end()


class BeatMiddleware:
    """Traces an ASGI 3 app: a transaction per HTTP request, errors captured with the
    request; lifespan events (and websockets, unless `websockets=True`) pass untouched,
    what was queued is sent at lifespan shutdown.

    Uses `client` or the default client, or creates one from the environment. In Starlette
    and FastAPI: `app.add_middleware(BeatMiddleware)` (keywords as `add_middleware` passes
    them); transactions are then named by the matched route (`GET /items/{item_id}`).
    """

    def __init__(self, app: ASGIApp, client: Client | None = None,
                 websockets: bool = False) -> None:
        self.app = app
        self.client = client or get_client() or Client()
        self.websockets = websockets
        self.route_of: Callable[[Scope, str], str | None] | None = None
        self._framework_known = False
        instrument(self.client.config)
        self._starlette()

    def _starlette(self) -> None:
        """Starlette (and so FastAPI) imported: name by route, see what exception handlers
        answer, trace background tasks (see beatlib.contrib.starlette)."""
        if self.route_of is None and "starlette" in sys.modules:
            from beatlib.contrib import starlette

            starlette.install()
            self.route_of = starlette.route_template

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope.get("type")
        if kind == "lifespan":
            await self.app(scope, receive, self._lifespan_send(send))
            return
        if (kind != "http" and (kind != "websocket" or not self.websockets)) or STATE in scope:
            # Other scope types untouched; a request already traced by an outer
            # BeatMiddleware (a mounted app that has its own) is recorded once.
            await self.app(scope, receive, send)
            return
        previous = get_active()
        try:
            request = self._begin(scope, receive, send)
        except Exception:  # never let tracing take the request down
            report("asgi: beginning the request's transaction")
            set_active(previous)
            request = None
        if request is None:
            await self.app(scope, receive, send)
            return
        token = current_request.set(request)
        try:
            await self.app(scope, request.receive, request.send)
        except BaseException as exc:
            try:
                request.failed(exc)
            except Exception:
                report("asgi: capturing the request's exception")
            raise
        finally:
            if not request.tx.ended:
                _END.call(request.end)
            request.scope = None  # the scope holds the request: no cycle left for the GC
            current_request.reset(token)
            if get_active() is not previous:
                set_active(previous)  # the request's transaction never outlives the call

    def _lifespan_send(self, send: Send) -> Send:
        """The server's lifespan `send`, passing every message on as it is; before the app's
        `lifespan.shutdown.complete`, what is queued is sent (in a thread: the loop goes
        on). Servers such as uvicorn end on SIGTERM by raising it again once shut down,
        which skips the interpreter's exit hooks and so beatlib's flush at exit."""

        async def lifespan_send(message: Message) -> None:
            if message.get("type") in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                with _SHUTDOWN:
                    loop = _asyncio_loop()
                    if loop is not None:  # another loop (trio): the exit hook sends it
                        await loop.run_in_executor(None, self.client.flush)
            await send(message)

        return lifespan_send

    def _begin(self, scope: Scope, receive: Receive, send: Send) -> Request | None:
        self._starlette()
        if not self._framework_known:
            self._framework_known = True
            self._note_framework(scope)
        client = self.client
        config = client.config
        headers = tuple(scope.get("headers") or ())
        found = headers_now(headers)
        # A body to copy as the app reads it (its length), or noted by its size now.
        body_size = body_to_keep(found) if config.capture_body != "off" else 0
        kept_body = found.get("beatlib.body")
        get = scope.get
        # What environ_of reads, with its defaults (only that: the rest is the app's).
        copy = {"type": scope["type"], "method": get("method", "GET"), "path": get("path", ""),
                "root_path": get("root_path", ""), "query_string": get("query_string", b""),
                "server": get("server"), "client": get("client"), "scheme": get("scheme"),
                "http_version": get("http_version", "1.1"), "headers": headers}
        websocket = copy["type"] == "websocket"
        name = "WEBSOCKET" if websocket else None
        if config.transaction_ignore_urls:  # the path to match, as WSGI has it
            tx = begin_request(client, scope_environ(copy, kept_body), name)
            if tx is None:
                return None
        else:
            parent = parse_traceparent(found.get("HTTP_TRACEPARENT"),
                                       found.get("HTTP_TRACESTATE"))
            tx = client.begin_transaction("request", parent, found.get("HTTP_BAGGAGE"))
            tx.name = name or copy.get("method", "GET")
        if websocket:
            tx.type = "websocket"
        request = Request(client, scope, copy, tx, self.route_of, receive, send, kept_body,
                          body_size, found.get("CONTENT_TYPE", ""))
        if not config.transaction_ignore_urls:
            request.record()
        scope[STATE] = request
        return request

    def _note_framework(self, scope: Scope) -> None:
        """The metadata's framework: FastAPI or Starlette when the scope's app is one."""
        if self.client.framework is not None:
            return
        module = type(scope.get("app", self.app)).__module__.partition(".")[0]
        if module in ("fastapi", "starlette"):
            try:
                self.client.framework = (module, importlib.metadata.version(module))
            except importlib.metadata.PackageNotFoundError:  # pragma: no cover - vendored
                self.client.framework = (module, "unknown")
