"""The `beatlib` command: check against the validating receiver, release to a small HTTP server
of the test, serve/demo delegation, and the installed console script run for real."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import types
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from beatlib import cli
from beatlib.version import __version__
from tests.test_release import BOB, git, make_repo


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("BEATLIB_"):
            monkeypatch.delenv(name)


def free_url() -> str:
    """A loopback URL where nothing listens."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = server.server_address[1]
    server.server_close()
    return f"http://127.0.0.1:{port}"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# -- check ---------------------------------------------------------------------------------


def test_check_ok(receiver, capsys):
    code, out, err = run(capsys, "check", "--server-url", receiver.url, "--service-name", "shop")
    assert (code, err) == (0, "")
    assert "version 8.99.0" in out and "accepted (HTTP 202)" in out
    (tx,) = receiver.events("transaction")
    assert tx["name"] == "beatlib check" and tx["type"] == "check"
    assert receiver.metadata[0]["service"]["name"] == "shop"


def test_check_reports_mistyped_environment_variables(receiver, capsys, monkeypatch):
    monkeypatch.setenv("BEATLIB_SAMPLE_RATE", "0.5")
    code, out, _ = run(capsys, "check", "--server-url", receiver.url, "--service-name", "shop")
    assert code == 0
    assert ("warning: BEATLIB_SAMPLE_RATE is not a beatlib setting and is ignored; did you "
            "mean BEATLIB_TRANSACTION_SAMPLE_RATE?") in out


def test_check_with_credentials(capsys):
    with _receiver(secret_token="s3cret") as receiver:
        code, _, err = run(capsys, "check", "--server-url", receiver.url, "--secret-token", "no")
        assert code == 1 and "HTTP 401" in err and "secret_token" in err
        code, out, _ = run(capsys, "check", "--server-url", receiver.url,
                           "--secret-token", "s3cret")
        assert code == 0 and "auth: secret token" in out


def test_check_server_down(capsys):
    url = free_url()
    code, _, err = run(capsys, "check", "--server-url", url)
    assert code == 1 and f"cannot reach {url}/" in err and "refused" in err


def test_check_event_rejected(receiver, capsys):
    receiver.respond_with(400, {"accepted": 0, "errors": [{"message": "line 2 is wrong"}]})
    code, _, err = run(capsys, "check", "--server-url", receiver.url)
    assert code == 1 and "HTTP 400" in err and "line 2 is wrong" in err


PAGE = ("<!DOCTYPE html>\n<html><head><title>Welcome to nginx!</title>\n"
        "<style>body { width: 35em; }</style></head>\n<body>\n<h1>Welcome to nginx!</h1>\n"
        "<p>If you see this page, the "
        "web server is installed &amp; working.</p>\n" + "<p>more text</p>\n" * 200
        + "</body></html>\n")


class WebServer:
    """A plain web server (http.server): GET answers `get` (HTML by default), POST a 405
    HTML error page, as a web server or proxy in front of nothing APM would."""

    def __init__(self, get: tuple[int, str, str] = (200, "text/html", PAGE)) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status, kind, body = get
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body.encode())))
                self.end_headers()
                self.wfile.write(body.encode())

            def do_POST(self) -> None:
                self.send_error(405, "Method Not Allowed")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def __enter__(self) -> WebServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_check_against_a_web_server_says_it_is_no_apm_server_in_one_line(capsys):
    with WebServer() as web:
        code, _, err = run(capsys, "check", "--server-url", web.url)
    assert code == 1 and err.count("\n") == 1 and "<" not in err, err
    assert len(err) < 300, err
    assert f"{web.url}/ answered HTTP 200" in err
    assert '("Welcome to nginx! If you see this page, the web server is installed & working.' in err
    assert "it does not look like an APM server" in err


def test_check_when_only_the_event_post_gets_an_html_page(capsys):
    with WebServer(get=(200, "application/json", '{"version": "8.99.0"}')) as web:
        code, out, err = run(capsys, "check", "--server-url", web.url)
    assert "version 8.99.0" in out
    assert code == 1 and err.count("\n") == 1 and "<" not in err and len(err) < 300, err
    assert "test event not accepted (HTTP 405): Error response Error code: 405" in err
    assert "it does not look like an APM server" in err


def test_check_with_the_intake_path_in_server_url_says_to_drop_it(receiver, capsys):
    for given in (receiver.url + "/intake/v2/events", receiver.url + "/intake/v2/events/"):
        code, _, err = run(capsys, "check", "--server-url", given)
        assert code == 1 and "HTTP 404" in err, err
        assert f"drop the path (server_url={receiver.url})" in err
    code, _, err = run(capsys, "check", "--server-url", receiver.url + "/apm")
    assert code == 1 and "HTTP 404" in err and "drop the path" not in err


def test_check_and_release_help_describe_the_command(capsys):
    for command, says in (("check", "send one test transaction"),
                          ("release", "the git commits since the previous release")):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert says in out and "Exit code 0" in out, out


def test_check_bad_configuration_names_the_setting(capsys, monkeypatch):
    code, out, err = run(capsys, "check", "--server-url", "ftp://apm")
    assert code == 2 and out == "" and "server_url: 'ftp://apm'" in err
    monkeypatch.setenv("BEATLIB_TRANSACTION_SAMPLE_RATE", "2")
    code, _, err = run(capsys, "check")
    assert code == 2
    assert "transaction_sample_rate: '2' (from BEATLIB_TRANSACTION_SAMPLE_RATE)" in err


def test_command_line_wins_over_env(receiver, capsys, monkeypatch):
    monkeypatch.setenv("BEATLIB_SERVER_URL", free_url())
    monkeypatch.setenv("BEATLIB_SERVICE_NAME", "from-env")
    code, _, _ = run(capsys, "check", "--server-url", receiver.url)
    assert code == 0 and receiver.metadata[0]["service"]["name"] == "from-env"


# -- release -------------------------------------------------------------------------------


class ReleaseServer:
    """Records what is POSTed to it and answers `status`."""

    def __init__(self, status: int = 201) -> None:
        self.status = status
        self.received: list[tuple[str, dict[str, str], Any]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                owner.received.append((self.path, dict(self.headers), json.loads(body)))
                self.send_response(owner.status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def release_server() -> Iterator[ReleaseServer]:
    server = ReleaseServer()
    yield server
    server.close()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return make_repo(tmp_path / "shop")


def test_release_is_sent(repo, release_server, capsys):
    code, out, err = run(capsys, "release", "--server-url", release_server.url,
                         "--service-name", "shop", "--environment", "prod",
                         "--secret-token", "tok", "--path", str(repo))
    assert (code, err) == (0, "")
    ((path, headers, body),) = release_server.received
    assert path == "/beatlib/v1/releases"
    assert headers["Content-Type"] == "application/json"
    assert headers["Authorization"] == "Bearer tok"
    assert body["service"] == {"name": "shop", "environment": "prod"}
    assert body["version"] == git(repo, "describe", "--tags", "--always", "--dirty")
    assert body["commit"] == git(repo, "rev-parse", "HEAD") and body["branch"] == "main"
    assert body["previous"] == "v1.0"
    assert [(c["author"], c["subject"]) for c in body["commits"]] == [
        (BOB[0], "README"), (BOB[0], "Charging says why it failed")]
    assert f"release {body['version']} of shop recorded (2 commits since v1.0)" in out


def test_release_failures(repo, release_server, capsys, monkeypatch):
    base = ["release", "--service-name", "shop", "--path", str(repo)]
    release_server.status = 404
    code, _, err = run(capsys, *base, "--server-url", release_server.url)
    assert code == 1 and "HTTP 404" in err and "annotation" in err
    release_server.status = 500
    code, _, err = run(capsys, *base, "--server-url", release_server.url)
    assert code == 1 and "HTTP 500" in err
    code, _, err = run(capsys, *base, "--server-url", free_url())
    assert code == 1 and "cannot reach" in err
    code, _, err = run(capsys, "release", "--path", str(repo))
    assert code == 2 and "--service-name" in err
    code, _, err = run(capsys, *base, "--path", str(repo.parent))  # not a repository
    assert code == 2 and "--version" in err
    code, _, err = run(capsys, *base, "--previous", "v0.9", "--server-url", release_server.url)
    assert code == 2 and "'v0.9' is no tag or commit" in err


def test_release_dry_run_and_kibana_annotation(repo, capsys):
    base = ["release", "--service-name", "shop", "--path", str(repo), "--version", "1.1"]
    code, out, _ = run(capsys, *base, "--dry-run", "--server-url", free_url())
    assert code == 0 and json.loads(out)["version"] == "1.1"
    code, out, _ = run(capsys, *base, "--kibana-annotation")
    note = json.loads(out)
    assert code == 0 and note["service"] == {"version": "1.1"} and "@timestamp" in note


# -- serve and demo ------------------------------------------------------------------------


def test_serve_and_demo_pass_their_arguments_on(monkeypatch, capsys):
    seen: list[list[str]] = []
    fake = types.ModuleType("beatlib_fake_server")
    fake.main = lambda argv: seen.append(argv) or 3  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "beatlib_fake_server", fake)
    monkeypatch.setitem(cli._DELEGATED, "serve", ("beatlib_fake_server", "the local receiver"))
    assert cli.main(["serve", "--port", "8201", "--help"]) == 3
    assert seen == [["--port", "8201", "--help"]]


def test_serve_not_installed_says_so(monkeypatch, capsys):
    monkeypatch.setitem(cli._DELEGATED, "demo", ("beatlib._not_written_yet", "the demo"))
    code, _, err = run(capsys, "demo")
    assert code == 1 and "the demo is not available" in err


# -- the installed command -----------------------------------------------------------------


def test_installed_console_script(receiver):
    exe = shutil.which("beatlib", path=os.path.dirname(sys.executable))
    if exe is None:
        pytest.fail("no `beatlib` script: run `.venv/bin/pip install -e . --no-deps`")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BEATLIB_")}
    done = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30)
    assert done.stdout.strip() == f"beatlib {__version__}"
    done = subprocess.run([exe, "check", "--server-url", receiver.url], env=env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "version 8.99.0" in done.stdout and receiver.wait_for("transaction", 1)
    done = subprocess.run([exe, "check", "--server-url", free_url()], env=env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and "cannot reach" in done.stderr


def _receiver(**kwargs: Any):
    from tests.receiver import Receiver

    return Receiver(**kwargs)
