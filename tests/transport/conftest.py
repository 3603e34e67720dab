"""Helpers for transport tests: a config pointing at the receiver, a tiny encoder producing
valid intake lines, and a factory that closes every transport it made."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from beatlib.config import Config
from beatlib.transport import Transport

METADATA = b'{"metadata":{"service":{"name":"t","agent":{"name":"beatlib","version":"x"}}}}\n'
FAST = {"backoff_base": 0.05, "backoff_max": 0.3, "log_interval": 60.0}


def metadata() -> bytes:
    return METADATA


def encode(item: object) -> list[bytes]:
    """`item` is an int n (a minimal transaction whose id encodes n), (n, pad) (the same
    with `pad` random hex digits) or a dict to send as is."""
    if isinstance(item, dict):
        return [json.dumps(item).encode() + b"\n"]
    pad = 0
    if isinstance(item, tuple):  # (n, pad): a transaction carrying `pad` random hex digits
        item, pad = item
    assert isinstance(item, int)
    tx: dict[str, Any] = {
        "id": f"{item:016x}", "trace_id": f"{item:032x}", "type": "task", "duration": 1.0,
        "name": hashlib.sha256(b"%d" % item).hexdigest(), "span_count": {"started": 0},
    }
    if pad:
        tx["context"] = {"custom": {"pad": os.urandom(pad // 2).hex()}}
    return [json.dumps({"transaction": tx}, separators=(",", ":")).encode() + b"\n"]


def sent_numbers(receiver: Any) -> list[int]:
    """The n of every transaction the receiver accepted, in arrival order."""
    return [int(tx["id"], 16) for tx in receiver.events("transaction")]


def make_config(receiver: Any = None, **overrides: Any) -> Config:
    settings: dict[str, Any] = {"service_name": "t", "flush_interval": "50ms",
                                "server_timeout": "2s", "shutdown_timeout": "5s"}
    if receiver is not None:
        settings["server_url"] = receiver.url
    settings.update(overrides)
    return Config(environ={}, **settings)


@pytest.fixture
def make_transport() -> Iterator[Callable[..., Transport]]:
    """make_transport(receiver, transport_kwargs..., **config) -> Transport, closed at teardown."""
    made: list[Transport] = []

    def make(receiver: Any = None, *, encode: Callable[[object], list[bytes]] = encode,
             transport_kwargs: dict[str, Any] | None = None, **config: Any) -> Transport:
        transport = Transport(make_config(receiver, **config), encode, metadata,
                              **{**FAST, **(transport_kwargs or {})})
        made.append(transport)
        return transport

    yield make
    for transport in made:
        transport.close(timeout=1.0)
