"""Elastic APM intake v2: our transactions, spans and metadata as NDJSON lines.

Pure functions, run on the transport's worker thread. Everything taken from the app is
made to fit the schemas here: keyword fields truncated, label keys and values normalised,
numbers that JSON cannot carry turned into text.
"""

from __future__ import annotations

import json
import math
import os
import platform
import socket
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from beatlib.version import __version__

if TYPE_CHECKING:
    from beatlib.config import Config
    from beatlib.tracing import Span, Transaction

KEYWORD_LENGTH = 1024
_dumps = json.JSONEncoder(separators=(",", ":"), default=repr).encode
_LABEL_KEY_TABLE = str.maketrans({".": "_", "*": "_", '"': "_"})
_USER_FIELDS = ("id", "username", "email", "domain")


def line(kind: str, event: Mapping[str, Any]) -> bytes:
    """One NDJSON line, `{"<kind>": {...}}\\n`, UTF-8 (lone surrogates escaped)."""
    return (_dumps({kind: event}) + "\n").encode("utf-8", "backslashreplace")


def keyword(value: Any, limit: int = KEYWORD_LENGTH) -> str:
    """A keyword field: text, at most `limit` characters (the schemas' maxLength)."""
    if not isinstance(value, str):
        value = _text(value)
    return value if len(value) <= limit else value[: limit - 1] + "…"


def _text(value: Any) -> str:
    try:
        return str(value)
    except Exception:
        return f"<unprintable {type(value).__name__} object>"


def labels(raw: Mapping[Any, Any]) -> dict[str, Any]:
    """Labels as the schema allows them: keys without `.`, `*`, `"`; flat scalar values."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if not isinstance(value, (str, bool, int, float)) and value is not None:
            value = keyword(value)
        elif isinstance(value, str):
            value = keyword(value)
        elif isinstance(value, float) and not math.isfinite(value):
            value = str(value)
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**63:
            value = str(value)
        out[keyword(key).translate(_LABEL_KEY_TABLE)] = value
    return out


def user(raw: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field in _USER_FIELDS:
        value = raw.get(field)
        if value is None:
            continue
        if field == "id" and isinstance(value, int) and not isinstance(value, bool):
            out[field] = value if abs(value) < 2**63 else str(value)
        else:
            out[field] = keyword(value)
    return out


def _context(raw: Mapping[str, Any] | None, labels_raw: Mapping[str, Any] | None) -> dict | None:
    ctx: dict[str, Any] = {}
    if raw:
        for key, value in raw.items():
            if key == "user":
                ctx["user"] = user(value)
            elif key == "custom":
                ctx["custom"] = _json_safe(value)
            else:
                ctx[key] = value
    if labels_raw:
        ctx["tags"] = labels(labels_raw)
    return ctx or None


def _json_safe(value: Any, depth: int = 0) -> Any:
    """Free-form data (custom context) as plain JSON values, cycles and odd types included."""
    if value is None or isinstance(value, (str, bool, int)):
        return value if not isinstance(value, str) else keyword(value, 10000)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if depth >= 8:
        return keyword(value)
    if isinstance(value, Mapping):
        return {keyword(k): _json_safe(v, depth + 1) for k, v in list(value.items())[:200]}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_json_safe(v, depth + 1) for v in list(value)[:200]]
    return keyword(value)


def transaction(tx: Transaction) -> dict[str, Any]:
    """The value under `transaction`; unsampled ones carry no context, only the counts."""
    event: dict[str, Any] = {
        "id": "%016x" % tx.id,
        "trace_id": tx.trace_id,
        "type": keyword(tx.type),
        "duration": tx.duration,
        "timestamp": tx.timestamp,
        "sampled": tx.sampled,
        "span_count": {"started": len(tx.spans), "dropped": tx.spans_dropped},
        "outcome": tx.outcome or "unknown",
    }
    if tx.name is not None:
        event["name"] = keyword(tx.name)
    if tx.result is not None:
        event["result"] = keyword(tx.result)
    if tx.parent_id is not None:
        event["parent_id"] = tx.parent_id
    if tx.sample_rate is not None:
        event["sample_rate"] = tx.sample_rate
    if tx.sampled:
        ctx = _context(tx.context, tx.labels)
        if ctx:
            event["context"] = ctx
    return event


def span(sp: Span, tx: Transaction, frames: Any = None) -> dict[str, Any]:
    """The value under `span`; its timestamp is derived from the transaction's."""
    parent = sp.parent
    event: dict[str, Any] = {
        "id": "%016x" % sp.id,
        "transaction_id": "%016x" % tx.id,
        "parent_id": "%016x" % parent.id,
        "trace_id": tx.trace_id,
        "name": keyword(sp.name),
        "type": keyword(sp.type),
        "timestamp": tx.timestamp + (sp.start - tx.start) // 1000,
        "duration": sp.duration,
        "outcome": sp.outcome or "unknown",
    }
    if sp.subtype is not None:
        event["subtype"] = keyword(sp.subtype)
    if sp.action is not None:
        event["action"] = keyword(sp.action)
    if sp.sync is not None:
        event["sync"] = sp.sync
    if tx.sample_rate is not None:
        event["sample_rate"] = tx.sample_rate
    if sp.context or sp.labels:
        ctx = _context(sp.context, sp.labels)
        if ctx:
            event["context"] = ctx
    if frames:
        event["stacktrace"] = frames
    return event


def metadata(config: Config, framework: tuple[str, str] | None = None) -> dict[str, Any]:
    """Who is sending: service, agent, runtime, process and host; sent first in each request."""
    service: dict[str, Any] = {
        "name": config.service_name,
        "agent": {"name": "beatlib", "version": __version__},
        "language": {"name": "python", "version": platform.python_version()},
        "runtime": {
            "name": platform.python_implementation(),
            "version": platform.python_version(),
        },
    }
    if config.service_version:
        service["version"] = keyword(config.service_version)
    if config.environment:
        service["environment"] = keyword(config.environment)
    if framework:
        service["framework"] = {"name": framework[0], "version": framework[1]}
    system = {
        "detected_hostname": keyword(socket.gethostname()),
        "architecture": platform.machine(),
        "platform": sys.platform,
    }
    if config.hostname:
        system["configured_hostname"] = keyword(config.hostname)
    title = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    return {
        "service": service,
        "process": {
            "pid": os.getpid(),
            "ppid": os.getppid(),
            "title": keyword(title),
            "argv": [keyword(a) for a in sys.argv[:50]],
        },
        "system": system,
    }
