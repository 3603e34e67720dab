"""Error group state (resolve, ignore, reopen, regressions) and the notifications of new and
regressed groups: a real beatlib client sends to the real receiver, which notifies a real
webhook endpoint and a real SMTP server on loopback."""

from __future__ import annotations

import email
import email.policy
import http.client
import json
import logging
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

import beatlib
from beatlib.receiver import Receiver, main
from beatlib.receiver.group_state import action_path
from beatlib.receiver.notify import NotifyConfig
from tests.receiver_server.conftest import ndjson, post


class Hook:
    """A webhook endpoint on 127.0.0.1 that records every request; `fail` scripts the first
    answers as (status, headers) pairs, after which it answers 200."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.fail: list[tuple[int, dict[str, str]]] = []
        self._cond = threading.Condition()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with hook._cond:
                    hook.requests.append({"path": self.path, "headers": dict(self.headers),
                                          "body": json.loads(body), "at": time.monotonic()})
                    status, headers = hook.fail.pop(0) if hook.fail else (200, {})
                    hook._cond.notify_all()
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hooks/T000/B000/secret"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def bodies(self) -> list[dict[str, Any]]:
        with self._cond:
            return [r["body"] for r in self.requests]

    def wait(self, n: int, timeout: float = 10.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self.requests) >= n, timeout)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def hook() -> Iterator[Hook]:
    h = Hook()
    try:
        yield h
    finally:
        h.close()


def start(tmp_path: Path, **notify: Any) -> Receiver:
    notify.setdefault("backoff", 0.05)
    return Receiver(port=0, db_path=str(tmp_path / "apm.sqlite3"),
                    notify=NotifyConfig(**notify)).start()


def client_for(receiver: Receiver, version: str = "2.0") -> beatlib.Client:
    return beatlib.Client(service_name="shop", server_url=receiver.url, service_version=version,
                          environment="test", flush_interval="50ms", assign_errors=False)


def charge(total: int) -> None:
    raise ValueError(f"cannot charge <b>{total}</b> & more")


def ship(order: dict[str, Any]) -> None:
    order["address"]  # noqa: B018 - raises KeyError


def send(client: beatlib.Client, receiver: Receiver, charges: int = 0, ships: int = 0) -> None:
    """`charges` ValueErrors and `ships` KeyErrors, in one batch, stored when it returns."""
    for _ in range(charges):
        try:
            charge(12)
        except ValueError:
            client.capture_exception()
    for _ in range(ships):
        try:
            ship({})
        except KeyError:
            client.capture_exception()
    assert client.flush(10)
    assert receiver.flush(10)


def settle(receiver: Receiver) -> None:
    """Everything stored is notified (or given up); then a moment for strays."""
    assert receiver.flush(10)
    assert receiver.notifier is not None and receiver.notifier.flush(10)
    time.sleep(0.2)


def group_keys(receiver: Receiver) -> dict[str, str]:
    """exception type -> grouping key."""
    with receiver.store.reader() as conn:
        return {r["type"]: r["grouping_key"] for r in conn.execute(
            "SELECT type, grouping_key FROM error_groups")}


def act(receiver: Receiver, key: str, action: str, headers: dict[str, str] | None = None,
        body: bytes = b"") -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", receiver.port, timeout=10)
    conn.request("POST", action_path("shop", key, action), body=body, headers={
        "Content-Type": "application/x-www-form-urlencoded",
        "Origin": receiver.url, "Sec-Fetch-Site": "same-origin", **(headers or {})})
    response = conn.getresponse()
    response.read()
    conn.close()
    return response


def group(receiver: Receiver, key: str) -> dict[str, Any]:
    with receiver.store.reader() as conn:
        return dict(conn.execute("SELECT * FROM error_groups WHERE grouping_key = ?",
                                 (key,)).fetchone())


def test_once_per_new_group_and_once_per_regression(tmp_path: Path, hook: Hook) -> None:
    receiver = start(tmp_path, webhooks=[hook.url])
    client = client_for(receiver)
    try:
        send(client, receiver, charges=5, ships=3)  # two new groups in one batch
        send(client, receiver, charges=2, ships=2)  # and again in the next
        settle(receiver)
        assert sorted((b["event"], b["type"]) for b in hook.bodies) == [
            ("new_error_group", "KeyError"), ("new_error_group", "ValueError")]
        new = next(b for b in hook.bodies if b["type"] == "ValueError")
        keys = group_keys(receiver)
        assert new["service"] == "shop" and new["environment"] == "test"
        assert new["release"] == "2.0" and new["count"] >= 1
        assert new["culprit"].endswith("in charge")
        assert new["message"] == "cannot charge <b>12</b> & more"
        assert new["url"] == (f"{receiver.url}/ui/error?service=shop&key={keys['ValueError']}")
        assert new["assignee"] is None and new["grouping_key"] == keys["ValueError"]
        assert hook.requests[0]["headers"]["Content-Type"] == "application/json"

        # Resolve one, ignore the other; both happen again, in several batches.
        assert act(receiver, keys["ValueError"], "resolve").status == 303
        assert act(receiver, keys["KeyError"], "ignore").status == 303
        assert group(receiver, keys["ValueError"])["status"] == "resolved"
        assert group(receiver, keys["ValueError"])["resolved_in_version"] == "2.0"
        client.close()
        client = client_for(receiver, version="2.1")
        for _ in range(3):
            send(client, receiver, charges=3, ships=3)
        settle(receiver)
        assert [b["event"] for b in hook.bodies] == ["new_error_group"] * 2 + ["regression"]
        regression = hook.bodies[2]
        assert (regression["type"], regression["release"], regression["resolved_in"],
                regression["regressions"]) == ("ValueError", "2.1", "2.0", 1)
        regressed = group(receiver, keys["ValueError"])
        assert (regressed["status"], regressed["regressed_in"], regressed["regressions"]) == \
            ("open", "2.1", 1)
        assert group(receiver, keys["KeyError"])["status"] == "ignored"
        assert group(receiver, keys["KeyError"])["count"] == 14  # counted, not notified
        client.close()
    finally:
        client.close()
        receiver.stop()

    # The same database after a restart: nothing is notified twice.
    receiver = start(tmp_path, webhooks=[hook.url])
    client = client_for(receiver, version="2.2")
    try:
        send(client, receiver, charges=2, ships=2)
        settle(receiver)
        assert len(hook.bodies) == 3
        # A second resolve and regression is told again, once.
        assert act(receiver, keys["ValueError"], "resolve", body=b"version=2.2").status == 303
        assert group(receiver, keys["ValueError"])["resolved_in_version"] == "2.2"
        send(client, receiver, charges=4)
        send(client, receiver, charges=1)
        settle(receiver)
        assert [b["event"] for b in hook.bodies][3:] == ["regression"]
        assert hook.bodies[3]["regressions"] == 2
        # Reopen takes an ignored group back: its next new occurrence is counted, not told
        # (it was never resolved).
        assert act(receiver, keys["KeyError"], "reopen").status == 303
        assert group(receiver, keys["KeyError"])["status"] == "open"
        assert receiver.notifier is not None
        assert receiver.notifier.counts["sent"] == 1 and not receiver.notifier.counts["failed"]
    finally:
        client.close()
        receiver.stop()


def test_cross_site_posts_are_refused(serve: Receiver) -> None:
    client = client_for(serve)
    try:
        send(client, serve, charges=1)
    finally:
        client.close()
    [key] = group_keys(serve).values()
    assert act(serve, key, "resolve", {"Origin": "http://evil.example"}).status == 403
    assert act(serve, key, "resolve", {"Sec-Fetch-Site": "cross-site"}).status == 403
    assert act(serve, key, "resolve", {"Sec-Fetch-Site": "same-site"}).status == 403
    assert act(serve, key, "resolve", {"Origin": "null"}).status == 403
    assert group(serve, key)["status"] == "open"
    assert act(serve, "0" * 32, "resolve").status == 404
    assert act(serve, key, "delete").status == 404
    response = act(serve, key, "resolve")
    assert response.status == 303
    assert response.getheader("Location") == f"/ui/error?service=shop&key={key}"
    assert group(serve, key)["status"] == "resolved"


def test_slack_payload(tmp_path: Path, hook: Hook) -> None:
    receiver = start(tmp_path, webhooks=[hook.url], format="slack",
                     public_url="https://apm.example.org/")
    client = client_for(receiver)
    try:
        send(client, receiver, charges=1)
        settle(receiver)
    finally:
        client.close()
        receiver.stop()
    [payload] = hook.bodies
    assert set(payload) == {"text", "blocks"}
    assert payload["text"].startswith("New error in shop (test): ValueError")
    assert "&lt;b&gt;12&lt;/b&gt; &amp; more" in payload["text"]  # mrkdwn escaped
    headline, fields, context = payload["blocks"]
    assert headline["text"]["text"].startswith("*<https://apm.example.org/ui/error?service="
                                               "shop&key=")
    assert {"type": "mrkdwn", "text": "*Release*\n2.0"} in fields["fields"]
    assert "charge" in context["elements"][0]["text"]


def test_retries_with_backoff_and_retry_after(tmp_path: Path, hook: Hook) -> None:
    hook.fail = [(503, {}), (429, {"Retry-After": "1"})]
    receiver = start(tmp_path, webhooks=[hook.url], backoff=0.05)
    client = client_for(receiver)
    try:
        send(client, receiver, charges=1)
        settle(receiver)
    finally:
        client.close()
        receiver.stop()
    assert len(hook.requests) == 3
    assert hook.bodies[0] == hook.bodies[2]
    first, second, third = (r["at"] for r in hook.requests)
    assert 0.04 <= second - first < 0.9  # the backoff
    assert third - second >= 0.95  # Retry-After: 1
    assert receiver.notifier is not None
    assert dict(receiver.notifier.counts) == {"sent": 1, "retried": 2}


def test_gives_up_after_a_bound_with_one_log_line(tmp_path: Path, hook: Hook,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    hook.fail = [(500, {})] * 10
    receiver = start(tmp_path, webhooks=[hook.url], attempts=3, backoff=0.01)
    client = client_for(receiver)
    try:
        with caplog.at_level(logging.WARNING, logger="beatlib.receiver"):
            send(client, receiver, charges=1)
            settle(receiver)
    finally:
        client.close()
        receiver.stop()
    assert len(hook.requests) == 3
    assert receiver.notifier is not None and receiver.notifier.counts["failed"] == 1
    lines = [r.getMessage() for r in caplog.records if "gave up" in r.getMessage()]
    assert len(lines) == 1 and "after 3 attempts (HTTP 500)" in lines[0]
    assert "secret" not in lines[0]  # a Slack URL's path is its credential


def test_email_through_a_local_smtp_server(tmp_path: Path) -> None:
    from aiosmtpd.controller import Controller

    received: list[Any] = []

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            received.append(envelope)
            return "250 OK"

    port = _free_port()
    smtp = Controller(Handler(), hostname="127.0.0.1", port=port)
    smtp.start()
    receiver = start(tmp_path, smtp=f"127.0.0.1:{port}", email_to=["dev@example.org"],
                     email_from="apm@example.org")
    client = client_for(receiver)
    try:
        send(client, receiver, charges=3)
        settle(receiver)
    finally:
        client.close()
        receiver.stop()
        smtp.stop()
    [mail] = received
    assert mail.mail_from == "apm@example.org" and mail.rcpt_tos == ["dev@example.org"]
    message = email.message_from_bytes(mail.content, policy=email.policy.default)
    assert message["Subject"] == "[beatlib] New error in shop (test): ValueError: cannot " \
        "charge <b>12</b> & more"
    text = message.get_content()
    assert f"{receiver.url}/ui/error?service=shop&key=" in text
    assert "Release: 2.0" in text


def test_an_endpoint_that_never_answers_does_not_slow_intake(tmp_path: Path) -> None:
    # Accepts connections (the kernel's backlog) and never reads or answers.
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(512)
    black_hole = f"http://127.0.0.1:{hole.getsockname()[1]}/hook"

    def latencies(receiver: Receiver, label: str) -> tuple[list[float], list[float]]:
        intake, stored = [], []
        for i in range(40):  # each a new group, so each one is notified
            error = {"id": f"{i:032x}", "timestamp": time.time_ns() // 1000,
                     "exception": {"type": f"{label}Error{i}", "message": "boom"}}
            began = time.perf_counter()
            status, _ = post(receiver.url, ndjson(("error", error)))
            intake.append(time.perf_counter() - began)
            assert status == 202
            assert receiver.flush(10)
            stored.append(time.perf_counter() - began)
        return intake, stored

    plain = Receiver(port=0, db_path=str(tmp_path / "plain.sqlite3")).start()
    try:
        without = latencies(plain, "Plain")
    finally:
        plain.stop()
    notifying = start(tmp_path, webhooks=[black_hole], timeout=5.0)
    try:
        with_hook = latencies(notifying, "Hooked")
        assert notifying.notifier is not None and notifying.notifier.counts["sent"] == 0
    finally:
        began = time.perf_counter()
        notifying.stop(timeout=1.0)
        stop_took = time.perf_counter() - began
        hole.close()

    def p90(values: list[float]) -> float:
        return sorted(values)[int(len(values) * 0.9)]

    for what, before, after in zip(("intake", "stored"), without, with_hook, strict=True):
        print(f"{what} p90: {p90(before) * 1000:.1f} ms without notifications, "
              f"{p90(after) * 1000:.1f} ms with")
        assert p90(after) < p90(before) * 3 + 0.05, (p90(before), p90(after))
    assert stop_took < 4.0  # stopping does not wait out a stuck delivery's retries


def test_command_line_and_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    from beatlib.receiver.server import _notify_arguments, _notify_config

    def config(*argv: str) -> tuple[NotifyConfig | None, str | None]:
        import argparse
        parser = argparse.ArgumentParser()
        _notify_arguments(parser)
        return _notify_config(parser.parse_args(list(argv)))

    monkeypatch.setenv("BEATLIB_SERVE_NOTIFY_WEBHOOK", "http://a.example/1, http://b.example/2"
                                                       "\nhttp://c.example/3")
    got, problem = config()
    assert problem is None and got is not None
    assert got.webhooks == ["http://a.example/1", "http://b.example/2", "http://c.example/3"]
    got, _ = config("--notify-webhook", "https://d.example/4", "--notify-format", "slack")
    assert got is not None and (got.webhooks, got.format) == (["https://d.example/4"], "slack")
    monkeypatch.delenv("BEATLIB_SERVE_NOTIFY_WEBHOOK")
    assert config() == (None, None)
    assert config("--notify-webhook", "ftp://x")[1] == "not an http(s) URL: 'ftp://x'"
    assert config("--notify-smtp", "localhost:25")[1] == "--notify-smtp needs --notify-email-to"
    assert config("--notify-smtp", "localhost", "--notify-email-to", "a@b")[1] is not None
    got, _ = config("--notify-smtp", "localhost:1025", "--notify-email-to", "a@b.c,d@e.f")
    assert got is not None and got.email_to == ["a@b.c", "d@e.f"] and got.smtp == "localhost:1025"
    assert main(["--db", str(tmp_path / "x.sqlite3"), "--notify-webhook", "nope"]) == 2
    assert "not an http(s) URL" in capsys.readouterr().err


def test_a_schema_2_database_gets_the_group_state_columns(tmp_path: Path) -> None:
    from beatlib.receiver.schema import SCHEMA_VERSION

    path = tmp_path / "old.sqlite3"
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE error_groups (service TEXT NOT NULL, grouping_key TEXT NOT NULL,
            type TEXT, message TEXT, culprit TEXT, count INTEGER NOT NULL,
            first_seen INTEGER NOT NULL, last_seen INTEGER NOT NULL, first_version TEXT,
            latest_error_id TEXT NOT NULL, assignee_key TEXT, assignee_name TEXT,
            assignee_email TEXT, assignee_commit TEXT, assignee_date TEXT,
            PRIMARY KEY (service, grouping_key));
        INSERT INTO error_groups (service, grouping_key, count, first_seen, last_seen,
            latest_error_id) VALUES ('shop', 'k', 3, 1, 2, 'e');
        CREATE TABLE spans (id TEXT NOT NULL, transaction_id TEXT, trace_id TEXT NOT NULL,
            parent_id TEXT NOT NULL, service TEXT NOT NULL, name TEXT NOT NULL,
            type TEXT NOT NULL, subtype TEXT, action TEXT, timestamp INTEGER, start REAL,
            duration REAL NOT NULL, outcome TEXT, sync INTEGER, context TEXT, stacktrace TEXT);
        PRAGMA user_version=2;
    """)  # error_groups as it was before group state
    conn.close()
    for _ in range(2):  # migrated once, then opened as it is
        receiver = Receiver(port=0, db_path=str(path)).start()
        receiver.stop()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    row = conn.execute("SELECT status, resolved_at, resolved_in_version, regressed_in, "
                       "regressions, count FROM error_groups").fetchone()
    conn.close()
    assert row == ("open", None, None, None, 0, 3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
