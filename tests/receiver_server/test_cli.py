"""`beatlib serve` as a command (`main(argv)`, `python -m beatlib.receiver`) and the release
records `beatlib release` posts to it."""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from beatlib.receiver import Receiver, main, queries
from beatlib.release import Commit, Release
from tests.receiver_server.conftest import get, ndjson, post, transaction


def test_help_and_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "--secret-token" in capsys.readouterr().out
    assert main(["--port", "nope"]) == 2
    assert main(["--port", "70000"]) == 2
    assert main(["--max-queue-events", "0"]) == 2


def test_cannot_listen_or_open_the_database(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["--port", str(port), "--db", str(tmp_path / "db")]) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    assert main(["--port", "0", "--db", str(tmp_path / "missing" / "db")]) == 1
    assert "cannot use the database" in capsys.readouterr().err


def test_serves_until_sigterm_and_stores_what_it_accepted(tmp_path: Path) -> None:
    db = tmp_path / "apm.sqlite3"
    proc = subprocess.Popen(
        [sys.executable, "-m", "beatlib.receiver", "--port", "0", "--db", str(db),
         "--secret-token", "t0k"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("beatlib receiver on http://127.0.0.1:"), first
        url = first.split(" on ")[1].strip()
        assert post(url, ndjson(transaction(1)))[0] == 401
        assert post(url, ndjson(transaction(1)), {"Authorization": "Bearer t0k"})[0] == 202
        assert get(url + "/ui/")[0] == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0, proc.stderr.read() if proc.stderr else ""
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM transactions").fetchone()[0] == 1


def test_release_records(serve: Receiver) -> None:
    record = Release(service="shop", version="1.4.0", branch="main", commit="1a2b3c4d" * 5,
                     previous="v1.3.0", deployed_at="2025-03-01T11:00:00.000+00:00",
                     commits=[Commit("1a2b3c4", "Bob Builder", "Charging says why")],
                     environment="production")
    body = json.dumps(record.to_json()).encode()
    headers = {"Content-Type": "application/json"}
    assert post(serve.url, body, headers, path="/beatlib/v1/releases") == (202, {"accepted": 1})
    assert post(serve.url, b'{"service": {"name": "shop"}}', headers,
                path="/beatlib/v1/releases")[1]["errors"][0]["message"] == \
        'release: "version" is required'
    assert post(serve.url, b"[]", headers, path="/beatlib/v1/releases")[0] == 400
    # The app then reports the same version in its metadata: one release.
    metadata = {"service": {"name": "shop", "version": "1.4.0",
                            "agent": {"name": "beatlib", "version": "0"}}}
    assert post(serve.url, ndjson(transaction(1), metadata=metadata))[0] == 202
    assert serve.flush(10)
    with serve.store.reader() as conn:
        [release] = queries.releases(conn, "shop")
    assert (release["version"], release["branch"], release["previous"], release["environment"],
            release["transactions"]) == ("1.4.0", "main", "v1.3.0", "production", 1)
    assert release["commits"] == [{"commit": "1a2b3c4", "author": "Bob Builder",
                                   "subject": "Charging says why"}]
    status, page = get(serve.url + "/ui/releases?service=shop")
    assert status == 200 and b"Charging says why" in page and b"v1.3.0" in page
