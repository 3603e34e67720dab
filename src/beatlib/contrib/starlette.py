"""Starlette and FastAPI, under `beatlib.contrib.asgi.BeatMiddleware` (which loads this):
transactions named by the matched route template, mounts and routers' prefixes included;
exceptions answered by an exception handler captured; background tasks traced.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import wrapt

try:
    from starlette.background import BackgroundTask
    from starlette.routing import Match, Mount
except ImportError as exc:  # pragma: no cover - only without Starlette
    raise ImportError(
        "beatlib.contrib.starlette needs Starlette (pip install starlette); it is not installed"
    ) from exc

try:
    from starlette.middleware.exceptions import ExceptionMiddleware
except ImportError:  # pragma: no cover - Starlette before 0.21
    from starlette.exceptions import ExceptionMiddleware  # type: ignore[attr-defined,no-redef]

from beatlib.context import get_active, set_active
from beatlib.contrib.asgi import STATE, Scope, current_request
from beatlib.contrib.wsgi import capture_request_error
from beatlib.guard import guard
from beatlib.tracing import TraceParent, capture_span

UNKNOWN = "unknown route"  # what no route matched (a 404) is named by, as in Flask

_ANSWERED = guard("starlette: an exception handler's exception")
_TASK = guard("starlette: tracing a background task")
_lock = threading.Lock()
_installed = False
# The exception middlewares whose handlers answer to us (by id, a weak reference to check):
# wrapped at their first request, then only the handlers they add later.
_answering: dict[int, weakref.ref[Any]] = {}


def install() -> None:
    """Patch Starlette once (further calls do nothing): exception handlers report what they
    answer to the request being traced, background tasks record into its trace. Without a
    traced request the patched code does what it always did."""
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
    # __call__, not __init__: middleware stacks built before this (an app already serving)
    # have their handlers wrapped on their next request.
    wrapt.wrap_function_wrapper(ExceptionMiddleware, "__call__", _wrap_handlers)
    wrapt.wrap_function_wrapper(ExceptionMiddleware, "add_exception_handler", _added_handler)
    wrapt.wrap_function_wrapper(BackgroundTask, "__call__", _background_task)


# -- route names -------------------------------------------------------------------------

def route_template(scope: Scope, root_path: str) -> str | None:
    """The template of the route that served the request (`/items/{item_id}`), with the
    paths of the mounts on the way (`/api/v1/items/{item_id}`); `unknown route` when the
    router matched none; None when no Starlette router saw the request. `root_path` is
    the scope's as the middleware got it (mounts lengthen it)."""
    router = scope.get("router")
    if router is None:
        return None
    prefix, routes = "", getattr(router, "routes", ())
    if scope.get("root_path", "") != root_path:
        prefix, routes = _mounts(router, scope, root_path)
    route = scope.get("route") or _by_endpoint(routes, scope.get("endpoint"))
    if route is None:
        return UNKNOWN
    if isinstance(route, Mount):
        path = "/{path}"  # a mounted app that routes nothing itself (StaticFiles, plain ASGI)
    else:
        path = _effective_path(scope, route) or getattr(route, "path_format", None) or ""
    return prefix + path or UNKNOWN


def _effective_path(scope: Scope, route: Any) -> str | None:
    """FastAPI (0.160 on) keeps an included router's routes apart from the prefixes it was
    included with; the route it selected knows its whole path."""
    fastapi = scope.get("fastapi")
    context = fastapi.get("effective_route_context") if isinstance(fastapi, dict) else None
    if context is not None and getattr(context, "original_route", None) is route:
        path = getattr(context, "path_format", None)
        return path if isinstance(path, str) else None
    return None


def _by_endpoint(routes: Any, endpoint: Any) -> Any:
    """Older Starlette (0.37 here) puts no route in the scope, FastAPI only its own: the
    others are found by their endpoint, among the routes of the app that served them."""
    if endpoint is None:
        return None
    for route in routes:
        if getattr(route, "endpoint", None) is endpoint:
            return route
    return None


def _mounts(router: Any, scope: Scope, root_path: str) -> tuple[str, Any]:
    """The mounts' path templates from the top router down to the app that served the
    request, and that app's routes: found by matching the request again from the top,
    mounts only (a mounted request costs one regular expression match per mount tried);
    the matched text of the mounts, and no routes, if that fails."""
    target = scope.get("root_path", "")
    current: Scope = {**scope, "root_path": root_path, "path_params": {}}
    routes = getattr(router, "routes", ())
    prefix = ""
    while current.get("root_path", "") != target:
        for route in routes:
            if isinstance(route, Mount):
                match, child = route.matches(current)
                if match is Match.FULL:
                    prefix += route.path_format.removesuffix("/{path}")
                    current = {**current, **child}
                    routes = route.routes
                    break
        else:
            return target[len(root_path):], ()
    return prefix, routes


# -- exception handlers ------------------------------------------------------------------

class _AnsweringHandler(wrapt.FunctionWrapper):  # type: ignore[misc]
    """An exception handler that first shows the exception to the traced request (so an
    exception the app answered with its own handler is still captured, once)."""

    def __init__(self, handler: Any) -> None:
        super().__init__(handler, _answer)


def _answer(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    with _ANSWERED:
        conn = args[0] if args else kwargs.get("request", kwargs.get("websocket"))
        exc = args[1] if len(args) > 1 else kwargs.get("exc")
        scope = getattr(conn, "scope", None)
        request = (scope.get(STATE) if isinstance(scope, dict) else None) \
            or current_request.get()
        if request is not None and isinstance(exc, BaseException):
            request.capture(exc)
    return wrapped(*args, **kwargs)


def _wrap_handlers(wrapped: Any, instance: Any, args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> Any:
    known = _answering.get(id(instance))
    if known is None or known() is not instance:
        with _ANSWERED:
            _answer_all(instance)
            key = id(instance)
            _answering[key] = weakref.ref(instance, lambda _: _answering.pop(key, None))
    return wrapped(*args, **kwargs)


def _added_handler(wrapped: Any, instance: Any, args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> Any:
    """A handler added to a middleware already serving answers to us too."""
    result = wrapped(*args, **kwargs)
    known = _answering.get(id(instance))
    if known is not None and known() is instance:
        with _ANSWERED:
            _answer_all(instance)
    return result


def _answer_all(instance: Any) -> None:
    for name in ("_exception_handlers", "_status_handlers"):
        handlers = getattr(instance, name, None)
        if isinstance(handlers, dict):
            for key, handler in handlers.items():
                if not isinstance(handler, _AnsweringHandler):
                    handlers[key] = _AnsweringHandler(handler)


# -- background tasks --------------------------------------------------------------------

async def _background_task(wrapped: Any, instance: Any, args: tuple[Any, ...],
                           kwargs: dict[str, Any]) -> Any:
    """A background task of a traced request: a span of its transaction while that is open,
    else (the response was sent) a transaction of type `task` in the same trace."""
    request = current_request.get()
    if request is None:
        return await wrapped(*args, **kwargs)
    func = getattr(instance, "func", None)
    name = getattr(func, "__qualname__", None) or repr(func)
    tx = request.tx
    if not tx.ended:
        with capture_span(name, "task", "background"):
            return await wrapped(*args, **kwargs)
    previous = get_active()
    task = None
    with _TASK:
        parent = TraceParent(tx.trace_id, "%016x" % tx.id, tx.sampled, tx.tracestate,
                             tx.random_trace_id)
        task = request.client.begin_transaction("task", parent, tx.baggage)
        task.name = name
    try:
        result = await wrapped(*args, **kwargs)
    except BaseException as exc:
        if task is not None and isinstance(exc, Exception):
            with _TASK:
                capture_request_error(request.client, request.environ)
                task.outcome = "failure"
        raise
    finally:
        if task is not None:
            with _TASK:
                task.outcome = task.outcome or "success"
                task.end(result=task.outcome)
        set_active(previous)
    return result
