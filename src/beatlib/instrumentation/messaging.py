"""What the message broker instrumentations (pika, kombu) share: the exit span for one publish
(`RabbitMQ SEND to <exchange or queue>`, type `messaging`), the trace headers to add to a
copy of the message's headers, and the transaction of a consumer callback.

Only names are recorded (exchange, queue, routing key): never bodies or header values.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

from beatlib.context import get_active
from beatlib.tracing import Span, outgoing_headers, start_span

SYSTEM = {"rabbitmq": "RabbitMQ"}
_NAME_LIMIT = 1024  # the schema's limit on a queue name

# The send span an integration above the library opened (Celery's, around kombu's publish):
# the publish it wraps gets no second span.
sending: ContextVar[Span | None] = ContextVar("beatlib_messaging_send", default=None)


def recorded(headers: Any) -> bool:
    """Whether the message with these `headers` is the one whose `sending` span is open (its
    `traceparent` names that span)."""
    span = sending.get()
    if span is None or span.ended:
        return False
    try:
        return bool(headers.get("traceparent") == span.traceparent())
    except Exception:
        return False


def destination_name(exchange: Any, routing_key: Any) -> str:
    """The exchange, or the queue (routing key) when published to the default exchange."""
    name = getattr(exchange, "name", exchange)  # a kombu Exchange or its name
    if not name:
        name = routing_key
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    return str(name or "<default>")[:_NAME_LIMIT]


def start_send(subtype: str, exchange: Any, routing_key: Any) -> Span | None:
    """Open the exit span of a publish, or None when nothing is recorded."""
    active = get_active()
    if active is None or active.leaf or not active.transaction.sampled:
        return None  # start_span would say so too; this skips the names' work before it
    name = destination_name(exchange, routing_key)
    span = start_span(f"{SYSTEM.get(subtype, subtype)} SEND to {name}", "messaging", subtype,
                      "send", leaf=True)
    if span is not None:
        span.set_context("message", _message(name, routing_key), captured=True)
    return span


def with_trace_headers(headers: Any) -> dict[str, Any] | None:
    """A copy of the message's `headers` with `traceparent` (and `tracestate`, `baggage`)
    naming the active span added, or None when nothing is added: outside a transaction, or
    when the caller set a `traceparent` of their own (kept as it is). A `tracestate` or
    `baggage` the caller set is kept too."""
    extra = outgoing_headers()
    if extra is None:
        return None
    if headers is None:
        return extra
    if not hasattr(headers, "items"):
        return None
    present = {k.lower() for k in headers if isinstance(k, str)}
    if "traceparent" in present:
        return None
    return {**headers, **{k: v for k, v in extra.items() if k not in present}}


def receive_context(queue: Any, routing_key: Any) -> dict[str, Any]:
    """The `message` context of a consumer's transaction."""
    return _message(destination_name(queue, routing_key), routing_key)


def _message(name: str, routing_key: Any) -> dict[str, Any]:
    message: dict[str, Any] = {"queue": {"name": name}}
    if isinstance(routing_key, str) and routing_key:
        message["routing_key"] = routing_key[:_NAME_LIMIT]
    return message
