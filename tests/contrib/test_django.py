"""The Django integration. Django can be configured once per process, so the test project's
own tests (tests/contrib/django/) run in a pytest subprocess; here too: the middleware placed
by the user, invalid settings, and `manage.py beatlib check` / `test` against the receiver."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import requests

pytest.importorskip("django")

from tests.contrib.servers import ServerProcess  # noqa: E402
from tests.databases import DatabaseServer  # noqa: E402
from tests.instrumentation.http_server import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MANAGE = ROOT / "tests" / "contrib" / "django" / "manage.py"


def env(**extra: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BEATLIB_")}
    return {**clean, "DJANGO_SETTINGS_MODULE": "tests.contrib.django.settings",
            "PYTHONPATH": str(ROOT), **extra}


def run(args: list[str], **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], env=env(**extra), cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_the_django_project_tests():
    result = run(["-m", "pytest", "tests/contrib/django", "-q", "-p", "no:cacheprovider"],
                 BEATLIBTEST_DJANGO="1")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and " failed" not in result.stdout


def test_async_views_and_the_async_orm_on_postgresql(postgres: DatabaseServer):
    """aget/acount/async for run the sync ORM in Django's thread: on a real PostgreSQL, their
    queries (psycopg) are spans of the request's transaction, ten requests at once too."""
    result = run(["-m", "pytest", "tests/contrib/django/test_async.py", "-q",
                  "-p", "no:cacheprovider", "-k", "async_orm or concurrent"],
                 BEATLIBTEST_DJANGO="1", SHOP_POSTGRES=json.dumps(postgres.login),
                 DJANGO_SETTINGS_MODULE="tests.contrib.django.settings_postgres")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "2 passed" in result.stdout, result.stdout[-3000:]


@pytest.mark.parametrize("application", ["beatlib", "django"])
def test_uvicorn_sigterm_sends_what_is_queued(receiver, tmp_path, application):
    """uvicorn ends on SIGTERM by raising it again, skipping exit hooks, and Django refuses
    lifespan: with Django's own get_asgi_application() what was queued is lost; with
    beatlib's, it is sent at lifespan shutdown (the flush interval here is 120 s)."""
    pytest.importorskip("uvicorn")
    server = ServerProcess(
        ["uvicorn", "tests.contrib.django.asgi:application", "--host", "127.0.0.1",
         "--port", "{port}"], receiver.url, tmp_path / "uvicorn.log",
        {"DJANGO_SETTINGS_MODULE": "tests.contrib.django.settings",
         "SHOP_DB": str(tmp_path / "db.sqlite3"),
         **({"ASGI_PLAIN": "1"} if application == "django" else {})})
    try:
        deadline = time.monotonic() + 30
        while True:
            assert server.proc.poll() is None, server.log.read_text()
            try:
                if requests.get(f"{server.url}/health/", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                assert time.monotonic() < deadline, server.log.read_text()
                time.sleep(0.1)
        for _ in range(20):
            assert requests.get(f"{server.url}/async/wait/?s=0", timeout=10).ok
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=30) == -signal.SIGTERM, server.log.read_text()
    finally:
        server.kill()
    sent = len(receiver.events("transaction"))
    assert sent == (21 if application == "beatlib" else 0), server.log.read_text()


def test_middleware_placed_by_the_user_is_not_inserted_again(receiver, tmp_path):
    code = textwrap.dedent("""
        import django
        from django.conf import settings
        django.setup()
        from django.core.management import call_command
        call_command("migrate", run_syncdb=True, verbosity=0)
        placed = [m for m in settings.MIDDLEWARE if "beatlib" in m]
        assert placed == ["beatlib.contrib.django.TracingMiddleware"], settings.MIDDLEWARE
        assert settings.MIDDLEWARE.index(placed[0]) == 1
        from django.test import Client
        assert Client().get("/archive/2024/").status_code == 200
        from beatlib import get_client
        assert get_client().flush(10)
    """)
    result = run(["-c", code], DJANGO_SETTINGS_MODULE="tests.contrib.django.settings_placed",
                 RECEIVER_URL=receiver.url, SHOP_DB=str(tmp_path / "db.sqlite3"))
    assert result.returncode == 0, result.stderr
    (tx,) = receiver.events("transaction")
    assert tx["name"] == "GET ^archive/(?P<year>[0-9]{4})/$"
    assert receiver.metadata[0]["service"]["framework"]["name"] == "django"


def test_invalid_settings_stop_manage_py_check_but_not_the_site(tmp_path):
    result = run([str(MANAGE), "check"], BEATLIB_TRANSACTION_SAMPLE_RATE="2")
    assert result.returncode == 1
    assert "(beatlib.E001) BEATLIB settings are invalid: transaction_sample_rate" in (
        result.stderr)
    code = textwrap.dedent("""
        import django
        django.setup()
        from django.test import Client
        assert Client().get("/health/").content == b"ok"
    """)
    result = run(["-c", code], BEATLIB_TRANSACTION_SAMPLE_RATE="2",
                 SHOP_DB=str(tmp_path / "db.sqlite3"))
    assert result.returncode == 0, result.stderr
    assert "BEATLIB settings are invalid" in result.stderr  # logged once at startup


def test_manage_py_beatlib_check(receiver):
    result = run([str(MANAGE), "beatlib", "check"], RECEIVER_URL=receiver.url)
    assert result.returncode == 0, result.stderr
    assert "settings OK: service 'shop'" in result.stdout
    assert f"APM server {receiver.url} reachable, version 8.99.0" in result.stdout


def test_manage_py_beatlib_check_fails_when_the_server_is_down():
    url = f"http://127.0.0.1:{free_port()}"
    result = run([str(MANAGE), "beatlib", "check"], RECEIVER_URL=url)
    assert result.returncode == 1
    assert f"APM server: cannot reach {url}/" in result.stderr


def test_manage_py_beatlib_check_reports_invalid_settings():
    result = run([str(MANAGE), "beatlib", "check"], BEATLIB_SERVER_URL="ftp://nowhere")
    assert result.returncode == 1
    assert "BEATLIB settings are invalid: server_url: 'ftp://nowhere' (from " \
           "BEATLIB_SERVER_URL) is not an http(s) URL" in result.stderr


def test_manage_py_beatlib_test_sends_an_error(receiver):
    result = run([str(MANAGE), "beatlib", "test"], RECEIVER_URL=receiver.url)
    assert result.returncode == 0, result.stderr
    (error,) = receiver.events("error")
    assert error["exception"]["type"] == "BeatlibTestError"
    assert f"sent test error {error['id']} to {receiver.url}" in result.stdout
    assert "Services > shop > Errors" in result.stdout
