"""pytest plugin for a web app's own test suite: beatlib enabled as a user enables it for the
framework (BEATLIBTEST_APP_FRAMEWORK): Flask, `Beat(app)` on every app the suite creates;
Pyramid, `config.include("beatlib.contrib.pyramid")` before each `config.make_wsgi_app()`;
Django, the settings of beatlib_app_settings (INSTALLED_APPS and BEATLIB added to the app's).

Beside beatlib, and without asking it, the plugin notes every request the framework
dispatches in each test and the name its route gives (the naming rules of docs/flask.md,
docs/pyramid.md and docs/django.md). At the end it writes to BEATLIBTEST_SUITE_REPORT, for
run.py to compare: those requests and the transactions that arrived per test, spans by type,
invalid lines, beatlib's internal errors and its warnings.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import wrapt
from beatlib_suite_plugin import _load_receiver

import beatlib
from beatlib import guard
from beatlib.instrumentation.registry import instrumented

FRAMEWORK = os.environ.get("BEATLIBTEST_APP_FRAMEWORK", "")
SERVICE = "app-suite"

_receiver = _load_receiver()().start()
_test: dict[str, Any] = {"id": None}
_intervals: list[tuple[int, int, str]] = []  # (start µs, end µs, test id), in run order
_requests: dict[str, list[list[Any]]] = collections.defaultdict(list)  # test -> [name, result]
_responses: list[Any] = []  # the test client responses of the running test


class _Records(logging.Handler):
    """beatlib's own warnings and errors (an internal error is logged by beatlib.guard)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.name}: {record.getMessage()}"[:500])


_records = _Records()
logging.getLogger("beatlib").addHandler(_records)


def receiver_url() -> str:
    return str(_receiver.url)


def _new_client() -> beatlib.Client:
    return beatlib.Client(service_name=SERVICE, server_url=receiver_url(), flush_interval="1s",
                          environ={})  # fmt: skip


def _note(name: str, status: int | None) -> list[Any]:
    """One request the framework dispatched: [its name by its route, its result if known]."""
    noted = [name, None if status is None else f"HTTP {status // 100}xx"]
    _requests[_test["id"] or "(outside a test)"].append(noted)
    return noted


def _noting(name_of: Callable[[Any, int | None], str]) -> Any:
    """A wrapper of the framework's request handling (`handle(request) -> response`) that
    notes each request, the outermost only (a subrequest belongs to its parent's
    transaction), also when the handling raised (no result then)."""
    depth = [0]

    def handle(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        depth[0] += 1
        status = None
        try:
            response = wrapped(*args, **kwargs)
            status = response.status_code
            return response
        finally:
            depth[0] -= 1
            if depth[0] == 0:
                _note(name_of(args[0] if args else kwargs["request"], status), status)

    return handle


def _hook_flask() -> Any:
    import flask
    import werkzeug.test

    from beatlib.contrib.flask import Beat

    client = _new_client()

    def init(wrapped: Any, app: Any, args: Any, kwargs: Any) -> None:
        wrapped(*args, **kwargs)
        Beat(app, client=client)  # as the app's own code would, once the app exists

    # Every app the suite makes, whether by a factory or at import: the plugin is imported
    # (by -p) before the suite's conftest files and modules.
    wrapt.wrap_function_wrapper(flask.Flask, "__init__", init)

    def started(app: Any, **_: Any) -> None:
        request = flask.request
        route = request.url_rule.rule if request.url_rule is not None else "unknown route"
        request.environ["beatlibtest.noted"] = _note(f"{request.method} {route}", None)

    def finished(app: Any, response: Any = None, **_: Any) -> None:
        noted = flask.request.environ.get("beatlibtest.noted")
        if noted is not None and response is not None:
            noted[1] = f"HTTP {response.status_code // 100}xx"

    flask.request_started.connect(started, weak=False)
    flask.request_finished.connect(finished, weak=False)

    # A server closes every response it sent (which ends the transaction); werkzeug's test
    # client leaves a response open unless the test reads it to the end. Closed after the
    # test, as a server would have done.
    def opened(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        response = wrapped(*args, **kwargs)
        _responses.append(response)
        return response

    wrapt.wrap_function_wrapper(werkzeug.test.Client, "open", opened)
    return client


def _hook_pyramid() -> Any:
    from pyramid.config import Configurator
    from pyramid.router import Router

    client = _new_client()

    def make_wsgi_app(wrapped: Any, config: Any, args: Any, kwargs: Any) -> Any:
        # As the app's main() would: the `beatlib.client` setting, then the include.
        config.registry.settings["beatlib.client"] = client
        config.include("beatlib.contrib.pyramid")
        return wrapped(*args, **kwargs)

    wrapt.wrap_function_wrapper(Configurator, "make_wsgi_app", make_wsgi_app)

    def name(request: Any, status: int | None) -> str:
        route = getattr(request, "matched_route", None)
        return f"{request.method} {route.pattern if route is not None else 'unknown route'}"

    wrapt.wrap_function_wrapper(Router, "invoke_request", _noting(name))
    return client


def _hook_django() -> None:
    from django.core.handlers.base import BaseHandler

    def name(request: Any, status: int | None) -> str:
        route = getattr(getattr(request, "resolver_match", None), "route", None)
        if isinstance(route, str):
            return f"{request.method} {route or '/'}"
        # No pattern matched (404), or a middleware answered before resolving.
        return f"{request.method} unknown route" if status == 404 else str(request.method)

    # The full middleware chain (test Client, runserver, any WSGI server); RequestFactory
    # requests call a view directly, as they do without beatlib: no transaction.
    wrapt.wrap_function_wrapper(BaseHandler, "get_response", _noting(name))


_client: Any = None
if FRAMEWORK == "flask":
    _client = _hook_flask()
elif FRAMEWORK == "pyramid":
    _client = _hook_pyramid()
elif FRAMEWORK == "django":
    _hook_django()  # the client is the app config's, from beatlib_app_settings
else:
    raise RuntimeError(f"BEATLIBTEST_APP_FRAMEWORK={FRAMEWORK!r}: flask, pyramid or django")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    _test["id"] = item.nodeid
    start = time.time_ns() // 1000
    try:
        yield
    finally:
        _test["id"] = None
        _intervals.append((start, time.time_ns() // 1000, item.nodeid))
        while _responses:
            _responses.pop().close()


def _app_client() -> Any:
    if FRAMEWORK != "django":
        return _client
    from django.apps import apps

    return apps.get_app_config("beatlib").client if apps.ready else None


def _test_of(timestamp: int) -> str:
    for start, end, nodeid in _intervals:
        if start <= timestamp <= end:
            return nodeid
    return "(outside a test)"


def pytest_unconfigure(config: pytest.Config) -> None:
    client = _app_client()
    flushed = client.flush(30) if client is not None else None
    stats = client.stats() if client is not None else {}
    if client is not None:
        client.close(10)
    # Not every event comes through that client: a Django test that changes INSTALLED_APPS
    # (modify_settings) has the app registry make the app configs anew, and so a client of
    # its own, which sends on its flush interval (and at exit, too late for this receiver).
    _receiver.wait_for("transaction", sum(len(r) for r in _requests.values()), timeout=20)
    _receiver.stop()
    transactions = _receiver.events("transaction")
    per_test: dict[str, dict[str, list[Any]]] = collections.defaultdict(
        lambda: {"requests": [], "transactions": []})
    for nodeid, requests in _requests.items():
        per_test[nodeid]["requests"] = requests
    for tx in transactions:
        per_test[_test_of(tx["timestamp"])]["transactions"].append([tx["name"], tx["result"]])
    spans = _receiver.events("span")
    report = {
        "instrumented": instrumented(),
        "flushed": flushed,
        "client_stats": stats,
        "requests": sum(len(r) for r in _requests.values()),
        "transactions": len(transactions),
        "transaction_types": dict(collections.Counter(tx["type"] for tx in transactions)),
        "spans": dict(collections.Counter(f"{s['type']}/{s.get('subtype')}" for s in spans)),
        "errors": len(_receiver.events("error")),
        "invalid_lines": len(_receiver.invalid),
        "internal_errors": guard.counts(),
        "beatlib_log": _records.messages[:50],
        "tests": per_test,
    }
    path = os.environ.get("BEATLIBTEST_SUITE_REPORT")
    if path:
        Path(path).write_text(json.dumps(report))
    print("\nbeatlib:", json.dumps({k: v for k, v in report.items() if k != "tests"}))
