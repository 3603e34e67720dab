"""urllib3: one `external`/`http` span per `HTTPConnectionPool.urlopen` (retries and redirects
it follows itself inside it; a PoolManager follows redirects with one urlopen per hop, so one
span per hop), and W3C trace headers on the request. Under requests nothing is recorded here.

beatlib's own transport sends with urllib3 from its worker thread, where no transaction is
ever active, so the fast path lets it through untraced and without trace headers.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from beatlib.context import get_active
from beatlib.guard import report
from beatlib.instrumentation import http_spans
from beatlib.instrumentation.registry import Instrumentation

_HEADERS = 3  # position of `headers` in urlopen(method, url, body, headers, ...)


class Urllib3(Instrumentation):
    name = "urllib3"
    module = "urllib3"
    distribution = "urllib3"
    versions = ">= 1.26, < 3"
    library = "urllib3"
    tested = "2.8"
    wraps = "`HTTPConnectionPool.urlopen`"

    def patch(self, module: ModuleType) -> None:
        self.wrap(module, "HTTPConnectionPool.urlopen", _urlopen)


def _url(pool: Any, url: str) -> str:
    if "://" in url:  # absolute: a request through a proxy
        return url
    host = f"[{pool.host}]" if ":" in pool.host else pool.host
    port = f":{pool.port}" if pool.port else ""
    return f"{pool.scheme}://{host}{port}{url}"


def _urlopen(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if get_active() is None:
        return wrapped(*args, **kwargs)
    method = args[0] if args else kwargs.get("method", "")
    url = args[1] if len(args) > 1 else kwargs.get("url", "")
    try:
        span = http_spans.start(method, _url(instance, url))
    except Exception:  # an odd pool: no span; the trace headers still go out
        report("urllib3: starting a request span")
        span = None
    positional = len(args) > _HEADERS
    headers: Any = args[_HEADERS] if positional else kwargs.get("headers")
    if headers is None:
        headers = getattr(instance, "headers", None)  # what urlopen itself falls back to
    extra = http_spans.trace_headers(headers)
    if extra:
        try:
            # A new mapping of the same type: the caller's (requests passes its own
            # request.headers, the pool its defaults) is left as it was.
            headers = _copy(headers, http_spans.placed(_pairs(headers), extra))
            if positional:
                args = (*args[:_HEADERS], headers, *args[_HEADERS + 1 :])
            else:
                kwargs = {**kwargs, "headers": headers}
        except Exception:  # an odd headers object: sent untouched
            report("urllib3: adding trace headers")
    return http_spans.call(span, wrapped, args, kwargs, "status")  # preload_content=False too


def _pairs(headers: Any) -> Any:
    """Every (name, value) pair, a repeated header's values each (HTTPHeaderDict)."""
    return headers.iteritems() if hasattr(headers, "iteritems") else headers.items()


def _copy(headers: Any, pairs: list[tuple[Any, Any]]) -> Any:
    if hasattr(headers, "add"):  # urllib3's HTTPHeaderDict: repeated names kept
        out = type(headers)()
        for name, value in pairs:
            out.add(name, value)
        return out
    return type(headers)(pairs) if isinstance(headers, dict) else dict(pairs)
