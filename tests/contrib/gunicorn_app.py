"""The app the gunicorn tests serve: plain WSGI behind BeatMiddleware (`application`) or the
Pyramid shop (`pyramid_application`). The client is made at import, so with `--preload` it is
made in the master before the fork. Settings come from BEATLIB_* in the environment.

Each response says which process served it (X-Pid); every transaction carries that pid and
the request number (`/work/<n>`) as labels, so a test can match what arrived to what was sent.
"""

from __future__ import annotations

import os
import threading

import beatlib
from beatlib.contrib.wsgi import BeatMiddleware

client = beatlib.Client(service_name="gunicorn-tests")
# What the process looked like right after the client was made (the master, with --preload).
THREADS_AT_IMPORT = threading.active_count()


def app(environ, start_response):
    path = environ["PATH_INFO"]
    beatlib.label(pid=os.getpid(), request=path.rsplit("/", 1)[-1])
    with beatlib.capture_span("work"):
        body = f"{os.getpid()}".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("X-Pid", str(os.getpid()))])
    return [body]


application = BeatMiddleware(app, client)


def pyramid_application():
    """The Pyramid variant (gunicorn `tests.contrib.gunicorn_app:pyramid_application()`)."""
    from pyramid.config import Configurator
    from pyramid.response import Response

    def work(request):
        beatlib.label(pid=os.getpid(), request=request.matchdict["n"])
        return Response(str(os.getpid()), headers={"X-Pid": str(os.getpid())})

    with Configurator(settings={"beatlib.client": client}) as config:
        config.include("beatlib.contrib.pyramid")
        config.add_route("work", "/work/{n}")
        config.add_view(work, route_name="work")
    return config.make_wsgi_app()
