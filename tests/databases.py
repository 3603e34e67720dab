"""Real database servers for tests: `postgres` and `mariadb`, started once per session.

Each fixture finds Debian's server binaries (installed by .ci/run), creates a data directory
under pytest's temporary directory, starts the server on 127.0.0.1 and a free port (as
`nobody` when we are root, since both servers refuse to run as root), creates a user and a
database, and stops the server at the end. Tests are skipped only when the binaries are absent.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

USER = "beatlib"
PASSWORD = "beatlib-secret"
DBNAME = "beatlib"
READY_TIMEOUT = 60.0


@dataclass(frozen=True)
class DatabaseServer:
    """Where a running test server listens and how to log in; `startup` is seconds to ready."""

    host: str
    port: int
    user: str
    password: str
    dbname: str
    startup: float

    @property
    def login(self) -> dict[str, Any]:
        """host, port, user, password, dbname (psycopg's and psycopg2's keyword names)."""
        return {"host": self.host, "port": self.port, "user": self.user,
                "password": self.password, "dbname": self.dbname}

    def url(self, scheme: str) -> str:
        """A SQLAlchemy-style URL, e.g. `url("postgresql+psycopg")`."""
        return f"{scheme}://{self.user}:{self.password}@{self.host}:{self.port}/{self.dbname}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_as() -> dict[str, Any]:
    """Popen arguments that drop root to `nobody` (the servers refuse root)."""
    if os.geteuid() != 0:
        return {}
    return {"user": "nobody", "group": "nogroup", "extra_groups": []}


@contextlib.contextmanager
def _data_dir(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[Path]:
    """A fresh directory the server user owns. As root, it is made in the system temporary
    directory for `nobody`: pytest's own directory must stay root-only (each new pytest
    session resets its mode, which would cut off a server another session is running)."""
    if os.geteuid() != 0:
        yield tmp_path_factory.mktemp(name)
        return
    path = Path(tempfile.mkdtemp(prefix=f"beatlib-{name}-"))
    try:
        shutil.chown(path, "nobody", "nogroup")
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _run(args: list[Any], **kwargs: Any) -> None:
    """Run a setup command; its output goes into the failure message."""
    result = subprocess.run(args, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        pytest.fail(f"{args[0]} failed ({result.returncode}):\n{result.stdout}{result.stderr}")


def _stop(proc: subprocess.Popen[bytes], sig: int) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait(proc: subprocess.Popen[bytes], ready: Any, log: Path, what: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc, signal.SIGKILL)
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            pytest.fail(f"{what} did not start (exit {proc.returncode}):\n{tail}")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DatabaseServer]:
    """A PostgreSQL server from Debian's `postgresql` package, with user and database."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version)
    if not found:
        pytest.skip("PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin/initdb): "
                    "install Debian's postgresql package (.ci/run does)")
    bindir = Path(found[-1]).parent
    with _data_dir(tmp_path_factory, "postgres") as home:
        yield from _postgres(bindir, home)


def _postgres(bindir: Path, home: Path) -> Iterator[DatabaseServer]:
    started = time.monotonic()
    data, log, pwfile = home / "data", home / "server.log", home / "password"
    pwfile.write_text(PASSWORD)
    os.chmod(pwfile, 0o644)
    _run([bindir / "initdb", "-D", data, "-U", USER, f"--pwfile={pwfile}", "-A",
          "scram-sha-256", "-E", "UTF8", "--no-locale", "--no-sync"], **_run_as())
    port = _free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [bindir / "postgres", "-D", data, "-h", "127.0.0.1", "-p", str(port), "-k", "",
             "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
             "-c", "shared_buffers=16MB", "-c", "max_connections=30"],
            stdout=out, stderr=subprocess.STDOUT, **_run_as(),
        )
    env = dict(os.environ, PGPASSWORD=PASSWORD)
    isready = [bindir / "pg_isready", "-q", "-h", "127.0.0.1", "-p", str(port), "-U", USER]
    try:
        _wait(proc, lambda: subprocess.run(isready, env=env).returncode == 0, log, "PostgreSQL")
        _run([bindir / "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", USER, DBNAME],
             env=env)
        yield DatabaseServer("127.0.0.1", port, USER, PASSWORD, DBNAME,
                             time.monotonic() - started)
    finally:
        _stop(proc, signal.SIGINT)  # "fast" shutdown: ends sessions, no waiting on clients


def _version(path: str) -> tuple[int, ...]:
    return tuple(int(p) for p in Path(path).parent.parent.name.split(".") if p.isdigit())


def _which(*names: str) -> str | None:
    for name in names:
        found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
        if found:
            return found
    return None


def _greets(port: int) -> bool:
    """The MySQL protocol starts with the server's handshake: bytes back means it is up."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            return len(s.recv(4)) > 0
    except OSError:
        return False


@pytest.fixture(scope="session")
def mariadb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DatabaseServer]:
    """A MariaDB server from Debian's `mariadb-server` package, with user and database."""
    server = _which("mariadbd", "mysqld")
    install = _which("mariadb-install-db", "mysql_install_db")
    if server is None or install is None:
        pytest.skip("MariaDB server binaries not found (mariadbd, mariadb-install-db): "
                    "install Debian's mariadb-server package (.ci/run does)")
    with _data_dir(tmp_path_factory, "mariadb") as home:
        yield from _mariadb(server, install, home)


def _mariadb(server: str, install: str, home: Path) -> Iterator[DatabaseServer]:
    started = time.monotonic()
    data, log, init = home / "data", home / "server.log", home / "init.sql"
    # Run once at startup, before connections are accepted: the test user and database.
    init.write_text(
        f"CREATE DATABASE IF NOT EXISTS {DBNAME};\n"
        f"CREATE USER IF NOT EXISTS '{USER}'@'%' IDENTIFIED BY '{PASSWORD}';\n"
        f"GRANT ALL ON *.* TO '{USER}'@'%';\n"
    )
    os.chmod(init, 0o644)
    user = ["--user=nobody"] if os.geteuid() == 0 else []
    _run([install, "--no-defaults", f"--datadir={data}", "--skip-test-db",
          "--auth-root-authentication-method=normal", *user])
    port = _free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [server, "--no-defaults", f"--datadir={data}", "--bind-address=127.0.0.1",
             f"--port={port}", f"--socket={home / 'mysqld.sock'}", f"--init-file={init}",
             f"--pid-file={home / 'mysqld.pid'}", "--skip-name-resolve", "--skip-log-bin",
             "--innodb-buffer-pool-size=16M", "--innodb-flush-log-at-trx-commit=0"],
            stdout=out, stderr=subprocess.STDOUT, **_run_as(),
        )
    try:
        _wait(proc, lambda: _greets(port), log, "MariaDB")
        yield DatabaseServer("127.0.0.1", port, USER, PASSWORD, DBNAME,
                             time.monotonic() - started)
    finally:
        _stop(proc, signal.SIGTERM)


def run_instrumented(code: str, receiver_url: str, server: DatabaseServer | None = None) -> None:
    """Run `code` in a fresh interpreter right after `beatlib.instrument()`, with `client` (an
    instrumented Client sending to `receiver_url`) and `db` (the server's login as a dict, or
    {}) defined; it must exit 0. Shows that instrumenting before a driver's import works."""
    prelude = textwrap.dedent("""
        import json, os, sys
        import beatlib
        client = beatlib.Client(service_name="before-import", server_url=os.environ[
            "RECEIVER_URL"], flush_interval="100ms", environ={})
        beatlib.instrument(client.config)
        db = json.loads(os.environ["DATABASE"])
    """)
    login = {} if server is None else server.login
    env = {**os.environ, "RECEIVER_URL": receiver_url, "DATABASE": json.dumps(login)}
    code = prelude + textwrap.dedent(code) + "\nassert client.flush(10)\nclient.close(5)\n"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
