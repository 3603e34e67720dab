"""The background transport: a bounded queue that one daemon thread drains into gzip NDJSON
batches (or, exporter="otlp", up to three OTLP JSON requests per batch: traces, logs,
metrics), ships, and holds (bounded by max_buffer_size) while the server is away.

The request thread only appends to a deque; encoding and compression happen on the worker,
each request on a short-lived thread of its own, so a slow server never stops the draining.
"""

from __future__ import annotations

import atexit
import contextvars
import logging
import os
import sys
import threading
import weakref
import zlib
from collections import deque
from collections.abc import Callable, Iterable
from time import monotonic, sleep
from typing import Any

from beatlib.guard import report
from beatlib.protocol import otlp
from beatlib.transport.http import Backoff, RateLimitedLog, Sender, Verdict

logger = logging.getLogger("beatlib.transport")


def on_event_loop() -> bool:
    """Whether the calling thread runs an asyncio event loop. asyncio is not imported for
    it (about 30 ms and 3 MB with the ssl it brings): no loop runs where nobody imported it."""
    asyncio = sys.modules.get("asyncio")
    return asyncio is not None and asyncio._get_running_loop() is not None


STAT_KEYS = ("queued", "sent_events", "sent_internal", "sent_requests", "retried",
             "dropped_queue_full", "dropped_buffer_full", "dropped_rejected",
             "dropped_send_error", "dropped_too_large", "dropped_encode_error",
             "dropped_at_close", "dropped_partial_success", "buffered_bytes",
             "backpressure_waits")
_ENCODE_SLICE = 0.0005  # seconds of encoding between GIL hand-backs (see _drain)
_YIELD_SECONDS = 0.001  # what one queue() call may wait for the worker, at most about this
_WAKE_AT = 16  # queued items that wake an idle worker before its flush tick (see __init__)

# Every live transport, for the fork and exit hooks; weak so short-lived ones are collected.
_transports: weakref.WeakSet[Transport] = weakref.WeakSet()


class _Marker:
    """A flush() or close() request, queued behind the items it covers."""

    __slots__ = ("done", "ok", "losses_at_call", "deadline")  # deadline: close() only

    def __init__(self, losses: int, deadline: float | None = None) -> None:
        self.done = threading.Event()
        self.ok = True
        self.losses_at_call = losses
        self.deadline = deadline


class _Batch:
    """One request body being written (gzip stream) or, once sealed, waiting to be sent."""

    __slots__ = ("_gzip", "chunks", "size", "raw", "raw_out", "items", "internal", "markers",
                 "body", "signal", "records", "tail")

    def __init__(self, level: int, metadata: bytes, signal: int | None = None,
                 tail: bytes = b"") -> None:
        self._gzip = zlib.compressobj(level, zlib.DEFLATED, 31)  # wbits 31: gzip wrapper
        self.chunks: list[bytes] = []
        self.size = 0  # compressed bytes out so far
        self.raw = 0  # bytes in
        self.raw_out = 0  # bytes in when zlib last gave output
        self.items = 0  # the app's events
        self.internal = 0  # beatlib's own (the periodic metricsets), counted apart
        self.markers: list[_Marker] = []
        self.body = b""
        self.signal = signal  # OTLP: the signal of this request (its path); None: intake
        self.records = 0  # OTLP: record parts written, each after a comma but the first
        self.tail = tail  # OTLP: what closes the request's JSON
        self.write(metadata)

    def add(self, data: bytes) -> None:
        """OTLP: one record part (comma-separated records) of this request."""
        self.write(data if not self.records else b"," + data)
        self.records += 1

    def write(self, data: bytes) -> None:
        self.raw += len(data)
        out = self._gzip.compress(data)
        if out:
            self.chunks.append(out)
            self.size += len(out)
            self.raw_out = self.raw

    def estimated_size(self) -> int:
        """zlib holds back ~100 kB of input; guess its compressed size from the ratio so far
        (a conservative 0.3 until there is a real ratio)."""
        ratio = self.size / self.raw_out if self.raw_out > 16384 else 0.3
        return self.size + int((self.raw - self.raw_out) * ratio)

    def seal(self) -> None:
        if self.tail:
            self.write(self.tail)
        self.chunks.append(self._gzip.flush())
        self.body = b"".join(self.chunks)
        self.size = len(self.body)
        self.chunks = []


class _OtlpBatch:
    """OTLP: one batch being written as up to three requests, one per signal, each its own
    gzip stream; sealed, each is a `_Batch` of its own in the send buffer."""

    __slots__ = ("level", "resource", "requests", "markers", "unsent_items", "unsent_internal")

    def __init__(self, level: int, resource: bytes) -> None:
        self.level = level
        self.resource = resource
        self.requests: list[_Batch | None] = [None, None, None]
        self.markers: list[_Marker] = []
        self.unsent_items = self.unsent_internal = 0  # items that gave no record at all

    def add(self, parts: list[tuple[int, bytes]], internal: bool) -> None:
        """One item's records; the item counts in the request of its first part."""
        for i, (signal, data) in enumerate(parts):
            request = self.requests[signal]
            if request is None:
                head, tail = otlp.envelope(signal, self.resource)
                request = self.requests[signal] = _Batch(self.level, head, signal, tail)
            request.add(data)
            if i == 0:
                if internal:
                    request.internal += 1
                else:
                    request.items += 1
        if not parts:
            if internal:
                self.unsent_internal += 1
            else:
                self.unsent_items += 1

    @property
    def size(self) -> int:
        return sum(r.size for r in self.requests if r is not None)

    def estimated_size(self) -> int:
        return sum(r.estimated_size() for r in self.requests if r is not None)

    def seal(self) -> list[_Batch]:
        """The requests, sealed, in signal order; flushes wait for the last one."""
        out = [r for r in self.requests if r is not None]
        for request in out:
            request.seal()
        if out:
            out[-1].items += self.unsent_items
            out[-1].internal += self.unsent_internal
            out[-1].markers = self.markers
        return out


class Transport:
    """Queues items from any thread and ships them in the background; see docs/ for the rules.

    `encode(item)` returns NDJSON lines (bytes ending in b"\\n"), `metadata()` the metadata
    line; both run on the worker thread. With config.exporter "otlp", `encode(item)` returns
    (signal, JSON records) pairs and `metadata()` the Resource as JSON. `on_tick()` (worker
    thread, every flush_interval) returns items to send with that tick, e.g. metricsets;
    `encoded(item)` (worker thread) is told of each item the app queued once it is encoded.
    The other keyword arguments tune retry spacing, compression and log rate (tests use
    short backoffs), and the sender.
    """

    def __init__(
        self,
        config: Any,
        encode: Callable[[object], list[bytes]],
        metadata: Callable[[], bytes],
        *,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
        compress_level: int = 2,  # measured: as fast as 1, smaller output; 6 is 2x slower
        log_interval: float = 60.0,
        on_tick: Callable[[], Iterable[object]] | None = None,
        sender: Any = None,
        encoded: Callable[[object], None] | None = None,
    ) -> None:
        self._encode = encode
        self._encoded = encoded
        self._otlp = getattr(config, "exporter", None) == "otlp"
        self._on_tick = on_tick
        self._metadata = metadata
        self._max_queue_events = config.max_queue_events
        # Wake the worker once this many items wait (else the flush tick does): few enough
        # that a transaction is encoded and freed soon after it ended. Its objects are what
        # the app's garbage collector walks while they wait, and those still alive at a
        # collection of the middle generation are moved to the oldest and count towards the
        # next full collection, on whichever thread allocates: most often the app's. Waking
        # at 256 made full collections on the request thread 3-5 times as frequent as
        # without the agent (benchmarks/peers/gc_cost.py); waking for every event costs a
        # thread switch per event. 16 keeps most wake-ups to one per 16 requests.
        self._wake_at = max(1, min(config.max_queue_events // 4, _WAKE_AT))
        # Past this, the worker is far behind (the app records faster than events can be
        # encoded and sent): the recording thread yields briefly instead of data being lost.
        self._yield_at = max(1, config.max_queue_events // 4)
        self._flush_interval = max(config.flush_interval, 0.01)
        self._max_request_size = config.max_request_size
        self._max_buffer_size = config.max_buffer_size
        self._shutdown_timeout = config.shutdown_timeout
        self._compress_level = compress_level
        self._backoff_args = (backoff_base, backoff_max)
        self._log = RateLimitedLog(log_interval)
        # `sender.send(body, timeout)` ships one batch: HTTP, or a MemorySender in tests.
        self._sender = sender if sender is not None else Sender(config, self._log)
        self._accepting = bool(config.enabled)
        self._closed_ok = True
        self._reset()
        _transports.add(self)

    def _reset(self) -> None:
        """(Re)creates all per-process state: at construction and in a forked child."""
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._queue: deque[object] = deque()
        self._wakeup = threading.Event()
        self._idle = False
        self._worker: threading.Thread | None = None
        self._dropped_queue_full = 0
        self._counts_yields = 0  # times queue() yielded to a worker far behind
        # Below: touched by the worker thread only.
        self._counts = dict.fromkeys(STAT_KEYS, 0)
        self._losses = 0  # bumped on every loss, so a flush can tell whether it lost anything
        self._queue_drops_seen = 0  # of _dropped_queue_full, counted in _losses already
        self._batch: _Batch | _OtlpBatch | None = None
        self._pending: deque[_Batch] = deque()
        self._pending_bytes = 0
        self._backoff = Backoff(*self._backoff_args)
        self._in_flight: _Batch | None = None  # the head of _pending, while it is being sent
        self._sent: tuple[Verdict, float | None] | None = None  # its answer, set by _ship
        self._retry_at = 0.0
        self._next_flush = 0.0
        self._metadata_line: bytes | None = None
        self._closing: _Marker | None = None  # set by close(), read by the worker

    # --- any thread -------------------------------------------------------------------

    def queue(self, item: object) -> None:
        """Hands `item` to the worker. Never blocks, never raises; drops it if the queue is full."""
        try:
            if not self._accepting:
                return
            if self._pid != os.getpid():
                self._after_fork()
            q = self._queue
            n = len(q)
            if n >= self._max_queue_events:
                with self._lock:
                    self._dropped_queue_full += 1
                return
            q.append(item)
            if self._worker is None:
                self._start_worker()
            elif n >= self._wake_at:
                if self._idle:
                    self._idle = False
                    self._wakeup.set()
                # Never on an event loop's thread: the wait would stall all its coroutines.
                if (n >= self._yield_at and self._worker.is_alive()
                        and not on_event_loop()):
                    self._counts_yields += 1
                    sleep(_YIELD_SECONDS)
        except Exception:  # e.g. no thread can be started at interpreter shutdown
            pass

    def flush(self, timeout: float | None = None) -> bool:
        """Sends what is queued now; True when all of it was accepted within `timeout` seconds
        (default shutdown_timeout). Respects a running backoff."""
        try:
            worker = self._worker
            # A worker another thread is starting (no ident yet) will take the marker.
            if worker is None or (worker.ident is not None and not worker.is_alive()):
                return not self._queue
            marker = _Marker(self._losses)
            self._queue.append(marker)
            self._wakeup.set()
            timeout = self._shutdown_timeout if timeout is None else timeout
            return marker.done.wait(timeout) and marker.ok
        except Exception:
            report("transport: flush")
            return False

    def close(self, timeout: float | None = None) -> bool:
        """Stops accepting items, makes one last attempt to send everything (even during a
        backoff), stops the worker and logs what was lost. True if nothing was lost."""
        try:
            self._accepting = False
            worker = self._worker
            if worker is None or not worker.is_alive() or worker is threading.current_thread():
                return self._closed_ok
            timeout = self._shutdown_timeout if timeout is None else timeout
            start = monotonic()
            # The worker stops a little early so join() sees it finish within `timeout`.
            marker = _Marker(self._losses, deadline=start + timeout * 0.95)
            self._closing = marker
            self._wakeup.set()
            worker.join(max(0.0, start + timeout - monotonic()))
            if worker.is_alive():
                unsent = len(self._queue) + sum(b.items for b in list(self._pending))
                logger.warning("beatlib: transport close timed out after %.1fs; about %d events "
                               "may be lost", timeout, unsent)
                self._closed_ok = False
            else:
                self._closed_ok = marker.ok
            return self._closed_ok
        except Exception:
            report("transport: close")
            return False

    @property
    def worker(self) -> threading.Thread | None:
        """The worker thread of this process, once something was queued (None before)."""
        return self._worker

    def _holds_data(self) -> bool:
        """Events queued, encoded into the open batch, or in batches not yet sent."""
        return bool(self._queue) or self._batch is not None or bool(self._pending)

    @property
    def backlog(self) -> int:
        """Items queued and not yet taken by the worker."""
        return len(self._queue)

    def stats(self) -> dict[str, int]:
        """Counters since start (in this process); items, except buffered_bytes."""
        stats = dict(self._counts)
        stats["queued"] = self._counts["queued"] + len(self._queue)
        stats["dropped_queue_full"] = self._dropped_queue_full
        stats["backpressure_waits"] = self._counts_yields
        batch = self._batch
        stats["buffered_bytes"] = self._pending_bytes + (batch.size if batch else 0)
        return stats

    def _start_worker(self) -> None:
        with self._lock:
            if self._worker is None:
                self._next_flush = monotonic() + self._flush_interval
                # An empty context: the worker never sees (and never traces its own requests
                # under) the transaction of the thread that happened to start it.
                # The transport itself, held for the first round (in a list the thread
                # empties: a thread keeps its arguments), so what was queued is not
                # collected with it before the worker looks (see _run).
                worker = threading.Thread(
                    target=contextvars.Context().run,
                    args=(_run, weakref.ref(self), [self]),
                    name="beatlib-transport",
                    daemon=True,
                )
                self._worker = worker  # before start(): the thread checks it is the worker
                try:
                    worker.start()
                except BaseException:
                    self._worker = None
                    raise

    def _after_fork(self) -> None:
        """In a forked child: forget the parent's queue, batches and sockets (the parent
        still sends them) and start a worker of our own on the next queue()."""
        self._reset()
        self._sender.reset_pool()

    # --- worker thread ----------------------------------------------------------------

    def _work(self) -> float | None:
        """One round of the worker loop; returns how long to sleep, or None to stop."""
        if self._closing is not None:
            self._shut_down(self._closing)
            return None
        self._settle_in_flight()
        self._note_queue_drops()
        self._drain()
        now = monotonic()
        if now >= self._next_flush:
            self._tick()
            self._seal()
            self._next_flush = now + self._flush_interval
        if self._pending and self._in_flight is None and now >= self._retry_at:
            self._start_send()
        if self._queue:
            return 0.0
        now = monotonic()
        wait = self._next_flush - now
        if self._pending and self._in_flight is None:
            wait = min(wait, self._retry_at - now)
        return max(wait, 0.0)  # a request's answer wakes the worker (_ship)

    def _note_queue_drops(self) -> None:
        """Events the app could not queue (full) are losses too: logged, and the next flush
        says so."""
        dropped = self._dropped_queue_full
        if dropped != self._queue_drops_seen:
            new, self._queue_drops_seen = dropped - self._queue_drops_seen, dropped
            self._losses += 1
            self._log.log("queue_full", logging.WARNING, "beatlib: the event queue was full "
                          "(max_queue_events=%d); dropped %d events", self._max_queue_events,
                          new)

    def _tick(self) -> None:
        """Periodic items (e.g. metricsets) join the batch sent at each flush_interval."""
        if self._on_tick is None:
            return
        try:
            items = list(self._on_tick())
        except Exception:
            report("transport: collecting metrics")
            return
        for item in items:
            self._add(item, internal=True)

    def _drain(self, limit: int = 1000) -> None:
        """Encodes up to `limit` queued items: a bound, so a busy app cannot starve sending."""
        q = self._queue
        encoded = self._encoded
        handed_back = monotonic()
        while q and limit:
            limit -= 1
            item = q.popleft()
            if type(item) is _Marker:
                self._seal()
                self._attach(item)
            else:
                self._counts["queued"] += 1
                self._add(item)
                if encoded is not None:
                    encoded(item)  # `item` is the only reference the worker holds here
                # Hand the GIL back every half millisecond of encoding: an app thread that
                # released it for I/O (a query, a socket) would otherwise wait up to the
                # interpreter's switch interval (5 ms) for this run to end: the p99 of requests.
                now = monotonic()
                if now - handed_back >= _ENCODE_SLICE:
                    sleep(0)
                    handed_back = now

    def _add(self, item: object, internal: bool = False) -> None:
        try:
            lines = self._encode(item)
        except Exception:
            self._lose("dropped_encode_error", 1)
            report(f"transport: encoding a {type(item).__name__} (dropped)")
            return
        batch = self._batch
        if batch is None:
            try:
                self._metadata_line = self._metadata()
            except Exception:  # keep sending with the last good metadata, if there is one
                report("transport: building the metadata line")
            if self._metadata_line is None:
                self._lose("dropped_encode_error", 1)
                return
            batch = self._batch = (_OtlpBatch if self._otlp else _Batch)(
                self._compress_level, self._metadata_line)
        if isinstance(batch, _OtlpBatch):
            batch.add(lines, internal)  # type: ignore[arg-type]
        else:
            batch.write(lines[0] if len(lines) == 1 else b"".join(lines))  # one zlib call
            if internal:
                batch.internal += 1
            else:
                batch.items += 1
        if batch.estimated_size() >= self._max_request_size:
            self._seal()

    def _seal(self) -> None:
        """Closes the current batch and queues it for sending, within max_buffer_size."""
        batch = self._batch
        if batch is None:
            return
        self._batch = None
        if isinstance(batch, _OtlpBatch):
            requests = batch.seal()
            if not requests:  # every item was dropped before any record (before_send)
                self._counts["sent_events"] += batch.unsent_items
                self._counts["sent_internal"] += batch.unsent_internal
                for marker in batch.markers:
                    marker.done.set()
                return
        else:
            batch.seal()
            requests = [batch]
        for request in requests:
            self._pending.append(request)
            self._pending_bytes += request.size
        dropped = 0
        first = 0 if self._in_flight is None else 1  # the batch on the wire stays
        while (self._pending_bytes > self._max_buffer_size
               and len(self._pending) > first + len(requests)):
            oldest = self._pending[first]
            del self._pending[first]
            self._pending_bytes -= oldest.size
            self._drop(oldest, "dropped_buffer_full")
            dropped += oldest.items
        if dropped:
            self._log.log("buffer_full", logging.WARNING, "beatlib: unsent data exceeds "
                          "max_buffer_size (%d bytes); dropped the oldest %d events",
                          self._max_buffer_size, dropped)

    def _attach(self, marker: _Marker) -> None:
        """A flush marker is done when the newest batch (holding its last item) is sent."""
        self._note_queue_drops()  # those the app saw before it called flush() count
        marker.ok = self._losses == marker.losses_at_call
        if self._pending:
            self._pending[-1].markers.append(marker)
        else:
            marker.done.set()

    def _start_send(self) -> None:
        """Sends the head batch from a thread of its own: a slow or stuck server holds that
        thread (up to server_timeout), while this one goes on draining the queue."""
        batch = self._in_flight = self._pending[0]
        thread = threading.Thread(target=contextvars.Context().run, args=(self._ship, batch),
                                  name="beatlib-send", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # no new thread (interpreter shutdown): send from this one
            self._in_flight = None
            self._send_head()

    def _send_batch(self, batch: _Batch, timeout: float | None) -> tuple[Verdict, float | None]:
        if batch.signal is None:
            return self._sender.send(batch.body, timeout)  # type: ignore[no-any-return]
        return self._sender.send(batch.body, timeout, batch.signal)  # type: ignore[no-any-return]

    def _ship(self, batch: _Batch) -> None:
        """The request thread: one send, its answer handed back to the worker."""
        try:
            result = self._send_batch(batch, None)
        except Exception:
            report("transport: sending a batch")
            result = (Verdict.FAILED, None)
        self._sent = result  # before the wakeup: the worker reads it after clearing the event
        self._wakeup.set()

    def _settle_in_flight(self, deadline: float | None = None) -> None:
        """Takes the answer to the request in flight, if it came (waiting for it until
        `deadline`, if given)."""
        if self._in_flight is None:
            return
        while self._sent is None and deadline is not None and monotonic() < deadline:
            self._wakeup.wait(deadline - monotonic())
            self._wakeup.clear()
        result, self._sent = self._sent, None
        if result is not None:
            self._in_flight = None
            self._settle(*result)

    def _send_head(self, timeout: float | None = None) -> Verdict:
        verdict, retry_after = self._send_batch(self._pending[0], timeout)
        return self._settle(verdict, retry_after)

    def _settle(self, verdict: Verdict, retry_after: float | None) -> Verdict:
        """What the server's answer to the head batch means for it and the buffer."""
        batch = self._pending[0]
        if verdict is Verdict.RETRY:
            self._counts["retried"] += 1
            self._retry_at = monotonic() + self._backoff.next_delay(retry_after)
            return verdict
        self._pending.popleft()
        self._pending_bytes -= batch.size
        if verdict is Verdict.TOO_LARGE:
            self._split(batch)
            return verdict
        if self._backoff.failures:
            logger.info("beatlib: APM server is taking data again after %d failed attempts",
                        self._backoff.failures)
            self._backoff.reset()
            for key in ("unreachable", "unavailable", "auth"):
                self._log.reset(key)
        self._retry_at = 0.0
        if verdict is Verdict.DROP:
            self._drop(batch, "dropped_rejected")
        elif verdict is Verdict.FAILED:
            self._drop(batch, "dropped_send_error")
        else:
            if verdict is Verdict.PARTIAL:  # the count of records the endpoint rejected
                self._lose("dropped_partial_success", int(retry_after or 0))
                for later in (batch, *self._pending):  # a flush covering them lost data
                    for marker in later.markers:
                        marker.ok = False
            self._counts["sent_requests"] += 1
            self._counts["sent_events"] += batch.items
            self._counts["sent_internal"] += batch.internal
            for marker in batch.markers:
                marker.done.set()
        return verdict

    def _split(self, batch: _Batch) -> None:
        """A batch the server found too large (413) goes again as two halves, each with the
        metadata line (OTLP: the resource); one event that alone is too large is dropped."""
        raw = zlib.decompress(batch.body, 47)  # 47: gzip or zlib
        if batch.signal is not None:
            parts = otlp.split(batch.signal, raw)
            metadata, events = b"", [] if parts is None else parts
        else:
            lines = raw.splitlines(keepends=True)
            metadata, events = lines[0], lines[1:]
        if len(events) <= 1:
            self._drop(batch, "dropped_too_large")
            self._log.log("too_large", logging.ERROR, "beatlib: the APM server refused an event "
                          "as too large (HTTP 413, %d bytes); dropped it", len(batch.body))
            return
        middle = len(events) // 2
        halves = []
        pieces = ([events[0]], [events[1]]) if batch.signal is not None else (
            events[:middle], events[middle:])
        for part in pieces:
            half = _Batch(self._compress_level, metadata, batch.signal)
            half.write(b"".join(part))
            half.seal()
            halves.append(half)
        # A batch counts items (a transaction with its spans is one), not lines: the halves
        # share its count.
        halves[0].items, halves[1].items = batch.items // 2, batch.items - batch.items // 2
        halves[0].internal = batch.internal // 2
        halves[1].internal = batch.internal - batch.internal // 2
        halves[1].markers = batch.markers  # a flush is done when its last item is sent
        self._pending.extendleft(reversed(halves))
        self._pending_bytes += halves[0].size + halves[1].size

    def _lose(self, reason: str, items: int) -> None:
        self._counts[reason] += items
        self._losses += 1

    def _drop(self, batch: _Batch, reason: str) -> None:
        """Drops a batch that left the head of the buffer; every flush waiting on it or on a
        later batch now fails."""
        self._lose(reason, batch.items)
        for marker in batch.markers:
            marker.ok = False
            marker.done.set()
        for later in self._pending:
            for marker in later.markers:
                marker.ok = False

    def _shut_down(self, close: _Marker) -> None:
        deadline = close.deadline or monotonic()
        while self._queue and monotonic() < deadline:
            self._drain()
        unencoded = 0
        while self._queue:  # out of time: what is left is lost, and its flushes fail
            item = self._queue.popleft()
            if type(item) is _Marker:
                item.ok = False
                item.done.set()
            else:
                unencoded += 1
        self._counts["queued"] += unencoded
        self._tick()  # the last metrics go out with the last batch
        self._seal()
        self._settle_in_flight(deadline)
        while self._pending and self._in_flight is None and monotonic() < deadline:
            if self._send_head(deadline - monotonic()) is Verdict.RETRY:
                break
        lost = unencoded
        if unencoded:
            self._lose("dropped_at_close", unencoded)
        while self._pending:
            batch = self._pending.popleft()
            self._pending_bytes -= batch.size
            self._drop(batch, "dropped_at_close")
            lost += batch.items
        if lost:
            logger.warning("beatlib: could not reach the APM server before shutdown; %d events "
                           "were lost", lost)
        self._note_queue_drops()
        losses = {key: n for key, n in self.stats().items() if key.startswith("dropped_") and n}
        if losses:  # everything lost in this process, once more where it is seen at exit
            logger.warning("beatlib: events lost since start: %s",
                           ", ".join(f"{n} {key[8:].replace('_', ' ')}"
                                     for key, n in losses.items()))
        close.ok = self._losses == close.losses_at_call
        close.done.set()


def _run(ref: weakref.ref[Transport], held: list[Transport]) -> None:
    """The worker thread. Holds its transport weakly between rounds while it has nothing to
    send, so an abandoned transport is collected and its worker ends; one holding data (an
    abandoned client's last events: a Django app config made anew by a test's
    `modify_settings`, then dropped) is kept through the wait, and sends it first."""
    while True:
        transport = ref()
        held.clear()  # what kept it until now (the first round, a wait): `transport` does
        if transport is None or transport._worker is not threading.current_thread():
            return  # collected, or replaced after a fork
        transport._idle = False
        try:
            wait = transport._work()
        except Exception:  # a bug here must not kill shipping for the rest of the process
            report("transport: worker loop")
            wait = 1.0
        if wait is None:
            return
        wakeup = transport._wakeup
        transport._idle = True
        if transport._holds_data():
            held.append(transport)  # kept through the wait
        del transport
        wakeup.wait(wait)
        wakeup.clear()


def _reinit_in_child() -> None:
    for transport in list(_transports):
        transport._after_fork()
    # A multiprocessing child ends with os._exit: no atexit. Its own exit hooks (finalizers)
    # do run, but the child clears those it inherited, after this hook: so this asks to be
    # called back once it has, to add ours.
    mp_util = sys.modules.get("multiprocessing.util")
    if mp_util is not None:
        mp_util.register_after_fork(_close_all_at_exit, _close_at_process_exit)


def _close_at_process_exit(close_all: Callable[[], None]) -> None:
    sys.modules["multiprocessing.util"].Finalize(None, close_all, exitpriority=100)


def flush_all(timeout: float | None = None) -> None:
    """Send what every transport of this process has queued (e.g. before a pool worker hands a
    task's result back and may be killed); each waits at most `timeout` (shutdown_timeout)."""
    for transport in list(_transports):
        if transport.worker is not None:
            transport.flush(timeout)


def _close_all_at_exit() -> None:
    for transport in list(_transports):
        if transport._worker is not None:
            transport.close()


os.register_at_fork(after_in_child=_reinit_in_child)
atexit.register(_close_all_at_exit)
