"""What the HTTP client instrumentations (requests, urllib3, httpx) share: the exit span for one
outgoing request (name `GET host[:port]`, URL, destination, service target), its end
(status code, outcome failure on 4xx, 5xx or an exception) and the W3C trace headers to add.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

from beatlib.context import get_active
from beatlib.guard import report
from beatlib.tracing import Span, outgoing_headers, start_span

DEFAULT_PORTS = {"http": 80, "https": 443}


def start(method: Any, url: Any) -> Span | None:
    """Open the exit span (a leaf: the library underneath records nothing more), or None when
    nothing is recorded. Never raises: a URL we cannot read gives no span, the call still runs.
    The name shows the port only when it is not the scheme's default: `GET example.com`,
    `GET 127.0.0.1:8081`; the service target always has it: `example.com:443`."""
    active = get_active()
    if active is None or active.leaf or not active.transaction.sampled:
        return None  # start_span would say so too; this skips the URL work before it
    try:
        method = method.decode("ascii") if isinstance(method, bytes) else str(method)
        method = method.upper()
        url = url.decode("utf-8", "replace") if isinstance(url, bytes) else str(url)
        parts = urlsplit(url)
        host = parts.hostname or ""
        default = DEFAULT_PORTS.get(parts.scheme.lower())
        port = parts.port or default
        shown = f"[{host}]" if ":" in host else host  # an IPv6 literal
        name = f"{method} {shown}" if port == default else f"{method} {shown}:{port}"
        context: dict[str, Any] = {
            "http": {"url": url, "method": method},  # redacted by the client's processors
            "destination": {"address": host, "port": port},
            "service": {"target": {"type": "http", "name": f"{shown}:{port}"}},
        }
    except Exception:
        report("http: starting an outgoing request span")
        return None
    span = start_span(name, "external", "http", method, leaf=True)
    if span is not None:
        span.context = context
    return span


def end(span: Span | None, status: Any = None, exc: BaseException | None = None) -> None:
    """End the span with the response's status code or the exception raised. A 4xx is a
    failure too: from the caller's side the call did not do what it asked (Elastic's agents
    and OpenTelemetry's client spans count it so); a server's own 4xx answers do not."""
    if span is None:
        return
    if isinstance(status, int) and span.context is not None:
        span.context["http"]["response"] = {"status_code": status}
        if status >= 400:
            span.outcome = "failure"
    span.end(exc)


def call(span: Span | None, wrapped: Callable[..., Any], args: tuple[Any, ...],
         kwargs: dict[str, Any], status: str) -> Any:
    """`wrapped(*args, **kwargs)` timed by `span`, its exception re-raised unchanged. A streamed
    response ends the span when the call returns it (headers in); the body stays readable."""
    try:
        response = wrapped(*args, **kwargs)
    except BaseException as exc:
        end(span, exc=exc)
        raise
    end(span, getattr(response, status, None))
    return response


def trace_headers(headers: Iterable[Any] | None) -> dict[str, str] | None:
    """`traceparent` (and `tracestate`) naming the active span or transaction, less any the
    caller already set (theirs win); None outside a transaction or when they set traceparent."""
    try:
        present = set()
        for key in headers or ():
            key = key.decode("latin-1") if isinstance(key, bytes) else key
            if isinstance(key, str):
                present.add(key.lower())
        if "traceparent" in present:
            return None
        ours = outgoing_headers()
        return {k: v for k, v in ours.items() if k not in present} if ours else None
    except Exception:
        report("http: trace headers of an outgoing request")
        return None


_FRAMING = frozenset(("content-length", "transfer-encoding"))


def placed(items: Iterable[tuple[Any, Any]], extra: dict[str, str]) -> list[tuple[Any, Any]]:
    """Header pairs with `extra` inserted before the first framing header (Content-Length,
    Transfer-Encoding), which some strict servers expect last; else at the end."""
    out: list[tuple[Any, Any]] = []
    pending = list(extra.items())
    for name, value in items:
        key = name.decode("latin-1") if isinstance(name, bytes) else str(name)
        if pending and key.lower() in _FRAMING:
            out.extend(pending)
            pending = []
        out.append((name, value))
    return out + pending
