"""The exporter process (`exporter_process=True`), the app's side: processors, encoding, gzip
and HTTP run in a child process, off the app's GIL. The app's threads turn each record into
builtins, marshal it and hand it to a Unix socket without waiting (full: dropped and counted);
the child (beatlib/exporter_process.py) rebuilds the record and runs the same `Client`
pipeline and `Transport` as the thread path.
"""

from __future__ import annotations

import fcntl
import logging
import marshal
import os
import pickle
import select
import socket
import struct
import subprocess
import sys
import termios
import threading
import weakref
from collections import deque
from collections.abc import Callable
from time import monotonic, sleep
from typing import Any

from beatlib.errors import ErrorSnapshot
from beatlib.guard import report
from beatlib.stacks import FrameSnapshot
from beatlib.tracing import Span, Transaction
from beatlib.transport import worker
from beatlib.transport.worker import STAT_KEYS

logger = logging.getLogger("beatlib.transport")

# The first byte of each message says what follows.
_TX = 0x54  # b"T": a transaction, marshalled (flatten_transaction)
_PICKLED = 0x50  # b"P": any other record (an error snapshot), pickled
_CONTROL = 0x43  # b"C": a request or an answer, pickled: ("flush", seq, timeout), ...
_PART = 0x4D  # b"M": a part of a record too long for one message: PART_HEADER, then bytes
PART_HEADER = struct.Struct("<BII")  # b"M", the part's index, the record's count of parts
SUPPORTED = sys.platform == "linux" and hasattr(socket, "SOCK_SEQPACKET")
SEND_BUFFER = 4 << 20  # asked of the kernel (Linux caps it at net.core.wmem_max)
# The longest message: a longer record goes in parts. Also at most half the socket's buffer
# (the kernel refuses a message longer than that buffer, 416 kB with Linux's default cap).
MAX_MESSAGE = 4 << 20
# Records in parts are sent by a thread of their own, which waits for room in the socket (the
# app's threads never do). The bytes they hold at most: a larger record is dropped
# (dropped_too_large), one that does not fit beside those waiting too (dropped_queue_full).
MAX_HELD = 64 << 20
PART_WAIT = 5.0  # seconds a part waits for room; then its record is dropped (queue full)
_RESTART_AFTER = 5.0  # seconds between two starts of a child that died
# Once the socket is empty the reader waits this long before it blocks on it again: the app's
# sends then wake this process about 50 times a second, not once per record, and it takes
# the CPU from the app's threads less often (measured: /items p99 vs no agent 1.08x against
# 1.66x without the pause, medians of 5 interleaved rounds).
READ_PAUSE = 0.02
STATS_INTERVAL = 1.0  # the child sends its counters this often, when they changed
ANSWER_SIZE = 1 << 20  # the longest message from the child (an answer, counters, a log record)


# --- the record, as builtins ---------------------------------------------------------------

def _plain(ctx: dict[str, Any] | None) -> dict[str, Any] | None:
    """A context with its deferred values (callables an integration left for the worker)
    built now: a callable cannot cross to the child."""
    if not ctx:
        return ctx
    for value in ctx.values():
        if callable(value):
            return {k: v() if callable(v) else v for k, v in ctx.items()}
    return ctx


def _frames(frames: Any) -> Any:
    if not frames:
        return None
    return tuple((f.abs_path, f.filename, f.module, f.function, f.lineno, f.library_frame,
                  f.locals) for f in frames)


def flatten_transaction(tx: Transaction) -> tuple[Any, ...]:
    """`tx` and its spans as tuples of builtins (what marshal takes), in slot order."""
    tx_id = tx.id
    spans = tuple(
        (sp.id, 0 if sp.parent is tx else sp.parent.id, sp.name, sp.type, sp.subtype,
         sp.action, sp.start, sp.duration, sp.outcome, sp.leaf, sp.sync,
         _frames(sp.stacktrace), sp.errored, sp.labels, _plain(sp.context))
        for sp in tx.spans)
    return (tx_id, tx.trace_id, tx.parent_id, tx.name, tx.type, tx.result, tx.outcome,
            tx.sampled, tx.sample_rate, tx.tracestate, tx.timestamp, tx.start, tx.duration,
            tx.spans_dropped, tx.leaf, tx.secrets, tx.random_trace_id, tx.errored,
            tx.baggage, tx.labels, _plain(tx.context), spans)


def _rebuild_frames(flat: Any) -> list[FrameSnapshot] | None:
    return None if flat is None else [FrameSnapshot(*f) for f in flat]


def rebuild_transaction(flat: tuple[Any, ...]) -> Transaction:
    """The child's copy of a flattened transaction: what the encoder reads of the original."""
    tx = Transaction.__new__(Transaction)
    (tx.id, tx.trace_id, tx.parent_id, tx.name, tx.type, tx.result, tx.outcome, tx.sampled,
     tx.sample_rate, tx.tracestate, tx.timestamp, tx.start, tx.duration, tx.spans_dropped,
     tx.leaf, tx.secrets, tx.random_trace_id, tx.errored, tx.baggage, tx.labels, tx.context,
     flat_spans) = flat
    tx.tracer = None  # type: ignore[assignment]
    tx.ended = True
    by_id: dict[int, Transaction | Span] = {}
    spans = []
    for (sid, parent, sp_name, sp_type, subtype, action, start, duration, outcome, leaf, sync,
         stack, errored, labels, ctx) in flat_spans:
        sp = Span.__new__(Span)
        sp.id, sp.name, sp.type, sp.subtype, sp.action = sid, sp_name, sp_type, subtype, action
        sp.start, sp.duration, sp.outcome, sp.leaf, sp.sync = start, duration, outcome, leaf, sync
        sp.stacktrace, sp.errored, sp.labels, sp.context = (_rebuild_frames(stack), errored,
                                                            labels, ctx)
        sp.parent = tx if parent == 0 else by_id.get(parent, tx)
        sp.transaction = tx
        by_id[sid] = sp
        spans.append(sp)
    tx.spans = spans
    return tx


def _encode_record(item: object) -> bytes:
    """One message: a transaction marshalled, anything else (or a transaction marshal cannot
    take: an app object in a captured context) pickled with its deferred contexts built."""
    if type(item) is Transaction:
        flat = flatten_transaction(item)
        try:
            return b"T" + marshal.dumps(flat)
        except ValueError:
            return b"P" + pickle.dumps(("T", flat), pickle.HIGHEST_PROTOCOL)
    if type(item) is ErrorSnapshot and item.context:
        item.context = _plain(item.context)
    return b"P" + pickle.dumps(("R", item), pickle.HIGHEST_PROTOCOL)


def decode_record(data: memoryview) -> object:
    if data[0] == _TX:
        return rebuild_transaction(marshal.loads(data[1:]))
    kind, value = pickle.loads(data[1:])
    return rebuild_transaction(value) if kind == "T" else value


# --- settings for the child ------------------------------------------------------------------

def hook_reference(hook: Any) -> str | None:
    """`"module:qualname"` of a before_send hook the child can import, or None if it cannot
    (a lambda, a closure, a bound method, a callable object): that hook runs only here."""
    if hook is None:
        return ""
    module, qualname = getattr(hook, "__module__", None), getattr(hook, "__qualname__", None)
    if not module or not qualname or "<" in qualname or module == "__main__":
        return None
    target: Any = sys.modules.get(module)
    for part in qualname.split("."):
        target = getattr(target, part, None)
    return f"{module}:{qualname}" if target is hook else None


def _settings(config: Any) -> dict[str, Any]:
    from beatlib.config import Config

    values = {s.name: getattr(config, s.name) for s in Config.settings()}
    values["before_send"] = hook_reference(config.before_send)
    values["exporter_process"] = False
    return values


# --- the app's side --------------------------------------------------------------------------

class ProcessTransport:
    """The `Transport` interface (queue, flush, close, stats) over an exporter process.

    `framework()` gives the client's framework (read when it changes, for the metadata);
    `process` the metadata's `process` field (this process: the child reports it as its
    own). Start: lazily, at the first record (subprocess: fork + exec, never a bare fork).
    The thread that starts the child then reads what it sends back: answers to flush() and
    close(), its counters, its log records (handed to this process's loggers).
    """

    def __init__(self, config: Any, framework: Callable[[], Any],
                 process: Callable[[], dict[str, Any]],
                 revision_dirs: tuple[str, ...] | None = None) -> None:
        self._config = config
        self._revision_dirs = revision_dirs  # the app's: where the child runs git describe
        self._framework = framework
        self._process = process
        self._accepting = bool(config.enabled)
        self._shutdown_timeout = config.shutdown_timeout
        self._closed_ok = True
        self._reset()
        worker._transports.add(self)  # type: ignore[arg-type]  # fork and exit hooks

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()  # starting and replacing the child
        self._control = threading.Lock()  # one flush/close conversation at a time
        self._answers = threading.Condition()  # the reader tells of an answer, or of EOF
        self._answer: tuple[int, bool] = (0, False)  # seq and verdict of the last answer
        self._sock: socket.socket | None = None
        self._child: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._part_size = MAX_MESSAGE  # set from the socket's buffer when it is made
        self._held: deque[bytes] = deque()  # records waiting to be sent in parts
        self._held_bytes = 0
        self._holding = threading.Condition()
        self._parts_sender: threading.Thread | None = None
        self._started_at = -_RESTART_AFTER
        self._sent_framework: Any = None
        self._seq = 0
        self._sent = 0
        self._dropped_full = self._dropped_large = self._dropped_encode = 0
        self._dropped_child = 0  # records the child could not take: it had died
        self._restarts = 0
        self._losses_answered = 0  # this side's drops when the last flush answered
        self._child_stats: dict[str, int] = {}

    # any thread

    def queue(self, item: object) -> None:
        """Hands `item` to the exporter. Never blocks, never raises; drops it (counted) when
        the socket is full or the child is gone."""
        try:
            if not self._accepting:
                return
            if self._pid != os.getpid():
                self._after_fork()
            sock = self._sock
            if sock is None:
                sock = self._start()
                if sock is None:
                    self._dropped_child += 1
                    return
            framework = self._framework()
            if framework is not self._sent_framework:
                self._sent_framework = framework
                self._tell(sock, ("framework", framework))
            try:
                data = _encode_record(item)
            except Exception:
                self._dropped_encode += 1
                report(f"exporter: flattening a {type(item).__name__} (dropped)")
                return
            if len(data) > self._part_size:
                self._hold(data)
                return
            try:
                sock.send(data)
                self._sent += 1
            except BlockingIOError:
                self._dropped_full += 1
            except OSError:  # EPIPE, ECONNRESET: the child died
                self._dropped_child += 1
                self._lost_child(sock)
        except Exception:
            pass

    def flush(self, timeout: float | None = None) -> bool:
        """Sends what was queued so far; True when the child's transport had all of it
        accepted within `timeout` (default shutdown_timeout)."""
        timeout = self._shutdown_timeout if timeout is None else timeout
        return self._ask("flush", timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Stops accepting records, has the child flush and exit, and waits for it."""
        try:
            self._accepting = False
            if self._sock is None or self._pid != os.getpid():
                return self._closed_ok
            timeout = self._shutdown_timeout if timeout is None else timeout
            start = monotonic()
            ok = self._ask("close", timeout)
            with self._holding:
                self._holding.notify_all()  # the parts sender ends (nothing more comes)
            if self._reader is not None:  # it ends when the child closes its end
                self._reader.join(max(0.0, start + timeout - monotonic()))
            child, sock = self._child, self._sock
            self._child = self._sock = None
            if sock is not None:
                sock.close()  # EOF: a child that missed the request exits too
            if child is not None:
                try:
                    child.wait(max(0.1, start + timeout + 1.0 - monotonic()))
                except subprocess.TimeoutExpired:
                    logger.warning("beatlib: the exporter process did not exit within %.1fs",
                                   timeout)
                    ok = False
            self._closed_ok = ok
            return ok
        except Exception:
            report("exporter: close")
            return False

    @property
    def worker(self) -> subprocess.Popen[bytes] | None:
        """The exporter process, once started (None before)."""
        return self._child

    @property
    def _worker(self) -> socket.socket | None:  # what worker.py's exit and fork hooks read
        return self._sock

    @property
    def backlog(self) -> int:
        return len(self._held)  # the socket's content is not counted in items

    def stats(self) -> dict[str, int]:
        """The child's counters as it last sent them (every STATS_INTERVAL while they
        change, and with each answer to flush() and close()), with this side's drops."""
        stats = dict.fromkeys(STAT_KEYS, 0)
        stats.update(self._child_stats)
        stats["dropped_queue_full"] += self._dropped_full
        stats["dropped_too_large"] += self._dropped_large
        stats["dropped_encode_error"] += self._dropped_encode
        stats["dropped_send_error"] += self._dropped_child
        stats["exporter_records"] = self._sent
        stats["exporter_restarts"] = self._restarts
        return stats

    def _losses(self) -> int:
        return (self._dropped_full + self._dropped_large + self._dropped_encode
                + self._dropped_child)

    # records in parts

    def _hold(self, data: bytes) -> None:
        """A record longer than one message, for the parts sender (never waited for)."""
        if len(data) > MAX_HELD:
            self._dropped_large += 1
            return
        with self._holding:
            if self._held_bytes + len(data) > MAX_HELD:
                self._dropped_full += 1
                return
            self._held.append(data)
            self._held_bytes += len(data)
            if self._parts_sender is None:
                self._parts_sender = threading.Thread(target=self._send_held,
                                                      name="beatlib-exporter-parts",
                                                      daemon=True)
                self._parts_sender.start()
            else:
                self._holding.notify_all()

    def _send_held(self) -> None:
        """The parts sender: each held record, in order, one part after the other (so the
        child joins them without a record id), waiting for room in the socket."""
        holding = self._holding
        while True:
            with holding:
                if not self._held:
                    holding.wait_for(lambda: self._held or not self._accepting, 10.0)
                if not self._held:  # closed, or idle: the next such record starts another
                    self._parts_sender = None
                    return
                data = self._held[0]  # counted as held until it is sent
            sock = self._sock
            sent = sock is not None and self._send_parts(sock, data)
            with holding:
                self._held.popleft()
                self._held_bytes -= len(data)
                if sent:
                    self._sent += 1
                elif self._sock is sock and sock is not None:
                    self._dropped_full += 1  # no room for PART_WAIT: the child is stuck
                else:
                    self._dropped_child += 1  # the child died meanwhile
                holding.notify_all()  # a flush waiting for the held records

    def _send_parts(self, sock: socket.socket, data: bytes) -> bool:
        """Sends `data` in parts; each waits until the socket holds at most half its buffer
        with it, so the app's threads still find room for the records they send meanwhile."""
        view = memoryview(data)
        step = self._part_size - PART_HEADER.size
        count = -(-len(data) // step)
        for index in range(count):
            header = PART_HEADER.pack(_PART, index, count)
            piece = view[index * step:(index + 1) * step]
            deadline = monotonic() + PART_WAIT
            while True:
                if self._sock is not sock:
                    return False
                try:
                    if _queued(sock) + len(piece) + PART_HEADER.size > self._part_size:
                        raise BlockingIOError
                    sock.sendmsg([header, piece])
                    break
                except BlockingIOError:
                    if monotonic() >= deadline:
                        return False  # the child finds the next record's first part
                    sleep(0.005)  # no wake-up says "below half": this thread looks again
                except OSError:  # EPIPE, ECONNRESET: the child died
                    self._lost_child(sock)
                    return False
        return True

    def _wait_held(self, deadline: float) -> bool:
        """Waits until the held records are in the socket (or dropped), until `deadline`."""
        with self._holding:
            return self._holding.wait_for(lambda: not self._held,
                                          max(0.0, deadline - monotonic()))

    # the child's lifecycle

    def _start(self) -> socket.socket | None:
        """The socket to the exporter, made now; the process behind it is started by a
        thread of its own (fork + exec takes tens of milliseconds: never a request's). What
        is sent before it runs waits in the socket."""
        with self._lock:
            if self._sock is not None:
                return self._sock
            if monotonic() - self._started_at < _RESTART_AFTER:
                return None
            self._started_at = monotonic()
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
                # The kernel reports twice what it granted; a message takes at most that.
                granted = ours.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) // 2
                self._part_size = min(MAX_MESSAGE, granted)
                init = pickle.dumps({"settings": _settings(self._config),
                                     "process": self._process(),
                                     "framework": self._framework(),
                                     "revision_dirs": self._revision_dirs,
                                     "log_level": logging.getLogger("beatlib")
                                     .getEffectiveLevel()})
                ours.send(b"C" + init)  # the first message: before any record
                self._reader = threading.Thread(target=_exporter_thread,
                                                args=(weakref.ref(self), ours, theirs),
                                                name="beatlib-exporter", daemon=True)
                self._reader.start()
            except Exception:
                ours.close()
                theirs.close()
                report("exporter: starting the exporter process")
                return None
            ours.setblocking(False)
            self._sent_framework = self._framework()
            self._sock = ours
            return ours

    def _spawn(self, ours: socket.socket, theirs: socket.socket) -> bool:
        """Starts the child; True if it runs."""
        try:
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
            child = subprocess.Popen(
                [sys.executable, "-m", "beatlib.exporter_process", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                start_new_session=True, env=env)  # its own session: no ^C of ours
        except Exception:
            report("exporter: starting the exporter process")
            theirs.close()
            self._lost_child(ours)
            return False
        theirs.close()  # the child's now: a dead child is an EPIPE here
        with self._lock:
            if self._sock is ours:
                self._child = child
        return True

    def _hear(self, message: tuple[Any, ...]) -> None:
        if message[0] == "log":
            self._log(message[1])
        elif message[0] == "stats":
            self._child_stats = message[1]
        else:  # an answer: (what, seq, ok, stats)
            with self._answers:
                self._child_stats = message[3]
                self._answer = (message[1], bool(message[2]))
                self._answers.notify_all()

    @staticmethod
    def _log(fields: dict[str, Any]) -> None:
        """A log record of the child's, through this process's logging (its handlers, its
        levels), as the worker thread's would be."""
        record = logging.makeLogRecord(fields)
        target = logging.getLogger(record.name)
        if target.isEnabledFor(record.levelno):
            target.handle(record)

    def _lost_child(self, sock: socket.socket) -> None:
        with self._lock:
            if self._sock is not sock:
                return
            self._sock = None
            sock.close()
            child, self._child = self._child, None
            if child is not None:
                child.poll()  # reaped if it is gone
            self._restarts += 1
            logger.warning("beatlib: the exporter process ended; starting another (records "
                           "in its hands are lost)")

    def _after_fork(self) -> None:
        """In a forked child: the parent's socket and exporter are the parent's; this process
        gets its own exporter at its first record."""
        sock = self._sock
        self._reset()
        if sock is not None:
            try:
                os.close(sock.detach())  # only our copy: the parent's exporter stays open
            except OSError:
                pass

    def _tell(self, sock: socket.socket, message: tuple[Any, ...],
              deadline: float | None = None) -> bool:
        """A control message; waits for room in the socket until `deadline` (None: never)."""
        data = b"C" + pickle.dumps(message)
        while True:
            try:
                sock.send(data)
                return True
            except BlockingIOError:
                if deadline is None or monotonic() >= deadline:
                    return False
                poller = select.poll()
                poller.register(sock, select.POLLOUT)
                poller.poll(max(0.0, deadline - monotonic()) * 1000)

    def _ask(self, what: str, timeout: float) -> bool:
        """Sends `what` ("flush" or "close") behind the records queued so far (those held
        for the parts sender too) and waits for the child's answer."""
        try:
            sock = self._sock
            if sock is None or self._pid != os.getpid():
                return True
            deadline = monotonic() + timeout
            with self._control:
                all_in = self._wait_held(deadline)
                self._seq += 1
                seq = self._seq
                losses = self._losses()  # those before the call fail it, as on the thread path
                lost_here = losses != self._losses_answered
                self._losses_answered = losses
                left = max(0.0, deadline - monotonic())
                if not self._tell(sock, (what, seq, left * 0.9), deadline):
                    return False
                with self._answers:
                    answered = self._answers.wait_for(
                        lambda: self._answer[0] >= seq or self._sock is not sock
                        or self._reader is None or not self._reader.is_alive(),
                        max(0.0, deadline - monotonic()))
                    if not answered or self._answer[0] < seq:
                        return False
                    return self._answer[1] and all_in and not lost_here
        except Exception:
            report(f"exporter: {what}")
            return False


def _exporter_thread(ref: weakref.ref[ProcessTransport], ours: socket.socket,
                     theirs: socket.socket) -> None:
    """Starts the child, then reads what it sends until it closes its end. Holds the
    transport weakly between two messages: an abandoned one is collected (and its socket
    closed, which ends the child)."""
    transport = ref()
    if transport is None or not transport._spawn(ours, theirs):
        return
    answers = transport._answers
    del transport
    try:
        _read_answers(ref, ours)
    except Exception:
        report("exporter: reading the exporter process's answers")
    with answers:
        answers.notify_all()  # no answer will come on this socket


def _read_answers(ref: weakref.ref[ProcessTransport], sock: socket.socket) -> None:
    buffer = bytearray(ANSWER_SIZE)
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    while True:
        transport = ref()
        if transport is None or transport._sock is not sock:
            return
        del transport
        if not poller.poll(1000):  # a second: notices a socket closed or let go meanwhile
            continue
        try:
            n = sock.recv_into(buffer)
        except BlockingIOError:
            continue
        except OSError:
            return
        if n == 0:
            return  # the child exited
        transport = ref()
        if transport is None:
            return
        try:
            transport._hear(pickle.loads(memoryview(buffer)[1:n]))
        except Exception:  # e.g. an app's log handler that raised: the next one counts
            report("exporter: a message of the exporter process")
        del transport


def _queued(sock: socket.socket) -> int:
    """Bytes in the socket not yet read by the child (SIOCOUTQ), 0 if the kernel will not say."""
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except OSError:
        return 0
