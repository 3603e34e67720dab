"""httpx: one `external`/`http` span per `Client.send` / `AsyncClient.send` (redirects and auth
round trips followed inside it), and W3C trace headers on the request. See `http_spans`."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from beatlib.context import get_active
from beatlib.guard import report
from beatlib.instrumentation import http_spans
from beatlib.instrumentation.http_spans import placed
from beatlib.instrumentation.registry import Instrumentation
from beatlib.tracing import Span


class Httpx(Instrumentation):
    name = "httpx"
    module = "httpx"
    distribution = "httpx"
    versions = ">= 0.23, < 1"
    library = "httpx"
    tested = "0.28"
    wraps = "`Client.send`, `AsyncClient.send`"

    def patch(self, module: ModuleType) -> None:
        self.wrap(module, "Client.send", _send)
        self.wrap(module, "AsyncClient.send", _send_async)


def _start(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Span | None, Any, Any]:
    """The span, and the request with the trace headers added to it (or None, None)."""
    request: Any = args[0] if args else kwargs.get("request")
    span = http_spans.start(getattr(request, "method", ""), getattr(request, "url", ""))
    extra = http_spans.trace_headers(getattr(request, "headers", None))
    if extra:
        try:
            # On the request itself, as httpx's auth flows do: redirects and auth retries
            # copy their headers from it. The caller's headers come back in _restore.
            original = request.headers
            request.headers = type(original)(placed(original.multi_items(), extra))
            return span, request, original
        except Exception:  # an odd request object: sent untouched
            report("httpx: adding trace headers")
    return span, None, None


def _restore(request: Any, original: Any) -> None:
    """Leave the caller's Request as it was, so sending it again later (maybe in another
    transaction) gets fresh trace headers rather than keeping this span's."""
    if request is not None:
        request.headers = original


# Without stream=True, send() reads the body, so the span includes it; with stream=True the
# span ends when send() returns the response (headers in) and the body stays readable.


def _send(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if get_active() is None:
        return wrapped(*args, **kwargs)
    span, request, added = _start(args, kwargs)
    try:
        return http_spans.call(span, wrapped, args, kwargs, "status_code")
    finally:
        _restore(request, added)


async def _send_async(
    wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    if get_active() is None:
        return await wrapped(*args, **kwargs)
    span, request, added = _start(args, kwargs)
    try:
        response = await wrapped(*args, **kwargs)
    except BaseException as exc:
        http_spans.end(span, exc=exc)
        raise
    finally:
        _restore(request, added)
    http_spans.end(span, getattr(response, "status_code", None))
    return response
