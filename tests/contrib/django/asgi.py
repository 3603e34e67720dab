"""The test project's ASGI application (`uvicorn tests.contrib.django.asgi:application`);
ASGI_PLAIN=1: Django's own, without beatlib's lifespan."""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.contrib.django.settings")

if os.environ.get("ASGI_PLAIN"):
    from django.core.asgi import get_asgi_application
else:
    from beatlib.contrib.django.asgi import get_asgi_application

application = get_asgi_application()
