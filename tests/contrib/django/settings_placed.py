"""The test project with the tracing middleware placed by the user (second)."""

from tests.contrib.django.settings import *  # noqa: F403
from tests.contrib.django.settings import MIDDLEWARE

MIDDLEWARE = [MIDDLEWARE[0], "beatlib.contrib.django.TracingMiddleware", *MIDDLEWARE[1:]]
