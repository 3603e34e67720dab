"""OTLP/HTTP intake: `POST /v1/traces`, `/v1/logs`, `/v1/metrics` (protobuf or JSON, gzip).

Requests are decoded with the official message definitions (`opentelemetry-proto`, in the
`serve` extra) and turned into the same events intake v2 produces (transaction, span, error,
metricset, with one metadata per resource), which go to the store's queue as intake's do.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from beatlib.receiver import intake
from beatlib.receiver.grouping import message_pattern

TRACES_PATH, LOGS_PATH, METRICS_PATH = "/v1/traces", "/v1/logs", "/v1/metrics"
PATHS = (TRACES_PATH, LOGS_PATH, METRICS_PATH)
INSTALL_HINT = ("OTLP intake needs the serve extra: pip install -e '.[serve]' "
                "(in a checkout of beatlib)")
RETRY_AFTER = "1"  # seconds, on a full queue
_PROTOBUF, _JSON = "application/x-protobuf", "application/json"
_TEXT = 1024  # attribute strings kept for labels
_MAX_LABELS = 64
_ERROR_SEVERITY = 17  # SEVERITY_NUMBER_ERROR

Offer = Callable[[dict[str, Any], list[intake.Event]], bool]

try:  # the serve extra
    # (protobuf ships no type hints; types-protobuf may or may not be installed)
    from google.protobuf import json_format  # type: ignore[import-untyped,unused-ignore]
    from google.protobuf.message import (  # type: ignore[import-untyped,unused-ignore]
        DecodeError,
    )
    from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
    from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
except ImportError:  # pragma: no cover - exercised by a test that hides the package
    json_format = None  # type: ignore[assignment]


def available() -> bool:
    """Whether the message definitions are installed."""
    return json_format is not None


@dataclass
class Reply:
    """An OTLP answer: status, body bytes in the request's encoding, its type, headers."""

    status: int
    body: bytes
    content_type: str
    headers: dict[str, str] = field(default_factory=dict)


def handle(path: str, body: bytes, headers: intake.Headers, offer: Offer) -> Reply:
    """One OTLP/HTTP export request (authorization is checked before the body is read)."""
    content_type = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
    encoding = _JSON if content_type == _JSON else _PROTOBUF
    if content_type not in (_PROTOBUF, _JSON):
        return _status(415, f"unsupported content type {content_type!r}: send "
                            f"{_PROTOBUF} or {_JSON}", _JSON)
    if not available():
        return _status(501, INSTALL_HINT, encoding)
    try:
        raw = intake.decompress(body, headers.get("Content-Encoding", ""))
    except intake.BodyError as exc:
        return _status(413 if "larger than" in str(exc) else 400, str(exc), encoding)
    signal = _SIGNALS[path]
    request = signal.request()
    try:
        if encoding == _JSON:
            document = json.loads(raw)
            if not isinstance(document, dict):
                raise ValueError("the body must be a JSON object")
            json_format.ParseDict(_hex_ids_to_base64(document), request,
                                  ignore_unknown_fields=True)
        else:
            request.ParseFromString(raw)
    except (DecodeError, json_format.ParseError, ValueError, TypeError, RecursionError,
            UnicodeDecodeError) as exc:
        return _status(400, f"cannot decode the {signal.name} request: {exc}"[:1024], encoding)
    batches, rejected, problems = signal.convert(request)
    stored = 0
    for metadata, events in batches:
        if offer(metadata, events):
            stored += 1
        elif stored == 0:  # nothing taken yet: the client may retry it all
            return _status(503, "queue is full; retry later", encoding,
                           {"Retry-After": RETRY_AFTER})
        else:
            rejected += sum(signal.rejects(kind) for kind, _ in events)
            problems.append("queue is full")
    response = signal.response()
    if rejected or problems:
        partial = response.partial_success
        setattr(partial, signal.rejected_field, rejected)
        partial.error_message = "; ".join(dict.fromkeys(problems))[:2048]
    if encoding == _JSON:
        return Reply(200, json_format.MessageToJson(response, indent=None).encode(), _JSON)
    return Reply(200, response.SerializeToString(), _PROTOBUF)


def _status(code: int, message: str, encoding: str, headers: dict[str, str] | None = None
            ) -> Reply:
    """A google.rpc.Status body ({code, message}) in the request's encoding."""
    if encoding == _JSON:
        body = json.dumps({"code": code, "message": message}).encode()
    else:  # two fields: 1 code (varint), 2 message (bytes); written here, not worth a package
        text = message.encode("utf-8", "replace")
        body = b"\x08" + _varint(code) + b"\x12" + _varint(len(text)) + text
    return Reply(code, body, encoding, headers or {})


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


_ID_KEYS = frozenset(("traceId", "spanId", "parentSpanId", "trace_id", "span_id",
                      "parent_span_id"))


def _hex_ids_to_base64(obj: Any, depth: int = 0) -> Any:
    """OTLP/JSON writes trace and span ids in hex, where the proto3 JSON mapping (which
    json_format speaks) wants base64 for bytes."""
    if depth > 64:
        raise ValueError("too deeply nested")
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            if key in _ID_KEYS and isinstance(value, str):
                try:
                    value = base64.b64encode(bytes.fromhex(value)).decode()
                except ValueError:
                    raise ValueError(f"{key} is not hex: {value[:40]!r}") from None
            else:
                value = _hex_ids_to_base64(value, depth + 1)
            out[key] = value
        return out
    if isinstance(obj, list):
        return [_hex_ids_to_base64(v, depth + 1) for v in obj]
    return obj


# --- attributes and resources ------------------------------------------------------------


def _value(any_value: Any, depth: int = 0) -> Any:
    """An AnyValue as a plain value (arrays and maps as lists and dicts, bytes as hex)."""
    which = any_value.WhichOneof("value")
    if which is None:
        return None
    value = getattr(any_value, which)
    if which == "array_value":
        return [_value(v, depth + 1) for v in value.values] if depth < 8 else None
    if which == "kvlist_value":
        return _attributes(value.values, depth + 1) if depth < 8 else None
    if which == "bytes_value":
        return value.hex()
    return value


def _attributes(pairs: Iterable[Any], depth: int = 0) -> dict[str, Any]:
    return {kv.key: _value(kv.value, depth) for kv in pairs}


def _str(attrs: dict[str, Any], *keys: str) -> str | None:
    for key in keys:
        value = attrs.get(key)
        if value is not None and not isinstance(value, dict | list) and str(value) != "":
            return str(value)[:_TEXT]
    return None


def _int(attrs: dict[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = attrs.get(key)
        if isinstance(value, bool):
            continue
        if isinstance(value, int) and -(2**63) < value < 2**63:
            return value
        if isinstance(value, str) and value.isdigit() and len(value) < 19:
            return int(value)
    return None


def metadata(resource: Any) -> dict[str, Any]:
    """Intake v2 metadata from a resource's attributes."""
    attrs = _attributes(resource.attributes)
    service: dict[str, Any] = {
        "name": _str(attrs, "service.name") or "unknown_service",
        "agent": {"name": _str(attrs, "telemetry.sdk.name") or "otlp",
                  "version": _str(attrs, "telemetry.sdk.version") or "unknown"},
    }
    for key, names in (("version", ("service.version",)),
                       ("environment", ("deployment.environment.name",
                                        "deployment.environment"))):
        value = _str(attrs, *names)
        if value is not None:
            service[key] = value
    language = _str(attrs, "telemetry.sdk.language")
    if language:
        service["language"] = {"name": language}
        runtime = _str(attrs, "process.runtime.version")
        if runtime:
            service["language"]["version"] = runtime
    if intake.check("metadata", {"service": service}) is not None:
        service["name"] = "unknown_service"
    out: dict[str, Any] = {"service": service}
    host = _str(attrs, "host.name")
    if host:
        out["system"] = {"hostname": host, "detected_hostname": host}
    pid = _int(attrs, "process.pid")
    if pid is not None:
        out["process"] = {"pid": pid}
    return out


def _labels(attrs: dict[str, Any], used: Iterable[str] = ()) -> dict[str, Any]:
    """The attributes not mapped elsewhere, as intake labels (scalar values, keys without
    dots)."""
    skip = set(used)
    labels: dict[str, Any] = {}
    for key, value in attrs.items():
        if key in skip or len(labels) >= _MAX_LABELS:
            continue
        if isinstance(value, dict | list):
            value = json.dumps(value, default=str)
        if isinstance(value, float) and value != value:  # NaN is no JSON
            continue
        if isinstance(value, int) and not isinstance(value, bool) and \
                not -(2**53) < value < 2**53:
            value = str(value)
        label = re.sub(r'[.*"]', "_", key)[:_TEXT]
        labels[label] = value[:_TEXT] if isinstance(value, str) else value
    return labels


# --- traces ------------------------------------------------------------------------------

_SERVER, _CLIENT, _PRODUCER, _CONSUMER = 2, 3, 4, 5
_STATUS_OK, _STATUS_ERROR = 1, 2
_FLAG_REMOTE_KNOWN, _FLAG_REMOTE = 0x100, 0x200
_HTTP_STATUS = ("http.response.status_code", "http.status_code")
_HTTP_METHOD = ("http.request.method", "http.method")
# Attributes a span's fields are made of, so not repeated among its labels.
_MAPPED = frozenset((*_HTTP_STATUS, *_HTTP_METHOD, "url.full", "http.url", "url.path",
                     "http.target", "db.system.name", "db.system", "db.query.text",
                     "db.statement", "db.namespace", "db.name", "messaging.system",
                     "messaging.operation.type", "messaging.operation",
                     "messaging.destination.name", "messaging.destination", "rpc.system",
                     "rpc.method"))


def _ids_ok(trace_id: bytes, span_id: bytes) -> bool:
    return len(trace_id) == 16 and len(span_id) == 8 and any(trace_id) and any(span_id)


def _us(nanos: int) -> int:
    return nanos // 1000


def _duration_ms(span: Any) -> float:
    return max(0, span.end_time_unix_nano - span.start_time_unix_nano) / 1e6


def _is_transaction(span: Any) -> bool:
    if span.kind in (_SERVER, _CONSUMER) or not span.parent_span_id:
        return True
    if span.flags & _FLAG_REMOTE_KNOWN:
        return bool(span.flags & _FLAG_REMOTE)
    return False  # its parent may be in another batch of the same process


def _outcome(span: Any, attrs: dict[str, Any], server: bool) -> str:
    if span.status.code == _STATUS_ERROR:
        return "failure"
    status = _int(attrs, *_HTTP_STATUS)
    if status is not None and status >= (500 if server else 400):
        return "failure"
    if span.status.code == _STATUS_OK or status is not None or server:
        return "success"
    return "unknown"


def _http_context(attrs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(context.request / context.http pieces, response) from HTTP attributes."""
    url = _str(attrs, "url.full", "http.url")
    path = _str(attrs, "url.path", "http.target")
    request: dict[str, Any] = {}
    method = _str(attrs, *_HTTP_METHOD)
    if method:
        request["method"] = method
    if url or path:
        request["url"] = {"full": url} if url else {"pathname": path}
        if url is None and path:
            request["url"]["full"] = path
    status = _int(attrs, *_HTTP_STATUS)
    return request, ({"status_code": status} if status is not None else None)


def _transaction(span: Any, attrs: dict[str, Any], started: int) -> dict[str, Any]:
    request, response = _http_context(attrs)
    http = bool(request) or response is not None
    tx: dict[str, Any] = {
        "id": span.span_id.hex(), "trace_id": span.trace_id.hex(),
        "name": span.name[:_TEXT] or "unnamed",
        "type": "request" if span.kind == _SERVER else
                "messaging" if span.kind == _CONSUMER else "unknown",
        "timestamp": _us(span.start_time_unix_nano), "duration": _duration_ms(span),
        "outcome": _outcome(span, attrs, True), "sampled": True,
        "span_count": {"started": started, "dropped": 0},
    }
    if span.parent_span_id:
        tx["parent_id"] = span.parent_span_id.hex()
    status = response["status_code"] if response else None
    if status is not None and 100 <= status < 600:
        tx["result"] = f"HTTP {status // 100}xx"
    elif not http and span.status.code:
        tx["result"] = "Error" if span.status.code == _STATUS_ERROR else "Success"
    context: dict[str, Any] = {}
    if request:
        context["request"] = {"method": request.get("method", "GET"), "url": request.get(
            "url", {})}
    if response:
        context["response"] = response
    labels = _labels(attrs, _MAPPED)
    if labels:
        context["tags"] = labels
    if context:
        tx["context"] = context
    return tx


def _span_kind(attrs: dict[str, Any], kind: int) -> tuple[str, str | None, str | None,
                                                          dict[str, Any]]:
    """type, subtype, action and context of a span, by the semantic conventions."""
    db = _str(attrs, "db.system.name", "db.system")
    if db:
        statement = _str(attrs, "db.query.text", "db.statement")
        instance = _str(attrs, "db.namespace", "db.name")
        context: dict[str, Any] = {"db": {"type": "sql" if statement else db}}
        if statement:
            context["db"]["statement"] = (attrs.get("db.query.text") or
                                          attrs.get("db.statement") or "")[:10_000]
        if instance:
            context["db"]["instance"] = instance
        context["destination"] = {"service": {"resource": f"{db}/{instance}" if instance
                                              else db}}
        context["service"] = {"target": {"type": db, **({"name": instance} if instance
                                                        else {})}}
        return "db", db, "query", context
    messaging = _str(attrs, "messaging.system")
    if messaging:
        operation = _str(attrs, "messaging.operation.type", "messaging.operation") or \
            {_PRODUCER: "send", _CONSUMER: "receive"}.get(kind, "process")
        queue = _str(attrs, "messaging.destination.name", "messaging.destination")
        context = {"destination": {"service": {"resource": f"{messaging}/{queue}" if queue
                                               else messaging}}}
        if queue:
            context["message"] = {"queue": {"name": queue}}
        return "messaging", messaging, operation, context
    rpc = _str(attrs, "rpc.system")
    if rpc:
        where = _str(attrs, "server.address", "net.peer.name")
        return "external", rpc, _str(attrs, "rpc.method"), (
            {"destination": {"service": {"resource": where}}} if where else {})
    method = _str(attrs, *_HTTP_METHOD)
    if kind == _CLIENT and (method or _str(attrs, "url.full", "http.url")):
        url = _str(attrs, "url.full", "http.url")
        http: dict[str, Any] = {"method": method or "GET"}
        if url:
            http["url"] = url
        status = _int(attrs, *_HTTP_STATUS)
        if status is not None:
            http["status_code"] = status
        context = {"http": http}
        host = _str(attrs, "server.address", "net.peer.name")
        port = _int(attrs, "server.port", "net.peer.port")
        if host is None and url:
            parts = urlsplit(url)
            host, port = parts.hostname, port or parts.port or \
                {"http": 80, "https": 443}.get(parts.scheme)
        if host:
            context["destination"] = {"service": {"resource": f"{host}:{port}" if port
                                                  else host}}
        return "external", "http", method or "GET", context
    if kind == _CLIENT:
        return "external", None, None, {}
    return "app", "internal", None, {}


def _span(span: Any, attrs: dict[str, Any], transaction_id: str) -> dict[str, Any]:
    kind, subtype, action, context = _span_kind(attrs, span.kind)
    labels = _labels(attrs, _MAPPED)
    if labels:
        context["tags"] = labels
    event: dict[str, Any] = {
        "id": span.span_id.hex(), "trace_id": span.trace_id.hex(),
        "parent_id": span.parent_span_id.hex(), "transaction_id": transaction_id,
        "name": span.name[:_TEXT] or "unnamed", "type": kind,
        "timestamp": _us(span.start_time_unix_nano), "duration": _duration_ms(span),
        "outcome": _outcome(span, attrs, False), "sync": True,
    }
    if subtype:
        event["subtype"] = subtype
    if action:
        event["action"] = action
    if context:
        event["context"] = context
    return event


def _transaction_ids(spans: list[Any], transactions: set[bytes]) -> dict[bytes, bytes]:
    """Each span's transaction: its nearest ancestor that is one; when the chain leaves the
    batch, the outermost parent id seen (a root that ends later comes in a later batch)."""
    parents = {s.span_id: s.parent_span_id for s in spans}
    owners: dict[bytes, bytes] = {}  # span id -> its transaction, as found
    for span in spans:
        path, current = [span.span_id], span.parent_span_id
        on_path = {span.span_id}
        while current not in transactions and current in parents and current not in owners \
                and current not in on_path:  # (a cycle of parent ids ends the walk)
            path.append(current)
            on_path.add(current)
            current = parents[current]
        found = owners.get(current, current) if current not in transactions else current
        for span_id in path:
            owners[span_id] = found
    return owners


def _convert_traces(request: Any) -> tuple[list[tuple[dict[str, Any], list[intake.Event]]],
                                            int, list[str]]:
    batches, rejected, problems = [], 0, []
    for resource_spans in request.resource_spans:
        meta = metadata(resource_spans.resource)
        spans = [s for scope in resource_spans.scope_spans for s in scope.spans]
        good = [s for s in spans if _ids_ok(s.trace_id, s.span_id)]
        if len(good) < len(spans):
            rejected += len(spans) - len(good)
            problems.append("spans without a valid trace id and span id")
        transactions = {s.span_id for s in good if _is_transaction(s)}
        owner = _transaction_ids(good, transactions)
        started: dict[bytes, int] = {}
        for span in good:
            if span.span_id not in transactions:
                started[owner[span.span_id]] = started.get(owner[span.span_id], 0) + 1
        events: list[intake.Event] = []
        for span in good:
            attrs = _attributes(span.attributes)
            is_tx = span.span_id in transactions
            try:
                if is_tx:
                    event = ("transaction", _transaction(span, attrs,
                                                         started.get(span.span_id, 0)))
                    tx_id, tx_event = span.span_id, event[1]
                else:
                    event = ("span", _span(span, attrs, owner[span.span_id].hex()))
                    tx_id, tx_event = owner[span.span_id], None
                problem = intake.check(*event)
            except (ValueError, TypeError, OverflowError, RecursionError) as exc:
                problem = f"span: {exc}"
            if problem is not None:
                rejected += 1
                problems.append(problem)
                continue
            events.append(event)
            for error in _span_errors(span, tx_id, tx_event):
                if intake.check("error", error) is None:
                    events.append(("error", error))
        if events:
            batches.append((meta, events))
    return batches, rejected, problems


def _span_errors(span: Any, transaction_id: bytes, tx: dict[str, Any] | None
                 ) -> Iterable[dict[str, Any]]:
    """Span events named "exception", as errors of the span's transaction."""
    for index, span_event in enumerate(span.events):
        if span_event.name != "exception":
            continue
        attrs = _attributes(span_event.attributes)
        error = _error(attrs, span_event.time_unix_nano or span.start_time_unix_nano,
                       span.trace_id + span.span_id + struct.pack(">I", index))
        if error is None:
            continue
        error.update(trace_id=span.trace_id.hex(), parent_id=span.span_id.hex())
        if transaction_id:
            error["transaction_id"] = transaction_id.hex()
        if tx is not None:
            error["transaction"] = {"name": tx["name"], "type": tx["type"], "sampled": True}
        yield error


def _error(attrs: dict[str, Any], nanos: int, identity: bytes,
           log: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """An intake error from exception.* attributes (or a log record); None if neither."""
    exc_type = _str(attrs, "exception.type")
    message = _str(attrs, "exception.message")
    error: dict[str, Any] = {
        "id": hashlib.blake2b(identity + nanos.to_bytes(8, "big", signed=False),
                              digest_size=16).hexdigest(),
        "timestamp": _us(nanos),
    }
    if exc_type or message:
        exception: dict[str, Any] = {"type": exc_type or "Exception", "message": message or ""}
        text = attrs.get("exception.stacktrace")
        if isinstance(text, str) and text:
            parsed = stack_exception(text[:200_000])
            module = parsed.get("module")
            if exc_type and module and exc_type.startswith(module + "."):
                exc_type = exc_type[len(module) + 1:]  # a qualified name, said twice
            exception.update(parsed)
            exception["type"] = exc_type or parsed.get("type") or "Exception"
            exception["message"] = message if message is not None else \
                parsed.get("message", "")
        escaped = attrs.get("exception.escaped")
        if isinstance(escaped, bool):
            exception["handled"] = not escaped
        error["exception"] = exception
        if isinstance(text, str) and text and not exception.get("stacktrace"):
            # Another language's stack: kept as text; its first frame line (after the
            # exception's own line, in Java, JavaScript, .NET) tells where.
            error["context"] = {"custom": {"stacktrace": text[:_TEXT * 10]}}
            lines = [line.strip() for line in text.strip().splitlines()]
            if len(lines) > 1 and lines[1]:
                error["culprit"] = lines[1][:_TEXT]
    elif log is None:
        return None
    if log is not None:
        error["log"] = log
    return error


_FRAME = re.compile(r'^\s*File "(?P<file>[^"]*)", line (?P<line>\d+)(?:, in (?P<fn>.*))?$')
_CHAINED = re.compile(r"^(?:The above exception was the direct cause of the following "
                      r"exception:|During handling of the above exception, another "
                      r"exception occurred:)$", re.M)
_LIBRARY = ("site-packages", "dist-packages", "/lib/python", "\\lib\\python", "<frozen ")


def stack_exception(text: str) -> dict[str, Any]:
    """Frames (innermost first, as Python agents send them) and the cause chain of a
    Python traceback as `traceback.format_exception` writes it; {} when the text is not one."""
    blocks = [b for b in _CHAINED.split(text) if "Traceback (most recent call last):" in b]
    chain: list[dict[str, Any]] = []
    for block in blocks:
        frames, lines = [], block.splitlines()
        last = ""
        for i, line in enumerate(lines):
            found = _FRAME.match(line)
            if found:
                frame: dict[str, Any] = {
                    "filename": found["file"][:_TEXT], "lineno": int(found["line"][:9]),
                    "function": (found["fn"] or "<module>").strip()[:_TEXT],
                    "library_frame": any(m in found["file"] for m in _LIBRARY)}
                following = lines[i + 1] if i + 1 < len(lines) else ""
                if following.startswith("    ") and not _FRAME.match(following):
                    frame["context_line"] = following.strip()[:_TEXT]
                frames.append(frame)
            elif line and not line.startswith(" ") and not line.startswith("Traceback"):
                last = line
        if not frames:
            continue
        exc_type, _, message = last.partition(": ")
        module, _, name = exc_type.rpartition(".")
        chain.append({"type": name or exc_type or "Exception", "message": message,
                      **({"module": module} if module and " " not in module else {}),
                      "stacktrace": frames[::-1][:200]})
    if not chain:
        return {}
    top = chain[-1]
    exc = top
    for cause in reversed(chain[:-1]):  # the one before is the immediate cause
        exc["cause"] = [cause]
        exc = cause
    return top


# --- logs --------------------------------------------------------------------------------

_LEVELS = ((21, "fatal"), (17, "error"), (13, "warning"), (9, "info"), (5, "debug"),
           (1, "trace"))


def _convert_logs(request: Any) -> tuple[list[tuple[dict[str, Any], list[intake.Event]]],
                                          int, list[str]]:
    """Log records with an exception, or of severity ERROR and above, as errors; the rest
    are not kept (the dashboard has no logs page)."""
    batches = []
    for resource_logs in request.resource_logs:
        meta = metadata(resource_logs.resource)
        events: list[intake.Event] = []
        for scope_logs in resource_logs.scope_logs:
            for index, record in enumerate(scope_logs.log_records):
                error = _log_error(record, scope_logs.scope.name, index)
                if error is not None and intake.check("error", error) is None:
                    events.append(("error", error))
        if events:
            batches.append((meta, events))
    return batches, 0, []


def _log_error(record: Any, logger: str, index: int) -> dict[str, Any] | None:
    attrs = _attributes(record.attributes)
    has_exception = any(k.startswith("exception.") for k in attrs)
    if not has_exception and record.severity_number < _ERROR_SEVERITY:
        return None
    body = _value(record.body)
    text = body if isinstance(body, str) else "" if body is None else json.dumps(body,
                                                                              default=str)
    level = record.severity_text.lower() or next(
        (name for floor, name in _LEVELS if record.severity_number >= floor), "error")
    message = (text or _str(attrs, "exception.message") or "(no message)")[:10_000]
    # The SDKs send the formatted message: its pattern stands in for the template.
    log = {"message": message, "param_message": message_pattern(message),
           "level": level[:_TEXT], "logger_name": logger[:_TEXT] or "otlp"}
    nanos = record.time_unix_nano or record.observed_time_unix_nano
    error = _error(attrs, nanos, record.trace_id + record.span_id +
                   text.encode("utf-8", "replace")[:256] + struct.pack(">I", index), log)
    if error is None:
        return None
    if len(record.trace_id) == 16 and any(record.trace_id):
        error["trace_id"] = record.trace_id.hex()
        if len(record.span_id) == 8 and any(record.span_id):
            error["parent_id"] = record.span_id.hex()
    labels = _labels(attrs, [k for k in attrs if k.startswith("exception.")])
    if labels:
        error.setdefault("context", {})["tags"] = labels
    return error


# --- metrics -----------------------------------------------------------------------------

# OpenTelemetry's process metrics under the names the dashboard's services page reads.
_PROCESS = {"process.memory.usage": "system.process.memory.rss.bytes",
            "process.cpu.utilization": "system.process.cpu.total.norm.pct"}
_RUNTIME = re.compile(r"^process\.runtime\.[a-z]+\.(memory|cpu\.utilization)$")


def _sample_name(name: str, attrs: dict[str, Any]) -> tuple[str, bool]:
    """(the sample's name, whether the point's attributes are folded into it)."""
    if name in _PROCESS:
        return _PROCESS[name], True
    runtime = _RUNTIME.match(name)
    if runtime and runtime[1] == "cpu.utilization":
        return _PROCESS["process.cpu.utilization"], True
    if runtime and attrs.get("type") == "rss":
        return _PROCESS["process.memory.usage"], True
    return name.replace("*", "_").replace('"', "_")[:_TEXT], False


def _convert_metrics(request: Any) -> tuple[list[tuple[dict[str, Any], list[intake.Event]]],
                                             int, list[str]]:
    """Gauges, sums and explicit-bucket histograms as metricsets, one per timestamp and
    attribute set; exponential histograms and summaries are not kept."""
    batches = []
    for resource_metrics in request.resource_metrics:
        meta = metadata(resource_metrics.resource)
        sets: dict[tuple[int, str], dict[str, Any]] = {}
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                which = metric.WhichOneof("data")
                if which not in ("gauge", "sum", "histogram"):
                    continue
                for point in getattr(metric, which).data_points:
                    _add_point(sets, metric, which, point)
        events: list[intake.Event] = []
        for metricset in sets.values():
            if intake.check("metricset", metricset) is None:
                events.append(("metricset", metricset))
        if events:
            batches.append((meta, events))
    return batches, 0, []


def _add_point(sets: dict[tuple[int, str], dict[str, Any]], metric: Any, which: str,
               point: Any) -> None:
    attrs = _attributes(point.attributes)
    name, folded = _sample_name(metric.name, attrs)
    if which == "histogram":
        sample = _histogram(point)
        if sample is None:
            return
    else:
        value = point.as_double if point.WhichOneof("value") == "as_double" else point.as_int
        if value != value or value in (float("inf"), float("-inf")):
            return
        sample = {"value": value}
        if which == "sum" and metric.sum.is_monotonic:
            sample["type"] = "counter"
        elif which == "gauge":
            sample["type"] = "gauge"
    tags = {} if folded else _labels(attrs)
    micros = _us(point.time_unix_nano)
    key = (micros, json.dumps(tags, sort_keys=True, default=str))
    metricset = sets.setdefault(key, {"timestamp": micros, "samples": {}})
    if tags:
        metricset["tags"] = tags
    previous = metricset["samples"].get(name)
    if folded and previous is not None and "value" in previous:  # e.g. user + system CPU
        previous["value"] += sample["value"]
    else:
        metricset["samples"][name] = sample


def _histogram(point: Any) -> dict[str, Any] | None:
    """Explicit buckets as intake's histogram: each bucket's midpoint and count (the open
    first and last buckets at their one bound)."""
    bounds, counts = list(point.explicit_bounds), list(point.bucket_counts)
    if not counts or len(counts) != len(bounds) + 1:
        return None
    values, kept = [], []
    for i, count in enumerate(counts):
        if not count:
            continue
        if not bounds:
            value = point.sum / point.count if point.count else 0.0
        elif i == 0:
            value = bounds[0]
        elif i == len(bounds):
            value = bounds[-1]
        else:
            value = (bounds[i - 1] + bounds[i]) / 2
        if value != value or value in (float("inf"), float("-inf")):
            return None
        values.append(value)
        kept.append(count)
    return {"type": "histogram", "values": values, "counts": kept}


@dataclass(frozen=True)
class _Signal:
    name: str
    request: Callable[[], Any]
    response: Callable[[], Any]
    rejected_field: str
    convert: Callable[[Any], tuple[list[tuple[dict[str, Any], list[intake.Event]]], int,
                                   list[str]]]

    def rejects(self, kind: str) -> int:
        """How many of this signal's items an event of `kind` not stored stands for."""
        return int({"traces": kind in ("transaction", "span"), "logs": kind == "error",
                    "metrics": kind == "metricset"}[self.name])


_SIGNALS: dict[str, _Signal] = {}
if json_format is not None:
    _SIGNALS = {
        TRACES_PATH: _Signal("traces", trace_service_pb2.ExportTraceServiceRequest,
                             trace_service_pb2.ExportTraceServiceResponse, "rejected_spans",
                             _convert_traces),
        LOGS_PATH: _Signal("logs", logs_service_pb2.ExportLogsServiceRequest,
                           logs_service_pb2.ExportLogsServiceResponse, "rejected_log_records",
                           _convert_logs),
        METRICS_PATH: _Signal("metrics", metrics_service_pb2.ExportMetricsServiceRequest,
                              metrics_service_pb2.ExportMetricsServiceResponse,
                              "rejected_data_points", _convert_metrics),
    }

