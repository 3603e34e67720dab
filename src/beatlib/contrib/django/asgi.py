"""`get_asgi_application()`: Django's, with the ASGI lifespan answered so that what is queued
is sent when the server shuts down (uvicorn ends on SIGTERM by raising it again, skipping the
interpreter's exit hooks; Django itself refuses lifespan, so nothing else would send it)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from beatlib.guard import guard

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

_SHUTDOWN = guard("django: sending what is queued at lifespan shutdown")


def get_asgi_application() -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """In asgi.py, instead of Django's own: HTTP (and any other scope but lifespan) goes to
    Django's handler unchanged."""
    from django.core.asgi import get_asgi_application as django_application  # type: ignore[import-untyped,import-not-found]

    return Lifespan(django_application())


class Lifespan:
    """An ASGI app (`app`) that knows nothing of lifespan, with lifespan answered: startup
    complete at once; at shutdown, the Django app's client flushed (from a thread, at most
    `shutdown_timeout`), then shutdown complete."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "lifespan":
            await self.app(scope, receive, send)
            return
        while True:
            message = await receive()
            kind = message.get("type")
            if kind == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif kind == "lifespan.shutdown":
                with _SHUTDOWN:
                    from beatlib.contrib.django.apps import app_client

                    client = app_client()
                    if client is not None:
                        await asyncio.get_running_loop().run_in_executor(None, client.flush)
                await send({"type": "lifespan.shutdown.complete"})
                return
