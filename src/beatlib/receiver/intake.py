"""Intake v2 as Elastic APM Server speaks it: `POST /intake/v2/events` and `GET /`.

Requests are decoded, split into NDJSON lines and given a light structural check (the fields
the store relies on, with their types), then handed to the writer's bounded queue as one
batch. Nothing here touches the database, so a slow one never makes intake fail.
"""

from __future__ import annotations

import hmac
import json
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from beatlib.version import __version__

INTAKE_PATH = "/intake/v2/events"
RELEASES_PATH = "/beatlib/v1/releases"  # beatlib's own: `beatlib release` posts here
MAX_EVENT_SIZE = 300 * 1024  # per decompressed line, as apm-server's default
MAX_BODY_SIZE = 64 * 1024 * 1024  # decompressed; past it the request is refused
_PIECE = 1024 * 1024  # decompressed at a time
MAX_ERRORS_LISTED = 5  # as apm-server: the rest are counted, not listed
_DOCUMENT_ECHO = 2048  # characters of an offending line sent back

EVENT_KINDS = ("transaction", "span", "error", "metricset")
Event = tuple[str, dict[str, Any]]  # (kind, the object under that key)


class Headers(Protocol):
    """Request headers, looked up case-insensitively (http.server's message, or a dict in
    tests that spells the names as HTTP does)."""

    def get(self, name: str, default: Any = None, /) -> Any: ...


@dataclass
class Answer:
    """What to send back: status, JSON body (None for an empty body), extra headers."""

    status: int
    body: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Parsed:
    """A request body, read: its metadata, the valid events and what was wrong with the rest."""

    metadata: dict[str, Any] | None = None
    events: list[Event] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)
    error_count: int = 0

    def reject(self, lineno: int | None, message: str, document: bytes | None = None) -> None:
        self.error_count += 1
        if len(self.errors) >= MAX_ERRORS_LISTED:
            return
        where = f"line {lineno}: " if lineno is not None else ""
        error = {"message": where + message}
        if document is not None:
            error["document"] = document[:_DOCUMENT_ECHO].decode("utf-8", "replace")
        self.errors.append(error)


class BodyError(Exception):
    """The body as a whole cannot be read (decompression, size)."""


def server_info(authorized: bool, health: dict[str, Any] | None = None) -> Answer:
    """`GET /`: who we are, and how the store's writer is doing; an empty 200 to requests
    lacking a configured token."""
    if not authorized:
        return Answer(200)
    info: dict[str, Any] = {
        "version": __version__,
        "build_date": "",
        "build_sha": "",
        "publish_ready": bool(health is None or health.get("writer_running")),
    }
    if health is not None:
        info["beatlib_receiver"] = health
    return Answer(200, info)


UNAUTHORIZED = Answer(401, {"error": "authentication failed: missing or invalid secret token"})


def authorized(header: str | None, secret_token: str | None) -> bool:
    """`Authorization: Bearer <token>` when a token is set; everything otherwise."""
    if not secret_token:
        return True
    scheme, _, credentials = (header or "").strip().partition(" ")
    # Constant time; the token never appears in an answer.
    return scheme.lower() == "bearer" and hmac.compare_digest(
        credentials.strip().encode("utf-8", "replace"), secret_token.encode("utf-8", "replace")
    )


def handle_events(
    body: bytes,
    headers: Headers,
    secret_token: str | None,
    offer: Callable[[dict[str, Any], list[Event]], bool],
    verbose: bool = False,
) -> Answer:
    """`POST /intake/v2/events`. `offer(metadata, events)` queues a batch and says whether
    there was room; a full queue answers 503, which the client retries."""
    if not authorized(headers.get("Authorization"), secret_token):
        return UNAUTHORIZED
    content_type = headers.get("Content-Type")
    if content_type is not None and "application/x-ndjson" not in content_type:
        return _failure(400, f"invalid content type: {content_type!r}")
    try:
        raw = decompress(body, headers.get("Content-Encoding", ""))
    except BodyError as exc:
        return _failure(400, str(exc))
    parsed = parse(raw)
    if parsed.events and parsed.metadata is not None:
        if not offer(parsed.metadata, parsed.events):
            return _failure(503, "queue is full")
    if parsed.error_count:
        return Answer(400, {"accepted": len(parsed.events), "errors": parsed.errors})
    return Answer(202, {"accepted": len(parsed.events)} if verbose else None)


def handle_release(
    body: bytes,
    headers: Headers,
    secret_token: str | None,
    offer: Callable[[dict[str, Any], list[Event]], bool],
) -> Answer:
    """`POST /beatlib/v1/releases`: one release record as JSON (see docs/releases.md),
    queued like intake events; 202 once queued."""
    if not authorized(headers.get("Authorization"), secret_token):
        return UNAUTHORIZED
    if len(body) > MAX_EVENT_SIZE:
        return _failure(400, "release record exceeded the permitted size")
    try:
        record = json.loads(body, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        return _failure(400, f"invalid JSON: {exc}")
    if not isinstance(record, dict):
        return _failure(400, f"release: must be an object, got {_type_name(record)}")
    problem = check("release", record)
    if problem is not None:
        return _failure(400, problem)
    service = record["service"]
    metadata = {"service": {"name": service["name"], "environment": service.get("environment")}}
    if not offer(metadata, [("release", record)]):
        return _failure(503, "queue is full")
    return Answer(202, {"accepted": 1})


def _failure(status: int, message: str) -> Answer:
    return Answer(status, {"accepted": 0, "errors": [{"message": message}]})


def decompress(body: bytes, encoding: str) -> bytes:
    """By Content-Encoding (gzip; deflate = zlib-wrapped), else by sniffing, as apm-server
    does. Bounded: a small body that inflates past MAX_BODY_SIZE is refused."""
    encoding = encoding.strip().lower()
    if encoding == "gzip" or (encoding in ("", "identity") and body[:2] == b"\x1f\x8b"):
        wbits, name = 16 + zlib.MAX_WBITS, "gzip"
    elif encoding == "deflate" or (encoding == "" and body and body[0] & 0x0F == 8):
        wbits, name = zlib.MAX_WBITS, "deflate"
    else:
        if len(body) > MAX_BODY_SIZE:
            raise BodyError(f"request body larger than {MAX_BODY_SIZE} bytes")
        return body
    out: list[bytes] = []
    size = 0
    while body:  # gzip allows several members one after another
        inflater = zlib.decompressobj(wbits)
        try:
            # A piece at a time: a body past the limit is refused holding no more than the
            # limit, not the limit and the buffer zlib grows to reach it.
            while body:
                out.append(inflater.decompress(body, _PIECE))
                size += len(out[-1])
                if size > MAX_BODY_SIZE:
                    raise BodyError(f"decompressed request body larger than {MAX_BODY_SIZE} "
                                    "bytes")
                body = inflater.unconsumed_tail
            out.append(inflater.flush())
            size += len(out[-1])
        except zlib.error as exc:
            raise BodyError(f"{name} decompression failed: {exc}") from None
        if not inflater.eof:
            raise BodyError(f"{name} decompression failed: truncated stream")
        body = inflater.unused_data if name == "gzip" else b""
    if size > MAX_BODY_SIZE:
        raise BodyError(f"decompressed request body larger than {MAX_BODY_SIZE} bytes")
    return b"".join(out)


def parse(raw: bytes) -> Parsed:
    """Splits NDJSON and checks each line. Line 1 must be metadata; if it is not, nothing
    else is read. Empty lines are skipped, as apm-server does."""
    parsed = Parsed()
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        first = parsed.metadata is None and not parsed.events and not parsed.error_count
        if len(line) > MAX_EVENT_SIZE:
            parsed.reject(lineno, "event exceeded the permitted size", line)
            if first:
                return parsed
            continue
        kind, obj, problem = _read_line(line)
        if problem is None and first and kind != "metadata":
            problem = '"metadata" required on the first line'
        elif problem is None and not first and kind == "metadata":
            problem = "metadata is allowed only on the first line"
        elif problem is None:
            problem = check(kind, obj)
        if problem is not None:
            parsed.reject(lineno, problem, line)
            if first:  # without metadata, nothing can be attributed to a service
                return parsed
        elif kind == "metadata":
            parsed.metadata = obj
        else:
            parsed.events.append((kind, obj))
    return parsed


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _read_line(line: bytes) -> tuple[str, dict[str, Any], str | None]:
    try:
        obj = json.loads(line, parse_constant=_no_constant)
    except UnicodeDecodeError:
        return "", {}, "invalid UTF-8"
    except (ValueError, RecursionError) as exc:
        return "", {}, f"invalid JSON: {exc}"
    if not isinstance(obj, dict) or len(obj) != 1:
        return "", {}, "a line must be a JSON object with exactly one key, the event type"
    ((kind, event),) = obj.items()
    if kind not in EVENT_KINDS and kind != "metadata":
        return kind, {}, f"did not recognize object type: {kind!r}"
    if not isinstance(event, dict):
        return kind, {}, f"{kind}: must be an object, got {_type_name(event)}"
    return kind, event, None


# --- the light structural check ------------------------------------------------------------
# Not the JSON schemas: only what the store and the dashboard rely on, so that a stored
# event can always be shown. Each rule: field, accepted types, required.

_STR, _INT, _BOOL, _OBJ, _LIST = (str,), (int,), (bool,), (dict,), (list,)
_NUM = (int, float)
_INT_LIMIT = 2**63  # SQLite integers
_Rule = tuple[str, tuple[type, ...], bool]

_COMMON: list[_Rule] = [("timestamp", _INT, False), ("context", _OBJ, False)]
_RULES: dict[str, list[_Rule]] = {
    "metadata": [("service", _OBJ, True), ("process", _OBJ, False), ("system", _OBJ, False)],
    "transaction": _COMMON + [
        ("id", _STR, True), ("trace_id", _STR, True), ("type", _STR, True),
        ("duration", _NUM, True), ("span_count", _OBJ, True), ("name", _STR, False),
        ("result", _STR, False), ("outcome", _STR, False), ("parent_id", _STR, False),
        ("sampled", _BOOL, False),
    ],
    "span": _COMMON + [
        ("id", _STR, True), ("trace_id", _STR, True), ("parent_id", _STR, True),
        ("name", _STR, True), ("type", _STR, True), ("duration", _NUM, True),
        ("transaction_id", _STR, False), ("subtype", _STR, False), ("action", _STR, False),
        ("start", _NUM, False), ("outcome", _STR, False), ("sync", _BOOL, False),
        ("stacktrace", _LIST, False),
    ],
    "error": _COMMON + [
        ("id", _STR, True), ("trace_id", _STR, False), ("transaction_id", _STR, False),
        ("parent_id", _STR, False), ("culprit", _STR, False), ("exception", _OBJ, False),
        ("log", _OBJ, False), ("transaction", _OBJ, False),
    ],
    "metricset": [("timestamp", _INT, False), ("samples", _OBJ, True), ("tags", _OBJ, False),
                  ("transaction", _OBJ, False), ("span", _OBJ, False)],
    "release": [("service", _OBJ, True), ("version", _STR, True), ("branch", _STR, False),
                ("commit", _STR, False), ("previous", _STR, False), ("commits", _LIST, False),
                ("deployed_at", _STR, False)],
}
_SERVICE_RULES: list[_Rule] = [
    ("name", _STR, True), ("agent", _OBJ, True), ("version", _STR, False),
    ("environment", _STR, False), ("framework", _OBJ, False), ("language", _OBJ, False),
]
_FRAME_RULES: list[_Rule] = [
    ("filename", _STR, False), ("module", _STR, False), ("function", _STR, False),
    ("lineno", _INT, False), ("library_frame", _BOOL, False), ("context_line", _STR, False),
    ("pre_context", _LIST, False), ("post_context", _LIST, False), ("vars", _OBJ, False),
]


def check(kind: str, event: dict[str, Any]) -> str | None:
    """None if `event` has what the receiver needs, else why not ("transaction: ...")."""
    problem = _check_fields(event, _RULES[kind], "")
    if problem is None:
        problem = _EXTRA_CHECKS.get(kind, lambda _: None)(event)
    return f"{kind}: {problem}" if problem else None


def _check_fields(obj: dict[str, Any], rules: list[_Rule], prefix: str) -> str | None:
    for name, types, required in rules:
        value: Any = obj.get(name)
        if value is None:
            if required:
                return f'"{prefix}{name}" is required'
            continue
        # bool is an int to Python, not to JSON: true is no duration.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            wanted = "a number" if types == _NUM else _JSON_NAMES[types[0]]
            return f'"{prefix}{name}" must be {wanted}, got {_type_name(value)}'
        number: Any = value  # (isinstance with a tuple of types narrows to object)
        if types == _NUM and not _finite(number):
            return f'"{prefix}{name}" must be a finite number'
        if types == _INT and not -_INT_LIMIT < number < _INT_LIMIT:
            return f'"{prefix}{name}" is out of range'
    return None


def _check_metadata(event: dict[str, Any]) -> str | None:
    service = event["service"]
    problem = _check_fields(service, _SERVICE_RULES, "service.")
    if problem is None and not service["name"].strip():
        return '"service.name" must not be empty'
    return problem


def _check_span(event: dict[str, Any]) -> str | None:
    if event.get("timestamp") is None and event.get("start") is None:
        return 'one of "timestamp" or "start" is required'
    return _check_stacktrace(event.get("stacktrace"), "stacktrace")


def _check_error(event: dict[str, Any]) -> str | None:
    exc, log = event.get("exception"), event.get("log")
    if exc is None and log is None:
        return 'one of "exception" or "log" is required'
    while exc is not None:
        problem = _check_fields(exc, [("type", _STR, False), ("message", _STR, False),
                                      ("module", _STR, False), ("stacktrace", _LIST, False),
                                      ("handled", _BOOL, False), ("cause", _LIST, False)],
                                "exception.")
        if problem is None and exc.get("type") is None and exc.get("message") is None:
            problem = 'one of "exception.type" or "exception.message" is required'
        if problem is None:
            problem = _check_stacktrace(exc.get("stacktrace"), "exception.stacktrace")
        if problem is not None:
            return problem
        causes = exc.get("cause") or []
        if causes and not isinstance(causes[0], dict):
            return f'"exception.cause" items must be objects, got {_type_name(causes[0])}'
        exc = causes[0] if causes else None  # the first cause chain is what we show
    if log is not None:
        problem = _check_fields(log, [("message", _STR, True), ("param_message", _STR, False),
                                      ("level", _STR, False), ("logger_name", _STR, False),
                                      ("stacktrace", _LIST, False)], "log.")
        if problem is None:
            problem = _check_stacktrace(log.get("stacktrace"), "log.stacktrace")
        return problem
    return None


def _check_stacktrace(frames: list[Any] | None, where: str) -> str | None:
    for i, frame in enumerate(frames or ()):
        if not isinstance(frame, dict):
            return f'"{where}[{i}]" must be an object, got {_type_name(frame)}'
        problem = _check_fields(frame, _FRAME_RULES, f"{where}[{i}].")
        if problem is not None:
            return problem
    return None


def _check_metricset(event: dict[str, Any]) -> str | None:
    for name, sample in event["samples"].items():
        if not isinstance(sample, dict):
            return f'"samples.{name}" must be an object, got {_type_name(sample)}'
    return None


def _check_release(record: dict[str, Any]) -> str | None:
    problem = _check_fields(record["service"], [("name", _STR, True),
                                                ("environment", _STR, False)], "service.")
    if problem is None and not record["service"]["name"].strip():
        return '"service.name" must not be empty'
    for i, commit in enumerate(record.get("commits") or ()):
        if not isinstance(commit, dict):
            return f'"commits[{i}]" must be an object, got {_type_name(commit)}'
        problem = problem or _check_fields(commit, [(k, _STR, False) for k in (
            "commit", "author", "subject")], f"commits[{i}].")
    return problem


_EXTRA_CHECKS: dict[str, Callable[[dict[str, Any]], str | None]] = {
    "release": _check_release,
    "metadata": _check_metadata,
    "span": _check_span,
    "error": _check_error,
    "metricset": _check_metricset,
}
_JSON_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
               dict: "an object", list: "an array"}


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too big for a float
        return False


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return _JSON_NAMES.get(type(value), type(value).__name__)
