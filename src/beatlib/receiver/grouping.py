"""Which error events are "the same error": the receiver's own grouping key and culprit.

Computed from the event alone, so any agent's errors group the same way: the exception types
along the first cause chain and the app frames' module and function (never line numbers or
messages, so a deploy that moves code or a message that carries an id keeps the group); for an
exception sent without frames (OTLP's unparsed stack texts), its message with numbers and
quoted values masked; for a logged message without an exception, its param_message (or message).
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

_MAX_CHAIN = 10
# What varies between occurrences of one message: quoted values, hex ids, numbers.
_VARYING = re.compile(r"'[^']*'|\"[^\"]*\"|\b0x[0-9a-fA-F]+\b|\b[0-9a-fA-F]{8,}\b|\d+")


def grouping_key(error: dict[str, Any]) -> str:
    """32 hex digits; the event has passed intake's check."""
    h = hashlib.blake2b(digest_size=16)
    exc = error.get("exception")
    depth = 0
    while isinstance(exc, dict) and depth < _MAX_CHAIN:
        h.update(f"type {exc.get('module') or ''}.{exc.get('type') or ''}\n".encode(
            "utf-8", "replace"))
        frames = _grouping_frames(exc.get("stacktrace"))
        if not exc.get("type"):  # without a type, the message is all there is to go by
            h.update(f"message {exc.get('message') or ''}\n".encode("utf-8", "replace"))
        elif not frames and exc.get("message"):
            h.update(f"pattern {message_pattern(str(exc['message']))}\n".encode(
                "utf-8", "replace"))
        for frame in frames:
            h.update(f"frame {frame}\n".encode("utf-8", "replace"))
        causes = exc.get("cause")
        exc = causes[0] if isinstance(causes, list) and causes else None
        depth += 1
    log = error.get("log")
    if not isinstance(error.get("exception"), dict) and isinstance(log, dict):
        text = log.get("param_message") or log.get("message") or ""
        h.update(f"log {log.get('logger_name') or ''} {text}".encode("utf-8", "replace"))
    return h.hexdigest()


def message_pattern(message: str) -> str:
    """The message with what varies between occurrences masked: "user 42 not found" and
    "user 7 not found" are one pattern."""
    return _VARYING.sub("*", message[:1024])


def _grouping_frames(frames: Any) -> list[str]:
    """module:function of the app frames; of all frames when none is from the app."""
    if not isinstance(frames, list):
        return []
    frames = [f for f in frames if isinstance(f, dict)]
    app = [f for f in frames if not f.get("library_frame")]
    return [f"{_where(f)}:{f.get('function') or ''}" for f in (app or frames)]


def _where(frame: dict[str, Any]) -> str:
    return str(frame.get("module") or frame.get("filename") or "")


def culprit(error: dict[str, Any]) -> str | None:
    """The event's own culprit, else "module in function" of the innermost app frame."""
    given = error.get("culprit")
    if isinstance(given, str) and given:
        return given
    frames = stacktrace(error)
    if not frames:
        return None
    # Python agents send the innermost frame first.
    frame = next((f for f in frames if not f.get("library_frame")), frames[0])
    return f"{_where(frame)} in {frame.get('function') or '?'}"


def stacktrace(error: dict[str, Any]) -> list[dict[str, Any]]:
    """The frames shown for an error: its exception's, else its log record's."""
    for holder in (error.get("exception"), error.get("log")):
        if isinstance(holder, dict) and isinstance(holder.get("stacktrace"), list):
            return [f for f in holder["stacktrace"] if isinstance(f, dict)]
    return []
