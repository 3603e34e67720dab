"""Django settings for an app's own test suite with beatlib: the app's test settings (the
module named by BEATLIBTEST_APP_SETTINGS) plus what docs/django.md asks a user to add, the
app in INSTALLED_APPS (which puts the middleware first in MIDDLEWARE) and BEATLIB."""

import importlib
import os

from beatlib_app_plugin import SERVICE, receiver_url

_app = importlib.import_module(os.environ["BEATLIBTEST_APP_SETTINGS"])
globals().update({name: value for name, value in vars(_app).items() if name.isupper()})

INSTALLED_APPS = [*INSTALLED_APPS, "beatlib.contrib.django"]  # type: ignore[name-defined] # noqa: F821
BEATLIB = {"SERVICE_NAME": SERVICE, "SERVER_URL": receiver_url(), "FLUSH_INTERVAL": "1s"}
