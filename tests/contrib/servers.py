"""Web servers run in a subprocess for the server tests, on 127.0.0.1, sending to the test
receiver; and what their processes sent, batch by batch."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m <args>` ("{port}" in them replaced by a free port) with beatlib sending to
    `receiver_url` and nothing on the flush tick (whatever arrives was sent at shutdown)."""

    def __init__(self, args: list[str], receiver_url: str, log: Path,
                 env_extra: dict[str, str]) -> None:
        self.port = free_port()
        self.log = log
        env = {key: value for key, value in os.environ.items() if not key.startswith("BEATLIB_")}
        env.update(
            BEATLIB_SERVER_URL=receiver_url,
            BEATLIB_FLUSH_INTERVAL="120s",
            PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
            **env_extra,
        )
        cmd = [sys.executable, "-m", *[a.replace("{port}", str(self.port)) for a in args]]
        self._log_file = log.open("wb")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._log_file,
                                     stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log_file.close()


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


def arrivals(batches, served_by: dict[int, int]) -> tuple[set[int], Counter[int]]:
    """The pids that sent (from each batch's metadata), and how often each request's
    transaction (its `request` label) arrived; each came from the pid that served it."""
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
    return pids_sent_from, arrived


def served_by(url: str, count: int) -> dict[int, int]:
    """GET /work/<n> for n below `count`, four at a time: which pid (X-Pid) served each."""
    def get(n: int) -> int:
        response = requests.get(f"{url}/work/{n}", timeout=10)
        assert response.status_code == 200
        return int(response.headers["X-Pid"])

    with ThreadPoolExecutor(4) as pool:
        return dict(enumerate(pool.map(get, range(count))))


@contextlib.contextmanager
def started(make: Callable[..., Any]) -> Iterator[Callable[..., Any]]:
    """A fixture's `start(...)`: `make(n, ...)` builds the n-th server of the test, started
    here and waited for; every one is killed at the end."""
    servers: list[Any] = []

    def start(*args: Any, **kwargs: Any) -> Any:
        server = make(len(servers), *args, **kwargs)
        servers.append(server)
        server.wait_ready()
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.kill()
