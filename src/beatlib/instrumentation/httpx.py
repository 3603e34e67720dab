"""httpx: one `external`/`http` span per `Client.send` / `AsyncClient.send` (redirects and auth
round trips followed inside it), and W3C trace headers on the request. See `http_spans`."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from beatlib.context import get_active
from beatlib.instrumentation import http_spans
from beatlib.instrumentation.registry import Instrumentation
from beatlib.tracing import Span


class Httpx(Instrumentation):
    name = "httpx"
    module = "httpx"
    distribution = "httpx"
    versions = ("0.23", "1")

    def patch(self, module: ModuleType) -> None:
        self.wrap(module, "Client.send", _send)
        self.wrap(module, "AsyncClient.send", _send_async)


def _start(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Span | None:
    request: Any = args[0] if args else kwargs.get("request")
    span = http_spans.start(getattr(request, "method", ""), getattr(request, "url", ""))
    extra = http_spans.trace_headers(getattr(request, "headers", None))
    if extra:
        try:
            # Set on the request itself, as httpx's own auth flows do: it is what is sent,
            # what redirects copy their headers from, and what `response.request` shows.
            request.headers.update(extra)
        except Exception:
            pass  # an odd request object: send it untouched
    return span


# Without stream=True, send() reads the body, so the span includes it; with stream=True the
# span ends when send() returns the response (headers in) and the body stays readable.


def _send(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if get_active() is None:
        return wrapped(*args, **kwargs)
    span = _start(args, kwargs)
    try:
        response = wrapped(*args, **kwargs)
    except BaseException as exc:
        http_spans.end(span, exc=exc)
        raise
    http_spans.end(span, getattr(response, "status_code", None))
    return response


async def _send_async(
    wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    if get_active() is None:
        return await wrapped(*args, **kwargs)
    span = _start(args, kwargs)
    try:
        response = await wrapped(*args, **kwargs)
    except BaseException as exc:
        http_spans.end(span, exc=exc)
        raise
    http_spans.end(span, getattr(response, "status_code", None))
    return response
