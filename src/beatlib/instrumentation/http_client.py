"""http.client (and so urllib.request): one `external`/`http` span per request on an
`HTTPConnection`, from `putrequest` (or `request()`, which calls it) to `getresponse`, and W3C
trace headers on it. Under another HTTP client's span (urllib3, requests: leaf spans) and on
beatlib's own worker thread (no transaction) nothing is recorded and nothing added.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from beatlib.context import get_active, set_active
from beatlib.guard import report
from beatlib.instrumentation import http_spans
from beatlib.instrumentation.registry import Instrumentation
from beatlib.tracing import Span

# On the connection, between putrequest and getresponse: (span or None, trace headers or None).
_PENDING = "_beatlib_request"


class HTTPClient(Instrumentation):
    name = "http.client"
    module = "http.client"
    library = "http.client (standard library), and so urllib.request"
    wraps = (
        "`HTTPConnection` (and `HTTPSConnection`) `putrequest`, `endheaders`, `getresponse`, "
        "`close`: `request()` and the low-level `putrequest`/`putheader`/`endheaders` calls "
        "alike"
    )

    def patch(self, module: ModuleType) -> None:
        self.wrap(module, "HTTPConnection.putrequest", _putrequest)
        self.wrap(module, "HTTPConnection.endheaders", _endheaders)
        self.wrap(module, "HTTPConnection.getresponse", _getresponse)
        self.wrap(module, "HTTPConnection.close", _close)


def _url(connection: Any, target: Any) -> str:
    target = target.decode("latin-1") if isinstance(target, bytes) else str(target)
    if "://" in target:  # absolute: a request through a proxy
        return target
    host, port = connection.host, connection.port
    tunnel = getattr(connection, "_tunnel_host", None)
    if tunnel:  # CONNECT through a proxy: the request goes to the tunnel's far end
        host, port = tunnel, getattr(connection, "_tunnel_port", None) or 443
    default = getattr(connection, "default_port", 80)
    scheme = "https" if default == 443 or tunnel else "http"
    # An IPv6 literal is bracketed; `user:password@host` (urllib.request passes it on from
    # the URL it was given) is kept as a URL's userinfo, for the processors to redact.
    shown = f"[{host}]" if ":" in host and "@" not in host else host
    where = shown if port in (None, http_spans.DEFAULT_PORTS[scheme]) else f"{shown}:{port}"
    return f"{scheme}://{where}{target}"


def _unanswered(connection: Any) -> None:
    """End the span of a request sent whose response was never asked for: outcome unknown."""
    pending = connection.__dict__.pop(_PENDING, None)
    if pending is not None and pending[0] is not None:
        if pending[0].outcome is None:
            pending[0].outcome = "unknown"
        http_spans.end(pending[0])


def _putrequest(wrapped: Any, instance: Any, args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> Any:
    active = get_active()
    if active is None or active.leaf:  # untraced, or inside urllib3's (requests') own span
        return wrapped(*args, **kwargs)
    result = wrapped(*args, **kwargs)  # a refused method or URL raises here: no request
    span: Span | None = None
    try:
        _unanswered(instance)  # an earlier request on it (defensive: http.client refuses one)
        method = args[0] if args else kwargs.get("method", "")
        url = args[1] if len(args) > 1 else kwargs.get("url", "")
        span = http_spans.start(method, _url(instance, url))
        extra = http_spans.trace_headers(None)  # naming the span, while it is active
        if span is not None or extra:
            instance.__dict__[_PENDING] = (span, extra)
    except Exception:
        report("http.client: starting a request span")
    finally:
        # Not left active: the caller may do other work before getresponse (or never call it).
        set_active(active)
    return result


def _endheaders(wrapped: Any, instance: Any, args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> Any:
    # Taken off while it runs, so a close() inside (a refused tunnel) does not end the span.
    pending = instance.__dict__.pop(_PENDING, None)
    if pending is None:
        return wrapped(*args, **kwargs)
    if pending[1]:
        try:
            _add_headers(instance, pending[1])
        except Exception:  # an odd connection: sent untouched
            report("http.client: adding trace headers")
    try:
        result = wrapped(*args, **kwargs)  # connects and sends: refused, reset, timeout here
    except BaseException as exc:
        http_spans.end(pending[0], exc=exc)
        raise
    instance.__dict__[_PENDING] = pending
    return result


def _add_headers(connection: Any, extra: dict[str, str]) -> None:
    """Put the trace headers among those already buffered (the request line first, then one
    `Name: value` line each), before the first framing header, less any the caller set."""
    buffer = connection._buffer
    names = [line.split(b":", 1)[0].strip().lower() for line in buffer[1:]]
    if b"traceparent" in names:
        return  # the caller's own: theirs wins
    ours = [b"%s: %s" % (k.encode("ascii"), v.encode("latin-1")) for k, v in extra.items()
            if k.encode("ascii") not in names]
    framing = [i for i, name in enumerate(names, 1) if name in _FRAMING]
    at = framing[0] if framing else len(buffer)
    buffer[at:at] = ours


_FRAMING = (b"content-length", b"transfer-encoding")  # which some strict servers expect last


def _getresponse(wrapped: Any, instance: Any, args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> Any:
    # Taken off first: getresponse closes the connection itself when the response will close.
    pending = instance.__dict__.pop(_PENDING, None)
    if pending is None:
        return wrapped(*args, **kwargs)
    try:
        response = wrapped(*args, **kwargs)
    except BaseException as exc:
        http_spans.end(pending[0], exc=exc)
        raise
    # The status line and headers are in; the body stays unread for the caller.
    http_spans.end(pending[0], getattr(response, "status", None))
    return response


def _close(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if _PENDING in instance.__dict__:
        _unanswered(instance)  # closed before its response was asked for
    return wrapped(*args, **kwargs)
