"""The processes of the OpenTelemetry interop tests: services and clients traced by the
OpenTelemetry Python SDK or by beatlib, one per process, talking HTTP on 127.0.0.1.

    python -m tests.otel_peers otel-service     # prints its port; GET /call?url=, /spans
    python -m tests.otel_peers beatlib-service  # prints its port; GET /call?url=, /events
    python -m tests.otel_peers otel-client URL [BAGGAGE]     # prints its spans as JSON
    python -m tests.otel_peers beatlib-client URL [BAGGAGE]  # prints its events as JSON

A service answers `/call?url=U` by calling U (inside its server span or transaction) and
returning `{"seen": <the trace headers it received>, "downstream": <U's answer>}`; any other
path returns `{"seen": ...}`. The OpenTelemetry side records with the SDK's
`InMemorySpanExporter`, the beatlib side with `MemorySender`.
"""

from __future__ import annotations

import json
import sys
from typing import Any
from urllib.parse import parse_qs, unquote

from werkzeug.serving import make_server

TRACE_HEADERS = ("traceparent", "tracestate", "baggage")


def seen(environ: dict[str, Any]) -> dict[str, str]:
    return {name: environ["HTTP_" + name.upper()] for name in TRACE_HEADERS
            if "HTTP_" + name.upper() in environ}


def answer(start_response: Any, body: Any) -> list[bytes]:
    data = json.dumps(body).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(data)))])
    return [data]


def otel_setup() -> Any:
    """A tracer provider exporting to memory, requests instrumented; W3C trace context and
    baggage are the SDK's default propagators."""
    from opentelemetry import trace
    from opentelemetry.instrumentation.requests import RequestsInstrumentor
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    RequestsInstrumentor().instrument()
    return exporter


def otel_spans(exporter: Any) -> list[dict[str, Any]]:
    out = []
    for span in exporter.get_finished_spans():
        ctx = span.get_span_context()
        out.append({
            "name": span.name, "kind": span.kind.name,
            "trace_id": "%032x" % ctx.trace_id, "span_id": "%016x" % ctx.span_id,
            "flags": int(ctx.trace_flags),
            "parent_id": "%016x" % span.parent.span_id if span.parent else None,
            "parent_remote": bool(span.parent and span.parent.is_remote),
        })
    return out


def otel_service() -> Any:
    import requests
    from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware

    exporter = otel_setup()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ["PATH_INFO"] == "/spans":
            return answer(start_response, otel_spans(exporter))
        body: dict[str, Any] = {"seen": seen(environ)}
        if environ["PATH_INFO"] == "/call":
            url = parse_qs(environ["QUERY_STRING"])["url"][0]
            body["downstream"] = requests.get(url, timeout=10).json()
        return answer(start_response, body)

    return OpenTelemetryMiddleware(app)


def beatlib_service() -> Any:
    import requests

    import beatlib
    from beatlib.contrib.wsgi import BeatMiddleware
    from beatlib.transport.memory import MemorySender

    sender = MemorySender()
    client = beatlib.Client(service_name="beatlib-peer", sender=sender, flush_interval=0.1)

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        body: dict[str, Any] = {"seen": seen(environ)}
        if environ["PATH_INFO"] == "/call":
            url = parse_qs(environ["QUERY_STRING"])["url"][0]
            body["downstream"] = requests.get(url, timeout=10).json()
        return answer(start_response, body)

    traced = BeatMiddleware(app, client=client)  # instruments requests too

    def outer(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ["PATH_INFO"] == "/events":  # untraced: what was recorded so far
            client.flush()
            return answer(start_response, {kind: sender.events(kind)
                                           for kind in ("transaction", "span")})
        return traced(environ, start_response)

    return outer


def otel_client(url: str, baggage: str | None) -> Any:
    import requests
    from opentelemetry import baggage as otel_baggage
    from opentelemetry import context, trace

    exporter = otel_setup()
    token = None
    if baggage:
        ctx = None
        for member in baggage.split(","):
            key, _, value = member.partition("=")
            ctx = otel_baggage.set_baggage(unquote(key), unquote(value), ctx)
        token = context.attach(ctx)
    with trace.get_tracer("interop").start_as_current_span("otel root"):
        reply = requests.get(url, timeout=10).json()
    if token is not None:
        context.detach(token)
    return {"spans": otel_spans(exporter), "reply": reply}


def beatlib_client(url: str, baggage: str | None) -> Any:
    import requests

    import beatlib
    from beatlib.transport.memory import MemorySender

    sender = MemorySender()
    client = beatlib.Client(service_name="beatlib-caller", sender=sender)
    beatlib.instrument()
    client.begin_transaction("script", baggage=baggage)
    reply = requests.get(url, timeout=10).json()
    client.end_transaction("beatlib root", "success")
    client.flush()
    return {"reply": reply, "transaction": sender.events("transaction"),
            "span": sender.events("span")}


def main(argv: list[str]) -> None:
    role = argv[0]
    if role.endswith("-client"):
        run = otel_client if role == "otel-client" else beatlib_client
        print(json.dumps(run(argv[1], argv[2] if len(argv) > 2 else None)), flush=True)
        return
    app = otel_service() if role == "otel-service" else beatlib_service()
    server = make_server("127.0.0.1", 0, app, threaded=True)
    print(server.server_port, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
