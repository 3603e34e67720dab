"""`Client`: config, tracer, event pipeline and transport wired together, and the default.

The client captures errors on the calling thread; its `Pipeline` (processors.py) turns each
queued record into lines on the worker thread; its transport ships them.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from types import TracebackType
from typing import Any

from beatlib import context, guard, release, stacks
from beatlib.config import Config
from beatlib.errors import ErrorSnapshot
from beatlib.guard import report
from beatlib.metrics import LatencyMetrics, MetricSet
from beatlib.processors import Pipeline
from beatlib.protocol import intake_v2
from beatlib.sanitize import Sanitizer
from beatlib.tracing import Span, TraceParent, Tracer, Transaction, let_go
from beatlib.transport import Transport

logger = logging.getLogger("beatlib")

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]

_default_client: Client | None = None


class TraceRef:
    """The ids and transaction fields an error event carries, read when it is captured."""

    __slots__ = ("trace_id", "transaction_id", "parent_id", "transaction", "secrets")

    def __init__(self, segment: Transaction | Span) -> None:
        tx = segment.transaction
        self.trace_id = tx.trace_id
        self.transaction_id = "%016x" % tx.id
        self.parent_id = "%016x" % segment.id
        self.transaction = {"name": tx.name, "type": tx.type, "sampled": tx.sampled}
        self.secrets = tx.secrets

# Context keys the intake schema knows for transactions and errors; others go under custom.
_CONTEXT_KEYS = frozenset({"request", "response", "user", "custom", "message", "service", "page"})


def get_client() -> Client | None:
    """The process default client: the last one created and not closed."""
    return _default_client


class Client:
    """Records transactions, spans and errors and ships them to the APM server.

    Settings come as keywords (see the configuration reference) or a ready `Config`;
    `BEATLIB_*` environment variables win over both. `sender` replaces the HTTP sender
    (e.g. a `beatlib.transport.memory.MemorySender` in tests).
    """

    def __init__(self, config: Config | None = None, *, sender: Any = None,
                 **settings: Any) -> None:
        global _default_client
        self.config = config if config is not None else Config(**settings)
        # The default service_version is the app's git revision: where to look is taken now,
        # git runs on the worker when it first builds the metadata (a process start costs
        # the app 10-30 ms otherwise).
        self._revision_dirs = (release.app_dirs() if self.config.service_version is None
                               and self.config.enabled else None)
        if self.config.log_level:
            logger.setLevel(self.config.log_level.upper())
        self.sanitizer = Sanitizer.from_config(self.config)
        self.metrics = LatencyMetrics()
        self._error_mark = "_beatlib_error_id_%x" % id(self)  # per client: each captures once
        self.framework: tuple[str, str] | None = None
        self.pipeline = Pipeline(self.config, self.sanitizer, self._metadata)
        self.transport: Any = self._exporter_process(sender)
        if self.transport is None:
            self.transport = Transport(self.config, self._encode, self.pipeline.metadata_line,
                                       on_tick=self.collect_metrics, sender=sender,
                                       encoded=let_go)
        self.tracer = Tracer(self.config, self.transport.queue, self._capture_span_stack,
                             self.sanitizer)
        _default_client = self

    def _exporter_process(self, sender: Any) -> Any:
        """The exporter process's transport, if `exporter_process` asks for it and it can
        run everything the worker thread would (else None: the worker thread it is)."""
        if not self.config.exporter_process or not self.config.enabled:
            return None
        from beatlib.transport import process

        if not process.SUPPORTED or sender is not None:
            logger.warning("beatlib: exporter_process needs Linux and the HTTP sender; "
                           "encoding on the worker thread instead")
            return None
        if process.hook_reference(self.config.before_send) is None:
            logger.warning("beatlib: exporter_process needs a before_send hook the exporter "
                           "process can import (\"module:function\"); encoding on the worker "
                           "thread instead")
            return None
        return process.ProcessTransport(
            self.config, lambda: self.framework,
            lambda: intake_v2.metadata(self.config)["process"], self._revision_dirs)

    # -- transactions --------------------------------------------------------------------

    def begin_transaction(
        self, transaction_type: str, trace_parent: TraceParent | str | None = None,
        baggage: str | None = None,
    ) -> Transaction:
        """Begin a transaction in the current thread or task, continuing `trace_parent`;
        `baggage` (the caller's W3C `baggage` header) is sent on with its outgoing calls."""
        return self.tracer.begin_transaction(transaction_type, trace_parent, baggage)

    def end_transaction(
        self, name: str | None = None, result: str | None = None
    ) -> Transaction | None:
        """End the current transaction (None if there was none) and queue it for sending."""
        return self.tracer.end_transaction(name, result)

    # -- errors --------------------------------------------------------------------------

    def capture_exception(
        self,
        exc_info: ExcInfo | BaseException | None = None,
        handled: bool = True,
        *,
        log: dict[str, Any] | None = None,
        **context_data: Any,
    ) -> str | None:
        """Record an exception (the one being handled by default); returns the error id.

        `log` is the log record that reported it (`message`, `level`, `logger_name`,
        `param_message`), shipped beside the exception. Extra keywords become error
        context: `request`, `response`, `user`, `custom`, `labels`, anything else under
        `custom`.
        """
        try:
            if exc_info is None:
                exc_info = sys.exc_info()  # type: ignore[assignment]
            exc = exc_info if isinstance(exc_info, BaseException) else exc_info[1]  # type: ignore[index]
            # The same exception seen by several hooks (a framework signal, a middleware, a
            # logging handler) is one error of this client: its first capture marks it.
            previous = getattr(exc, self._error_mark, None)
            if previous is not None or exc is None:
                return previous
            trace, ctx = self._trace_ref(context_data)
            snapshot = ErrorSnapshot.from_exception(
                exc_info,  # type: ignore[arg-type]
                self.config,
                handled=handled,
                trace=trace,
                context=ctx,
                log=log,
            )
            if snapshot is None:
                return None
            with contextlib.suppress(Exception):  # some exception types refuse attributes
                setattr(exc, self._error_mark, snapshot.id)
            segment = context.get_active()
            if trace is not None and segment is not None:
                segment.errored = True  # its outcome, unless set otherwise: failure
            self.transport.queue(snapshot)
            return snapshot.id
        except Exception:
            report("capture_exception")
            return None

    def capture_message(
        self,
        message: str | None = None,
        level: str = "info",
        param_message: str | None = None,
        stack: bool = True,
        logger_name: str | None = None,
        **context_data: Any,
    ) -> str | None:
        """Record a message as an error event; returns the error id.

        `param_message` is the message before formatting ("disk %s almost full"), so that
        messages differing only in their parameters group together.
        """
        try:
            trace, ctx = self._trace_ref(context_data)
            snapshot = ErrorSnapshot.from_message(
                message,
                level=level,
                param_message=param_message,
                config=self.config,
                trace=trace,
                stack=stack,
                logger_name=logger_name,
                context=ctx,
                skip=1,
            )
            self.transport.queue(snapshot)
            return snapshot.id
        except Exception:
            report("capture_message")
            return None

    def _trace_ref(self, extra: dict[str, Any]) -> tuple[TraceRef | None, dict[str, Any]]:
        """What an error needs of the current trace, taken now: ids, names and context."""
        segment = context.get_active()
        tx = None if segment is None else segment.transaction
        ctx: dict[str, Any] = {}
        labels: dict[str, Any] = {}
        ref = None
        if tx is not None and not tx.ended:
            ref = TraceRef(segment)  # type: ignore[arg-type]
            if tx.context:
                ctx.update(tx.context)
            if tx.labels:
                labels.update(tx.labels)
        for key, value in extra.items():
            if key in ("labels", "tags") and isinstance(value, dict):
                labels.update(value)
            elif key in _CONTEXT_KEYS:
                ctx[key] = value
            else:
                ctx["custom"] = {**ctx.get("custom", {}), key: value}
        if labels:
            ctx["tags"] = intake_v2.labels(labels)
        return ref, ctx

    # -- shipping ------------------------------------------------------------------------

    def queue(self, event: Any) -> None:
        """Hand an event to the transport; never blocks, never raises."""
        self.transport.queue(event)

    def flush(self, timeout: float | None = None) -> bool:
        """Send everything queued so far; True when the server accepted all of it."""
        return self.transport.flush(timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Flush (at most `timeout`, default shutdown_timeout) and stop the worker thread."""
        global _default_client
        if _default_client is self:
            _default_client = None
        return self.transport.close(timeout)

    def _capture_span_stack(self) -> Any:
        return stacks.capture_stack(self.config, skip=2)

    def stats(self) -> dict[str, int]:
        """What happened to the events so far: the transport's counters (queued, sent,
        dropped by reason), the pipeline's (dropped or failed in before_send), and how often
        beatlib's own code failed in this process (`internal_errors`, see beatlib.guard)."""
        return {**self.pipeline.counts, **self.transport.stats(),
                "internal_errors": sum(guard.counts().values())}

    def _metadata(self) -> dict[str, Any]:
        if self._revision_dirs is not None:
            self.config.service_version = release.app_version(self._revision_dirs)
            self._revision_dirs = None
        return intake_v2.metadata(self.config, self.framework)

    def _encode(self, item: Any) -> list[bytes]:
        """Turn one queued item into NDJSON lines (worker thread)."""
        if isinstance(item, Transaction):
            self.metrics.record(item.name, item.type, item.duration or 0.0)
        return self.pipeline.encode(item)

    def collect_metrics(self) -> list[MetricSet]:
        """Latency, process and transport metricsets since the last call; the transport asks
        for them every flush interval and at close (worker thread)."""
        sets = self.metrics.collect()
        sets.append(MetricSet(sets[-1].timestamp, {
            f"beatlib.transport.{name}": ("counter", value)
            for name, value in self.transport.stats().items()
        }))
        return sets
