"""OTLP/HTTP with the JSON encoding: processed intake events as OpenTelemetry spans, span
events, log records, metrics and a resource, and the request envelopes around them.

Pure functions, run on the worker after the processors: they read the same event dicts the
intake encoder writes (redacted, truncated, through before_send), so both wire formats carry
the same data; they never change them (processed contexts are shared between events).
Attribute names follow the current OpenTelemetry semantic conventions.
"""

from __future__ import annotations

import json
import math
import platform
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

from beatlib.version import __version__

TRACES, LOGS, METRICS = 0, 1, 2  # the signals, in the order a batch sends them
PATHS = ("/v1/traces", "/v1/logs", "/v1/metrics")
_RECORDS = ("spans", "logRecords", "metrics")  # the list each request's scope holds
_RESOURCE_KEYS = ("resourceSpans", "resourceLogs", "resourceMetrics")
_SCOPE_KEYS = ("scopeSpans", "scopeLogs", "scopeMetrics")
SCOPE = {"name": "beatlib", "version": __version__}

# SpanKind, Status.code, AggregationTemporality and SeverityNumber: integers in JSON.
INTERNAL, SERVER, CLIENT, PRODUCER, CONSUMER = 1, 2, 3, 4, 5
STATUS_UNSET, STATUS_ERROR = 0, 2
DELTA, CUMULATIVE = 1, 2
_SEVERITY = {"trace": 1, "debug": 5, "info": 9, "warning": 13, "warn": 13, "error": 17,
             "critical": 21, "fatal": 21}
_FLAG_SAMPLED, _FLAG_REMOTE_KNOWN, _FLAG_REMOTE = 0x1, 0x100, 0x200
_EXIT_TYPES = ("db", "external", "cache", "storage")
_SEND_ACTIONS = ("send", "publish")
# Intake subtypes whose OpenTelemetry db.system.name differs.
_DB_SYSTEMS = {"postgres": "postgresql", "mssql": "microsoft.sql_server", "memcache": "memcached"}
_INT64 = 2**63
_HISTOGRAM_STEP = 2 ** (0.5 / 8)  # metrics.py: a bucket's bounds around its middle value
_dumps = json.JSONEncoder(separators=(",", ":"), default=repr).encode


def dumps(value: Any) -> bytes:
    """Compact JSON, ASCII (lone surrogates escaped): one record, or an envelope part."""
    return _dumps(value).encode("ascii")


# --- envelopes ----------------------------------------------------------------------------

def envelope(signal: int, resource: bytes) -> tuple[bytes, bytes]:
    """The text before and after the comma-separated records of one request (`resource`:
    the Resource as JSON), so that a batch can stream its records into gzip as they come."""
    head = dumps({_RESOURCE_KEYS[signal]: [{"resource": "@R", _SCOPE_KEYS[signal]: [
        {"scope": SCOPE, _RECORDS[signal]: ["@"]}]}]})
    before, after = head.replace(b'"@R"', resource).split(b'"@"')
    return before, after


def request(signal: int, resource: Mapping[str, Any], records: list[Any]) -> dict[str, Any]:
    """One whole request (ExportTraceServiceRequest, ExportLogsServiceRequest or
    ExportMetricsServiceRequest) as a dict."""
    return {_RESOURCE_KEYS[signal]: [{"resource": resource, _SCOPE_KEYS[signal]: [
        {"scope": SCOPE, _RECORDS[signal]: records}]}]}


def split(signal: int, body: bytes) -> list[bytes] | None:
    """A request cut into two with half the records each (a server answered 413), or None
    when it holds one record."""
    data = json.loads(body)
    (outer,) = data[_RESOURCE_KEYS[signal]]
    (scope,) = outer[_SCOPE_KEYS[signal]]
    records = scope[_RECORDS[signal]]
    if len(records) <= 1:
        return None
    middle = len(records) // 2
    return [dumps(request(signal, outer["resource"], part))
            for part in (records[:middle], records[middle:])]


def rejected(signal: int, reply: bytes) -> tuple[int, str] | None:
    """From a 200 reply: the records the server says it rejected and its message, when it
    reports a partial success (None otherwise, an empty or unreadable reply included)."""
    try:
        partial = json.loads(reply).get("partialSuccess")
    except (ValueError, AttributeError):
        return None
    if not isinstance(partial, dict):
        return None
    key = ("rejectedSpans", "rejectedLogRecords", "rejectedDataPoints")[signal]
    try:
        count = int(partial.get(key) or 0)
    except (TypeError, ValueError):
        count = 0
    message = str(partial.get("errorMessage") or "")
    return (count, message) if count or message else None


# --- values -------------------------------------------------------------------------------

def value(raw: Any) -> dict[str, Any]:
    """An AnyValue: int64 as a decimal string, lists as arrays, dicts as key-value lists."""
    t = type(raw)
    if t is str:
        return {"stringValue": raw}
    if t is bool:
        return {"boolValue": raw}
    if t is int:
        return {"intValue": str(raw)} if -_INT64 <= raw < _INT64 else {"stringValue": str(raw)}
    if t is float:
        return {"doubleValue": raw} if math.isfinite(raw) else {"stringValue": repr(raw)}
    if isinstance(raw, list | tuple):
        return {"arrayValue": {"values": [value(v) for v in raw if v is not None]}}
    if isinstance(raw, dict):
        return {"kvlistValue": {"values": attributes(raw)}}
    if isinstance(raw, str):  # subclasses of the scalars
        return {"stringValue": str.__str__(raw)}
    if isinstance(raw, bool):
        return {"boolValue": bool(raw)}
    if isinstance(raw, int):
        return value(int(raw))
    if isinstance(raw, float):
        return value(float(raw))
    return {"stringValue": str(raw)}


def attributes(raw: dict[str, Any]) -> list[dict[str, Any]]:
    """KeyValues of the set values of `raw`."""
    return [{"key": k if type(k) is str else str(k), "value": value(v)}
            for k, v in raw.items() if v is not None]


def _nanos(timestamp_us: int, offset_ms: float = 0.0) -> str:
    """Unix nanoseconds as the decimal string fixed64 takes in JSON."""
    return str(timestamp_us * 1000 + round(offset_ms * 1_000_000))


def _get(raw: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(raw, dict):
            return None
        raw = raw.get(key)
    return raw


# --- resource -----------------------------------------------------------------------------

def resource(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The Resource from a (processed) intake metadata event."""
    service = metadata.get("service") or {}
    process = metadata.get("process") or {}
    system = metadata.get("system") or {}
    runtime = service.get("runtime") or {}
    framework = service.get("framework") or {}
    attrs = {
        "service.name": service.get("name"),
        "service.version": service.get("version"),
        "deployment.environment.name": service.get("environment"),
        "telemetry.sdk.name": "beatlib",
        "telemetry.sdk.language": "python",
        "telemetry.sdk.version": _get(service, "agent", "version") or __version__,
        "process.pid": process.get("pid"),
        "process.parent_pid": process.get("ppid"),
        "process.executable.name": process.get("title"),
        "process.command_args": process.get("argv"),
        "process.runtime.name": runtime.get("name"),
        "process.runtime.version": runtime.get("version"),
        "process.runtime.description": platform.python_implementation() + " "
        + platform.python_version() if runtime else None,
        "host.name": system.get("configured_hostname") or system.get("detected_hostname"),
        "host.arch": system.get("architecture"),
        "os.type": system.get("platform"),
        "beatlib.framework.name": framework.get("name"),
        "beatlib.framework.version": framework.get("version"),
    }
    return {"attributes": attributes(attrs)}


# --- spans --------------------------------------------------------------------------------

def transaction_span(event: Mapping[str, Any],
                     exceptions: Iterable[dict[str, Any]] = ()) -> dict[str, Any]:
    """A transaction as its OTLP span: SERVER for requests, CONSUMER for messaging,
    INTERNAL for the rest (tasks, scripts)."""
    tx_type = event.get("type")
    kind = SERVER if tx_type == "request" else CONSUMER if tx_type == "messaging" else INTERNAL
    ctx = event.get("context") or {}
    attrs: dict[str, Any] = {"beatlib.transaction.type": tx_type}
    _request_attributes(ctx, attrs)
    if tx_type == "messaging":
        queue = _get(ctx, "message", "queue", "name")
        attrs["messaging.destination.name"] = queue
        attrs["messaging.operation.type"] = "process"
    if event.get("result") is not None:
        attrs["beatlib.transaction.result"] = event["result"]
    if event.get("sample_rate") is not None:
        attrs["beatlib.sample_rate"] = event["sample_rate"]
    _common_attributes(ctx, attrs)
    flags = _FLAG_SAMPLED | _FLAG_REMOTE_KNOWN
    if event.get("parent_id"):
        flags |= _FLAG_REMOTE
    return _span(event, event.get("parent_id"), kind, attrs, flags, exceptions)


def span(event: Mapping[str, Any], exceptions: Iterable[dict[str, Any]] = ()) -> dict[str, Any]:
    """A span as its OTLP span: CLIENT for calls out (db, external, cache, storage, a
    messaging receive), PRODUCER for a messaging send, INTERNAL for the rest."""
    sp_type, subtype, action = event.get("type"), event.get("subtype"), event.get("action")
    if sp_type == "messaging":
        kind = PRODUCER if action in _SEND_ACTIONS else CLIENT
    else:
        kind = CLIENT if sp_type in _EXIT_TYPES else INTERNAL
    ctx = event.get("context") or {}
    attrs: dict[str, Any] = {"beatlib.span.type": sp_type, "beatlib.span.subtype": subtype,
                             "beatlib.span.action": action}
    db, http = ctx.get("db"), ctx.get("http")
    if isinstance(db, dict) or sp_type == "db":
        db = db if isinstance(db, dict) else {}
        attrs["db.system.name"] = _DB_SYSTEMS.get(subtype, subtype) if subtype else None
        attrs["db.namespace"] = db.get("instance")
        attrs["db.query.text"] = db.get("statement")
    if isinstance(http, dict):
        attrs["http.request.method"] = http.get("method") or (
            action if sp_type == "external" and subtype == "http" else None)
        attrs["url.full"] = http.get("url")
        attrs["http.response.status_code"] = _get(http, "response", "status_code") or \
            http.get("status_code")
    if sp_type == "messaging":
        attrs["messaging.system"] = subtype
        attrs["messaging.destination.name"] = _get(ctx, "message", "queue", "name")
        attrs["messaging.operation.type"] = "send" if kind == PRODUCER else "receive"
    if subtype == "grpc":
        service, _, method = str(event.get("name") or "").strip("/").rpartition("/")
        attrs["rpc.system"] = "grpc"
        attrs["rpc.service"] = service or None
        attrs["rpc.method"] = method or None
    destination = ctx.get("destination") or {}
    attrs["server.address"] = destination.get("address") if isinstance(destination, dict) \
        else None
    attrs["server.port"] = destination.get("port") if isinstance(destination, dict) else None
    if attrs["server.address"] is None and isinstance(attrs.get("url.full"), str):
        attrs["server.address"], attrs["server.port"] = _host_port(attrs["url.full"])
    target = _get(ctx, "service", "target", "name")
    if target:
        attrs["peer.service"] = target
    if event.get("stacktrace"):
        attrs["code.stacktrace"] = traceback_text(event["stacktrace"])
    _common_attributes(ctx, attrs)
    return _span(event, event.get("parent_id"), kind, attrs,
                 _FLAG_SAMPLED | _FLAG_REMOTE_KNOWN, exceptions)


def _span(event: Mapping[str, Any], parent: Any, kind: int, attrs: dict[str, Any], flags: int,
          exceptions: Iterable[dict[str, Any]]) -> dict[str, Any]:
    start = int(event.get("timestamp") or 0)
    out: dict[str, Any] = {
        "traceId": event.get("trace_id"),
        "spanId": event.get("id"),
        "flags": flags,
        "name": str(event.get("name") or event.get("type") or "unnamed"),
        "kind": kind,
        "startTimeUnixNano": _nanos(start),
        "endTimeUnixNano": _nanos(start, max(float(event.get("duration") or 0.0), 0.0)),
        "attributes": attributes(attrs),
    }
    if parent:
        out["parentSpanId"] = parent
    events = list(exceptions)
    if events:
        out["events"] = events
    if event.get("outcome") == "failure":
        status: dict[str, Any] = {"code": STATUS_ERROR}
        if event.get("result"):
            status["message"] = str(event["result"])
        out["status"] = status
    return out


def _request_attributes(ctx: Mapping[str, Any], attrs: dict[str, Any]) -> None:
    """HTTP server attributes from an intake request/response context."""
    req, resp = ctx.get("request"), ctx.get("response")
    if isinstance(req, dict):
        attrs["http.request.method"] = req.get("method")
        url: Mapping[str, Any] = req["url"] if isinstance(req.get("url"), dict) else {}
        attrs["url.full"] = url.get("full")
        attrs["url.path"] = url.get("pathname")
        attrs["url.query"] = (url.get("search") or "").lstrip("?") or None
        attrs["url.scheme"] = (url.get("protocol") or "").rstrip(":") or None
        attrs["server.address"] = url.get("hostname")
        port = url.get("port")
        attrs["server.port"] = int(str(port)) if str(port or "").isdigit() else None
        if req.get("http_version"):
            attrs["network.protocol.version"] = req["http_version"]
        client = _get(req, "socket", "remote_address")
        attrs["client.address"] = client
        _header_attributes("http.request.header.", req.get("headers"), attrs)
    if isinstance(resp, dict):
        attrs["http.response.status_code"] = resp.get("status_code")
        _header_attributes("http.response.header.", resp.get("headers"), attrs)


def _header_attributes(prefix: str, headers: Any, attrs: dict[str, Any]) -> None:
    if isinstance(headers, dict):
        for name, val in headers.items():
            attrs[prefix + str(name).lower()] = list(val) if isinstance(val, list) else [val]


def _common_attributes(ctx: Mapping[str, Any], attrs: dict[str, Any]) -> None:
    """User and labels (tags), which every kind of event may carry."""
    user = ctx.get("user")
    if isinstance(user, dict):
        attrs["user.id"] = None if user.get("id") is None else str(user["id"])
        attrs["user.name"] = user.get("username")
        attrs["user.email"] = user.get("email")
    tags = ctx.get("tags")
    if isinstance(tags, dict):
        for key, val in tags.items():
            attrs.setdefault(f"beatlib.label.{key}", val)


def _host_port(url: str) -> tuple[str | None, int | None]:
    try:
        parts = urlsplit(url)
        return parts.hostname, parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        return None, None


# --- errors -------------------------------------------------------------------------------

def traceback_text(frames: Iterable[Mapping[str, Any]]) -> str:
    """Frames (innermost first, as intake holds them) as Python prints a traceback."""
    lines = ["Traceback (most recent call last):"]
    for f in reversed(list(frames)):
        lines.append(f'  File "{f.get("abs_path") or f.get("filename")}", line '
                     f'{f.get("lineno", "?")}, in {f.get("function")}')
        if f.get("context_line"):
            lines.append("    " + str(f["context_line"]).strip())
    return "\n".join(lines)


def _exception_text(exc: Mapping[str, Any]) -> str:
    parts = []
    for cause in exc.get("cause") or ():
        parts.append(_exception_text(cause))
        parts.append("\nThe above exception was the direct cause of the following exception:\n")
    parts.append(traceback_text(exc.get("stacktrace") or ()))
    message = exc.get("message")
    parts.append(f"{exc.get('type')}: {message}" if message else str(exc.get("type")))
    return "\n".join(parts)


def _error_attributes(event: Mapping[str, Any]) -> dict[str, Any]:
    exc = event.get("exception")
    attrs: dict[str, Any] = {}
    if isinstance(exc, dict):
        module = exc.get("module")
        name = str(exc.get("type"))
        attrs["exception.type"] = name if not module or module == "builtins" else \
            f"{module}.{name}"
        attrs["exception.message"] = exc.get("message")
        attrs["exception.stacktrace"] = _exception_text(exc)
        attrs["beatlib.error.handled"] = exc.get("handled")
    attrs["beatlib.error.id"] = event.get("id")
    attrs["beatlib.error.culprit"] = event.get("culprit")
    return attrs


def exception_event(event: Mapping[str, Any]) -> dict[str, Any] | None:
    """The `exception` span event of an (intake) error event; None for a logged message."""
    if not isinstance(event.get("exception"), dict):
        return None
    return {"timeUnixNano": _nanos(int(event.get("timestamp") or 0)), "name": "exception",
            "attributes": attributes(_error_attributes(event))}


def log_record(event: Mapping[str, Any]) -> dict[str, Any]:
    """An error event as an OTLP log record: an exception at ERROR, a logged message at its
    level; with the trace and span it happened in, and the same attributes as the span
    event plus the request, user and labels of its context."""
    log: Mapping[str, Any] = event["log"] if isinstance(event.get("log"), dict) else {}
    exc: Mapping[str, Any] | None = event["exception"] if isinstance(
        event.get("exception"), dict) else None
    level = str(log.get("level") or "error").lower() if exc is None else "error"
    severity = _SEVERITY.get(level, 17)
    attrs = _error_attributes(event)
    ctx = event.get("context") or {}
    _request_attributes(ctx, attrs)
    _common_attributes(ctx, attrs)
    if log.get("logger_name"):
        attrs["log.logger"] = log["logger_name"]
    if log.get("stacktrace"):
        attrs["code.stacktrace"] = traceback_text(log["stacktrace"])
    body = log.get("message") if log.get("message") is not None else (
        f"{exc.get('type')}: {exc.get('message')}" if exc else "")
    time = _nanos(int(event.get("timestamp") or 0))
    out: dict[str, Any] = {
        "timeUnixNano": time,
        "observedTimeUnixNano": time,
        "severityNumber": severity,
        "severityText": "WARN" if level == "warning" else level.upper(),
        "body": {"stringValue": str(body)},
        "attributes": attributes(attrs),
    }
    if exc is not None:
        out["eventName"] = "exception"
    if event.get("trace_id"):
        out["traceId"] = event["trace_id"]
        out["flags"] = _FLAG_SAMPLED
        if event.get("parent_id"):
            out["spanId"] = event["parent_id"]
    return out


# --- metrics ------------------------------------------------------------------------------

def metrics(event: Mapping[str, Any], start_us: int, process_start_us: int
            ) -> list[dict[str, Any]]:
    """A metricset's samples as OTLP metrics: histograms as explicit-bucket histograms and
    counters as sums, both over the interval since `start_us` (delta), except beatlib's own
    transport counters, which count since `process_start_us` (cumulative); gauges as gauges.
    The metric names are the samples' names."""
    time = _nanos(int(event.get("timestamp") or 0))
    tx = event.get("transaction") or {}
    point_attrs = attributes({"beatlib.transaction.name": tx.get("name"),
                              "beatlib.transaction.type": tx.get("type")})
    out = []
    for name, sample in (event.get("samples") or {}).items():
        if not isinstance(sample, dict):
            continue
        point: dict[str, Any] = {"timeUnixNano": time}
        if point_attrs:
            point["attributes"] = point_attrs
        kind = sample.get("type")
        if kind == "histogram":
            bounds, counts = _buckets(sample.get("values") or [], sample.get("counts") or [])
            total = sum(sample.get("counts") or [])
            point.update(startTimeUnixNano=_nanos(start_us), count=str(total),
                         sum=sum(v * c for v, c in zip(sample.get("values") or [],
                                                       sample.get("counts") or [],
                                                       strict=False)),
                         bucketCounts=[str(c) for c in counts], explicitBounds=bounds)
            out.append({"name": name.removesuffix(".histogram"), "unit": sample.get("unit") or "",
                        "histogram": {"dataPoints": [point],
                                      "aggregationTemporality": DELTA}})
        elif kind == "counter":
            cumulative = name.startswith("beatlib.transport.")
            point["startTimeUnixNano"] = _nanos(process_start_us if cumulative else start_us)
            point.update(_number(sample.get("value")))
            out.append({"name": name, "sum": {
                "dataPoints": [point], "isMonotonic": True,
                "aggregationTemporality": CUMULATIVE if cumulative else DELTA}})
        else:
            point.update(_number(sample.get("value")))
            out.append({"name": name, "gauge": {"dataPoints": [point]}})
    return out


def _number(raw: Any) -> dict[str, Any]:
    if isinstance(raw, int) and not isinstance(raw, bool) and -_INT64 <= raw < _INT64:
        return {"asInt": str(raw)}
    try:
        return {"asDouble": float(raw)}
    except (TypeError, ValueError):
        return {"asDouble": 0.0}


def _buckets(values: list[float], counts: list[int]) -> tuple[list[float], list[int]]:
    """Explicit bounds and bucket counts from beatlib's sparse log-spaced buckets, each
    given by its middle value: every bucket's bounds are its neighbours' (eight per
    doubling), gaps between buckets become empty buckets."""
    bounds: list[float] = []
    out = [0]
    for middle, count in sorted(zip(values, counts, strict=False)):
        if middle <= 0.001:  # the first bucket holds everything up to 1 µs
            lower, upper = None, 0.001
        else:
            lower, upper = middle / _HISTOGRAM_STEP, middle * _HISTOGRAM_STEP
        if lower is not None and (not bounds or lower > bounds[-1] * (1 + 1e-9)):
            bounds.append(lower)
            out.append(0)
        if bounds and upper <= bounds[-1] * (1 + 1e-9):  # the same bucket again
            out[-2] += count
            continue
        bounds.append(upper)
        out[-1] += count  # the bucket ending at `upper`
        out.append(0)
    return bounds, out
