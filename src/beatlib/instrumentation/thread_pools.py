"""concurrent.futures thread pools (and asyncio's `run_in_executor`, which submits to one): work
submitted inside a transaction runs as part of it, its spans under the submitting span.

Only beatlib's own ContextVar goes with the work, set around the call and reset after it;
the app's context variables stay as the pool has always left them.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

from beatlib.context import active, get_active
from beatlib.instrumentation.registry import Instrumentation


class ThreadPools(Instrumentation):
    name = "thread_pools"
    module = "concurrent.futures"
    distribution = None
    library = "concurrent.futures (standard library)"
    wraps = (
        "`ThreadPoolExecutor.submit` (and so `map` and asyncio's `run_in_executor`): work "
        "submitted inside a transaction records its spans there, under the submitting span; "
        "only beatlib's own context goes with it"
    )

    def patch(self, module: ModuleType) -> None:
        self.wrap(module, "ThreadPoolExecutor.submit", _submit)


def _submit(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    segment = get_active()
    if segment is None or segment.transaction.ended or not args:
        return wrapped(*args, **kwargs)
    return wrapped(_within(segment, args[0]), *args[1:], **kwargs)


def _within(segment: Any, fn: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        token = active.set(segment)
        try:
            return fn(*args, **kwargs)
        finally:
            active.reset(token)

    return run
