"""The per-client event pipeline: a queued record in, NDJSON lines out (worker thread).

    record ──encoder (protocol/)──► event dict ──processors──► line
    processors: sanitize (keys and values) → truncate → before_send (the user's hook)

Every event kind passes it: transaction, span, error, metricset and metadata. Each
processor takes and returns the event; the hook may return None to drop it, and a hook that
raises drops that event.
"""

from __future__ import annotations

import io
import logging
import pickle
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from beatlib import release
from beatlib.protocol import intake_v2, otlp
from beatlib.sanitize import IDS, OWN_FIELDS, Sanitizer, truncate
from beatlib.tracing import Span, Transaction

logger = logging.getLogger("beatlib")

Event = dict[str, Any]
BeforeSend = Callable[[str, Event], Event | None]
KEYWORD_LENGTH = 1024  # the schemas' maxLength for keyword fields
HELD_EXCEPTIONS = 1024  # OTLP: transactions whose errors wait for them, at most
WRITTEN_BYTES = 4 * 1024 * 1024  # processed contexts kept by content (see `Written`)
WRITTEN_ENTRY = 64 * 1024  # a longer one is written each time


class _BuiltinsPickler(pickle.Pickler):
    """Pickles builtin scalars and containers of their exact types; anything else raises."""

    def reducer_override(self, obj: Any) -> Any:
        raise TypeError(type(obj).__name__)


_picklers = threading.local()


def content_key(value: Any) -> bytes | None:
    """The exact content of `value` as bytes (equal bytes: equal values of equal types, keys
    and items in the same order), or None when it holds anything but builtin scalars and
    containers of their exact types (a subclass or an object may be written otherwise than
    its content says), a cycle or a nesting too deep."""
    try:
        pickler, buffer = _picklers.pickler
    except AttributeError:
        buffer = io.BytesIO()
        pickler = _BuiltinsPickler(buffer, 5)
        pickler.fast = True  # no memo: shared and distinct equal objects give equal bytes
        _picklers.pickler = pickler, buffer
    try:
        pickler.dump(value)
        return buffer.getvalue()
    except Exception:  # not builtins only, or a cycle: no key, written each time
        del _picklers.pickler  # a fresh pickler next time, whatever state this one was left in
        return None
    finally:
        buffer.seek(0)
        buffer.truncate()


def _member_json(processed: Event) -> str:
    """'"request":{...}': one member as the JSON of the whole context holds it."""
    return intake_v2.dumps(processed)[1:-1]


def _same(processed: Event) -> Event:
    return processed


class Written:
    """Processed contexts (as JSON text, or as dicts for the OTLP encoder, which only reads
    them) by the content they were built from (`content_key`, with the kind of context): the
    same query's span, the same request's headers repeat, and their redaction, cuts and JSON
    are a function of that content and the client's rules. Bounded: emptied when full."""

    def __init__(self, budget: int = WRITTEN_BYTES) -> None:
        self.budget = budget
        self.texts: dict[bytes, Any] = {}
        self.size = 0
        # By kind (a span's type and subtype, a member's name): [calls, keyed, found]. A kind
        # whose contents seldom come again (URLs with ids in them) is keyed once in 16 calls.
        self.seen: dict[Any, list[int]] = {}

    def find(self, kind: Any, content: Any) -> tuple[bytes | None, Any]:
        """The key of `content` (None: not to be kept) and what is kept for it (or None)."""
        seen = self.seen.get(kind)
        if seen is None:
            if len(self.seen) >= 1024:
                self.seen.clear()
            seen = self.seen[kind] = [0, 0, 0]
        seen[0] += 1
        if seen[1] >= 64 and seen[2] * 8 < seen[1] and seen[0] % 16:
            return None, None
        key = content_key((kind, content))
        if key is None:
            return None, None
        seen[1] += 1
        found = self.texts.get(key)
        if found is not None:
            seen[2] += 1
        if seen[1] >= 1024:  # the recent past counts
            seen[1] //= 2
            seen[2] //= 2
        return key, found

    def get(self, key: bytes | None) -> Any:
        return None if key is None else self.texts.get(key)

    def put(self, key: bytes | None, text: Any) -> None:
        if key is None:
            return
        # a processed dict: its own dicts, its texts mostly shared with the text cache
        size = len(key) + (len(text) if type(text) is str else 2 * len(key)) + 100
        if size > WRITTEN_ENTRY:
            return
        if self.size + size > self.budget:
            self.texts.clear()
            self.size = 0
        self.texts[key] = text
        self.size += size


class Sanitize:
    """Redacts secrets: by key name in free-form data (headers, cookies, bodies, locals,
    labels, custom context, environment), by value in every text (see `sanitize.py`)."""

    def __init__(self, sanitizer: Sanitizer) -> None:
        self.sanitizer = sanitizer

    def __call__(self, kind: str, event: Event, secrets: frozenset[str] = frozenset()) -> Event:
        return self.sanitizer.clean(event, values=secrets)  # type: ignore[no-any-return]

    def field(self, key: str, value: Any, secrets: frozenset[str] = frozenset()) -> Any:
        """One top-level field of an event, as `__call__` would leave it."""
        if key in IDS:
            return value
        if type(value) is str and key not in OWN_FIELDS:
            return self.sanitizer.text(value, secrets)
        return self.sanitizer.clean({key: value}, values=secrets)[key]


class Truncate:
    """Cuts texts to the configured lengths (after redaction, so no secret is cut in half
    and missed): keyword fields, messages, SQL statements, bodies, locals."""

    def __init__(self, config: Any) -> None:
        keyword = min(config.max_string_length, KEYWORD_LENGTH)
        message = config.max_message_length
        self.keyword = keyword
        self.limits = {
            "message": message, "body": message, "custom": message,
            "statement": 10000, "vars": config.local_var_max_length,
        }  # fmt: skip
        self.shortest = min(keyword, *self.limits.values())

    def __call__(self, kind: str, event: Event, secrets: frozenset[str] = frozenset()) -> Event:
        self._cut(event, self.keyword)
        return event

    def field(self, key: str, value: Any, secrets: frozenset[str] = frozenset()) -> Any:
        """One top-level field of an event, as `__call__` would leave it."""
        limit = self.limits.get(key, self.keyword)
        if type(value) is str:
            return truncate(value, limit) if len(value) > limit or not value.isascii() else value
        self._cut(value, limit)
        return value

    def _cut(self, value: Any, limit: int) -> None:
        """Cuts `value`'s texts in place (the event is the processors' own copy). Keys are
        not cut here: capture bounds the keys of app data."""
        limits, shortest = self.limits, self.shortest
        if type(value) is dict:
            for key, item in value.items():
                t = type(item)
                if t is str:
                    if len(item) > shortest or not item.isascii():
                        lim = limits.get(key, limit)
                        if len(item) > lim or not item.isascii():
                            value[key] = truncate(item, lim)
                elif t is dict or t is list:
                    self._cut(item, limits.get(key, limit))
        elif type(value) is list:
            for i, item in enumerate(value):
                t = type(item)
                if t is str:
                    if len(item) > limit or not item.isascii():
                        value[i] = truncate(item, limit)
                elif t is dict or t is list:
                    self._cut(item, limit)


class Pipeline:
    """One client's record-to-lines path: `encode(record)` gives NDJSON lines for the
    transport, `metadata_line()` the first line of each request; `events(record)` the
    processed event dicts (what `encode` writes). With exporter="otlp", `encode` gives
    (signal, JSON records) pairs instead and `metadata_line()` the resource (see
    `encode_otlp`): the same processed events, another wire format."""

    def __init__(self, config: Any, sanitizer: Sanitizer,
                 metadata: Callable[[], Event]) -> None:
        self.config = config
        self.processors: list[Any] = [Sanitize(sanitizer), Truncate(config)]
        self.before_send: BeforeSend | None = config.before_send
        self._metadata = metadata
        self.counts = {"dropped_by_hook": 0, "hook_errors": 0}  # written by the worker only
        self._span_names: dict[tuple[Any, ...], str] = {}  # see intake_v2.span_lines
        self._tx_names: dict[tuple[Any, ...], tuple[str, str]] = {}  # and transaction_line
        self._written = Written()  # as JSON text (intake)
        self._processed = Written()  # as dicts (OTLP)
        self._otlp_names: dict[tuple[Any, ...], tuple[Any, ...]] = {}  # the same, for OTLP
        self._hook_failed_before = False
        self.otlp = getattr(config, "exporter", None) == "otlp"
        # OTLP: an error's `exception` span event waits here for its transaction (queued
        # after it, when it ends), by transaction id; bounded, the oldest go first.
        self._held: OrderedDict[str, list[tuple[Any, Event]]] = OrderedDict()
        now_us = int(time.time() * 1_000_000)
        self._started_us = now_us  # cumulative counters count from here
        self._metrics_window = (now_us, now_us)  # (start, end) of the latest metricsets

    def events(self, record: Any) -> list[tuple[str, Event]]:
        secrets = getattr(record, "secrets", None) or frozenset()
        out = []
        for kind, event in intake_v2.events(record, self.config):
            if kind == "error" and self.config.assign_errors:
                release.assign(event, record)  # blame, before redaction like all data
            processed = self.process(kind, event, secrets)
            if processed is not None:
                out.append((kind, processed))
        return out

    def encode(self, record: Any) -> list[Any]:
        """NDJSON lines of `record`: `events()` written out. A transaction and its spans,
        the bulk of all events, are written directly with each field processed, and each
        context processed once for each content it comes with (unless a before_send hook
        wants them as dicts: it may change what it is given)."""
        if self.otlp:
            return self.encode_otlp(record)
        if type(record) is not Transaction or self.before_send is not None:
            return [intake_v2.line(kind, event) for kind, event in self.events(record)]
        secrets = record.secrets
        if secrets:
            def field(key: str, value: Any) -> Any:
                return self.field(key, value, secrets)
            tx_names, span_names = None, None
        else:
            field, tx_names, span_names = self.field, self._tx_names, self._span_names
        lines = [intake_v2.transaction_line(record, field, self._transaction_context,
                                            tx_names)]
        if record.spans:
            lines += intake_v2.span_lines(record, self.config, field, span_names,
                                          self._span_context)
        return lines

    def _transaction_context(self, tx: Transaction) -> str | None:
        """The processed `context` of `tx` as JSON text (None: it has none)."""
        raw, members = self._context_members(tx, self._written, _member_json)
        if members is None:
            ctx = intake_v2.context(raw, tx.labels, built=True)
            return None if ctx is None else intake_v2.dumps(
                self.field("context", ctx, tx.secrets))
        members = [member for member in members if member]
        return "{%s}" % ",".join(members) if members else None

    def _transaction_context_dict(self, tx: Transaction) -> Event | None:
        """The processed `context` of `tx` (None: it has none); its members may be shared
        with other transactions' (the OTLP encoder only reads them)."""
        raw, members = self._context_members(tx, self._processed, _same)
        if members is None:
            ctx = intake_v2.context(raw, tx.labels, built=True)
            return None if ctx is None else self.field(  # type: ignore[no-any-return]
                "context", ctx, tx.secrets)
        out: Event = {}
        for member in members:
            out.update(member)
        return out or None

    def _context_members(self, tx: Transaction, kept: Written, form: Callable[[Event], Any]
                         ) -> tuple[dict[str, Any], list[Any] | None]:
        """`tx`'s context with its deferred parts built, and `form(processed)` of each of its
        members (request, response, user, custom, ...) processed alone, each kept by
        content in `kept`; no members (None) when they depend on each other (labels merge
        into tags, route values are redacted in all)."""
        raw = intake_v2.built_context(tx.context)
        if tx.secrets or tx.labels or "tags" in raw:
            return raw, None
        members = []
        for member in raw.items():
            name = member[0] if type(member[0]) is str else None
            key, formed = kept.find(("transaction", name), member)
            if formed is None:
                ctx = intake_v2.context(dict((member,)), None, built=True)
                formed = form({} if ctx is None else self.field("context", ctx))
                kept.put(key, formed)
            members.append(formed)
        return raw, members

    def _span_context(self, sp: Span) -> str:
        """The processed `context` of `sp` as JSON text."""
        return self._processed_span_context(sp, self._written,  # type: ignore[no-any-return]
                                            intake_v2.dumps)

    def _span_context_dict(self, sp: Span) -> Event:
        """The processed `context` of `sp`, maybe shared with other spans' (see
        `_transaction_context_dict`)."""
        return self._processed_span_context(sp, self._processed,  # type: ignore[no-any-return]
                                            _same)

    def _processed_span_context(self, sp: Span, kept: Written, form: Callable[[Event], Any]
                                ) -> Any:
        """`form(processed context of sp)`, kept by content in `kept` (unless the
        transaction has route values to redact)."""
        secrets = sp.transaction.secrets
        raw = intake_v2.built_context(sp.context)
        kind = ("span", sp.type, sp.subtype) if type(sp.type) is str and (
            sp.subtype is None or type(sp.subtype) is str) else ("span",)
        key, formed = (None, None) if secrets else kept.find(kind, (
            raw, sp.labels, sp.leaf, sp.type, sp.subtype))
        if formed is None:
            ctx = intake_v2.exit_fields(sp, intake_v2.context(raw, sp.labels, built=True))
            formed = form(self.field("context", ctx or {}, secrets))
            kept.put(key, formed)
        return formed

    def encode_otlp(self, record: Any) -> list[tuple[int, bytes]]:
        """`record` as OTLP JSON records, each part `(signal, records joined by commas)`:
        a transaction and its spans as spans (with the exception events of its errors), an
        error as a log record, a metricset as metrics. Unsampled transactions are not
        exported as spans (OpenTelemetry exports only sampled ones); they still count in
        the latency histograms."""
        if type(record) is Transaction:
            held = self._held.pop("%016x" % record.id, [])
            if not record.sampled:
                return []
            events = self._transaction_events(record)
            ids = {ev.get("id") for _, ev in events}
            by_parent: dict[Any, list[Event]] = {}
            for parent, exc_event in held:
                by_parent.setdefault(parent if parent in ids else "%016x" % record.id,
                                     []).append(exc_event)
            spans = [otlp.transaction_span(ev, by_parent.get(ev.get("id"), ()))
                     if kind == "transaction" else
                     otlp.span(ev, by_parent.get(ev.get("id"), ()))
                     for kind, ev in events]
            return [(otlp.TRACES, b",".join(otlp.dumps(s) for s in spans))] if spans else []
        events = self.events(record)
        out = []
        for kind, event in events:
            if kind == "error":
                exception = otlp.exception_event(event)
                tx_id = event.get("transaction_id")
                if exception is not None and tx_id:
                    self._hold(tx_id, event.get("parent_id"), exception)
                out.append((otlp.LOGS, otlp.dumps(otlp.log_record(event))))
            elif kind == "metricset":
                ts = int(event.get("timestamp") or 0)
                start, end = self._metrics_window
                if ts != end:
                    self._metrics_window = (start, end) = (end, ts)
                metrics = otlp.metrics(event, start, self._started_us)
                if metrics:
                    out.append((otlp.METRICS, b",".join(otlp.dumps(m) for m in metrics)))
        return out

    def _transaction_events(self, tx: Transaction) -> list[tuple[str, Event]]:
        """`events(tx)`, with its spans processed field by field as `intake_v2.span_lines`
        does (the same result: a test holds the two ways equal), unless a before_send hook
        wants each span as a whole."""
        if self.before_send is not None:
            return self.events(tx)
        secrets = tx.secrets
        event = self.process("transaction", intake_v2.transaction(tx, with_context=False),
                             secrets)
        if tx.sampled and (tx.context or tx.labels):
            ctx = self._transaction_context_dict(tx)
            if ctx is not None:
                event["context"] = ctx  # type: ignore[index]  # (no hook: not None)
        out = [] if event is None else [("transaction", event)]
        names = self._otlp_names if not secrets else None
        field = self.field
        for sp in tx.spans:
            ev = intake_v2.span(tx, sp, self.config, self._span_context_dict)
            key = (sp.name, sp.type, sp.subtype, sp.action)
            cached = names is not None and type(sp.name) is str and type(sp.type) is str
            written = names.get(key) if cached else None  # type: ignore[union-attr]
            if written is None:
                written = tuple(field(k, ev[k], secrets) if k in ev else None
                                for k in ("name", "type", "subtype", "action"))
                if cached:
                    if len(names) >= 4096:  # type: ignore[arg-type]  # kinds of spans are few
                        names.clear()  # type: ignore[union-attr]
                    names[key] = written  # type: ignore[index]
            for k, v in zip(("name", "type", "subtype", "action"), written, strict=True):
                if v is not None:
                    ev[k] = v
            if "stacktrace" in ev:
                ev["stacktrace"] = field("stacktrace", ev["stacktrace"], secrets)
            out.append(("span", ev))
        return out

    def _hold(self, tx_id: str, parent: Any, exc_event: Event) -> None:
        held = self._held.get(tx_id)
        if held is None:
            held = self._held[tx_id] = []
            while len(self._held) > HELD_EXCEPTIONS:
                self._held.popitem(last=False)
        if len(held) < 100:  # the exceptions of one transaction kept on it, at most
            held.append((parent, exc_event))

    def metadata_resource(self) -> bytes:
        """OTLP: the Resource of each request, from the metadata event as processed."""
        event = self._metadata()
        processed = self.process("metadata", event)
        if processed is None:
            processed = self.process("metadata", self._metadata(), hook=False)
        return otlp.dumps(otlp.resource(processed))  # type: ignore[arg-type]

    def field(self, key: str, value: Any, secrets: frozenset[str] = frozenset()) -> Any:
        """One top-level field of a span, through every processor but the hook."""
        for processor in self.processors:
            value = processor.field(key, value, secrets)
        return value

    def metadata_line(self) -> bytes:
        """Built for every request, so it shows the client as it is now."""
        if self.otlp:
            return self.metadata_resource()
        event = self._metadata()
        processed = self.process("metadata", event)
        if processed is None:  # a request needs one: ours, processed, without the hook
            processed = self.process("metadata", self._metadata(), hook=False)
        return intake_v2.line("metadata", processed)  # type: ignore[arg-type]

    def process(self, kind: str, event: Event, secrets: frozenset[str] = frozenset(),
                hook: bool = True) -> Event | None:
        for processor in self.processors:
            event = processor(kind, event, secrets)
        if hook and self.before_send is not None:
            return self._hook(kind, event)
        return event

    def _hook(self, kind: str, event: Event) -> Event | None:
        try:
            result = self.before_send(kind, event)  # type: ignore[misc]
        except Exception:
            self._hook_failed(kind, "raised", exc_info=True)
            return None
        if result is None:
            self.counts["dropped_by_hook"] += 1
            return None
        if not isinstance(result, dict):
            self._hook_failed(kind, f"returned {type(result).__name__}, not a dict or None")
            return None
        return result

    def _hook_failed(self, kind: str, what: str, exc_info: bool = False) -> None:
        """The app's hook failed: that event is dropped, never sent unprocessed."""
        self.counts["hook_errors"] += 1
        if not self._hook_failed_before:
            self._hook_failed_before = True
            logger.error("beatlib: before_send %s on a %s event; dropped it (logged once, "
                         "later failures are counted as hook_errors)", what, kind,
                         exc_info=exc_info)
