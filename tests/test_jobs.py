"""`beatlib.jobs.transaction` end to end: decorator (sync and async), context manager, the
failure path, nesting inside an open transaction, and no client at all."""

from __future__ import annotations

import asyncio

import pytest

import beatlib
from beatlib import context
from beatlib.jobs import transaction


@pytest.fixture
def client(receiver):
    c = beatlib.Client(
        service_name="jobs", server_url=receiver.url, flush_interval="200ms", environ={}
    )
    yield c
    c.close(5)
    context.set_active(None)


def test_decorator_records_each_call_as_a_transaction(client, receiver):
    @transaction("nightly report")
    def report(n):
        with beatlib.capture_span("query"):
            return n * 2

    assert report(2) == 4 and report(3) == 6
    assert report.__name__ == "report"
    assert beatlib.get_current_transaction() is None
    assert client.flush(5)

    txs = receiver.events("transaction")
    assert len(txs) == 2 and len({t["id"] for t in txs}) == 2
    for tx in txs:
        assert (tx["name"], tx["type"], tx["result"], tx["outcome"]) == (
            "nightly report", "task", "success", "success")
    assert [s["transaction_id"] for s in receiver.events("span")] == [t["id"] for t in txs]


def test_async_decorator_and_async_with(client, receiver):
    @transaction(transaction_type="script")
    async def fetch(i):
        await asyncio.sleep(0.001)
        return i

    async def main():
        assert await asyncio.gather(*(fetch(i) for i in range(20))) == list(range(20))
        async with transaction("sync feeds") as tx:
            assert beatlib.get_current_transaction() is tx
            await asyncio.sleep(0.001)

    asyncio.run(main())
    assert client.flush(5)
    txs = receiver.events("transaction")
    names = [t["name"] for t in txs]
    assert names.count("test_async_decorator_and_async_with.<locals>.fetch") == 20
    assert "sync feeds" in names and {t["type"] for t in txs} == {"script", "task"}


def test_context_manager_and_user_settings_win(client, receiver):
    with transaction("import orders") as tx:
        assert isinstance(tx, beatlib.Transaction)
        beatlib.label(batch=7)
        beatlib.set_transaction_result("partial")
    assert client.flush(5)
    (event,) = receiver.events("transaction")
    assert event["name"] == "import orders" and event["result"] == "partial"
    assert event["context"]["tags"] == {"batch": 7}


def test_failure_is_captured_once_and_propagates_unchanged(client, receiver):
    error = ValueError("bad row")

    @transaction("import orders")
    def job():
        raise error

    with pytest.raises(ValueError) as raised:
        job()
    assert raised.value is error
    assert client.capture_exception(error) is not None  # the same exception: no second error
    assert client.flush(5)

    (tx,) = receiver.events("transaction")
    assert tx["result"] == "failure" and tx["outcome"] == "failure"
    (err,) = receiver.events("error")
    assert err["exception"]["handled"] is False and err["exception"]["message"] == "bad row"
    assert err["transaction_id"] == tx["id"] and err["trace_id"] == tx["trace_id"]
    assert err["transaction"]["name"] == "import orders"


def test_inside_an_open_transaction_a_job_is_a_span(client, receiver):
    @transaction("send emails")
    def send_emails():
        assert beatlib.get_current_span() is not None
        raise KeyError("smtp")

    request = client.begin_transaction("request")
    with pytest.raises(KeyError):
        send_emails()
    assert beatlib.get_current_transaction() is request  # still the request's
    client.end_transaction("POST /signup", "HTTP 5xx")
    assert client.flush(5)

    (tx,) = receiver.events("transaction")
    assert tx["name"] == "POST /signup"
    (span,) = receiver.events("span")
    assert (span["name"], span["outcome"]) == ("send emails", "failure")
    assert (span["type"], span["subtype"], span["action"]) == ("app", "internal", "task")
    assert span["parent_id"] == tx["id"]
    assert receiver.events("error") == []  # left to whatever handles the request's errors


def test_after_a_job_the_previous_state_is_back(client):
    with transaction("first"):
        pass
    with transaction("second") as tx:
        assert beatlib.get_current_transaction() is tx
    assert beatlib.get_current_transaction() is None


def test_without_a_client_the_code_runs_untouched(monkeypatch):
    monkeypatch.setattr("beatlib.client._default_client", None)

    @transaction("nothing")
    def job():
        return beatlib.get_current_transaction()

    assert job() is None
    with transaction("nothing") as tx:
        assert tx is None
    with pytest.raises(RuntimeError), transaction("nothing"):
        raise RuntimeError


def test_an_explicit_client_is_used(receiver):
    explicit = beatlib.Client(service_name="explicit", server_url=receiver.url, environ={})
    default = beatlib.Client(service_name="default", server_url=receiver.url, environ={})
    try:
        with transaction("cleanup", client=explicit):
            pass
        assert explicit.flush(5)
        assert [m["service"]["name"] for m in receiver.metadata] == ["explicit"]
    finally:
        default.close(5)
        explicit.close(5)


class Billing:
    @beatlib.transaction
    def run(self, n):
        with beatlib.capture_span("charge"):
            return self.total(n)

    @beatlib.capture_span
    def total(self, n):
        return n * 10

    @beatlib.transaction
    @classmethod
    def nightly(cls, n):
        return cls.fee(n)

    @beatlib.capture_span
    @staticmethod
    def fee(n):
        return n + 1


@beatlib.transaction
async def bare_async(n):
    return await bare_async_span(n)


@beatlib.capture_span
async def bare_async_span(n):
    await asyncio.sleep(0)
    return -n


def test_decorators_without_parentheses_run_the_function_and_record_it(client, receiver):
    """`@beatlib.transaction` and `@beatlib.capture_span` bare, on functions, methods,
    classmethods, staticmethods and coroutines: the function runs and is recorded."""
    assert Billing().run(2) == 20
    assert Billing.nightly(4) == 5 and Billing().nightly(1) == 2
    assert asyncio.run(bare_async(3)) == -3
    assert client.flush(5)
    txs = {t["name"]: t for t in receiver.events("transaction")}
    assert set(txs) == {"Billing.run", "Billing.nightly", "bare_async"}
    spans = {(s["name"], s["transaction_id"]) for s in receiver.events("span")}
    assert ("Billing.total", txs["Billing.run"]["id"]) in spans
    assert ("charge", txs["Billing.run"]["id"]) in spans
    assert ("Billing.fee", txs["Billing.nightly"]["id"]) in spans
    assert ("bare_async_span", txs["bare_async"]["id"]) in spans
    assert Billing.run.__name__ == "run" and bare_async.__name__ == "bare_async"


def test_headers_of_a_message_continue_its_trace(client, receiver):
    trace_id, parent_id = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    headers = {"Traceparent": f"00-{trace_id}-{parent_id}-01".encode(), "tracestate": "es=s:1",
               "other": 3}
    with transaction("consume", "messaging", headers=headers):
        pass

    @transaction("each call", headers={"traceparent": f"00-{trace_id}-{parent_id}-01"})
    def job():
        pass

    job()
    with transaction("no parent", headers={"traceparent": "garbage"}):
        pass
    with transaction("odd headers", headers=["not", "a", "mapping"]):  # type: ignore[arg-type]
        pass
    assert client.flush(5)
    txs = {t["name"]: t for t in receiver.events("transaction")}
    for name in ("consume", "each call"):
        assert (txs[name]["trace_id"], txs[name]["parent_id"]) == (trace_id, parent_id)
    assert txs["consume"]["type"] == "messaging"
    for name in ("no parent", "odd headers"):
        assert txs[name]["trace_id"] != trace_id and "parent_id" not in txs[name]
