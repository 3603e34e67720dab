"""ASGI: `BeatMiddleware` for any ASGI 3 app (Starlette and FastAPI: `app.add_middleware`).

One transaction per HTTP request (and per websocket connection, when asked), built on what
the WSGI integration shares: the scope is read as a WSGI environ would be, so the request
context, ignored URLs, trace continuation, body rules, result and errors are the same.
"""

from __future__ import annotations

import asyncio
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
    end_request,
    record_request,
)
from beatlib.guard import guard, report
from beatlib.instrumentation.registry import instrument
from beatlib.tracing import Transaction

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

STATE = "beatlib.request"  # scope key: the `Request` being traced (frameworks find it there)
current_request: ContextVar[Request | None] = ContextVar("beatlib_asgi_request", default=None)

_END = guard("asgi: ending the request's transaction")
_CAPTURE = guard("asgi: capturing the request's exception")
_RECORD = guard("asgi: recording a message of the request")
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


class Request:
    """One traced HTTP request or websocket connection: its transaction, what was sent and
    received, and the end of the transaction when the response's last byte was sent."""

    __slots__ = ("client", "scope", "environ", "tx", "name", "root_path", "route_of", "body",
                 "body_size", "status", "headers", "trailers", "complete", "disconnected",
                 "close_code")

    def __init__(self, client: Client, scope: Scope, tx: Transaction, environ: dict[str, Any],
                 route_of: Callable[[Scope, str], str | None] | None,
                 body_size: int = 0) -> None:
        self.client = client
        self.scope = scope
        self.environ = environ
        self.tx = tx
        self.name = tx.name  # the name it began with: a name set by the app is kept
        self.root_path = scope.get("root_path", "")
        self.route_of = route_of
        self.body: bytearray | None = None
        self.body_size = 0
        self.status: int | None = None
        self.headers: list[tuple[str, str]] | None = None
        self.trailers = False
        self.complete = False  # the whole response was sent (or the websocket closed)
        self.disconnected = False
        self.close_code: int | None = None
        if tx.sampled:
            self.body_size = body_size
            self.body = bytearray() if body_size else None

    # -- what passes through --------------------------------------------------------------

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
                    self.environ["beatlib.body"] = body_value(
                        bytes(body), self.environ.get("CONTENT_TYPE", ""))
                    record_request(self.tx, self.environ, self.client.config)
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
                self.headers = [(k.decode("latin-1"), v.decode("latin-1"))
                                for k, v in message.get("headers") or ()]
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
        if tx.name == self.name and self.route_of is not None:
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
        end_request(tx, status, self.headers, finished=not left,
                    headers_sent=self.status is not None)


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
            request = self._begin(scope)
        except Exception:  # never let tracing take the request down
            report("asgi: beginning the request's transaction")
            set_active(previous)
            request = None
        if request is None:
            await self.app(scope, receive, send)
            return
        token = current_request.set(request)

        async def traced_receive() -> Message:
            message = await receive()
            with _RECORD:
                request.received(message)
            return message

        async def traced_send(message: Message) -> None:
            with _RECORD:
                request.sending(message)
            try:
                await send(message)
            except OSError:
                request.disconnected = True  # the server could not send it: the client left
                raise
            with _RECORD:
                request.sent(message)

        try:
            await self.app(scope, traced_receive, traced_send)
        except BaseException as exc:
            with _CAPTURE:
                request.failed(exc)
            raise
        finally:
            _END.call(request.end)
            current_request.reset(token)
            set_active(previous)  # the request's transaction never outlives the call here

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

    def _begin(self, scope: Scope) -> Request | None:
        self._starlette()
        if not self._framework_known:
            self._framework_known = True
            self._note_framework(scope)
        environ = environ_of(scope)
        # A body to copy as the app reads it (its length), or noted by its size now.
        body_size = body_to_keep(environ) if self.client.config.capture_body != "off" else 0
        websocket = scope["type"] == "websocket"
        tx = begin_request(self.client, environ, "WEBSOCKET" if websocket else None)
        if tx is None:
            return None
        if websocket:
            tx.type = "websocket"
        request = Request(self.client, scope, tx, environ, self.route_of, body_size)
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
