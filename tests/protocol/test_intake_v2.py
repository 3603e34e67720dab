"""Encoding to intake v2 (encoder, then processors): app data made to fit the schemas,
never raising."""

from __future__ import annotations

import json
import math

import pytest

from beatlib import context
from beatlib.config import Config
from beatlib.protocol import intake_v2
from beatlib.tracing import Tracer, capture_span
from tests.events import encode, pipeline
from tests.schemas import validate

CONFIG = Config(environ={})


def _tracer():
    ended = []
    return Tracer(CONFIG, ended.append, lambda: None), ended


class Unprintable:
    def __str__(self):
        raise RuntimeError("no")

    __repr__ = __str__


def test_labels_are_normalised():
    raw = intake_v2.labels({
        "a.b": 1, 'q"*': "x", "big": 2**70, "nan": math.nan, "obj": Unprintable(),
        "long": "y" * 5000, "ok": True, "none": None, "f": 1.5,
    })  # fmt: skip
    out = pipeline().process("transaction", {"context": {"tags": raw}})["context"]["tags"]
    assert out["a_b"] == 1 and out["q__"] == "x" and out["big"] == str(2**70)
    assert out["nan"] == "nan" and out["obj"].startswith("<unprintable")
    assert len(out["long"]) == 1024 and out["ok"] is True and out["none"] is None
    assert out["f"] == 1.5


def test_transaction_with_hostile_context_is_valid_json_and_schema():
    tracer, _ = _tracer()
    tx = tracer.begin_transaction("t" * 3000)
    cyclic: dict = {}
    cyclic["self"] = cyclic
    tx.set_context("custom", {"cycle": cyclic, "bytes": b"\xff\xfe", "odd": Unprintable(),
                              "inf": math.inf, "nested": [[[[[[[[[[1]]]]]]]]]]})
    tx.set_context("user", {"id": 2**80, "email": "e" * 2000, "username": Unprintable()})
    tx.labels = {"surrogate": "\udcff"}
    with capture_span("n" * 2000, "t" * 2000, "s" * 2000, "a" * 2000):
        pass
    tx.end("\udcffname", "r" * 5000)
    event = encode(tx)[0][1]
    assert len(event["type"]) == 1024 and event["context"]["user"]["id"] == str(2**80)
    context.set_active(None)


def test_metadata_is_valid_and_names_the_agent():
    meta = intake_v2.metadata(
        Config(service_name="shop", service_version="1.2", environment="prod", environ={}),
        framework=("flask", "3.1"),
    )
    validate("metadata", meta)
    assert meta["service"]["agent"]["name"] == "beatlib"
    assert meta["service"]["framework"] == {"name": "flask", "version": "3.1"}
    assert meta["service"]["version"] == "1.2" and meta["service"]["environment"] == "prod"
    assert meta["process"]["pid"] > 0


def test_request_context_is_redacted_and_cut():
    tracer, _ = _tracer()
    tx = tracer.begin_transaction("request")
    tx.set_context("request", {
        "method": "POST",
        "headers": {"Authorization": "Bearer tok-qwz", "X-Api-Key": "k", "Accept": "text/html",
                    "Cookie": "sessionid=s3cr3t; theme=dark"},
        "cookies": {"sessionid": "s3cr3t", "theme": "dark"},
        "url": {"full": "https://bob:hunter2@shop.example/pay?card_number=4111111111111111&page=2",
                "search": "card_number=4111111111111111&page=2", "hostname": "shop.example"},
        "body": {"password": "hunter2", "amount": 12, "note": "n" * 20000},
    })  # fmt: skip
    tx.set_context("response", {"status_code": 200, "headers": {"Set-Cookie": "sid=1"}})
    tx.end("POST /pay", "HTTP 2xx")
    event = encode(tx)[0][1]
    req = event["context"]["request"]
    text = json.dumps(event)
    assert "tok-qwz" not in text and "s3cr3t" not in text and "hunter2" not in text
    assert "4111111111111111" not in text
    assert req["headers"]["Accept"] == "text/html"
    assert req["headers"]["Authorization"] == "[REDACTED]"
    assert req["cookies"] == {"sessionid": "[REDACTED]", "theme": "dark"}
    assert req["url"]["full"].startswith("https://bob:[REDACTED]@shop.example/pay?")
    assert "page=2" in req["url"]["search"]
    assert req["body"]["amount"] == 12 and len(req["body"]["note"]) <= CONFIG.max_message_length
    assert event["context"]["response"]["headers"]["Set-Cookie"] == "[REDACTED]"
    context.set_active(None)


# (span type, subtype, exit span?, context set on it) -> (service.target, destination resource)
EXIT_CASES = [
    # a custom exit span: the subtype names the target, else the type
    (("custom", "billing-api", True, {}), ({"type": "billing-api"}, "billing-api")),
    (("custom", None, True, {}), ({"type": "custom"}, "custom")),
    # what the app set is kept, and names the resource
    (("custom", "billing-api", True, {"service": {"target": {"type": "ledger", "name": "eu"}}}),
     ({"type": "ledger", "name": "eu"}, "ledger/eu")),
    # not an exit span: neither, even with a database or a target in its context
    (("custom", "x", False, {"db": {"instance": "orders"}}), (None, None)),
    (("app", None, False, {"service": {"target": {"type": "stray"}}}), (None, None)),
    # databases: the instance names the target; without one, the subtype (or type) alone
    (("db", "postgresql", True, {"db": {"instance": "shop"}}),
     ({"type": "postgresql", "name": "shop"}, "postgresql/shop")),
    (("db", "postgresql", True, {"db": {"type": "sql"}}), ({"type": "postgresql"}, "postgresql")),
    (("db", None, True, {"db": {"instance": "shop"}}), ({"type": "db", "name": "shop"}, "db/shop")),
    (("db", "elasticsearch", True, {"db": {"type": "elasticsearch"},
                                    "http": {"url": "https://search.internal:9200/_bulk"}}),
     ({"type": "elasticsearch"}, "elasticsearch")),  # a database over HTTP is the database
    # messaging: the queue names the target; the URL of an HTTP-based broker does not
    (("messaging", "rabbitmq", True, {"message": {"queue": {"name": "emails"}}}),
     ({"type": "rabbitmq", "name": "emails"}, "rabbitmq/emails")),
    (("messaging", None, True, {"message": {"queue": {"name": "emails"}}}),
     ({"type": "messaging", "name": "emails"}, "messaging/emails")),
    (("messaging", "sqs", True, {"message": {"body": "hi"},
                                 "http": {"url": "https://queue.internal/1"}}),
     ({"type": "sqs"}, "sqs")),
    # HTTP: host and port (the scheme's default when not written); the resource has no prefix
    (("external", "http", True, {"http": {"url": "http://api.internal:8080/v1?x=1"}}),
     ({"type": "http", "name": "api.internal:8080"}, "api.internal:8080")),
    (("external", "http", True, {"http": {"url": "https://api.internal/v1"}}),
     ({"type": "http", "name": "api.internal:443"}, "api.internal:443")),
    (("external", "http", True, {"http": {"url": "http://[::1]/"}}),
     ({"type": "http", "name": "[::1]:80"}, "[::1]:80")),
    (("external", "http", True, {"http": {"url": "http://h:notaport/"}}),
     ({"type": "http"}, "http")),
    # emptied on purpose: the inferred values go
    (("db", "redis", True, {"service": {"target": {"type": None, "name": None}}}), (None, None)),
    (("db", "redis", True, {"destination": {"service": {"resource": ""}}}),
     ({"type": "redis"}, None)),
]


@pytest.mark.parametrize(("span", "expected"), EXIT_CASES)
def test_exit_spans_name_their_destination(span, expected):
    span_type, subtype, leaf, ctx = span
    tracer, _ = _tracer()
    tx = tracer.begin_transaction("task")
    with capture_span("call", span_type, subtype, leaf=leaf) as sp:
        for key, value in ctx.items():
            sp.set_context(key, value)
    tx.end("t")
    context.set_active(None)
    written = [json.loads(line)["span"] for line in pipeline().encode(tx)[1:]]  # the hot path
    hooked = Config(environ={}, before_send=lambda kind, event: event)  # the dict path
    as_dicts = [event for kind, event in encode(tx, hooked) if kind == "span"]
    assert written == as_dicts
    (event,) = [validate("span", e) for e in written]
    got = event.get("context") or {}
    resource = (got.get("destination") or {}).get("service", {}).get("resource")
    assert ((got.get("service") or {}).get("target"), resource) == expected


def test_destination_set_by_the_app_gets_the_schemas_types():
    tracer, _ = _tracer()
    tx = tracer.begin_transaction("task")
    for port in ("5432", True, "x", 70000, 5432):
        with capture_span("q", "db", "postgresql", leaf=True) as sp:
            sp.set_context("destination", {"address": Unprintable(), "port": port})
    tx.end("t")
    context.set_active(None)
    spans = [event for kind, event in encode(tx) if kind == "span"]  # each schema-valid
    assert [s["context"]["destination"].get("port") for s in spans] == [5432, None, None,
                                                                         None, 5432]
    assert spans[0]["context"]["destination"]["address"].startswith("<unrepresentable")
