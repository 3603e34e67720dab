"""Agent health: what each service's clients say about their own sending, read from the
`beatlib.transport.*` counters they ship in a metricset every flush interval (events sent,
requests retried, events dropped by reason), over a window and as last reported.
"""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

from beatlib.receiver.queries import DEFAULT_WINDOW, WINDOWS

PREFIX = "beatlib.transport."
# Counters shown, in this order; every `dropped_*` counter is a reason for a loss.
COUNTERS = ("sent_events", "sent_internal", "sent_requests", "retried")


def agent_health(
    conn: sqlite3.Connection, window: str = DEFAULT_WINDOW, now_us: int | None = None,
) -> list[dict[str, Any]]:
    """Per service that sent transport counters: `window` (what was counted within it:
    sent_events, sent_internal, sent_requests, retried, dropped {reason: n}, dropped_total)
    and `latest` (the counters of its latest report, since that client process started,
    with `timestamp`).

    A client's counters grow from 0 when its process starts; a value lower than the one
    before is a new process, whose count starts again from 0. The window's figures are
    the growth from the last report before the window. Several processes of one service
    reporting at the same time interleave, and their counters cannot be told apart (a
    metricset names its service, not its process): for those, `latest` is one process's
    and the window's figures are too high."""
    seconds = WINDOWS.get(window, WINDOWS[DEFAULT_WINDOW])
    now = time.time_ns() // 1000 if now_us is None else now_us
    since = now - seconds * 1_000_000 if seconds is not None else None
    out = []
    for (service,) in conn.execute("SELECT name FROM services ORDER BY name").fetchall():
        reports = _reports(conn, service, since, now)
        if not reports:
            continue
        baseline = _baseline(conn, service, since) if since is not None else None
        totals: dict[str, int] = {}
        previous = baseline or {}
        for _, counters in reports:
            for name, value in counters.items():
                before = previous.get(name, 0)
                totals[name] = totals.get(name, 0) + (value - before if value >= before
                                                      else value)
            previous = counters
        timestamp, latest = reports[-1]
        out.append({"service": service, "window": _shape(totals),
                    "latest": {**_shape(latest), "timestamp": timestamp},
                    "reports": len(reports)})
    return out


def _reports(conn: sqlite3.Connection, service: str, since: int | None, until: int
             ) -> list[tuple[int, dict[str, int]]]:
    rows = conn.execute(f"""
        SELECT timestamp, samples FROM metricsets
        WHERE service = ? AND timestamp >= ? AND timestamp <= ?
              AND transaction_type IS NULL AND span_type IS NULL
              AND samples LIKE '%"{PREFIX}%'
        ORDER BY timestamp""", (service, -(2**63) if since is None else since, until))
    return [(row[0], counters) for row in rows if (counters := _counters(row[1]))]


def _baseline(conn: sqlite3.Connection, service: str, since: int) -> dict[str, int] | None:
    """The counters of the service's last report before the window (what it had counted
    already), if any."""
    for row in conn.execute(f"""
            SELECT samples FROM metricsets
            WHERE service = ? AND timestamp < ?
                  AND transaction_type IS NULL AND span_type IS NULL
                  AND samples LIKE '%"{PREFIX}%'
            ORDER BY timestamp DESC LIMIT 20""", (service, since)):
        counters = _counters(row[0])
        if counters:
            return counters
    return None


def _counters(text: str) -> dict[str, int]:
    try:
        samples = json.loads(text)
    except ValueError:
        return {}
    if not isinstance(samples, dict):
        return {}
    out = {}
    for name, sample in samples.items():
        if not name.startswith(PREFIX) or not isinstance(sample, dict):
            continue
        value = sample.get("value")
        key = name[len(PREFIX):]
        if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0 \
                and (key in COUNTERS or key.startswith("dropped_")):
            out[key] = int(value)
    return out


def _shape(counters: dict[str, int]) -> dict[str, Any]:
    dropped = {name[len("dropped_"):].replace("_", " "): n for name, n in
               sorted(counters.items()) if name.startswith("dropped_") and n}
    return {**{name: counters.get(name, 0) for name in COUNTERS}, "dropped": dropped,
            "dropped_total": sum(dropped.values())}
