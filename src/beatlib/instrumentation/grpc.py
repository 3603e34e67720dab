"""grpcio: an `external`/`grpc` exit span per call on the channels `insecure_channel` and
`secure_channel` make (a client interceptor added at creation, or by `intercept_channel` to a
channel made before `instrument()`; W3C trace context in the call metadata), and a `request`
transaction per call a `grpc.server(...)` serves (a server interceptor put first, continuing
the caller's trace). Outcomes follow Elastic's gRPC spec. `grpc.aio` is in grpc_aio.py,
built on the pieces here.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Callable
from types import ModuleType
from typing import Any

from beatlib.context import get_active, set_active
from beatlib.guard import report
from beatlib.instrumentation import http_spans
from beatlib.instrumentation.registry import Instrumentation
from beatlib.tracing import Span, Transaction, parse_traceparent, start_span

# What the server did wrong, as its caller sees it; any other code is the caller's doing.
SERVER_FAILURES = frozenset((
    "UNKNOWN", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",
    "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
))  # fmt: skip
KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


class Grpc(Instrumentation):
    name = "grpc"
    module = "grpc"
    distribution = "grpcio"
    versions = ">= 1.60, < 2"  # the oldest tested; ServicerContext.code() needs 1.38
    library = "grpcio (client and server, `grpc.aio` too)"
    tested = "1.60.2, 1.65.0, 1.85.3"
    wraps = (
        "`insecure_channel` and `secure_channel` (the channel they return gets a client"
        " interceptor), `intercept_channel` (for channels made before `instrument()`),"
        " `server` (gets a server interceptor); the same three of `grpc.aio`"
    )

    def patch(self, module: ModuleType) -> None:
        self.grpc = module
        self.ok = module.StatusCode.OK
        self._details = _call_details_type(module)
        self._client = _client_interceptor_type(self, module)
        self._server = _server_interceptor_type(self, module)
        self._intercept = module.intercept_channel  # the original: ours is added with it
        self.wrap(module, "insecure_channel", self._channel)
        self.wrap(module, "secure_channel", self._channel)
        self.wrap(module, "intercept_channel", self._intercept_channel)
        self.wrap(module, "server", self._server_made)
        aio = getattr(module, "aio", None)
        if aio is not None:
            from beatlib.instrumentation import grpc_aio  # it builds on this module

            grpc_aio.patch(self, aio)

    # -- client ------------------------------------------------------------------------

    def _channel(self, wrapped: Any, instance: Any, args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> Any:
        channel = wrapped(*args, **kwargs)
        try:
            target = args[0] if args else kwargs.get("target", "")
            return self._intercept(channel, self._client(target))
        except Exception:
            report("grpc: intercepting a new channel")
            return channel

    def _intercept_channel(self, wrapped: Any, instance: Any, args: tuple[Any, ...],
                           kwargs: dict[str, Any]) -> Any:
        # A bare channel here was made before instrument(); one made since has ours already.
        try:
            channel = args[0] if args else None
            kind = type(channel)
            if (kind.__module__, kind.__qualname__) == ("grpc._channel", "Channel"):
                target = channel._channel.target()  # type: ignore[union-attr]
                args = (self._intercept(channel, self._client(target)), *args[1:])
        except Exception:
            report("grpc: intercepting a channel")
        return wrapped(*args, **kwargs)

    def client_call(self, destination: tuple[str, int | None], continuation: Callable[..., Any],
                    details: Any, request: Any) -> Any:
        """One call through the client interceptor: the span, the trace metadata, the span
        ended when the call completes (at once for a blocking call, later for a future or a
        stream), from its status code."""
        if get_active() is None:
            return continuation(details, request)
        span = self.client_span(details, destination)
        details = self._with_trace_metadata(details)
        try:
            call = continuation(details, request)
        except BaseException as exc:
            if span is not None:
                span.end(exc)
            raise
        if span is not None:
            try:
                call.add_done_callback(lambda done: self._client_done(span, done))
            except Exception:
                report("grpc: following a call to its end")
                span.end()
            if get_active() is span:  # a future or a stream: the caller goes on without it
                set_active(span.parent)
        return call

    def client_span(self, details: Any, destination: tuple[str, int | None]) -> Span | None:
        active = get_active()
        if active is None or active.leaf or not active.transaction.sampled:
            return None
        try:
            method = details.method
            method = method.decode("utf-8", "replace") if isinstance(method, bytes) else str(method)
            host, port = destination
            shown = f"[{host}]" if ":" in host else host
            where = f"{shown}:{port}" if port is not None else shown
            context: dict[str, Any] = {"service": {"target": {"type": "grpc", "name": where}}}
            if host:
                context["destination"] = {"address": host, **({"port": port} if port else {})}
        except Exception:
            report("grpc: starting a call span")
            return None
        span = start_span(method, "external", "grpc", leaf=True)
        if span is not None:
            span.context = context
        return span

    def _client_done(self, span: Span, call: Any) -> None:
        try:
            code = call.code()
        except Exception:  # cancelled before it started: no code to read
            code = None
        if code is not self.ok:
            span.outcome = "failure"
        span.end()

    def _with_trace_metadata(self, details: Any) -> Any:
        try:
            metadata = list(details.metadata or ())
            extra = http_spans.trace_headers(key for key, _ in metadata)
            if not extra:
                return details
            return self._details(details.method, details.timeout, (*metadata, *extra.items()),
                                 details.credentials, getattr(details, "wait_for_ready", None),
                                 getattr(details, "compression", None))
        except Exception:
            report("grpc: adding trace metadata")
            return details

    # -- server ------------------------------------------------------------------------

    def _server_made(self, wrapped: Any, instance: Any, args: tuple[Any, ...],
                     kwargs: dict[str, Any]) -> Any:
        try:
            if len(args) > 2:
                given = args[2]
                args = (*args[:2], [self._server(), *(given or ())], *args[3:])
            else:
                kwargs = {**kwargs, "interceptors": [self._server(),
                                                     *(kwargs.get("interceptors") or ())]}
        except Exception:
            report("grpc: adding the server interceptor")
        return wrapped(*args, **kwargs)

    def served(self, continuation: Callable[..., Any], call_details: Any) -> Any:
        """The handler `continuation` finds, its behaviour wrapped in a transaction."""
        handler = continuation(call_details)
        if handler is None:
            return None
        try:
            kind = next(k for k in KINDS if getattr(handler, k, None) is not None)
            behaviour = getattr(handler, kind)
            method = call_details.method
            method = method.decode("utf-8", "replace") if isinstance(method, bytes) else method
            wrapper = self._streamed if handler.response_streaming else self._answered
            traced = _bind(wrapper, behaviour, str(method))
            make = getattr(self.grpc, f"{kind}_rpc_method_handler")
            return make(traced, request_deserializer=handler.request_deserializer,
                        response_serializer=handler.response_serializer)
        except Exception:
            report("grpc: wrapping a server handler")
            return handler

    def begin(self, method: str, context: Any) -> tuple[Any, Transaction] | None:
        from beatlib.client import get_client  # the app's client: a server call has no tracer yet

        client = get_client()
        if client is None:
            return None
        parent = tracestate = baggage = None
        try:
            for key, value in context.invocation_metadata() or ():
                if key == "traceparent" and parent is None:
                    parent = value
                elif key == "tracestate" and tracestate is None:
                    tracestate = value
                elif key == "baggage" and baggage is None:
                    baggage = value
        except Exception:
            report("grpc: reading the call metadata")
        tx = client.begin_transaction("request", parse_traceparent(parent, tracestate), baggage)
        tx.name = method  # now, so errors captured inside carry it
        return client, tx

    def finish(self, begun: tuple[Any, Transaction] | None, context: Any,
               exc: BaseException | None, code: Any = None) -> None:
        """End the transaction with the status code the caller gets: `code` when given (a
        call stopped from outside), else the one the handler set (`set_code`, `abort`), else
        OK, or UNKNOWN when it raised (that error is captured)."""
        if begun is None:
            return
        client, tx = begun
        try:
            code = code or context.code()
            if code is None and exc is not None:
                code = self.grpc.StatusCode.UNKNOWN
                if isinstance(exc, Exception):
                    client.capture_exception(exc, handled=False)
            name = getattr(code, "name", None) or "OK"
            tx.outcome = "failure" if name in SERVER_FAILURES else "success"
            tx.end(result=name)
        except Exception:
            report("grpc: ending a served call")
            tx.end()

    def _answered(self, behaviour: Callable[..., Any], method: str, request: Any,
                  context: Any) -> Any:
        begun = self.begin(method, context)
        try:
            response = behaviour(request, context)
        except BaseException as exc:
            self.finish(begun, context, exc)
            raise
        self.finish(begun, context, None)
        return response

    def _streamed(self, behaviour: Callable[..., Any], method: str, request: Any,
                  context: Any) -> Any:
        begun = self.begin(method, context)
        try:
            yield from behaviour(request, context)
        except BaseException as exc:
            self.finish(begun, context, exc)
            raise
        self.finish(begun, context, None)


def _bind(wrapper: Callable[..., Any], behaviour: Callable[..., Any],
          method: str) -> Callable[[Any, Any], Any]:
    def traced(request: Any, context: Any) -> Any:
        return wrapper(behaviour, method, request, context)

    return traced


def destination(target: Any) -> tuple[str, int | None]:
    """(host, port) of a channel target: `host:port`, `[::1]:port`, `dns:///host:port`,
    `ipv4:1.2.3.4:port`; a bare host has gRPC's default port, 443; a unix socket has none."""
    try:
        target = target.decode() if isinstance(target, bytes) else str(target)
        if target.startswith(("unix:", "unix-abstract:")):
            return "", None
        target = re.sub(r"^(dns|ipv4|ipv6):(//[^/]*/)?", "", target).split(",")[0]
        found = re.fullmatch(r"\[([^\]]*)\](?::(\d+))?|([^:]*)(?::(\d+))?", target)
        if found is None:  # an IPv6 literal without brackets
            return target, 443
        host = found.group(1) if found.group(1) is not None else found.group(3) or ""
        port = found.group(2) or found.group(4)
        return host, int(port) if port else 443
    except Exception:
        return "", None


def _call_details_type(grpc: ModuleType) -> type:

    base: Any = grpc.ClientCallDetails  # the module is only known at patch time

    fields = collections.namedtuple("fields", (
        "method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"))

    class CallDetails(fields, base):
        """A call's details with our metadata added (grpc's own type is private)."""

    return CallDetails


def _client_interceptor_type(inst: Grpc, grpc: ModuleType) -> Callable[[Any], Any]:
    uu: Any = grpc.UnaryUnaryClientInterceptor
    us: Any = grpc.UnaryStreamClientInterceptor
    su: Any = grpc.StreamUnaryClientInterceptor
    ss: Any = grpc.StreamStreamClientInterceptor

    class ClientInterceptor(uu, us, su, ss):
        def __init__(self, target: Any) -> None:
            self.destination = destination(target)

        def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
            return inst.client_call(self.destination, continuation, details, request)

        intercept_unary_stream = intercept_unary_unary
        intercept_stream_unary = intercept_unary_unary
        intercept_stream_stream = intercept_unary_unary

    return ClientInterceptor


def _server_interceptor_type(inst: Grpc, grpc: ModuleType) -> Callable[[], Any]:
    base: Any = grpc.ServerInterceptor

    class ServerInterceptor(base):
        def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
            return inst.served(continuation, handler_call_details)

    return ServerInterceptor
