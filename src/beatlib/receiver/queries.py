"""What the dashboard shows, read from the store: plain functions of a connection returning
dicts. Percentiles are exact (nearest rank: the smallest duration with at least p% of the
transactions at or below it), computed in SQL with window functions.
"""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

# Window choices of the transactions page: label -> seconds (None: everything stored).
WINDOWS: dict[str, int | None] = {
    "15m": 15 * 60, "1h": 3600, "24h": 86400, "7d": 7 * 86400, "all": None,
}
DEFAULT_WINDOW = "1h"


def _rows(conn: sqlite3.Connection, sql: str, params: Any = ()) -> list[dict[str, Any]]:
    return [dict(row) for row in conn.execute(sql, params)]


def _now_us() -> int:
    return time.time_ns() // 1000


def services(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Every service with its latest version, counts and its latest process metrics."""
    out = _rows(conn, """
        SELECT s.*,
               (SELECT count(*) FROM transactions t WHERE t.service = s.name) AS transactions,
               (SELECT count(*) FROM errors e WHERE e.service = s.name) AS errors,
               (SELECT count(*) FROM error_groups g WHERE g.service = s.name) AS error_groups
        FROM services s ORDER BY s.last_seen DESC""")
    for service in out:
        service.update(process_metrics(conn, service["name"]))
    return out


def process_metrics(conn: sqlite3.Connection, service: str) -> dict[str, Any]:
    """The latest CPU share and RSS the service reported in a metricset."""
    row = conn.execute("""
        SELECT samples FROM metricsets
        WHERE service = ? AND transaction_type IS NULL AND span_type IS NULL
              AND samples LIKE '%"system.process.%'
        ORDER BY timestamp DESC LIMIT 1""", (service,)).fetchone()
    samples = json.loads(row["samples"]) if row else {}
    cpu = samples.get("system.process.cpu.total.norm.pct", {}).get("value")
    rss = samples.get("system.process.memory.rss.bytes", {}).get("value")
    return {"cpu_pct": cpu * 100 if isinstance(cpu, int | float) else None,
            "rss_bytes": rss if isinstance(rss, int | float) else None}


def metricset_count(conn: sqlite3.Connection, service: str) -> int:
    return int(conn.execute("SELECT count(*) FROM metricsets WHERE service = ?",
                            (service,)).fetchone()[0])


def transaction_groups(
    conn: sqlite3.Connection, service: str, window: str = DEFAULT_WINDOW,
    now_us: int | None = None,
) -> list[dict[str, Any]]:
    """Transactions of `service` by name and type within the window: count, throughput
    (per minute), avg/p50/p95/p99 (ms) and error rate (failure / (success + failure), as
    Kibana's failed transaction rate; without an outcome, "HTTP 5xx" results count as
    failures and other HTTP results as successes). Highest total time first."""
    seconds = WINDOWS.get(window, WINDOWS[DEFAULT_WINDOW])
    now = _now_us() if now_us is None else now_us
    since = now - seconds * 1_000_000 if seconds is not None else -(2**63) + 1
    groups = _rows(conn, """
        WITH w AS (
            SELECT name, type, duration, timestamp,
                   CASE WHEN outcome IN ('success', 'failure') THEN outcome
                        WHEN result LIKE 'HTTP 5%' THEN 'failure'
                        WHEN result LIKE 'HTTP %' THEN 'success' END AS outcome,
                   row_number() OVER (PARTITION BY name, type ORDER BY duration) AS rn,
                   count(*) OVER (PARTITION BY name, type) AS n
            FROM transactions WHERE service = ? AND timestamp >= ?
        )
        SELECT name, type, n AS count, avg(duration) AS avg, sum(duration) AS total,
               max(CASE WHEN rn = (n * 50 + 99) / 100 THEN duration END) AS p50,
               max(CASE WHEN rn = (n * 95 + 99) / 100 THEN duration END) AS p95,
               max(CASE WHEN rn = (n * 99 + 99) / 100 THEN duration END) AS p99,
               sum(outcome = 'failure') AS failures,
               sum(outcome IN ('success', 'failure')) AS with_outcome,
               min(timestamp) AS first, max(timestamp) AS last
        FROM w GROUP BY name, type ORDER BY total DESC""", (service, since))
    # Per minute over the time the service's data covers (its first to its last transaction
    # in the window, at least 1 s), not the window: 745 in 5 s are 8,940/min, not 12/min.
    minutes = 1.0
    if groups:
        span_us = max(g["last"] for g in groups) - min(g["first"] for g in groups)
        minutes = max(span_us, 1_000_000) / 60e6
    for group in groups:
        group["tpm"] = group["count"] / minutes
        group["error_rate"] = (group["failures"] / group["with_outcome"]
                               if group["with_outcome"] else None)
    return groups


def transaction_samples(
    conn: sqlite3.Connection, service: str, name: str, limit: int = 20
) -> dict[str, list[dict[str, Any]]]:
    """The latest and the slowest transactions of one name, to open in the waterfall."""
    columns = "id, trace_id, name, type, result, outcome, timestamp, duration, spans_started"
    latest = _rows(conn, f"""SELECT {columns} FROM transactions WHERE service = ? AND name = ?
                             ORDER BY timestamp DESC LIMIT ?""", (service, name, limit))
    slowest = _rows(conn, f"""SELECT {columns} FROM transactions WHERE service = ? AND name = ?
                              ORDER BY duration DESC LIMIT ?""", (service, name, limit))
    return {"latest": latest, "slowest": slowest}


def transaction(conn: sqlite3.Connection, transaction_id: str) -> dict[str, Any] | None:
    """One transaction with its spans in waterfall order (each with `offset` ms from the
    transaction's start and `depth` in the span tree) and the errors raised in it."""
    rows = _rows(conn, "SELECT * FROM transactions WHERE id = ?", (transaction_id,))
    if not rows:
        return None
    tx = rows[0]
    tx["context"] = _loads(tx["context"])
    spans = _rows(conn, "SELECT * FROM spans WHERE transaction_id = ?", (transaction_id,))
    for span in spans:
        if span["timestamp"] is not None:
            span["offset"] = (span["timestamp"] - tx["timestamp"]) / 1000
        else:
            span["offset"] = span["start"] or 0.0
        span["context"] = _loads(span["context"])
        span["stacktrace"] = _loads(span["stacktrace"])
    tx["spans"] = _waterfall(tx["id"], spans)
    tx["errors"] = _rows(conn, """SELECT id, service, grouping_key, type, message, culprit,
                                  timestamp FROM errors WHERE transaction_id = ?
                                  ORDER BY timestamp""", (transaction_id,))
    return tx


def _waterfall(root_id: str, spans: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Depth first from the transaction, children by start; orphans at the end."""
    children: dict[str, list[dict[str, Any]]] = {}
    for span in spans:
        children.setdefault(span["parent_id"], []).append(span)
    for siblings in children.values():
        siblings.sort(key=lambda s: (s["offset"], s["id"]))
    ordered: list[dict[str, Any]] = []
    seen: set[str] = set()
    stack = [(span, 0) for span in reversed(children.get(root_id, []))]
    while stack:
        span, depth = stack.pop()
        if span["id"] in seen:
            continue
        seen.add(span["id"])
        span["depth"] = depth
        ordered.append(span)
        stack.extend((child, depth + 1) for child in reversed(children.get(span["id"], [])))
    for span in sorted(spans, key=lambda s: s["offset"]):
        if span["id"] not in seen:  # its parent never arrived
            span["depth"] = 0
            ordered.append(span)
    return ordered


def span_groups(conn: sqlite3.Connection, service: str, limit: int = 50) -> list[dict[str, Any]]:
    """Spans of `service` by name and type: count, average and longest duration (ms); the
    slowest on average first."""
    return _rows(conn, """
        SELECT name, type, subtype, count(*) AS count, avg(duration) AS avg,
               max(duration) AS max
        FROM spans WHERE service = ? GROUP BY name, type, subtype
        ORDER BY avg DESC LIMIT ?""", (service, limit))


# What error groups sort by (a column of the list), in SQL; ties by key, for a stable page.
ERROR_GROUP_ORDER = {
    "message": ("type", "message"), "service": ("service",), "count": ("count",),
    "first_seen": ("first_seen",), "last_seen": ("last_seen",),
    "first_version": ("first_version",), "assignee_key": ("assignee_key",),
}


def error_groups(
    conn: sqlite3.Connection, service: str | None = None, assignee: str | None = None,
    limit: int = 500, sort: str = "last_seen", descending: bool = True,
    status: str | None = None,
) -> list[dict[str, Any]]:
    """Error groups, most recently seen first (or by `sort`, a key of ERROR_GROUP_ORDER:
    the first `limit` by it); `assignee` is an email or name as stored; `status` one of
    open, resolved, ignored (None: all). Missing values sort last either way."""
    where, params = [], []
    if service:
        where.append("service = ?")
        params.append(service)
    if assignee:
        where.append("assignee_key = ?")
        params.append(assignee)
    if status:
        where.append("status = ?")
        params.append(status)
    sql = "SELECT * FROM error_groups"
    if where:
        sql += " WHERE " + " AND ".join(where)
    direction = "DESC" if descending else "ASC"
    order = ", ".join(f"{column} {direction} NULLS LAST"
                      for column in ERROR_GROUP_ORDER.get(sort, ("last_seen",)))
    return _rows(conn, f"{sql} ORDER BY {order}, service, grouping_key LIMIT ?",
                 (*params, limit))


def assignees(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Everyone errors are assigned to, with their number of groups."""
    return _rows(conn, """
        SELECT assignee_key AS key, max(assignee_name) AS name, max(assignee_email) AS email,
               count(*) AS groups, sum(count) AS errors
        FROM error_groups WHERE assignee_key IS NOT NULL
        GROUP BY assignee_key ORDER BY groups DESC, key""")


def error_group(
    conn: sqlite3.Connection, service: str, key: str, occurrences: int = 20
) -> dict[str, Any] | None:
    """One group, its latest occurrence (the whole event, parsed) and recent occurrences."""
    rows = _rows(conn, "SELECT * FROM error_groups WHERE service = ? AND grouping_key = ?",
                 (service, key))
    if not rows:
        return None
    group = rows[0]
    latest = conn.execute("SELECT body FROM errors WHERE id = ?",
                          (group["latest_error_id"],)).fetchone()
    group["latest"] = _loads(latest["body"]) if latest else None
    group["occurrences"] = _rows(conn, """
        SELECT id, timestamp, message, culprit, service_version, transaction_id,
               transaction_name, handled
        FROM errors WHERE service = ? AND grouping_key = ?
        ORDER BY timestamp DESC, rowid DESC LIMIT ?""", (service, key, occurrences))
    return group


def error_occurrence(
    conn: sqlite3.Connection, service: str, key: str, error_id: str | None = None
) -> dict[str, Any] | None:
    """One occurrence of a group, to step through them newest first: the one with id
    `error_id` (the latest when None), its whole event parsed (`body`), the ids of the next
    `newer` and `older` ones (None at either end), its `position` (1: the latest) and the
    `total` stored. None when the group has no such occurrence. Occurrences are ordered by
    timestamp, then by arrival (rowid), along the errors_group index."""
    columns = ("rowid, id, timestamp, service_version, transaction_id, transaction_name, "
               "handled, body")
    if error_id is None:
        row = conn.execute(f"""SELECT {columns} FROM errors
                               WHERE service = ? AND grouping_key = ?
                               ORDER BY timestamp DESC, rowid DESC LIMIT 1""",
                           (service, key)).fetchone()
    else:
        row = conn.execute(f"""SELECT {columns} FROM errors
                               WHERE id = ? AND service = ? AND grouping_key = ?""",
                           (error_id, service, key)).fetchone()
    if row is None:
        return None
    out = dict(row)
    here = (service, key, out["timestamp"], out.pop("rowid"))
    newer = conn.execute("""SELECT id FROM errors WHERE service = ? AND grouping_key = ?
                            AND (timestamp, rowid) > (?, ?)
                            ORDER BY timestamp, rowid LIMIT 1""", here).fetchone()
    older = conn.execute("""SELECT id FROM errors WHERE service = ? AND grouping_key = ?
                            AND (timestamp, rowid) < (?, ?)
                            ORDER BY timestamp DESC, rowid DESC LIMIT 1""", here).fetchone()
    out["newer"] = newer["id"] if newer else None
    out["older"] = older["id"] if older else None
    out["position"] = 1 + conn.execute(
        """SELECT count(*) FROM errors WHERE service = ? AND grouping_key = ?
           AND (timestamp, rowid) > (?, ?)""", here).fetchone()[0]
    out["total"] = conn.execute("SELECT count(*) FROM errors WHERE service = ? AND "
                                "grouping_key = ?", (service, key)).fetchone()[0]
    out["body"] = _loads(out["body"])
    return out


def group_statuses(conn: sqlite3.Connection, service: str | None = None) -> dict[str, int]:
    """Number of error groups by status (open, resolved, ignored), "regressed" (open groups
    that were resolved once and happened again) and "all"."""
    where, params = ("WHERE service = ?", (service,)) if service else ("", ())
    counts = {"open": 0, "resolved": 0, "ignored": 0, "regressed": 0, "all": 0}
    for row in conn.execute(f"""SELECT status, count(*) AS n,
                                       sum(status = 'open' AND regressions > 0) AS regressed
                                FROM error_groups {where} GROUP BY status""", params):
        counts[row["status"]] = row["n"]
        counts["regressed"] += row["regressed"] or 0
        counts["all"] += row["n"]
    return counts


def service_versions(conn: sqlite3.Connection, service: str) -> list[str]:
    """The versions (releases) `service` has reported or recorded, newest first."""
    return [r["version"] for r in conn.execute(
        "SELECT version FROM releases WHERE service = ? ORDER BY first_seen DESC, version DESC",
        (service,))]


def releases(conn: sqlite3.Connection, service: str | None = None) -> list[dict[str, Any]]:
    """Service versions, newest first, each with the error groups first seen in it and its
    number of errors."""
    where, params = ("WHERE service = ?", (service,)) if service else ("", ())
    out = _rows(conn, f"""
        SELECT r.*,
               (SELECT count(*) FROM errors e
                WHERE e.service = r.service AND e.service_version = r.version) AS errors
        FROM releases r {where} ORDER BY r.first_seen DESC, r.version DESC""", params)
    # Each release's previous one: the version of the same service first seen before it.
    previous: dict[tuple[str, str], str | None] = {}
    for service_name in {r["service"] for r in out}:
        before = None
        for row in conn.execute("SELECT version FROM releases WHERE service = ? "
                                "ORDER BY first_seen, version", (service_name,)):
            previous[(service_name, row["version"])] = before
            before = row["version"]
    stats: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for release in out:
        release["commits"] = _loads(release["commits"]) or []
        group_columns = ("grouping_key, type, message, culprit, count, first_seen, status, "
                         "regressions, regressed_in, regressed_at, assignee_name, assignee_email")
        release["new_error_groups"] = _rows(conn, f"""
            SELECT {group_columns}
            FROM error_groups WHERE service = ? AND first_version = ?
            ORDER BY first_seen""", (release["service"], release["version"]))
        release["regressed_error_groups"] = _rows(conn, f"""
            SELECT {group_columns}
            FROM error_groups WHERE service = ? AND regressed_in = ?
            ORDER BY regressed_at""", (release["service"], release["version"]))
        release["previous_version"] = previous.get((release["service"], release["version"]))
        release["comparison"] = release_comparison(
            conn, release["service"], release["version"], release["previous_version"],
            cache=stats)
        release["transactions"] = sum(
            x["count"] for x in stats[(release["service"], release["version"])].values())
    return out


RELEASE_TOP = 5  # transaction names compared per release

# A transaction's failure and whether it has an outcome at all, as in `transaction_groups`:
# its outcome, else "HTTP 5xx" results are failures and other HTTP results successes.
_FAILURE = ("CASE outcome WHEN 'failure' THEN 1 WHEN 'success' THEN 0 "
            "ELSE result LIKE 'HTTP 5%' END")
_WITH_OUTCOME = "CASE WHEN outcome IN ('success', 'failure') THEN 1 ELSE result LIKE 'HTTP %' END"


def release_comparison(
    conn: sqlite3.Connection, service: str, version: str, previous: str | None,
    top: int = RELEASE_TOP, cache: dict[tuple[str, str], dict[str, dict[str, Any]]] | None = None,
) -> list[dict[str, Any]]:
    """The `top` transaction names of `version` by count (ties by name), each with `after`
    (the transactions `version` sent) and `before` (those the `previous` version sent):
    count, failures, error rate (failures / (successes + failures)) and p95 (ms, nearest
    rank); `before` is None without a previous version, its count 0 when it sent none of
    that name. Every read is a range of the transactions_release_stats index; `cache` keeps
    each version's figures for the next release's `before`."""
    cache = {} if cache is None else cache
    after = _version_stats(conn, service, version, cache)
    before = None if previous is None else _version_stats(conn, service, previous, cache)
    names = sorted(after, key=lambda name: (-after[name]["count"], name))[:top]
    empty = {"count": 0, "failures": 0, "with_outcome": 0, "error_rate": None, "p95": None}
    return [{"name": name,
             "after": _with_p95(conn, service, version, name, after[name]),
             "before": None if before is None else
             _with_p95(conn, service, previous or "", name, before[name])
             if name in before else dict(empty)}
            for name in names]


def _version_stats(conn: sqlite3.Connection, service: str, version: str,
                   cache: dict[tuple[str, str], dict[str, dict[str, Any]]]
                   ) -> dict[str, dict[str, Any]]:
    """name -> count, failures, with_outcome, error_rate of one version's transactions: one
    pass over its index range (in name order: no sort)."""
    if (service, version) not in cache:
        stats = {}
        for row in conn.execute(f"""
                SELECT name, count(*) AS count, coalesce(sum({_FAILURE}), 0) AS failures,
                       coalesce(sum({_WITH_OUTCOME}), 0) AS with_outcome
                FROM transactions WHERE service = ? AND service_version = ?
                GROUP BY name""", (service, version)):
            figures = dict(row)
            figures["error_rate"] = (figures["failures"] / figures["with_outcome"]
                                     if figures["with_outcome"] else None)
            stats[figures.pop("name")] = figures
        cache[(service, version)] = stats
    return cache[(service, version)]


def _with_p95(conn: sqlite3.Connection, service: str, version: str, name: str,
              figures: dict[str, Any]) -> dict[str, Any]:
    """`figures` with the p95 (nearest rank) of that name in that version, read once as the
    one duration at its rank along the index."""
    if "p95" not in figures:
        rank = (figures["count"] * 95 + 99) // 100
        figures["p95"] = conn.execute("""SELECT duration FROM transactions
                                         WHERE service = ? AND service_version = ? AND name = ?
                                         ORDER BY duration LIMIT 1 OFFSET ?""",
                                      (service, version, name, rank - 1)).fetchone()[0]
    return figures


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


# --- traces: every transaction and span of one trace, across services ------------------------

TRACE_SPAN_LIMIT = 1000  # spans shown on a trace page; the earliest, the rest are counted
TRACE_TRANSACTION_LIMIT = 500
TRACE_ERROR_LIMIT = 200


def trace(
    conn: sqlite3.Connection, trace_id: str, span_limit: int = TRACE_SPAN_LIMIT,
) -> dict[str, Any] | None:
    """One trace as a waterfall: its transactions and spans in one tree, depth first, each
    child transaction under the exit span that called it (its `parent_id`), siblings by
    start. Every node has `kind` ("transaction" or "span"), `at` (µs), `offset` (ms from the
    trace's start), `depth` and `orphan` (its parent was never received: shown at the top
    level). Only the earliest `span_limit` spans are read (a parent starts before its
    children, so the tree stays whole); `spans_total - len(spans shown)` were left out.
    Errors of the trace come with `offset` too. None if nothing of the trace is stored."""
    transactions = _rows(conn, """
        SELECT * FROM transactions WHERE trace_id = ? ORDER BY timestamp LIMIT ?""",
                         (trace_id, TRACE_TRANSACTION_LIMIT))
    spans_total = int(conn.execute("SELECT count(*) FROM spans WHERE trace_id = ?",
                                   (trace_id,)).fetchone()[0])
    # A span with a relative `start` is placed by its transaction's timestamp.
    spans = _rows(conn, """
        SELECT s.*, coalesce(s.timestamp, t.timestamp + CAST(s.start * 1000 AS INTEGER))
                    AS at
        FROM spans s LEFT JOIN transactions t ON t.id = s.transaction_id
        WHERE s.trace_id = ? ORDER BY at, s.rowid LIMIT ?""", (trace_id, span_limit))
    if not transactions and not spans:
        return None
    errors = _rows(conn, """
        SELECT id, service, grouping_key, type, message, culprit, timestamp, transaction_id,
               parent_id, handled FROM errors WHERE trace_id = ? ORDER BY timestamp LIMIT ?""",
                   (trace_id, TRACE_ERROR_LIMIT))
    for tx in transactions:
        tx["kind"], tx["at"] = "transaction", tx["timestamp"]
        tx["context"] = _loads(tx["context"])
    for span in spans:
        span["kind"] = "span"
        span["context"] = _loads(span["context"])
        span["stacktrace"] = _loads(span["stacktrace"])
    nodes = transactions + spans
    known = [node["at"] for node in nodes if node["at"] is not None]
    start = min(known) if known else 0
    for span in spans:  # a relative start whose transaction never came: from the trace's
        if span["at"] is None:
            span["at"] = start + int((span["start"] or 0) * 1000)
    end = max(node["at"] + int(node["duration"] * 1000) for node in nodes)
    for node in nodes:
        node["offset"] = (node["at"] - start) / 1000
    for error in errors:
        error["offset"] = (error["timestamp"] - start) / 1000
    return {
        "trace_id": trace_id, "start": start, "duration": (end - start) / 1000,
        "nodes": _trace_tree(nodes), "errors": errors,
        "services": sorted({node["service"] for node in nodes}),
        "transactions": len(transactions), "spans": len(spans), "spans_total": spans_total,
    }


def _trace_tree(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Depth first from the roots (no parent, or a parent never received: `orphan`),
    children by start; a node in a cycle of parents is shown as an orphan too."""
    ids = {node["id"] for node in nodes}
    children: dict[str, list[dict[str, Any]]] = {}
    roots = []
    for node in nodes:
        parent = node["parent_id"]
        node["orphan"] = bool(parent) and parent not in ids
        if parent and parent in ids and parent != node["id"]:
            children.setdefault(parent, []).append(node)
        else:
            roots.append(node)

    def order(node: dict[str, Any]) -> tuple[Any, ...]:
        return (node["at"], node["kind"] != "transaction", node["id"])

    for siblings in children.values():
        siblings.sort(key=order)
    ordered: list[dict[str, Any]] = []
    seen: set[int] = set()

    def walk(tops: list[dict[str, Any]]) -> None:
        stack = [(node, 0) for node in reversed(sorted(tops, key=order))]
        while stack:
            node, depth = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            node["depth"] = depth
            ordered.append(node)
            stack.extend((child, depth + 1)
                         for child in reversed(children.get(node["id"], [])))

    walk(roots)
    left = [node for node in nodes if id(node) not in seen]  # cycles: no way in from a root
    first = len(ordered)
    walk(left)
    for node in ordered[first:]:
        node["orphan"] = node["orphan"] or node["depth"] == 0
    return ordered


def child_transactions(
    conn: sqlite3.Connection, trace_id: str, parent_ids: list[str],
) -> dict[str, list[dict[str, Any]]]:
    """The transactions of the trace called from the spans `parent_ids` (by parent id): what
    a transaction's exit spans started in other services."""
    out: dict[str, list[dict[str, Any]]] = {}
    for start in range(0, len(parent_ids), 500):
        chunk = parent_ids[start:start + 500]
        for row in _rows(conn, f"""
                SELECT id, parent_id, service, name, type, result, outcome, timestamp,
                       duration FROM transactions
                WHERE trace_id = ? AND parent_id IN ({", ".join("?" * len(chunk))})
                ORDER BY timestamp""", (trace_id, *chunk)):
            out.setdefault(row["parent_id"], []).append(row)
    return out
