"""The event pipeline seen from outside: before_send, per-client redaction rules, capture at
the calling thread, truncation after redaction, metadata as the client is now."""

from __future__ import annotations

import functools
import json
import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import beatlib
from beatlib import context
from beatlib.config import ConfigError
from beatlib.sanitize import REDACTED
from beatlib.transport.memory import MemorySender
from tests.schemas import validate


@pytest.fixture
def made() -> Iterator[list[beatlib.Client]]:
    clients: list[beatlib.Client] = []
    yield clients
    for client in clients:
        client.close(5)
    context.set_active(None)


def memory_client(made: list[beatlib.Client], **settings: Any) -> tuple[beatlib.Client,
                                                                         MemorySender]:
    sender = MemorySender()
    client = beatlib.Client(sender=sender, service_name="pipeline", environ={}, **settings)
    made.append(client)
    return client, sender


def shipped(client: beatlib.Client, sender: MemorySender) -> list[tuple[str, dict[str, Any]]]:
    assert client.flush(5)
    events = sender.events()
    for kind, event in events:
        validate(kind, event)
    return events


def fail() -> None:
    raise ValueError("boom")


def test_before_send_sees_every_kind_and_can_change_or_drop(made) -> None:
    seen: list[str] = []

    def hook(kind: str, event: dict[str, Any]) -> dict[str, Any] | None:
        seen.append(kind)
        if kind == "transaction" and event.get("name") == "GET /health":
            return None
        if kind == "error":
            event.setdefault("context", {}).setdefault("custom", {})["scrubbed"] = True
        return event

    client, sender = memory_client(made, before_send=hook)
    for name in ("GET /health", "GET /items"):
        client.begin_transaction("request")
        with beatlib.capture_span("work"):
            pass
        client.end_transaction(name, "HTTP 2xx")
    try:
        fail()
    except ValueError:
        client.capture_exception()
    events = shipped(client, sender)
    assert [e["name"] for k, e in events if k == "transaction"] == ["GET /items"]
    (error,) = [e for k, e in events if k == "error"]
    assert error["context"]["custom"]["scrubbed"] is True
    assert {"metadata", "transaction", "span", "error"} <= set(seen)
    assert client.stats()["dropped_by_hook"] == 1


def test_before_send_that_raises_drops_that_event_only(made, caplog) -> None:
    def hook(kind: str, event: dict[str, Any]) -> dict[str, Any]:
        if kind == "error":
            raise RuntimeError("hook bug")
        return event

    client, sender = memory_client(made, before_send=hook)
    caplog.set_level(logging.ERROR, logger="beatlib")
    for _ in range(3):
        try:
            fail()
        except ValueError:
            assert client.capture_exception() is not None  # the app sees no exception
    client.begin_transaction("task")
    client.end_transaction("job", "success")
    events = shipped(client, sender)
    assert [k for k, _ in events if k != "metadata"] == ["transaction"]
    assert client.stats()["hook_errors"] == 3
    logged = [r for r in caplog.records if "before_send raised" in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None  # once, with the traceback


def test_before_send_that_returns_junk_drops_and_metadata_is_never_lost(made) -> None:
    client, sender = memory_client(made, before_send=lambda kind, event: None if kind ==
                                   "metadata" else "not a dict")
    client.capture_message("hello")
    assert client.flush(5)
    assert [k for k, _ in sender.events()] == ["metadata"]  # beatlib's own, processed
    assert client.stats()["hook_errors"] == 1


def scrub(kind: str, event: dict[str, Any]) -> dict[str, Any]:
    event["scrubbed_by"] = "dotted path"
    return event


def test_before_send_as_a_dotted_path(made, monkeypatch) -> None:
    monkeypatch.setenv("BEATLIB_BEFORE_SEND", "tests.test_processors:scrub")
    client = beatlib.Client(sender=MemorySender(), service_name="x")
    made.append(client)
    assert client.config.before_send is scrub
    for path in ("tests.test_processors:missing", "no.such.module:f", "tests.test_processors"):
        with pytest.raises(ConfigError) as error:
            beatlib.Client(before_send=path, environ={})
        assert error.value.setting == "before_send"


def test_two_clients_redact_by_their_own_rules(made) -> None:
    strict, strict_sent = memory_client(made, sanitize_field_names_extra="*employee*")
    plain, plain_sent = memory_client(made)

    def capture(client: beatlib.Client) -> None:
        employee_id = "E-1234"  # noqa: F841
        password = "hunter2"  # noqa: F841
        try:
            fail()
        except ValueError:
            client.capture_exception()

    worker = threading.Thread(target=capture, args=(strict,))
    worker.start()
    worker.join()
    capture(plain)
    (strict_error,) = [e for k, e in shipped(strict, strict_sent) if k == "error"]
    (plain_error,) = [e for k, e in shipped(plain, plain_sent) if k == "error"]
    strict_vars = strict_error["exception"]["stacktrace"][1]["vars"]
    plain_vars = plain_error["exception"]["stacktrace"][1]["vars"]
    assert strict_vars["employee_id"] == REDACTED and plain_vars["employee_id"] == "E-1234"
    assert strict_vars["password"] == REDACTED == plain_vars["password"]


def test_outgoing_http_urls_use_the_owning_clients_rules(made) -> None:
    own, own_sent = memory_client(made, sanitize_field_names_extra="tenant")
    memory_client(made)  # created last: the process default client, with the defaults
    own.begin_transaction("task")
    span = beatlib.capture_span("call", "external", "http")
    with span as opened:
        assert opened is not None
        opened.context = {"http": {"url": "https://api.test/v1?tenant=acme&token=t0k&x=1"}}
    own.end_transaction("job")
    (sp,) = [e for k, e in shipped(own, own_sent) if k == "span"]
    assert sp["context"]["http"]["url"] == (
        f"https://api.test/v1?tenant={REDACTED}&token={REDACTED}&x=1")


def test_locals_and_context_are_taken_when_captured(made) -> None:
    client, sender = memory_client(made)
    threads: list[threading.Thread] = []

    class Lazy:
        def __repr__(self) -> str:
            threads.append(threading.current_thread())
            return "<Lazy query>"

    def work() -> None:
        cart = {"items": 1}
        lazy = Lazy()  # noqa: F841
        try:
            fail()
        except ValueError:
            client.capture_exception(custom={"cart": cart})
        cart["items"] = 99  # changed after the capture: not what is shipped

    client.begin_transaction("task")
    data = {"step": "start"}
    beatlib.set_context(data)
    data["step"] = "changed later"
    client.end_transaction("job")
    work()
    events = shipped(client, sender)
    (error,) = [e for k, e in events if k == "error"]
    frame = error["exception"]["stacktrace"][1]
    assert frame["function"] == "work"
    assert frame["vars"]["cart"] == {"items": 1} and frame["vars"]["lazy"] == "<Lazy query>"
    assert error["context"]["custom"]["cart"] == {"items": 1}
    assert threads == [threading.current_thread()]  # __repr__ ran on the capturing thread
    (tx,) = [e for k, e in events if k == "transaction"]
    assert tx["context"]["custom"] == {"step": "start"}


def test_texts_are_cut_after_redaction(made) -> None:
    client, sender = memory_client(made)
    client.begin_transaction("task")
    with beatlib.capture_span("big") as span:
        assert span is not None
        span.set_context("custom", {"blob": "x" * 50_000, "late": "y" * 9_990 + " password=pw1"})
    client.end_transaction("job")
    (sp,) = [e for k, e in shipped(client, sender) if k == "span"]
    custom = sp["context"]["custom"]
    assert len(custom["blob"]) == client.config.max_message_length
    assert "pw1" not in custom["late"]


def test_metadata_is_what_the_client_is_when_each_request_is_built(made) -> None:
    client, sender = memory_client(made)
    client.capture_message("first")
    assert client.flush(5)
    client.framework = ("flask", "3.1")
    client.capture_message("second")
    assert client.flush(5)
    metadata = [e for k, e in sender.events() if k == "metadata"]
    assert len(metadata) == 2
    assert "framework" not in metadata[0]["service"]
    assert metadata[1]["service"]["framework"] == {"name": "flask", "version": "3.1"}


def test_spans_written_directly_equal_the_processed_dicts(made) -> None:
    """The hot path (span lines written field by field) and the dict path (what before_send
    sees) give the same events, hostile values included."""
    import json

    from beatlib.protocol import intake_v2

    client, _ = memory_client(made, span_stack_trace_min_duration=0)
    tx = client.begin_transaction("request")
    tx.set_route_params({"token": "route-s3cr3t"})
    for name in ("SELECT FROM t", "n" * 3000 + " password=pw1", "GET /x?token=abc",
                 "route-s3cr3t"):
        with beatlib.capture_span(name, "db", "sqlite" * 300, "query",
                                  labels={"card": "4111", "a.b": 2**70}) as span:
            assert span is not None
            span.context = {"db": {"statement": "SELECT * FROM t WHERE pw = 'hunter2'",
                                   "type": "sql"},
                            "http": {"url": "http://u:p4ss@h/?sig=x&page=1"},
                            "vendor": {"api_key": "k", "blob": "b" * 20_000}}
    client.end_transaction("GET /route-s3cr3t", "HTTP 2xx")
    pipeline = client.pipeline
    for secrets in (tx.secrets, frozenset()):
        tx.secrets = secrets
        direct = [json.loads(line) for line in pipeline.encode(tx)]
        dicts = [{kind: event} for kind, event in pipeline.events(tx)]
        assert direct == dicts
        assert len(direct) == 5
        for line in direct[1:]:
            validate("span", line["span"])
    written = "".join(map(str, direct))
    assert "hunter2" not in written and "p4ss" not in written and "pw1" not in written
    assert intake_v2.span(tx, tx.spans[0], client.config)["name"] == "SELECT FROM t"


def test_an_outcome_the_schemas_do_not_allow_is_sent_as_unknown(made) -> None:
    """Code that writes `outcome` itself may set anything: both ways give "unknown" and a
    line that parses (one bad event makes the server refuse the whole request)."""
    import json

    client, _ = memory_client(made)
    tx = client.begin_transaction("request")
    with beatlib.capture_span("q", "db") as span:
        assert span is not None
        span.outcome = 'we"ird'
    with beatlib.capture_span("r", "db") as span:
        assert span is not None
        span.outcome = ["not", "text"]  # type: ignore[assignment]
    tx.outcome = "ok"
    client.end_transaction("job", "done")
    direct = [json.loads(line) for line in client.pipeline.encode(tx)]
    assert direct == [{kind: event} for kind, event in client.pipeline.events(tx)]
    assert [next(iter(line.values()))["outcome"] for line in direct] == ["unknown"] * 3
    validate("transaction", direct[0]["transaction"])
    for line in direct[1:]:
        validate("span", line["span"])


class Text(str):
    """A text of another type: redacted, but not cut by the truncate processor."""


class Shown:
    def __init__(self, shown: str) -> None:
        self.shown = shown

    def __repr__(self) -> str:
        return self.shown


def varied_transactions(client: beatlib.Client) -> list[Any]:
    """Transactions whose contexts hold secrets, odd types, non-ASCII and over-long texts,
    and pairs that differ only in the types of equal-looking values."""
    from collections import OrderedDict

    bearer = "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl"
    headers = {"Authorization": bearer, "X-Api-Key": "k-8c1f2a9d", "Accept": "text/html",
               "Cookie": "sessionid=s3ss10n; theme=dark", "X-Note": "ünïcode \udc80 lone"}
    request = {"method": "POST", "url": {"full": "https://u:p4ss@shop.test/pay?sig=abc&n=1",
                                         "pathname": "/pay", "port": 443},
               "headers": headers, "cookies": {"sessionid": "s3ss10n", "theme": "dark"},
               "body": {"password": "hunter2", "card": "4111 1111 1111 1111",
                        "note": "token: t0k3n-s3cr3t and more " + "x" * 12_000}}
    values: list[Any] = [
        "password=pw1", Text("password=pw1"), Text("t" * 3000), "t" * 3000, 1, True, 1.0,
        b"bytes", bytearray(b"bytes"), (1, "a"), [1, "a"], Shown("password=pw1"),
        OrderedDict(password="pw2"), {"password": "pw2"}, {1: "int key", "1": "text key"},
        "é" * 1100, float("nan"), 2**70, None,
    ]
    made = []
    for i, value in enumerate(values * 2):  # each twice: the second time from what is kept
        tx = client.begin_transaction("request")
        if i % 3 == 0:
            tx.set_route_params({"token": "route-s3cr3t-%d" % (i % 2)})
        tx.set_context("request", dict(request, method="GET" if i % 2 else "POST",
                                       headers={**headers, "X-Value": value}), captured=True)
        tx.set_context("response", {"status_code": 200, "headers": {"Set-Cookie": "sid=x1"}},
                       captured=True)
        tx.context["custom"] = {"value": value, "nested": [{"secret": value}, value]}
        tx.context["vendor"] = {"api_key": value, "plain": value}
        if i % 4 == 1:
            tx.set_label("card_number", "4111111111111111")
            tx.context["tags"] = {"a.b": value if type(value) in (int, str) else "x"}
        if i % 5 == 2:
            tx.set_context("user", {"id": 7, "email": "a@b.c", "username": value})
        for statement in ("SELECT * FROM t /* api_key=abcdef123456 */ WHERE pw = 'hunter2'",
                          "SELECT 1 FROM route-s3cr3t-1"):
            with beatlib.capture_span(statement[:12], "db", "postgresql", "query",
                                      labels={"card": "4111", "n": value if type(value) in (
                                          int, float, bool, str) else 0}) as span:
                assert span is not None
                span.context = {"db": {"type": "sql", "statement": statement,
                                       "instance": value, "user": value},
                                "http": {"url": "http://u:p4ss@h/?sig=x&page=1"},
                                "vendor": {"api_key": value, "blob": value}}
        with beatlib.capture_span("GET /x?token=abc", "external", "http", "GET") as span:
            assert span is not None
            span.set_context("http", {"url": "https://api.test/v1?access_token=t0k",
                                      "status_code": 200})
        with beatlib.capture_span("render", "template", "jinja2", "render", leaf=False):
            pass
        client.end_transaction("POST /pay/route-s3cr3t-0" if i % 2 else "GET é" * 300,
                               None if i % 7 == 3 else "HTTP 2xx")
        made.append(tx)
    unsampled = client.begin_transaction("request", beatlib.parse_traceparent(
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"))
    client.end_transaction("GET /unsampled")
    return [*made, unsampled]


def field(pipeline: Any, secrets: frozenset[str], key: str, value: Any) -> Any:
    return pipeline.field(key, value, secrets)


def same(line: bytes) -> str:
    """`line` with its members in one order (NaN is not equal to itself as a float)."""
    return json.dumps(json.loads(line), sort_keys=True)


@pytest.mark.parametrize("settings", [{}, {"max_string_length": 40, "max_message_length": 300},
                                      {"capture_sql_literals": True}])
def test_written_directly_equals_the_processed_dicts_for_varied_events(made, settings) -> None:
    """A transaction and its spans written directly (fields processed one by one, contexts
    kept by content) are byte for byte what the plain ways write: the transaction the line
    of its processed event dict, each span as written field by field from scratch; and the
    same events as the dicts a before_send hook gets, however often and in whatever order
    the same contents come. The OTLP encoder's the same with and without a hook."""
    from beatlib.protocol import intake_v2
    from tests.events import pipeline

    client, _ = memory_client(made, span_stack_trace_min_duration=0, **settings)
    records = varied_transactions(client)
    hooked = pipeline(beatlib.Config(environ={}, before_send=lambda kind, event: event,
                                     **settings))
    fast = client.pipeline
    otlp = [pipeline(beatlib.Config(environ={}, exporter="otlp", **settings)),
            pipeline(beatlib.Config(environ={}, exporter="otlp", **settings,
                                    before_send=lambda kind, event: event))]
    for order in (records, records[::-1], records):
        plain = pipeline(client.config)
        for tx in order:
            assert otlp[0].encode(tx) == otlp[1].encode(tx)
            events = plain.events(tx)
            assert events[0][0] == "transaction"
            expected = [intake_v2.line(*events[0]), *intake_v2.span_lines(
                tx, client.config, functools.partial(field, plain, tx.secrets))]
            written = fast.encode(tx)
            assert written == expected
            assert list(map(same, written)) == list(map(same, hooked.encode(tx))) == [
                same(intake_v2.line(kind, event)) for kind, event in events]
    events = [event for tx in records for line in fast.encode(tx)
              for event in json.loads(line).values()]
    shipped = json.dumps([{k: v for k, v in e.items() if k != "stacktrace"} for e in events])
    for secret in ("p4ss", "s3ss10n", "k-8c1f2a9d", "t0k", "abcdef123456", "4111 1111",
                   "eyJzdWIi"):  # (the source lines show them: not in stack traces)
        assert secret not in shipped
    assert ("hunter2" in shipped) is client.config.capture_sql_literals
    for line in fast.encode(records[0]):
        ((kind, event),) = json.loads(line).items()
        validate(kind, event)


def test_content_keys_tell_apart_what_is_written_apart() -> None:
    from collections import OrderedDict

    from beatlib.processors import content_key

    shared = {"a": "x"}
    assert content_key([shared, shared]) == content_key([{"a": "x"}, {"a": "x"}])
    distinct = [1, True, 1.0, "1", b"1", bytearray(b"1"), (1,), [1], {"a": 1, "b": 2},
                {"b": 2, "a": 1}, {1: "a"}, {"1": "a"}, -0.0, 0.0]
    keys = [content_key(v) for v in distinct]
    assert None not in keys and len(set(keys)) == len(distinct)
    cycle: list[Any] = []
    cycle.append(cycle)
    for unkeyed in (Text("x"), OrderedDict(a=1), Shown("x"), {"a": [Shown("x")]}, cycle,
                    lambda: 1, 1j):
        assert content_key(unkeyed) is None
    assert content_key({"a": [1, "x"]}) == content_key({"a": [1, "x"]})  # and still works


def test_contexts_kept_by_content_are_bounded() -> None:
    from beatlib.processors import Written

    written = Written(budget=10_000)
    for i in range(1000):
        written.put(b"%d" % i, "x" * 50)
        assert written.size <= 10_000
    assert written.get(b"999") == "x" * 50 and written.get(b"0") is None
    written.put(b"big", "x" * 100_000)  # too big to keep
    assert written.get(b"big") is None


def test_contents_that_seldom_come_again_are_seldom_keyed() -> None:
    from beatlib.processors import Written

    written = Written()
    keyed = 0
    for i in range(2000):  # URLs with an id in them: each content once
        key, found = written.find("http", {"url": "/orders/%d" % i})
        assert found is None
        if key is not None:
            keyed += 1
            written.put(key, "x")
    assert 64 <= keyed < 300
    for _ in range(200):  # a content that repeats is still found, once in a while
        key, found = written.find("http", {"url": "/health"})
        if key is not None and found is None:
            written.put(key, "kept")
    assert "kept" in written.texts.values()
    key, found = written.find("db", {"statement": "SELECT 1"})  # other kinds: keyed each time
    assert key is not None and found is None
