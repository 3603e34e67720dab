"""Error events: an exception (with its cause chain) or a logged message, captured.

`ErrorSnapshot.from_exception` / `from_message` run on the calling thread and keep what dies
with the frames, rendered to builtin data there; the encoder (`protocol/`) writes the event.
"""

from __future__ import annotations

import builtins
import sys
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any

from beatlib import randomness
from beatlib.snapshot import CONTEXT_LIMITS, render
from beatlib.stacks import FrameSnapshot, capture_stack, capture_tb_frames

# Python 3.11+: the members of an exception group are reported as its causes.
_GROUP: Any = getattr(builtins, "BaseExceptionGroup", ())
MAX_CHAIN_DEPTH = 10  # chained exceptions kept (causes, contexts and group members together)
_MESSAGE_MARGIN = 1024  # characters kept past max_message_length until redaction has run

ExcInfo = tuple[type[BaseException] | None, BaseException | None, TracebackType | None]


def _message_of(obj: object, config: Any) -> str:
    """str(obj), bounded; an object whose __str__ raises gets a placeholder."""
    if obj is None:
        return ""
    try:
        return str(obj)[: config.max_message_length + _MESSAGE_MARGIN]
    except Exception:
        return f"<unprintable {type(obj).__name__} object>"


class ExceptionSnapshot:
    """One exception of a chain: its type, message, frames and the exceptions behind it."""

    __slots__ = ("type", "module", "message", "frames", "causes")

    def __init__(self, exc_type: type, exc: BaseException | None, tb: Any, config: Any) -> None:
        self.type = getattr(exc_type, "__qualname__", None) or repr(exc_type)
        module = getattr(exc_type, "__module__", None)
        self.module = module if module != "builtins" else None
        # str() now rather than later: holding the exception would keep its frames alive.
        self.message = _message_of(exc, config)
        self.frames = capture_tb_frames(tb, config, with_locals=True)
        self.causes: list[ExceptionSnapshot] = []


def _chain(exc: BaseException, config: Any) -> ExceptionSnapshot:
    """Snapshot `exc` and the exceptions behind it, breadth first, cycle safe, bounded."""
    root = ExceptionSnapshot(type(exc), exc, exc.__traceback__, config)
    seen = {id(exc)}
    queue = [(exc, root)]
    budget = MAX_CHAIN_DEPTH
    while queue and budget > 0:
        current, snap = queue.pop(0)
        behind: list[BaseException] = []
        nxt = current.__cause__
        if nxt is None and not current.__suppress_context__:
            nxt = current.__context__
        if nxt is not None:
            behind.append(nxt)
        if isinstance(current, _GROUP):
            behind.extend(current.exceptions)
        for child in behind:
            if budget <= 0 or id(child) in seen or not isinstance(child, BaseException):
                continue
            seen.add(id(child))
            budget -= 1
            child_snap = ExceptionSnapshot(type(child), child, child.__traceback__, config)
            snap.causes.append(child_snap)
            queue.append((child, child_snap))
    return root


def _trace_fields(trace: Any) -> dict[str, Any]:
    """Correlation ids and transaction name/type/sampled as they are at capture time."""
    if trace is None:
        return {}
    ids = {k: getattr(trace, k, None) for k in ("trace_id", "transaction_id", "parent_id")}
    if ids["parent_id"] is None:
        ids["parent_id"] = ids["transaction_id"]
    out: dict[str, Any] = {k: v for k, v in ids.items() if isinstance(v, str)}
    if "parent_id" not in out or "trace_id" not in out:  # the schema ties the three together
        return {}
    tx = getattr(trace, "transaction", None)
    if tx is not None:
        get = tx.get if isinstance(tx, Mapping) else lambda k: getattr(tx, k, None)
        out["transaction"] = {"name": get("name"), "type": get("type"), "sampled": get("sampled")}
    return out


class ErrorSnapshot:
    """An error captured on the calling thread, encoded later by `to_intake`."""

    __slots__ = ("id", "timestamp", "handled", "exception", "log", "log_frames", "trace",
                 "context", "culprit", "secrets")

    def __init__(self, trace: Any, context: Mapping[str, Any] | None) -> None:
        self.id = f"{randomness.getrandbits(128):032x}"
        self.timestamp = time.time_ns() // 1000
        self.handled: bool | None = None
        self.exception: ExceptionSnapshot | None = None
        self.log: dict[str, Any] | None = None
        self.log_frames: list[FrameSnapshot] | None = None
        self.trace = _trace_fields(trace)
        self.context = _rendered(context) if context else None
        self.culprit: str | None = None
        # Values known to be secret (a route's token): redacted wherever they appear.
        self.secrets: frozenset[str] = getattr(trace, "secrets", None) or frozenset()

    @classmethod
    def from_exception(
        cls,
        exc_info: ExcInfo | BaseException | None,
        config: Any,
        handled: bool = True,
        trace: Any = None,
        context: Mapping[str, Any] | None = None,
        log: Mapping[str, Any] | None = None,
    ) -> ErrorSnapshot | None:
        """Snapshot of `exc_info` (a sys.exc_info() tuple, an exception, or None for the one
        being handled), with the log record that reported it, if any. None when there is no
        exception."""
        if exc_info is None:
            exc_info = sys.exc_info()
        if isinstance(exc_info, BaseException):
            exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
        try:
            exc_type, exc, tb = exc_info
        except (TypeError, ValueError):  # not an exc_info triple: nothing we can report
            return None
        if exc is None and exc_type is None:
            return None
        snap = cls(trace, context)
        snap.handled = bool(handled)
        if log:
            snap.log = _log(log.get("message"), log.get("level"), log.get("param_message"),
                            log.get("logger_name"), config)
        if exc is not None:
            snap.exception = _chain(exc, config)
            if tb is not None and tb is not exc.__traceback__:
                snap.exception.frames = capture_tb_frames(tb, config, with_locals=True)
        else:  # an exc_info tuple with only a type
            snap.exception = ExceptionSnapshot(exc_type or type(None), None, tb, config)
        snap.culprit = snap._culprit()
        return snap

    @classmethod
    def from_message(
        cls,
        message: object,
        level: str = "error",
        param_message: str | None = None,
        config: Any = None,
        trace: Any = None,
        stack: bool = True,
        logger_name: str | None = None,
        context: Mapping[str, Any] | None = None,
        skip: int = 0,
    ) -> ErrorSnapshot:
        """Snapshot of a logged message; `stack` records the caller's stack (`skip` frames up)."""
        snap = cls(trace, context)
        snap.log = _log(message, level, param_message, logger_name, config)
        if stack:
            snap.log_frames = capture_stack(config, skip + 1)
        snap.culprit = snap._culprit()
        return snap

    def culprit_frame(self) -> FrameSnapshot | None:
        """The innermost app frame with a line (else the innermost frame): where it failed."""
        frames = self.exception.frames if self.exception else self.log_frames
        if not frames:
            return None
        return next((f for f in frames if not f.library_frame and f.lineno), frames[0])

    def _culprit(self) -> str | None:
        frame = self.culprit_frame()
        return None if frame is None else f"{frame.module} in {frame.function}"


def _log(message: object, level: object, param_message: object, logger_name: object,
         config: Any) -> dict[str, Any]:
    return {
        "message": _message_of(message, config),
        "param_message": param_message if isinstance(param_message, str) else None,
        "level": level if isinstance(level, str) else None,
        "logger_name": logger_name if isinstance(logger_name, str) else None,
    }


def _rendered(context: Mapping[str, Any]) -> dict[str, Any]:
    """Context values as they are now (builtins), except those an integration defers to the
    worker as a callable over data it already copied."""
    return {key: value if callable(value) else render(value, *CONTEXT_LIMITS)
            for key, value in context.items()}
