"""Retention: transactions, spans, errors and metricsets older than the kept duration, and
the per-minute rollups' minutes before it, are deleted in the background, a few hundred
rows per short transaction so the writer (and so intake) never waits long, and the freed
pages are given back to the file system.

Error groups stay: their count, first and last seen are the history of every occurrence
ever received, and their state (resolved, ignored) must survive so that a resolved error
coming back is still a regression, not a new group.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import threading
import time
from typing import Any

from beatlib.receiver.schema import connect

logger = logging.getLogger("beatlib.receiver")

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
BATCH_ROWS = 500  # rows deleted per transaction: a few ms of the write lock
PAUSE = 0.01  # s between two transactions, for the writer to take the lock
VACUUM_PAGES = 256  # pages (1 MiB) given back per transaction
INTERVAL = 60.0  # s between sweeps
_MINUTE = 60_000_000
# The per-minute rollups (schema.py): table -> the primary key's columns before `minute`.
_ROLLUPS = {"span_minutes": ("service",),
            "transaction_minutes": ("service", "name", "type"),
            "transaction_span_minutes": ("service", "name")}


def parse_duration(text: str) -> float:
    """ "7d", "12h", "30m", "90s" -> seconds; ValueError for anything else (or 0)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", text or "")
    if not match or float(match[1]) <= 0:
        raise ValueError(text)
    return float(match[1]) * _UNITS[match[2]]


class Retention:
    """Deletes what is older than `seconds` (by the event's own timestamp), every `interval`
    s on a thread of its own, the first sweep shortly after start."""

    def __init__(self, path: str, seconds: float, interval: float = INTERVAL,
                 batch_rows: int = BATCH_ROWS) -> None:
        self.path = path
        self.seconds = seconds
        self.interval = interval
        self.batch_rows = batch_rows
        self.deleted: dict[str, int] = {}  # rows deleted since start, by table
        self.sweeps = 0
        self.last_error: str | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="beatlib-receiver-retention",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        delay = min(1.0, self.interval)
        while not self._stopping.wait(delay):
            delay = self.interval
            try:
                self.sweep()
            except sqlite3.Error as exc:  # busy for long, or the file went away: next time
                self.last_error = f"{type(exc).__name__}: {exc}"
                logger.warning("receiver: retention sweep stopped (%s); next in %.0f s",
                               exc, self.interval)

    def sweep(self, now_us: int | None = None) -> dict[str, int]:
        """One pass: every old row deleted, then the free pages vacuumed. Rows deleted, by
        table."""
        now = time.time_ns() // 1000 if now_us is None else now_us
        cutoff = now - int(self.seconds * 1_000_000)
        conn = connect(self.path, timeout=5.0)
        deleted: dict[str, int] = {}
        try:
            deleted["transactions"], deleted["spans"] = self._transactions(conn, cutoff)
            deleted["spans"] += self._delete(conn, "spans", "timestamp < ?", cutoff)
            deleted["errors"] = self._delete(conn, "errors", "timestamp < ?", cutoff)
            deleted["metricsets"] = self._delete(conn, "metricsets", "timestamp < ?", cutoff)
            # The minutes wholly before the cutoff (the one it falls in keeps its sums).
            for table, key in _ROLLUPS.items():
                deleted[table] = self._delete_minutes(conn, table, key,
                                                      cutoff - _MINUTE + 1)
            if any(deleted.values()):
                self._vacuum(conn)
        finally:
            conn.close()
        for table, n in deleted.items():
            self.deleted[table] = self.deleted.get(table, 0) + n
        self.sweeps += 1
        if any(deleted.values()):
            logger.info("receiver: retention deleted %s older than %s", ", ".join(
                f"{n} {table}" for table, n in deleted.items() if n), _ago_text(self.seconds))
        return deleted

    def _transactions(self, conn: sqlite3.Connection, cutoff: int) -> tuple[int, int]:
        """Old transactions, with their spans that have no timestamp of their own (only a
        start relative to the transaction)."""
        total = spans = 0
        while not self._stopping.is_set():
            rows = conn.execute("SELECT rowid, id FROM transactions WHERE timestamp < ? LIMIT ?",
                                (cutoff, self.batch_rows)).fetchall()
            if not rows:
                break
            marks = ",".join("?" * len(rows))
            with _write(conn):
                # By their transaction (index spans_transaction; the unary + keeps SQLite
                # off spans_time, where every span without a timestamp is one key).
                spans += conn.execute(f"DELETE FROM spans WHERE +timestamp IS NULL AND "
                                      f"transaction_id IN ({marks})",
                                      [r[1] for r in rows]).rowcount
                total += conn.execute(f"DELETE FROM transactions WHERE rowid IN ({marks})",
                                      [r[0] for r in rows]).rowcount
            self._stopping.wait(PAUSE)
        return total, spans

    def _delete(self, conn: sqlite3.Connection, table: str, where: str, *params: Any) -> int:
        total = 0
        while not self._stopping.is_set():
            # The rowids are read outside the write transaction (WAL: no lock), so the
            # transaction only deletes.
            rowids = [r[0] for r in conn.execute(
                f"SELECT rowid FROM {table} WHERE {where} LIMIT ?", (*params, self.batch_rows))]
            if not rowids:
                break
            with _write(conn):
                total += conn.execute(f"DELETE FROM {table} WHERE rowid IN "
                                      f"({','.join('?' * len(rowids))})", rowids).rowcount
            self._stopping.wait(PAUSE)
        return total

    def _delete_minutes(self, conn: sqlite3.Connection, table: str, key: tuple[str, ...],
                        before: int) -> int:
        """Rows of a rollup (a WITHOUT ROWID table whose primary key is `key` then minute)
        with a minute before `before`: for each key, found by a search of the primary key
        (no scan), its oldest minutes, batch_rows at most per transaction."""
        total = 0
        columns, marks = ", ".join(key), ", ".join("?" * len(key))
        match = " AND ".join(f"{column} = ?" for column in key)
        row = conn.execute(f"SELECT {columns} FROM {table} ORDER BY {columns} LIMIT 1"
                           ).fetchone()
        while row is not None and not self._stopping.is_set():
            found = tuple(row)
            # The minute batch_rows rows on, if this key has that many old rows.
            bound = conn.execute(f"""SELECT minute FROM {table} WHERE {match} AND minute < ?
                                     ORDER BY minute LIMIT 1 OFFSET ?""",
                                 (*found, before, self.batch_rows)).fetchone()
            # Up to that minute; or through it when all these rows are of one minute.
            limit, op = (before, "<") if bound is None else (bound[0], "<")
            if bound is not None and conn.execute(
                    f"SELECT min(minute) FROM {table} WHERE {match}", found
                    ).fetchone()[0] == bound[0]:
                op = "<="
            with _write(conn):
                total += conn.execute(f"DELETE FROM {table} WHERE {match} AND minute {op} ?",
                                      (*found, limit)).rowcount
            if bound is None:  # done with this key: the next one
                row = conn.execute(f"""SELECT {columns} FROM {table}
                                       WHERE ({columns}) > ({marks})
                                       ORDER BY {columns} LIMIT 1""", found).fetchone()
            self._stopping.wait(PAUSE)
        return total

    def _vacuum(self, conn: sqlite3.Connection) -> None:
        """Gives free pages back, a few at a time (incremental vacuum: databases made by a
        receiver with retention; in an older one freed pages are reused, the file does not
        shrink)."""
        if conn.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
            return
        while not self._stopping.is_set() and conn.execute(
                "PRAGMA freelist_count").fetchone()[0] > 0:
            with _write(conn):
                conn.execute(f"PRAGMA incremental_vacuum({VACUUM_PAGES})").fetchall()
            self._stopping.wait(PAUSE)
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()


class _write:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on failure) on an autocommit connection."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.conn.execute("COMMIT")
        elif self.conn.in_transaction:
            self.conn.execute("ROLLBACK")


def _ago_text(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
