"""The redaction corpus: realistic secrets placed where apps leak them, through a real Flask
app (beatlib's defaults, `capture_body="all"`) and through the manual API. Every byte the
server received (gzip undone) is searched for every secret: none may be there.

Each secret is made at run time, so neither source lines nor an earlier run can explain a
hit; each is recorded with the place it was put, which the failure message names.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import secrets
import sqlite3
import string
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from flask import Flask, redirect, request
from sqlalchemy import String, create_engine, insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import beatlib
from beatlib import context
from beatlib.contrib.flask import Beat
from beatlib.contrib.logging import LoggingHandler
from tests.instrumentation.http_server import HTTPServer
from tests.otlp_collector import Collector
from tests.receiver import Receiver

_ALNUM = string.ascii_letters + string.digits


class Corpus:
    """The secrets of one run, each with where it was put."""

    def __init__(self) -> None:
        self.places: dict[str, str] = {}

    def new(self, place: str, shape: str = "hex") -> str:
        """A fresh secret for `place`: random hex (the default) or one of the token shapes."""
        assert place not in self.places, place
        value = _shape(shape)
        self.places[place] = value
        return value

    def leaks(self, received: bytes) -> list[str]:
        text = received.decode("utf-8", "replace")
        found = []
        for place, value in self.places.items():
            forms = {value, value.replace(" ", ""), json.dumps(value)[1:-1]}
            # a short numeric secret is searched as a whole number, not inside a timestamp
            short = value.isdigit() and len(value) < 8
            if any(re.search(rf"(?<!\d){re.escape(form)}(?!\d)", text) if short else form in text
                   for form in forms):
                found.append(f"{place}: {value!r}")
        return found


def _rand(n: int, alphabet: str = _ALNUM) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(n))


def _luhn_card() -> str:
    digits = [4] + [secrets.randbelow(10) for _ in range(14)]
    total = 0
    for i, d in enumerate(reversed(digits)):
        total += (d * 2 - 9 if d > 4 else d * 2) if i % 2 == 0 else d
    digits.append((10 - total % 10) % 10)
    text = "".join(map(str, digits))
    return " ".join(text[i:i + 4] for i in range(0, 16, 4))


def _shape(shape: str) -> str:
    upper = string.ascii_uppercase + string.digits
    shapes = {
        "hex": lambda: "s3" + secrets.token_hex(10),
        "aws": lambda: "AKIA" + _rand(16, upper),
        "stripe": lambda: "sk_live_" + _rand(24),
        "github": lambda: "ghp_" + _rand(36),
        "slack": lambda: f"xoxb-{secrets.randbelow(10**12):012d}-{_rand(24)}",
        "google": lambda: "AIza" + _rand(35, _ALNUM + "_-"),
        "sendgrid": lambda: f"SG.{_rand(22)}.{_rand(43)}",
        "jwt": lambda: (f"eyJhbGciOiJIUzI1NiJ9.eyJ{_rand(30, _ALNUM + '_-')}"
                        f".{_rand(43, _ALNUM + '_-')}"),
        "card": _luhn_card,
        "pin": lambda: str(1000 + secrets.randbelow(9000)) + str(secrets.randbelow(10)),
        "pem": lambda: "MIIE" + _rand(60, _ALNUM + "+/"),
        "basic": lambda: _rand(23, _ALNUM + "+/") + "=",
    }
    return shapes[shape]()


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "accounts"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(80), unique=True)
    password: Mapped[str] = mapped_column(String(80))


@dataclasses.dataclass
class Settings:
    host: str
    password: str


def pem(body: str) -> str:
    return f"-----BEGIN RSA PRIVATE KEY-----\n{body}\n-----END RSA PRIVATE KEY-----"


def make_app(c: Corpus, client: beatlib.Client, callee: HTTPServer, tmp_path: Any) -> Flask:
    app = Flask("corpus")
    app.config["PROPAGATE_EXCEPTIONS"] = False
    Beat(app, client=client)
    engine = create_engine(f"sqlite:///{tmp_path / 'corpus.db'}")
    Base.metadata.create_all(engine)
    log = logging.getLogger("corpus.app")
    log.handlers[:] = [LoggingHandler(client)]
    log.propagate = False

    @app.get("/reset-password/<token>")
    def reset(token: str) -> Any:
        response = redirect(f"https://idp.example/cb?code={c.new('response Location ?code=')}")
        response.set_cookie("session", c.new("response Set-Cookie"))
        response.headers["X-Refresh-Token"] = c.new("response header X-Refresh-Token")
        return response

    @app.post("/signup")
    def signup() -> str:
        return "ok" if request.form.get("username") else "no"

    @app.post("/api/batch")
    def batch() -> str:
        return str(len(request.get_json()))

    @app.get("/boom/<invite_secret>")
    def boom(invite_secret: str) -> str:
        db_url = f"postgresql://app:{c.new('local db_url (URL password)')}@db/prod"  # noqa: F841
        db_password = c.new("local db_password")  # noqa: F841
        client_secret = c.new("local client_secret")  # noqa: F841
        passphrase = c.new("local passphrase")  # noqa: F841
        conn_str = f"Server=db;User Id=app;Password={c.new('local conn_str')};"  # noqa: F841
        creds = ("app", c.new("local creds tuple"))  # noqa: F841
        env = {"DATABASE_URL": f"postgres://u:{c.new('local env DATABASE_URL')}@h/db",  # noqa: F841
               "HOME": "/root"}
        environ = request.environ  # noqa: F841
        req = request  # noqa: F841
        headers = request.headers  # noqa: F841
        deep = {"l1": {"l2": {"l3": {"l4": {"l5": {"password": c.new("local nested 6 deep")}}}}}}  # noqa: F841
        aws = {"id": c.new("local AWS access key id", "aws")}  # noqa: F841
        signing = pem(c.new("local PEM private key", "pem"))  # noqa: F841
        value = c.new("local JWT under a plain name", "jwt")  # noqa: F841
        payment_config = {"live": c.new("local Stripe live key", "stripe")}  # noqa: F841
        github = c.new("local GitHub token", "github")  # noqa: F841
        chat = c.new("local Slack bot token", "slack")  # noqa: F841
        maps = c.new("local Google API key", "google")  # noqa: F841
        mailer = c.new("local SendGrid key", "sendgrid")  # noqa: F841
        settings = Settings("db", c.new("local dataclass password field"))  # noqa: F841
        text = f"password={c.new('local text password=')}&user=bob"  # noqa: F841
        raise RuntimeError(f"could not connect to postgresql://app:"
                           f"{c.new('exception message URL password')}@db and token "
                           f"{c.new('exception message announced token')}")

    @app.get("/sql")
    def sql() -> str:
        conn = sqlite3.connect(":memory:")
        conn.execute("CREATE TABLE users (name TEXT, password TEXT)")
        conn.execute(f"SELECT * FROM users WHERE password = '{c.new('SQL literal')}'")
        conn.close()
        with engine.begin() as db:
            db.execute(insert(Account), {"email": "ann@example.com", "password": "x"})
        try:
            with engine.begin() as db:
                db.execute(insert(Account), {"email": "ann@example.com",
                                             "password": c.new("SQLAlchemy error parameters")})
        except IntegrityError:
            client.capture_exception()
        return "ok"

    @app.get("/app-data")
    def app_data() -> str:
        beatlib.label(card_number=c.new("label card_number"),
                      note=f"api key {c.new('label announced api key')}")
        beatlib.set_context({"card": c.new("custom context card"),
                             "nested": {"api_key": c.new("custom context nested api_key")},
                             "chat": f"token is {c.new('custom context announced token')}"})
        with beatlib.capture_span("charge card", "external", "gateway") as span:
            assert span is not None
            span.set_context("custom", {"password": c.new("span custom context")})
            span.set_label("otp", c.new("span label otp"))
            span.set_context("gateway", {"secret": c.new("span app context key")})
        requests.get(callee.url(f"/ok?access_token={c.new('outgoing URL query')}"), timeout=5)
        userinfo = callee.url("/ok").replace("://", f"://user:{c.new('outgoing URL password')}@")
        requests.get(userinfo, timeout=5)
        log.error("login failed, password was %s", c.new("log message argument"))
        try:
            raise ValueError(f"bad secret {c.new('logged exception message')}")
        except ValueError:
            log.exception("token %s rejected", c.new("logged exception record argument"))
        client.capture_message(f"stripe key {c.new('message Stripe key', 'stripe')} rotated")
        return "ok"

    return app


def run_flask(c: Corpus, client: beatlib.Client, app: Flask) -> None:
    http = app.test_client()
    route_token = c.new("URL path /reset-password/<token>")
    query = {
        "sig": c.new("query sig"), "signature": c.new("query signature"),
        "X-Amz-Signature": c.new("query X-Amz-Signature"),
        "X-Amz-Credential": c.new("query X-Amz-Credential", "aws") + "/20260101/us-east-1",
        "client_secret": c.new("query client_secret"), "code": c.new("query code"),
        "access_token": c.new("query access_token"), "api_key": c.new("query api_key"),
        "page": "2",
    }  # fmt: skip
    headers = {
        "Authorization": f"Bearer {c.new('header Authorization Bearer')}",
        "X-Api-Key": c.new("header X-Api-Key"),
        "X-Auth-Token": c.new("header X-Auth-Token"),
        "X-Amz-Security-Token": c.new("header X-Amz-Security-Token"),
        "X-Csrf-Token": c.new("header X-Csrf-Token"),
        "X-Hub-Signature-256": f"sha256={c.new('header X-Hub-Signature-256')}",
        "X-Upstream": f"Bearer {c.new('header plain name, Bearer value')}",
        "X-Callback": f"https://hook:{c.new('header plain name, URL password')}@hooks.example/",
        "Proxy-Authorization": f"Basic {c.new('header Proxy-Authorization', 'basic')}",
    }  # fmt: skip
    cookies = {
        "sessionid": c.new("cookie sessionid"), "remember_token": c.new("cookie remember_token"),
        "jwt": c.new("cookie jwt", "jwt"), "prefs": c.new("cookie plain name, JWT value", "jwt"),
        "connect.sid": c.new("cookie connect.sid"), "theme": "dark",
    }  # fmt: skip
    for name, value in cookies.items():
        http.set_cookie(name, value)
    http.get(f"/reset-password/{route_token}", query_string=query, headers=headers,
             buffered=True)
    http.post("/signup", buffered=True, data={
        "username": "ann", "password": c.new("form password"),
        "new_password": c.new("form new_password"), "cvv": c.new("form cvv", "pin"),
        "otp": c.new("form otp", "pin"), "card_number": c.new("form card_number", "card"),
        "pin": c.new("form pin", "pin"),
    })  # fmt: skip
    http.post("/api/batch", buffered=True, json=[
        {"user": "a", "password": c.new("JSON array item password")},
        {"user": "b", "api_key": c.new("JSON array item api_key")},
        {"a": {"b": {"c": {"d": {"e": {"f": {"password": c.new("JSON 7 deep")}}}}}}},
        {"key": pem(c.new("JSON PEM under a plain name", "pem"))},
        {"note": f"my password is {c.new('JSON free text announced password')}"},
    ])  # fmt: skip
    http.get(f"/boom/{c.new('URL path /boom/<invite_secret>')}",
             query_string={"token": c.new("query token of a failing request")},
             headers={"Authorization": f"Bearer {c.new('header of a failing request')}"},
             buffered=True)
    http.get("/sql", buffered=True)
    http.get("/app-data", buffered=True)


def run_manual(c: Corpus, client: beatlib.Client) -> None:
    client.begin_transaction("task")
    beatlib.set_context({"dsn": f"https://{c.new('manual custom dsn')}@errors.example/1"})
    beatlib.label(secret_answer=c.new("manual label secret_answer"))
    with beatlib.capture_span(f"GET https://api.example/v1?api_key={c.new('manual span name')}",
                              "external"):
        pass
    otp_code = c.new("manual local otp_code")  # noqa: F841
    bearer = f"Bearer {c.new('manual local Bearer value')}"  # noqa: F841
    try:
        raise KeyError("missing")
    except KeyError:
        client.capture_exception(custom={"session_token": c.new("manual error custom")})
    try:
        raise KeyError("missing")
    except KeyError:
        # the app's own keys beside the schema's, in the request and response contexts
        client.capture_exception(
            request={"method": "POST", "password": c.new("manual error request password"),
                     "extra": {"api_token": c.new("manual error request extra api_token")}},
            response={"status_code": 500, "secret": c.new("manual error response secret")})
    client.capture_message("password is %s" % c.new("manual message"))
    client.end_transaction(f"job for token={c.new('manual transaction name')}", "success")


@pytest.fixture
def callee() -> Iterator[HTTPServer]:
    with HTTPServer() as server:
        yield server


@pytest.fixture
def argv(monkeypatch: pytest.MonkeyPatch) -> Corpus:
    """A corpus whose first secrets are on the command line (metadata: process.argv)."""
    c = Corpus()
    monkeypatch.setattr(sys, "argv", ["worker.py", "--db-password", c.new("argv --db-password x"),
                                      f"--token={c.new('argv --token=x')}", "-v"])
    return c


def run_corpus(c: Corpus, receiver: Receiver | Collector, callee: HTTPServer,
               tmp_path: Any) -> None:
    """The whole corpus with beatlib's defaults (and every request body recorded); to an
    OTLP collector with exporter="otlp"."""
    where = ({"exporter": "otlp", "otlp_endpoint": receiver.url}
             if isinstance(receiver, Collector) else {"server_url": receiver.url})
    client = beatlib.Client(service_name="corpus", capture_body="all", flush_interval="50ms",
                            environ={}, **where)
    beatlib.instrument(client.config)
    try:
        run_flask(c, client, make_app(c, client, callee, tmp_path))
        run_manual(c, client)
        assert client.flush(10)
    finally:
        client.close(5)
        beatlib.uninstrument()
        context.set_active(None)


def test_no_secret_reaches_the_server(argv: Corpus, receiver: Receiver, callee: HTTPServer,
                                      tmp_path: Any) -> None:
    c = argv
    run_corpus(c, receiver, callee, tmp_path)
    assert len(c.places) >= 80
    received = receiver.received()
    assert received and not c.leaks(received), "\n".join(c.leaks(received))
    # the events are all there, redacted rather than dropped
    errors = receiver.events("error")
    assert len(errors) >= 6 and receiver.wait_for("transaction", 7)
    names = {t.get("name") for t in receiver.events("transaction")}
    assert "GET /reset-password/<token>" in names and "GET /boom/<invite_secret>" in names
    spans = receiver.events("span")
    assert {"SELECT FROM users", "GET 127.0.0.1:%d" % callee.port} <= {s["name"] for s in spans}
    assert b"[REDACTED]" in received


def test_the_corpus_reaches_the_server_when_redaction_is_off(
        argv: Corpus, receiver: Receiver, callee: HTTPServer, tmp_path: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The control: with the sanitize processor skipped (only the truncate processor left)
    the same run leaks the secrets, so the test above would see a leak."""
    from beatlib.processors import Sanitize

    monkeypatch.setattr(Sanitize, "__call__", lambda self, kind, event, secrets=(): event)
    monkeypatch.setattr(Sanitize, "field", lambda self, key, value, secrets=(): value)
    c = argv
    run_corpus(c, receiver, callee, tmp_path)
    leaked = {line.split(":")[0] for line in c.leaks(receiver.received())}
    cut_by_depth = {"local nested 6 deep"}  # never shipped at all: nesting past the limit
    assert leaked == set(c.places) - cut_by_depth


@pytest.fixture
def collector() -> Iterator[Collector]:
    with Collector() as c:
        yield c
        assert not c.problems, c.problems


def otlp_received(collector: Collector) -> bytes:
    return b"\n".join(json.dumps(r["json"]).encode() for r in collector.requests)


# Where the corpus puts secrets that OTLP carries too (request headers, URLs, SQL literals,
# exception and log messages, names); the rest (bodies, cookies, locals, custom context) has
# no OpenTelemetry attribute and is not exported.
OTLP_PLACES = {
    "header Authorization Bearer", "header X-Api-Key", "header plain name, Bearer value",
    "header plain name, URL password", "query sig", "query access_token", "query api_key",
    "URL path /reset-password/<token>", "SQL literal", "exception message URL password",
    "exception message announced token", "outgoing URL query", "outgoing URL password",
    "logged exception message", "manual span name", "manual message", "manual transaction name",
    "label card_number", "argv --token=x",
}


def test_no_secret_reaches_an_otlp_collector(argv: Corpus, collector: Collector,
                                            callee: HTTPServer, tmp_path: Any) -> None:
    c = argv
    run_corpus(c, collector, callee, tmp_path)
    received = otlp_received(collector)
    assert received and not c.leaks(received), "\n".join(c.leaks(received))
    names = {sp.name for sp in collector.spans()}
    assert {"GET /reset-password/<token>", "SELECT FROM users"} <= names
    assert len(collector.log_records()) >= 6
    assert b"[REDACTED]" in received


def test_the_corpus_reaches_an_otlp_collector_when_redaction_is_off(
        argv: Corpus, collector: Collector, callee: HTTPServer, tmp_path: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The control for OTLP: without the sanitize processor, the places OTLP carries leak."""
    from beatlib.processors import Sanitize

    monkeypatch.setattr(Sanitize, "__call__", lambda self, kind, event, secrets=(): event)
    monkeypatch.setattr(Sanitize, "field", lambda self, key, value, secrets=(): value)
    c = argv
    run_corpus(c, collector, callee, tmp_path)
    leaked = {line.split(":")[0] for line in c.leaks(otlp_received(collector))}
    assert OTLP_PLACES <= leaked, OTLP_PLACES - leaked
