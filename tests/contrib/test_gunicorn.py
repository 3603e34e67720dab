"""A real gunicorn (2 sync workers, with and without --preload) serving a traced app on
127.0.0.1: every transaction arrives once, from the worker that served it, the master sends
nothing and runs no beatlib thread, and SIGTERM (graceful shutdown) flushes what is queued."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

pytest.importorskip("gunicorn")

ROOT = Path(__file__).resolve().parents[2]
REQUESTS = 500


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Gunicorn:
    """gunicorn started in a subprocess; `stop()` sends SIGTERM and waits for it to exit."""

    def __init__(self, app: str, receiver_url: str, log: Path, preload: bool) -> None:
        self.port = free_port()
        self.log = log
        self.report_path = log.with_suffix(".json")
        env = {key: value for key, value in os.environ.items() if not key.startswith("BEATLIB_")}
        env.update(
            BEATLIB_SERVER_URL=receiver_url,
            # Nothing is sent on the flush tick during the test: whatever arrives was sent
            # at shutdown.
            BEATLIB_FLUSH_INTERVAL="120s",
            PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
            GUNICORN_TEST_REPORT=str(self.report_path),
        )
        cmd = [sys.executable, "-m", "gunicorn", "--workers", "2", "--worker-class", "sync",
               "--bind", f"127.0.0.1:{self.port}", "--graceful-timeout", "20",
               "--log-level", "info", "--config", "python:tests.contrib.gunicorn_conf",
               *(["--preload"] if preload else []), app]
        self._log_file = log.open("wb")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._log_file,
                                     stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

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

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log_file.close()


@pytest.fixture
def gunicorn(receiver, tmp_path):
    started: list[Gunicorn] = []

    def start(app: str, preload: bool) -> Gunicorn:
        server = Gunicorn(app, receiver.url, tmp_path / f"gunicorn{len(started)}.log", preload)
        started.append(server)
        server.wait_ready()
        return server

    yield start
    for server in started:
        server.kill()


def batches_of(receiver) -> list[list[tuple[str, dict]]]:
    """Record each intake request's lines together, so events can be matched to the
    metadata (and so the pid) of the request that carried them."""
    batches: list[list[tuple[str, dict]]] = []
    record = receiver._record

    def keep(request, lines, invalid):
        batches.append(lines)
        record(request, lines, invalid)

    receiver._record = keep
    return batches


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

    def get(n: int) -> int:
        response = requests.get(f"{server.url}/work/{n}", timeout=10)
        assert response.status_code == 200
        return int(response.headers["X-Pid"])

    with ThreadPoolExecutor(4) as pool:
        served_by = dict(enumerate(pool.map(get, range(REQUESTS))))
    assert set(served_by.values()) == workers  # both workers served

    # Nothing sent yet (flush interval 120 s): what arrives below is the shutdown's flush.
    assert receiver.events("transaction") == []

    assert server.stop() == 0
    assert receiver.wait_for("transaction", REQUESTS, timeout=5)
    pids_sent_from: set[int] = set()
    arrived: Counter[int] = Counter()
    for lines in batches:
        kind, metadata = lines[0]
        assert kind == "metadata"
        pid = metadata["process"]["pid"]
        pids_sent_from.add(pid)
        for kind, event in lines[1:]:
            if kind == "transaction":
                n = int(event["context"]["tags"]["request"])
                arrived[n] += 1
                assert served_by[n] == pid == event["context"]["tags"]["pid"]
    assert arrived == Counter(range(REQUESTS))  # every request once
    assert pids_sent_from == workers  # the master sent nothing
    # With --preload the master made the client but never queued anything: no worker thread.
    report = server.master_report()
    assert report["pid"] == master and report["has_client"] is preload
    assert not report["transport_thread"] and "beatlib-transport" not in report["threads"]
    assert len(receiver.events("span")) == (REQUESTS if "pyramid" not in app else 0)
