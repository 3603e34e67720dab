"""The exporter process (`exporter_process=True`), the app's side: processors, encoding, gzip
and HTTP run in a child process, off the app's GIL. The app's threads turn each record into
builtins, marshal it and hand it to a Unix socket without waiting (full: dropped and counted);
the child (beatlib/exporter_process.py) rebuilds the record and runs the same `Client`
pipeline and `Transport` as the thread path.
"""

from __future__ import annotations

import logging
import marshal
import os
import pickle
import select
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from time import monotonic
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
SUPPORTED = sys.platform == "linux" and hasattr(socket, "SOCK_SEQPACKET")
SEND_BUFFER = 4 << 20  # asked of the kernel (Linux caps it at net.core.wmem_max)
MAX_MESSAGE = 4 << 20  # a larger record is dropped (dropped_too_large)
_RESTART_AFTER = 5.0  # seconds between two starts of a child that died
# Once the socket is empty the reader waits this long before it blocks on it again: the app's
# sends then wake this process about 50 times a second, not once per record, and it takes
# the CPU from the app's threads less often (measured: /items p99 vs no agent 1.08x against
# 1.66x without the pause, medians of 5 interleaved rounds).
READ_PAUSE = 0.02


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
        self._sock: socket.socket | None = None
        self._child: subprocess.Popen[bytes] | None = None
        self._spawner: threading.Thread | None = None
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
            if len(data) > MAX_MESSAGE:
                self._dropped_large += 1
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
            if self._spawner is not None:
                self._spawner.join(max(0.0, start + timeout - monotonic()))
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
        return 0  # the socket's content is not counted in items

    def stats(self) -> dict[str, int]:
        """The child's counters as of its last answer (flush, close), with this side's drops."""
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
                init = pickle.dumps({"settings": _settings(self._config),
                                     "process": self._process(),
                                     "framework": self._framework(),
                                     "revision_dirs": self._revision_dirs})
                ours.send(b"C" + init)  # the first message: before any record
                self._spawner = threading.Thread(target=self._spawn, args=(ours, theirs),
                                                 name="beatlib-exporter-start", daemon=True)
                self._spawner.start()
            except Exception:
                ours.close()
                theirs.close()
                report("exporter: starting the exporter process")
                return None
            ours.setblocking(False)
            self._sent_framework = self._framework()
            self._sock = ours
            return ours

    def _spawn(self, ours: socket.socket, theirs: socket.socket) -> None:
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
            return
        theirs.close()  # the child's now: a dead child is an EPIPE here
        with self._lock:
            if self._sock is ours:
                self._child = child

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
                select.select([], [sock], [], max(0.0, deadline - monotonic()))

    def _ask(self, what: str, timeout: float) -> bool:
        """Sends `what` ("flush" or "close") and waits for the child's answer."""
        try:
            sock = self._sock
            if sock is None or self._pid != os.getpid():
                return True
            deadline = monotonic() + timeout
            with self._control:
                self._seq += 1
                seq = self._seq
                losses = self._losses()  # those before the call fail it, as on the thread path
                lost_here = losses != self._losses_answered
                self._losses_answered = losses
                if not self._tell(sock, (what, seq, timeout * 0.9), deadline):
                    return False
                while True:
                    left = deadline - monotonic()
                    if left <= 0 or not select.select([sock], [], [], left)[0]:
                        return False
                    data = sock.recv(1 << 16)
                    if not data:
                        return False
                    answer = pickle.loads(data[1:])
                    self._child_stats = answer[3]
                    if answer[1] >= seq:
                        return bool(answer[2]) and not lost_here
        except Exception:
            report(f"exporter: {what}")
            return False
