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

from beatlib.sanitize import Sanitizer, shorten, truncate
from beatlib.version import __version__

if TYPE_CHECKING:
    from beatlib.config import Config
    from beatlib.tracing import Transaction

KEYWORD_LENGTH = 1024  # the schemas' maxLength for keyword fields
_INT_LIMIT = 2**63  # Elasticsearch longs; bigger integers travel as text
_dumps = json.JSONEncoder(separators=(",", ":"), default=repr).encode
_LABEL_KEY_TABLE = str.maketrans({".": "_", "*": "_", '"': "_"})
_USER_FIELDS = ("id", "username", "email", "domain")


def line(kind: str, event: Mapping[str, Any]) -> bytes:
    """One NDJSON line, `{"<kind>": {...}}\\n`, UTF-8 (lone surrogates escaped)."""
    return (_dumps({kind: event}) + "\n").encode("utf-8", "backslashreplace")


def keyword(value: Any, limit: int = KEYWORD_LENGTH) -> str:
    """A keyword field: text, at most `limit` characters, always valid UTF-8."""
    if not isinstance(value, str):
        value = safe_str(value)
    return truncate(value, min(limit, KEYWORD_LENGTH))


def safe_str(value: Any) -> str:
    try:
        return str(value)
    except Exception:
        return f"<unprintable {type(value).__name__} object>"


def scalar(value: Any, limit: int = KEYWORD_LENGTH) -> Any:
    """A label or user value: None, bool and JSON-safe numbers as they are, the rest as text."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int) and -_INT_LIMIT < value < _INT_LIMIT:
        return int(value)
    if isinstance(value, float) and math.isfinite(value):
        return value
    return keyword(value, limit)


def labels(raw: Mapping[Any, Any], limit: int = KEYWORD_LENGTH) -> dict[str, Any]:
    """Labels as the schema allows them: keys without `.`, `*`, `"`; flat scalar values."""
    return {
        keyword(key, limit).translate(_LABEL_KEY_TABLE): scalar(value, limit)
        for key, value in raw.items()
    }


def user(raw: Mapping[str, Any], limit: int = KEYWORD_LENGTH) -> dict[str, Any]:
    """id, username, email, domain; only the id may stay a number."""
    out: dict[str, Any] = {}
    for field in _USER_FIELDS:
        value = raw.get(field)
        if value is not None:
            out[field] = scalar(value, limit) if field == "id" else keyword(value, limit)
    return out


def context(
    raw: Mapping[str, Any] | None,
    raw_labels: Mapping[str, Any] | None,
    config: Config,
    sanitizer: Sanitizer,
) -> dict[str, Any] | None:
    """Context given by the app or an integration, made to fit: keyword fields cut, secrets
    redacted, free-form data bounded (transactions and errors alike). A value may be a
    callable that builds it (integrations defer costly context to the worker thread)."""
    width = config.max_string_length
    out: dict[str, Any] = {}
    for key, value in (raw or {}).items():
        if callable(value):  # deferred by an integration to this (the worker) thread
            value = value()
        if not isinstance(value, Mapping):
            continue
        if key == "tags":
            out[key] = labels(value, width)
        elif key == "user":
            out[key] = user(value, width)
        elif key == "request":
            out[key] = request(value, config, sanitizer)
        elif key == "response" and isinstance(value.get("headers"), Mapping):
            out[key] = {**value, "headers": _headers(value["headers"], width, sanitizer)}
        else:
            out[key] = shorten(
                value,
                config.local_var_list_max_length,
                config.local_var_dict_max_length,
                config.max_message_length,
                sanitizer.is_sensitive,
            )
    if raw_labels:
        out["tags"] = {**out.get("tags", {}), **labels(raw_labels, width)}
    return out or None


def request(req: Mapping[str, Any], config: Config, sanitizer: Sanitizer) -> dict[str, Any]:
    """An HTTP request context: headers, cookies, env, URL and body redacted and cut."""
    width = config.max_string_length
    out = dict(req)
    out["method"] = keyword(req.get("method") or "UNKNOWN", width)
    if isinstance(req.get("headers"), Mapping):
        out["headers"] = _headers(req["headers"], width, sanitizer)
    for key in ("cookies", "env"):
        if isinstance(req.get(key), Mapping):
            clean = sanitizer.mapping(req[key])
            out[key] = {keyword(k, width): _header_value(v, width) for k, v in clean.items()}
    if isinstance(req.get("url"), Mapping):
        url = dict(req["url"])
        for part in ("full", "raw"):
            if isinstance(url.get(part), str):
                url[part] = sanitizer.url(url[part])
        if isinstance(url.get("search"), str):
            url["search"] = sanitizer.query_string(url["search"])
        out["url"] = {k: scalar(v, width) for k, v in url.items()}
    body = req.get("body")
    if isinstance(body, Mapping):
        out["body"] = shorten(
            sanitizer.mapping(body), 50, 50, config.max_message_length, sanitizer.is_sensitive
        )
    elif body is not None:
        text = body if isinstance(body, str) else safe_str(body)
        out["body"] = truncate(text, config.max_message_length)
    return out


def _headers(headers: Mapping[str, Any], width: int, sanitizer: Sanitizer) -> dict[str, Any]:
    clean = sanitizer.headers(headers)
    return {keyword(k, width): _header_value(v, width) for k, v in clean.items()}


def _header_value(value: Any, width: int) -> str | list[str]:
    if isinstance(value, list | tuple):
        return [keyword(v, width) for v in value]
    return keyword(value, width)


def transaction(tx: Transaction, config: Config, sanitizer: Sanitizer) -> dict[str, Any]:
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
    if tx.sampled and (tx.context or tx.labels):
        ctx = context(tx.context, tx.labels, config, sanitizer)
        if ctx:
            event["context"] = ctx
    return event


def span_lines(tx: Transaction, frames_of: Any = None) -> list[bytes]:
    """The `span` lines of a transaction. The hot path of encoding (most events are spans),
    so the line is formatted directly, with the escaped names cached: apps have few.
    `frames_of` turns a span's captured stack into intake frames."""
    tx_id = "%016x" % tx.id
    head = '{"span":{"transaction_id":"%s","trace_id":"%s"' % (tx_id, tx.trace_id)
    tail = "" if tx.sample_rate is None else ',"sample_rate":%r' % tx.sample_rate
    base, start = tx.timestamp, tx.start
    lines = []
    for sp in tx.spans:
        parent = sp.parent
        parts = [
            head,
            ',"id":"%016x","parent_id":"%s","name":%s,"type":%s,"timestamp":%d,"duration":%r,'
            '"outcome":"%s"' % (
                sp.id,
                tx_id if parent is tx else "%016x" % parent.id,
                _escaped(sp.name),
                _escaped(sp.type),
                base + (sp.start - start) // 1000,
                sp.duration,
                sp.outcome or "unknown",
            ),
        ]
        if sp.subtype is not None:
            parts.append(',"subtype":' + _escaped(sp.subtype))
        if sp.action is not None:
            parts.append(',"action":' + _escaped(sp.action))
        if sp.sync is not None:
            parts.append(',"sync":true' if sp.sync else ',"sync":false')
        if sp.context or sp.labels:
            # Span context (db, http, destination) is built by our instrumentation; only the
            # app's labels need normalising.
            ctx = dict(sp.context) if sp.context else {}
            if sp.labels:
                ctx["tags"] = labels(sp.labels)
            parts.append(',"context":' + _dumps(ctx))
        if sp.stacktrace and frames_of is not None:
            parts.append(',"stacktrace":' + _dumps(frames_of(sp.stacktrace)))
        parts.append(tail)
        parts.append("}}\n")
        lines.append("".join(parts).encode("ascii"))
    return lines


_escape = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]
_escaped_cache: dict[Any, str] = {}


def _escaped(value: Any) -> str:
    """`value` as a JSON string literal, keyword-truncated, ASCII-escaped; cached."""
    cached = _escaped_cache.get(value)
    if cached is None:
        cached = _escape(keyword(value))
        if len(_escaped_cache) >= 4096:  # names are few; values in names just churn it
            _escaped_cache.clear()
        _escaped_cache[value] = cached
    return cached


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
