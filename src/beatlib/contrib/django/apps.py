"""The app config: at `ready()`, the client from `settings.BEATLIB` (env vars win), the
libraries instrumented, the tracing middleware first in MIDDLEWARE unless the user placed it,
and `got_request_exception` connected."""

from __future__ import annotations

import logging
from typing import Any

import django  # type: ignore[import-untyped,import-not-found]
from django.apps import AppConfig, apps  # type: ignore[import-untyped,import-not-found]
from django.conf import settings  # type: ignore[import-untyped,import-not-found]
from django.core import checks  # type: ignore[import-untyped,import-not-found]
from django.core.signals import got_request_exception  # type: ignore[import-untyped,import-not-found]

from beatlib.client import Client, get_client
from beatlib.config import Config, ConfigError
from beatlib.contrib.wsgi import capture_request_error
from beatlib.guard import report
from beatlib.instrumentation.registry import instrument

logger = logging.getLogger("beatlib.contrib.django")

MIDDLEWARE = "beatlib.contrib.django.middleware.TracingMiddleware"
_PLACED = (MIDDLEWARE, "beatlib.contrib.django.TracingMiddleware")


class BeatlibConfig(AppConfig):
    name = "beatlib.contrib.django"
    label = "beatlib"
    verbose_name = "beatlib"
    client: Client | None = None
    config_error: ConfigError | None = None

    def ready(self) -> None:
        checks.register(check_settings)
        try:
            self.client = client = make_client()
        except ConfigError as exc:
            # Never take the site down: logged here, and an error of `manage.py check`
            # (so runserver and migrate stop on it), while production runs untraced.
            self.config_error = exc
            logger.error("beatlib: BEATLIB settings are invalid, nothing is recorded: %s", exc)
            return
        if not client.config.enabled:
            return
        instrument(client.config)
        middleware = list(getattr(settings, "MIDDLEWARE", None) or [])
        if not any(path in _PLACED for path in middleware):
            settings.MIDDLEWARE = [MIDDLEWARE, *middleware]
        got_request_exception.connect(_request_failed, dispatch_uid="beatlib")


def make_client() -> Client:
    """A client from `settings.BEATLIB` (a dict, any key case; `BEATLIB_*` env vars win)."""
    client = Client(config=Config.from_mapping(getattr(settings, "BEATLIB", None) or {}))
    client.framework = ("django", django.get_version())
    return client


def app_client() -> Client | None:
    """The app config's client (None if its settings are invalid); without the app in
    INSTALLED_APPS, the default client or a new one."""
    if apps.is_installed("beatlib.contrib.django"):
        return apps.get_app_config("beatlib").client  # type: ignore[no-any-return]
    try:
        return get_client() or make_client()
    except ConfigError as exc:
        logger.error("beatlib: BEATLIB settings are invalid, nothing is recorded: %s", exc)
        return None


def check_settings(app_configs: Any = None, **_: Any) -> list[Any]:
    """The system check: invalid BEATLIB settings are an error of `manage.py check`."""
    error = apps.get_app_config("beatlib").config_error
    if error is None:
        return []
    return [checks.Error(f"BEATLIB settings are invalid: {error}", id="beatlib.E001",
                         hint="see the configuration reference in beatlib's docs")]


def _request_failed(sender: Any, request: Any = None, **_: Any) -> None:
    """An exception Django turns into a 500 (or re-raises): captured once, with the request
    and the user; Django's own handling (500 page, handler500, debug page) runs unchanged."""
    try:
        from beatlib.contrib.django.middleware import form_fields, record_user, request_meta

        client = app_client()
        if client is None:
            return
        meta = getattr(request, "META", None)
        if meta is None:
            client.capture_exception(handled=False)
            return
        record_user(request)
        form_fields(request)
        capture_request_error(client, request_meta(request))
    except Exception:
        report("django: capturing the request's exception")
