"""Elastic APM intake v2: our records as event dicts, and event dicts as NDJSON lines.

The one place that knows this wire format: transactions, spans, errors (with their frames and
source lines), metricsets and metadata. Pure functions, run on the transport's worker thread.
Values get the schema's types here (label keys and values, user fields, integers JSON can
carry); redaction and string lengths are the processors' work, between `event` and `line`.
"""

from __future__ import annotations

import json
import linecache
import math
import os
import platform
import socket
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from beatlib.version import __version__

if TYPE_CHECKING:
    from beatlib.config import Config
    from beatlib.errors import ErrorSnapshot, ExceptionSnapshot
    from beatlib.metrics import MetricSet
    from beatlib.stacks import FrameSnapshot
    from beatlib.tracing import Span, Transaction

_INT_LIMIT = 2**63  # Elasticsearch longs; bigger integers travel as text
_dumps = json.JSONEncoder(separators=(",", ":"), default=repr).encode
_LABEL_KEY_TABLE = str.maketrans({".": "_", "*": "_", '"': "_"})
_USER_FIELDS = ("id", "username", "email", "domain")


dumps = _dumps  # a processed value as JSON text, as `line` writes it


def line(kind: str, event: Mapping[str, Any]) -> bytes:
    """One NDJSON line, `{"<kind>": {...}}\\n`, UTF-8 (lone surrogates escaped)."""
    return (_dumps({kind: event}) + "\n").encode("utf-8", "backslashreplace")


def events(item: Any, config: Config) -> list[tuple[str, dict[str, Any]]]:
    """The intake events of one queued record: a transaction and its spans, an error, or a
    metricset."""
    from beatlib.errors import ErrorSnapshot
    from beatlib.tracing import Transaction

    if isinstance(item, Transaction):
        out = [("transaction", transaction(item))]
        out += [("span", span(item, sp, config)) for sp in item.spans]
        return out
    if isinstance(item, ErrorSnapshot):
        return [("error", error(item, config))]
    return [("metricset", metricset(item))]


_OUTCOMES = frozenset(("success", "failure", "unknown"))


def outcome(value: Any) -> str:
    """An outcome as the schemas allow it: success, failure or unknown (code that wrote the
    attribute itself may have set anything, and one bad event makes the server refuse the
    whole request)."""
    return value if type(value) is str and value in _OUTCOMES else "unknown"


def text(value: Any) -> str:
    """A text field: the value, or its str() (never raising)."""
    if isinstance(value, str):
        return value
    try:
        return str(value)
    except Exception:
        return f"<unprintable {type(value).__name__} object>"


def scalar(value: Any) -> Any:
    """A label or user value: None, bool and JSON-safe numbers as they are, the rest as text."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int) and -_INT_LIMIT < value < _INT_LIMIT:
        return int(value)
    if isinstance(value, float) and math.isfinite(value):
        return value
    return text(value)


def labels(raw: Mapping[Any, Any]) -> dict[str, Any]:
    """Labels as the schema allows them: keys without `.`, `*`, `"`; flat scalar values."""
    return {text(key).translate(_LABEL_KEY_TABLE): scalar(value) for key, value in raw.items()}


def context(raw: Mapping[str, Any] | None, raw_labels: Mapping[str, Any] | None,
            built: bool = False) -> dict[str, Any] | None:
    """Context given by the app or an integration, in the schema's shape (transactions,
    spans and errors alike). A value may be a callable that builds it: integrations defer
    costly context to this (the worker) thread; `built`: those were called already (see
    `built_context`)."""
    out: dict[str, Any] = {}
    for key, value in (raw or {}).items():
        if not built and callable(value):
            value = value()
        if not isinstance(value, Mapping):
            continue
        if key == "tags":
            out[key] = labels(value)
        elif key == "user":
            out[key] = {f: scalar(value[f]) if f == "id" else text(value[f])
                        for f in _USER_FIELDS if value.get(f) is not None}
        elif key == "request":
            out[key] = _request(value)
        elif key == "response" and isinstance(value.get("headers"), Mapping):
            out[key] = {**value, "headers": _headers(value["headers"])}
        elif key == "destination":
            out[key] = _destination(value)
        else:
            out[key] = dict(value)
    if raw_labels:
        out["tags"] = {**out.get("tags", {}), **labels(raw_labels)}
    return out or None


def built_context(raw: Mapping[str, Any] | None) -> dict[str, Any]:
    """`raw` with each deferred value built (each callable called, once); for
    `context(..., built=True)`."""
    return {key: value() if callable(value) else value for key, value in (raw or {}).items()}


def _destination(raw: Mapping[str, Any]) -> dict[str, Any]:
    """`destination` with the schema's types: the address as text, the port an integer (text
    of digits is read as one; anything else is left out)."""
    out = dict(raw)
    if out.get("address") is not None:
        out["address"] = text(out["address"])
    port = out.get("port")
    if isinstance(port, str) and port.strip().isdigit():
        port = int(port)
    if isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536:
        out["port"] = port
    else:
        out.pop("port", None)
    return out


def _headers(headers: Mapping[Any, Any]) -> dict[str, str | list[str]]:
    return {text(k): [text(v) for v in value] if isinstance(value, list | tuple) else text(value)
            for k, value in headers.items()}


def _request(req: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(req)
    out["method"] = text(req.get("method") or "UNKNOWN")
    for key in ("headers", "cookies", "env"):
        if isinstance(req.get(key), Mapping):
            out[key] = _headers(req[key])
    if isinstance(req.get("url"), Mapping):
        out["url"] = {k: scalar(v) for k, v in req["url"].items()}
    body = req.get("body")
    if body is not None and not isinstance(body, Mapping | list | str):
        out["body"] = text(body)
    return out


_DEFAULT_PORTS = {"http": 80, "https": 443}


def exit_fields(sp: Span, ctx: dict[str, Any] | None) -> dict[str, Any] | None:
    """`ctx` (a span's encoded context) with the fields an exit span (`leaf`) names its
    destination by: `service.target` (type: the subtype or type; name: the database
    instance, the queue, or `host:port` of the URL) and `destination.service.resource`,
    each inferred only where the app or instrumentation did not set it; an empty value set
    on purpose removes it. Spans that are not exit spans carry neither."""
    ctx = dict(ctx or {})
    service = dict(ctx.get("service") or {})
    if not sp.leaf:
        if service.pop("target", None) is not None:
            if service:
                ctx["service"] = service
            else:
                del ctx["service"]
        return ctx or None
    target = dict(service.get("target") or {})
    if "type" not in target:
        target["type"] = sp.subtype or sp.type
    if "name" not in target:
        target["name"] = _target_name(ctx)
    target = {k: text(v) for k, v in target.items() if k in ("type", "name") and v}
    if target:
        service["target"] = target
        ctx["service"] = service
    elif "target" in service:
        del service["target"]
        if not service:
            ctx.pop("service", None)
    destination = dict(ctx.get("destination") or {})
    dest_service = dict(destination.get("service") or {})
    if "resource" not in dest_service:
        kind, name = target.get("type"), target.get("name")
        dest_service["resource"] = (name if not kind or sp.type == "external" else
                                    f"{kind}/{name}") if name else kind
    if dest_service.get("resource"):
        destination["service"] = {**dest_service, "resource": text(dest_service["resource"])}
    else:
        destination.pop("service", None)
    if destination:
        ctx["destination"] = destination
    else:
        ctx.pop("destination", None)
    return ctx or None


def _target_name(ctx: Mapping[str, Any]) -> str | None:
    db, message, http = ctx.get("db"), ctx.get("message"), ctx.get("http")
    if isinstance(db, Mapping):
        return db.get("instance") or None
    if isinstance(message, Mapping):
        queue = message.get("queue")
        return (queue.get("name") or None) if isinstance(queue, Mapping) else None
    url = http.get("url") if isinstance(http, Mapping) else None
    if not isinstance(url, str):
        return None
    try:
        parts = urlsplit(url)
        host = parts.hostname
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme.lower())
    except ValueError:  # a port that is not a number
        return None
    if not host:
        return None
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{port}" if port else host


def transaction(tx: Transaction, with_context: bool = True) -> dict[str, Any]:
    """The value under `transaction`; unsampled ones carry no context, only the counts (nor
    any without `with_context`: the caller adds it)."""
    event: dict[str, Any] = {
        "id": "%016x" % tx.id,
        "trace_id": tx.trace_id,
        "type": text(tx.type),
        "duration": tx.duration,
        "timestamp": tx.timestamp,
        "sampled": tx.sampled,
        "span_count": {"started": len(tx.spans), "dropped": tx.spans_dropped},
        "outcome": outcome(tx.outcome),
    }
    if tx.name is not None:
        event["name"] = text(tx.name)
    if tx.result is not None:
        event["result"] = text(tx.result)
    if tx.parent_id is not None:
        event["parent_id"] = tx.parent_id
    if tx.sample_rate is not None:
        event["sample_rate"] = tx.sample_rate
    if with_context and tx.sampled and (tx.context or tx.labels):
        ctx = context(tx.context, tx.labels)
        if ctx:
            event["context"] = ctx
    return event


def span(tx: Transaction, sp: Span, config: Config,
         context_of: Callable[[Span], dict[str, Any]] | None = None) -> dict[str, Any]:
    """The value under `span` for one span of `tx`; `context_of(sp)`, when given, is its
    context (built and processed by the caller)."""
    tx_id = "%016x" % tx.id
    parent = sp.parent
    event: dict[str, Any] = {
        "id": "%016x" % sp.id,
        "transaction_id": tx_id,
        "trace_id": tx.trace_id,
        "parent_id": tx_id if parent is tx else "%016x" % parent.id,
        "name": text(sp.name),
        "type": text(sp.type),
        "timestamp": tx.timestamp + (sp.start - tx.start) // 1000,
        "duration": sp.duration,
        "outcome": outcome(sp.outcome),
    }
    if sp.subtype is not None:
        event["subtype"] = text(sp.subtype)
    if sp.action is not None:
        event["action"] = text(sp.action)
    if sp.sync is not None:
        event["sync"] = bool(sp.sync)
    if sp.context or sp.labels or sp.leaf:
        event["context"] = context_of(sp) if context_of is not None else exit_fields(
            sp, context(sp.context, sp.labels)) or {}
    if sp.stacktrace:
        event["stacktrace"] = frames(sp.stacktrace, config)
    if tx.sample_rate is not None:
        event["sample_rate"] = tx.sample_rate
    return event


def error(snap: ErrorSnapshot, config: Config) -> dict[str, Any]:
    """The value of the intake v2 "error" key (error.json)."""
    out: dict[str, Any] = {"id": snap.id, "timestamp": snap.timestamp}
    for key, value in snap.trace.items():
        if key == "transaction":
            out[key] = {k: scalar(v) for k, v in value.items() if v is not None}
        else:
            out[key] = value
    if snap.culprit:
        out["culprit"] = snap.culprit
    if snap.exception is not None:
        out["exception"] = exception(snap.exception, config)
        out["exception"]["handled"] = snap.handled
    if snap.log is not None:
        log = {k: v for k, v in snap.log.items() if v is not None}
        if snap.log_frames is not None:
            log["stacktrace"] = frames(snap.log_frames, config)
        out["log"] = log
    if snap.context:
        ctx = context(snap.context, None)
        if ctx:
            out["context"] = ctx
    return out


def exception(exc: ExceptionSnapshot, config: Config) -> dict[str, Any]:
    out: dict[str, Any] = {
        "type": exc.type,
        "message": exc.message,
        "stacktrace": frames(exc.frames, config),
    }
    if exc.module:
        out["module"] = exc.module
    if exc.causes:
        out["cause"] = [exception(c, config) for c in exc.causes]
    return out


def frames(snapshots: Iterable[FrameSnapshot], config: Config) -> list[dict[str, Any]]:
    """Stacktrace frames (error.json / span.json), with source lines read here."""
    out = []
    for f in snapshots:
        d: dict[str, Any] = {
            "filename": f.filename,
            "abs_path": f.abs_path,
            "module": f.module,
            "function": f.function,
            "library_frame": f.library_frame,
        }
        if f.lineno is not None:
            d["lineno"] = f.lineno
            n = (config.source_lines_error_library_frames if f.library_frame
                 else config.source_lines_error_app_frames)
            if n > 0 and f.abs_path:
                try:
                    d.update(_source(f.abs_path, f.lineno, n // 2 if n > 1 else 0))
                except Exception:  # unreadable or undecodable source: frames still ship
                    pass
        if f.locals is not None:
            d["vars"] = f.locals
        out.append(d)
    return out


def _source(path: str, lineno: int, around: int) -> dict[str, Any]:
    lines = linecache.getlines(path)
    if not lines or not 0 < lineno <= len(lines):
        return {}
    i = lineno - 1
    return {
        "pre_context": [s.rstrip("\r\n") for s in lines[max(0, i - around) : i]],
        "context_line": lines[i].rstrip("\r\n"),
        "post_context": [s.rstrip("\r\n") for s in lines[i + 1 : i + 1 + around]],
    }


def transaction_line(tx: Transaction, field: Callable[[str, Any], Any],
                     write_context: Callable[[Transaction], str | None],
                     names: dict[tuple[Any, ...], tuple[str, str]] | None = None) -> bytes:
    """The `transaction` line of `tx`, written directly: the event of `transaction()` with
    each field passed through `field(key, value)` (the processors' rules for one field) and
    its context as `write_context(tx)` writes it (the processed context's JSON, None for
    none). `names` keeps the written type, outcome, name and result (see `span_lines`)."""
    written_outcome = outcome(tx.outcome)
    key = (tx.type, written_outcome, tx.name, tx.result)
    cached = names is not None and type(tx.type) is str and (
        tx.name is None or type(tx.name) is str) and (tx.result is None or type(tx.result) is str)
    written = names.get(key) if cached else None  # type: ignore[union-attr]
    if written is None:
        written = (',"type":' + _escape(field("type", text(tx.type))),
                   ',"outcome":' + _escape(field("outcome", written_outcome))
                   + ("" if tx.name is None else
                      ',"name":' + _escape(field("name", text(tx.name))))
                   + ("" if tx.result is None else
                      ',"result":' + _escape(field("result", text(tx.result)))))
        if cached:
            if len(names) >= 4096:  # type: ignore[arg-type]  # names are few (routes)
                names.clear()  # type: ignore[union-attr]
            names[key] = written  # type: ignore[index]
    sampled = tx.sampled
    parts = [
        '{"transaction":{"id":%s,"trace_id":%s%s,"duration":%s,"timestamp":%s,"sampled":%s'
        ',"span_count":%s%s' % (
            _escape(field("id", "%016x" % tx.id)),
            _escape(field("trace_id", tx.trace_id)),
            written[0],
            _number(tx.duration),
            _number(tx.timestamp),
            "true" if sampled is True else "false" if sampled is False else _dumps(
                field("sampled", sampled)),
            '{"started":%d,"dropped":%d}' % (len(tx.spans), tx.spans_dropped)
            if type(tx.spans_dropped) is int else _dumps(field("span_count", {
                "started": len(tx.spans), "dropped": tx.spans_dropped})),
            written[1],
        ),
    ]
    if tx.parent_id is not None:
        parts.append(',"parent_id":' + _escape(field("parent_id", tx.parent_id)))
    if tx.sample_rate is not None:
        parts.append(',"sample_rate":' + _number(tx.sample_rate))
    if sampled and (tx.context or tx.labels):
        ctx = write_context(tx)
        if ctx is not None:
            parts.append(',"context":' + ctx)
    parts.append("}}\n")
    return "".join(parts).encode("ascii")


def _number(value: Any) -> str:
    """A number as `_dumps` writes it (floats by repr; NaN and infinities as JSON names)."""
    t = type(value)
    if t is int:
        return "%d" % value
    if t is float and value - value == 0.0:  # finite
        return repr(value)
    return _dumps(value)


def span_lines(tx: Transaction, config: Config, field: Callable[[str, Any], Any],
               names: dict[tuple[Any, ...], str] | None = None,
               write_context: Callable[[Span], str] | None = None) -> list[bytes]:
    """The `span` lines of `tx`, written directly: the hot path of encoding (most events are
    spans). The same events as `span()`, each app-supplied field passed through
    `field(key, value)`: the processors' rules for one field (a test holds the two ways
    equal). `names` keeps the written name, type, subtype and action of each kind of span
    (spans repeat them; the caller owns it, and leaves it out when `field` varies).
    `write_context(sp)`, when given, writes a span's processed context (its JSON), in place
    of `field("context", ...)` written out."""
    tx_id = "%016x" % tx.id
    head = '{"span":{"transaction_id":"%s","trace_id":"%s"' % (tx_id, tx.trace_id)
    tail = "" if tx.sample_rate is None else ',"sample_rate":%r' % tx.sample_rate
    base, start = tx.timestamp, tx.start
    lines = []
    for sp in tx.spans:
        key = (sp.name, sp.type, sp.subtype, sp.action)
        cached = names is not None and type(sp.name) is str and type(sp.type) is str
        written = names.get(key) if cached else None  # type: ignore[union-attr]
        if written is None:
            written = _span_names(sp, field)
            if cached:
                if len(names) >= 4096:  # type: ignore[arg-type]  # kinds of spans are few
                    names.clear()  # type: ignore[union-attr]
                names[key] = written  # type: ignore[index]
        parent = sp.parent
        parts = [
            head,
            ',"id":"%016x","parent_id":"%s"%s,"timestamp":%d,"duration":%r,"outcome":"%s"' % (
                sp.id,
                tx_id if parent is tx else "%016x" % parent.id,
                written,
                base + (sp.start - start) // 1000,
                sp.duration,
                outcome(sp.outcome),
            ),
        ]
        if sp.sync is not None:
            parts.append(',"sync":true' if sp.sync else ',"sync":false')
        if sp.context or sp.labels or sp.leaf:
            if write_context is not None:
                parts.append(',"context":' + write_context(sp))
            else:
                ctx = exit_fields(sp, context(sp.context, sp.labels)) or {}
                parts.append(',"context":' + _dumps(field("context", ctx)))
        if sp.stacktrace:
            parts.append(',"stacktrace":' + _dumps(field("stacktrace",
                                                         frames(sp.stacktrace, config))))
        parts.append(tail)
        parts.append("}}\n")
        lines.append("".join(parts).encode("ascii"))
    return lines


def _span_names(sp: Span, field: Callable[[str, Any], Any]) -> str:
    out = ',"name":%s,"type":%s' % (_escape(field("name", text(sp.name))),
                                     _escape(field("type", text(sp.type))))
    if sp.subtype is not None:
        out += ',"subtype":' + _escape(field("subtype", text(sp.subtype)))
    if sp.action is not None:
        out += ',"action":' + _escape(field("action", text(sp.action)))
    return out


_escape = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]


def metricset(ms: MetricSet) -> dict[str, Any]:
    """The value under `metricset`: samples (gauges, counters, histograms) at one time."""
    samples: dict[str, Any] = {}
    for name, (kind, *value) in ms.samples.items():
        if kind == "histogram":
            unit, values, counts = value
            samples[name] = {"type": kind, "unit": unit, "values": values, "counts": counts}
        elif kind == "counter":
            samples[name] = {"type": kind, "value": value[0]}
        else:
            samples[name] = {"value": value[0]}
    event: dict[str, Any] = {"timestamp": ms.timestamp, "samples": samples}
    if ms.transaction is not None:
        tx_name, tx_type = ms.transaction
        event["transaction"] = {"type": text(tx_type)}
        if tx_name is not None:
            event["transaction"]["name"] = text(tx_name)
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
        service["version"] = config.service_version
    if config.environment:
        service["environment"] = config.environment
    if framework:
        service["framework"] = {"name": text(framework[0]), "version": text(framework[1])}
    system: dict[str, Any] = {
        "detected_hostname": socket.gethostname(),
        "architecture": platform.machine(),
        "platform": sys.platform,
    }
    if config.hostname:
        system["configured_hostname"] = config.hostname
    title = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    return {
        "service": service,
        "process": {
            "pid": os.getpid(),
            "ppid": os.getppid(),
            "title": title,
            "argv": [text(a) for a in sys.argv[:50]],
        },
        "system": system,
    }
