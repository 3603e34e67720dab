"""A real gunicorn (2 sync workers, with and without --preload) serving a traced app on
127.0.0.1: every transaction arrives once, from the worker that served it, the master sends
nothing and runs no beatlib thread, and SIGTERM (graceful shutdown) flushes what is queued."""

from __future__ import annotations

import json
import re
import signal
import socket
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.contrib.servers import ServerProcess, arrivals, batches_of, served_by, started

pytest.importorskip("gunicorn")

REQUESTS = 500


class Gunicorn(ServerProcess):
    """gunicorn started in a subprocess; `stop()` sends SIGTERM and waits for it to exit."""

    def __init__(self, app: str, receiver_url: str, log: Path, preload: bool,
                 env: dict[str, str] | None = None) -> None:
        self.report_path = log.with_suffix(".json")
        super().__init__(
            ["gunicorn", "--workers", "2", "--worker-class", "sync", "--bind",
             "127.0.0.1:{port}", "--graceful-timeout", "20", "--log-level", "info",
             "--config", "python:tests.contrib.gunicorn_conf",
             *(["--preload"] if preload else []), app],
            receiver_url, log, {"GUNICORN_TEST_REPORT": str(self.report_path), **(env or {})})

    def worker_pids(self) -> set[int]:
        text = self.log.read_text(errors="replace")
        return {int(pid) for pid in re.findall(r"Booting worker with pid: (\d+)", text)}

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Until the port accepts connections and both workers have booted."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"gunicorn exited:\n{self.log.read_text()}"
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                if len(self.worker_pids()) >= 2:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"gunicorn not ready after {timeout}s:\n{self.log.read_text()}")

    def master_report(self) -> dict:
        """What the master wrote at exit (gunicorn_conf.on_exit)."""
        return json.loads(self.report_path.read_text())

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


@pytest.fixture
def gunicorn(receiver, tmp_path):
    with started(lambda n, app, preload, env=None: Gunicorn(
            app, receiver.url, tmp_path / f"gunicorn{n}.log", preload, env)) as start:
        yield start


@pytest.mark.parametrize("app, preload", [
    ("tests.contrib.gunicorn_app:application", False),
    ("tests.contrib.gunicorn_app:application", True),
    ("tests.contrib.gunicorn_app:pyramid_application()", True),
], ids=["wsgi", "wsgi-preload", "pyramid-preload"])
def test_every_transaction_once_from_its_worker(gunicorn, receiver, app, preload):
    batches = batches_of(receiver)
    server = gunicorn(app, preload)
    master, workers = server.proc.pid, server.worker_pids()
    assert len(workers) == 2 and master not in workers

    pids = served_by(server.url, REQUESTS)
    assert set(pids.values()) == workers  # both workers served

    # Nothing sent yet (flush interval 120 s): what arrives below is the shutdown's flush.
    assert receiver.events("transaction") == []

    assert server.stop() == 0
    assert receiver.wait_for("transaction", REQUESTS, timeout=5)
    pids_sent_from, arrived = arrivals(batches, pids)
    assert arrived == Counter(range(REQUESTS))  # every request once
    assert pids_sent_from == workers  # the master sent nothing
    # With --preload the master made the client but never queued anything: no worker thread.
    report = server.master_report()
    assert report["pid"] == master and report["has_client"] is preload
    assert not report["transport_thread"] and "beatlib-transport" not in report["threads"]
    assert len(receiver.events("span")) == (REQUESTS if "pyramid" not in app else 0)


@pytest.mark.skipif(sys.platform != "linux", reason="the exporter process is Linux only")
def test_exporter_process_one_per_worker_none_in_the_master(gunicorn, receiver):
    """exporter_process=true with --preload: the client is made in the master, which never
    records, so it starts no exporter; each worker starts its own at its first request, and
    SIGTERM has each worker's exporter send what it was handed."""
    batches = batches_of(receiver)
    server = gunicorn("tests.contrib.gunicorn_app:application", True,
                      {"BEATLIB_EXPORTER_PROCESS": "true"})
    master, workers = server.proc.pid, server.worker_pids()
    pids = served_by(server.url, REQUESTS)
    assert set(pids.values()) == workers
    assert server.stop() == 0
    assert receiver.wait_for("transaction", REQUESTS, timeout=15)
    pids_sent_from, arrived = arrivals(batches, pids)
    assert arrived == Counter(range(REQUESTS))  # every request once
    assert pids_sent_from == workers  # each batch says the worker it came from
    report = server.master_report()
    assert report["pid"] == master and report["has_client"]
    assert report["transport"] == "ProcessTransport"
    assert not report["transport_thread"]  # worker: the exporter process, never started
    assert len(receiver.events("span")) == REQUESTS
