"""grpc.aio for the grpc instrumentation (grpc.py): an exit span per call of every kind on the
channels `grpc.aio.insecure_channel` and `secure_channel` make (interceptors put last), and a
transaction per call a `grpc.aio.server(...)` serves with a coroutine or async generator
handler (an interceptor put first). What is recorded is what the sync side records.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
from collections.abc import Callable
from types import ModuleType
from typing import Any

from packaging.version import Version

from beatlib.context import get_active
from beatlib.guard import report
from beatlib.instrumentation import http_spans
from beatlib.instrumentation.grpc import KINDS, Grpc, destination
from beatlib.tracing import Span


def patch(inst: Grpc, aio: ModuleType) -> None:
    client = _client_interceptors_type(inst, aio)
    server = _server_interceptor_type(inst, aio)
    # Where each takes `interceptors` when it is passed by position.
    inst.wrap(aio, "insecure_channel", functools.partial(_channel_made, client, 3))
    inst.wrap(aio, "secure_channel", functools.partial(_channel_made, client, 4))
    inst.wrap(aio, "server", functools.partial(_server_made, server))


# -- client ----------------------------------------------------------------------------


def _channel_made(interceptors: Callable[[Any], list[Any]], at: int, wrapped: Any, instance: Any,
                  args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    # An asyncio channel takes its interceptors when it is made: ours goes last, nearest the
    # network, so it sees what the app's own interceptors put in the metadata.
    try:
        target = args[0] if args else kwargs.get("target", "")
        if len(args) > at:
            args = (*args[:at], [*(args[at] or ()), *interceptors(target)], *args[at + 1:])
        else:
            kwargs = {**kwargs, "interceptors": [*(kwargs.get("interceptors") or ()),
                                                 *interceptors(target)]}
    except Exception:
        report("grpc: intercepting a new asyncio channel")
    return wrapped(*args, **kwargs)


async def unary_call(inst: Grpc, destination: tuple[str, int | None],
                     continuation: Callable[..., Any], details: Any, request: Any) -> Any:
    """One unary-unary call: it runs in a task of its own (grpc.aio's), so the span being
    active here never shows in the caller's context; it ends when the status is in."""
    if get_active() is None:
        return await continuation(details, request)
    span = inst.client_span(details, destination)
    details = _with_trace_metadata(inst, details)
    try:
        call = await continuation(details, request)
        code = await call.code()
    except BaseException as exc:
        if span is not None:
            span.end(exc)
        raise
    if span is not None:
        if code is not inst.ok:
            span.outcome = "failure"
        span.end()
    return call


async def streaming_call(inst: Grpc, destination: tuple[str, int | None],
                         continuation: Callable[..., Any], details: Any, request: Any) -> Any:
    """A call with a request or a response stream: the span ends when the call is done,
    whatever ends it (the last message, an error, a cancel, the deadline, or the call
    cancelled by grpc when the app drops it unread)."""
    if get_active() is None:
        return await continuation(details, request)
    span = inst.client_span(details, destination)
    details = _with_trace_metadata(inst, details)
    try:
        call = await continuation(details, request)
    except BaseException as exc:
        if span is not None:
            span.end(exc)
        raise
    if span is not None:
        try:
            call.add_done_callback(functools.partial(_call_done, inst, span))
        except Exception:
            report("grpc: following an asyncio call to its end")
            span.end()
    return call


def _call_done(inst: Grpc, span: Span, call: Any) -> None:
    try:
        code = _code_of_done(call)
    except Exception:  # cancelled before it started: no status to read
        code = None
    if code is not inst.ok:
        span.outcome = "failure"
    span.end()


def _code_of_done(call: Any) -> Any:
    """The status code of a call that is done. `code()` is a coroutine that returns without
    waiting once the status is in, so it is run to its end here, in the done callback."""
    running = call.code()
    try:
        running.send(None)
    except StopIteration as done:
        return done.value
    running.close()  # it would have waited: never here for a done call
    return None


def _with_trace_metadata(inst: Grpc, details: Any) -> Any:
    try:
        metadata = list(details.metadata or ())
        extra = http_spans.trace_headers(key for key, _ in metadata)
        if not extra:
            return details
        aio = inst.grpc.aio
        return aio.ClientCallDetails(details.method, details.timeout,
                                     aio.Metadata(*metadata, *extra.items()),
                                     details.credentials, details.wait_for_ready)
    except Exception:
        report("grpc: adding trace metadata")
        return details


# -- server ----------------------------------------------------------------------------


def _server_made(interceptor: Callable[[], Any], wrapped: Any, instance: Any,
                 args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    try:
        if len(args) > 2:
            args = (*args[:2], [interceptor(), *(args[2] or ())], *args[3:])
        else:
            kwargs = {**kwargs, "interceptors": [interceptor(),
                                                 *(kwargs.get("interceptors") or ())]}
    except Exception:
        report("grpc: adding the asyncio server interceptor")
    return wrapped(*args, **kwargs)


async def served(inst: Grpc, continuation: Callable[..., Any], call_details: Any) -> Any:
    """The handler, its behaviour wrapped in a transaction when it is a coroutine function
    (unary responses, or streams written with `context.write`) or an async generator
    function (streamed responses). A sync handler (run on the server's thread pool) is
    served untraced."""
    handler = await continuation(call_details)
    if handler is None:
        return None
    try:
        kind = next(k for k in KINDS if getattr(handler, k, None) is not None)
        method = call_details.method
        method = method.decode("utf-8", "replace") if isinstance(method, bytes) else method
        traced = _traced(inst, getattr(handler, kind), str(method))
        if traced is None:
            return handler
        make = getattr(inst.grpc, f"{kind}_rpc_method_handler")
        return make(traced, request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)
    except Exception:
        report("grpc: wrapping an asyncio server handler")
        return handler


def _traced(inst: Grpc, behaviour: Callable[..., Any],
            method: str) -> Callable[[Any, Any], Any] | None:
    # grpc.aio serves a handler by what it is (a coroutine or async generator function):
    # the wrapper must be the same.
    if inspect.isasyncgenfunction(behaviour):

        async def streamed(request: Any, context: Any) -> Any:
            begun = inst.begin(method, context)
            try:
                async with contextlib.aclosing(behaviour(request, context)) as responses:
                    async for response in responses:
                        yield response
            except BaseException as exc:
                inst.finish(begun, context, exc, _stopped_code(inst, context, exc))
                raise
            inst.finish(begun, context, None)

        return streamed
    if inspect.iscoroutinefunction(behaviour):

        async def awaited(request: Any, context: Any) -> Any:
            begun = inst.begin(method, context)
            try:
                response = await behaviour(request, context)
            except BaseException as exc:
                inst.finish(begun, context, exc, _stopped_code(inst, context, exc))
                raise
            inst.finish(begun, context, None)
            return response

        return awaited
    return None


# The server's deadline starts when the call reaches it, after the caller's: a caller that
# gives up at its deadline cancels the call while the server still has about the request's
# transit time left (more on a busy machine). A cancel this close to the deadline is it.
DEADLINE_GRACE = 0.1


def _stopped_code(inst: Grpc, context: Any, exc: BaseException) -> Any:
    """CANCELLED, or DEADLINE_EXCEEDED when the deadline has passed (or is less than
    DEADLINE_GRACE away), for a handler stopped from outside (cancelled where it awaits, or
    its generator closed where it yields); None (the handler's own code) otherwise."""
    if not isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return None
    try:
        remaining = context.time_remaining()
        codes = inst.grpc.StatusCode
        return codes.DEADLINE_EXCEEDED if remaining is not None \
            and remaining <= DEADLINE_GRACE else codes.CANCELLED
    except Exception:
        report("grpc: reading how a served call stopped")
        return None


# -- interceptors ----------------------------------------------------------------------


def _client_interceptors_type(inst: Grpc, aio: ModuleType) -> Callable[[Any], list[Any]]:
    # A channel files each interceptor under the first kind it is an instance of: one each.
    uu: Any = aio.UnaryUnaryClientInterceptor
    us: Any = aio.UnaryStreamClientInterceptor
    su: Any = aio.StreamUnaryClientInterceptor
    ss: Any = aio.StreamStreamClientInterceptor

    class UnaryUnary(uu):
        def __init__(self, destination: tuple[str, int | None]) -> None:
            self.destination = destination

        async def intercept_unary_unary(self, continuation: Any, details: Any,
                                        request: Any) -> Any:
            return await unary_call(inst, self.destination, continuation, details, request)

    class Streaming:
        def __init__(self, destination: tuple[str, int | None]) -> None:
            self.destination = destination

        async def _intercept(self, continuation: Any, details: Any, request: Any) -> Any:
            return await streaming_call(inst, self.destination, continuation, details, request)

    class UnaryStream(Streaming, us):
        intercept_unary_stream = Streaming._intercept

    class StreamUnary(Streaming, su):
        intercept_stream_unary = Streaming._intercept

    class StreamStream(Streaming, ss):
        intercept_stream_stream = Streaming._intercept

    # Before 1.65 an intercepted stream's `read()` raised StopAsyncIteration at the end where
    # a plain one returns EOF: there, streaming calls are left without an interceptor.
    streams = Version(getattr(inst.grpc, "__version__", "0")) >= Version("1.65")
    kinds = (UnaryUnary, UnaryStream, StreamUnary, StreamStream) if streams else (UnaryUnary,)

    def interceptors(target: Any) -> list[Any]:
        where = destination(target)
        return [kind(where) for kind in kinds]

    return interceptors


def _server_interceptor_type(inst: Grpc, aio: ModuleType) -> Callable[[], Any]:
    base: Any = aio.ServerInterceptor

    class AioServerInterceptor(base):
        async def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
            return await served(inst, continuation, handler_call_details)

    return AioServerInterceptor
