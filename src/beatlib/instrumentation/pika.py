"""pika's `BlockingConnection` channels: `basic_publish` is a `messaging`/`rabbitmq` exit span
with the trace headers in (a copy of) the message's properties; each delivery to a
`basic_consume` callback is a transaction (type `messaging`, `RabbitMQ RECEIVE from <queue>`)
continuing the publisher's trace; `basic_get` inside a transaction is a `poll` span.
"""

from __future__ import annotations

import copy
from types import ModuleType
from typing import Any

from beatlib.context import get_active
from beatlib.guard import report
from beatlib.instrumentation import messaging
from beatlib.instrumentation.registry import Instrumentation, is_instrumented
from beatlib.tracing import call_in, start_span


class Pika(Instrumentation):
    name = "pika"
    module = "pika.adapters.blocking_connection"
    distribution = "pika"
    versions = ">= 1.0, < 2"
    library = "pika (`BlockingConnection`)"
    tested = "1.4.4, RabbitMQ 3.10.8"
    wraps = (
        "`BlockingChannel.basic_publish`, `basic_consume` (each delivery to the"
        " callback), `basic_get`"
    )

    def patch(self, module: ModuleType) -> None:
        from pika.spec import BasicProperties  # type: ignore[import-untyped,import-not-found]

        self._properties = BasicProperties
        self.wrap(module, "BlockingChannel.basic_publish", self._publish)
        self.wrap(module, "BlockingChannel.basic_consume", self._consume)
        self.wrap(module, "BlockingChannel.basic_get", self._get)

    def _publish(self, wrapped: Any, channel: Any, args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> Any:
        if get_active() is None:
            return wrapped(*args, **kwargs)
        exchange = args[0] if args else kwargs.get("exchange")
        routing_key = args[1] if len(args) > 1 else kwargs.get("routing_key")
        span = messaging.start_send("rabbitmq", exchange, routing_key)
        args, kwargs = self._with_trace_headers(args, kwargs)
        return call_in(span, wrapped, args, kwargs)  # unroutable, nacked, closed: raised

    def _with_trace_headers(self, args: tuple[Any, ...], kwargs: dict[str, Any]
                            ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """(args, kwargs) with a copy of the caller's properties that carries the trace
        headers; theirs is never changed."""
        try:
            given = args[3] if len(args) > 3 else kwargs.get("properties")
            properties = self._properties() if given is None else _copy(given)
            headers = messaging.with_trace_headers(getattr(properties, "headers", None))
            if headers is None:
                return args, kwargs
            properties.headers = headers
            if len(args) > 3:
                return (*args[:3], properties, *args[4:]), kwargs
            return args, {**kwargs, "properties": properties}
        except Exception:  # odd properties: sent as they are, untraced
            report("pika: adding trace headers")
            return args, kwargs

    def _consume(self, wrapped: Any, channel: Any, args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> Any:
        try:
            queue = args[0] if args else kwargs.get("queue")
            if len(args) > 1:
                args = (args[0], _traced_callback(args[1], queue), *args[2:])
            elif callable(kwargs.get("on_message_callback")):
                kwargs = {**kwargs, "on_message_callback": _traced_callback(
                    kwargs["on_message_callback"], queue)}
        except Exception:
            report("pika: tracing a consumer")
        return wrapped(*args, **kwargs)

    def _get(self, wrapped: Any, channel: Any, args: tuple[Any, ...],
             kwargs: dict[str, Any]) -> Any:
        if get_active() is None:
            return wrapped(*args, **kwargs)
        queue = args[0] if args else kwargs.get("queue")
        name = messaging.destination_name(queue, None)
        span = start_span(f"RabbitMQ POLL from {name}", "messaging", "rabbitmq", "poll",
                          leaf=True)
        if span is None:
            return wrapped(*args, **kwargs)
        span.set_context("message", messaging.receive_context(queue, None), captured=True)
        try:
            result = wrapped(*args, **kwargs)
        except BaseException as exc:
            span.end(exc)
            raise
        span.end()
        return result


def _copy(properties: Any) -> Any:
    """A shallow copy of a `BasicProperties` (a plain object: its dict copied, a third of
    what `copy.copy` costs)."""
    if type(properties).__reduce_ex__ is not object.__reduce_ex__ or not hasattr(
            properties, "__dict__"):
        return copy.copy(properties)
    new = object.__new__(type(properties))
    new.__dict__.update(properties.__dict__)
    return new


def _traced_callback(callback: Any, queue: Any) -> Any:
    """`callback` run, for each delivery, in a transaction continuing the message's trace
    (a span when a transaction is already open), while pika is instrumented."""
    from beatlib.jobs import transaction  # the job API: begins, names, captures, ends

    name = f"RabbitMQ RECEIVE from {messaging.destination_name(queue, None)}"

    def traced(channel: Any, method: Any, properties: Any, body: Any) -> Any:
        if not is_instrumented("pika"):
            return callback(channel, method, properties, body)
        with transaction(name, "messaging", headers=getattr(properties, "headers", None)
                         ) as segment:
            if segment is not None and get_active() is segment:
                try:
                    segment.set_context("message", messaging.receive_context(
                        queue, getattr(method, "routing_key", None)), captured=True)
                except Exception:
                    report("pika: consumer context")
            return callback(channel, method, properties, body)

    return traced
