"""Real cache servers for tests: `redis_server` (Debian's `redis-server`, no persistence, in
a temporary directory) and `memcached` (Debian's `memcached`), started once per session on
127.0.0.1 and a free port, stopped at the end. Tests are skipped only when the binary is absent
(.ci/run installs both).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.databases import READY_TIMEOUT, _free_port, _stop


@dataclass(frozen=True)
class CacheServer:
    host: str
    port: int
    unix_socket: str | None = None


def _answers(port: int, probe: bytes, reply: bytes) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(probe)
            return s.recv(64).startswith(reply)
    except OSError:
        return False


class ServerFailed(Exception):
    """A server exited or did not answer in time; the message ends with its log."""


@contextlib.contextmanager
def running_redis(binary: str, home: Path) -> Iterator[CacheServer]:
    """A redis-server with no RDB snapshots or AOF, in `home`, on 127.0.0.1 and a free port
    (and a Unix socket), stopped on exit. Also what tests/libsuites/run.py runs redis-py's
    own suite against, which has no pytest fixture to use: hence ServerFailed."""
    port = _free_port()
    log = home / "server.log"
    proc = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(home),
         "--save", "", "--appendonly", "no", "--daemonize", "no", "--logfile", str(log),
         "--protected-mode", "no", "--unixsocket", str(home / "redis.sock")],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while not _answers(port, b"PING\r\n", b"+PONG"):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
                raise ServerFailed(f"redis-server did not start (exit {proc.poll()}):\n{tail}")
            time.sleep(0.05)
        yield CacheServer("127.0.0.1", port, str(home / "redis.sock"))
    finally:
        _stop(proc, signal.SIGTERM)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CacheServer]:
    """A redis-server with no RDB snapshots or AOF, in its own directory."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server not found: install Debian's redis-server package "
                    "(.ci/run does)")
    try:
        server = running_redis(binary, tmp_path_factory.mktemp("redis"))
        with server as running:
            yield running
    except ServerFailed as exc:
        pytest.fail(str(exc))


@contextlib.contextmanager
def running_memcached(binary: str) -> Iterator[CacheServer]:
    """A memcached on TCP only (no UDP), 64 MB, as `nobody` when we are root (it refuses
    root), on 127.0.0.1 and a free port, stopped on exit. Also what
    benchmarks/wrapper_cost.py times pymemcache against: hence ServerFailed."""
    port = _free_port()
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    proc = subprocess.Popen([binary, "-l", "127.0.0.1", "-p", str(port), "-U", "0", "-m", "64",
                             *user], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while not _answers(port, b"version\r\n", b"VERSION"):
            if proc.poll() is not None or time.monotonic() > deadline:
                _stop(proc, signal.SIGKILL)
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise ServerFailed(f"memcached did not start (exit {proc.poll()}):\n{err}")
            time.sleep(0.05)
        yield CacheServer("127.0.0.1", port)
    finally:
        _stop(proc, signal.SIGTERM)


@pytest.fixture(scope="session")
def memcached() -> Iterator[CacheServer]:
    """A memcached on TCP only, see running_memcached."""
    binary = shutil.which("memcached")
    if binary is None:
        pytest.skip("memcached not found: install Debian's memcached package (.ci/run does)")
    try:
        with running_memcached(binary) as running:
            yield running
    except ServerFailed as exc:
        pytest.fail(str(exc))
