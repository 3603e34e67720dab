"""Flask: `Beat(app)` or `Beat().init_app(app)`. A transaction per request named by its URL
rule, begun when the app dispatches the request (its `full_dispatch_request`, wrapped per app,
just before `request_started`), errors captured on `got_request_exception` (connected per app),
the response recorded as the app returns it, ended when the server closes the response body.
"""

from __future__ import annotations

import importlib.metadata
import sys
import weakref
from collections.abc import Callable, Iterable
from typing import Any

try:
    from flask import Flask, g, got_request_exception, request
except ImportError as exc:  # pragma: no cover - only without Flask
    raise ImportError(
        "beatlib.contrib.flask needs Flask (pip install flask); it is not installed"
    ) from exc

from werkzeug.exceptions import HTTPException

from beatlib.client import Client, get_client
from beatlib.config import Config
from beatlib.context import get_active, set_active
from beatlib.contrib.wsgi import (
    ClosingIterator,
    begin_request,
    capture_request_error,
    end_request,
    read_body,
)
from beatlib.guard import guard
from beatlib.instrumentation.registry import instrument
from beatlib.tracing import Transaction

_END = guard("flask: ending the request's transaction")
_CAPTURE = guard("flask: capturing the request's exception")
_BEGIN = guard("flask: beginning the request's transaction")
_RESPONSE = guard("flask: recording the response")
_BODY = guard("flask: reading the request body")
EXTENSION = "beatlib"  # app.extensions[EXTENSION] is the app's client
_STATE = "beatlib.flask"  # environ key: the request's [transaction, status, headers]


class Beat:
    """Traces a Flask app (or, through `init_app`, each app of a factory).

    Each app's client is `client` if given, else one made from `app.config["BEATLIB"]` (a
    settings dict; `BEATLIB_*` environment variables win), else the default client.
    """

    def __init__(self, app: Flask | None = None, client: Client | None = None) -> None:
        self._client = client
        self.client: Client | None = client  # the client of the app set up last
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask, client: Client | None = None) -> None:
        """Trace `app` (once; again does nothing). A bad setting raises `ConfigError` here."""
        if EXTENSION in app.extensions:
            return
        client = client or self._client
        if client is None:
            settings = app.config.get("BEATLIB")
            client = (Client(config=Config.from_mapping(settings)) if settings is not None
                      else get_client() or Client())
        if client.framework is None:
            client.framework = ("flask", importlib.metadata.version("flask"))
        self.client = app.extensions[EXTENSION] = client
        instrument(client.config)
        # A strong reference: the signal holds the receiver as long as `app` lives.
        got_request_exception.connect(_failed, sender=app, weak=False)
        app.wsgi_app = _closing(app.wsgi_app, client)  # type: ignore[method-assign]
        app.handle_user_exception = _capturing(  # type: ignore[method-assign,assignment]
            app.handle_user_exception)
        # Wrapped methods rather than the request_started/request_finished signals: a signal
        # with receivers costs its sender a lookup of them per request, and each receiver
        # reaches the request through Flask's context proxies again.
        app.full_dispatch_request = _dispatching(  # type: ignore[method-assign]
            app.full_dispatch_request, client)
        app.handle_exception = _handling(  # type: ignore[method-assign,assignment]
            app.handle_exception, client)


def _capturing(handle: Callable[[Exception], Any]) -> Callable[[Exception], Any]:
    """Flask's `handle_user_exception`, which hands an exception to the app's errorhandler:
    the exception is an error whatever answers it (one rule for every framework); HTTP
    exceptions below 500 (`abort(404)`) are not. Held weakly, as `wsgi_app` is."""
    method = weakref.WeakMethod(handle)  # type: ignore[arg-type]

    def handle_user_exception(e: Exception) -> Any:
        bound: Any = method()
        if not isinstance(e, HTTPException) or (e.code or 500) >= 500:
            with _CAPTURE:
                tx = _transaction()
                if tx is not None:
                    _set_user(tx)
                capture_request_error(bound.__self__.extensions[EXTENSION], request.environ,
                                      (type(e), e, e.__traceback__))
        return bound(e)

    return handle_user_exception


def _closing(wsgi_app: Callable[..., Iterable[bytes]], client: Client) -> Callable[..., Any]:
    """The WSGI side: the body read ahead for `capture_body`, and the end of the transaction
    when the server closes the response body (after the last streamed chunk)."""
    method = _weakly(wsgi_app)
    config = client.config

    def traced_wsgi_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        # A list, filled by `_dispatching`: a middleware copying environ still shares it.
        state: list[Any] = []
        environ[_STATE] = state
        if config.capture_body != "off":
            with _BODY:
                read_body(environ, config)
        previous = get_active()
        try:
            body = method()(environ, start_response)
        except BaseException:
            # Propagated by Flask (debug, testing, PROPAGATE_EXCEPTIONS): already captured.
            if state:
                _END.call(end_request, state[0], 500)
            raise
        finally:
            if get_active() is not previous:
                set_active(previous)  # the request's transaction never outlives the call here
        if not state:
            return body
        tx = state[0]

        def stream_failed() -> None:
            _CAPTURE.call(capture_request_error, client, environ)
            tx.outcome = tx.outcome or "failure"  # the app's own wins

        # ClosingIterator guards on_close; `state` is read when the body is closed.
        return ClosingIterator(body, lambda: end_request(*state), stream_failed, tx)

    return traced_wsgi_app


def _weakly(bound: Callable[..., Any]) -> Callable[[], Any]:
    """The app's own bound method, held weakly: the app holds our wrapper of it, and a strong
    reference back would keep an app alive after its last reference is gone. A plain
    function is held as it is."""
    if getattr(bound, "__self__", None) is not None:
        return weakref.WeakMethod(bound)  # type: ignore[arg-type]
    return lambda: bound


def _dispatching(dispatch: Callable[[], Any], client: Client) -> Callable[[], Any]:
    """Flask's `full_dispatch_request`: the transaction begins here, first thing (where
    `request_started` is sent), and the response it returns is recorded."""
    method = _weakly(dispatch)

    def full_dispatch_request() -> Any:
        state = None
        with _BEGIN:
            req = request._get_current_object()  # type: ignore[attr-defined]
            environ = req.environ
            state = environ.get(_STATE)
            if state is not None:  # else served without our WSGI wrapper: nothing would end it
                rule = req.url_rule
                tx = begin_request(client, environ, f"{req.method} "
                                   f"{rule.rule if rule is not None else 'unknown route'}")
                if tx is None:
                    state = None
                else:
                    state[:] = [tx, 500, None]
                    if req.view_args:
                        tx.set_route_params(req.view_args)
        response = method()()
        if state:
            _record(state, response, client)
        return response

    return full_dispatch_request


def _handling(handle: Callable[[Exception], Any], client: Client) -> Callable[[Exception], Any]:
    """Flask's `handle_exception` (an exception no errorhandler took): the response it
    returns (the 500 page) is recorded; re-raised (PROPAGATE_EXCEPTIONS), nothing is."""
    method = _weakly(handle)

    def handle_exception(e: Exception) -> Any:
        response = method()(e)
        with _RESPONSE:
            state = request.environ.get(_STATE)
            if state:
                _record(state, response, client)
        return response

    return handle_exception


def _record(state: list[Any], response: Any, client: Client) -> None:
    """The response's status and (a copy of) its headers, for `end_request`; the user."""
    with _RESPONSE:
        if response is not None:
            headers = list(response.headers) if client.config.capture_headers else None
            state[1:] = [response.status_code, headers]
            _set_user(state[0])


def _failed(app: Flask, exception: BaseException | None = None, **_: Any) -> None:
    """An exception no errorhandler took: captured once, with the request and user."""
    with _CAPTURE:
        tx = _transaction()
        if tx is not None:
            tx.outcome = tx.outcome or "failure"  # the app's own wins
            _set_user(tx)
        exc_info = None if exception is None else (type(exception), exception,
                                                   exception.__traceback__)
        capture_request_error(app.extensions[EXTENSION], request.environ, exc_info)


def _transaction() -> Transaction | None:
    state = request.environ.get(_STATE)
    return state[0] if state else None


def _set_user(tx: Transaction) -> None:
    """Flask-Login's user, when the request loaded it (we never load it: no extra query)."""
    if "flask_login" not in sys.modules:
        return  # what sets `g._login_user` is not even imported: no context lookup
    user = g.get("_login_user")
    if user is None or not tx.sampled or not getattr(user, "is_authenticated", False):
        return
    fields = {"id": _call(user, "get_id")}
    for name in ("username", "email"):
        fields[name] = getattr(user, name, None)
    tx.set_context("user", {k: str(v) for k, v in fields.items() if v is not None},
                   captured=True)


def _call(obj: Any, method: str) -> Any:
    func = getattr(obj, method, None)
    return func() if callable(func) else None

