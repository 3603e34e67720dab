"""Transactions and spans: ids, sampling, span limits, `capture_span`, W3C trace context.

The request thread only records names, references and two clock readings per segment;
turning them into intake events happens later, on the transport's worker thread.
Ids are kept as integers and formatted as hex only when encoded or propagated.
"""

from __future__ import annotations

import functools
import inspect
import re
import sys
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, TypeVar, overload

from beatlib import context, randomness
from beatlib.context import get_active, set_active
from beatlib.sanitize import DEFAULT_FIELD_NAMES, Sanitizer
from beatlib.snapshot import CONTEXT_LIMITS, label_value, render

if TYPE_CHECKING:
    from beatlib.config import Config

F = TypeVar("F", bound=Callable[..., Any])

_getrandbits = randomness.getrandbits
_random = randomness.generator
_perf_ns = time.perf_counter_ns
_wall_ns = time.time_ns
_new_object = object.__new__

OUTCOMES = ("success", "failure", "unknown")


class TraceParent:
    """A parsed W3C `traceparent` (and its `tracestate`)."""

    __slots__ = ("trace_id", "span_id", "sampled", "tracestate", "random")

    def __init__(
        self, trace_id: str, span_id: str, sampled: bool, tracestate: str | None = None,
        random: bool = False,
    ) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.sampled = sampled
        self.tracestate = tracestate
        self.random = random  # W3C level 2: the caller says its trace id is random

    def __repr__(self) -> str:
        return "TraceParent(%r)" % format_traceparent(self.trace_id, self.span_id, self.sampled,
                                                      self.random)


_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?\Z")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


def parse_traceparent(header: Any, tracestate: Any = None) -> TraceParent | None:
    """Parse a `traceparent` header; anything invalid gives None (a new trace), never an error."""
    if not isinstance(header, str):
        return None
    match = _TRACEPARENT.match(header.strip())
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    # Version ff is forbidden; version 00 has exactly four fields; later versions may add more.
    if version == "ff" or (version == "00" and rest) or trace_id == _ZERO_TRACE:
        return None
    if span_id == _ZERO_SPAN:
        return None
    bits = int(flags, 16)
    return TraceParent(trace_id, span_id, bool(bits & 1), valid_tracestate(tracestate),
                       bool(bits & 2))



_CONTEXT_HEADERS = ("traceparent", "tracestate", "baggage")


def trace_context_from(headers: Any) -> tuple[TraceParent | None, str | None]:
    """The trace parent and the `baggage` in a message's or request's `headers` (a mapping;
    `traceparent`, `tracestate` and `baggage` looked up in any case, as text or bytes), each
    None when absent or invalid. Never raises."""
    try:
        if not headers or not hasattr(headers, "items"):
            return None, None
        found: dict[str, Any] = {}
        for key, value in headers.items():
            key = key.decode("latin-1") if isinstance(key, bytes) else key
            if isinstance(key, str) and key.lower() in _CONTEXT_HEADERS:
                if isinstance(value, bytes):
                    value = value.decode("latin-1")
                found.setdefault(key.lower(), value)
        return (parse_traceparent(found.get("traceparent"), found.get("tracestate")),
                valid_baggage(found.get("baggage")))
    except Exception:  # an odd mapping: a new trace
        return None, None


def trace_parent_from(headers: Any) -> TraceParent | None:
    """The trace parent in a message's or request's `headers` (see `trace_context_from`)."""
    return trace_context_from(headers)[0]


# W3C baggage: passed on as it came, never read. The limits are the W3C baggage spec's: 180
# list-members (its grammar) and 8192 bytes in all.
MAX_BAGGAGE_MEMBERS = 180
MAX_BAGGAGE_BYTES = 8192
_BAGGAGE_TEXT = re.compile(r"[\x20-\x7e\t]+")  # printable ASCII: values are percent-encoded


def valid_baggage(header: Any) -> str | None:
    """An incoming `baggage` header to send on unchanged, or None. Its members are never
    parsed: a header with a character outside printable ASCII (a line break, non-ASCII text,
    which W3C baggage percent-encodes) is dropped whole; beyond 180 members or 8192 bytes the
    members past the limit are dropped whole (cut at a comma, never inside a member), the
    rest kept byte for byte."""
    if not isinstance(header, str):
        return None
    header = header.strip(" \t")
    if len(header) > MAX_BAGGAGE_BYTES:
        end = header.rfind(",", 0, MAX_BAGGAGE_BYTES + 1)
        header = header[:end].rstrip(" \t,") if end > 0 else ""
    if header.count(",") >= MAX_BAGGAGE_MEMBERS:
        end = -1
        for _ in range(MAX_BAGGAGE_MEMBERS):
            end = header.index(",", end + 1)
        header = header[:end].rstrip(" \t,")
    if not header or not _BAGGAGE_TEXT.fullmatch(header):
        return None
    return header

# A key is up to 256 of a-z 0-9 _ - * / @, beginning with a letter or digit: the grammar of
# trace context level 2, which replaced level 1's tenant@vendor form and its 241/14 split.
_STATE_KEY = re.compile(r"[a-z0-9][_0-9a-z\-*/@]{0,255}")
_STATE_VALUE = re.compile(r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]")
MAX_TRACESTATE_MEMBERS = 32
_TRACESTATE_LENGTH = 512  # what we pass on at most; longest members go first when cutting


def valid_tracestate(header: Any) -> str | None:
    """An incoming `tracestate` as W3C trace context allows it, or None: a header with an
    invalid member or more than 32 members is dropped whole (its vendors' state cannot be
    trusted in part); a key that comes again keeps its first (left-most, most recent) member
    only; one longer than 512 characters loses its members over 128 characters first, then
    members from the end."""
    if not isinstance(header, str):
        return None
    members, keys = [], set()
    for member in header.split(","):
        member = member.strip(" \t")
        if not member:
            continue
        key, eq, value = member.partition("=")
        if not eq or not _STATE_KEY.fullmatch(key) or not _STATE_VALUE.fullmatch(value):
            return None
        if key in keys:
            continue
        keys.add(key)
        members.append(member)
    if not members or len(members) > MAX_TRACESTATE_MEMBERS:
        return None
    if len(",".join(members)) > _TRACESTATE_LENGTH:
        members = [m for m in members if len(m) <= 128]
        while members and len(",".join(members)) > _TRACESTATE_LENGTH:
            members.pop()
    return ",".join(members) or None


def format_traceparent(trace_id: str, span_id: str, sampled: bool, random: bool = False) -> str:
    """A version 00 `traceparent`; `random` carries the caller's level 2 random flag on."""
    return f"00-{trace_id}-{span_id}-{sampled | (random << 1):02x}"


_ES_RATE = re.compile(r"\d{1,3}(?:\.\d{1,16})?")


def es_sample_rate(tracestate: str | None) -> float | None:
    """The sampling rate the trace's root put in the `es` member of `tracestate`
    (`es=s:0.25`, other `key:value` attributes beside it separated by `;`), or None when
    there is none or it is not a rate from 0 to 1. Other vendors' members are not read."""
    if not tracestate or "es=" not in tracestate:
        return None
    for member in tracestate.split(","):
        key, _, value = member.strip(" \t").partition("=")
        if key != "es":
            continue
        for attribute in value.split(";"):
            name, _, text = attribute.partition(":")
            if name == "s":
                rate = float(text) if _ES_RATE.fullmatch(text) else -1.0
                return rate if 0.0 <= rate <= 1.0 else None
        return None
    return None


def es_tracestate(rate: float) -> str:
    """The `tracestate` of a trace we start: our `es` member with the rate its events carry
    (at most 4 decimals, as `transaction_sample_rate` is rounded: `es=s:0.5`, `es=s:1`)."""
    return "es=s:" + (f"{rate:.4f}".rstrip("0").rstrip(".") or "0")


class Segment:
    """What transactions and spans share: labels and context set by the app or integrations."""

    __slots__ = ("labels", "context")
    labels: dict[str, Any] | None
    context: dict[str, Any] | None

    def set_label(self, key: str, value: Any) -> None:
        """A label (indexed key/value); a value that is not a number, bool or None is taken
        as its text now."""
        if self.labels is None:
            self.labels = {}
        self.labels[key] = label_value(value)

    def set_context(self, key: str, value: Any, *, captured: bool = False) -> None:
        """Context data under `key`, copied now (the app may change its objects later).
        Integrations pass data they built (`captured`) or a callable the worker runs."""
        if self.context is None:
            self.context = {}
        self.context[key] = value if captured or callable(value) else render(
            value, *CONTEXT_LIMITS)


class Transaction(Segment):
    """One request or job: the root of a trace in this service."""

    __slots__ = (
        "tracer", "id", "trace_id", "parent_id", "name", "type", "result", "outcome",
        "sampled", "sample_rate", "tracestate", "timestamp", "start", "duration", "ended",
        "spans", "spans_dropped", "leaf", "secrets", "random_trace_id", "errored", "baggage",
    )  # fmt: skip

    def __init__(
        self,
        tracer: Tracer,
        transaction_type: str,
        trace_parent: TraceParent | None,
        baggage: str | None = None,
    ) -> None:
        self.tracer = tracer
        # The caller's W3C `baggage`, sent on as it came with our trace headers; never recorded.
        self.baggage = valid_baggage(baggage) if baggage is not None else None
        self.id = _getrandbits(64) or 1
        self.type = transaction_type
        self.name: str | None = None
        self.result: str | None = None
        self.outcome: str | None = None
        self.errored = False  # an exception was captured with this as its parent
        self.duration: float | None = None
        self.ended = False
        self.spans: list[Span] = []
        self.spans_dropped = 0
        self.labels = None
        self.context = None
        self.leaf = False
        self.secrets: frozenset[str] = frozenset()
        rate = tracer.sample_rate
        if trace_parent is None:
            self.trace_id = "%032x" % (_getrandbits(128) or 1)
            self.parent_id: str | None = None
            self.sampled = rate >= 1.0 or _random.random() < rate
            # The rate goes with the data (and downstream, in `es`) so a server can
            # extrapolate counts; unsampled data counts for nothing.
            self.sample_rate: float | None = rate if self.sampled else 0.0
            self.tracestate: str | None = tracer.root_tracestates[self.sampled]
            # Trace context level 2: our trace ids are 128 random bits (the generator in
            # `randomness`), so the traces we start say so, as OpenTelemetry SDKs' do.
            self.random_trace_id = True
        else:
            self.trace_id = trace_parent.trace_id
            self.parent_id = trace_parent.span_id
            self.sampled = trace_parent.sampled
            self.tracestate = trace_parent.tracestate  # passed on as it came, `es` included
            self.random_trace_id = trace_parent.random
            # The root's rate, if it said; else none is claimed.
            self.sample_rate = es_sample_rate(self.tracestate) if self.sampled else 0.0
        self.timestamp = _wall_ns() // 1000
        self.start = _perf_ns()

    @property
    def transaction(self) -> Transaction:
        return self

    @property
    def parent(self) -> None:
        return None

    def traceparent(self) -> str:
        """The `traceparent` header value naming this transaction as the caller."""
        return format_traceparent(self.trace_id, "%016x" % self.id, self.sampled,
                                  self.random_trace_id)

    def set_route_params(self, params: Mapping[str, Any]) -> None:
        """The request's route variables (`/reset/<token>`): the values of those whose names
        are sensitive are redacted wherever they appear in this transaction and its errors."""
        sensitive = self.tracer.sanitizer.is_sensitive
        found = {str(v) for k, v in params.items() if sensitive(k) and v is not None
                 and len(str(v)) >= 3}
        if found:
            self.secrets = self.secrets | found

    def end(self, name: str | None = None, result: str | None = None) -> None:
        """End the transaction and hand it to the tracer's queue; ending twice does nothing.
        An outcome nobody set (the app, an integration from its protocol) is failure when
        an exception was captured with the transaction as its parent, else success."""
        if self.ended:
            return
        end = _perf_ns()
        if name is not None:
            self.name = name
        if result is not None:
            self.result = result
        if self.outcome is None:
            self.outcome = "failure" if self.errored else "success"
        self.duration = (end - self.start) / 1e6
        for span in self.spans:
            if span.duration is None:
                # Still open: ended here so the trace stays consistent; the label says so.
                span.duration = (end - span.start) / 1e6
                span.outcome = span.outcome or "unknown"
                span.set_label("unfinished", True)
        self.ended = True
        active = get_active()
        if active is not None and active.transaction is self:
            set_active(None)
        self.tracer.queue(self)


class Span(Segment):
    """A timed piece of work inside a transaction: a query, an HTTP call, a template render."""

    __slots__ = (
        "id", "parent", "transaction", "name", "type", "subtype", "action", "start",
        "duration", "outcome", "leaf", "sync", "stacktrace", "errored",
    )  # fmt: skip

    # Built by `start_span`, which sets every slot: no `__init__`, as the class call that
    # runs one costs more than all the stores.
    id: int
    parent: Transaction | Span
    transaction: Transaction
    name: str
    type: str
    subtype: str | None
    action: str | None
    leaf: bool
    sync: bool | None
    duration: float | None
    outcome: str | None
    errored: bool  # an exception was captured with this as its parent
    stacktrace: Any
    start: int

    @property
    def ended(self) -> bool:
        return self.duration is not None

    def traceparent(self) -> str:
        """The `traceparent` header value naming this span as the caller."""
        tx = self.transaction
        return format_traceparent(tx.trace_id, "%016x" % self.id, tx.sampled, tx.random_trace_id)

    def end(self, exc: BaseException | None = None) -> None:
        """End the span; later calls do nothing. An outcome not set before is failure when
        `exc` is given or an exception was captured inside it, else success."""
        if self.duration is not None or self.transaction.ended:
            return
        self.duration = duration = (_perf_ns() - self.start) / 1e6
        if self.outcome is None:
            self.outcome = "failure" if exc is not None or self.errored else "success"
        tracer = self.transaction.tracer
        if 0 <= tracer.stack_trace_min_ms <= duration:
            self.stacktrace = tracer.capture_stack()
        if get_active() is self:
            set_active(self.parent)


def _held_in_callee(record: object) -> int:
    return sys.getrefcount(record)


def _calibrate() -> int:
    probe = object()
    return _held_in_callee(probe)


# The reference count of a record held only by its caller's local variable, as seen in the
# callee: what the interpreter itself adds differs between versions, so it is measured.
_CALLER_ONLY = _calibrate()


def let_go(record: object) -> None:
    """Once the worker encoded `record`: if nothing holds a transaction but the worker (its
    caller) and the transaction's own spans, it drops its span list, so the transaction and
    its spans are freed now by reference counting, not later by the cyclic collector on
    whichever thread allocates next (most often the app's). A transaction anyone else still
    holds (the app, a test reading what was sent) keeps its spans."""
    if type(record) is not Transaction or not record.spans:
        return
    inside = 0
    for span in record.spans:
        inside += (span.transaction is record) + (span.parent is record)
    if sys.getrefcount(record) == _CALLER_ONLY + inside:
        record.spans = []


def start_span(
    name: str,
    span_type: str = "custom",
    subtype: str | None = None,
    action: str | None = None,
    labels: dict[str, Any] | None = None,
    leaf: bool = False,
) -> Span | None:
    """Open a span under the active segment and make it active.

    Returns None, having built nothing, when there is no open sampled transaction, when the
    active span is a leaf (an exit span's own internals are not traced again), or when the
    transaction already has `transaction_max_spans` spans (that one is counted as dropped).
    """
    parent = get_active()
    if parent is None or parent.leaf:
        return None
    # The transaction's own `transaction` is a property: a call, read here for most spans.
    tx: Transaction = parent if type(parent) is Transaction else parent.transaction
    if not tx.sampled or tx.ended:
        return None
    spans = tx.spans
    if len(spans) >= tx.tracer.max_spans:
        tx.spans_dropped += 1
        return None
    span = _new_object(Span)
    span.id = _getrandbits(64) or 1
    span.parent = parent
    span.transaction = tx
    span.name = name
    span.type = span_type
    span.subtype = subtype
    span.action = action
    span.labels = labels
    span.context = None
    span.leaf = leaf
    span.sync = None
    span.duration = None
    span.outcome = None
    span.errored = False
    span.stacktrace = None
    spans.append(span)
    set_active(span)
    span.start = _perf_ns()
    return span


def call_in(span: Span | None, function: Callable[..., Any], args: Any, kwargs: Any) -> Any:
    """`function(*args, **kwargs)` timed by `span`, which ends with what it raises; without a
    span, the plain call."""
    if span is None:
        return function(*args, **kwargs)
    try:
        result = function(*args, **kwargs)
    except BaseException as exc:
        span.end(exc)
        raise
    span.end()
    return result


def outgoing_headers() -> dict[str, str] | None:
    """`traceparent` (and `tracestate`, and the caller's `baggage` as it came) naming the
    active span or transaction, for a call to another service; also for unsampled
    transactions, so the callee follows our decision. None outside a transaction."""
    segment = get_active()
    if segment is None or segment.transaction.ended:
        return None
    tx = segment.transaction
    headers = {"traceparent": segment.traceparent()}
    if tx.tracestate:
        headers["tracestate"] = tx.tracestate
    if tx.baggage:
        headers["baggage"] = tx.baggage
    return headers


class SpanCapture:
    """What `capture_span(...)` returns: a context manager recording a span around a block,
    and a decorator recording one around each call of a function."""

    __slots__ = ("name", "span_type", "span_subtype", "span_action", "labels", "leaf", "span")
    # Set by `capture_span`, the one way to build one.
    name: str | None
    span_type: str
    span_subtype: str | None
    span_action: str | None
    labels: dict[str, Any] | None
    leaf: bool
    span: Span | None

    def __enter__(self) -> Span | None:
        self.span = start_span(
            self.name or "code",
            self.span_type,
            self.span_subtype,
            self.span_action,
            dict(self.labels) if self.labels else None,
            self.leaf,
        )
        return self.span

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        span = self.span
        if span is not None:
            self.span = None
            span.end(exc)

    async def __aenter__(self) -> Span | None:
        return self.__enter__()

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self.__exit__(exc_type, exc, tb)

    def __call__(self, func: F) -> F:
        inner = func.__func__ if isinstance(func, classmethod | staticmethod) else func
        name = self.name or getattr(inner, "__qualname__", None) or repr(inner)
        args = (name, self.span_type, self.span_subtype, self.span_action, self.labels, self.leaf)
        return each_call_in(lambda: capture_span(*args), func)


@overload
def capture_span(name: F) -> F: ...


@overload
def capture_span(
    name: str | None = None,
    span_type: str = "custom",
    span_subtype: str | None = None,
    span_action: str | None = None,
    labels: dict[str, Any] | None = None,
    leaf: bool = False,
) -> SpanCapture: ...


def capture_span(
    name: Any = None,
    span_type: str = "custom",
    span_subtype: str | None = None,
    span_action: str | None = None,
    labels: dict[str, Any] | None = None,
    leaf: bool = False,
) -> Any:
    """Record a span around a block (`with capture_span(...)`) or a function (decorator).

    As a decorator it works on plain and `async def` functions; each call gets its own span,
    named after the function unless a name is given.
    """
    # A function, not a class: calling a class that runs a method of its own (with keyword
    # arguments, as most callers pass them) costs the interpreter more than the span does.
    if type(name) is not str and name is not None and is_bare_decoration(name, (), {}) \
            and (span_type, span_subtype, span_action, labels, leaf) == _NO_OPTIONS:
        return capture_span()(name)  # @capture_span, without parentheses
    capture = _new_object(SpanCapture)
    capture.name = name
    capture.span_type = span_type
    capture.span_subtype = span_subtype
    capture.span_action = span_action
    capture.labels = labels
    capture.leaf = leaf
    capture.span = None
    return capture


_NO_OPTIONS = ("custom", None, None, None, False)  # capture_span's defaults after the name


def is_bare_decoration(first: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether a decorator class was applied without parentheses (`@capture_span`): its one
    argument is then the function, not a name."""
    return not args and not kwargs and (
        isinstance(first, classmethod | staticmethod)
        or (callable(first) and not isinstance(first, str | bytes)))


def each_call_in(make: Callable[[], AbstractContextManager[Any]], func: F) -> F:
    """`func` (plain or `async def`, a method, a classmethod or staticmethod) with every call
    run inside a fresh `make()` context: what makes `capture_span` and
    `beatlib.transaction` decorators."""
    if isinstance(func, classmethod | staticmethod):
        return type(func)(each_call_in(make, func.__func__))  # type: ignore[return-value]
    if inspect.iscoroutinefunction(func):

        @functools.wraps(func)
        async def run_async(*a: Any, **kw: Any) -> Any:
            with make():
                return await func(*a, **kw)

        return run_async  # type: ignore[return-value]

    @functools.wraps(func)
    def run(*a: Any, **kw: Any) -> Any:
        with make():
            return func(*a, **kw)

    return run  # type: ignore[return-value]


class Tracer:
    """Begins and ends transactions for one client, with that client's settings and
    redaction policy (`sanitizer`: instrumentation finds it here, never through a client)."""

    def __init__(
        self,
        config: Config,
        queue: Callable[[Transaction], None],
        capture_stack: Callable[[], Any],
        sanitizer: Sanitizer | None = None,
    ) -> None:
        self.config = config
        self.sanitizer = sanitizer or Sanitizer(DEFAULT_FIELD_NAMES)
        self.queue = queue
        self.capture_stack = capture_stack
        self.sample_rate = config.transaction_sample_rate
        # The `tracestate` of the traces this tracer starts, unsampled and sampled.
        self.root_tracestates = (es_tracestate(0.0), es_tracestate(self.sample_rate))
        self.max_spans = config.transaction_max_spans
        threshold = config.span_stack_trace_min_duration
        self.stack_trace_min_ms = threshold * 1000.0 if threshold >= 0 else -1.0

    def begin_transaction(
        self, transaction_type: str, trace_parent: TraceParent | str | None = None,
        baggage: str | None = None,
    ) -> Transaction:
        if trace_parent is not None and not isinstance(trace_parent, TraceParent):
            trace_parent = parse_traceparent(trace_parent)
        tx = Transaction(self, transaction_type, trace_parent, baggage)
        set_active(tx)
        return tx

    def end_transaction(
        self, name: str | None = None, result: str | None = None
    ) -> Transaction | None:
        tx = context.current_transaction()
        if tx is None or tx.tracer is not self:
            return None
        tx.end(name, result)
        return tx
