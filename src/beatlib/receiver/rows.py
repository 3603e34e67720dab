"""Intake events to database rows: what each event kind stores, in which columns, and the
statements that store it (`store_event`, called by the writer inside its transaction)."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from typing import Any

from beatlib.receiver import rollup
from beatlib.receiver.group_state import GroupChange, on_occurrence
from beatlib.receiver.grouping import culprit, grouping_key

_KEYWORD = 1024  # indexed text is cut here; the JSON columns keep the rest

# Errors that belong to one event, not to the database: that event is skipped.
_EVENT_ERRORS = (TypeError, ValueError, KeyError, AttributeError, RecursionError, OverflowError,
                 sqlite3.IntegrityError, sqlite3.InterfaceError, sqlite3.DataError,
                 sqlite3.ProgrammingError)


class Sums:
    """The per-minute span sums (span_minutes, transaction_span_minutes) of the spans stored
    in one database transaction, added up here and written by `write` before it commits:
    the many spans of a minute are one upsert, not one each."""

    def __init__(self) -> None:
        self.by_service: dict[tuple[str, int, str, str], list[float]] = {}
        self.by_name: dict[tuple[str, str, int, str, str], list[float]] = {}
        self.transactions: dict[str, tuple[str, str]] = {}  # stored in this one: id -> name

    def add(self, conn: sqlite3.Connection, row: tuple) -> None:
        """A span row just stored (with a timestamp)."""
        minute, kind, destination, duration = row[9] // _MINUTE * _MINUTE, row[6], \
            row[16] or "", row[11]
        _add(self.by_service, (row[4], minute, kind, destination), duration)
        # Its transaction stored already (a span sent late): counted by its name now;
        # otherwise when the transaction comes (_ADD_TRANSACTION_SPANS).
        owner = self.transactions.get(row[1]) if row[1] is not None else None
        if owner is None and row[1] is not None:
            owner = conn.execute("SELECT service, name FROM transactions WHERE id = ?",
                                 (row[1],)).fetchone()
        if owner is not None:
            _add(self.by_name, (owner[0], owner[1], minute, kind, destination), duration)

    def write(self, conn: sqlite3.Connection) -> None:
        conn.executemany(_ADD_SPAN_MINUTE, [(*k, n, d) for k, (n, d) in self.by_service.items()])
        conn.executemany(_ADD_SPAN_BY_NAME, [(*k, n, d) for k, (n, d) in self.by_name.items()])
        self.by_service.clear()
        self.by_name.clear()
        self.transactions.clear()


def _add(sums: dict[Any, list[float]], key: Any, duration: float) -> None:
    found = sums.get(key)
    if found is None:
        sums[key] = [1, duration]
    else:
        found[0] += 1
        found[1] += duration


def store_event(conn: sqlite3.Connection, kind: str, event: dict[str, Any],
                meta: dict[str, Any], received: int, changes: list[GroupChange],
                sums: Sums) -> bool:
    """Stores one event; False (and nothing stored) if it cannot be. A new error group, or
    a resolved one that regressed, is appended to `changes`; a span's time to `sums`."""
    try:
        meta = _override(meta, event)
        if kind == "error":
            error, group = _error_rows(event, meta, received)
            if conn.execute(_INSERT_ERROR, error).rowcount:  # not a resent duplicate
                change = on_occurrence(conn, group[0], group[1], error[2], error[3], error[5])
                conn.execute(_UPSERT_GROUP, group)
                if change is not None:
                    changes.append(change)
        elif kind == "span":
            row = _span_row(event, meta, received)
            if conn.execute(_INSERT_SPAN, row).rowcount and isinstance(row[9], int):
                sums.add(conn, row)
        elif kind == "transaction":
            row = _transaction_row(event, meta, received)
            if conn.execute(_INSERT_TRANSACTION, row).rowcount:  # not a resent duplicate
                failed = _failed(row[9], row[8])
                conn.execute(_ADD_TRANSACTION_MINUTE, (
                    row[3], row[6], row[7], row[10] // _MINUTE * _MINUTE,
                    rollup.bucket(row[11]), int(failed is True), int(failed is not None),
                    row[11]))
                conn.execute(_ADD_TRANSACTION_SPANS, (row[3], row[6], row[0]))
                sums.transactions[row[0]] = (row[3], row[6])
        else:
            sql, build = _INSERTS[kind]
            conn.execute(sql, build(event, meta, received))
        return True
    except _EVENT_ERRORS:
        return False


def _failed(outcome: str | None, result: str | None) -> bool | None:
    """Whether a transaction failed, as the pages count it: its outcome, else the class of
    an HTTP result; None when neither tells."""
    if outcome in ("success", "failure"):
        return outcome == "failure"
    if result is not None and result.startswith("HTTP "):
        return result.startswith("HTTP 5")
    return None


def now_us() -> int:
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


def service_of(metadata: dict[str, Any]) -> dict[str, Any]:
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


def service_row(metadata: dict[str, Any], meta: dict[str, Any], received: int) -> tuple:
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
        _json(span.get("stacktrace")), destination(span.get("context")),
    )


def destination(context: Any) -> str | None:
    """The dependency an exit span calls, for the charts: its destination service resource
    ("postgresql/shop", "api.example.com:443"), else its service target as "type/name"."""
    if not isinstance(context, dict):
        return None
    resource = _path(context, "destination", "service", "resource")
    if resource not in (None, ""):
        return _kw(resource)
    kind, name = _path(context, "service", "target", "type"), _path(context, "service",
                                                                      "target", "name")
    return None if kind is None or name is None else _kw(f"{kind}/{name}")


def _path(obj: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return None if isinstance(obj, dict | list) else obj


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



UPSERT_SERVICE = """
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
UPSERT_RELEASE = """
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
    subtype, action, timestamp, start, duration, outcome, sync, context, stacktrace,
    destination)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
_MINUTE = 60_000_000
_ADD_SPAN_MINUTE = """
INSERT INTO span_minutes (service, minute, type, destination, spans, duration)
VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (service, minute, type, destination) DO UPDATE SET
    spans = spans + excluded.spans, duration = duration + excluded.duration
"""
_ADD_SPAN_BY_NAME = """
INSERT INTO transaction_span_minutes (service, name, minute, type, destination, spans,
    duration)
VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (service, name, minute, type, destination) DO UPDATE SET
    spans = spans + excluded.spans, duration = duration + excluded.duration
"""
_ADD_TRANSACTION_MINUTE = """
INSERT INTO transaction_minutes (service, name, type, minute, bucket, count, failures,
    with_outcome, duration)
VALUES (?, ?, ?, ?, ?, 1, ?, ?, ?)
ON CONFLICT (service, name, type, minute, bucket) DO UPDATE SET
    count = count + 1, failures = failures + excluded.failures,
    with_outcome = with_outcome + excluded.with_outcome,
    duration = duration + excluded.duration
"""
# The spans of a transaction stored before it (the usual order: a span is sent when it
# ends, its transaction after), by the transaction's name.
_ADD_TRANSACTION_SPANS = """
INSERT INTO transaction_span_minutes (service, name, minute, type, destination, spans,
    duration)
SELECT ?1, ?2, timestamp / 60000000 * 60000000, type, ifnull(destination, ''), count(*),
       sum(duration)
FROM spans WHERE transaction_id = ?3 AND timestamp IS NOT NULL GROUP BY 3, 4, 5
ON CONFLICT (service, name, minute, type, destination) DO UPDATE SET
    spans = spans + excluded.spans, duration = duration + excluded.duration
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
    "metricset": (_INSERT_METRICSET, _metricset_row),
    "release": (_RECORD_RELEASE, _release_row),
}
