"""A real message broker for tests: `rabbitmq`, Debian's `rabbitmq-server`, started once per
session (it takes about 10 s to boot).

The node gets its own name, ports (AMQP, Erlang distribution, and its own epmd), data and log
directories and Erlang cookie (in a temporary HOME), no plugins, and listens on 127.0.0.1
only; it is stopped, and its epmd with it, at the end. Skipped when the server is absent.
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

from tests.databases import _free_port, _stop, _wait

SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"  # the package's own; /usr/sbin's su's first
USER = "beatlib"
PASSWORD = "beatlib-secret"


@dataclass(frozen=True)
class Broker:
    """Where the test broker listens and how to log in; `startup` is seconds to ready."""

    host: str
    port: int
    user: str
    password: str
    startup: float

    @property
    def url(self) -> str:
        return f"amqp://{self.user}:{self.password}@{self.host}:{self.port}//"


def _accepts(port: int) -> bool:
    """AMQP starts with the client's header: the server accepting a connection means it is up
    (the listener opens once the broker has booted)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def available() -> bool:
    return os.access(SERVER, os.X_OK) and shutil.which("erl") is not None


@pytest.fixture(scope="session")
def rabbitmq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A RabbitMQ node from Debian's `rabbitmq-server` package, with a user of its own."""
    if not available():
        pytest.skip(f"RabbitMQ server not found ({SERVER}): install Debian's rabbitmq-server "
                    "package (.ci/run does)")
    with running_rabbitmq(tmp_path_factory.mktemp("rabbitmq")) as broker:
        yield broker


@contextlib.contextmanager
def running_rabbitmq(home: Path) -> Iterator[Broker]:
    """The node in `home`, stopped on exit. Also what benchmarks/wrapper_cost.py times pika
    against."""
    started = time.monotonic()
    port, dist_port, epmd_port = _free_port(), _free_port(), _free_port()
    (home / "home").mkdir()
    cookie = home / "home" / ".erlang.cookie"
    cookie.write_text(f"beatlib-test-{os.getpid()}-{port}")
    cookie.chmod(0o400)
    config = home / "rabbitmq.conf"
    config.write_text(
        f"listeners.tcp.1 = 127.0.0.1:{port}\n"
        f"default_user = {USER}\ndefault_pass = {PASSWORD}\n"
        "loopback_users = none\n"
        "log.console = true\nlog.console.level = warning\n"
    )
    plugins = home / "enabled_plugins"
    plugins.write_text("[].\n")  # no management plugin (nor any other)
    env = {
        **os.environ,
        "HOME": str(home / "home"),
        "RABBITMQ_NODENAME": f"beatlib-test-{os.getpid()}-{port}@localhost",
        "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
        "RABBITMQ_NODE_PORT": str(port),
        "RABBITMQ_DIST_PORT": str(dist_port),
        "ERL_EPMD_PORT": str(epmd_port),
        "ERL_EPMD_ADDRESS": "127.0.0.1",
        "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        "RABBITMQ_MNESIA_BASE": str(home / "mnesia"),
        "RABBITMQ_LOG_BASE": str(home / "log"),
        "RABBITMQ_CONFIG_FILE": str(config),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(plugins),
        "RABBITMQ_CONF_ENV_FILE": os.devnull,  # not the system's rabbitmq-env.conf
    }
    log = home / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([SERVER], env=env, cwd=home, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        _wait(proc, lambda: _accepts(port), log, "RabbitMQ")
        yield Broker("127.0.0.1", port, USER, PASSWORD, time.monotonic() - started)
    finally:
        _stop(proc, signal.SIGTERM)  # a clean stop
        epmd = shutil.which("epmd")
        if epmd is not None:  # the node started an epmd of its own on epmd_port: stop it
            subprocess.run([epmd, "-port", str(epmd_port), "-kill"], env=env,
                           capture_output=True, timeout=30)

