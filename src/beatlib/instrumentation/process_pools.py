"""multiprocessing pools: a pool worker sends what a task recorded before it hands the task's
result back, so `Pool.terminate()` (also the end of a `with Pool(...)` block), which kills the
workers without their exit hooks, loses nothing that was recorded.

That flush runs only in pool workers, and costs a task one request when it recorded events.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from beatlib.instrumentation.registry import Instrumentation
from beatlib.transport.worker import flush_all


class ProcessPools(Instrumentation):
    name = "process_pools"
    module = "multiprocessing.pool"
    distribution = None
    library = "multiprocessing (standard library)"
    wraps = (
        "the pool worker: before a worker hands a task's result back it sends what the task "
        "recorded, so `Pool.terminate()` (and the end of a `with Pool(...)` block) loses "
        "nothing; costs such a task one request"
    )

    def patch(self, module: ModuleType) -> None:
        self.wrap(module, "worker", _worker)


def _worker(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    outqueue = args[1] if len(args) > 1 else kwargs.get("outqueue")
    put = getattr(outqueue, "put", None)
    if put is not None:
        def put_after_sending(obj: Any) -> Any:
            flush_all()
            return put(obj)

        outqueue.put = put_after_sending  # type: ignore[union-attr]
    return wrapped(*args, **kwargs)
