"""Fixtures for instrumentation tests: an instrumented client sending to the receiver."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import beatlib
from beatlib import context
from tests.instrumentation.http_server import HTTPServer


class Traced:
    """An instrumented client plus helpers to read back what it shipped."""

    def __init__(self, client: beatlib.Client, receiver) -> None:
        self.client = client
        self.receiver = receiver

    def begin(self, transaction_type: str = "test") -> beatlib.Transaction:
        return self.client.begin_transaction(transaction_type)

    def end(self, name: str = "test") -> beatlib.Transaction | None:
        return self.client.end_transaction(name, "success")

    def shipped(self) -> tuple[list[dict], list[dict], list[dict]]:
        """(transactions, spans in start order, errors) after a flush; all schema-valid."""
        assert self.client.flush(10)
        spans = sorted(self.receiver.events("span"), key=lambda s: s["timestamp"])
        return self.receiver.events("transaction"), spans, self.receiver.events("error")

    def spans(self) -> list[dict]:
        return self.shipped()[1]


@pytest.fixture
def server() -> Iterator[HTTPServer]:
    """A real HTTP server on 127.0.0.1 (tests/instrumentation/http_server.py)."""
    with HTTPServer() as s:
        yield s


@pytest.fixture
def traced(receiver) -> Iterator[Traced]:
    """beatlib instrumented for the test (and uninstrumented after it)."""
    client = beatlib.Client(
        service_name="instrumentation-tests",
        server_url=receiver.url,
        flush_interval="100ms",
        environ={},
    )
    beatlib.instrument(client.config)
    try:
        yield Traced(client, receiver)
    finally:
        beatlib.uninstrument()
        client.close(5)
        context.set_active(None)
