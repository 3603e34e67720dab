"""Django: put "beatlib.contrib.django" in INSTALLED_APPS and a `BEATLIB` settings dict in
settings.py. The app config creates the client, instruments the libraries, inserts
`TracingMiddleware` at the top of MIDDLEWARE and captures unhandled exceptions once.
"""

from __future__ import annotations

try:
    import django  # type: ignore[import-untyped,import-not-found]  # noqa: F401
except ImportError as exc:  # pragma: no cover - only without Django
    raise ImportError(
        "beatlib.contrib.django needs Django (pip install django); it is not installed"
    ) from exc

from beatlib.contrib.django.handlers import LoggingHandler
from beatlib.contrib.django.middleware import TracingMiddleware

__all__ = ["LoggingHandler", "TracingMiddleware"]
