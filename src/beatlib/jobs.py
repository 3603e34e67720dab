"""`transaction`: a background job (a cron script, a queue consumer, a nightly report) recorded
as one transaction, as a decorator (sync and async) or a context manager.

Given the `headers` of the message that started the job (`traceparent`, `tracestate`), the
transaction continues the publisher's trace.

Called while a transaction is already open (a job function run inside a request), the job is
recorded as a span of that transaction instead (type `app`, subtype `internal`, action the
transaction type): one unit of work keeps one transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from beatlib import context
from beatlib.client import Client, get_client
from beatlib.tracing import (
    Span,
    Transaction,
    each_call_in,
    is_bare_decoration,
    start_span,
    trace_context_from,
)

F = TypeVar("F", bound=Callable[..., Any])


class transaction:  # noqa: N801 - lower case: it reads as a function at call sites
    """Record a block (`with` / `async with`) or each call of a function as a transaction.

    As a decorator each call is one transaction, named after the function unless a name is
    given. Result "success" or "failure"; when the body raises, the outcome is failure, the
    exception is captured as an unhandled error and goes on unchanged. Without a client
    (none given and no default client) the code runs untouched. `headers` (a mapping, e.g. a
    queue message's headers) name the trace to continue; without a valid `traceparent` in
    them a new trace begins.
    """

    __slots__ = ("name", "transaction_type", "client", "headers", "_segment", "_client")

    def __new__(cls, name: Any = None, *args: Any, **kwargs: Any) -> Any:
        if is_bare_decoration(name, args, kwargs):  # @beatlib.transaction, no parentheses
            return cls()(name)
        return super().__new__(cls)

    def __init__(
        self, name: str | None = None, transaction_type: str = "task", client: Client | None = None,
        *, headers: Mapping[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.transaction_type = transaction_type
        self.client = client
        self.headers = headers
        self._segment: Transaction | Span | None = None
        self._client: Client | None = None

    def __enter__(self) -> Transaction | Span | None:
        client = self.client or get_client()
        if client is None:
            return None
        if context.current_transaction() is not None:
            self._segment = start_span(self.name or "job", "app", "internal",
                                       self.transaction_type)
            return self._segment
        self._client = client
        parent, baggage = (trace_context_from(self.headers) if self.headers is not None
                           else (None, None))
        tx = client.begin_transaction(self.transaction_type, parent, baggage)
        tx.name = self.name  # now, so errors captured inside carry it
        self._segment = tx
        return tx

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        segment, self._segment = self._segment, None
        if segment is None:
            return
        if isinstance(segment, Span):
            # The enclosing transaction's integration captures what escapes it.
            segment.end(exc)
            return
        client, self._client = self._client, None
        if isinstance(exc, Exception) and client is not None:  # not KeyboardInterrupt etc.
            client.capture_exception((exc_type, exc, tb), handled=False)
        if segment.outcome is None:
            segment.outcome = "success" if exc is None else "failure"
        segment.end(result=segment.result or ("success" if exc is None else "failure"))

    async def __aenter__(self) -> Transaction | Span | None:
        return self.__enter__()

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self.__exit__(exc_type, exc, tb)

    def __call__(self, func: F) -> F:
        inner = func.__func__ if isinstance(func, classmethod | staticmethod) else func
        name = self.name or getattr(inner, "__qualname__", None) or repr(inner)
        args = (name, self.transaction_type, self.client)
        headers = self.headers
        return each_call_in(lambda: transaction(*args, headers=headers), func)
