"""aiohttp client: one `external`/`http` span per `ClientSession._request` (what `get`, `post`,
`request` and `ws_connect` all await; redirects followed inside it), and W3C trace headers on
the request. See `http_spans` for what the span holds.

`_request` rather than aiohttp's `TraceConfig` hooks: those are fixed when a session is made,
so sessions created before `instrument()` would go untraced, and they fire once per redirect.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from beatlib.context import get_active
from beatlib.guard import report
from beatlib.instrumentation import http_spans
from beatlib.instrumentation.http_spans import placed
from beatlib.instrumentation.registry import Instrumentation


class Aiohttp(Instrumentation):
    name = "aiohttp"
    module = "aiohttp"
    distribution = "aiohttp"
    versions = ">= 3.9, < 4"
    library = "aiohttp (client)"
    tested = "3.14"
    wraps = (
        "`ClientSession._request`, which `request`, `get`, `post`, ... and `ws_connect` await"
    )

    def patch(self, module: ModuleType) -> None:
        import multidict  # aiohttp's own dependency: its header type

        self._headers = multidict.CIMultiDict
        self._response_error = module.ClientResponseError
        self.wrap(module, "ClientSession._request", self._request)

    async def _request(self, wrapped: Any, session: Any, args: tuple[Any, ...],
                       kwargs: dict[str, Any]) -> Any:
        if get_active() is None:
            return await wrapped(*args, **kwargs)
        method = args[0] if args else kwargs.get("method", "")
        target = args[1] if len(args) > 1 else kwargs.get("str_or_url", "")
        span = http_spans.start(method, _url(session, target, kwargs.get("params")))
        headers = self._with_trace_headers(session, kwargs.get("headers"))
        if headers is not None:
            kwargs = {**kwargs, "headers": headers}
        try:
            # The span ends when the response headers are in: aiohttp reads the body later.
            response = await wrapped(*args, **kwargs)
        except BaseException as exc:
            # raise_for_status=True: the answer came, and its status is on the exception.
            status = exc.status if isinstance(exc, self._response_error) else None
            http_spans.end(span, status, exc)
            raise
        http_spans.end(span, getattr(response, "status", None))
        return response

    def _with_trace_headers(self, session: Any, headers: Any) -> Any:
        """A copy of the caller's `headers` with the trace headers placed in it, or None when
        none are added (a traceparent of theirs, or of the session's defaults, is kept)."""
        try:
            given = list(headers.items() if hasattr(headers, "items") else headers or ())
            defaults = getattr(session, "headers", None) or ()
            extra = http_spans.trace_headers([*defaults, *(name for name, _ in given)])
            return self._headers(placed(given, extra)) if extra else None
        except Exception:  # odd headers: sent as they are, untraced
            report("aiohttp: adding trace headers")
            return None


def _url(session: Any, target: Any, params: Any) -> Any:
    """The URL asked for, as aiohttp builds it: joined to the session's `base_url`, with
    `params` added to its query (credentials and secrets are redacted by the processors)."""
    try:
        url = session._build_url(target)
        extend = getattr(url, "extend_query", None)  # yarl 1.9+; else the path alone
        return extend(params) if params and extend is not None else url
    except Exception:  # aiohttp will say what is wrong with it; the span gets what was given
        return target
