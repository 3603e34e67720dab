"""beatlib: transactions, spans and errors from Python apps and jobs, shipped to an APM server.

The public API, re-exported from the modules that own it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from beatlib.client import Client, get_client
from beatlib.config import Config, ConfigError
from beatlib.context import current_span as get_current_span
from beatlib.context import current_transaction as get_current_transaction
from beatlib.jobs import transaction
from beatlib.tracing import (
    OUTCOMES,
    Span,
    TraceParent,
    Transaction,
    capture_span,
    format_traceparent,
    parse_traceparent,
)
from beatlib.version import __version__

if TYPE_CHECKING:
    from beatlib.instrumentation.registry import instrument, uninstrument

__all__ = [
    "Client", "Config", "ConfigError", "Span", "TraceParent", "Transaction", "__version__",
    "capture_span", "format_traceparent", "get_client", "get_current_span",
    "get_current_transaction", "instrument", "label", "parse_traceparent", "set_context",
    "set_transaction_name", "set_transaction_outcome", "set_transaction_result", "set_user",
    "transaction", "uninstrument",
]  # fmt: skip


def __getattr__(name: str) -> Any:
    # `instrument` and `uninstrument` from the registry on first use: it brings wrapt, which
    # brings asyncio and importlib.metadata (70-140 ms, 5 MB), and a process that only
    # records and sends (the exporter process; a job with its own spans) needs none of it.
    if name in ("instrument", "uninstrument"):
        from beatlib.instrumentation import registry

        value = globals()[name] = getattr(registry, name)  # found directly from now on
        return value
    raise AttributeError(f"module 'beatlib' has no attribute {name!r}")


def label(**labels: Any) -> None:
    """Attach labels (indexed, searchable key/values) to the current transaction."""
    tx = get_current_transaction()
    if tx is not None:
        for key, value in labels.items():
            tx.set_label(key, value)


def set_user(
    id: Any = None, username: str | None = None, email: str | None = None, domain: str | None = None
) -> None:
    """Name the user the current transaction (and its errors) served."""
    tx = get_current_transaction()
    if tx is not None:
        fields = {"id": id, "username": username, "email": email, "domain": domain}
        tx.set_context("user", {k: v for k, v in fields.items() if v is not None})


def set_context(data: dict[str, Any], key: str = "custom") -> None:
    """Attach free-form data to the current transaction: under `custom`, or `custom.<key>`."""
    tx = get_current_transaction()
    if tx is None or not isinstance(data, dict):
        return
    custom = (tx.context or {}).get("custom") or {}
    tx.set_context("custom", {**custom, **data} if key == "custom" else {**custom, key: data})


def set_transaction_name(name: str) -> None:
    tx = get_current_transaction()
    if tx is not None:
        tx.name = name


def set_transaction_result(result: str) -> None:
    """Set the result, e.g. "HTTP 2xx" or "success"."""
    tx = get_current_transaction()
    if tx is not None:
        tx.result = result


def set_transaction_outcome(outcome: str) -> None:
    """Set the outcome: "success", "failure" or "unknown" (anything else is ignored)."""
    tx = get_current_transaction()
    if tx is not None and outcome in OUTCOMES:
        tx.outcome = outcome
