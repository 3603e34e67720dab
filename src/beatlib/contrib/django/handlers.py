"""`LoggingHandler` for Django's LOGGING: records of ERROR and above become error events,
with the request when the record carries one (as `django.request`'s records do)."""

from __future__ import annotations

import logging
import threading
from typing import Any

from beatlib.client import Client, get_client
from beatlib.contrib.wsgi import request_context

_LEVELS = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warning",
           logging.ERROR: "error", logging.CRITICAL: "critical"}  # fmt: skip
_emitting = threading.local()


class LoggingHandler(logging.Handler):
    """Error events of `client` (default: the Django app's client, else the default client).

    LOGGING = {..., "handlers": {"beatlib": {"class": "beatlib.contrib.django.LoggingHandler"}}}
    An exception already captured (Django logs the one it turned into a 500) is sent once.
    """

    def __init__(self, client: Client | None = None, level: int | str = logging.ERROR) -> None:
        super().__init__(level)
        self.client = client

    def emit(self, record: logging.LogRecord) -> None:
        name = record.name
        # Never beatlib's own records (they may be about sending), nor what capturing logs.
        if name == "beatlib" or name.startswith("beatlib.") or getattr(_emitting, "on", False):
            return
        _emitting.on = True
        try:
            client = self.client or _django_client() or get_client()
            if client is None:
                return
            extra: dict[str, Any] = {}
            meta = getattr(getattr(record, "request", None), "META", None)
            if isinstance(meta, dict):
                extra["request"] = request_context(meta, client.config, for_error=True)
            if record.exc_info and record.exc_info[1] is not None:
                client.capture_exception(record.exc_info, **extra)  # type: ignore[arg-type]
            else:
                level = _LEVELS.get(record.levelno) or record.levelname.lower()
                param = record.msg if record.args and isinstance(record.msg, str) else None
                client.capture_message(record.getMessage(), level=level, param_message=param,
                                       **extra)
        except Exception:  # a logging handler must never raise into the code that logged
            pass
        finally:
            _emitting.on = False


def _django_client() -> Client | None:
    try:
        from beatlib.contrib.django.apps import app_client

        return app_client()
    except Exception:  # apps not ready yet (a record logged during setup)
        return None
