"""release.py against real git repositories made in the test: revision, branch, commits since a
release, blame of one line (cached, time-limited), and an error at a receiver assigned to the
author of its culprit line."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

import beatlib
from beatlib import release

if shutil.which("git") is None:
    pytest.skip("git is not installed", allow_module_level=True)

ADA = ("Ada Lovelace", "ada@example.com")
BOB = ("Bob Builder", "bob@example.com")

ORDERS_V1 = '''def total(items):
    return sum(items)


def charge(order):
    raise NotImplementedError("charging")
'''
# Bob rewrites charge(): line 6 (the raise) is his.
ORDERS_V2 = ORDERS_V1.replace('raise NotImplementedError("charging")',
                              'raise ValueError("card declined: %s" % order)')


def git(repo: Path, *args: str, author: tuple[str, str] = ADA) -> str:
    env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull,
           "GIT_AUTHOR_DATE": "2024-03-01T12:00:00+01:00",
           "GIT_COMMITTER_DATE": "2024-03-01T12:00:00+01:00"}
    who = ["-c", f"user.name={author[0]}", "-c", f"user.email={author[1]}"]
    done = subprocess.run(["git", *who, *args], cwd=repo, env=env, check=True,
                          capture_output=True, text=True)
    return done.stdout.strip()


def make_repo(path: Path) -> Path:
    """A repository: Ada writes shopapp/orders.py and tags v1.0; Bob changes line 6 and adds a
    README. Branch main, clean working tree."""
    path.mkdir(parents=True, exist_ok=True)
    git(path, "init", "-q", "-b", "main")
    (path / "shopapp").mkdir()
    (path / "shopapp" / "__init__.py").write_text("")
    (path / "shopapp" / "orders.py").write_text(ORDERS_V1)
    git(path, "add", ".")
    git(path, "commit", "-q", "-m", "Orders: totals and charging")
    git(path, "tag", "v1.0")
    (path / "shopapp" / "orders.py").write_text(ORDERS_V2)
    git(path, "commit", "-q", "-am", "Charging says why it failed", author=BOB)
    (path / "README").write_text("shop\n")
    git(path, "add", "README")
    git(path, "commit", "-q", "-m", "README", author=BOB)
    return path


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return make_repo(tmp_path / "shop")


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder that is in no repository (tmp_path is outside /work/main)."""
    folder = tmp_path / "plain"
    folder.mkdir()
    (folder / "mod.py").write_text("x = 1\n")
    return folder


def test_revision_branch_and_dirty(repo):
    short = git(repo, "rev-parse", "--short", "HEAD")
    assert release.detect_revision(str(repo)) == f"v1.0-2-g{short}"
    assert release.current_branch(str(repo)) == "main"
    (repo / "README").write_text("changed\n")
    assert release.detect_revision(str(repo)) == f"v1.0-2-g{short}-dirty"
    git(repo, "checkout", "-q", "--detach")
    assert release.current_branch(str(repo)) is None


def test_commits_since_a_release(repo):
    commits = release.commits_since("v1.0", str(repo))
    assert [(c.author, c.subject) for c in commits] == [
        (BOB[0], "README"), (BOB[0], "Charging says why it failed")]
    assert commits[0].commit == git(repo, "rev-parse", "--short", "HEAD")
    assert len(release.commits_since(None, str(repo))) == 3
    assert release.previous_tag(str(repo)) == "v1.0"


def test_release_record(repo):
    record = release.record_release("shop", path=str(repo), environment="prod")
    body = record.to_json()
    assert set(body) == {"service", "version", "branch", "commit", "previous", "commits",
                         "deployed_at"}
    assert body["service"] == {"name": "shop", "environment": "prod"}
    assert body["version"].startswith("v1.0-2-g") and body["branch"] == "main"
    assert body["commit"] == git(repo, "rev-parse", "HEAD") and body["previous"] == "v1.0"
    assert body["commits"][1] == {"commit": body["commits"][1]["commit"], "author": BOB[0],
                                  "subject": "Charging says why it failed"}
    assert datetime.fromisoformat(body["deployed_at"]).tzinfo is not None
    note = record.annotation()
    assert note["service"] == {"version": body["version"], "environment": "prod"}
    assert note["@timestamp"] == body["deployed_at"] and "2 commits" in note["message"]
    # An explicit version and previous release win over git's.
    record = release.record_release("shop", "2.0", "HEAD~1", path=str(repo))
    assert record.version == "2.0" and [c.subject for c in record.commits] == ["README"]


def test_blame_names_the_author_of_each_line(repo):
    orders = str(repo / "shopapp" / "orders.py")
    ada, bob = release.blame(orders, 2), release.blame(orders, 6)
    assert ada is not None and bob is not None
    assert (ada.name, ada.email) == ADA and (bob.name, bob.email) == BOB
    assert bob.commit == git(repo, "rev-parse", "HEAD~1")
    assert bob.date == "2024-03-01T12:00:00+01:00"
    assert release.blame(orders, 999) is None  # no such line


def test_blame_of_an_uncommitted_line_is_nobody(repo):
    orders = repo / "shopapp" / "orders.py"
    orders.write_text(orders.read_text() + "\n\ndef refund(order):\n    pass\n")
    assert release.blame(str(orders), 10) is None


def test_blame_is_cached_per_line_and_revision(repo, monkeypatch):
    orders = str(repo / "shopapp" / "orders.py")
    calls: list[list[str]] = []
    run = subprocess.run

    def counting(args, *a, **k):
        calls.append(args)
        return run(args, *a, **k)

    monkeypatch.setattr(subprocess, "run", counting)
    start = time.perf_counter()
    first = release.blame(orders, 1)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(1000):
        assert release.blame(orders, 1) == first
    warm = (time.perf_counter() - start) / 1000
    assert sum(1 for c in calls if "blame" in c) == 1
    assert warm < 0.001, warm
    print(f"blame: first {cold * 1000:.1f} ms, cached {warm * 1e6:.1f} µs")
    # A new commit moves HEAD: once the revision is asked again, the line is blamed again.
    (repo / "shopapp" / "orders.py").write_text("# header\n" + ORDERS_V2)
    git(repo, "commit", "-q", "-am", "header", author=BOB)
    monkeypatch.setattr(release, "_heads", {})
    assert release.blame(orders, 1).name == BOB[0]


def test_outside_a_repository_everything_is_none_and_quiet(outside, capfd):
    assert release.detect_revision(str(outside)) is None
    assert release.current_branch(str(outside)) is None
    assert release.commits_since(None, str(outside)) == []
    assert release.blame(str(outside / "mod.py"), 1) is None
    with pytest.raises(ValueError, match="--version"):
        release.record_release("shop", path=str(outside))
    record = release.record_release("shop", "1.0", path=str(outside))
    assert (record.branch, record.commit, record.commits) == (None, None, [])
    assert capfd.readouterr() == ("", "")  # git's complaints are swallowed


def test_without_git_everything_is_none(repo, monkeypatch):
    monkeypatch.setenv("PATH", "")
    monkeypatch.setattr(release, "_heads", {})
    assert release.detect_revision(str(repo)) is None
    assert release.blame(str(repo / "shopapp" / "orders.py"), 2) is None


def test_blame_timeout_is_honoured(repo):
    orders = str(repo / "shopapp" / "orders.py")
    start = time.perf_counter()
    assert release.blame(orders, 5, timeout=0.000001) is None
    assert time.perf_counter() - start < 1.0


def _import_from(repo: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, repo / "shopapp" / "orders.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("assign", [True, False])
def test_error_is_assigned_to_the_author_of_its_culprit_line(repo, receiver, assign):
    orders = _import_from(repo, f"shopapp_orders_{assign}")
    client = beatlib.Client(service_name="shop", server_url=receiver.url, environ={},
                            assign_errors=assign)
    try:
        try:
            orders.charge(42)
        except ValueError:
            client.capture_exception()
        assert client.flush(5)
    finally:
        client.close(5)
    (error,) = receiver.events("error")
    assert error["culprit"].endswith(" in charge")
    custom = error.get("context", {}).get("custom", {})
    if assign:
        assert custom["assignee"] == {"name": BOB[0], "email": BOB[1],
                                      "commit": git(repo, "rev-parse", "HEAD~1"),
                                      "date": "2024-03-01T12:00:00+01:00"}
    else:
        assert "assignee" not in custom


@pytest.mark.parametrize("exporter_process", [False, True])
def test_service_version_defaults_to_the_app_revision(repo, outside, receiver, monkeypatch,
                                                      exporter_process):
    """git runs on the worker (or in the exporter process), in the app's folders as they
    were when the client was made."""
    def metadata_version(app: Path) -> str | None:
        monkeypatch.setattr(release, "_app_version", [])
        monkeypatch.setattr(release, "app_dir", lambda: str(app))
        monkeypatch.chdir(app)
        client = beatlib.Client(service_name="shop", server_url=receiver.url, environ={},
                                exporter_process=exporter_process)
        monkeypatch.chdir("/")  # a daemon's chdir after start-up changes nothing
        client.begin_transaction("task")
        client.end_transaction("t", "success")
        assert client.flush(5)
        client.close(5)
        return receiver.metadata[-1]["service"].get("version")

    assert metadata_version(repo) == release.detect_revision(str(repo))
    assert metadata_version(outside) is None
    client = beatlib.Client(service_version="7.1", environ={}, enabled=False)
    assert client.config.service_version == "7.1"
    client.close(0)
    assert sys.modules["beatlib.release"] is release
