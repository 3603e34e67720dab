"""The test project's settings: a small shop with auth, sessions, an ORM model on SQLite,
templates, a custom handler500 and Django's request logger sent to beatlib."""

import os
import tempfile
from pathlib import Path

SECRET_KEY = "tests-only-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["*"]
USE_TZ = True
ROOT_URLCONF = "tests.contrib.django.urls"
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "beatlib.contrib.django",
    "tests.contrib.django.shop",
]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
]
TEMPLATES = [{
    "BACKEND": "django.template.backends.django.DjangoTemplates",
    "APP_DIRS": True,
    "OPTIONS": {"context_processors": ["django.contrib.auth.context_processors.auth"]},
}]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("SHOP_DB") or str(Path(tempfile.gettempdir()) / "shop.sqlite3"),
    }
}
UPSTREAM_URL = os.environ.get("UPSTREAM_URL", "http://127.0.0.1:9/ok")

BEATLIB = {
    "SERVICE_NAME": "shop",
    "SERVER_URL": os.environ.get("RECEIVER_URL", "http://127.0.0.1:8200"),
    "ENVIRONMENT": "test",
    "FLUSH_INTERVAL": "100ms",
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"beatlib": {"class": "beatlib.contrib.django.LoggingHandler"}},
    "loggers": {
        "django.request": {"handlers": ["beatlib"], "level": "ERROR", "propagate": False},
        "shop": {"handlers": ["beatlib"], "level": "INFO"},
    },
}
