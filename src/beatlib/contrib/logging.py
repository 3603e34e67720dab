"""Logging: `LoggingHandler` turns error records into error events; `TraceContextFilter`
puts the current trace, transaction and span ids on every record, so logs and traces join.

    handler.addFilter(TraceContextFilter())
    Formatter("%(asctime)s %(levelname)s %(message)s trace.id=%(trace_id)s ...")
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from beatlib import context
from beatlib.client import Client, get_client
from beatlib.guard import report

_LEVELS = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warning",
           logging.ERROR: "error", logging.CRITICAL: "critical"}  # fmt: skip
_emitting = threading.local()
_SENDER = "beatlib-transport"  # the transport worker thread's name


class LoggingHandler(logging.Handler):
    """Records of `level` (ERROR) and above become error events of `client` (default: the
    default client at each record): with exc_info the exception, else the message.
    Records of beatlib's own loggers are never sent (they may be about sending)."""

    def __init__(self, client: Client | None = None, level: int = logging.ERROR) -> None:
        super().__init__(level)
        self.client = client

    def emit(self, record: logging.LogRecord) -> None:
        # Never beatlib's own records, nor what its sending thread logs (urllib3 warnings):
        # they may be about sending, and sending them could log again.
        name = record.name
        if name == "beatlib" or name.startswith("beatlib.") or record.threadName == _SENDER:
            return
        if getattr(_emitting, "on", False):
            return
        _emitting.on = True  # what is logged while we capture is not captured again
        try:
            client = self.client or self.find_client()
            if client is None:
                return
            extra = self.record_context(record, client)
            message = record.getMessage()
            level = _LEVELS.get(record.levelno) or record.levelname.lower()
            param = record.msg if record.args and isinstance(record.msg, str) else None
            if record.exc_info and record.exc_info[1] is not None:
                log = {"message": message, "level": level, "logger_name": name,
                       "param_message": param}
                client.capture_exception(record.exc_info, log=log, **extra)  # type: ignore[arg-type]
            else:
                client.capture_message(
                    message, level=level, param_message=param, logger_name=name, **extra
                )
        except Exception:  # a logging handler must never raise into the code that logged
            report("logging: turning a record into an error")
        finally:
            _emitting.on = False

    # Hooks for framework handlers (Django's finds its app's client and the request).
    def find_client(self) -> Client | None:
        """The client when none was given: the default client."""
        return get_client()

    def record_context(self, record: logging.LogRecord, client: Client) -> dict[str, Any]:
        """Extra error context taken from the record (`request`, `user`, ...); none here."""
        return {}


class TraceContextFilter(logging.Filter):
    """Sets `trace_id`, `transaction_id` and `span_id` on each record: the ids of the running
    code's trace, or empty strings outside a transaction. Never filters a record out."""

    def filter(self, record: logging.LogRecord) -> bool:
        segment = context.get_active()
        tx = None if segment is None else segment.transaction
        if tx is None or tx.ended:
            record.trace_id = record.transaction_id = record.span_id = ""
        else:
            record.trace_id = tx.trace_id
            record.transaction_id = "%016x" % tx.id
            record.span_id = "" if segment is tx else "%016x" % segment.id  # type: ignore[union-attr]
        return True
