"""The dashboard's templates: markup in anything stored comes out as text, the receiver's own
rendering is never traced by a client in the same process, `beatlib serve` without Jinja2."""

from __future__ import annotations

import html
import json
import os
import re
import subprocess
import sys
from urllib.parse import urljoin

import beatlib
from beatlib import context
from beatlib.receiver import Receiver, ui
from tests.receiver_server.conftest import get, ndjson, post


def mark(field: str) -> str:
    """Markup that would run or break out of an attribute if it reached a page unescaped."""
    return f"\"'><b id=x-{field}>{field}</b><script>"


def crawl(receiver: Receiver) -> dict[str, str]:
    """Every page reachable from /ui/, by URL."""
    pages: dict[str, str] = {}
    todo = [receiver.dashboard_url]
    while todo:
        url = todo.pop()
        if url in pages:
            continue
        status, body = get(url)
        assert status == 200, url
        pages[url] = body.decode()
        for link in re.findall(r'href="([^"]+)"', pages[url]):
            target = urljoin(url, html.unescape(link))
            if target.startswith(receiver.dashboard_url) and target not in pages:
                todo.append(target)
    return pages


FIELDS = ["service", "version", "environment", "agent", "framework", "tx_name", "tx_type",
          "result", "span_name", "span_type", "statement", "url", "error_type", "module",
          "message", "culprit", "function", "filename", "context_line", "pre_context",
          "local_name", "local_value", "context_value", "cause", "log_message", "logger",
          "assignee", "assignee_email", "commit", "commit_subject", "commit_author", "branch"]


def test_markup_in_every_stored_field_comes_out_escaped(serve: Receiver) -> None:
    m = {field: mark(field) for field in FIELDS}
    trace_id, tx_id = "ab" * 16, "0123456789abcdef"
    metadata = {"service": {"name": m["service"], "version": m["version"],
                            "environment": m["environment"],
                            "agent": {"name": m["agent"], "version": "1"},
                            "framework": {"name": m["framework"], "version": "1"}}}
    tx = {"id": tx_id, "trace_id": trace_id, "type": m["tx_type"], "name": m["tx_name"],
          "result": m["result"], "duration": 20.0, "span_count": {"started": 2},
          "context": {"custom": {"note": m["context_value"]}}}
    db = {"id": "1" * 16, "transaction_id": tx_id, "trace_id": trace_id, "parent_id": tx_id,
          "name": m["span_name"], "type": m["span_type"], "start": 1.0, "duration": 2.0,
          "context": {"db": {"statement": m["statement"]}}}
    http = {**db, "id": "2" * 16, "type": "external",
            "context": {"http": {"url": m["url"], "status_code": 500}}}
    frame = {"filename": m["filename"], "function": m["function"], "lineno": 7,
             "context_line": m["context_line"], "pre_context": [m["pre_context"]],
             "vars": {m["local_name"]: m["local_value"]}}
    error = {"id": "3" * 32, "trace_id": trace_id, "transaction_id": tx_id, "parent_id": tx_id,
             "transaction": {"name": m["tx_name"], "type": "request"}, "culprit": m["culprit"],
             "exception": {"type": m["error_type"], "module": m["module"],
                           "message": m["message"], "stacktrace": [frame],
                           "cause": [{"type": "Cause", "message": m["cause"]}]},
             "context": {"custom": {"assignee": {"name": m["assignee"],
                                                 "email": m["assignee_email"]}}}}
    log = {"id": "4" * 32, "log": {"message": m["log_message"], "logger_name": m["logger"],
                                   "level": "error", "stacktrace": [frame]}}
    assert post(serve.url, ndjson(("transaction", tx), ("span", db), ("span", http),
                                  ("error", error), ("error", log), metadata=metadata))[0] == 202
    release = {"service": {"name": m["service"]}, "version": m["version"],
               "deployed_at": "2025-06-01T10:00:00Z", "branch": m["branch"], "commit": "c0ffee",
               "commits": [{"commit": m["commit"], "subject": m["commit_subject"],
                            "author": m["commit_author"]}]}
    assert post(serve.url, json.dumps(release).encode(), path="/beatlib/v1/releases")[0] == 202
    assert serve.flush(10)

    pages = crawl(serve)
    everything = "".join(pages.values())
    assert "<b id=" not in everything and "<script>" not in everything
    for field, text in m.items():
        # In element content and in attributes alike, quotes included.
        assert html.escape(text, quote=True).replace("&#x27;", "&#39;").replace(
            "&quot;", "&#34;") in everything, field
    # The trace's transaction page was among them, with its spans.
    assert any(f"transaction?id={tx_id}" in url for url in pages)


def test_the_dashboard_is_not_traced_by_a_client_in_the_same_process(serve: Receiver,
                                                                   receiver) -> None:
    """The receiver reads SQLite and renders Jinja2 templates, both of which beatlib
    instruments: a transaction open where a page is rendered must not get their spans."""
    assert post(serve.url, ndjson(("transaction", {
        "id": "0123456789abcdef", "trace_id": "ab" * 16, "type": "request", "name": "GET /",
        "duration": 5.0, "span_count": {"started": 0}})))[0] == 202
    assert serve.flush(10)
    client = beatlib.Client(service_name="app", server_url=receiver.url, flush_interval="50ms",
                            environ={})
    beatlib.instrument(client.config)
    try:
        client.begin_transaction("request")
        for path, query in [("", {}), ("transactions", {}), ("errors", {}), ("releases", {}),
                            ("transaction", {"id": "0123456789abcdef"})]:
            assert ui.render(serve.store, ui.ROOT + path, query).status == 200
        with beatlib.capture_span("the app's own work"):
            pass
        client.end_transaction("render dashboard", "success")
        assert client.flush(10)
    finally:
        beatlib.uninstrument()
        client.close(5)
        context.set_active(None)
    assert [s["name"] for s in receiver.events("span")] == ["the app's own work"]


def test_serve_without_jinja2_says_how_to_install_it(tmp_path) -> None:
    code = ("import sys; sys.modules['jinja2'] = None\n"  # as if not installed
            "from beatlib.cli import main\n"
            f"sys.exit(main(['serve', '--port', '0', '--db', {str(tmp_path / 'x.db')!r}]))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert run.returncode == 1, run
    assert "needs Jinja2" in run.stderr and "pip install -e '.[serve]'" in run.stderr
    assert "Traceback" not in run.stderr and run.stdout == ""
    assert not (tmp_path / "x.db").exists()  # it stopped before opening anything
