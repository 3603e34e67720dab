"""Bottle: `app.install(BeatPlugin())`. A transaction per request, begun on the WSGI side before
Bottle's hooks and routing and named by the matched route's rule; errors captured once (also
those `catchall` answered with a 500), ended when the server closes the response body.
"""

from __future__ import annotations

import functools
import inspect
import sys
import weakref
from collections.abc import Callable
from typing import Any

try:
    import bottle  # type: ignore[import-untyped,import-not-found]
except ImportError as exc:  # pragma: no cover - only without Bottle
    raise ImportError(
        "beatlib.contrib.bottle needs Bottle (pip install bottle); it is not installed"
    ) from exc

from beatlib.client import Client, get_client
from beatlib.config import Config
from beatlib.context import get_active, set_active
from beatlib.contrib import wsgi
from beatlib.guard import guard, report
from beatlib.instrumentation.registry import instrument
from beatlib.tracing import Transaction

PREFIX = "beatlib."  # app.config["beatlib.service_name"], or a [beatlib] section of its ini file
_STATE = "beatlib.bottle"  # environ key: the request's _Request
_CAPTURE = guard("bottle: capturing the request's exception")
_END = guard("bottle: ending the request's transaction")
_ROUTED = guard("bottle: naming the request's transaction")


def is_error(exc: BaseException | None) -> bool:
    """The one rule: an exception the app raised is an error, whatever turned it into a
    response; HTTP responses raised below 500 (`abort(404)`, `redirect()`) are not."""
    if exc is None:
        return False
    return not isinstance(exc, bottle.HTTPResponse) or exc.status_code >= 500


class BeatPlugin:
    """A Bottle plugin tracing the app it is installed in, and the apps mounted in it.

    The app's client is `client` if given, else one made from the app's `beatlib.*` config
    keys (`BEATLIB_*` environment variables win), else the default client. One plugin may be
    installed in several apps; `app.uninstall(plugin)` stops tracing that app.
    """

    name = "beatlib"  # Bottle's plugin name: `skip=["beatlib"]`, `app.uninstall("beatlib")`
    api = 2

    def __init__(self, client: Client | None = None) -> None:
        self._client = client
        self.client: Client | None = client  # the client of the app set up last
        self._apps: weakref.WeakSet[bottle.Bottle] = weakref.WeakSet()

    def setup(self, app: bottle.Bottle) -> None:
        """Called by `app.install(plugin)`. A bad setting raises `ConfigError` here."""
        traced = app.__dict__.get("wsgi")
        if isinstance(traced, _TracedWSGI):  # another BeatPlugin traces it already
            self.client = traced.client
            self._apps.add(app)
            return
        client = self._client
        if client is None:
            settings = {key[len(PREFIX):]: value for key, value in app.config.items()
                        if key.startswith(PREFIX)}
            client = (Client(config=Config.from_mapping(settings)) if settings
                      else get_client() or Client())
        if client.framework is None:
            client.framework = ("bottle", bottle.__version__)
        instrument(client.config)
        # Bottle's __call__ calls self.wsgi: the app's own entry point, per app, nothing patched.
        app.wsgi = _TracedWSGI(app, client)  # type: ignore[method-assign]
        self.client = client
        self._apps.add(app)

    def apply(self, callback: Callable[..., Any], route: bottle.Route) -> Callable[..., Any]:
        """The route's callback, naming the transaction by `route` before it runs (route
        variables redacted from then on) and capturing what it raises."""

        def traced_callback(*args: Any, **kwargs: Any) -> Any:
            try:
                request = bottle.request.environ.get(_STATE)
            except RuntimeError:  # called outside a request (`route.call()` in a unit test)
                request = None
            if request is None:  # served without our WSGI side: nothing would end a transaction
                return callback(*args, **kwargs)
            _ROUTED.call(request.routed, route)
            try:
                out = callback(*args, **kwargs)
            except Exception as exc:
                if is_error(exc):
                    request.failed((type(exc), exc, exc.__traceback__))
                raise
            if inspect.isgenerator(out):
                # Its first chunk is produced by Bottle, which answers a failure there with a
                # 500 (catchall): seen here, or never.
                return wsgi.produced(out, request.tx, request.failed)  # type: ignore[arg-type]
            return out

        return traced_callback

    def close(self) -> None:
        """Called by `app.uninstall(plugin)` (and `app.close()`): an app this plugin no
        longer is installed in is served as it was."""
        for app in list(self._apps):
            if any(isinstance(plugin, BeatPlugin) for plugin in app.plugins):
                continue  # app.close(), or another BeatPlugin is still installed
            self._apps.discard(app)
            traced = app.__dict__.get("wsgi")
            if isinstance(traced, _TracedWSGI):
                traced.remove(app)


class _TracedWSGI:
    """`app.wsgi`: the request's transaction around Bottle's own WSGI entry point. It holds
    the app as its bound method would (`handler = app.wsgi` keeps serving)."""

    def __init__(self, app: bottle.Bottle, client: Client) -> None:
        self.app = app
        self.client = client
        self.inner = app.__dict__.get("wsgi")  # what someone else put there before us, if any
        # route -> (its rule then, the name's rule): a mount rewrites rules, rarely.
        self.rules: weakref.WeakKeyDictionary[Any, tuple[str, str]] = (
            weakref.WeakKeyDictionary())

    def rule(self, route: Any) -> str:
        """The route's rule as this app sees it: with the prefix of the app it is mounted in
        (`/api/items/<id>`); `unknown route` when none matched."""
        if route is None:
            return "unknown route"
        cached = self.rules.get(route)
        if cached is not None and cached[0] == route.rule:
            return cached[1]
        if isinstance(_mountpoint(route)[1], bottle.Bottle):
            rule = "unknown route"  # none of the routes of the Bottle app mounted there matched
        else:
            owner = route.app
            while owner.config.get("_mount.app") is not None:  # merged: rules have the prefix
                owner = owner.config["_mount.app"]
            prefix = "" if owner is self.app else _prefix(self.app, owner, 0)
            rule = (prefix or "") + route.rule
        self.rules[route] = (route.rule, rule)
        return rule

    def remove(self, app: bottle.Bottle) -> None:
        if self.inner is not None:
            app.wsgi = self.inner
        else:
            del app.wsgi

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        app = self.app
        serve = self.inner or functools.partial(type(app).wsgi, app)
        if _STATE in environ:  # mounted in an app we trace already: part of its request
            return serve(environ, start_response)
        client = self.client
        previous = get_active()
        try:
            wsgi.read_body(environ, client.config)
            tx = wsgi.begin_request(client, environ)  # None: an ignored URL
        except Exception:  # never let tracing take the request down
            report("bottle: beginning the request's transaction")
            tx = None
        request = environ[_STATE] = _Request(self, tx, client, environ)

        def traced_start_response(status: str, headers: list[tuple[str, str]],
                                  *exc_info: Any) -> Any:
            request.status, request.headers = status, headers
            if exc_info and exc_info[0] is not None:
                request.failed(exc_info[0])  # catchall: Bottle answered it with a 500
            return start_response(status, headers, *exc_info)

        try:
            body = serve(environ, traced_start_response)
        except BaseException:  # catchall off: Bottle let it through, as before
            request.failed()
            _END.call(request.end, 500)
            raise
        finally:
            set_active(previous)  # the request's transaction never outlives the call here
        if tx is None:
            return body
        return wsgi.ClosingIterator(body, lambda: _END.call(request.end), request.failed, tx)


class _Request:
    """One traced request: its transaction and client, the status and headers Bottle sent."""

    __slots__ = ("traced", "tx", "client", "environ", "method", "status", "headers", "named")

    def __init__(self, traced: _TracedWSGI, tx: Transaction | None, client: Client,
                 environ: dict[str, Any]) -> None:
        self.traced, self.tx, self.client, self.environ = traced, tx, client, environ
        self.method = environ.get("REQUEST_METHOD", "GET")
        self.status: Any = 500
        self.headers: Any = None
        self.named = False

    def routed(self, route: Any = None) -> None:
        """Name the transaction by the matched route (once, and not over a name the app
        set) and take its variables' secrets; `route` is Bottle's, by default."""
        if self.named or self.tx is None:
            return
        self.named = True
        environ = self.environ
        route = route or environ.get("bottle.route")
        if self.tx.name == self.method:
            self.tx.name = f"{self.method} {self.traced.rule(route)}"
        params = environ.get("route.url_args")
        if params:
            self.tx.set_route_params(params)

    def failed(self, exc_info: Any = None) -> None:
        """The exception being handled (or `exc_info`) is the request's error: captured once
        (if it is one by the rule), the transaction a failure."""
        with _CAPTURE:
            exc_info = exc_info or sys.exc_info()
            exc = exc_info[1]
            if not is_error(exc):
                return
            while len(exc.args) == 1 and type(exc.args[0]) is type(exc):
                # A Bottle app mounted as a WSGI app: its error comes out wrapped in copies
                # (Bottle's `_raise` of the exc_info passed to start_response, once or twice).
                exc = exc.args[0]
                exc_info = (type(exc), exc, exc.__traceback__)
            self.routed()
            if self.tx is not None:
                self.tx.outcome = "failure"
            wsgi.capture_request_error(self.client, self.environ, exc_info)

    def end(self, status: Any = None) -> None:
        if self.tx is None:
            return
        self.routed()
        wsgi.end_request(self.tx, status or self.status, self.headers)


def _mountpoint(route: Any) -> tuple[str | None, Any]:
    """(prefix, app) of a route `app.mount()` made for a WSGI app, else (None, None)."""
    config = route.config
    target = config.get("mountpoint.target")  # Bottle 0.13 flattens the route's config
    if target is not None:
        return config.get("mountpoint.prefix"), target
    mountpoint = config.get("mountpoint")  # Bottle 0.12 keeps the dict
    if isinstance(mountpoint, dict):
        return mountpoint.get("prefix"), mountpoint.get("target")
    return None, None


def _prefix(app: bottle.Bottle, target: Any, depth: int) -> str | None:
    """The path prefix `target` is mounted at, as a WSGI app, in `app` or an app mounted in
    it (`/api`), or None."""
    if depth > 8:
        return None
    for route in app.routes:
        prefix, mounted = _mountpoint(route)
        if mounted is None or not isinstance(prefix, str):
            continue
        if mounted is target:
            return prefix.rstrip("/")
        if isinstance(mounted, bottle.Bottle):
            inner = _prefix(mounted, target, depth + 1)
            if inner is not None:
                return prefix.rstrip("/") + inner
    return None

