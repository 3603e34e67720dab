"""Fixtures shared by the whole test suite: the validating intake v2 `receiver`, and the real
database servers and message broker (one of each per session, whichever folder uses it)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.brokers import rabbitmq  # noqa: F401
from tests.databases import mariadb, postgres  # noqa: F401
from tests.receiver import Receiver


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A validating intake v2 server on 127.0.0.1; fails the test if any line was invalid."""
    server = Receiver().start()
    try:
        yield server
    finally:
        server.stop()
    assert not server.invalid, f"invalid intake lines received: {server.invalid[:3]}"
