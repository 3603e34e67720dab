"""The FastAPI test app under real ASGI servers on 127.0.0.1: uvicorn (one process and
`--workers 2`), hypercorn, and gunicorn with uvicorn workers. Every transaction arrives once,
from the process that served it (a supervisor sends nothing); SIGTERM flushes what is
queued; a client leaving mid-stream is recorded as such; a websocket is one transaction."""

from __future__ import annotations

import re
import signal
import socket
import time
from collections import Counter
from pathlib import Path

import pytest
import requests

from tests.contrib.servers import ServerProcess, arrivals, batches_of, served_by, started

pytest.importorskip("uvicorn")

APP = "tests.contrib.fastapi_app:application"
REQUESTS = 200


class Server(ServerProcess):
    """An ASGI server in a subprocess serving the test app; `stop()` sends SIGTERM."""

    def __init__(self, args: list[str], receiver_url: str, log: Path, workers: int,
                 settings: dict[str, str]) -> None:
        super().__init__(args, receiver_url, log, {"ASGI_TEST_APP": "1", **settings})
        self.workers = workers

    def started_pids(self) -> set[int]:
        """The pids that logged serving (uvicorn's 'Started server process [pid]',
        gunicorn's 'Booting worker with pid: pid')."""
        text = self.log.read_text(errors="replace")
        found = re.findall(r"Started server process \[(\d+)\]|Booting worker with pid: (\d+)",
                           text)
        return {int(a or b) for a, b in found}

    def all_workers_up(self) -> bool:
        """Every worker forked and through its app's startup: a worker that is still
        importing would leave all the requests to the first (seen under load)."""
        text = self.log.read_text(errors="replace")
        return (len(self.started_pids()) >= self.workers
                and text.count("Application startup complete") >= self.workers)

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited:\n{self.log.read_text()}"
            try:
                response = requests.get(self.url + "/health", timeout=1)
                if response.status_code == 404 and self.all_workers_up():
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise AssertionError(f"server not ready after {timeout}s:\n{self.log.read_text()}")

    def stop(self) -> None:
        """SIGTERM, and the server's graceful exit: 0, or (uvicorn, once shut down) the
        signal raised again, which skips the interpreter's exit hooks."""
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(timeout=30) in (0, -signal.SIGTERM), self.log.read_text()


SERVERS = {
    "uvicorn": (["uvicorn", APP, "--host", "127.0.0.1", "--port", "{port}"], 1),
    "uvicorn-workers": (["uvicorn", APP, "--host", "127.0.0.1", "--port", "{port}",
                         "--workers", "2"], 2),
    "hypercorn": (["hypercorn", APP, "--bind", "127.0.0.1:{port}"], 0),
    "gunicorn-uvicorn": (["gunicorn", APP, "--workers", "2", "--worker-class",
                          "uvicorn_worker.UvicornWorker", "--bind", "127.0.0.1:{port}",
                          "--graceful-timeout", "20"], 2),
}


@pytest.fixture
def serve(receiver, tmp_path):
    """`serve(name)`: the test app under that server, ready (it ignores /health)."""
    def make(n: int, name: str) -> Server:
        args, workers = SERVERS[name]
        return Server(args, receiver.url, tmp_path / f"{name}{n}.log", workers,
                      {"BEATLIB_TRANSACTION_IGNORE_URLS": "/health"})

    with started(make) as start:
        yield start


@pytest.mark.parametrize("name", list(SERVERS))
def test_every_transaction_once_from_the_process_that_served_it(serve, receiver, name):
    batches = batches_of(receiver)
    server = serve(name)

    pids = served_by(server.url, REQUESTS)
    workers = set(pids.values())
    if SERVERS[name][1] == 2:
        assert len(workers) == 2 and server.proc.pid not in workers
    assert receiver.events("transaction") == []  # flush interval 120 s: nothing sent yet

    server.stop()
    assert receiver.wait_for("transaction", REQUESTS, timeout=10)
    pids_sent_from, arrived = arrivals(batches, pids)
    assert {t["name"] for t in receiver.events("transaction")} == {"GET /work/{n}"}
    assert arrived == Counter(range(REQUESTS))  # every request once
    assert pids_sent_from == workers  # the supervisor (if any) sent nothing
    assert len(receiver.events("span")) == REQUESTS


@pytest.mark.parametrize("name", ["uvicorn", "hypercorn"])
def test_traces_errors_streams_and_background_tasks_under_a_real_server(serve, receiver, name):
    server = serve(name)
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    response = requests.get(server.url + "/api/items/5?q=a", headers={"traceparent": parent})
    assert response.json() == {"id": 5, "q": "a"}
    assert requests.get(server.url + "/boom").status_code == 500
    assert requests.get(server.url + "/out-of-stock").status_code == 409
    started = time.monotonic()
    assert requests.get(server.url + "/stream").text.count("data:") == 3
    assert time.monotonic() - started >= 0.15
    assert requests.get(server.url + "/background").json() == {"queued": 2}
    server.stop()
    assert receiver.wait_for("transaction", 7, timeout=10)
    txs = {t["name"]: t for t in receiver.events("transaction")}
    item = txs["GET /api/items/{item_id}"]
    assert item["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    assert item["context"]["request"]["socket"]["remote_address"] == "127.0.0.1"
    assert item["context"]["request"]["url"]["port"] == server.port
    assert txs["GET /boom"]["outcome"] == "failure"
    assert txs["GET /stream"]["duration"] >= 150
    errors = sorted(e["exception"]["type"] for e in receiver.events("error"))
    assert errors == ["KeyError", "OutOfStock"]
    tasks = [t for t in txs.values() if t["type"] == "task"]
    assert len(tasks) == 2
    assert {t["parent_id"] for t in tasks} == {txs["GET /background"]["id"]}


def test_a_client_leaving_mid_stream_is_a_disconnection(serve, receiver):
    server = serve("uvicorn")
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"GET /slow-stream HTTP/1.1\r\nHost: t\r\n\r\n")
        assert sock.recv(1024).startswith(b"HTTP/1.1 200")
    time.sleep(0.5)  # the stream notices on its next chunk
    server.stop()
    assert receiver.wait_for("transaction", 1, timeout=10)
    (tx,) = receiver.events("transaction")
    assert tx["name"] == "GET /slow-stream"
    assert tx["context"]["tags"]["client_disconnected"] is True
    assert tx["outcome"] == "unknown" and tx["context"]["response"]["finished"] is False
    assert tx["duration"] < 2000  # not the 2.5 s the whole stream would have taken
    assert receiver.events("error") == []


def test_a_websocket_connection_under_uvicorn(serve, receiver, monkeypatch):
    from websockets.sync.client import connect

    monkeypatch.setenv("ASGI_TEST_WEBSOCKETS", "1")
    server = serve("uvicorn")
    with connect(f"ws://127.0.0.1:{server.port}/ws/lobby") as ws:
        for text in ("a", "b"):
            ws.send(text)
            assert ws.recv() == f"lobby: {text}"
        ws.send("bye")
    server.stop()
    assert receiver.wait_for("transaction", 1, timeout=10)
    (tx,) = receiver.events("transaction")
    assert tx["type"] == "websocket" and tx["name"] == "WEBSOCKET /ws/{room}"
    assert tx["context"]["response"]["status_code"] == 101
    assert tx["context"]["tags"]["websocket_close_code"] == 1000
    spans = receiver.events("span")
    assert [s["name"] for s in spans] == ["handle message"] * 2
    assert {s["transaction_id"] for s in spans} == {tx["id"]}
