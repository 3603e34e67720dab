"""Pyramid 2.x: `config.include("beatlib.contrib.pyramid")` with `beatlib.*` settings.

A tween over Pyramid's exception view tween traces each request (named by the route pattern),
records the authenticated user, captures exceptions once (also those an exception view turned
into a response) and ends the transaction when the response body is closed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextvars import ContextVar
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    from pyramid.events import ContextFound  # type: ignore[import-untyped,import-not-found]
    from pyramid.httpexceptions import HTTPException  # type: ignore[import-untyped,import-not-found]
    from pyramid.tweens import EXCVIEW  # type: ignore[import-untyped,import-not-found]
except ImportError as exc:  # pragma: no cover - only without Pyramid
    raise ImportError(
        "beatlib.contrib.pyramid needs Pyramid 2.x: pip install pyramid"
    ) from exc

from beatlib.client import Client, get_client
from beatlib.config import Config
from beatlib.context import current_transaction, get_active, set_active
from beatlib.contrib import wsgi
from beatlib.guard import guard, report
from beatlib.instrumentation.registry import instrument
from beatlib.tracing import Transaction

logger = logging.getLogger("beatlib")

PREFIX = "beatlib."
REGISTRY_KEY = "beatlib.client"  # request.registry[REGISTRY_KEY] is the app's client

Handler = Callable[[Any], Any]
_inside: ContextVar[bool] = ContextVar("beatlib_pyramid_inside", default=False)


def includeme(config: Any) -> None:
    """Take the client from the `beatlib.client` setting, else make one from the `beatlib.*`
    settings (env vars win), else use the process default client or make one from the env;
    instrument the supported libraries and add the tween over the exception view tween."""
    settings = config.get_settings() or {}
    client = settings.get(REGISTRY_KEY)
    if not isinstance(client, Client):
        mapping = {key[len(PREFIX):]: value for key, value in settings.items()
                   if key.startswith(PREFIX)}
        client = (Client(config=Config.from_mapping(mapping)) if mapping
                  else get_client() or Client())
    try:
        client.framework = ("pyramid", version("pyramid"))
    except PackageNotFoundError:  # pragma: no cover - a vendored Pyramid
        client.framework = ("pyramid", "unknown")
    config.registry[REGISTRY_KEY] = client
    instrument(client.config)
    config.add_tween("beatlib.contrib.pyramid.tween_factory", over=EXCVIEW)
    config.add_subscriber(_route_found, ContextFound)


def _route_found(event: Any) -> None:
    """The route matched: its sensitive variables (`{token}`) are redacted from now on in
    everything the request records, errors logged by the view included."""
    matchdict = getattr(event.request, "matchdict", None)
    tx = current_transaction()
    if matchdict and tx is not None:
        guard("pyramid: route variables").call(tx.set_route_params, matchdict)


def tween_factory(handler: Handler, registry: Any) -> Handler:
    """The tracing tween (Pyramid calls this with the next handler in the chain)."""
    client: Client = registry[REGISTRY_KEY]

    def beatlib_tween(request: Any) -> Any:
        if _inside.get():  # a subrequest is part of its parent's transaction
            return handler(request)
        previous = get_active()
        try:
            wsgi.read_body(request.environ, client.config)
            tx = wsgi.begin_request(client, request.environ, request.method)
        except Exception:  # never let tracing take the request down
            report("pyramid: beginning the request's transaction")
            tx = None
        if tx is None:
            return handler(request)
        token = _inside.set(True)
        try:
            try:
                response = handler(request)
            except BaseException as exc:
                _finish(client, tx, request, exc)
                raise
            finally:
                _inside.reset(token)
            _finish(client, tx, request, None, response)
            return response
        finally:
            set_active(previous)  # the request's transaction never outlives the call here

    return beatlib_tween


def transaction_name(request: Any) -> str:
    """`GET /posts/{id}`: the method and the matched route's pattern."""
    route = getattr(request, "matched_route", None)
    return f"{request.method} {route.pattern if route is not None else 'unknown route'}"


def is_error(exc: BaseException) -> bool:
    """The one rule: an exception the app raised is an error, whatever turned it into a
    response; HTTP exceptions below 500 (HTTPNotFound, HTTPSeeOther) are not."""
    return not isinstance(exc, HTTPException) or (getattr(exc, "code", None) or 500) >= 500


def _finish(client: Client, tx: Transaction, request: Any, raised: BaseException | None,
            response: Any = None) -> None:
    """Name, user and error on the transaction; it ends now if the handler raised, else when
    the server closes the response body (so a streamed body is timed whole)."""
    try:
        if tx.name == request.method:  # not named by the app (beatlib.set_transaction_name)
            tx.name = transaction_name(request)
        _set_user(tx, request)
        environ = request.environ
        if raised is not None:
            if is_error(raised):
                wsgi.capture_request_error(client, environ)
                tx.outcome = tx.outcome or "failure"  # the app's own wins
            wsgi.end_request(tx, 500)
            return
        # An exception view made this response: the exception is still the app's error.
        handled = getattr(request, "exception", None)
        if handled is not None and is_error(handled):
            wsgi.capture_request_error(client, environ, request.exc_info)

        def failed() -> None:
            wsgi.capture_request_error(client, environ)
            tx.outcome = tx.outcome or "failure"  # the app's own wins

        def wrap_body(request: Any) -> None:
            # Finished callbacks run after response callbacks and NewResponse subscribers
            # (which may set headers or replace the body) and before the server reads it.
            try:
                if isinstance(response, HTTPException):
                    # WebOb writes an HTTP exception's body when it is served, only if it has
                    # none: write it now, as it would, before the body is wrapped.
                    response.prepare(request.environ)
                length = response.content_length  # WebOb drops it when the body is replaced
                response.app_iter = wsgi.ClosingIterator(response.app_iter, lambda: (
                    wsgi.end_request(tx, response.status, response.headerlist)), failed, tx)
                response.content_length = length
            except Exception:
                report("pyramid: wrapping the response body")
                wsgi.end_request(tx, getattr(response, "status", None))

        request.add_finished_callback(wrap_body)
    except Exception:
        report("pyramid: finishing the request's transaction")
        wsgi.end_request(tx, 500 if raised is not None else getattr(response, "status", None))


def _set_user(tx: Transaction, request: Any) -> None:
    if not tx.sampled:
        return
    try:
        userid = request.authenticated_userid
    except Exception:  # a security policy failing here is the app's business, not ours
        logger.debug("beatlib: authenticated_userid failed", exc_info=True)
        return
    if userid is not None:
        tx.set_context("user", {"id": userid if isinstance(userid, int | str) else str(userid)},
                       captured=True)
