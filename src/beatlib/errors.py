"""Error events: an exception (with its cause chain) or a logged message.

`ErrorSnapshot.from_exception` / `from_message` run on the calling thread and keep only what
the frames take with them; `to_intake` builds the intake v2 "error" object on the worker.
"""

from __future__ import annotations

import builtins
import hashlib
import sys
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any

from beatlib import randomness
from beatlib.protocol import intake_v2
from beatlib.protocol.intake_v2 import scalar
from beatlib.sanitize import Sanitizer, truncate
from beatlib.stacks import FrameSnapshot, capture_stack, capture_tb_frames, frames_to_intake

# Python 3.11+: the members of an exception group are reported as its causes.
_GROUP: Any = getattr(builtins, "BaseExceptionGroup", ())
MAX_CHAIN_DEPTH = 10  # chained exceptions kept (causes, contexts and group members together)

ExcInfo = tuple[type[BaseException] | None, BaseException | None, TracebackType | None]


def _message_of(obj: object, limit: int) -> str:
    """str(obj) cut to `limit`; an object whose __str__ raises gets a placeholder."""
    if obj is None:
        return ""
    try:
        return str(obj)[:limit]
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
        self.message = _message_of(exc, config.max_message_length)
        self.frames = capture_tb_frames(tb, config, with_locals=True)
        self.causes: list[ExceptionSnapshot] = []

    def to_intake(self, config: Any, sanitizer: Sanitizer) -> dict[str, Any]:
        width = config.max_string_length
        out: dict[str, Any] = {
            "type": truncate(self.type, width),
            "message": truncate(self.message, config.max_message_length),
            "stacktrace": frames_to_intake(self.frames, config, sanitizer),
        }
        if self.module:
            out["module"] = truncate(self.module, width)
        if self.causes:
            out["cause"] = [c.to_intake(config, sanitizer) for c in self.causes]
        return out


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

    __slots__ = ("id", "timestamp", "handled", "exception", "log", "log_frames", "trace", "context")

    def __init__(self, trace: Any, context: Mapping[str, Any] | None) -> None:
        self.id = f"{randomness.getrandbits(128):032x}"
        self.timestamp = time.time_ns() // 1000
        self.handled: bool | None = None
        self.exception: ExceptionSnapshot | None = None
        self.log: dict[str, Any] | None = None
        self.log_frames: list[FrameSnapshot] | None = None
        self.trace = _trace_fields(trace)
        self.context = dict(context) if context else None

    @classmethod
    def from_exception(
        cls,
        exc_info: ExcInfo | BaseException | None,
        config: Any,
        handled: bool = True,
        trace: Any = None,
        context: Mapping[str, Any] | None = None,
    ) -> ErrorSnapshot | None:
        """Snapshot of `exc_info` (a sys.exc_info() tuple, an exception, or None for the one
        being handled). None when there is no exception."""
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
        if exc is not None:
            snap.exception = _chain(exc, config)
            if tb is not None and tb is not exc.__traceback__:
                snap.exception.frames = capture_tb_frames(tb, config, with_locals=True)
        else:  # an exc_info tuple with only a type
            snap.exception = ExceptionSnapshot(exc_type or type(None), None, tb, config)
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
        snap.log = {
            "message": _message_of(message, config.max_message_length),
            "param_message": param_message if isinstance(param_message, str) else None,
            "level": level if isinstance(level, str) else None,
            "logger_name": logger_name if isinstance(logger_name, str) else None,
        }
        if stack:
            snap.log_frames = capture_stack(config, skip + 1)
        return snap

    @property
    def grouping_key(self) -> str:
        """Stable across deploys and messages: the exception types and the app frames'
        module and function (no line numbers); for messages, the param_message or message."""
        h = hashlib.blake2b(digest_size=16)
        exc = self.exception
        while exc is not None:
            h.update(f"{exc.module}.{exc.type}\n".encode("utf-8", "replace"))
            for f in exc.frames:
                if not f.library_frame:
                    h.update(f"{f.module}:{f.function}\n".encode("utf-8", "replace"))
            exc = exc.causes[0] if exc.causes else None
        if self.log is not None:
            h.update((self.log["param_message"] or self.log["message"]).encode("utf-8", "replace"))
        return h.hexdigest()

    def culprit(self) -> str | None:
        """The "module in function" of the innermost app frame (else the innermost frame)."""
        frames = self.exception.frames if self.exception else self.log_frames
        if not frames:
            return None
        frame = next((f for f in frames if not f.library_frame and f.lineno), frames[0])
        return f"{frame.module} in {frame.function}"

    def to_intake(self, config: Any, sanitizer: Sanitizer) -> dict[str, Any]:
        """The value of the intake v2 "error" key (error.json). Worker thread."""
        width = config.max_string_length
        out: dict[str, Any] = {"id": self.id, "timestamp": self.timestamp}
        for key, value in self.trace.items():
            if key == "transaction":
                out[key] = {k: scalar(v, width) for k, v in value.items() if v is not None}
            else:
                out[key] = truncate(value, width)
        culprit = self.culprit()
        if culprit:
            out["culprit"] = truncate(culprit, width)
        if self.exception is not None:
            out["exception"] = self.exception.to_intake(config, sanitizer)
            out["exception"]["handled"] = self.handled
        if self.log is not None:
            log = {k: scalar(v, width) for k, v in self.log.items() if v is not None}
            log["message"] = truncate(self.log["message"], config.max_message_length)
            if self.log_frames is not None:
                log["stacktrace"] = frames_to_intake(self.log_frames, config, sanitizer)
            out["log"] = log
        if self.context:
            ctx = intake_v2.context(self.context, None, config, sanitizer)
            if ctx:
                out["context"] = ctx
        return out
