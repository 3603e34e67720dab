"""`TracingMiddleware`: one `request` transaction per request, named by the URL pattern
(`GET posts/<int:pk>/`), with the request (and body when `capture_body` asks), the response
and the authenticated user; streamed responses end when Django closes them. Sync and async:
under ASGI it runs on the event loop (no thread of its own), under WSGI as plain code."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.core.exceptions import MiddlewareNotUsed  # type: ignore[import-untyped,import-not-found]
from django.http import HttpRequest, HttpResponseBase  # type: ignore[import-untyped,import-not-found]
from django.utils.functional import LazyObject, empty  # type: ignore[import-untyped,import-not-found]

from beatlib.context import current_transaction, get_active, set_active
from beatlib.contrib.django.apps import app_client
from beatlib.contrib.wsgi import (
    begin_request,
    capture_request_error,
    end_request,
    keep_body,
    produced,
    request_context,
    run_in,
    set_active_for,
)
from beatlib.guard import guard, report
from beatlib.tracing import Transaction


class TracingMiddleware:
    """Traces each request; put first in MIDDLEWARE (the app config does that for you).

    Async when the handler below it is (Django under ASGI), so it adds no thread hop there;
    sync otherwise (WSGI), exactly as before."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        client = app_client()
        if client is None or not client.config.enabled:
            raise MiddlewareNotUsed("beatlib is disabled or its settings are invalid")
        self.client = client
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)
            # Django awaits a coroutine view hook under ASGI; a sync one would be run in a
            # thread of its own for every request.
            self.process_view = self._process_view_async  # type: ignore[method-assign,assignment]

    def __call__(self, request: HttpRequest) -> Any:
        if self.is_async:
            return self._call_async(request)
        tx, previous = self._begin(request)
        if tx is None:
            return self.get_response(request)
        unnamed = tx.name
        try:
            response = self.get_response(request)
        except BaseException:
            _guarded(end_request, tx, 500)
            raise
        finally:
            set_active(previous)  # the request's transaction never outlives the call here
        try:
            self._finish(tx, unnamed, request, response)
        except Exception:
            report("django: _finish")
        return response

    async def _call_async(self, request: HttpRequest) -> HttpResponseBase:
        tx, previous = self._begin(request)
        get_response: Callable[[HttpRequest], Awaitable[HttpResponseBase]] = self.get_response
        if tx is None:
            return await get_response(request)
        unnamed = tx.name
        try:
            response = await get_response(request)
        except BaseException:
            _guarded(end_request, tx, 500)
            raise
        finally:
            set_active(previous)
        try:
            self._finish(tx, unnamed, request, response)
        except Exception:
            report("django: _finish")
        return response

    def _begin(self, request: HttpRequest) -> tuple[Transaction | None, Any]:
        """The request's transaction (None if ignored or if beginning it failed), and what
        was active before, to put back."""
        if self.client.config.capture_body != "off":
            _guarded(_read_body, request)
        previous = get_active()
        try:
            return begin_request(self.client, request_meta(request)), previous
        except Exception:  # never let tracing take the request down
            report("django: beginning the request's transaction")
            return None, previous

    def process_view(self, request: HttpRequest, view: Any, args: Any, kwargs: Any) -> None:
        """Named as soon as the URL is resolved, so errors in the view carry the name; the
        route's sensitive variables (`<token>`) are redacted in everything it records."""
        _resolved(request, kwargs)

    async def _process_view_async(self, request: HttpRequest, view: Any, args: Any,
                                  kwargs: Any) -> None:
        _resolved(request, kwargs)

    def _finish(self, tx: Transaction, unnamed: str | None, request: HttpRequest,
                response: HttpResponseBase) -> None:
        # A name set by the app (beatlib.set_transaction_name) is kept.
        name = transaction_name(request, response.status_code) if tx.name == unnamed else None
        record_user(request, tx)
        form_fields(request, tx)
        status, headers = response.status_code, response_headers(response)
        if not response.streaming:
            end_request(tx, status, headers, name)
            return

        def closed() -> None:
            _guarded(end_request, tx, status, headers, name)

        def failed() -> None:
            tx.outcome = tx.outcome or "failure"  # the app's own wins
            capture_request_error(self.client, request_meta(request))

        # A file's chunks are read, nothing of the app's runs: left as Django streams it.
        if getattr(response, "file_to_stream", None) is None:
            wrap = aproduced if getattr(response, "is_async", False) else produced
            response.streaming_content = wrap(  # type: ignore[attr-defined]
                response.streaming_content, tx,  # type: ignore[attr-defined]
                lambda: _guarded(failed))
        # HttpResponseBase.close() (called by the server, or by Django's file wrapper) runs
        # these closers; older or unusual responses get their close() wrapped instead.
        closers = getattr(response, "_resource_closers", None)
        if isinstance(closers, list):
            closers.append(closed)
        else:
            close = response.close

            def traced_close() -> None:
                try:
                    close()
                finally:
                    closed()

            response.close = traced_close  # type: ignore[method-assign]


async def aproduced(body: AsyncIterable[bytes], segment: Any,
                    on_error: Callable[[], Any]) -> AsyncIterator[bytes]:
    """`produced` for an async iterator (`StreamingHttpResponse` of an async generator):
    each chunk awaited with `segment` active, `on_error` when producing one raises."""
    try:
        iterator = run_in(segment, lambda: aiter(body))
        while True:
            previous = set_active_for(segment)
            try:
                chunk = await anext(iterator)
            except StopAsyncIteration:
                return
            finally:
                set_active(previous)
            yield chunk
    except GeneratorExit:
        raise  # left unfinished (a client gone): not the app's error
    except Exception:
        run_in(segment, on_error)
        raise


def request_meta(request: HttpRequest) -> dict[str, Any]:
    """`request.META`, read by the WSGI request context; for an ASGI request, a copy with
    what its scope holds instead (scheme, HTTP version) under the WSGI names."""
    meta: dict[str, Any] = request.META
    scope = getattr(request, "scope", None)
    if not isinstance(scope, dict) or "wsgi.url_scheme" in meta:
        return meta
    extra = {"wsgi.url_scheme": scope.get("scheme") or "http"}
    if isinstance(scope.get("http_version"), str):
        extra["SERVER_PROTOCOL"] = "HTTP/" + scope["http_version"]
    return {**meta, **extra}


def response_headers(response: HttpResponseBase) -> list[tuple[str, str]]:
    """The response's headers as sent, copied: from Django's own store of them (what its
    `items()` yields one by one, through a generator and a lookup per header)."""
    store = getattr(getattr(response, "headers", None), "_store", None)
    if type(store) is dict and type(response).items is HttpResponseBase.items:
        return list(store.values())
    return list(response.items())


def _resolved(request: HttpRequest, kwargs: Any) -> None:
    tx = current_transaction()
    if tx is None:
        return
    if tx.name == request.method:
        try:
            tx.name = transaction_name(request, 200)
        except Exception:
            report("django: _name")
    if kwargs:
        _guarded(tx.set_route_params, kwargs)


def transaction_name(request: HttpRequest, status_code: int) -> str:
    """`METHOD <route>`; else the view's dotted path; unresolved 404s are one name."""
    method = request.method or "GET"
    match = getattr(request, "resolver_match", None)
    if match is None:
        return f"{method} unknown route" if status_code == 404 else method
    route = getattr(match, "route", None)
    if isinstance(route, str):
        return f"{method} {route or '/'}"
    view = getattr(match, "_func_path", None)
    return f"{method} {view}" if view else method


def record_user(request: HttpRequest, tx: Transaction | None = None) -> None:
    """The authenticated user as `context.user`, if the app already looked the user up
    (`request.user`, or `await request.auser()`; a lazy user nobody touched stays untouched:
    no session query of ours)."""
    tx = tx or current_transaction()
    if tx is None or not tx.sampled or (tx.context and "user" in tx.context):
        return
    found = vars(request)
    user = found.get("_cached_user")
    if user is None:
        user = found.get("_acached_user")  # `await request.auser()`
    if user is None:
        user = found.get("user")
        if isinstance(user, LazyObject):
            wrapped = vars(user).get("_wrapped", empty)
            user = None if wrapped is empty else wrapped
    if user is None or getattr(user, "is_authenticated", False) is not True:
        return
    user_id = getattr(user, "pk", None)
    get_username = getattr(user, "get_username", None)
    fields = {
        "id": user_id if isinstance(user_id, int) or user_id is None else str(user_id),
        "username": str(get_username()) if callable(get_username) else None,
        "email": getattr(user, "email", None) or None,
    }
    tx.set_context("user", {k: v for k, v in fields.items() if v is not None})


def _read_body(request: HttpRequest) -> None:
    """A small form or JSON body, read ahead through `request.body` (which Django then serves
    to the app). Multipart forms are not parsed for us: `form_fields` takes their fields once
    the app (or CSRF) did."""
    keep_body(request.META, lambda length: request.body, multipart="later")


def form_fields(request: HttpRequest, tx: Transaction | None = None) -> None:
    """A multipart form's fields (no files), once Django parsed them, as the body."""
    meta = request.META
    if "beatlib.body" not in meta:
        post = vars(request).get("_post")
        if post is None or not meta.get("CONTENT_TYPE", "").startswith("multipart/"):
            return
        meta["beatlib.body"] = post.dict()
    if tx is not None and tx.sampled and tx.context and "request" in tx.context:
        config = tx.tracer.config
        if config.capture_body in ("all", "transactions"):  # the request again, with its body
            tx.set_context("request", functools.partial(
                request_context, dict(request_meta(request)), config, False))


_guards: dict[str, guard] = {}  # one per step, made once


def _guarded(function: Callable[..., Any], *args: Any) -> None:
    name = getattr(function, "__name__", "a step")
    place = _guards.get(name)
    if place is None:
        place = _guards[name] = guard(f"django: {name}")
    place.call(function, *args)
