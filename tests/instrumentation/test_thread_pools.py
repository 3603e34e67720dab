"""Work submitted to a thread pool (directly, or by asyncio's run_in_executor) inside a
transaction is part of it; the app's own context variables are left as they were."""

from __future__ import annotations

import asyncio
import contextvars
from concurrent.futures import ThreadPoolExecutor

import beatlib
from beatlib import context
from beatlib.transport.memory import MemorySender
from tests.schemas import validate

APP_VAR: contextvars.ContextVar[str] = contextvars.ContextVar("app_var", default="unset")


def query(n: int) -> tuple[int, str]:
    with beatlib.capture_span(f"query {n}", "db"):
        return n * 2, APP_VAR.get()


def sent(sender: MemorySender, kind: str) -> list[dict]:
    return [validate(kind, e) for e in sender.events(kind)]


def test_pool_work_joins_the_submitting_span_and_leaves_app_context_alone():
    sender = MemorySender()
    client = beatlib.Client(sender=sender, service_name="pools", environ={})
    beatlib.instrument(client.config)
    try:
        APP_VAR.set("submitter")
        client.begin_transaction("task")
        with beatlib.capture_span("fan out") as outer, ThreadPoolExecutor(2) as pool:
            results = list(pool.map(query, range(4)))
        client.end_transaction("batch", "success")
        with ThreadPoolExecutor(1) as pool:  # outside any transaction: nothing recorded
            assert pool.submit(query, 9).result() == (18, "unset")
        assert client.flush(5)
    finally:
        client.close(5)
        beatlib.uninstrument()
        context.set_active(None)
    # the pool's threads never saw the app's variable, as without beatlib
    assert results == [(0, "unset"), (2, "unset"), (4, "unset"), (6, "unset")]
    (tx,) = sent(sender, "transaction")
    spans = {s["name"]: s for s in sent(sender, "span")}
    assert set(spans) == {"fan out", "query 0", "query 1", "query 2", "query 3"}
    assert all(spans[f"query {n}"]["parent_id"] == spans["fan out"]["id"] for n in range(4))
    assert all(s["transaction_id"] == tx["id"] for s in spans.values())
    assert outer is not None


def test_run_in_executor_and_turning_it_off():
    for disabled in ((), ("thread_pools",)):
        sender = MemorySender()
        client = beatlib.Client(sender=sender, service_name="pools", environ={},
                                disabled_instrumentations=disabled)
        beatlib.instrument(client.config)

        async def handler(client: beatlib.Client = client) -> int:
            client.begin_transaction("request")
            loop = asyncio.get_running_loop()
            value, _ = await loop.run_in_executor(None, query, 5)
            client.end_transaction("GET /x", "HTTP 2xx")
            return value

        try:
            assert asyncio.run(handler()) == 10
            assert client.flush(5)
        finally:
            client.close(5)
            beatlib.uninstrument()
            context.set_active(None)
        names = [s["name"] for s in sent(sender, "span")]
        assert names == ([] if disabled else ["query 5"])
