"""`LoggingHandler` for Django's LOGGING: records of ERROR and above become error events,
with the request when the record carries one (as `django.request`'s records do)."""

from __future__ import annotations

import logging
from typing import Any

from beatlib.client import Client, get_client
from beatlib.contrib import logging as beat_logging
from beatlib.contrib.wsgi import request_context


class LoggingHandler(beat_logging.LoggingHandler):
    """Error events of `client` (default: the Django app's client, else the default client).

    LOGGING = {..., "handlers": {"beatlib": {"class": "beatlib.contrib.django.LoggingHandler"}}}
    An exception already captured (Django logs the one it turned into a 500) is sent once.
    """

    def find_client(self) -> Client | None:
        return _django_client() or get_client()

    def record_context(self, record: logging.LogRecord, client: Client) -> dict[str, Any]:
        request = getattr(record, "request", None)
        if isinstance(getattr(request, "META", None), dict):
            from beatlib.contrib.django.middleware import request_meta

            return {"request": request_context(request_meta(request), client.config,
                                               for_error=True)}
        return {}


def _django_client() -> Client | None:
    try:
        from beatlib.contrib.django.apps import app_client

        return app_client()
    except Exception:  # apps not ready yet (a record logged during setup)
        return None
