"""beatlib's own failures, handled one way everywhere: never raised into the app, counted per
place, logged with the traceback the first time and then at most once a minute (saying how
many went unlogged). `with guard("place"):` around a step, or `guard("place").call(f, ...)`.
"""

from __future__ import annotations

import logging
import threading
import time
from types import TracebackType
from typing import Any

logger = logging.getLogger("beatlib")

INTERVAL = 60.0  # seconds between two reports of the same place
_lock = threading.Lock()
_counts: dict[str, int] = {}
_reported_at: dict[str, float] = {}
_unreported: dict[str, int] = {}


def report(place: str, exc_info: Any = True) -> None:
    """Count and (rate-limited) log a failure of beatlib's own code at `place`."""
    now = time.monotonic()
    with _lock:
        _counts[place] = _counts.get(place, 0) + 1
        last = _reported_at.get(place)
        if last is not None and now - last < INTERVAL:
            _unreported[place] = _unreported.get(place, 0) + 1
            return
        _reported_at[place] = now
        skipped = _unreported.pop(place, 0)
    more = f" ({skipped} more since the last report)" if skipped else ""
    try:
        logger.warning("beatlib: internal error in %s; the app goes on unaffected%s", place,
                       more, exc_info=exc_info)
    except Exception:  # logging itself broken (interpreter shutdown): nothing left to tell
        pass


def counts() -> dict[str, int]:
    """How often each place failed in this process."""
    with _lock:
        return dict(_counts)


class guard:  # noqa: N801 - lower case: reads as a function at call sites
    """A context manager that swallows (and reports) any Exception raised inside it.
    Instances hold only their place name: make one per site, once, and reuse it."""

    __slots__ = ("place",)

    def __init__(self, place: str) -> None:
        self.place = place

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        if exc_type is None or not issubclass(exc_type, Exception):
            return False
        report(self.place, (exc_type, exc, tb))
        return True

    def call(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        """`func(*args, **kwargs)`, or None if it raised (reported)."""
        try:
            return func(*args, **kwargs)
        except Exception:
            report(self.place)
            return None
