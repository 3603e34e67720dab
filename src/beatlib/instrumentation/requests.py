"""requests: one `external`/`http` span per `Session.send` (redirects followed inside it), and
W3C trace headers on the request. See `http_spans` for what the span holds."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from beatlib.context import get_active
from beatlib.guard import report
from beatlib.instrumentation import http_spans
from beatlib.instrumentation.registry import Instrumentation


class Requests(Instrumentation):
    name = "requests"
    module = "requests"
    distribution = "requests"
    versions = ">= 2.20, < 3"
    library = "requests"
    tested = "2.34"
    wraps = "`Session.send`"

    def patch(self, module: ModuleType) -> None:
        self.wrap(module, "Session.send", _send)


def _send(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if get_active() is None:
        return wrapped(*args, **kwargs)
    request: Any = args[0] if args else kwargs.get("request")
    span = http_spans.start(getattr(request, "method", ""), getattr(request, "url", ""))
    extra = http_spans.trace_headers(getattr(request, "headers", None))
    if extra:
        try:
            # A copy, so the caller's PreparedRequest is left as it was (re-sending it later
            # must not carry this span's id); `response.request` is the copy, as sent.
            request = request.copy()
            request.headers.update(extra)
            if args:
                args = (request, *args[1:])
            else:
                kwargs = {**kwargs, "request": request}
        except Exception:  # an odd request object: sent untouched
            report("requests: adding trace headers")
    return http_spans.call(span, wrapped, args, kwargs, "status_code")  # stream=True: see call
