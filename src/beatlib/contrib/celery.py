"""Celery: each task run is a transaction (type "celery", named by the task), its failure one
error, and the trace goes from the publisher to the worker in the task message's headers.

`register()` connects Celery's signals (Celery 5.x, task protocol 2); without Celery
installed it says so and does nothing.
"""

from __future__ import annotations

import logging
from typing import Any

from beatlib import context
from beatlib.client import Client, get_client
from beatlib.guard import report
from beatlib.instrumentation.messaging import sending
from beatlib.tracing import Span, Transaction, outgoing_headers, parse_traceparent, start_span

try:
    from celery import signals  # type: ignore[import-untyped,import-not-found]
except ImportError:  # pragma: no cover - exercised only without celery
    signals = None

logger = logging.getLogger("beatlib")

_client: Client | None = None
# task state -> outcome; other states (IGNORED, REJECTED, REVOKED) are "unknown"
_OUTCOMES = {"SUCCESS": "success", "FAILURE": "failure", "RETRY": "failure"}
# broker URL scheme -> the publish span's subtype, as Elastic names messaging systems; a
# transport they have no name for (Redis, memory, SQLAlchemy, filesystem) keeps "celery"
_BROKERS = {"amqp": "rabbitmq", "amqps": "rabbitmq", "pyamqp": "rabbitmq",
            "librabbitmq": "rabbitmq", "sqs": "sqs", "azureservicebus": "azureservicebus",
            "azurestoragequeues": "azurequeue", "confluentkafka": "kafka"}


def register(client: Client | None = None) -> bool:
    """Record Celery tasks with `client` (default: the default client when each task runs).
    Idempotent; call it where the worker and the publishers import their Celery app."""
    global _client
    if signals is None:
        logger.info("beatlib: celery is not installed; nothing to register")
        return False
    _client = client
    for signal, receiver in _receivers():
        signal.connect(receiver, weak=False, dispatch_uid=f"beatlib.{receiver.__name__}")
    return True


def unregister() -> None:
    """Disconnect what `register()` connected."""
    global _client
    _client = None
    if signals is not None:
        for signal, receiver in _receivers():
            signal.disconnect(receiver, dispatch_uid=f"beatlib.{receiver.__name__}")


def _receivers() -> list[tuple[Any, Any]]:
    return [
        (signals.before_task_publish, _before_publish),
        (signals.after_task_publish, _after_publish),
        (signals.task_prerun, _prerun),
        (signals.task_failure, _failure),
        (signals.task_postrun, _postrun),
        (signals.worker_process_shutdown, _process_shutdown),
    ]


def broker_subtype(app: Any) -> str:
    """The messaging system `app` publishes to, from its broker URL's scheme (no more of the
    URL is read: it may hold a password)."""
    conf = getattr(app, "conf", None)
    url = (conf.broker_write_url or conf.broker_url) if conf is not None else None
    if isinstance(url, (list, tuple)):
        url = url[0] if url else None
    scheme = str(url or "amqp://").split(";", 1)[0].split("://", 1)[0].split("+", 1)[0]
    return _BROKERS.get(scheme.strip().lower(), "celery")


def _before_publish(sender: Any = None, headers: Any = None, routing_key: Any = None,
                    **kw: Any) -> None:
    try:
        if not isinstance(headers, dict) or context.current_transaction() is None:
            return
        from celery import current_app  # the app publishing: the signal does not name it

        span = start_span(f"Celery send {sender}", "messaging", broker_subtype(current_app),
                          "send", leaf=True)
        if span is not None:
            if isinstance(routing_key, str) and routing_key:
                span.set_context("message", {"queue": {"name": routing_key}}, captured=True)
            # Not left active: the send may fail and never reach after_task_publish.
            context.set_active(span.parent)
            sending.set(span)  # kombu's publish underneath: no second span
            headers["traceparent"] = span.traceparent()
            if span.transaction.tracestate:
                headers["tracestate"] = span.transaction.tracestate
            if span.transaction.baggage:
                headers["baggage"] = span.transaction.baggage
        else:
            headers.update(outgoing_headers() or {})
    except Exception:
        report("celery: before_task_publish")


def _after_publish(**kw: Any) -> None:
    span = sending.get()
    if span is not None:
        sending.set(None)
        span.end()


def _prerun(task_id: Any = None, task: Any = None, **kw: Any) -> None:
    try:
        client = _client or get_client()
        if client is None or task is None:
            return
        request = task.request
        name = getattr(task, "name", None) or str(task)
        segment: Transaction | Span | None
        if context.current_transaction() is not None:  # run eagerly inside a transaction
            segment = start_span(name, "app", "internal", "celery")
        else:
            parent = parse_traceparent(
                getattr(request, "traceparent", None), getattr(request, "tracestate", None)
            )
            segment = client.begin_transaction("celery", trace_parent=parent,
                                               baggage=getattr(request, "baggage", None))
            segment.name = name
        request._beatlib_segment = segment
    except Exception:
        report("celery: task_prerun")


def _failure(sender: Any = None, task_id: Any = None, exception: Any = None,
             traceback: Any = None, **kw: Any) -> None:  # fmt: skip
    try:
        client = _client or get_client()
        if client is None or not isinstance(exception, BaseException):
            return
        request = getattr(sender, "request", None)
        task = {
            "name": getattr(sender, "name", None),
            "id": task_id,
            "retries": getattr(request, "retries", None),
            "queue": (getattr(request, "delivery_info", None) or {}).get("routing_key"),
            "hostname": getattr(request, "hostname", None),
        }
        exc_info = (type(exception), exception, traceback)
        client.capture_exception(exc_info, handled=False, celery=task)
    except Exception:
        report("celery: task_failure")


def _postrun(task: Any = None, state: Any = None, **kw: Any) -> None:
    try:
        request: Any = getattr(task, "request", None)
        segment = getattr(request, "_beatlib_segment", None)
        if segment is None:
            return
        request._beatlib_segment = None
        outcome = _OUTCOMES.get(state, "unknown")
        if isinstance(segment, Span):
            segment.outcome = outcome
            segment.end()
        else:
            segment.outcome = segment.outcome or outcome
            segment.end(result=segment.result or (state if isinstance(state, str) else None))
    except Exception:
        report("celery: task_postrun")


def _process_shutdown(**kw: Any) -> None:
    # A prefork child leaves with os._exit: atexit handlers do not run, so send what is left.
    client = _client or get_client()
    if client is not None:
        client.close()
