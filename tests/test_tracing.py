"""Transactions, spans, sampling, span limits and W3C trace context, encoded and validated."""

from __future__ import annotations

import asyncio
import threading

import pytest

from beatlib import context
from beatlib.config import Config
from beatlib.tracing import (
    Tracer,
    capture_span,
    format_traceparent,
    outgoing_headers,
    parse_traceparent,
    start_span,
)
from tests.events import encode


class Recorder:
    """A tracer whose queue is a list, with the events encoded and schema-checked."""

    def __init__(self, **settings):
        self.ended = []
        self.config = Config(**settings, environ={})
        self.tracer = Tracer(self.config, self.ended.append, lambda: None)

    def events(self, tx):
        events = encode(tx, self.config)
        return events[0][1], [event for kind, event in events[1:]]


@pytest.fixture
def rec():
    yield Recorder()
    context.set_active(None)


def test_transaction_with_nested_spans(rec):
    tx = rec.tracer.begin_transaction("task")
    assert context.current_transaction() is tx
    with capture_span("outer", "db", "sqlite", "query") as outer:
        with capture_span("inner", "template", "jinja2", "render") as inner:
            assert context.current_span() is inner
        assert context.current_span() is outer
    rec.tracer.end_transaction("nightly", "success")

    assert rec.ended == [tx] and context.current_transaction() is None
    event, spans = rec.events(tx)
    assert event["name"] == "nightly" and event["result"] == "success"
    assert event["span_count"] == {"started": 2, "dropped": 0}
    assert event["duration"] > 0 and event["sampled"] is True
    by_name = {s["name"]: s for s in spans}
    assert by_name["outer"]["parent_id"] == event["id"]
    assert by_name["inner"]["parent_id"] == by_name["outer"]["id"]
    assert all(s["trace_id"] == event["trace_id"] for s in spans)
    assert all(s["transaction_id"] == event["id"] for s in spans)
    assert by_name["outer"]["type"] == "db" and by_name["outer"]["subtype"] == "sqlite"
    assert event["timestamp"] <= by_name["outer"]["timestamp"] <= by_name["inner"]["timestamp"]
    assert by_name["inner"]["duration"] <= by_name["outer"]["duration"] <= event["duration"]


def test_span_outcome_follows_exception(rec):
    rec.tracer.begin_transaction("task")
    with pytest.raises(KeyError):
        with capture_span("boom"):
            raise KeyError("x")
    with capture_span("fine"):
        pass
    tx = rec.tracer.end_transaction()
    _, spans = rec.events(tx)
    assert [s["outcome"] for s in spans] == ["failure", "success"]


def test_capture_span_default_type_is_a_known_one(rec):
    # "custom" (no subtype) is what Elastic's span types call API custom instrumentation.
    rec.tracer.begin_transaction("task")
    with capture_span("mine"):
        pass

    @capture_span
    def decorated():
        pass

    decorated()
    tx = rec.tracer.end_transaction()
    _, spans = rec.events(tx)
    assert [(s["type"], s.get("subtype")) for s in spans] == [("custom", None)] * 2


def test_capture_span_as_decorator_sync_and_async(rec):
    @capture_span(span_type="code", labels={"k": "v"})
    def work(x):
        return x * 2

    @capture_span("async work")
    async def async_work(x):
        await asyncio.sleep(0)
        return x + 1

    rec.tracer.begin_transaction("task")
    assert work(2) == 4
    assert asyncio.run(async_work(1)) == 2
    tx = rec.tracer.end_transaction()
    _, spans = rec.events(tx)
    assert [s["name"] for s in spans][0].endswith("work")
    assert spans[0]["context"]["tags"] == {"k": "v"}
    assert spans[1]["name"] == "async work"
    assert work.__name__ == "work"


def test_no_transaction_no_span():
    assert start_span("x") is None
    with capture_span("nothing") as span:
        assert span is None


def test_max_spans_counts_dropped_without_building():
    rec = Recorder(transaction_max_spans=3)
    rec.tracer.begin_transaction("task")
    for i in range(10):
        with capture_span(f"s{i}"):
            pass
    tx = rec.tracer.end_transaction()
    event, spans = rec.events(tx)
    assert len(tx.spans) == 3
    assert event["span_count"] == {"started": 3, "dropped": 7}


def test_unsampled_transaction_is_slim_and_builds_no_spans():
    rec = Recorder(transaction_sample_rate=0)
    tx = rec.tracer.begin_transaction("request")
    with capture_span("query") as span:
        assert span is None
    context.current_transaction().set_label("a", 1)
    rec.tracer.end_transaction("GET /", "HTTP 2xx")
    event, spans = rec.events(tx)
    assert spans == [] and event["sampled"] is False and "context" not in event
    assert event["span_count"]["started"] == 0 and event["sample_rate"] == 0.0


def test_sample_rate_is_honoured_roughly():
    rec = Recorder(transaction_sample_rate=0.25)
    for _ in range(2000):
        rec.tracer.begin_transaction("t")
        rec.tracer.end_transaction()
    sampled = sum(tx.sampled for tx in rec.ended)
    assert 350 < sampled < 650


def test_ending_with_open_spans_ends_and_marks_them(rec):
    rec.tracer.begin_transaction("task")
    outer = start_span("left open")
    start_span("also open")
    tx = rec.tracer.end_transaction()
    assert context.get_active() is None
    _, spans = rec.events(tx)
    assert all(s["context"]["tags"]["unfinished"] is True for s in spans)
    assert all(s["outcome"] == "unknown" for s in spans)
    outer.end()  # ending later is harmless and changes nothing
    assert rec.events(tx)[1] == spans


def test_ending_twice_queues_once(rec):
    tx = rec.tracer.begin_transaction("task")
    tx.end("a")
    tx.end("b")
    assert rec.ended == [tx] and tx.name == "a"
    assert rec.tracer.end_transaction() is None


@pytest.mark.parametrize(
    "header, expected",
    [
        ("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", True),
        ("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00", False),
        (" 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-03 ", True),
        ("01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra", True),
    ],
)
def test_traceparent_valid(header, expected):
    parsed = parse_traceparent(header, "es=s:0.5,other=x")
    assert parsed is not None and parsed.sampled is expected
    assert parsed.trace_id == "0af7651916cd43dd8448eb211c80319c"
    assert parsed.span_id == "b7ad6b7169203331" and parsed.tracestate == "es=s:0.5,other=x"


@pytest.mark.parametrize(
    "header",
    [
        None, 42, "", "garbage",
        "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "00-00000000000000000000000000000000-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
        "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
        "00-0af7651916cd43dd8448eb211c80319-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b716920333-01",
        "0-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    ],
)  # fmt: skip
def test_traceparent_invalid_is_ignored(header, rec):
    assert parse_traceparent(header) is None
    tx = rec.tracer.begin_transaction("request", header)
    assert tx.parent_id is None and len(tx.trace_id) == 32 and tx.sampled


def test_transaction_continues_the_callers_trace(rec):
    header = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
    tx = rec.tracer.begin_transaction("request", header)
    assert tx.trace_id == "0af7651916cd43dd8448eb211c80319c"
    assert tx.parent_id == "b7ad6b7169203331" and tx.sampled is False
    rec.tracer.end_transaction()
    event, _ = rec.events(tx)
    assert event["parent_id"] == "b7ad6b7169203331"


def test_traceparent_of_a_span_names_the_span(rec):
    tx = rec.tracer.begin_transaction("task")
    with capture_span("call") as span:
        header = span.traceparent()
    parsed = parse_traceparent(header)
    assert parsed.trace_id == tx.trace_id and parsed.span_id == "%016x" % span.id
    assert parsed.sampled is True
    assert format_traceparent(parsed.trace_id, parsed.span_id, True, parsed.random) == header
    assert parse_traceparent(tx.traceparent()).span_id == "%016x" % tx.id
    rec.tracer.end_transaction()


def test_threads_do_not_share_transactions():
    rec = Recorder()
    lock = threading.Lock()
    seen = []

    def worker(n):
        for i in range(500):
            tx = rec.tracer.begin_transaction("task")
            tx.set_label("thread", n)
            for j in range(3):
                with capture_span(f"t{n}-{i}-{j}"):
                    assert context.current_transaction() is tx
            rec.tracer.end_transaction(f"t{n}")
        with lock:
            seen.append(n)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(seen) == list(range(8)) and len(rec.ended) == 4000
    for tx in rec.ended:
        n = tx.labels["thread"]
        assert tx.name == f"t{n}" and len(tx.spans) == 3
        assert all(s.name.startswith(f"t{n}-") and s.transaction is tx for s in tx.spans)
        assert all(s.parent is tx for s in tx.spans)


def test_asyncio_tasks_inherit_and_do_not_mix():
    rec = Recorder()

    async def child(tx, i):
        assert context.current_transaction() is tx
        with capture_span(f"child-{i}") as span:
            await asyncio.sleep(0.001)
            assert context.current_span() is span
        return i

    async def handle(i):
        tx = rec.tracer.begin_transaction("request")
        with capture_span(f"req-{i}"):
            await asyncio.sleep(0)
            got = await asyncio.gather(child(tx, i), asyncio.create_task(child(tx, i)))
        rec.tracer.end_transaction(f"req-{i}")
        return tx, got

    async def main():
        return await asyncio.gather(*(handle(i) for i in range(200)))

    results = asyncio.run(main())
    assert len(rec.ended) == 200
    for tx, got in results:
        i = got[0]
        names = sorted(s.name for s in tx.spans)
        assert names == [f"child-{i}", f"child-{i}", f"req-{i}"]
        req = next(s for s in tx.spans if s.name == f"req-{i}")
        assert all(s.parent is req for s in tx.spans if s is not req)
        for s in tx.spans:
            assert s.duration is not None and not s.labels


def test_an_apps_seeded_random_sequence_is_not_shifted(rec):
    import random

    random.seed(7)
    expected = [random.random() for _ in range(5)]
    random.seed(7)
    got = []
    for _ in range(5):
        rec.tracer.begin_transaction("task")
        with capture_span("s"):
            got.append(random.random())
        rec.tracer.end_transaction()
    assert got == expected


@pytest.mark.parametrize(("header", "kept"), [
    ("es=s:0.5,foo=bar", "es=s:0.5,foo=bar"),
    (" es=s:1 ,\t, foo=bar ", "es=s:1,foo=bar"),  # optional white space, empty members
    ("tenant@vendor=x,a*b/c_d-e=1", "tenant@vendor=x,a*b/c_d-e=1"),
    ("Foo=bar", None),  # upper case key
    ("@vendor=1", None), ("_x=1", None), ("a.b=1", None),  # first character, '.'
    ("foo=bar=baz", None),  # '=' is not allowed in a value
    ("foo=bar ", "foo=bar"), ("foo= bar", "foo= bar"),  # trailing space is not the value's
    ("foo=,bar=1", None),  # an empty value
    ("k" * 256 + "=1", "k" * 256 + "=1"), ("k" * 257 + "=1", None),
    (",".join(f"k{i}=v" for i in range(32)), ",".join(f"k{i}=v" for i in range(32))),
    (",".join(f"k{i}=v" for i in range(33)), None),  # more than 32 members
    ("", None), (None, None), (42, None),
])  # fmt: skip
def test_tracestate_is_validated_as_w3c_trace_context_says(header, kept):
    from beatlib.tracing import valid_tracestate

    assert valid_tracestate(header) == kept


def test_a_long_tracestate_loses_its_longest_members_first():
    from beatlib.tracing import valid_tracestate

    long_member = "big=" + "x" * 200
    members = [f"k{i}=" + "v" * 40 for i in range(12)]  # 12 x 44 chars: over 512 with commas
    out = valid_tracestate(",".join([members[0], long_member, *members[1:]]))
    assert out is not None and len(out) <= 512
    assert "big=" not in out and out.startswith("k0=")
    assert out.split(",") == members[: len(out.split(","))]  # then cut from the end


def test_the_level_2_random_flag_of_the_caller_is_passed_on(rec):
    for flags, sampled in (("03", True), ("02", False), ("01", True)):
        tx = rec.tracer.begin_transaction(
            "request", f"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-{flags}")
        assert tx.sampled is sampled
        with capture_span("call") as span:
            assert tx.traceparent().endswith(f"-{flags}")
            if span is not None:
                assert span.traceparent().endswith(f"-{flags}")
        rec.tracer.end_transaction("t")
    assert format_traceparent("a" * 32, "b" * 16, True) == f"00-{'a' * 32}-{'b' * 16}-01"


@pytest.mark.parametrize("key", [
    "acme@",  # an at sign may end a key
    "shop@eu@blue",  # or come more than once
    "m@@x",
    "9lives",  # a key may begin with a digit without being tenant@vendor
    "q" * 200 + "@" + "w" * 55,  # tenant and vendor parts of any length, 256 in all
    "r@" + "s" * 30,
])  # fmt: skip
def test_tracestate_keys_follow_the_level_2_grammar(key):
    from beatlib.tracing import valid_tracestate

    header = f"rojo=00f067aa0ba902b7,{key}=t61rcWkgMzE"
    assert valid_tracestate(header) == header
    assert valid_tracestate(f"{key}x" + "y" * (256 - len(key)) + "=1") is None  # 257 characters


@pytest.mark.parametrize(("header", "kept"), [
    ("congo=new,rojo=r,congo=old", "congo=new,rojo=r"),  # the left-most is the latest
    ("congo=same, congo=same", "congo=same"),
    ("a=1,b=2,a=3,b=4,c=5", "a=1,b=2,c=5"),
    ("x=1,x=2,Bad=3", None),  # an invalid member still drops the header
])  # fmt: skip
def test_a_repeated_tracestate_key_keeps_its_first_member(header, kept):
    from beatlib.tracing import valid_tracestate

    assert valid_tracestate(header) == kept


# -- the sampling rate in `tracestate` (`es=s:<rate>`) -------------------------------------

CALLER = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-0%d"


def _traced(rec, trace_parent=None):
    """Begin a transaction (continuing `trace_parent`), open a span, take the outgoing
    headers in it, end both; the headers and the encoded transaction and span."""
    tx = rec.tracer.begin_transaction("request", trace_parent)
    with capture_span("call"):
        headers = outgoing_headers()
    rec.tracer.end_transaction("t")
    event, spans = rec.events(tx)
    return headers, event, spans


def test_a_root_transaction_sends_the_rate_it_sampled_with():
    rec = Recorder(transaction_sample_rate=0.25)
    try:
        for _ in range(500):  # sampled one time in four
            headers, event, spans = _traced(rec)
            if event["sampled"]:
                break
        assert headers["tracestate"] == "es=s:0.25"
        assert event["sample_rate"] == spans[0]["sample_rate"] == 0.25
        for _ in range(500):
            headers, event, _ = _traced(rec)
            if not event["sampled"]:
                break
        assert headers["tracestate"] == "es=s:0" and event["sample_rate"] == 0.0
    finally:
        context.set_active(None)


@pytest.mark.parametrize(("rate", "member"), [
    (1.0, "es=s:1"), (0.0, "es=s:0"), (0.0001, "es=s:0.0001"), (0.5556, "es=s:0.5556"),
    (0.1, "es=s:0.1"),
])  # fmt: skip
def test_es_member_has_at_most_four_decimals_and_no_exponent(rate, member):
    from beatlib.tracing import es_tracestate

    assert es_tracestate(rate) == member


@pytest.mark.parametrize(("tracestate", "rate"), [
    ("es=s:0.125", 0.125),
    ("vendor=abc,es=s:0.5;ext:1,more=x", 0.5),  # among others', with more attributes
    ("es=x:1;s:1", 1.0),
    ("es=s:0", 0.0),
    (None, None),  # no tracestate: no rate is claimed
    ("vendor=abc", None),
    ("es=x:1", None), ("es=s:", None), ("es=s:1.5", None), ("es=s:-0.5", None),
    ("es=s:nan", None), ("es=s:1e-3", None), ("es=s:0x1", None), ("notes=s:0.5", None),
])  # fmt: skip
def test_a_continued_trace_carries_the_roots_rate(rec, tracestate, rate):
    headers, event, spans = _traced(rec, parse_traceparent(CALLER % 1, tracestate))
    assert event.get("sample_rate") == rate and spans[0].get("sample_rate") == rate
    assert headers.get("tracestate") == tracestate  # passed on as it came, ours untouched


def test_an_unsampled_continued_trace_counts_for_nothing(rec):
    headers, event, _ = _traced(rec, parse_traceparent(CALLER % 0, "es=s:0.5"))
    assert event["sampled"] is False and event["sample_rate"] == 0.0
    assert headers["tracestate"] == "es=s:0.5"


def test_the_traces_we_start_set_the_level_2_random_flag(rec):
    for rate, flags in ((1.0, "03"), (0.0, "02")):
        rec = Recorder(transaction_sample_rate=rate)
        tx = rec.tracer.begin_transaction("request")
        assert tx.traceparent().endswith(f"-{flags}")
        assert outgoing_headers()["traceparent"].endswith(f"-{flags}")
        with capture_span("call") as span:
            if span is not None:
                assert span.traceparent().endswith(f"-{flags}")
        parsed = parse_traceparent(tx.traceparent())
        assert parsed.random is True and parsed.sampled is (rate == 1.0)
        rec.tracer.end_transaction("t")
        context.set_active(None)


BAGGAGE = "userId=alice,serverNode=DF%2028,isProduction=false;meta=1"


@pytest.mark.parametrize(("header", "kept"), [
    (BAGGAGE, BAGGAGE),  # byte for byte: properties, percent-encoding, order
    ("  k=v , x=y\t", "k=v , x=y"),  # outer whitespace only is dropped
    ("k=%E2%9C%93", "k=%E2%9C%93"),
    (None, None), (42, None), (b"k=v", None), ("", None), (" ", None),
    ("k=v\r\nX-Injected: 1", None),  # a line break: dropped whole
    ("k=caf\u00e9", None),  # raw non-ASCII (baggage percent-encodes it): dropped whole
])  # fmt: skip
def test_baggage_is_kept_as_it_came_or_dropped_whole(header, kept):
    from beatlib.tracing import valid_baggage

    assert valid_baggage(header) == kept


def test_baggage_beyond_the_w3c_limits_loses_whole_members_from_the_end():
    from beatlib.tracing import MAX_BAGGAGE_BYTES, MAX_BAGGAGE_MEMBERS, valid_baggage

    members = [f"k{i}=v{i}" for i in range(200)]
    kept = valid_baggage(",".join(members))
    assert kept == ",".join(members[:MAX_BAGGAGE_MEMBERS])
    assert valid_baggage(",".join(members[:180])) == ",".join(members[:180])
    big = [f"m{i}={'x' * 1000}" for i in range(10)]  # 1005 bytes each
    kept = valid_baggage(",".join(big))
    assert kept == ",".join(big[:8]) and len(kept) <= MAX_BAGGAGE_BYTES
    exact = "a=" + "x" * (MAX_BAGGAGE_BYTES - 2)
    assert valid_baggage(exact) == exact
    assert valid_baggage(exact + ",b=1") == exact  # cut at the comma after a full prefix
    assert valid_baggage(exact + "x") is None  # one member over the limit: nothing to keep
    assert valid_baggage("a=1," + "b=" + "y" * MAX_BAGGAGE_BYTES) == "a=1"


def test_baggage_goes_out_with_the_trace_headers_as_it_came(rec):
    tx = rec.tracer.begin_transaction("request", parse_traceparent(CALLER % 1, "x=1"),
                                      BAGGAGE)
    assert tx.baggage == BAGGAGE
    with capture_span("call"):
        headers = outgoing_headers()
    assert headers == {"traceparent": headers["traceparent"], "tracestate": "x=1",
                       "baggage": BAGGAGE}
    rec.tracer.end_transaction("t")
    event, _ = rec.events(tx)
    assert "alice" not in repr(event)  # never recorded
    context.set_active(None)
    # Without a traceparent the caller's baggage still goes on, with a new trace.
    tx = rec.tracer.begin_transaction("request", None, "k=v")
    assert outgoing_headers()["baggage"] == "k=v" and tx.parent_id is None
    rec.tracer.end_transaction("t")
    context.set_active(None)
    tx = rec.tracer.begin_transaction("request")
    assert "baggage" not in outgoing_headers()
    rec.tracer.end_transaction("t")


def test_trace_context_from_headers_finds_baggage_in_any_case():
    from beatlib.tracing import trace_context_from

    parent, baggage = trace_context_from({"TraceParent": (CALLER % 1).encode(),
                                          "BAGGAGE": b"k=v;p", "tracestate": "x=1"})
    assert parent.tracestate == "x=1" and baggage == "k=v;p"
    assert trace_context_from({"baggage": "k=v"}) == (None, "k=v")
    assert trace_context_from(None) == (None, None)
    assert trace_context_from({"baggage": "\n"}) == (None, None)


def test_tracestate_keeps_other_vendors_members_in_order_up_to_32():
    from beatlib.tracing import valid_tracestate

    members = [f"v{i}=x{i}" for i in range(32)]
    assert valid_tracestate(",".join(members)) == ",".join(members)
    assert valid_tracestate(",".join([*members, "es=s:1"])) is None  # 33: dropped whole
