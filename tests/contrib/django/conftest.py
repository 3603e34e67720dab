"""Django can be configured once per process: these tests run in their own pytest process,
started by tests/contrib/test_django.py with BEATLIBTEST_DJANGO=1 (run them directly with
`BEATLIBTEST_DJANGO=1 pytest tests/contrib/django`). Elsewhere this folder is not collected.

The process gets one receiver and one upstream HTTP server, then Django set up with the test
project's settings (DJANGO_SETTINGS_MODULE may name a variant) on a fresh SQLite file."""

from __future__ import annotations

import os
import tempfile

import pytest

if not os.environ.get("BEATLIBTEST_DJANGO"):
    collect_ignore_glob = ["test_*.py"]
else:
    from tests.instrumentation.http_server import HTTPServer
    from tests.receiver import Receiver

    RECEIVER = Receiver().start()
    UPSTREAM = HTTPServer()
    os.environ["RECEIVER_URL"] = RECEIVER.url
    os.environ["UPSTREAM_URL"] = UPSTREAM.url("/ok")
    os.environ["SHOP_DB"] = os.path.join(tempfile.mkdtemp(prefix="beatlib-shop-"), "db.sqlite3")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.contrib.django.settings")

    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", run_syncdb=True, verbosity=0)


class Beat:
    """The Django app's client and what it shipped."""

    def __init__(self) -> None:
        from beatlib.contrib.django.apps import app_client

        self.client = app_client()
        self.receiver = RECEIVER

    def shipped(self) -> tuple[list[dict], list[dict], list[dict]]:
        """(transactions, spans in start order, errors) after a flush; all schema-valid."""
        assert self.client.flush(10)
        spans = sorted(self.receiver.events("span"), key=lambda s: s["timestamp"])
        return self.receiver.events("transaction"), spans, self.receiver.events("error")

    def transaction(self) -> dict:
        (tx,) = self.shipped()[0]
        return tx


@pytest.fixture
def beat():
    from beatlib import context

    RECEIVER.clear()
    yield Beat()
    context.set_active(None)
    assert not RECEIVER.invalid, f"invalid intake lines: {RECEIVER.invalid[:3]}"


@pytest.fixture
def shop_data():
    """A post and a user (created once; the database lives as long as the process)."""
    from django.contrib.auth.models import User

    from tests.contrib.django.shop.models import Post

    post = Post.objects.first() or Post.objects.create(
        title="Gears", body="All about gears", published="2024-05-01")
    user = User.objects.filter(username="ann").first() or User.objects.create_user(
        "ann", "ann@example.com", "hunter2")
    return post, user
