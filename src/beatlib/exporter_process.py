"""The exporter process (`exporter_process=True`), the child's side: a client built from the
app's settings runs each record read off the socket (joined again if it came in parts)
through the same pipeline and transport as the worker thread; its counters and log records go
back to the app. The app's side is transport/process.py. Run as
`python -m beatlib.exporter_process FD`.
"""

from __future__ import annotations

import logging
import mmap
import pickle
import signal
import socket
import sys
import threading
import time
from typing import Any

from beatlib.client import Client
from beatlib.config import Config, hook
from beatlib.guard import report
from beatlib.metrics import LatencyMetrics
from beatlib.transport.process import (
    _CONTROL,
    _PART,
    MAX_MESSAGE,
    PART_HEADER,
    READ_PAUSE,
    STATS_INTERVAL,
    decode_record,
)

LOG_TEXT = 16000  # characters of a log record's message (and of its traceback) sent to the app


class ExporterClient(Client):
    """The child's client: its metadata's `process` is the app's, not this process's."""

    app_process: dict[str, Any] = {}

    def _metadata(self) -> dict[str, Any]:
        metadata = super()._metadata()
        metadata["process"] = self.app_process
        return metadata


def exporter_client(init: dict[str, Any]) -> ExporterClient:
    """The client the app's settings (`init`, sent first on the socket) describe."""
    config = Config.__new__(Config)
    for name, value in init["settings"].items():
        setattr(config, name, value)
    config.before_send = hook().parse(config.before_send) if config.before_send else None
    client = ExporterClient(config)
    client.app_process = init["process"]
    client._revision_dirs = init["revision_dirs"]  # the app's folders, not ours
    client.framework = init["framework"]
    client.metrics = LatencyMetrics(pid=init["process"]["pid"])  # the app's CPU and memory
    return client


class ToApp(logging.Handler):
    """Hands beatlib's log records to the app's process, which logs them through its own
    logging (its handlers and format, where its operator looks), as the worker thread's.
    Without room in the socket (the app not reading), a warning goes to stderr instead."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self._sock = sock

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = dict(record.__dict__)
            fields["msg"] = record.getMessage()[:LOG_TEXT]
            fields["args"] = None
            if record.exc_info:
                fields["exc_text"] = logging.Formatter().formatException(record.exc_info)
            if fields.get("exc_text"):
                fields["exc_text"] = fields["exc_text"][-LOG_TEXT:]  # the raising end
            fields["exc_info"] = None
            fields["stack_info"] = None
            fields["processName"] = "beatlib-exporter"
            self._sock.send(b"C" + pickle.dumps(("log", fields)), socket.MSG_DONTWAIT)
        except Exception:
            fallback = logging.lastResort
            if fallback is not None and record.levelno >= logging.WARNING:
                fallback.handle(record)


def _send_stats(sock: socket.socket, client: Client) -> None:
    """Every STATS_INTERVAL, the client's counters if they changed: the app's `stats()`."""
    last = None
    while True:
        time.sleep(STATS_INTERVAL)
        stats = client.stats()
        if stats == last:
            continue
        try:
            sock.send(b"C" + pickle.dumps(("stats", stats)), socket.MSG_DONTWAIT)
            last = stats
        except BlockingIOError:
            pass
        except OSError:
            return


def _answer(sock: socket.socket, client: Client, what: str, seq: int, ok: bool) -> None:
    sock.send(b"C" + pickle.dumps((what, seq, ok, client.stats())))


def main(fd: int) -> None:
    """Records in, the client's transport out, until the app closes the socket (it exited,
    or was killed: what reached the socket is still sent)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = socket.socket(fileno=fd)
    # Anonymous memory, not a bytearray: its pages are resident once a message reached them,
    # not all 4 MB from the start.
    buffer = mmap.mmap(-1, MAX_MESSAGE + 1)
    view = memoryview(buffer)
    n = sock.recv_into(buffer)
    init = pickle.loads(view[1:n])
    log = logging.getLogger("beatlib")
    log.addHandler(ToApp(sock))
    log.propagate = False
    log.setLevel(init["log_level"])  # the app's; its log_level setting, if any, is that too
    client = exporter_client(init)
    threading.Thread(target=_send_stats, args=(sock, client), name="beatlib-exporter-stats",
                     daemon=True).start()
    # A record in parts: its parts come in order, one record at a time (the app's parts
    # sender). A first part of another record means the app gave up on this one (counted
    # there): it is let go, so at most one record's bytes wait here.
    parts: bytearray | None = None
    expected = 0
    while True:
        try:
            n = sock.recv_into(buffer, 0, socket.MSG_DONTWAIT)
        except BlockingIOError:
            time.sleep(READ_PAUSE)
            n = sock.recv_into(buffer)
        if n == 0:
            break
        try:
            kind = buffer[0]
            if kind == _PART:
                _, index, count = PART_HEADER.unpack_from(buffer)
                if index == 0:
                    parts = bytearray(view[PART_HEADER.size:n])
                elif parts is not None and index == expected:
                    parts += view[PART_HEADER.size:n]
                else:
                    parts = None
                    continue
                expected = index + 1
                if expected == count:
                    data, parts = parts, None
                    client.queue(decode_record(memoryview(data)))
                continue
            if kind != _CONTROL:
                client.queue(decode_record(view[:n]))
                continue
            message = pickle.loads(view[1:n])
            if message[0] == "framework":
                client.framework = message[1]
            elif message[0] == "flush":
                threading.Thread(target=lambda m=message: _answer(
                    sock, client, "flush", m[1], client.flush(m[2])), daemon=True).start()
            elif message[0] == "close":
                ok = client.close(message[2])
                _answer(sock, client, "close", message[1], ok)
                return
        except Exception:
            parts = None
            report("exporter process: a record (dropped)")
    client.close()


if __name__ == "__main__":
    main(int(sys.argv[1]))
