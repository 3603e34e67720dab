"""The bounded queue intake feeds and the one writer thread that stores it in SQLite.

Intake only ever calls `Store.offer`, which takes a batch if the queue has room and says no
otherwise; it never waits for the database. One writer thread stores queued batches in a
transaction each (WAL, so the dashboard's readers never wait for it), retrying while the
database is locked or slow; meanwhile the queue fills and intake answers 503. The schema is
schema.py's, the rows rows.py's.
"""

from __future__ import annotations

import collections
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from beatlib.receiver import rows
from beatlib.receiver.group_state import GroupChange
from beatlib.receiver.schema import connect, create_schema

logger = logging.getLogger("beatlib.receiver")

Batch = tuple[dict[str, Any], list[tuple[str, dict[str, Any]]], int]  # metadata, events, µs



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
        if self._stopping.is_set() or not self.queue.offer((metadata, events, rows.now_us())):
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
        sums = rows.Sums()
        conn.execute("BEGIN IMMEDIATE")
        try:
            for metadata, events, received in batches:
                meta = rows.service_of(metadata)
                conn.execute(rows.UPSERT_SERVICE, rows.service_row(metadata, meta, received))
                if meta["version"]:
                    conn.execute(rows.UPSERT_RELEASE, (meta["name"], meta["version"], received))
                for kind, event in events:
                    if not rows.store_event(conn, kind, event, meta, received, changes,
                                            sums):
                        skipped += 1
            sums.write(conn)
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
