"""The exporter process (`exporter_process=True`), the child's side: a client built from the
app's settings runs each record read off the socket through the same pipeline and transport
as the worker thread. The app's side (the socket, the record's crossing, starting this
process) is transport/process.py. Run as `python -m beatlib.exporter_process FD`.
"""

from __future__ import annotations

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
from beatlib.transport.process import _CONTROL, MAX_MESSAGE, READ_PAUSE, decode_record


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


def _answer(sock: socket.socket, client: Client, what: str, seq: int, ok: bool) -> None:
    sock.send(b"C" + pickle.dumps((what, seq, ok, client.stats())))


def main(fd: int) -> None:
    """Records in, the client's transport out, until the app closes the socket (it exited,
    or was killed: what reached the socket is still sent)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = socket.socket(fileno=fd)
    buffer = bytearray(MAX_MESSAGE + 1)
    view = memoryview(buffer)
    n = sock.recv_into(buffer)
    client = exporter_client(pickle.loads(view[1:n]))
    while True:
        try:
            n = sock.recv_into(buffer, 0, socket.MSG_DONTWAIT)
        except BlockingIOError:
            time.sleep(READ_PAUSE)
            n = sock.recv_into(buffer)
        if n == 0:
            break
        try:
            if buffer[0] != _CONTROL:
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
            report("exporter process: a record (dropped)")
    client.close()


if __name__ == "__main__":
    main(int(sys.argv[1]))
