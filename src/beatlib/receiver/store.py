"""SQLite storage: the schema, the bounded queue intake feeds, and the writer thread.

Intake only ever calls `Store.offer`, which takes a batch if the queue has room and says no
otherwise; it never waits for the database. One writer thread stores queued batches in a
transaction each (WAL, so the dashboard's readers never wait for it), retrying while the
database is locked or slow; meanwhile the queue fills and intake answers 503.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from beatlib.receiver.group_state import GroupChange, add_group_state_columns, on_occurrence
from beatlib.receiver.grouping import culprit, grouping_key

logger = logging.getLogger("beatlib.receiver")

SCHEMA = """
CREATE TABLE IF NOT EXISTS services (
    name TEXT PRIMARY KEY,
    environment TEXT,
    version TEXT,               -- the latest seen
    agent TEXT,                 -- "beatlib 0.1.0"
    language TEXT,
    framework TEXT,
    hostname TEXT,
    first_seen INTEGER NOT NULL,  -- µs since epoch, when received
    last_seen INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS releases (
    service TEXT NOT NULL,
    version TEXT NOT NULL,      -- service.version in metadata, or a recorded release
    first_seen INTEGER NOT NULL,
    last_seen INTEGER NOT NULL,
    -- set by `beatlib release` (POST /beatlib/v1/releases); NULL for versions only seen
    deployed_at TEXT,           -- ISO 8601
    environment TEXT,
    branch TEXT,
    commit_sha TEXT,
    previous TEXT,
    commits TEXT,               -- JSON [{commit, author, subject}]
    PRIMARY KEY (service, version)
);
CREATE TABLE IF NOT EXISTS transactions (
    id TEXT NOT NULL,
    trace_id TEXT NOT NULL,
    parent_id TEXT,
    service TEXT NOT NULL,
    service_version TEXT,
    environment TEXT,
    name TEXT NOT NULL,         -- "" when the agent sent none
    type TEXT NOT NULL,
    result TEXT,
    outcome TEXT,
    timestamp INTEGER NOT NULL, -- µs since epoch
    duration REAL NOT NULL,     -- ms
    sampled INTEGER,
    spans_started INTEGER,
    spans_dropped INTEGER,
    context TEXT                -- JSON
);
CREATE UNIQUE INDEX IF NOT EXISTS transactions_id ON transactions (id);
CREATE INDEX IF NOT EXISTS transactions_stats
    ON transactions (service, timestamp, name, type, duration, outcome, result);
CREATE INDEX IF NOT EXISTS transactions_by_name
    ON transactions (service, name, timestamp);
CREATE INDEX IF NOT EXISTS transactions_release ON transactions (service, service_version);
CREATE TABLE IF NOT EXISTS spans (
    id TEXT NOT NULL,
    transaction_id TEXT,
    trace_id TEXT NOT NULL,
    parent_id TEXT NOT NULL,
    service TEXT NOT NULL,
    name TEXT NOT NULL,
    type TEXT NOT NULL,
    subtype TEXT,
    action TEXT,
    timestamp INTEGER,          -- µs since epoch; or:
    start REAL,                 -- ms after the transaction's start
    duration REAL NOT NULL,
    outcome TEXT,
    sync INTEGER,
    context TEXT,               -- JSON
    stacktrace TEXT             -- JSON
);
CREATE UNIQUE INDEX IF NOT EXISTS spans_id ON spans (id, trace_id);
CREATE INDEX IF NOT EXISTS spans_transaction ON spans (transaction_id);
CREATE INDEX IF NOT EXISTS spans_trace ON spans (trace_id);
CREATE TABLE IF NOT EXISTS errors (
    id TEXT NOT NULL,
    service TEXT NOT NULL,
    service_version TEXT,
    environment TEXT,
    grouping_key TEXT NOT NULL,
    timestamp INTEGER NOT NULL,
    trace_id TEXT,
    transaction_id TEXT,
    parent_id TEXT,
    transaction_name TEXT,
    culprit TEXT,
    type TEXT,                  -- exception type, or NULL for a logged message
    message TEXT,
    handled INTEGER,
    level TEXT,
    assignee_key TEXT,          -- lower-cased email, else name
    body TEXT NOT NULL          -- the whole event, JSON
);
CREATE UNIQUE INDEX IF NOT EXISTS errors_id ON errors (id);
CREATE INDEX IF NOT EXISTS errors_group ON errors (service, grouping_key, timestamp);
CREATE INDEX IF NOT EXISTS errors_transaction ON errors (transaction_id);
CREATE INDEX IF NOT EXISTS errors_release ON errors (service, service_version);
CREATE TABLE IF NOT EXISTS error_groups (
    service TEXT NOT NULL,
    grouping_key TEXT NOT NULL,
    type TEXT,
    message TEXT,               -- of the latest occurrence
    culprit TEXT,
    count INTEGER NOT NULL,
    first_seen INTEGER NOT NULL,
    last_seen INTEGER NOT NULL,
    first_version TEXT,         -- the service version that first sent it
    latest_error_id TEXT NOT NULL,
    assignee_key TEXT,          -- of the latest occurrence that named one
    assignee_name TEXT,
    assignee_email TEXT,
    assignee_commit TEXT,
    assignee_date TEXT,
    PRIMARY KEY (service, grouping_key)
);
CREATE INDEX IF NOT EXISTS error_groups_assignee ON error_groups (assignee_key);
CREATE INDEX IF NOT EXISTS error_groups_release ON error_groups (service, first_version);
CREATE TABLE IF NOT EXISTS metricsets (
    service TEXT NOT NULL,
    timestamp INTEGER NOT NULL,
    transaction_name TEXT,
    transaction_type TEXT,
    span_type TEXT,
    span_subtype TEXT,
    tags TEXT,                  -- JSON
    samples TEXT NOT NULL,      -- JSON
    key TEXT                    -- of the whole metricset: one sent again is stored once
);
CREATE INDEX IF NOT EXISTS metricsets_service ON metricsets (service, timestamp);
CREATE UNIQUE INDEX IF NOT EXISTS metricsets_key ON metricsets (key);
"""

_KEYWORD = 1024  # indexed text is cut here; the JSON columns keep the rest
Batch = tuple[dict[str, Any], list[tuple[str, dict[str, Any]]], int]  # metadata, events, µs


def connect(path: str, timeout: float = 1.0) -> sqlite3.Connection:
    """A connection with the settings every user of the database wants."""
    conn = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    return conn


SCHEMA_VERSION = 2  # PRAGMA user_version
# What brings a database of the version before to this version; SCHEMA is always the latest.
MIGRATIONS = {
    2: ("ALTER TABLE metricsets ADD COLUMN key TEXT",),  # metricsets de-duplicated
}


def create_schema(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")  # WAL: durable enough for a local dashboard
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise sqlite3.DatabaseError(f"database schema {version} is newer than this receiver's "
                                    f"({SCHEMA_VERSION}); use a newer beatlib or another --db")
    for target in range(version + 1, SCHEMA_VERSION + 1) if version else ():
        with conn:  # each step whole or not at all
            for statement in MIGRATIONS[target]:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version={target}")
        logger.info("receiver: database migrated to schema %d", target)
    conn.executescript(SCHEMA)
    add_group_state_columns(conn)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")


class BatchQueue:
    """Batches waiting for the writer, bounded by the events they hold (queued or being
    written). A batch bigger than the bound still goes in when nothing else is waiting."""

    def __init__(self, max_events: int) -> None:
        self.max_events = max_events
        self._batches: collections.deque[Batch] = collections.deque()
        self._pending = 0
        self._cond = threading.Condition()

    @property
    def pending(self) -> int:
        return self._pending

    def offer(self, batch: Batch) -> bool:
        n = len(batch[1])
        with self._cond:
            if self._pending and self._pending + n > self.max_events:
                return False
            self._batches.append(batch)
            self._pending += n
            self._cond.notify_all()
            return True

    def take(self, max_events: int, timeout: float) -> list[Batch]:
        """Whole batches, at least one if any arrives within `timeout`."""
        with self._cond:
            self._cond.wait_for(lambda: self._batches, timeout)
            taken: list[Batch] = []
            count = 0
            while self._batches and (not taken or count + len(self._batches[0][1]) <= max_events):
                batch = self._batches.popleft()
                taken.append(batch)
                count += len(batch[1])
            return taken

    def done(self, batches: list[Batch]) -> None:
        with self._cond:
            self._pending -= sum(len(b[1]) for b in batches)
            self._cond.notify_all()

    def wait_idle(self, timeout: float | None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._pending == 0, timeout)


class Store:
    """The database at `path`, its queue and its writer thread."""

    def __init__(
        self, path: str, max_queue_events: int = 20_000, batch_events: int = 5_000,
        on_group_change: Callable[[list[GroupChange]], None] | None = None,
    ) -> None:
        self.path = path
        self.on_group_change = on_group_change  # called after a commit; must not block
        self.queue = BatchQueue(max_queue_events)
        self.batch_events = batch_events
        # stored, skipped, refused, write_retries, writer_errors
        self.counts = collections.Counter[str]()
        self.last_error: str | None = None  # the writer's latest failure, for the health
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._last_log = 0.0

    # --- called by intake (any thread) ---------------------------------------------------

    def offer(self, metadata: dict[str, Any], events: list[tuple[str, dict[str, Any]]]) -> bool:
        """Queues one request's events; False (nothing queued) when the queue is full."""
        if self._stopping.is_set() or not self.queue.offer((metadata, events, _now_us())):
            self.counts["refused"] += len(events)
            return False
        return True

    # --- reading (any thread) -----------------------------------------------------------

    @contextmanager
    def reader(self) -> Iterator[sqlite3.Connection]:
        """A read-only connection for one dashboard request."""
        conn = connect(self.path, timeout=2.0)
        try:
            conn.execute("PRAGMA query_only=1")
            yield conn
        finally:
            conn.close()

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Creates the schema (or leaves that to the writer if the database is busy now)
        and starts the writer."""
        try:
            conn = connect(self.path)
            try:
                create_schema(conn)
            finally:
                conn.close()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise  # cannot open or create it: say so now, not in a retry loop
            logger.warning("database %s not ready yet (%s); the writer will retry", self.path, exc)
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="beatlib-receiver-writer",
                                        daemon=True)
        self._thread.start()

    def health(self) -> dict[str, Any]:
        """The writer's state: whether it runs, what it stored, skipped and retried, and its
        latest failure."""
        thread = self._thread
        return {"writer_running": thread is not None and thread.is_alive(),
                "queued": self.queue.pending, "last_error": self.last_error,
                **{key: self.counts[key] for key in ("stored", "skipped", "refused",
                                                    "write_retries", "writer_errors")}}

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Waits until everything queued so far is stored."""
        return self.queue.wait_idle(timeout)

    def stop(self, timeout: float = 5.0) -> bool:
        """Refuses new batches, stores what is queued (for up to `timeout` s), stops."""
        drained = self.queue.wait_idle(timeout)
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=max(timeout, 1.0))
            self._thread = None
        if not drained:
            logger.warning("receiver stopped with %d events not stored", self.queue.pending)
        return drained

    # --- the writer thread ----------------------------------------------------------------

    def _run(self) -> None:
        conn: sqlite3.Connection | None = None
        opened: tuple[int, int] | None = None  # (device, inode) of the file conn writes to
        delay = 0.05
        failures = 0  # of the batch at hand, other than busy or locked
        while not self._stopping.is_set():
            batches = self.queue.take(self.batch_events, timeout=0.2)
            while batches and not self._stopping.is_set():
                try:
                    if conn is not None and _identity(self.path) != opened:
                        # Deleted or replaced under us: SQLite would go on writing to a file
                        # nobody can open. Open the path again (creating it, and the schema).
                        logger.warning("receiver: database %s was removed or replaced; "
                                       "opening it again", self.path)
                        conn.close()
                        conn = None
                    if conn is None:
                        conn = connect(self.path, timeout=0.5)
                        create_schema(conn)
                        opened = _identity(self.path)
                    self._write(conn, batches)
                    self.queue.done(batches)
                    batches = []
                    delay, failures = 0.05, 0
                except sqlite3.Error as exc:
                    self.counts["write_retries"] += 1
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    if _busy(exc):
                        # Another writer or reader holds it: keep the batch, wait, try again;
                        # intake goes on answering until the queue is full.
                        self._log_once(f"database {self.path} busy ({exc}); retrying")
                    else:
                        # Broken (a schema that does not fit, I/O, a read-only file): say so,
                        # open it again (the schema is checked and migrated then); a batch
                        # that still fails after a few tries is skipped, so the next can go.
                        failures += 1
                        logger.error("receiver: cannot write to %s (%s); attempt %d",
                                     self.path, exc, failures)
                        if conn is not None:
                            conn.close()
                            conn = None
                        if failures >= _BROKEN_TRIES:
                            self.counts["writer_errors"] += 1
                            self.counts["skipped"] += sum(len(b[1]) for b in batches)
                            self.queue.done(batches)
                            batches, failures = [], 0
                    self._stopping.wait(delay)
                    delay = min(delay * 2, 1.0)
                except Exception as exc:  # no event may stop the writer: that batch is skipped
                    self.counts["writer_errors"] += 1
                    self.counts["skipped"] += sum(len(b[1]) for b in batches)
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    logger.exception("receiver: could not store a batch of %d events; "
                                     "skipped it", sum(len(b[1]) for b in batches))
                    self.queue.done(batches)
                    batches = []
            if batches:  # stopping while the database would not take them
                self.queue.done(batches)
        if conn is not None:
            conn.close()

    def _log_once(self, message: str) -> None:
        """Log a warning at most every 30 s (a locked database retries many times)."""
        now = time.monotonic()
        if now - self._last_log > 30:
            self._last_log = now
            logger.warning(message)

    def _write(self, conn: sqlite3.Connection, batches: list[Batch]) -> None:
        """One transaction for all `batches`. An event that cannot be stored is skipped and
        counted; sqlite3.OperationalError (locked, busy, I/O) aborts it all for a retry."""
        skipped = 0
        changes: list[GroupChange] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for metadata, events, received in batches:
                meta = _service_of(metadata)
                conn.execute(_UPSERT_SERVICE, _service_row(metadata, meta, received))
                if meta["version"]:
                    conn.execute(_UPSERT_RELEASE, (meta["name"], meta["version"], received))
                for kind, event in events:
                    if not _store_event(conn, kind, event, meta, received, changes):
                        skipped += 1
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self.counts["stored"] += sum(len(b[1]) for b in batches) - skipped
        self.counts["skipped"] += skipped
        if changes and self.on_group_change is not None:
            self.on_group_change(changes)


_BROKEN_TRIES = 5  # attempts at a batch the database refuses for a reason other than busy


def _busy(exc: sqlite3.Error) -> bool:
    """Locked or busy: another connection holds the database; waiting helps."""
    text = str(exc).lower()
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in text or "busy" in text)


def _identity(path: str) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


# Errors that belong to one event, not to the database: that event is skipped.
_EVENT_ERRORS = (TypeError, ValueError, KeyError, AttributeError, RecursionError, OverflowError,
                 sqlite3.IntegrityError, sqlite3.InterfaceError, sqlite3.DataError,
                 sqlite3.ProgrammingError)


def _store_event(conn: sqlite3.Connection, kind: str, event: dict[str, Any],
                 meta: dict[str, Any], received: int, changes: list[GroupChange]) -> bool:
    try:
        meta = _override(meta, event)
        if kind == "error":
            error, group = _error_rows(event, meta, received)
            if conn.execute(_INSERT_ERROR, error).rowcount:  # not a resent duplicate
                change = on_occurrence(conn, group[0], group[1], error[2], error[3], error[5])
                conn.execute(_UPSERT_GROUP, group)
                if change is not None:
                    changes.append(change)
        else:
            sql, build = _INSERTS[kind]
            conn.execute(sql, build(event, meta, received))
        return True
    except _EVENT_ERRORS:
        return False


# --- events to rows -------------------------------------------------------------------------


def _now_us() -> int:
    return time.time_ns() // 1000


def _kw(value: Any) -> str | None:
    """Text for an indexed column, cut to keyword length, valid UTF-8 (JSON may carry lone
    surrogates, which SQLite refuses)."""
    if value is None:
        return None
    text = (value if isinstance(value, str) else str(value))[:_KEYWORD]
    return text if text.isascii() else text.encode("utf-8", "replace").decode("utf-8")


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"))


def _bool(value: Any) -> int | None:
    return None if value is None else int(bool(value))


def _service_of(metadata: dict[str, Any]) -> dict[str, Any]:
    service = metadata["service"]
    return {"name": _kw(service["name"]), "version": _kw(service.get("version")),
            "environment": _kw(service.get("environment"))}


def _override(meta: dict[str, Any], event: dict[str, Any]) -> dict[str, Any]:
    """An event may name its own service (context.service), as intake v2 allows."""
    context = event.get("context")
    service = context.get("service") if isinstance(context, dict) else None
    if not isinstance(service, dict) or not isinstance(service.get("name"), str):
        return meta
    return {"name": _kw(service["name"]), "version": _kw(service.get("version")),
            "environment": _kw(service.get("environment")) or meta["environment"]}


def _name_version(obj: Any) -> str | None:
    if not isinstance(obj, dict) or not obj.get("name"):
        return None
    return _kw(f"{obj.get('name')} {obj.get('version') or ''}".strip())


def _service_row(metadata: dict[str, Any], meta: dict[str, Any], received: int) -> tuple:
    service = metadata["service"]
    system = metadata.get("system") or {}
    hostname = system.get("configured_hostname") or system.get("detected_hostname") or \
        system.get("hostname")
    return (meta["name"], meta["environment"], meta["version"],
            _name_version(service.get("agent")), _name_version(service.get("language")),
            _name_version(service.get("framework")), _kw(hostname), received, received)


def _transaction_row(tx: dict[str, Any], meta: dict[str, Any], received: int) -> tuple:
    span_count = tx["span_count"]
    return (
        _kw(tx["id"]), _kw(tx["trace_id"]), _kw(tx.get("parent_id")), meta["name"],
        meta["version"], meta["environment"], _kw(tx.get("name")) or "", _kw(tx["type"]),
        _kw(tx.get("result")), _kw(tx.get("outcome")), tx.get("timestamp") or received,
        float(tx["duration"]), _bool(tx.get("sampled", True)),
        _int(span_count.get("started")), _int(span_count.get("dropped")),
        _json(tx.get("context")),
    )


def _span_row(span: dict[str, Any], meta: dict[str, Any], received: int) -> tuple:
    start = span.get("start")
    return (
        _kw(span["id"]), _kw(span.get("transaction_id")), _kw(span["trace_id"]),
        _kw(span["parent_id"]), meta["name"], _kw(span["name"]), _kw(span["type"]),
        _kw(span.get("subtype")), _kw(span.get("action")), span.get("timestamp"),
        None if start is None else float(start), float(span["duration"]),
        _kw(span.get("outcome")), _bool(span.get("sync")), _json(span.get("context")),
        _json(span.get("stacktrace")),
    )


def _metricset_row(metricset: dict[str, Any], meta: dict[str, Any], received: int) -> tuple:
    tx = metricset.get("transaction") or {}
    span = metricset.get("span") or {}
    return (
        meta["name"], metricset.get("timestamp") or received, _kw(tx.get("name")),
        _kw(tx.get("type")), _kw(span.get("type")), _kw(span.get("subtype")),
        _json(metricset.get("tags")), _json(metricset["samples"]),
        hashlib.blake2b(json.dumps([meta["name"], metricset], sort_keys=True).encode(
            "utf-8", "replace"), digest_size=16).hexdigest(),
    )


def _release_row(record: dict[str, Any], meta: dict[str, Any], received: int) -> tuple:
    return (meta["name"], _kw(record["version"]), received, _kw(record.get("deployed_at")),
            meta["environment"], _kw(record.get("branch")), _kw(record.get("commit")),
            _kw(record.get("previous")), _json(record.get("commits") or []))


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and -(2**63) < value < 2**63 else None


def _error_rows(error: dict[str, Any], meta: dict[str, Any], received: int) -> tuple[tuple, tuple]:
    exc: dict[str, Any] = error.get("exception") or {}
    log: dict[str, Any] = error.get("log") or {}
    tx: dict[str, Any] = error.get("transaction") or {}
    message = exc.get("message") or log.get("message")
    assignee = _assignee(error.get("context"))
    key = grouping_key(error)
    where = _kw(culprit(error))
    timestamp = error.get("timestamp") or received
    error_id = _kw(error["id"])
    exc_type = _kw(exc.get("type") or "") if exc else None  # None: a logged message
    error_row = (
        error_id, meta["name"], meta["version"], meta["environment"], key, timestamp,
        _kw(error.get("trace_id")), _kw(error.get("transaction_id")), _kw(error.get("parent_id")),
        _kw(tx.get("name")), where, exc_type, _kw(message),
        _bool(exc.get("handled")) if exc else None, _kw(log.get("level")),
        assignee["key"], _json(error),
    )
    group_row = (
        meta["name"], key, exc_type, _kw(message), where, timestamp, timestamp,
        meta["version"], error_id, assignee["key"], assignee["name"], assignee["email"],
        assignee["commit"], assignee["date"],
    )
    return error_row, group_row


def _assignee(context: Any) -> dict[str, str | None]:
    """context.custom.assignee {name, email, commit, date}, as the client's blame puts it."""
    custom = context.get("custom") if isinstance(context, dict) else None
    found = custom.get("assignee") if isinstance(custom, dict) else None
    out: dict[str, str | None] = {
        k: _kw(found.get(k)) if isinstance(found, dict) and found.get(k) else None
        for k in ("name", "email", "commit", "date")
    }
    email = out["email"]
    out["key"] = email.lower() if email else out["name"]
    return out



_UPSERT_SERVICE = """
INSERT INTO services (name, environment, version, agent, language, framework, hostname,
                      first_seen, last_seen)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (name) DO UPDATE SET
    environment = coalesce(excluded.environment, environment),
    version = coalesce(excluded.version, version),
    agent = coalesce(excluded.agent, agent),
    language = coalesce(excluded.language, language),
    framework = coalesce(excluded.framework, framework),
    hostname = coalesce(excluded.hostname, hostname),
    last_seen = max(last_seen, excluded.last_seen)
"""
_UPSERT_RELEASE = """
INSERT INTO releases (service, version, first_seen, last_seen) VALUES (?1, ?2, ?3, ?3)
ON CONFLICT (service, version) DO UPDATE SET last_seen = max(last_seen, excluded.last_seen)
"""
_RECORD_RELEASE = """
INSERT INTO releases (service, version, first_seen, last_seen, deployed_at, environment, branch,
    commit_sha, previous, commits)
VALUES (?1, ?2, ?3, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
ON CONFLICT (service, version) DO UPDATE SET
    deployed_at = excluded.deployed_at, environment = excluded.environment,
    branch = excluded.branch, commit_sha = excluded.commit_sha, previous = excluded.previous,
    commits = excluded.commits
"""
_INSERT_TRANSACTION = """
INSERT OR IGNORE INTO transactions (id, trace_id, parent_id, service, service_version,
    environment, name, type, result, outcome, timestamp, duration, sampled, spans_started,
    spans_dropped, context)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
_INSERT_SPAN = """
INSERT OR IGNORE INTO spans (id, transaction_id, trace_id, parent_id, service, name, type,
    subtype, action, timestamp, start, duration, outcome, sync, context, stacktrace)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
_INSERT_METRICSET = """
INSERT OR IGNORE INTO metricsets (service, timestamp, transaction_name, transaction_type,
    span_type, span_subtype, tags, samples, key)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
_INSERT_ERROR = """
INSERT OR IGNORE INTO errors (id, service, service_version, environment, grouping_key,
    timestamp, trace_id, transaction_id, parent_id, transaction_name, culprit, type, message,
    handled, level, assignee_key, body)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
# SET expressions see the row as it was, so each CASE compares with the old first/last seen.
_UPSERT_GROUP = """
INSERT INTO error_groups (service, grouping_key, type, message, culprit, count, first_seen,
    last_seen, first_version, latest_error_id, assignee_key, assignee_name, assignee_email,
    assignee_commit, assignee_date)
VALUES (?1, ?2, ?3, ?4, ?5, 1, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)
ON CONFLICT (service, grouping_key) DO UPDATE SET
    count = count + 1,
    first_seen = min(first_seen, excluded.first_seen),
    first_version = CASE WHEN excluded.first_seen < first_seen
                         THEN excluded.first_version ELSE first_version END,
    last_seen = max(last_seen, excluded.last_seen),
    type = CASE WHEN excluded.last_seen >= last_seen THEN excluded.type ELSE type END,
    message = CASE WHEN excluded.last_seen >= last_seen THEN excluded.message ELSE message END,
    culprit = CASE WHEN excluded.last_seen >= last_seen THEN excluded.culprit ELSE culprit END,
    latest_error_id = CASE WHEN excluded.last_seen >= last_seen
                           THEN excluded.latest_error_id ELSE latest_error_id END,
    assignee_key = CASE WHEN excluded.assignee_key IS NOT NULL AND excluded.last_seen >= last_seen
                        THEN excluded.assignee_key ELSE assignee_key END,
    assignee_name = CASE WHEN excluded.assignee_key IS NOT NULL AND excluded.last_seen >= last_seen
                         THEN excluded.assignee_name ELSE assignee_name END,
    assignee_email = CASE WHEN excluded.assignee_key IS NOT NULL
                               AND excluded.last_seen >= last_seen
                          THEN excluded.assignee_email ELSE assignee_email END,
    assignee_commit = CASE WHEN excluded.assignee_key IS NOT NULL
                                AND excluded.last_seen >= last_seen
                           THEN excluded.assignee_commit ELSE assignee_commit END,
    assignee_date = CASE WHEN excluded.assignee_key IS NOT NULL
                              AND excluded.last_seen >= last_seen
                         THEN excluded.assignee_date ELSE assignee_date END
"""
_INSERTS = {
    "transaction": (_INSERT_TRANSACTION, _transaction_row),
    "span": (_INSERT_SPAN, _span_row),
    "metricset": (_INSERT_METRICSET, _metricset_row),
    "release": (_RECORD_RELEASE, _release_row),
}
